//! Chat messages as clients send them, into the prompt: validation, OpenAI's content parts,
//! earlier tool calls and their results, and rendering with the model's chat template.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::engine::tokenizer::ChatMessage;

/// A chat message as clients send it: `content` is a string or OpenAI's list of text parts
/// (null for an assistant turn that only called tools).
#[derive(Clone, Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// An assistant turn's tool calls (OpenAI's form).
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// A `tool` message: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ToolCallIn {
    pub function: FunctionCallIn,
}

#[derive(Clone, Debug, Deserialize)]
pub struct FunctionCallIn {
    pub name: String,
    /// The arguments as a JSON text, as OpenAI sends them.
    pub arguments: String,
}

/// How an assistant's tool call is written in the conversation: the same JSON the model is
/// asked to produce (see `openai::tools`), so earlier calls read like its own replies.
pub fn tool_call_text(name: &str, arguments: &Value) -> String {
    json!({"tool_call": {name: arguments}}).to_string()
}

/// Several calls in one reply, as a model is asked to write them under `parallel_tool_calls`.
pub fn tool_calls_text(calls: &[(&str, &Value)]) -> String {
    let list: Vec<Value> = calls.iter().map(|(n, a)| json!({*n: a})).collect();
    json!({"tool_calls": list}).to_string()
}

/// Validates `messages` into the template's form. `developer` is OpenAI's newer name for
/// `system`. A `tool` result becomes a user turn holding `{"tool_response": …}`, which any chat
/// template can render (templates disagree on a `tool` role).
pub fn chat_messages(messages: Vec<MessageIn>, field: &str) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_field(format!(
            "`{field}` must not be empty"
        )));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let at = format!("{field}[{i}]");
        let content = match m.content {
            None => None,
            Some(MessageContent::Text(t)) => Some(t),
            Some(MessageContent::Parts(parts)) => Some(text_parts(parts, &at)?),
        };
        let calls = m.tool_calls.unwrap_or_default();
        if !calls.is_empty() && m.role != "assistant" {
            return Err(ApiError::invalid_field(format!(
                "`{at}.tool_calls`: only assistant messages carry tool calls"
            )));
        }
        let (role, content) = match (m.role.as_str(), content) {
            ("assistant", content) if !calls.is_empty() => {
                let mut text = content.unwrap_or_default();
                let mut parsed = Vec::with_capacity(calls.len());
                for (j, call) in calls.iter().enumerate() {
                    let args: Value =
                        serde_json::from_str(&call.function.arguments).map_err(|e| {
                            ApiError::invalid_field(format!(
                                "`{at}.tool_calls[{j}].function.arguments` is not JSON: {e}"
                            ))
                        })?;
                    parsed.push((call.function.name.as_str(), args));
                }
                // As the model was asked to write them: one call, or a list.
                text.push_str(&match parsed.as_slice() {
                    [(name, args)] => tool_call_text(name, args),
                    many => {
                        let refs: Vec<(&str, &Value)> = many.iter().map(|(n, a)| (*n, a)).collect();
                        tool_calls_text(&refs)
                    }
                });
                ("assistant".to_owned(), text)
            }
            ("tool", Some(content)) => {
                let response = json!({"tool_response": {
                    "tool_call_id": m.tool_call_id, "content": content}});
                ("user".to_owned(), response.to_string())
            }
            ("system" | "developer", Some(c)) => ("system".to_owned(), c),
            (role @ ("user" | "assistant"), Some(c)) => (role.to_owned(), c),
            ("system" | "developer" | "user" | "assistant" | "tool", None) => {
                return Err(ApiError::invalid_field(format!(
                    "`{at}.content` is required"
                )))
            }
            (other, _) => {
                return Err(ApiError::invalid_field(format!(
                    "`{at}.role` is `{other}`; expected system, user, assistant, tool or developer"
                )))
            }
        };
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

fn text_parts(parts: Vec<ContentPart>, at: &str) -> Result<String, ApiError> {
    let mut text = String::new();
    for (j, p) in parts.into_iter().enumerate() {
        match (p.kind.as_str(), p.text) {
            ("text", Some(t)) => text.push_str(&t),
            _ => {
                return Err(ApiError::invalid_field(format!(
                "`{at}.content[{j}]`: only parts of type `text` with a `text` field are supported"
            )))
            }
        }
    }
    Ok(text)
}

/// Renders messages with the model's chat template (generation prompt appended) and
/// tokenizes the result; the template supplies the special tokens.
pub fn render_chat(
    state: &AppState,
    messages: &[ChatMessage],
    field: &str,
) -> Result<Vec<u32>, ApiError> {
    let text = state
        .tokenizer
        .apply_chat_template(messages, true)
        .map_err(|e| {
            ApiError::invalid_field(format!(
                "`{field}` could not be rendered with the chat template: {e}"
            ))
        })?;
    state
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::invalid_field(format!("`{field}` could not be tokenized: {e}")))
}

/// [`chat_messages`] then [`render_chat`].
pub fn chat_prompt(
    state: &AppState,
    messages: Vec<MessageIn>,
    field: &str,
) -> Result<Vec<u32>, ApiError> {
    render_chat(state, &chat_messages(messages, field)?, field)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(v: Value) -> Vec<MessageIn> {
        serde_json::from_value(v).expect("messages parse")
    }

    #[test]
    fn earlier_calls_render_as_the_model_was_asked_to_write_them() {
        let call = |id: &str, name: &str, args: &str| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}});
        let out = chat_messages(
            messages(json!([
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": null, "tool_calls": [call("a", "f", "{\"x\": 1}")]},
                {"role": "assistant", "tool_calls": [call("b", "f", "{}"), call("c", "g", "[]")]},
                {"role": "tool", "tool_call_id": "c", "content": "done"}
            ])),
            "messages",
        )
        .expect("valid");
        assert_eq!(out[1].content, r#"{"tool_call":{"f":{"x":1}}}"#);
        assert_eq!(out[2].content, r#"{"tool_calls":[{"f":{}},{"g":[]}]}"#);
        assert_eq!(out[3].role, "user");
        assert_eq!(
            out[3].content,
            r#"{"tool_response":{"tool_call_id":"c","content":"done"}}"#
        );
        let e = chat_messages(
            messages(json!([{"role": "assistant", "tool_calls": [call("a", "f", "{x")]}])),
            "messages",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("messages[0].tool_calls[0].function.arguments"),
            "{e}"
        );
    }
}
