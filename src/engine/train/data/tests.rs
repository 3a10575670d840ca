//! Dataset parsing (every format, every refusal with its line and field, limits) and
//! tokenization (masks, chat rendering, truncation) on a small byte-level BPE tokenizer with
//! SmolLM2's ChatML template, written to a temp dir and loaded like a model directory.

use serde_json::{json, Value};

use super::*;
use crate::engine::tokenizer::{ChatMessage, Tokenizer};

/// SmolLM2-135M-Instruct's template, verbatim (it injects a default system prompt).
const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A byte-level BPE tokenizer (256 byte symbols, a few merges, ChatML specials) with the given
/// tokenizer_config.json.
fn tokenizer_with(config: Value) -> Tokenizer {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let mut vocab = serde_json::Map::new();
    for c in &alphabet {
        let n = vocab.len();
        vocab.insert(c.to_string(), json!(n));
    }
    let merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n")];
    for (a, b) in merges {
        let n = vocab.len();
        vocab.insert(format!("{a}{b}"), json!(n));
    }
    let mut added = Vec::new();
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        let n = vocab.len();
        vocab.insert(special.to_owned(), json!(n));
        added.push(
            json!({"id": n, "content": special, "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}),
        );
    }
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab,
                  "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()},
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    Tokenizer::from_hf_dir(dir.path()).unwrap()
}

fn chatml() -> Tokenizer {
    tokenizer_with(json!({"chat_template": SMOLLM2_TEMPLATE, "eos_token": "<|im_end|>"}))
}

/// Llama-style: BOS added by encode(add_special_tokens = true).
fn with_bos() -> Tokenizer {
    tokenizer_with(
        json!({"chat_template": SMOLLM2_TEMPLATE, "eos_token": "<|im_end|>",
                          "bos_token": "<|endoftext|>", "add_bos_token": true}),
    )
}

const LIMITS: DatasetLimits = DatasetLimits {
    max_records: 100,
    max_bytes: 1 << 20,
};

fn jsonl(lines: &[Value]) -> Vec<u8> {
    let mut out = String::new();
    for l in lines {
        out.push_str(&l.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

fn sft(v: Value) -> Result<Record, DatasetError> {
    parse_values(&[v], Method::Sft, &LIMITS).map(|mut r| r.remove(0))
}

fn dpo(v: Value) -> Result<Record, DatasetError> {
    parse_values(&[v], Method::Dpo, &LIMITS).map(|mut r| r.remove(0))
}

/// (field, message) of a refusal.
fn refusal(r: Result<Record, DatasetError>) -> (String, String) {
    let e = r.unwrap_err();
    assert_eq!(e.line, 1, "{e}");
    (e.field, e.message)
}

fn msg(role: Role, content: &str, train: bool) -> Message {
    Message {
        role,
        content: content.into(),
        train,
    }
}

fn cm(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

// ---- parsing: accepted formats ----

#[test]
fn every_sft_format_parses() {
    let bytes = jsonl(&[
        json!({"prompt": "Q", "completion": "A"}),
        json!({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                            {"role": "assistant", "content": "A1", "weight": 0},
                            {"role": "user", "content": "U2"},
                            {"role": "assistant", "content": "A2", "weight": 1}]}),
        json!({"text": "T"}),
    ]);
    let r = parse_jsonl(&bytes, Method::Sft, &LIMITS).unwrap();
    assert_eq!(r.len(), 3);
    assert_eq!(
        r[0],
        Record {
            line: 1,
            body: RecordBody::Sft(SftRecord::PromptCompletion {
                prompt: "Q".into(),
                completion: "A".into()
            })
        }
    );
    assert_eq!(
        r[1].body,
        RecordBody::Sft(SftRecord::Messages(vec![
            msg(Role::System, "S", false),
            msg(Role::User, "U", false),
            msg(Role::Assistant, "A1", false),
            msg(Role::User, "U2", false),
            msg(Role::Assistant, "A2", true),
        ]))
    );
    assert_eq!(r[2].body, RecordBody::Sft(SftRecord::Text("T".into())));
    assert_eq!(r[2].line, 3);
}

#[test]
fn every_dpo_format_parses() {
    let strings = dpo(json!({"prompt": "P", "chosen": "C", "rejected": "R"})).unwrap();
    assert_eq!(
        strings.body,
        RecordBody::Dpo(DpoRecord::Strings {
            prompt: "P".into(),
            chosen: "C".into(),
            rejected: "R".into()
        })
    );
    let lists = dpo(json!({"prompt": [{"role": "user", "content": "P"}],
                           "chosen": [{"role": "assistant", "content": "C"}],
                           "rejected": [{"role": "assistant", "content": "R"}]}))
    .unwrap();
    let want = |openai| {
        RecordBody::Dpo(DpoRecord::Messages {
            prompt: vec![msg(Role::User, "P", false)],
            chosen: vec![msg(Role::Assistant, "C", true)],
            rejected: vec![msg(Role::Assistant, "R", true)],
            openai,
        })
    };
    assert_eq!(lists.body, want(false));
    let openai = dpo(
        json!({"input": {"messages": [{"role": "user", "content": "P"}]},
                            "preferred_output": [{"role": "assistant", "content": "C"}],
                            "non_preferred_output": [{"role": "assistant", "content": "R"}]}),
    )
    .unwrap();
    assert_eq!(openai.body, want(true));
}

#[test]
fn blank_lines_are_skipped_but_counted_and_crlf_and_bom_are_accepted() {
    let text = "\u{feff}{\"text\": \"a\"}\r\n\r\n   \n{\"text\": \"b\"}\r\n\n";
    let r = parse_jsonl(text.as_bytes(), Method::Sft, &LIMITS).unwrap();
    assert_eq!(r.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 4]);
    let bad = "{\"text\": \"a\"}\n\n\n{\"text\": 5}\n";
    let e = parse_jsonl(bad.as_bytes(), Method::Sft, &LIMITS).unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 4: `text`: must be a string, not a number"
    );
}

// ---- parsing: refusals ----

#[test]
fn invalid_utf8_json_and_non_objects_name_the_line() {
    let mut bytes = b"{\"text\": \"a\"}\n{\"text\": \"".to_vec();
    bytes.extend_from_slice(&[0xff, b'"', b'}', b'\n']);
    let e = parse_jsonl(&bytes, Method::Sft, &LIMITS).unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (2, ""));
    assert!(e.message.contains("UTF-8"), "{e}");

    let e = parse_jsonl(
        b"{\"text\": \"a\"}\n{\"text\": \"a\",}\n",
        Method::Sft,
        &LIMITS,
    )
    .unwrap_err();
    assert_eq!(e.line, 2);
    assert!(
        e.to_string()
            .starts_with("line 2: not valid JSON at column"),
        "{e}"
    );
    assert!(
        !e.message.contains("line 1"),
        "serde's own line is meaningless: {e}"
    );

    let e = parse_jsonl(b"[1, 2]\n", Method::Sft, &LIMITS).unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 1: each record must be a JSON object, not an array"
    );
}

#[test]
fn a_typo_in_a_key_is_refused_naming_the_key() {
    let (f, m) = refusal(sft(json!({"prompt": "Q", "completon": "A"})));
    assert_eq!(f, "completon");
    assert!(m.contains("unknown field"), "{m}");
    // The first unknown key as the line writes it.
    let (f, _) = refusal(sft(json!({"promt": "Q", "completon": "A"})));
    assert_eq!(f, "promt");
    let (f, _) = refusal(sft(json!({"messages": [{"role": "user", "content": "U"},
        {"role": "assistant", "content": "A", "name": "bot"}]})));
    assert_eq!(f, "messages[1].name");
    let (f, m) = refusal(sft(
        json!({"messages": [{"role": "assistant", "content": "A"}], "text": "T"}),
    ));
    assert_eq!((f.as_str(), m.contains("`messages`")), ("text", true));
    let (f, _) = refusal(sft(json!({})));
    assert_eq!(f, "");
    let (f, _) = refusal(dpo(
        json!({"input": {"messages": [{"role": "user", "content": "P"}], "tools": []},
        "preferred_output": [{"role": "assistant", "content": "C"}],
        "non_preferred_output": [{"role": "assistant", "content": "R"}]}),
    ));
    assert_eq!(f, "input.tools");
}

#[test]
fn message_fields_are_checked_one_by_one() {
    let conv = |m: Value| sft(json!({"messages": [{"role": "user", "content": "U"}, m]}));
    let e = conv(json!({"role": "tool", "content": "x"})).unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 1: `messages[1].role`: must be one of system, user, assistant"
    );
    let (f, m) = refusal(conv(json!({"content": "x"})));
    assert_eq!((f.as_str(), m.as_str()), ("messages[1].role", "missing"));
    let (f, _) = refusal(conv(json!({"role": "assistant"})));
    assert_eq!(f, "messages[1].content");
    let (f, m) = refusal(conv(json!({"role": "assistant", "content": "   "})));
    assert_eq!(
        (f.as_str(), m.as_str()),
        ("messages[1].content", "must not be empty")
    );
    let (f, m) = refusal(conv(
        json!({"role": "assistant", "content": [{"type": "text"}]}),
    ));
    assert_eq!(f, "messages[1].content");
    assert!(m.contains("an array"), "{m}");
    let (f, m) = refusal(conv(
        json!({"role": "assistant", "content": "A", "weight": 2}),
    ));
    assert_eq!(
        (f.as_str(), m.as_str()),
        ("messages[1].weight", "must be 0 or 1")
    );
    let (f, m) = refusal(conv(
        json!({"role": "assistant", "content": "A", "weight": "1"}),
    ));
    assert_eq!(
        (f.as_str(), m.as_str()),
        ("messages[1].weight", "must be 0 or 1")
    );
    let (f, _) = refusal(sft(
        json!({"messages": [{"role": "user", "content": "U", "weight": 1},
                                                  {"role": "assistant", "content": "A"}]}),
    ));
    assert_eq!(f, "messages[0].weight");
    let (f, m) = refusal(conv(
        json!({"role": "assistant", "content": "A", "weight": 0}),
    ));
    assert_eq!(f, "messages");
    assert!(m.contains("weight 1"), "{m}");
    let (f, _) = refusal(sft(json!({"messages": [{"role": "user", "content": "U"}]})));
    assert_eq!(f, "messages");
    let (f, m) = refusal(sft(json!({"messages": []})));
    assert_eq!((f.as_str(), m.as_str()), ("messages", "must not be empty"));
    let (f, _) = refusal(sft(json!({"messages": ["hi"]})));
    assert_eq!(f, "messages[0]");
    let (f, _) = refusal(sft(json!({"messages": "hi"})));
    assert_eq!(f, "messages");
}

#[test]
fn empty_or_mistyped_strings_are_refused() {
    let (f, m) = refusal(sft(json!({"prompt": "", "completion": "A"})));
    assert_eq!((f.as_str(), m.as_str()), ("prompt", "must not be empty"));
    let (f, m) = refusal(sft(json!({"prompt": "Q"})));
    assert_eq!((f.as_str(), m.as_str()), ("completion", "missing"));
    let (f, _) = refusal(sft(json!({"prompt": "Q", "completion": null})));
    assert_eq!(f, "completion");
    let (f, _) = refusal(sft(json!({"text": ""})));
    assert_eq!(f, "text");
    let (f, _) = refusal(dpo(json!({"prompt": "P", "chosen": "C", "rejected": ""})));
    assert_eq!(f, "rejected");
}

#[test]
fn a_record_of_the_other_method_says_what_the_method_expects() {
    let (f, m) = refusal(sft(json!({"prompt": "P", "chosen": "C", "rejected": "R"})));
    assert_eq!(f, "chosen");
    assert!(m.contains("SFT job") && m.contains("`completion`"), "{m}");
    let (f, m) = refusal(dpo(json!({"prompt": "Q", "completion": "A"})));
    assert_eq!(f, "completion");
    assert!(m.contains("DPO job") && m.contains("`chosen`"), "{m}");
    let (f, _) = refusal(dpo(
        json!({"messages": [{"role": "assistant", "content": "A"}]}),
    ));
    assert_eq!(f, "messages");
}

#[test]
fn dpo_pairs_must_agree_in_form_and_differ() {
    let (f, _) = refusal(dpo(json!({"prompt": "P",
        "chosen": [{"role": "assistant", "content": "C"}], "rejected": "R"})));
    assert_eq!(f, "chosen");
    let (f, _) = refusal(dpo(json!({"prompt": [{"role": "user", "content": "P"}],
        "chosen": "C", "rejected": [{"role": "assistant", "content": "R"}]})));
    assert_eq!(f, "chosen");
    let (f, m) = refusal(dpo(json!({"prompt": [{"role": "user", "content": "P"}],
        "chosen": [{"role": "user", "content": "C"}],
        "rejected": [{"role": "assistant", "content": "R"}]})));
    assert_eq!(f, "chosen[0].role");
    assert!(m.contains("assistant"), "{m}");
    let (f, _) = refusal(dpo(json!({"prompt": [{"role": "user", "content": "P"}],
        "chosen": [{"role": "assistant", "content": "C", "weight": 1}],
        "rejected": [{"role": "assistant", "content": "R"}]})));
    assert_eq!(f, "chosen[0].weight");
    let (f, m) = refusal(dpo(
        json!({"prompt": "P", "chosen": "same", "rejected": "same"}),
    ));
    assert_eq!(f, "rejected");
    assert!(m.contains("identical"), "{m}");
    let (f, _) = refusal(dpo(json!({"prompt": 3, "chosen": "C", "rejected": "R"})));
    assert_eq!(f, "prompt");
    let (f, _) = refusal(dpo(
        json!({"input": [], "preferred_output": [], "non_preferred_output": []}),
    ));
    assert_eq!(f, "input");
    let (f, m) = refusal(dpo(
        json!({"input": {"messages": [{"role": "user", "content": "P"}]},
        "preferred_output": [{"role": "assistant", "content": "C"}]}),
    ));
    assert_eq!(
        (f.as_str(), m.as_str()),
        ("non_preferred_output", "missing")
    );
}

#[test]
fn limits_and_empty_datasets_are_whole_dataset_errors() {
    let tight = DatasetLimits {
        max_records: 2,
        max_bytes: 1 << 20,
    };
    let three = jsonl(&[
        json!({"text": "a"}),
        json!({"text": "b"}),
        json!({"text": "c"}),
    ]);
    let e = parse_jsonl(&three, Method::Sft, &tight).unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (0, "training_file"));
    assert_eq!(
        e.to_string(),
        "`training_file`: the dataset has more than the limit of 2 records"
    );
    assert!(validate_jsonl(&three, &tight).is_err());
    // Blank lines are not records.
    let two = b"{\"text\": \"a\"}\n\n\n{\"text\": \"b\"}\n";
    assert_eq!(parse_jsonl(two, Method::Sft, &tight).unwrap().len(), 2);

    let small = DatasetLimits {
        max_records: 100,
        max_bytes: 20,
    };
    let e = parse_jsonl(&three, Method::Sft, &small).unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (0, "training_file"));
    assert!(e.message.contains("20 bytes"), "{e}");

    let e = parse_jsonl(b"\n  \n", Method::Sft, &LIMITS).unwrap_err();
    assert_eq!(e.to_string(), "`training_file`: the dataset has no records");

    let values = vec![json!({"text": "a"}); 3];
    let e = parse_values(&values, Method::Sft, &tight).unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (0, "training_data"));
    let e = parse_values(&values, Method::Sft, &small).unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (0, "training_data"));
    let e = parse_values(&[], Method::Sft, &LIMITS).unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (0, "training_data"));
}

#[test]
fn inline_records_are_numbered_by_position() {
    let values = vec![
        json!({"text": "a"}),
        json!({"text": "b"}),
        json!({"txt": "c"}),
    ];
    let e = parse_values(&values, Method::Sft, &LIMITS).unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (3, "txt"));
}

#[test]
fn validate_jsonl_checks_shape_only() {
    let bytes = jsonl(&[
        json!({"anything": 1}),
        json!({"prompt": "P", "chosen": "C"}),
    ]);
    assert_eq!(validate_jsonl(&bytes, &LIMITS).unwrap(), 2);
    let e = validate_jsonl(b"{}\n\n\"text\"\n", &LIMITS).unwrap_err();
    assert_eq!(e.line, 3);
    let e = validate_jsonl(b"{}\n{\n", &LIMITS).unwrap_err();
    assert_eq!(e.line, 2);
    assert!(validate_jsonl(b"", &LIMITS).is_err());
}

#[test]
fn no_input_makes_parsing_panic() {
    let good = jsonl(&[
        json!({"prompt": "Q", "completion": "A"}),
        json!({"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A", "weight": 1}]}),
        json!({"input": {"messages": [{"role": "user", "content": "P"}]},
               "preferred_output": [{"role": "assistant", "content": "C"}],
               "non_preferred_output": [{"role": "assistant", "content": "R"}]}),
    ]);
    // Every prefix, and every single-byte corruption, in both methods: errors, never panics.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for cut in 0..good.len() {
        let _ = parse_jsonl(&good[..cut], Method::Sft, &LIMITS);
        let _ = parse_jsonl(&good[..cut], Method::Dpo, &LIMITS);
        let _ = validate_jsonl(&good[..cut], &LIMITS);
        let mut bad = good.clone();
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bad[cut] = (state & 0xff) as u8;
        let _ = parse_jsonl(&bad, Method::Sft, &LIMITS);
        let _ = parse_jsonl(&bad, Method::Dpo, &LIMITS);
    }
    // Deep nesting hits serde_json's recursion limit, not the stack.
    let deep = format!(
        "{{\"text\": {}1{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert!(parse_jsonl(deep.as_bytes(), Method::Sft, &LIMITS).is_err());
}

// ---- tokenization ----

fn targets_text(t: &Tokenizer, ex: &SftExample) -> String {
    let ids: Vec<u32> = ex
        .tokens
        .iter()
        .zip(&ex.targets)
        .filter(|(_, &on)| on)
        .map(|(&id, _)| id)
        .collect();
    t.decode(&ids, false).unwrap()
}

fn sft_examples(t: &Tokenizer, v: Value, max: usize) -> Result<Vec<SftExample>, DatasetError> {
    let records = parse_values(&[v], Method::Sft, &LIMITS).unwrap();
    match tokenize(&records, t, max)? {
        Examples::Sft(e) => Ok(e),
        Examples::Dpo(_) => panic!("SFT records gave DPO examples"),
    }
}

fn dpo_example(t: &Tokenizer, v: Value, max: usize) -> Result<DpoExample, DatasetError> {
    let records = parse_values(&[v], Method::Dpo, &LIMITS).unwrap();
    match tokenize(&records, t, max)? {
        Examples::Dpo(mut e) => Ok(e.remove(0)),
        Examples::Sft(_) => panic!("DPO records gave SFT examples"),
    }
}

#[test]
fn prompt_completion_concatenates_without_a_template_and_targets_the_completion() {
    let t = with_bos();
    let ex = sft_examples(
        &t,
        json!({"prompt": "the cat", "completion": " in the hat"}),
        512,
    )
    .unwrap()
    .remove(0);
    let p = t.encode("the cat", true).unwrap();
    let c = t.encode(" in the hat", false).unwrap();
    assert_eq!(
        p.first().copied(),
        t.bos_token_id(),
        "BOS from add_special_tokens"
    );
    let eos = t.eos_token_ids()[0];
    assert_eq!(ex.tokens, [p.clone(), c.clone(), vec![eos]].concat());
    let want: Vec<bool> = [vec![false; p.len()], vec![true; c.len() + 1]].concat();
    assert_eq!(ex.targets, want);
    assert_eq!(targets_text(&t, &ex), " in the hat<|im_end|>");
}

#[test]
fn text_records_target_everything_after_the_first_token() {
    let t = chatml();
    let ex = sft_examples(&t, json!({"text": "then then"}), 512)
        .unwrap()
        .remove(0);
    let ids = t.encode("then then", true).unwrap();
    assert_eq!(
        ex.tokens,
        [ids.clone(), t.eos_token_ids().to_vec()].concat()
    );
    assert!(!ex.targets[0]);
    assert!(ex.targets[1..].iter().all(|&x| x));
}

#[test]
fn chat_records_target_only_trained_assistant_turns() {
    let t = chatml();
    let conv = json!({"messages": [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Lyon", "weight": 0},
        {"role": "user", "content": "Try again"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "Thanks"}
    ]});
    let ex = sft_examples(&t, conv, 512).unwrap().remove(0);
    // The whole sequence is the rendered conversation up to the last trained turn...
    let upto = [
        cm("user", "Capital of France?"),
        cm("assistant", "Lyon"),
        cm("user", "Try again"),
        cm("assistant", "Paris"),
    ];
    let rendered = t.apply_chat_template(&upto, false).unwrap();
    assert_eq!(t.decode(&ex.tokens, false).unwrap(), rendered);
    assert!(rendered.starts_with("<|im_start|>system\nYou are a helpful"));
    // ...and only the trained assistant turn (with its end-of-turn) is a target: not the
    // system prompt, the user turns, the weight-0 turn or the generation prompt.
    assert_eq!(targets_text(&t, &ex), "Paris<|im_end|>\n");
    assert_eq!(ex.targets.len(), ex.tokens.len());

    // Two trained turns: both are targets, with the context between them masked.
    let conv = json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"}
    ]});
    let ex = sft_examples(&t, conv, 512).unwrap().remove(0);
    assert_eq!(targets_text(&t, &ex), "b<|im_end|>\nd<|im_end|>\n");
    let first_target = ex.targets.iter().position(|&x| x).unwrap();
    assert_eq!(
        t.decode(&ex.tokens[..first_target], false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn long_conversations_stop_rendering_at_max_seq_len() {
    let t = chatml();
    let mut messages = Vec::new();
    for i in 0..3000 {
        messages.push(json!({"role": "user", "content": format!("question {i}")}));
        messages.push(json!({"role": "assistant", "content": format!("answer {i}")}));
    }
    // Rendering all 3000 prefixes would take minutes; only the turns that fit are rendered.
    let ex = sft_examples(&t, json!({"messages": messages}), 256)
        .unwrap()
        .remove(0);
    assert_eq!(ex.tokens.len(), 256);
    let start: Vec<ChatMessage> = (0..20)
        .flat_map(|i| {
            [
                cm("user", &format!("question {i}")),
                cm("assistant", &format!("answer {i}")),
            ]
        })
        .collect();
    let full = t.apply_chat_template(&start, false).unwrap();
    assert!(full.starts_with(&t.decode(&ex.tokens, false).unwrap()));
    assert!(targets_text(&t, &ex).starts_with("answer 0<|im_end|>\nanswer 1<|im_end|>\n"));
}

#[test]
fn chat_records_need_an_incremental_chat_template() {
    let conv = json!({"messages": [{"role": "user", "content": "U"},
                                   {"role": "assistant", "content": "A"}]});
    let none = tokenizer_with(json!({"eos_token": "<|im_end|>"}));
    let e = sft_examples(&none, conv.clone(), 512).unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (1, "messages"));
    assert!(e.message.contains("no chat template"), "{e}");
    // Renders the last message differently, so a longer conversation rewrites earlier text.
    let odd = "{% for m in messages %}{% if loop.last %}<|im_start|>last {{ m.content }}{% else %}<|im_start|>{{ m.role }} {{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{% endif %}";
    let odd = tokenizer_with(json!({"chat_template": odd, "eos_token": "<|im_end|>"}));
    let e = sft_examples(&odd, conv.clone(), 512).unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (1, "messages"));
    assert!(e.message.contains("incrementally"), "{e}");
    // SmolLM2's template adds a system prompt only when there is a first message, so a
    // conversation that opens with the assistant cannot be split; the error says why.
    let e = sft_examples(
        &chatml(),
        json!({"messages": [{"role": "assistant", "content": "A"}]}),
        512,
    )
    .unwrap_err();
    assert!(
        e.message.contains("starts with an assistant message"),
        "{e}"
    );
    // A template's own refusal is reported against the record.
    let strict = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}<|im_start|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}";
    let strict = tokenizer_with(json!({"chat_template": strict, "eos_token": "<|im_end|>"}));
    assert!(sft_examples(&strict, conv, 512).is_ok());
    let e = sft_examples(
        &strict,
        json!({"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]}),
        512,
    )
    .unwrap_err();
    assert!(e.message.contains("no system role"), "{e}");
    // Plain strings need no template.
    let ok = sft_examples(&none, json!({"prompt": "P", "completion": "C"}), 512);
    assert!(ok.is_ok());
}

#[test]
fn dpo_string_pairs_tokenize_apart_with_eos() {
    let t = with_bos();
    let ex = dpo_example(
        &t,
        json!({"prompt": "the cat", "chosen": " sat", "rejected": " ran"}),
        512,
    )
    .unwrap();
    let eos = t.eos_token_ids()[0];
    assert_eq!(ex.prompt, t.encode("the cat", true).unwrap());
    assert_eq!(
        ex.chosen,
        [t.encode(" sat", false).unwrap(), vec![eos]].concat()
    );
    assert_eq!(
        ex.rejected,
        [t.encode(" ran", false).unwrap(), vec![eos]].concat()
    );
}

#[test]
fn dpo_message_pairs_render_prompt_and_turns_with_the_template() {
    let t = chatml();
    let openai = json!({"input": {"messages": [{"role": "user", "content": "Hi"}]},
                        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
                        "non_preferred_output": [{"role": "assistant", "content": "Go away."}]});
    let ex = dpo_example(&t, openai, 512).unwrap();
    assert_eq!(
        t.decode(&ex.prompt, false).unwrap(),
        t.apply_chat_template(&[cm("user", "Hi")], true).unwrap()
    );
    assert_eq!(t.decode(&ex.chosen, false).unwrap(), "Hello!<|im_end|>\n");
    assert_eq!(
        t.decode(&ex.rejected, false).unwrap(),
        "Go away.<|im_end|>\n"
    );
    let trl = json!({"prompt": [{"role": "user", "content": "Hi"}],
                     "chosen": [{"role": "assistant", "content": "Hello!"}],
                     "rejected": [{"role": "assistant", "content": "Go away."}]});
    assert_eq!(dpo_example(&t, trl, 512).unwrap(), ex);

    let none = tokenizer_with(json!({"eos_token": "<|im_end|>"}));
    let e = dpo_example(
        &none,
        json!({"input": {"messages": [{"role": "user", "content": "Hi"}]},
               "preferred_output": [{"role": "assistant", "content": "A"}],
               "non_preferred_output": [{"role": "assistant", "content": "B"}]}),
        512,
    )
    .unwrap_err();
    assert_eq!(e.field, "input.messages");
}

#[test]
fn sft_truncation_keeps_the_start_and_refuses_records_left_without_targets() {
    let t = chatml();
    let full = sft_examples(&t, json!({"prompt": "abcd", "completion": "efgh"}), 512)
        .unwrap()
        .remove(0);
    assert_eq!(full.tokens.len(), 9);
    let cut = sft_examples(&t, json!({"prompt": "abcd", "completion": "efgh"}), 6)
        .unwrap()
        .remove(0);
    assert_eq!(cut.tokens, full.tokens[..6]);
    assert_eq!(cut.targets, full.targets[..6]);
    let e = sft_examples(&t, json!({"prompt": "abcd", "completion": "efgh"}), 4).unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 1: `completion`: no completion tokens fit within max_seq_len = 4"
    );
    assert!(sft_examples(&t, json!({"text": "abc"}), 1).is_err());
    assert!(sft_examples(&t, json!({"text": "abc"}), 0).is_err());
}

#[test]
fn dpo_truncation_cuts_the_prompt_from_the_left_then_the_completions() {
    let t = chatml();
    let rec = json!({"prompt": "abcdef", "chosen": "ghij", "rejected": "kl"});
    let full = dpo_example(&t, rec.clone(), 512).unwrap();
    assert_eq!(
        (full.prompt.len(), full.chosen.len(), full.rejected.len()),
        (6, 5, 3)
    );
    // 8 tokens: the prompt keeps its last 3 so that prompt + longer completion (5) fit.
    let ex = dpo_example(&t, rec.clone(), 8).unwrap();
    assert_eq!(ex.prompt, full.prompt[3..]);
    assert_eq!(
        (ex.chosen, ex.rejected),
        (full.chosen.clone(), full.rejected.clone())
    );
    // 4 tokens: one prompt token is kept and the completions are cut on the right.
    let ex = dpo_example(&t, rec.clone(), 4).unwrap();
    assert_eq!(ex.prompt, full.prompt[5..]);
    assert_eq!(ex.chosen, full.chosen[..3]);
    assert_eq!(ex.rejected, full.rejected);
    let e = dpo_example(&t, rec, 1).unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (1, "chosen"));
    assert!(e.message.contains("max_seq_len = 1"), "{e}");
}

#[test]
fn tokenize_refuses_empty_and_mixed_record_lists() {
    let t = chatml();
    assert!(tokenize(&[], &t, 512).is_err());
    let mut records = parse_values(&[json!({"text": "a"})], Method::Sft, &LIMITS).unwrap();
    records.extend(
        parse_values(
            &[json!({"prompt": "P", "chosen": "C", "rejected": "R"})],
            Method::Dpo,
            &LIMITS,
        )
        .unwrap(),
    );
    assert!(tokenize(&records, &t, 512).is_err());
}
