//! The PEFT/safetensors parser on arbitrary bytes, on valid files with mutated bytes, on
//! safetensors headers that lie about sizes, offsets, dtypes and shapes, and on arbitrary
//! adapter_config.json values: always an error or an adapter, never a panic, and never an
//! allocation much larger than the input.

use adapterd::engine::lora::int8::quantize_adapter;
use adapterd::engine::lora::peft::{
    int8_weights, parse_int8_file, parse_peft, Int8File, LoraError, LoraLimits,
};
use adapterd::engine::lora::LoraAdapter;
use adapterd::engine::model::{Arch, ModelConfig};
use candle_core::Device;
use proptest::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use crate::alloc::largest_allocation;
use crate::corpus;
use crate::strategies::{json_value, nasty_number, nasty_string, nested_arrays};

/// No single allocation may exceed this while parsing inputs of at most a few hundred KB: a
/// header claiming a 2^40-element tensor must not be believed.
const MAX_ALLOCATION: usize = 16 << 20;

/// The tiny base of src/engine/lora/peft/tests.rs: hidden 64, 2 layers, 4 heads of 16, 2 kv
/// heads, intermediate 128.
pub fn base() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        vocab_size: 100,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
    }
}

pub fn valid_config() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "bias": "none", "use_dora": false, "fan_in_fan_out": false,
    }))
    .unwrap_or_default()
}

fn name(layer: usize, module: &str, side: &str) -> String {
    format!("base_model.model.model.layers.{layer}.self_attn.{module}.lora_{side}.weight")
}

/// q_proj (out 64) and v_proj (out 32) of rank 4 on both layers, as PEFT saves them.
pub fn valid_weights() -> Vec<u8> {
    let mut tensors: Vec<(String, Vec<usize>)> = Vec::new();
    for layer in 0..2 {
        for (module, out) in [("q_proj", 64), ("v_proj", 32)] {
            tensors.push((name(layer, module, "A"), vec![4, 64]));
            tensors.push((name(layer, module, "B"), vec![out, 4]));
        }
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, shape)| {
            let count: usize = shape.iter().product();
            let bytes = (0..count)
                .flat_map(|i| ((i % 13) as f32 / 64.0).to_le_bytes())
                .collect();
            (n, shape, bytes)
        })
        .collect();
    let views = data.iter().map(|(n, shape, bytes)| {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytes).expect("view");
        (n.clone(), view)
    });
    safetensors::serialize(views, None).expect("serialize")
}

/// Parses on this thread and checks the allocation bound.
fn parse(config: &[u8], weights: &[u8]) -> Result<LoraAdapter, LoraError> {
    let (result, largest) = largest_allocation(|| {
        parse_peft(
            config,
            weights,
            &base(),
            &LoraLimits::default(),
            &Device::Cpu,
        )
    });
    assert!(
        largest <= MAX_ALLOCATION.max(4 * (config.len() + weights.len())),
        "an allocation of {largest} bytes for {} input bytes",
        config.len() + weights.len()
    );
    result
}

/// The int8 copy a server with `adapters.precision = "int8"` would store for the valid fixture.
fn valid_int8_copy() -> Vec<u8> {
    parse(&valid_config(), &valid_weights())
        .ok()
        .and_then(|a| quantize_adapter(&a).ok())
        .and_then(|a| int8_weights(&a).ok())
        .unwrap_or_default()
}

/// Parses an int8 copy on this thread and checks the allocation bound. A cold load parses the
/// copy beside hashing it, so a damaged copy must be an error like any upload.
fn parse_int8(config: &[u8], bytes: Vec<u8>) -> Result<LoraAdapter, LoraError> {
    let n = config.len() + bytes.len();
    let (result, largest) = largest_allocation(|| {
        let file = Int8File::from_vec(bytes).map_err(|e| LoraError::Safetensors {
            message: e.to_string(),
        })?;
        parse_int8_file(config, &file, &base(), &LoraLimits::default())
    });
    assert!(
        largest <= MAX_ALLOCATION.max(4 * n),
        "an allocation of {largest} bytes for {n} input bytes"
    );
    result
}

#[test]
fn the_valid_int8_copy_parses() {
    let copy = valid_int8_copy();
    assert!(!copy.is_empty());
    let adapter = parse_int8(&valid_config(), copy).expect("parses");
    assert_eq!(adapter.layers.len(), 2);
}

#[test]
fn the_valid_fixture_parses() {
    let a = parse(&valid_config(), &valid_weights()).expect("valid adapter");
    assert_eq!(a.rank, 4);
}

#[test]
fn corpus_weights_files_are_refused_cleanly() {
    for (file, bytes) in corpus::files("peft_weights") {
        let err = parse(&valid_config(), &bytes)
            .err()
            .unwrap_or_else(|| panic!("{file}: accepted"));
        assert!(!err.to_string().is_empty(), "{file}");
    }
}

#[test]
fn corpus_config_files_are_refused_cleanly() {
    for (file, bytes) in corpus::files("peft_config") {
        let err = parse(&bytes, &valid_weights())
            .err()
            .unwrap_or_else(|| panic!("{file}: accepted"));
        assert!(!err.to_string().is_empty(), "{file}");
    }
}

#[test]
fn a_config_over_a_mebibyte_is_refused_before_it_is_parsed() {
    let mut cfg: Value = serde_json::from_slice(&valid_config()).expect("json");
    cfg["padding"] = Value::from("x".repeat(1 << 20));
    let err =
        parse(&serde_json::to_vec(&cfg).expect("json"), &valid_weights()).expect_err("refused");
    assert!(err.to_string().contains("over the limit"), "{err}");
}

#[test]
fn many_rank_pattern_keys_cost_linear_time() {
    // 20k distinct keys (under the 1 MiB config limit): the duplicate check used to compare
    // every key with every earlier one.
    let patterns: serde_json::Map<String, Value> = (0..20_000)
        .map(|i| (format!("model.layers.{i}.self_attn.q_proj"), Value::from(4)))
        .collect();
    let cfg = json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                     "rank_pattern": patterns});
    let started = std::time::Instant::now();
    let a = parse(&serde_json::to_vec(&cfg).expect("json"), &valid_weights()).expect("valid");
    assert_eq!(a.rank, 4);
    assert!(started.elapsed().as_secs() < 20, "{:?}", started.elapsed());
}

#[test]
fn deeply_nested_headers_and_configs_are_errors_not_stack_overflows() {
    let deep = nested_arrays(100_000, "");
    let err = parse(deep.as_bytes(), &valid_weights()).expect_err("refused");
    assert!(err.to_string().contains("adapter_config.json"), "{err}");
    let mut weights = (deep.len() as u64).to_le_bytes().to_vec();
    weights.extend_from_slice(deep.as_bytes());
    let err = parse(&valid_config(), &weights).expect_err("refused");
    assert!(err.to_string().contains("safetensors"), "{err}");
}

/// A safetensors file from parts: the 8-byte header length (true or a lie), the header JSON,
/// then the data.
fn assemble(header: &Value, length_lie: Option<u64>, data: &[u8]) -> Vec<u8> {
    let text = header.to_string();
    let len = length_lie.unwrap_or(text.len() as u64);
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    out
}

fn dims() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(
            &[
                0u64,
                1,
                4,
                32,
                64,
                65,
                1 << 31,
                1 << 32,
                1 << 40,
                1 << 62,
                u64::MAX
            ][..]
        ),
        any::<u64>(),
    ]
}

fn lying_tensor() -> impl Strategy<Value = (String, Value)> {
    let tensor_name = prop_oneof![
        (
            0usize..3,
            prop::sample::select(&["q_proj", "v_proj", "k_proj"][..]),
            prop::sample::select(&["A", "B"][..])
        )
            .prop_map(|(l, m, s)| name(l, m, s)),
        nasty_string(),
    ];
    let dtype = prop::sample::select(
        &[
            "F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "F128", "",
        ][..],
    );
    let shape = prop::collection::vec(dims(), 0..4);
    let offsets = (dims(), dims());
    (tensor_name, dtype, shape, offsets)
        .prop_map(|(n, d, s, (a, b))| (n, json!({"dtype": d, "shape": s, "data_offsets": [a, b]})))
}

/// A safetensors file with bytes overwritten at `edits` (with `in_header`, only in the 8-byte
/// length and the header, where lies matter most) and cut at `cut`.
fn mutated(
    mut w: Vec<u8>,
    edits: &[(prop::sample::Index, u8)],
    cut: Option<prop::sample::Index>,
    in_header: bool,
) -> Vec<u8> {
    let header_end = 8 + u64::from_le_bytes(w[..8].try_into().unwrap_or_default()) as usize;
    for (at, byte) in edits {
        let i = if in_header {
            at.index(header_end.min(w.len()))
        } else {
            at.index(w.len())
        };
        w[i] = *byte;
    }
    if let Some(c) = cut {
        w.truncate(c.index(w.len()));
    }
    w
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_refused(config in prop::collection::vec(any::<u8>(), 0..512),
                                   weights in prop::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(parse(&config, &weights).is_err());
        let _ = parse(&valid_config(), &weights);
        let _ = parse(&config, &valid_weights());
    }

    #[test]
    fn mutated_valid_files_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        cut in prop::option::of(any::<prop::sample::Index>()),
        in_header in any::<bool>(),
    ) {
        let w = mutated(valid_weights(), &edits, cut, in_header);
        let _ = parse(&valid_config(), &w);
    }

    #[test]
    fn arbitrary_and_mutated_int8_copies_never_panic(
        junk in prop::collection::vec(any::<u8>(), 0..2048),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        cut in prop::option::of(any::<prop::sample::Index>()),
        in_header in any::<bool>(),
    ) {
        prop_assert!(parse_int8(&valid_config(), junk).is_err());
        let w = mutated(valid_int8_copy(), &edits, cut, in_header);
        let _ = parse_int8(&valid_config(), w);
    }

    #[test]
    fn lying_headers_are_refused_without_believing_them(
        tensors in prop::collection::vec(lying_tensor(), 0..5),
        length_lie in prop::option::weighted(0.2, dims()),
        data_len in 0usize..600,
        metadata in prop::option::weighted(0.2, json_value()),
    ) {
        let mut header = serde_json::Map::new();
        for (n, t) in tensors {
            header.insert(n, t);
        }
        if let Some(m) = metadata {
            header.insert("__metadata__".into(), m);
        }
        let file = assemble(&Value::Object(header), length_lie, &vec![0u8; data_len]);
        // Whatever the verdict, it came without a panic or a huge allocation; a lie is never
        // accepted (an adapter needs all four q/v pairs of the right shape).
        prop_assert!(parse(&valid_config(), &file).is_err());
    }

    #[test]
    fn arbitrary_configs_never_panic(
        fields in prop::collection::vec((
            prop_oneof![
                4 => prop::sample::select(&["peft_type", "r", "lora_alpha", "target_modules",
                    "use_rslora", "fan_in_fan_out", "bias", "use_dora", "modules_to_save",
                    "rank_pattern", "alpha_pattern", "layer_replication", "lora_bias",
                    "layers_to_transform", "task_type"][..]).prop_map(str::to_owned),
                1 => nasty_string(),
            ],
            prop_oneof![
                nasty_number(),
                json_value(),
                prop::collection::vec(prop_oneof![
                    prop::sample::select(&["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj",
                        "up_proj", "down_proj", "all-linear", "layers.0.self_attn.q_proj",
                        "lm_head", "embed_tokens"][..]).prop_map(Value::from),
                    nasty_string().prop_map(Value::from)], 0..4).prop_map(Value::Array),
                prop::collection::vec((nasty_string(), nasty_number()), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ],
        ), 0..8),
    ) {
        let cfg = Value::Object(fields.into_iter().collect());
        let bytes = serde_json::to_vec(&cfg).unwrap_or_default();
        let _ = parse(&bytes, &valid_weights());
    }
}
