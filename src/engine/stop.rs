//! Stop strings over streamed text.
//!
//! Decoded text arrives a token's worth at a time, and a stop string may be split across any
//! number of pieces, so a [`StopMatcher`] holds back the shortest tail of the text that could
//! still turn into a stop string and releases everything before it. When a stop string is
//! completed, generation should end: the stop string and whatever followed it are dropped.
//!
//! Which match wins: the one that is *completed first* (earliest end in the text), and among
//! those ending at the same place the longest (earliest start). That is what a streaming
//! generator sees, since it stops as soon as any stop string is complete, and it makes the
//! result independent of how the text was split into pieces: `"abcd"` with stops `["abcd", "c"]`
//! yields `"ab"` whether it arrives whole or one character at a time; with stops `["ab", "b"]`,
//! `"xab"` yields `"x"`.
//!
//! Invariant: the concatenated `emit`s plus [`StopMatcher::flush`] equal the pushed text up to
//! (excluding) that match, or all of it if no stop string occurs. Everything works on `&str`, so
//! text is only ever cut at character boundaries.

/// Matches stop strings across pushes; one per sequence.
#[derive(Clone, Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not released: a tail that is a proper prefix of some stop string.
    held: String,
    stopped: bool,
}

/// What a push releases.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopOutput {
    /// Text that may be sent to the client now.
    pub emit: String,
    /// A stop string was completed (now or earlier): end generation.
    pub stopped: bool,
}

impl StopMatcher {
    /// Empty strings are ignored: they would match everywhere and stop before any output.
    pub fn new(stops: Vec<String>) -> Self {
        let mut stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        stops.sort();
        stops.dedup();
        StopMatcher {
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has been completed.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feed newly decoded text; returns what may be released to the client now (text that
    /// cannot be the beginning of a stop string), and whether a stop string was completed (in
    /// which case the stop string and everything after it is dropped). After a stop, further
    /// pushes are dropped too.
    pub fn push(&mut self, text: &str) -> StopOutput {
        if self.stopped {
            return StopOutput {
                emit: String::new(),
                stopped: true,
            };
        }
        if self.stops.is_empty() {
            return StopOutput {
                emit: text.to_owned(),
                stopped: false,
            };
        }
        self.held.push_str(text);

        // Earlier pushes left no complete match in `held`, so any match here ends in the new
        // text. `find` gives each stop's earliest occurrence, hence its earliest end.
        let first = self
            .stops
            .iter()
            .filter_map(|s| {
                self.held
                    .find(s.as_str())
                    .map(|start| (start + s.len(), start))
            })
            .min();
        if let Some((_, start)) = first {
            self.held.truncate(start);
            self.stopped = true;
            return StopOutput {
                emit: std::mem::take(&mut self.held),
                stopped: true,
            };
        }

        // Hold back the longest tail that some stop string starts with; any future match must
        // start inside it. Only char boundaries can start a match (stops are valid UTF-8).
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let from = self.held.len().saturating_sub(longest.saturating_sub(1));
        let cut = (from..self.held.len())
            .filter(|&i| self.held.is_char_boundary(i))
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let rest = self.held.split_off(cut);
        StopOutput {
            emit: std::mem::replace(&mut self.held, rest),
            stopped: false,
        }
    }

    /// At end of generation: release whatever was held back (nothing after a stop).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    /// Push each piece; returns everything released and whether it stopped.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = matcher(stops);
        let mut out = String::new();
        let mut stopped = false;
        for p in pieces {
            let o = m.push(p);
            assert!(!stopped || o.emit.is_empty(), "emitted after stop");
            out.push_str(&o.emit);
            stopped |= o.stopped;
        }
        out.push_str(&m.flush());
        (out, stopped)
    }

    /// Offline reference: the match with the earliest end, ties to the earliest start.
    fn reference(stops: &[&str], text: &str) -> (String, bool) {
        let first = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s).map(|start| (start + s.len(), start)))
            .min();
        match first {
            Some((_, start)) => (text[..start].to_string(), true),
            None => (text.to_string(), false),
        }
    }

    #[test]
    fn no_stops_passes_through() {
        let mut m = matcher(&["", ""]);
        assert_eq!(
            m.push("hello"),
            StopOutput {
                emit: "hello".into(),
                stopped: false
            }
        );
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let mut m = matcher(&["</s>"]);
        assert_eq!(m.push("hi <").emit, "hi ");
        assert_eq!(m.push("/").emit, "");
        // "</x" cannot start "</s>" anywhere, so all of it goes.
        assert_eq!(m.push("x").emit, "</x");
        assert_eq!(m.push(" </").emit, " ");
        assert_eq!(m.flush(), "</");
    }

    #[test]
    fn stop_split_across_many_pushes() {
        let (out, stopped) = run(&["STOP"], &["ab", "S", "T", "O", "Pcd"]);
        assert_eq!((out.as_str(), stopped), ("ab", true));
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("abST").emit, "ab");
        let o = m.push("OP and more");
        assert_eq!((o.emit.as_str(), o.stopped), ("", true));
        assert!(m.push("later").stopped);
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn overlapping_stops() {
        assert_eq!(run(&["ab", "b"], &["xab"]), ("x".into(), true));
        assert_eq!(run(&["ab", "b"], &["x", "a", "b"]), ("x".into(), true));
        assert_eq!(run(&["ab", "b"], &["xb"]), ("x".into(), true));
        // "c" completes before "abcd" could, however the text is split.
        assert_eq!(run(&["abcd", "c"], &["abcd"]), ("ab".into(), true));
        assert_eq!(
            run(&["abcd", "c"], &["a", "b", "c", "d"]),
            ("ab".into(), true)
        );
        // Self-overlapping stop.
        assert_eq!(run(&["aab"], &["a", "a", "a", "b"]), ("a".into(), true));
    }

    #[test]
    fn multibyte_never_split() {
        let mut m = matcher(&["é🙂"]);
        let o = m.push("café");
        assert_eq!(o.emit, "caf");
        let o = m.push("é");
        assert_eq!(o.emit, "é");
        let o = m.push("🙂!");
        assert_eq!((o.emit.as_str(), o.stopped), ("", true));
        // A stop that shares leading bytes with a different char must not match it.
        assert_eq!(run(&["é"], &["è", "ê"]), ("èê".into(), false));
    }

    #[test]
    fn random_splittings_match_reference() {
        let alphabet = ['a', 'b', 'c', 'é', '🙂', ' ', 'x'];
        let stop_sets: [&[&str]; 5] = [
            &["ab", "b"],
            &["abcab", "c🙂"],
            &["éé", "🙂 a", "xxx"],
            &["aab", "abc", "bca"],
            &["🙂🙂", "a", ""],
        ];
        let mut rng = StdRng::seed_from_u64(0x5709);
        for _ in 0..2000 {
            let len = rng.random_range(0..24);
            let text: String = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let stops = stop_sets[rng.random_range(0..stop_sets.len())];
            // Cut at random char boundaries (empty pieces included).
            let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
            let mut cuts: Vec<usize> = bounds
                .iter()
                .copied()
                .filter(|_| rng.random_bool(0.4))
                .collect();
            cuts.push(text.len());
            let mut pieces = Vec::new();
            let mut prev = 0;
            for c in cuts {
                pieces.push(&text[prev..c]);
                if rng.random_bool(0.1) {
                    pieces.push("");
                }
                prev = c;
            }
            assert_eq!(
                run(stops, &pieces),
                reference(stops, &text),
                "text {text:?} stops {stops:?} pieces {pieces:?}"
            );
        }
    }
}
