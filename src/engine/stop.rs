//! TEMPORARY stub (replaced by the real module being written in parallel).
pub struct StopMatcher { stops: Vec<String>, held: String }
pub struct StopOutput { pub emit: String, pub stopped: bool }
impl StopMatcher {
  pub fn new(stops: Vec<String>) -> Self { Self { stops, held: String::new() } }
  pub fn push(&mut self, text: &str) -> StopOutput { let _ = &self.stops; self.held.push_str(text); StopOutput { emit: std::mem::take(&mut self.held), stopped: false } }
  pub fn flush(&mut self) -> String { std::mem::take(&mut self.held) }
}
