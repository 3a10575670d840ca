//! Tool calling for any model (OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`), in
//! the way llama.cpp's server handles models without a tool format of their own: the tools are
//! described in a system message, the reply is constrained by a JSON schema to one object —
//! `{"tool_call": {"<name>": {arguments}}}`, with `parallel_tool_calls`
//! `{"tool_calls": [{"<name>": {arguments}}, …]}`, or, when the model may choose,
//! `{"response": "…"}` — and calls come back as OpenAI's `tool_calls` (`finish_reason`
//! `tool_calls`). The arguments therefore always parse and follow the tool's `parameters` (the
//! subset `json_schema` enforces; others are refused naming the tool).

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::api::generation;
use crate::api::messages::{tool_call_text, tool_calls_text};
use crate::api::ApiError;
use crate::engine::json_mode::ResponseFormat;
use crate::engine::json_schema::{Schema, MAX_PROPERTIES};
use crate::engine::tokenizer::ChatMessage;

/// Most calls one reply may make with `parallel_tool_calls` (a small model left unbounded
/// repeats a call until its tokens run out).
pub const MAX_PARALLEL_CALLS: u32 = 8;

/// The tools of one request and what the model may do with them.
#[derive(Debug)]
pub struct Tools {
    tools: Vec<Tool>,
    choice: Choice,
    /// Several calls per reply (`parallel_tool_calls: true`; not for a named choice).
    many: bool,
}

#[derive(Debug)]
struct Tool {
    name: String,
    description: Option<String>,
    parameters: Value,
}

#[derive(Debug, PartialEq)]
enum Choice {
    /// Call a tool or answer (`"auto"`, the default).
    Auto,
    /// Call one of the tools (`"required"`).
    Required,
    /// Call this tool.
    Named(String),
}

/// `tools`, `tool_choice` and `parallel_tool_calls` (`functions`, the deprecated form, is
/// refused by the caller). `None`: no tools, or `tool_choice: "none"`, which answers as if there
/// were none. Calls are one per reply unless `parallel_tool_calls` is `true` (llama.cpp's
/// default; OpenAI's is `true`, but one call is always a valid reply to it).
pub fn parse(
    tools: Option<&Value>,
    choice: Option<&Value>,
    parallel: Option<&Value>,
) -> Result<Option<Tools>, ApiError> {
    let parallel = match parallel {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid_field(
                "`parallel_tool_calls` must be true or false",
            ))
        }
    };
    let choice = match choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "none" => return Ok(None),
        Some(Value::String(s)) if s == "auto" => Some(Choice::Auto),
        Some(Value::String(s)) if s == "required" => Some(Choice::Required),
        Some(c) => match c.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if c.get("type").and_then(Value::as_str) == Some("function") => {
                Some(Choice::Named(name.to_owned()))
            }
            _ => return Err(ApiError::invalid_field(
                "`tool_choice` must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}",
            )),
        },
    };
    let list = match tools {
        None | Some(Value::Null) => {
            return match choice {
                None | Some(Choice::Auto) => Ok(None),
                Some(_) => Err(ApiError::invalid_field("`tool_choice` needs `tools`")),
            }
        }
        Some(Value::Array(list)) if !list.is_empty() && list.len() <= MAX_PROPERTIES => list,
        Some(_) => {
            return Err(ApiError::invalid_field(format!(
                "`tools` must be a list of 1 to {MAX_PROPERTIES} tools"
            )))
        }
    };
    let mut tools: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let tool = tool(t, i)?;
        if tools.iter().any(|other| other.name == tool.name) {
            return Err(ApiError::invalid_field(format!(
                "`tools[{i}].function.name`: `{}` is given twice",
                tool.name
            )));
        }
        tools.push(tool);
    }
    let choice = choice.unwrap_or(Choice::Auto);
    if let Choice::Named(name) = &choice {
        if !tools.iter().any(|t| &t.name == name) {
            return Err(ApiError::invalid_field(format!(
                "`tool_choice.function.name`: no tool is named `{name}`"
            )));
        }
    }
    let many = parallel && !matches!(choice, Choice::Named(_));
    Ok(Some(Tools {
        tools,
        choice,
        many,
    }))
}

fn tool(t: &Value, i: usize) -> Result<Tool, ApiError> {
    let field = |f: &str| format!("`tools[{i}].{f}`");
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(ApiError::invalid_field(format!(
            "{} must be \"function\"",
            field("type")
        )));
    }
    let Some(f) = t.get("function").and_then(Value::as_object) else {
        return Err(ApiError::invalid_field(format!(
            "{} must be an object",
            field("function")
        )));
    };
    let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
    if !generation::is_openai_name(name) {
        return Err(ApiError::invalid_field(format!(
            "{} must be 1-64 letters, digits, `_` or `-`",
            field("function.name")
        )));
    }
    let description = match f.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            return Err(ApiError::invalid_field(format!(
                "{} must be a string",
                field("function.description")
            )))
        }
    };
    // No parameters: the function takes none (OpenAI's reading).
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p) => p.clone(),
    };
    if parameters.get("type").and_then(Value::as_str) != Some("object") {
        return Err(ApiError::invalid_field(format!(
            "{} must be a schema of `type` \"object\"",
            field("function.parameters")
        )));
    }
    Schema::compile(&parameters)
        .map_err(|e| ApiError::invalid_field(format!("{} {e}", field("function.parameters"))))?;
    Ok(Tool {
        name: name.to_owned(),
        description,
        parameters,
    })
}

/// Where a tool's parameters sit in the reply schema.
fn tool_pointer(name: &str, many: bool) -> String {
    if many {
        format!("/properties/tool_calls/items/properties/{name}")
    } else {
        format!("/properties/tool_call/properties/{name}")
    }
}

/// A tool's parameters as they sit inside the reply schema: its `$defs` (and `definitions`)
/// move to the root as `<tool>.<name>` (Pydantic's schemas carry them), and every `$ref` is
/// rewritten to match, so references resolve as they did in the tool's own schema.
fn embed(name: &str, parameters: &Value, defs: &mut Map<String, Value>, many: bool) -> Value {
    let mut p = parameters.clone();
    let at = tool_pointer(name, many);
    for (key, tag) in [("$defs", ""), ("definitions", "definitions.")] {
        if let Some(Value::Object(moved)) = p.as_object_mut().and_then(|o| o.remove(key)) {
            for (def, mut schema) in moved {
                rewrite_refs(&mut schema, name, &at);
                defs.insert(format!("{name}.{tag}{def}"), schema);
            }
        }
    }
    rewrite_refs(&mut p, name, &at);
    p
}

/// `at`: where the tool's parameters sit in the reply schema.
fn rewrite_refs(v: &mut Value, tool: &str, at: &str) {
    match v {
        Value::Object(o) => {
            for (key, child) in o.iter_mut() {
                match (key.as_str(), child) {
                    ("$ref", Value::String(r)) => {
                        let Some(ptr) = r.strip_prefix('#') else {
                            continue; // not resolvable: compiling names it
                        };
                        *r = if let Some(rest) = ptr.strip_prefix("/$defs/") {
                            format!("#/$defs/{tool}.{rest}")
                        } else if let Some(rest) = ptr.strip_prefix("/definitions/") {
                            format!("#/$defs/{tool}.definitions.{rest}")
                        } else {
                            format!("#{at}{ptr}")
                        };
                    }
                    (_, child) => rewrite_refs(child, tool, at),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| rewrite_refs(i, tool, at)),
        _ => {}
    }
}

impl Tools {
    /// The schema every reply is held to.
    fn schema(&self) -> Value {
        let mut defs = Map::new();
        let many = self.many;
        let mut call = |only: Option<&str>| {
            let props: Map<String, Value> = self
                .tools
                .iter()
                .filter(|t| only.is_none_or(|n| n == t.name))
                .map(|t| {
                    (
                        t.name.clone(),
                        embed(&t.name, &t.parameters, &mut defs, many),
                    )
                })
                .collect();
            let one = json!({"type": "object", "properties": props, "minProperties": 1,
                             "maxProperties": 1});
            if many {
                json!({"type": "array", "items": one, "minItems": 1,
                       "maxItems": MAX_PARALLEL_CALLS})
            } else {
                one
            }
        };
        let key = if many { "tool_calls" } else { "tool_call" };
        let mut schema = match &self.choice {
            Choice::Named(name) => {
                json!({"type": "object", "properties": {key: call(Some(name))},
                       "required": [key]})
            }
            Choice::Required => {
                json!({"type": "object", "properties": {key: call(None)}, "required": [key]})
            }
            Choice::Auto => json!({"type": "object",
                "properties": {key: call(None), "response": {"type": "string"}},
                "minProperties": 1, "maxProperties": 1}),
        };
        schema["$defs"] = Value::Object(defs);
        schema
    }

    /// The constraint for the engine. Each tool's parameters compiled alone already, so the
    /// whole can fail only on size.
    pub fn response_format(&self) -> Result<ResponseFormat, ApiError> {
        let schema = Schema::compile(&self.schema())
            .map_err(|e| ApiError::invalid_field(format!("`tools`: {e}")))?;
        Ok(ResponseFormat::JsonSchema(Arc::new(schema)))
    }

    /// What the model is told, at the end of the system message (one is added if none leads).
    fn instructions(&self) -> String {
        let args = json!("<arguments object>");
        let example = tool_call_text("<tool name>", &args);
        let several = tool_calls_text(&[("<tool name>", &args), ("<tool name>", &args)]);
        let mut text = match &self.choice {
            Choice::Auto if self.many => format!(
                "You can call tools. Reply with exactly one JSON object: {several} to call one or \
                 more tools (at most {MAX_PARALLEL_CALLS}), or {{\"response\": \"<your reply>\"}} to \
                 answer directly."
            ),
            Choice::Required if self.many => format!(
                "Reply with exactly one JSON object that calls one or more of the tools (at most \
                 {MAX_PARALLEL_CALLS}): {several}."
            ),
            Choice::Auto => format!(
                "You can call tools. Reply with exactly one JSON object: {example} to call a \
                 tool, or {{\"response\": \"<your reply>\"}} to answer directly."
            ),
            Choice::Required => {
                format!(
                    "Reply with exactly one JSON object that calls one of the tools: {example}."
                )
            }
            Choice::Named(name) => format!(
                "Reply with exactly one JSON object that calls the tool `{name}`: {}.",
                tool_call_text(name, &json!("<arguments object>"))
            ),
        };
        text.push_str("\nTools:");
        for t in &self.tools {
            text.push_str(&format!("\n- {}", t.name));
            if let Some(d) = &t.description {
                text.push_str(&format!(": {d}"));
            }
            text.push_str(&format!(" Arguments: {}", t.parameters));
        }
        text
    }

    /// Adds the instructions to the conversation's leading system message.
    pub fn instruct(&self, messages: &mut Vec<ChatMessage>) {
        let text = self.instructions();
        match messages.first_mut() {
            Some(m) if m.role == "system" => {
                m.content.push_str("\n\n");
                m.content.push_str(&text);
            }
            _ => messages.insert(
                0,
                ChatMessage {
                    role: "system".to_owned(),
                    content: text,
                },
            ),
        }
    }
}

/// One call a reply made.
#[derive(Debug, PartialEq)]
pub struct Call {
    pub name: String,
    /// Compact JSON text, as OpenAI sends arguments.
    pub arguments: String,
}

/// Reads the complete calls of a reply: `{"tool_call": …}` or `{"tool_calls": [ … ]}`.
fn read_calls(text: &str) -> Option<Vec<Call>> {
    let v: Value = serde_json::from_str(text).ok()?;
    let one = |c: &Value| {
        let (name, arguments) = c.as_object()?.iter().next()?;
        Some(Call {
            name: name.clone(),
            arguments: arguments.to_string(),
        })
    };
    match (v.get("tool_call"), v.get("tool_calls")) {
        (Some(c), _) => Some(vec![one(c)?]),
        (None, Some(Value::Array(cs))) if !cs.is_empty() => cs.iter().map(one).collect(),
        _ => None,
    }
}

/// Reads a reply as it is generated, so an answer streams as it comes: the text of
/// `{"response": "…"}` is decoded piece by piece (escapes held until complete), while a call
/// is held until it closes.
#[derive(Debug, Default)]
pub struct ReplyStream {
    raw: String,
    state: ReadState,
    /// Inside an answer: where the undecoded text starts in `raw`.
    at: usize,
}

#[derive(Debug, Default, PartialEq)]
enum ReadState {
    /// Before the key says which it is.
    #[default]
    Head,
    Answer,
    AnswerDone,
    Call,
}

/// How a reply ended.
#[derive(Debug, PartialEq)]
pub enum Finished {
    Calls(Vec<Call>),
    /// Text still to send: nothing after an answer, the raw text of a reply cut short.
    Rest(String),
}

impl ReplyStream {
    /// Takes the next piece of generated text; returns the answer text it completes.
    pub fn feed(&mut self, piece: &str) -> String {
        self.raw.push_str(piece);
        if self.state == ReadState::Head {
            match head(&self.raw) {
                Some(Head::Answer(at)) => (self.state, self.at) = (ReadState::Answer, at),
                Some(Head::Call) => self.state = ReadState::Call,
                None => {}
            }
        }
        let mut out = String::new();
        while self.state == ReadState::Answer {
            let rest = &self.raw[self.at..];
            let Some(c) = rest.chars().next() else {
                break;
            };
            match c {
                '"' => self.state = ReadState::AnswerDone,
                '\\' => match unescape(rest) {
                    Some((ch, used)) => {
                        out.push(ch);
                        self.at += used;
                    }
                    None => break, // the escape is not complete yet
                },
                c => {
                    out.push(c);
                    self.at += c.len_utf8();
                }
            }
        }
        out
    }

    /// The reply is over: a call, or what is left to send.
    pub fn finish(self) -> Finished {
        match self.state {
            ReadState::Answer | ReadState::AnswerDone => Finished::Rest(String::new()),
            ReadState::Call | ReadState::Head => match read_calls(&self.raw) {
                Some(calls) => Finished::Calls(calls),
                None => Finished::Rest(self.raw),
            },
        }
    }
}

enum Head {
    /// An answer; its text starts at this offset.
    Answer(usize),
    Call,
}

/// Which key the reply opened with, once that is known.
fn head(raw: &str) -> Option<Head> {
    let t = raw.trim_start().strip_prefix('{')?.trim_start();
    let t = t.strip_prefix('"')?;
    let (key, t) = t.split_once('"')?;
    match key {
        "tool_call" | "tool_calls" => Some(Head::Call),
        "response" => {
            let t = t
                .trim_start()
                .strip_prefix(':')?
                .trim_start()
                .strip_prefix('"')?;
            Some(Head::Answer(raw.len() - t.len()))
        }
        _ => None,
    }
}

/// The character a JSON escape at the start of `s` stands for, and its length; `None` until
/// the escape (a surrogate pair's both halves) is complete.
fn unescape(s: &str) -> Option<(char, usize)> {
    let b = s.as_bytes();
    let simple = match b.get(1)? {
        b'n' => '\n',
        b't' => '\t',
        b'r' => '\r',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'u' => {
            let unit = |i: usize| {
                s.get(i..i + 4)
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
            };
            let hi = unit(2)?;
            if (0xd800..0xdc00).contains(&hi) {
                let lo = unit(8)?;
                let c = 0x10000 + ((hi - 0xd800) << 10) + (lo.checked_sub(0xdc00)?);
                return Some((char::from_u32(c)?, 12));
            }
            return Some((char::from_u32(hi)?, 6));
        }
        &other => other as char, // `\"`, `\\`, `\/`
    };
    Some((simple, 2))
}

/// One choice's `message` and `finish_reason` for a whole reply generated under tools.
pub fn choice_message(text: &str, finish: &'static str) -> (Value, &'static str) {
    let mut reader = ReplyStream::default();
    let mut content = reader.feed(text);
    match reader.finish() {
        Finished::Calls(calls) => (
            json!({"role": "assistant", "content": null, "tool_calls": call_entries(&calls)}),
            "tool_calls",
        ),
        Finished::Rest(rest) => {
            content.push_str(&rest);
            (json!({"role": "assistant", "content": content}), finish)
        }
    }
}

/// OpenAI's `tool_calls` entries for a reply's calls (each with its `index`, which streamed
/// deltas need and whole messages tolerate).
pub fn call_entries(calls: &[Call]) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"index": i, "id": generation::request_id("call_"), "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments}})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Current weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "now"}}])
    }

    #[test]
    fn choices_build_their_schemas_and_instructions() {
        let t = parse(Some(&weather()), None, None).unwrap().unwrap();
        assert_eq!(t.choice, Choice::Auto);
        let schema = Arc::new(Schema::compile(&t.schema()).unwrap());
        let ok = |text: &str| {
            let mut p = crate::engine::json_schema::SchemaPrefix::new(schema.clone());
            p.push(text.as_bytes()) && p.is_complete()
        };
        assert!(ok(r#"{"tool_call": {"get_weather": {"city": "Oslo"}}}"#));
        assert!(ok(r#"{"tool_call": {"now": {}}}"#) && ok(r#"{"response": "hi"}"#));
        assert!(!ok(r#"{"tool_call": {"get_weather": {}}}"#));
        let mut msgs = vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }];
        t.instruct(&mut msgs);
        assert_eq!(msgs[0].role, "system");
        assert!(msgs[0]
            .content
            .contains("get_weather: Current weather Arguments: {"));

        let named = json!({"type": "function", "function": {"name": "now"}});
        let t = parse(Some(&weather()), Some(&named), None)
            .unwrap()
            .unwrap();
        let s = t.schema();
        assert_eq!(
            s["properties"]["tool_call"]["properties"]
                .as_object()
                .unwrap()
                .len(),
            1
        );
        assert!(parse(Some(&weather()), Some(&json!("none")), None)
            .unwrap()
            .is_none());
        assert!(parse(None, None, None).unwrap().is_none());
    }

    #[test]
    fn parallel_calls_are_a_bounded_list_and_read_back_in_order() {
        let t = parse(Some(&weather()), None, Some(&json!(true)))
            .unwrap()
            .unwrap();
        let schema = Arc::new(Schema::compile(&t.schema()).unwrap());
        let ok = |text: &str| {
            let mut p = crate::engine::json_schema::SchemaPrefix::new(schema.clone());
            p.push(text.as_bytes()) && p.is_complete()
        };
        assert!(ok(
            r#"{"tool_calls": [{"get_weather": {"city": "Oslo"}}, {"now": {}}]}"#
        ));
        assert!(ok(r#"{"response": "hi"}"#));
        assert!(!ok(r#"{"tool_calls": []}"#));
        assert!(!ok(r#"{"tool_call": {"now": {}}}"#));
        let nine = [r#"{"now": {}}"#; 9].join(", ");
        assert!(!ok(&format!(r#"{{"tool_calls": [{nine}]}}"#)));
        let mut msgs = Vec::new();
        t.instruct(&mut msgs);
        assert!(
            msgs[0].content.contains(r#"{"tool_calls":["#),
            "{}",
            msgs[0].content
        );

        let (msg, finish) = choice_message(
            r#"{"tool_calls": [{"get_weather": {"city": "Oslo"}}, {"now": {}}]}"#,
            "stop",
        );
        assert_eq!(finish, "tool_calls");
        let calls = msg["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[0]["function"]["arguments"], r#"{"city":"Oslo"}"#);
        assert_eq!(
            (calls[0]["index"].clone(), calls[1]["index"].clone()),
            (json!(0), json!(1))
        );
        assert_ne!(calls[0]["id"], calls[1]["id"]);

        // A named choice calls once, whatever `parallel_tool_calls` says.
        let named = json!({"type": "function", "function": {"name": "now"}});
        let t = parse(Some(&weather()), Some(&named), Some(&json!(true)))
            .unwrap()
            .unwrap();
        assert!(t.schema()["properties"]["tool_call"].is_object());
        let e = parse(Some(&weather()), None, Some(&json!("yes"))).unwrap_err();
        assert!(e.to_string().contains("`parallel_tool_calls`"), "{e}");
    }

    #[test]
    fn a_tool_with_definitions_and_references_keeps_them() {
        // Pydantic's shape: nested models in `$defs`, a recursive one, and a root reference.
        let tools = json!([{"type": "function", "function": {"name": "plan", "parameters": {
            "type": "object",
            "properties": {"step": {"$ref": "#/$defs/Step"}, "again": {"$ref": "#"}},
            "required": ["step"],
            "$defs": {"Step": {"type": "object", "properties": {
                "what": {"type": "string"}, "then": {"anyOf": [{"$ref": "#/$defs/Step"}, {"type": "null"}]}},
                "required": ["what", "then"]}}}}},
            {"type": "function", "function": {"name": "other", "parameters": {"type": "object",
                "properties": {"step": {"$ref": "#/definitions/Step"}},
                "definitions": {"Step": {"type": "integer"}}}}}]);
        let t = parse(Some(&tools), Some(&json!("required")), None)
            .unwrap()
            .unwrap();
        let schema = Arc::new(Schema::compile(&t.schema()).expect("the combined schema compiles"));
        let ok = |text: &str| {
            let mut p = crate::engine::json_schema::SchemaPrefix::new(schema.clone());
            p.push(text.as_bytes()) && p.is_complete()
        };
        assert!(ok(
            r#"{"tool_call": {"plan": {"step": {"what": "a", "then": {"what": "b", "then": null}}}}}"#
        ));
        assert!(ok(
            r#"{"tool_call": {"plan": {"step": {"what": "a", "then": null}, "again": {"step": {"what": "c", "then": null}}}}}"#
        ));
        assert!(ok(r#"{"tool_call": {"other": {"step": 3}}}"#));
        assert!(!ok(r#"{"tool_call": {"other": {"step": "3"}}}"#));
        // The same references inside a list of calls.
        let t = parse(Some(&tools), Some(&json!("required")), Some(&json!(true)))
            .unwrap()
            .unwrap();
        let schema = Arc::new(Schema::compile(&t.schema()).expect("the list schema compiles"));
        let mut p = crate::engine::json_schema::SchemaPrefix::new(schema);
        let text = r#"{"tool_calls": [{"plan": {"step": {"what": "a", "then": null}, "again": {"step": {"what": "c", "then": null}}}}, {"other": {"step": 1}}]}"#;
        assert!(p.push(text.as_bytes()) && p.is_complete());
    }

    #[test]
    fn bad_tools_are_refused_naming_the_field() {
        for (tools, choice, words) in [
            (json!([]), None, "`tools`"),
            (json!([{"type": "code"}]), None, "`tools[0].type`"),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                None,
                "`tools[0].function.name`",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                    "properties": {"d": {"type": "string", "format": "iri"}}}}}]),
                None,
                "`tools[0].function.parameters` at /properties/d/format",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
                None,
                "parameters",
            ),
            (
                weather(),
                Some(json!({"type": "function", "function": {"name": "nope"}})),
                "no tool is named",
            ),
            (weather(), Some(json!("sometimes")), "`tool_choice`"),
            (
                json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
                None,
                "twice",
            ),
        ] {
            let e = parse(Some(&tools), choice.as_ref(), None).expect_err(words);
            assert!(e.to_string().contains(words), "{words}: {e}");
        }
        assert!(parse(None, Some(&json!("required")), None).is_err());
    }

    #[test]
    fn replies_read_as_calls_or_text_in_any_pieces() {
        let answer = r#" {"response": "caf\u00e9 \"ok\"\n\ud83d\ude00 \\ done"}"#;
        let want = "café \"ok\"\n😀 \\ done";
        // Split at every character boundary: the same text, escapes held until complete.
        let cuts: Vec<usize> = (0..=answer.len())
            .filter(|&i| answer.is_char_boundary(i))
            .collect();
        for &cut in &cuts {
            let mut r = ReplyStream::default();
            let mut got = r.feed(&answer[..cut]);
            got.push_str(&r.feed(&answer[cut..]));
            assert_eq!(got, want, "cut at {cut}");
            assert_eq!(r.finish(), Finished::Rest(String::new()));
        }
        let call = r#"{"tool_call": {"f": {"a": [1, 2]}}}"#;
        let mut r = ReplyStream::default();
        assert_eq!(r.feed(&call[..20]) + &r.feed(&call[20..]), "");
        assert_eq!(
            r.finish(),
            Finished::Calls(vec![Call {
                name: "f".into(),
                arguments: r#"{"a":[1,2]}"#.into()
            }])
        );
        // Cut short: the raw text of a call, the decoded part of an answer.
        let (msg, finish) = choice_message(r#"{"tool_call": {"f": {"a""#, "length");
        assert_eq!(
            (msg["content"].as_str(), finish),
            (Some(r#"{"tool_call": {"f": {"a""#), "length")
        );
        let (msg, _) = choice_message(r#"{"response": "hal"#, "length");
        assert_eq!(msg["content"], "hal");
        let (msg, finish) = choice_message(r#"{"tool_call": {"f": {}}}"#, "stop");
        assert_eq!(finish, "tool_calls");
        assert!(
            msg["content"].is_null()
                && msg["tool_calls"][0]["id"]
                    .as_str()
                    .unwrap()
                    .starts_with("call_")
        );
    }
}
