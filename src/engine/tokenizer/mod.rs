//! The tokenizer: text <-> token ids with the exact ids the model was trained with, built from
//! a Hugging Face directory (tokenizer.json + tokenizer_config.json + generation_config.json)
//! or from GGUF metadata ([`gguf`]), plus the model's chat template ([`chat_template`]) and a
//! streaming detokenizer ([`IncrementalDecoder`]).
//!
//! The heavy lifting is Hugging Face's `tokenizers` crate; this module decides how to configure
//! it (which is where GGUF loaders go wrong: candle's adds a prefix space and ignores SmolLM2's
//! digit splitting) and wraps it in errors a user can act on. Nothing here touches tensors.

mod chat_template;
mod gguf;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use serde_json::Value as Json;

pub use chat_template::ChatMessage;
use chat_template::ChatTemplate;

/// Why a tokenizer could not be built or used. Messages name the file or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid: {message}")]
    InvalidFile { path: String, message: String },
    #[error("GGUF tokenizer: {0}")]
    Gguf(String),
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizers(String),
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    UnknownTokenId { id: u32, vocab_size: usize },
    #[error("this model has no chat template; send a plain prompt instead of messages")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    Template(String),
    /// The template called `raise_exception`: usually the conversation breaks its rules
    /// (roles must alternate, no system message, ...). The message is the template's own.
    #[error("the model's chat template rejected the conversation: {0}")]
    TemplateRejected(String),
}

fn tk_err(e: tokenizers::Error) -> TokenizerError {
    TokenizerError::Tokenizers(e.to_string())
}

/// How one token's text is recovered for [`Tokenizer::token_text`].
#[derive(Clone, Copy, Debug)]
enum TokenTextMode {
    /// GPT-2 byte-level: every char of the token stands for one byte.
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xNN>` a raw byte.
    Metaspace,
    /// Anything else: whatever the tokenizer's decoder gives for the token alone.
    Decoder,
}

/// Text <-> ids for one model. Immutable after construction, `Send + Sync`; share it in an `Arc`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    /// tokenizer_config.json asked for BOS but tokenizer.json's post-processor does not add it.
    prepend_bos: bool,
    /// `Err` keeps a template that failed to compile, so chat requests say why.
    chat_template: Option<Result<ChatTemplate, String>>,
    text_mode: TokenTextMode,
    vocab_size: usize,
    /// Ids of added tokens (specials and user-defined), whose text is their content verbatim.
    added_ids: HashSet<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("has_chat_template", &self.has_chat_template())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file declares in its `tokenizer.ggml.*` metadata.
    pub fn from_gguf(content: &Content) -> Result<Self, TokenizerError> {
        let g = gguf::build(content)?;
        let inner: tokenizers::Tokenizer = serde_json::from_value(g.json).map_err(|e| {
            TokenizerError::Gguf(format!(
                "the vocabulary does not form a valid tokenizer: {e}"
            ))
        })?;
        let bos_token = g.bos.and_then(|id| inner.id_to_token(id));
        let eos_token = g.eos.first().and_then(|&id| inner.id_to_token(id));
        Self::assemble(
            inner,
            g.bos,
            g.eos,
            false,
            g.chat_template,
            bos_token,
            eos_token,
        )
    }

    /// Loads a Hugging Face model directory's tokenizer: `tokenizer.json` (required),
    /// `tokenizer_config.json` (chat template, bos/eos tokens, add_bos_token),
    /// `chat_template.jinja` (newer transformers keep the template there) and
    /// `generation_config.json` / `config.json` (eos_token_id, int or list).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(TokenizerError::InvalidFile {
                path: tj.display().to_string(),
                message: "missing; adapterd needs the fast tokenizer file (in Python: \
                          AutoTokenizer.from_pretrained(dir).save_pretrained(dir) writes it)"
                    .into(),
            });
        }
        let inner =
            tokenizers::Tokenizer::from_file(&tj).map_err(|e| TokenizerError::InvalidFile {
                path: tj.display().to_string(),
                message: e.to_string(),
            })?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let gen = read_json(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);
        let model_cfg = read_json(&dir.join("config.json"))?.unwrap_or(Json::Null);

        let bos_token = token_field(&config, "bos_token");
        let eos_token = token_field(&config, "eos_token");
        let bos = bos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or_else(|| id_list(&gen, "bos_token_id").first().copied())
            .or_else(|| id_list(&model_cfg, "bos_token_id").first().copied());
        // Union: generation_config lists every turn-ending id (Llama 3: eot and eom too);
        // tokenizer_config names the primary one.
        let mut eos = id_list(&gen, "eos_token_id");
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        if eos.is_empty() {
            eos = id_list(&model_cfg, "eos_token_id");
        }

        let prepend_bos = match (config.get("add_bos_token").and_then(Json::as_bool), bos) {
            (Some(true), Some(bos)) => {
                let probe = inner.encode("a", true).map_err(tk_err)?;
                probe.get_ids().first() != Some(&bos)
            }
            _ => false,
        };
        let template = match config.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            // A list of named templates: the one called "default" is for plain chat.
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template").and_then(Json::as_str))
                .map(str::to_owned),
            _ => None,
        };
        let template = match template {
            Some(t) => Some(t),
            None => {
                let p = dir.join("chat_template.jinja");
                if p.is_file() {
                    Some(
                        std::fs::read_to_string(&p).map_err(|source| TokenizerError::Io {
                            path: p.display().to_string(),
                            source,
                        })?,
                    )
                } else {
                    None
                }
            }
        };
        Self::assemble(inner, bos, eos, prepend_bos, template, bos_token, eos_token)
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Vec<u32>,
        prepend_bos: bool,
        template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TokenizerError> {
        let vocab_size = inner.get_vocab_size(true);
        let text_mode = detect_text_mode(&inner);
        let added_ids = inner.get_added_tokens_decoder().keys().copied().collect();
        let chat_template = template
            .map(|src| ChatTemplate::new(&src, bos_token, eos_token).map_err(|e| e.to_string()));
        Ok(Self {
            inner,
            bos,
            eos,
            prepend_bos,
            chat_template,
            text_mode,
            vocab_size,
            added_ids,
        })
    }

    /// Token ids for `text`. `add_special_tokens` adds what the model expects around a
    /// sequence (BOS for Llama-style models; nothing for SmolLM2). Special tokens written in
    /// the text (`<|im_start|>`) are always recognised, as chat templates rely on.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(tk_err)?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && self.prepend_bos {
            if let Some(bos) = self.bos {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Text for `ids`. Fails on an id outside the vocabulary rather than dropping it silently.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(TokenizerError::UnknownTokenId {
                id,
                vocab_size: self.vocab_size,
            });
        }
        self.inner.decode(ids, skip_special_tokens).map_err(tk_err)
    }

    /// One token's text as a client should see it (logprobs, streamed tokens): bytes decoded,
    /// an incomplete UTF-8 sequence shown as U+FFFD. Unknown ids give an empty string.
    pub fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(&self.token_bytes(id)).into_owned()
    }

    /// The raw bytes one token stands for. A token holding part of a multi-byte character has
    /// no text of its own; its bytes are what OpenAI's `bytes` field and byte-exact clients need.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        if self.is_added(id) {
            return piece.into_bytes();
        }
        match self.text_mode {
            TokenTextMode::ByteLevel => piece
                .chars()
                .map(|c| byte_level_byte(c).unwrap_or(b'?'))
                .collect(),
            TokenTextMode::Metaspace => match sp_byte(&piece) {
                Some(b) => vec![b],
                None => piece.replace('\u{2581}', " ").into_bytes(),
            },
            TokenTextMode::Decoder => self
                .inner
                .decode(&[id], false)
                .unwrap_or_default()
                .into_bytes(),
        }
    }

    fn is_added(&self, id: u32) -> bool {
        self.added_ids.contains(&id)
    }

    /// Ids that end generation (EOS, and EOT/EOM where the model has them).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// Number of token ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// True when the model ships a chat template that compiles.
    pub fn has_chat_template(&self) -> bool {
        matches!(self.chat_template, Some(Ok(_)))
    }

    /// Renders `messages` with the model's chat template, as `transformers`'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        match &self.chat_template {
            None => Err(TokenizerError::NoChatTemplate),
            Some(Err(msg)) => Err(TokenizerError::Template(msg.clone())),
            Some(Ok(t)) => t.render(messages, add_generation_prompt),
        }
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` document, for exporting a model copy.
    pub fn to_hf_json(&self) -> Result<String, TokenizerError> {
        self.inner.to_string(true).map_err(tk_err)
    }
}

fn read_json(path: &Path) -> Result<Option<Json>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: path.display().to_string(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::InvalidFile {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}

/// `bos_token`/`eos_token` in tokenizer_config.json: a string or an AddedToken object.
fn token_field(config: &Json, key: &str) -> Option<String> {
    match config.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_owned),
        _ => None,
    }
}

/// An id field that may be an integer or a list of integers.
fn id_list(config: &Json, key: &str) -> Vec<u32> {
    match config.get(key) {
        Some(Json::Number(n)) => n
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .into_iter()
            .collect(),
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

fn detect_text_mode(inner: &tokenizers::Tokenizer) -> TokenTextMode {
    let Ok(decoder) = serde_json::to_value(inner.get_decoder()) else {
        return TokenTextMode::Decoder;
    };
    let text = decoder.to_string();
    match decoder.get("type").and_then(Json::as_str) {
        Some("ByteLevel") => TokenTextMode::ByteLevel,
        Some("Metaspace") => TokenTextMode::Metaspace,
        Some("Sequence") if text.contains("ByteFallback") || text.contains("\u{2581}") => {
            TokenTextMode::Metaspace
        }
        _ => TokenTextMode::Decoder,
    }
}

/// The byte GPT-2's byte-level alphabet maps to `c` (the inverse of bytes_to_unicode):
/// printable Latin-1 bytes stand for themselves, the other 68 are shifted to U+0100.. in order.
fn byte_level_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    let direct = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    if cp < 256 && direct(cp) {
        return Some(cp as u8);
    }
    let n = cp.checked_sub(256)?;
    (0u32..256)
        .filter(|&b| !direct(b))
        .nth(n as usize)
        .map(|b| b as u8)
}

/// `<0xNN>` byte-fallback pieces.
fn sp_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Streaming detokenization: feed generated ids one at a time, get back the text that became
/// complete. Never splits a UTF-8 character (a token can hold half of one): text ending in
/// U+FFFD is held back until the next token completes it. The pieces concatenated, plus
/// [`IncrementalDecoder::finish`], equal `decode(all ids)`.
///
/// Works like TGI/vLLM: it decodes a short window (the previously emitted chunk plus the new
/// ids) and emits the difference, so decoders that look at neighbours (SentencePiece's leading
/// space) see the same context as a full decode.
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: Arc<Tokenizer>, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds one generated id; returns the newly completed text, if any. Ids outside the
    /// vocabulary (a model's padded embedding rows) carry no text and are ignored.
    pub fn push(&mut self, id: u32) -> Option<String> {
        if id as usize >= self.tokenizer.vocab_size() {
            return None;
        }
        self.ids.push(id);
        let prefix = self.window(self.prefix_offset, self.read_offset);
        let text = self.window(self.prefix_offset, self.ids.len());
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') && text.starts_with(&prefix) {
            let new = text[prefix.len()..].to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Some(new)
        } else {
            None
        }
    }

    /// The text still held back (an incomplete character at the end of generation, shown as
    /// U+FFFD), so that nothing the model produced is lost.
    pub fn finish(&mut self) -> Option<String> {
        let prefix = self.window(self.prefix_offset, self.read_offset);
        let text = self.window(self.prefix_offset, self.ids.len());
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        match text.strip_prefix(prefix.as_str()) {
            Some(rest) if !rest.is_empty() => Some(rest.to_owned()),
            _ => None,
        }
    }

    /// Every id pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    fn window(&self, from: usize, to: usize) -> String {
        // Ids were range-checked in push, so decoding cannot fail on them.
        self.tokenizer
            .decode(&self.ids[from..to], self.skip_special_tokens)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
