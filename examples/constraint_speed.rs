//! Times the whole-vocabulary check of a JSON constraint — what the sampler falls back to after
//! eight refused draws — on MODEL's real vocabulary, at a few places in a reply (JSON mode and a
//! schema): `cargo run --release --example constraint_speed -- MODEL.gguf [REPS]`. Prints the
//! median microseconds per check and how many tokens each place allows, and what accepting a
//! token costs (the per-step tables included).

use std::sync::Arc;
use std::time::Instant;

use adapterd::engine::json_mode::{JsonConstraint, ResponseFormat, Vocabulary};
use adapterd::engine::json_schema::Schema;
use anyhow::Context;
use candle_core::Device;
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = args
        .get(1)
        .context("usage: constraint_speed MODEL [REPS]")?;
    let reps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(21);
    let loaded = adapterd::engine::load_model(std::path::Path::new(model), &Device::Cpu)?;
    let tok = &loaded.tokenizer;
    let vocab = Arc::new(Vocabulary {
        bytes: (0..tok.vocab_size() as u32)
            .map(|id| tok.token_bytes(id).into_boxed_slice())
            .collect(),
        eos: tok.eos_token_ids().to_vec(),
    });
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "population": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["capital", "port", "old"]}}},
        "required": ["name", "population", "tags"]});
    // Patterned strings and bounded numbers go through their tables (no plain-text fast path).
    let patterned = json!({"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-\\d{4}$"},
        "email": {"type": "string", "format": "email"},
        "day": {"type": "string", "format": "date"},
        "rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000}},
        "required": ["code", "email", "day", "rate"]});
    let places = [
        "",
        "{\n  \"",
        "{\n  \"name\": \"Par",
        "{\n  \"name\": \"Paris\",\n  \"population\": 21",
        "{\n  \"name\": \"Paris\",\n  \"population\": 2,\n  \"tags\": [\"capital\", ",
    ];
    let patterned_places = [
        "{\"code\": \"AB",
        "{\"code\": \"ABC-1234\", \"email\": \"ann.l",
        "{\"code\": \"ABC-1234\", \"email\": \"ann@mail.ex",
        "{\"code\": \"ABC-1234\", \"email\": \"a@b.co\", \"day\": \"2025-0",
        "{\"code\": \"ABC-1234\", \"email\": \"a@b.co\", \"day\": \"2025-07-14\", \"rate\": 12",
    ];
    let formats = [
        ("json_object", ResponseFormat::JsonObject, &places[..]),
        (
            "json_schema",
            ResponseFormat::JsonSchema(Arc::new(Schema::compile(&schema)?)),
            &places[..],
        ),
        (
            "patterned",
            ResponseFormat::JsonSchema(Arc::new(Schema::compile(&patterned)?)),
            &patterned_places[..],
        ),
    ];
    for (label, format, places) in &formats {
        for &place in places.iter() {
            let Some(mut c) = JsonConstraint::for_format(format, || vocab.clone()) else {
                continue;
            };
            // Feed the place byte by byte through single-byte tokens.
            let mut fed = true;
            let mut accept_us = 0.0;
            for b in place.bytes() {
                let id = vocab.bytes.iter().position(|t| **t == [b]);
                match id {
                    Some(id) if c.allows(id as u32) => {
                        let t = Instant::now();
                        c.accept(id as u32);
                        accept_us += t.elapsed().as_secs_f64() * 1e6;
                    }
                    _ => fed = false,
                }
            }
            if !place.is_empty() {
                println!(
                    "{label:12} accepting a token: {:.1} µs (mean over {} tokens)",
                    accept_us / place.len() as f64,
                    place.len()
                );
            }
            if !fed {
                println!("{label:12} {place:?}: not reachable under this format");
                continue;
            }
            let mut times = Vec::with_capacity(reps);
            let mut allowed = 0;
            for _ in 0..reps {
                let t = Instant::now();
                allowed = (0..vocab.bytes.len() as u32)
                    .filter(|&id| c.allows(id))
                    .count();
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{label:12} {:>60}: {:8.0} µs per check, {allowed} tokens allowed",
                format!("{place:?}"),
                times[times.len() / 2]
            );
        }
    }
    Ok(())
}
