//! The record formats, and the rules one JSON value must follow to become a [`Record`] for a
//! method. Every refusal names the field (`messages[2].content`) and says what was expected.
//! Unknown keys are refused rather than ignored: a typo such as `completon` must not quietly
//! train on nothing.

use serde_json::{Map, Value};

use super::{DatasetError, Method};

/// One validated record and the line (or inline position) it came from, for later errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub line: usize,
    pub body: RecordBody,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordBody {
    Sft(SftRecord),
    Dpo(DpoRecord),
}

/// The SFT formats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SftRecord {
    /// Plain strings, concatenated without a chat template; the loss covers the completion.
    PromptCompletion { prompt: String, completion: String },
    /// An OpenAI chat conversation, rendered with the base model's chat template; the loss
    /// covers the assistant turns whose `train` is set.
    Messages(Vec<Message>),
    /// Plain text; the loss covers all of it.
    Text(String),
}

/// The DPO formats. In the message form `chosen` and `rejected` hold only assistant messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DpoRecord {
    Strings {
        prompt: String,
        chosen: String,
        rejected: String,
    },
    /// `{"prompt","chosen","rejected"}` as message lists, or OpenAI's `{"input":{"messages"},
    /// "preferred_output","non_preferred_output"}` (which becomes the same thing).
    Messages {
        prompt: Vec<Message>,
        chosen: Vec<Message>,
        rejected: Vec<Message>,
        /// The record used OpenAI's field names, which later errors then name.
        openai: bool,
    },
}

impl DpoRecord {
    /// The record's own names for its prompt, chosen and rejected fields.
    pub fn field_names(&self) -> [&'static str; 3] {
        match self {
            DpoRecord::Messages { openai: true, .. } => {
                ["input.messages", "preferred_output", "non_preferred_output"]
            }
            _ => ["prompt", "chosen", "rejected"],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One chat message. `train` is true for assistant turns the loss covers (`weight` 1, the
/// default) and false for every other message (and for `weight: 0`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
    pub train: bool,
}

const SFT_FORMATS: &str = "an SFT record has `prompt` and `completion`, `messages`, or `text`";
const DPO_FORMATS: &str = "a DPO record has `prompt`, `chosen` and `rejected`, or `input`, \
                           `preferred_output` and `non_preferred_output`";
/// Keys that only a DPO record has: seeing one in an SFT job means the method is wrong.
const DPO_ONLY: &[&str] = &[
    "chosen",
    "rejected",
    "input",
    "preferred_output",
    "non_preferred_output",
];
/// Keys that only an SFT record has.
const SFT_ONLY: &[&str] = &["completion", "messages", "text"];

/// Validates one record for `method`.
pub(super) fn record(line: usize, value: &Value, method: Method) -> Result<Record, DatasetError> {
    let Value::Object(obj) = value else {
        return Err(super::not_an_object(line, value));
    };
    let r = Rec { line, obj };
    let body = match method {
        Method::Sft => RecordBody::Sft(r.sft()?),
        Method::Dpo => RecordBody::Dpo(r.dpo()?),
    };
    Ok(Record { line, body })
}

/// How a JSON value is called in messages.
pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

struct Rec<'a> {
    line: usize,
    obj: &'a Map<String, Value>,
}

impl Rec<'_> {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> DatasetError {
        DatasetError::new(self.line, field, message)
    }

    fn sft(&self) -> Result<SftRecord, DatasetError> {
        if let Some(k) = self.obj.keys().find(|k| DPO_ONLY.contains(&k.as_str())) {
            return Err(self.err(
                k.as_str(),
                format!("belongs to DPO records, but this is an SFT job: {SFT_FORMATS}"),
            ));
        }
        let has = |k: &str| self.obj.contains_key(k);
        if has("messages") {
            self.only(&["messages"], "a messages record")?;
            let messages = messages(self.line, "messages", self.get("messages")?, Turns::Sft)?;
            if !messages.iter().any(|m| m.train) {
                return Err(self.err(
                    "messages",
                    "needs at least one assistant message with weight 1: the loss covers \
                     assistant turns only",
                ));
            }
            Ok(SftRecord::Messages(messages))
        } else if has("text") {
            self.only(&["text"], "a text record")?;
            Ok(SftRecord::Text(self.string("text")?))
        } else if has("prompt") || has("completion") {
            self.only(&["prompt", "completion"], "a prompt/completion record")?;
            Ok(SftRecord::PromptCompletion {
                prompt: self.string("prompt")?,
                completion: self.string("completion")?,
            })
        } else {
            Err(self.unrecognised(SFT_FORMATS))
        }
    }

    fn dpo(&self) -> Result<DpoRecord, DatasetError> {
        if let Some(k) = self.obj.keys().find(|k| SFT_ONLY.contains(&k.as_str())) {
            return Err(self.err(
                k.as_str(),
                format!("belongs to SFT records, but this is a DPO job: {DPO_FORMATS}"),
            ));
        }
        let has = |k: &str| self.obj.contains_key(k);
        if has("input") || has("preferred_output") || has("non_preferred_output") {
            self.only(
                &["input", "preferred_output", "non_preferred_output"],
                "an OpenAI preference record",
            )?;
            let input = match self.get("input")? {
                Value::Object(o) => o,
                other => {
                    return Err(self.err(
                        "input",
                        format!("must be an object with `messages`, not {}", kind(other)),
                    ))
                }
            };
            if let Some(k) = input.keys().find(|k| k.as_str() != "messages") {
                return Err(self.err(
                    format!("input.{k}"),
                    "unknown field; `input` has only `messages`",
                ));
            }
            let prompt = input
                .get("messages")
                .ok_or_else(|| self.err("input.messages", "missing"))?;
            let prompt = messages(self.line, "input.messages", prompt, Turns::Prompt)?;
            let chosen = self.completion_messages("preferred_output")?;
            let rejected = self.completion_messages("non_preferred_output")?;
            if chosen == rejected {
                return Err(self.err("non_preferred_output", identical("preferred_output")));
            }
            Ok(DpoRecord::Messages {
                prompt,
                chosen,
                rejected,
                openai: true,
            })
        } else if has("prompt") || has("chosen") || has("rejected") {
            self.only(&["prompt", "chosen", "rejected"], "a preference record")?;
            match self.get("prompt")? {
                Value::String(_) => {
                    let prompt = self.string("prompt")?;
                    let chosen = self.string_like_prompt("chosen")?;
                    let rejected = self.string_like_prompt("rejected")?;
                    if chosen == rejected {
                        return Err(self.err("rejected", identical("chosen")));
                    }
                    Ok(DpoRecord::Strings {
                        prompt,
                        chosen,
                        rejected,
                    })
                }
                Value::Array(_) => {
                    let prompt = messages(self.line, "prompt", self.get("prompt")?, Turns::Prompt)?;
                    let chosen = self.completion_messages("chosen")?;
                    let rejected = self.completion_messages("rejected")?;
                    if chosen == rejected {
                        return Err(self.err("rejected", identical("chosen")));
                    }
                    Ok(DpoRecord::Messages {
                        prompt,
                        chosen,
                        rejected,
                        openai: false,
                    })
                }
                other => Err(self.err(
                    "prompt",
                    format!(
                        "must be a string or a list of messages, not {}",
                        kind(other)
                    ),
                )),
            }
        } else {
            Err(self.unrecognised(DPO_FORMATS))
        }
    }

    /// Refuses any key outside `allowed`, naming it.
    fn only(&self, allowed: &[&str], what: &str) -> Result<(), DatasetError> {
        match self.obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            None => Ok(()),
            Some(k) => Err(self.err(
                k.as_str(),
                format!("unknown field; {what} has only {}", list(allowed)),
            )),
        }
    }

    /// No key says which format the record is: name the first key (likely a typo).
    fn unrecognised(&self, formats: &str) -> DatasetError {
        match self.obj.keys().next() {
            Some(k) => self.err(k.as_str(), format!("unknown field; {formats}")),
            None => self.err("", format!("the record is empty; {formats}")),
        }
    }

    fn get(&self, field: &str) -> Result<&Value, DatasetError> {
        self.obj
            .get(field)
            .ok_or_else(|| self.err(field, "missing"))
    }

    fn string(&self, field: &str) -> Result<String, DatasetError> {
        text(self.line, field, self.get(field)?)
    }

    fn string_like_prompt(&self, field: &str) -> Result<String, DatasetError> {
        match self.get(field)? {
            Value::Array(_) => Err(self.err(
                field,
                "must be a string like `prompt` (or make all three message lists)",
            )),
            v => text(self.line, field, v),
        }
    }

    /// `chosen`/`rejected`/`*_output`: a non-empty list of assistant messages.
    fn completion_messages(&self, field: &str) -> Result<Vec<Message>, DatasetError> {
        match self.get(field)? {
            Value::String(_) if field == "chosen" || field == "rejected" => Err(self.err(
                field,
                "must be a list of assistant messages like `prompt` (or make all three strings)",
            )),
            v => messages(self.line, field, v, Turns::Completion),
        }
    }
}

fn identical(other: &str) -> String {
    format!("is identical to `{other}`; a preference pair needs two different completions")
}

fn list(keys: &[&str]) -> String {
    let quoted: Vec<String> = keys.iter().map(|k| format!("`{k}`")).collect();
    quoted.join(", ")
}

/// A non-empty string (whitespace alone counts as empty).
fn text(line: usize, field: &str, v: &Value) -> Result<String, DatasetError> {
    match v {
        Value::String(s) if s.trim().is_empty() => {
            Err(DatasetError::new(line, field, "must not be empty"))
        }
        Value::String(s) => Ok(s.clone()),
        other => Err(DatasetError::new(
            line,
            field,
            format!("must be a string, not {}", kind(other)),
        )),
    }
}

/// Which messages a list may hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Turns {
    /// SFT conversation: any role; assistant messages may carry `weight`.
    Sft,
    /// DPO prompt: any role, no weights.
    Prompt,
    /// DPO completion: assistant messages only, no weights.
    Completion,
}

fn messages(
    line: usize,
    field: &str,
    v: &Value,
    turns: Turns,
) -> Result<Vec<Message>, DatasetError> {
    let err = |f: String, m: String| DatasetError::new(line, f, m);
    let Value::Array(items) = v else {
        return Err(err(
            field.to_owned(),
            format!("must be a list of messages, not {}", kind(v)),
        ));
    };
    if items.is_empty() {
        return Err(err(field.to_owned(), "must not be empty".into()));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let Value::Object(m) = item else {
            return Err(err(
                at,
                format!(
                    "must be a message object with `role` and `content`, not {}",
                    kind(item)
                ),
            ));
        };
        let allowed: &[&str] = if turns == Turns::Sft {
            &["role", "content", "weight"]
        } else {
            &["role", "content"]
        };
        if let Some(k) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
            let why = if k == "weight" {
                "only SFT messages records take a weight".to_owned()
            } else {
                format!("unknown field; a message has only {}", list(allowed))
            };
            return Err(err(format!("{at}.{k}"), why));
        }
        let role = match m.get("role") {
            None => return Err(err(format!("{at}.role"), "missing".into())),
            Some(Value::String(r)) => match r.as_str() {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                _ => {
                    return Err(err(
                        format!("{at}.role"),
                        "must be one of system, user, assistant".into(),
                    ))
                }
            },
            Some(other) => {
                return Err(err(
                    format!("{at}.role"),
                    format!("must be a string, not {}", kind(other)),
                ))
            }
        };
        if turns == Turns::Completion && role != Role::Assistant {
            return Err(err(
                format!("{at}.role"),
                format!("must be assistant: `{field}` holds the reply"),
            ));
        }
        let content = match m.get("content") {
            None => return Err(err(format!("{at}.content"), "missing".into())),
            Some(c) => text(line, &format!("{at}.content"), c)?,
        };
        let train = match m.get("weight") {
            None => role == Role::Assistant,
            Some(_) if role != Role::Assistant => {
                return Err(err(
                    format!("{at}.weight"),
                    "only assistant messages have a weight".into(),
                ))
            }
            Some(w) => match w.as_f64() {
                Some(1.0) => true,
                Some(0.0) => false,
                _ => return Err(err(format!("{at}.weight"), "must be 0 or 1".into())),
            },
        };
        out.push(Message {
            role,
            content,
            train,
        });
    }
    Ok(out)
}
