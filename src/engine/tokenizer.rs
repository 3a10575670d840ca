//! TEMPORARY stub (replaced by the real module being written in parallel).
use std::sync::Arc;
pub struct Tokenizer { inner: tokenizers::Tokenizer, eos: Vec<u32> }
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct ChatMessage { pub role: String, pub content: String }
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError { #[error("{0}")] Msg(String) }
impl Tokenizer {
  pub fn from_gguf(_c: &candle_core::quantized::gguf_file::Content) -> Result<Self, TokenizerError> { Err(TokenizerError::Msg("stub".into())) }
  pub fn from_hf_dir(dir: &std::path::Path) -> Result<Self, TokenizerError> { let inner = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| TokenizerError::Msg(e.to_string()))?; Ok(Self { inner, eos: vec![0] }) }
  pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> { Ok(self.inner.encode(text, add_special_tokens).map_err(|e| TokenizerError::Msg(e.to_string()))?.get_ids().to_vec()) }
  pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> { self.inner.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Msg(e.to_string())) }
  pub fn token_text(&self, id: u32) -> String { self.decode(&[id], false).unwrap_or_default() }
  pub fn eos_token_ids(&self) -> &[u32] { &self.eos }
  pub fn bos_token_id(&self) -> Option<u32> { None }
  pub fn vocab_size(&self) -> usize { self.inner.get_vocab_size(true) }
  pub fn has_chat_template(&self) -> bool { false }
  pub fn apply_chat_template(&self, messages: &[ChatMessage], _add_generation_prompt: bool) -> Result<String, TokenizerError> { Ok(messages.iter().map(|m| m.content.clone()).collect::<Vec<_>>().join("\n")) }
}
pub struct IncrementalDecoder { tok: Arc<Tokenizer>, ids: Vec<u32>, emitted: usize }
impl IncrementalDecoder {
  pub fn new(tok: Arc<Tokenizer>) -> Self { Self { tok, ids: vec![], emitted: 0 } }
  pub fn push(&mut self, id: u32) -> Option<String> { self.ids.push(id); let s = self.tok.decode(&self.ids, true).ok()?; if s.ends_with('\u{FFFD}') { return None } let out = s.get(self.emitted..)?.to_string(); self.emitted = s.len(); if out.is_empty() { None } else { Some(out) } }
}
