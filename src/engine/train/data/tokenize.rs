//! Records -> token ids with loss masks, following TRL's SFTTrainer / DPOTrainer:
//!
//! - Plain strings are not templated: `encode(prompt, add_special_tokens=true)` ++
//!   `encode(completion)` ++ EOS; the targets are the completion and the EOS. `{"text"}` is
//!   all target (after the first token) plus EOS.
//! - Message records are rendered with the base model's chat template. The context before
//!   assistant message `i` is `messages[..i]` rendered with the generation prompt; the turn is
//!   what `messages[..=i]` rendered without it adds beyond that. Each piece is tokenized on its
//!   own (no special tokens added: the template writes them) and concatenated, so an assistant
//!   turn's tokens are exactly the ones the model generates at inference. A template that does
//!   not render incrementally (a later render does not extend the earlier one) is refused.
//! - DPO keeps prompt, chosen and rejected apart; the trainer scores each completion after
//!   the shared prompt.
//! - Truncation to `max_seq_len`: SFT keeps the first tokens; DPO drops prompt tokens from the
//!   left until the prompt and the longer completion fit (keeping at least one), then cuts the
//!   completions on the right. A record left with nothing to learn is an error.

use crate::engine::tokenizer::{ChatMessage, Tokenizer, TokenizerError};

use super::records::{DpoRecord, Message, Record, RecordBody, Role, SftRecord};
use super::{DatasetError, DpoExample, Examples, SftExample, INLINE_FIELD};

/// Renders and tokenizes validated records (all of one method) into training examples.
pub fn tokenize(
    records: &[Record],
    tokenizer: &Tokenizer,
    max_seq_len: usize,
) -> Result<Examples, DatasetError> {
    let Some(first) = records.first() else {
        return Err(super::no_records(INLINE_FIELD));
    };
    let t = Tok {
        tokenizer,
        max_seq_len,
    };
    match first.body {
        RecordBody::Sft(_) => {
            let mut out = Vec::with_capacity(records.len());
            for r in records {
                match &r.body {
                    RecordBody::Sft(s) => out.push(t.sft(r.line, s)?),
                    RecordBody::Dpo(_) => return Err(mixed(r.line)),
                }
            }
            Ok(Examples::Sft(out))
        }
        RecordBody::Dpo(_) => {
            let mut out = Vec::with_capacity(records.len());
            for r in records {
                match &r.body {
                    RecordBody::Dpo(d) => out.push(t.dpo(r.line, d)?),
                    RecordBody::Sft(_) => return Err(mixed(r.line)),
                }
            }
            Ok(Examples::Dpo(out))
        }
    }
}

fn mixed(line: usize) -> DatasetError {
    DatasetError::new(line, "", "the dataset mixes SFT and DPO records")
}

struct Tok<'a> {
    tokenizer: &'a Tokenizer,
    max_seq_len: usize,
}

/// A sequence under construction.
#[derive(Default)]
struct Seq {
    tokens: Vec<u32>,
    targets: Vec<bool>,
}

impl Seq {
    fn push(&mut self, ids: &[u32], target: bool) {
        self.tokens.extend_from_slice(ids);
        self.targets.extend(std::iter::repeat_n(target, ids.len()));
    }
}

impl Tok<'_> {
    fn sft(&self, line: usize, r: &SftRecord) -> Result<SftExample, DatasetError> {
        let mut seq = Seq::default();
        let field = match r {
            SftRecord::PromptCompletion { prompt, completion } => {
                seq.push(&self.encode(line, "prompt", prompt, true)?, false);
                seq.push(&self.encode(line, "completion", completion, false)?, true);
                seq.push(&[self.eos(line, "completion")?], true);
                "completion"
            }
            SftRecord::Text(text) => {
                seq.push(&self.encode(line, "text", text, true)?, true);
                seq.push(&[self.eos(line, "text")?], true);
                "text"
            }
            SftRecord::Messages(messages) => {
                self.chat(line, messages, &mut seq)?;
                "messages"
            }
        };
        // Token 0 has no context to be predicted from.
        if let Some(t) = seq.targets.first_mut() {
            *t = false;
        }
        let cut = seq.tokens.len() >= self.max_seq_len;
        seq.tokens.truncate(self.max_seq_len);
        seq.targets.truncate(self.max_seq_len);
        if !seq.targets.contains(&true) {
            return Err(if cut {
                self.nothing_fits(line, field)
            } else {
                DatasetError::new(line, field, "produced no completion tokens to train on")
            });
        }
        Ok(SftExample {
            tokens: seq.tokens,
            targets: seq.targets,
        })
    }

    fn dpo(&self, line: usize, r: &DpoRecord) -> Result<DpoExample, DatasetError> {
        let [pf, cf, rf] = r.field_names();
        let (mut prompt, mut chosen, mut rejected) = match r {
            DpoRecord::Strings {
                prompt,
                chosen,
                rejected,
            } => {
                let eos = self.eos(line, cf)?;
                let mut c = self.encode(line, cf, chosen, false)?;
                c.push(eos);
                let mut rej = self.encode(line, rf, rejected, false)?;
                rej.push(eos);
                (self.encode(line, pf, prompt, true)?, c, rej)
            }
            DpoRecord::Messages {
                prompt,
                chosen,
                rejected,
                ..
            } => {
                let context = chat(prompt);
                let prompt_text = self.render(line, pf, &context, true)?;
                let turn = |field: &str, reply: &[Message]| -> Result<Vec<u32>, DatasetError> {
                    let mut all = context.clone();
                    all.extend(chat(reply));
                    let full = self.render(line, field, &all, false)?;
                    let text = full
                        .strip_prefix(prompt_text.as_str())
                        .ok_or_else(|| not_incremental(line, field, prompt.len()))?;
                    self.encode(line, field, text, false)
                };
                (
                    self.encode(line, pf, &prompt_text, false)?,
                    turn(cf, chosen)?,
                    turn(rf, rejected)?,
                )
            }
        };
        for (ids, f) in [(&prompt, pf), (&chosen, cf), (&rejected, rf)] {
            if ids.is_empty() {
                return Err(DatasetError::new(line, f, "produced no tokens"));
            }
        }
        let max = self.max_seq_len;
        let longer = chosen.len().max(rejected.len());
        if prompt.len().saturating_add(longer) > max {
            let keep = max.saturating_sub(longer).max(1).min(prompt.len());
            prompt.drain(..prompt.len() - keep);
        }
        let room = max.saturating_sub(prompt.len());
        chosen.truncate(room);
        rejected.truncate(room);
        if chosen.is_empty() || rejected.is_empty() {
            return Err(self.nothing_fits(line, cf));
        }
        Ok(DpoExample {
            prompt,
            chosen,
            rejected,
        })
    }

    /// Appends the rendered conversation to `seq` piece by piece — the context before each
    /// assistant turn (masked), then the turn (a target if trained) — up to the last trained
    /// turn (later messages teach nothing). Stops once `max_seq_len` tokens are in: the rest
    /// would be truncated away, and rendering every prefix of a long conversation is quadratic.
    fn chat(&self, line: usize, messages: &[Message], seq: &mut Seq) -> Result<(), DatasetError> {
        let all = chat(messages);
        let last = messages
            .iter()
            .rposition(|m| m.role == Role::Assistant && m.train)
            .unwrap_or(0);
        let mut done = String::new();
        for (i, m) in messages.iter().enumerate().take(last + 1) {
            if m.role != Role::Assistant {
                continue;
            }
            if seq.tokens.len() >= self.max_seq_len {
                break;
            }
            let (Some(before), Some(through)) = (all.get(..i), all.get(..=i)) else {
                break;
            };
            let context = self.render(line, "messages", before, true)?;
            let gap = context
                .strip_prefix(done.as_str())
                .ok_or_else(|| not_incremental(line, "messages", i))?;
            seq.push(&self.encode(line, "messages", gap, false)?, false);
            let full = self.render(line, "messages", through, false)?;
            let turn = full
                .strip_prefix(context.as_str())
                .ok_or_else(|| not_incremental(line, "messages", i))?;
            seq.push(&self.encode(line, "messages", turn, false)?, m.train);
            done = full;
        }
        Ok(())
    }

    fn render(
        &self,
        line: usize,
        field: &str,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, DatasetError> {
        self.tokenizer
            .apply_chat_template(messages, add_generation_prompt)
            .map_err(|e| match e {
                TokenizerError::NoChatTemplate => DatasetError::new(
                    line,
                    field,
                    "the base model has no chat template, so message records cannot be \
                     rendered; use prompt/completion or text records",
                ),
                e => DatasetError::new(line, field, e.to_string()),
            })
    }

    fn encode(
        &self,
        line: usize,
        field: &str,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, DatasetError> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| DatasetError::new(line, field, e.to_string()))
    }

    fn eos(&self, line: usize, field: &str) -> Result<u32, DatasetError> {
        self.tokenizer.eos_token_ids().first().copied().ok_or_else(|| {
            DatasetError::new(
                line,
                field,
                "the base model's tokenizer has no end-of-sequence token to end the completion with",
            )
        })
    }

    fn nothing_fits(&self, line: usize, field: &str) -> DatasetError {
        DatasetError::new(
            line,
            field,
            format!(
                "no completion tokens fit within max_seq_len = {}",
                self.max_seq_len
            ),
        )
    }
}

fn chat(messages: &[Message]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|m| ChatMessage {
            role: m.role.as_str().to_owned(),
            content: m.content.clone(),
        })
        .collect()
}

/// `turn` is the index of the assistant message that could not be located.
fn not_incremental(line: usize, field: &str, turn: usize) -> DatasetError {
    let hint = if turn == 0 {
        " (the conversation starts with an assistant message; templates that add a default \
         system prompt need a system or user message first)"
    } else {
        ""
    };
    DatasetError::new(
        line,
        field,
        format!(
            "the base model's chat template does not render this conversation incrementally \
             (rendering a longer conversation changes the text of the earlier turns), so the \
             assistant turns cannot be located{hint}; use prompt/completion records"
        ),
    )
}
