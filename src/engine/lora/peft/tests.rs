//! Tests for PEFT parsing and saving, on a tiny base (hidden 64, 2 layers, 4 heads of 16, 2 kv
//! heads, intermediate 128): round trips, scales, every refusal, and a fixture laid out exactly
//! as PEFT writes it (tests/fixtures/peft/make_tiny_qv_r8.py).

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use super::config::pattern_matches;
use super::weights::{base_dims, tensor_name, Side};
use super::*;
use crate::engine::lora::{LayerLora, LoraPair, Module};
use crate::engine::model::config::ModelConfig;

fn base() -> ModelConfig {
    ModelConfig::tiny_for_tests()
}

/// A PEFT config for r 8, alpha 16 on q_proj and v_proj, with `patch`'s fields overriding.
fn config(patch: Value) -> Vec<u8> {
    let mut c = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
        "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        "fan_in_fan_out": false, "use_rslora": false, "use_dora": false,
        "layers_to_transform": null, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": null, "base_model_name_or_path": "tiny",
    });
    if let (Some(c), Value::Object(p)) = (c.as_object_mut(), patch) {
        c.extend(p);
    }
    serde_json::to_vec(&c).expect("config json")
}

/// Deterministic non-zero values, distinct per tensor.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7 + seed * 13) % 29) as f32 - 14.0) / 32.0)
        .collect()
}

struct Raw {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn raw_f32(name: &str, shape: &[usize], seed: usize) -> Raw {
    let n = shape.iter().product();
    Raw {
        name: name.to_owned(),
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        bytes: values(n, seed)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    }
}

/// A and B of rank `r` for `module` on `layer`, shaped for the tiny base.
fn pair(layer: usize, module: Module, r: usize) -> [Raw; 2] {
    let (fan_in, fan_out) = base_dims(&base(), module);
    let seed = layer * 7 + module.index();
    [
        raw_f32(&tensor_name(layer, module, Side::A), &[r, fan_in], seed),
        raw_f32(
            &tensor_name(layer, module, Side::B),
            &[fan_out, r],
            seed + 100,
        ),
    ]
}

fn file(tensors: &[Raw]) -> Vec<u8> {
    let views = tensors.iter().map(|t| {
        let v = TensorView::new(t.dtype, t.shape.clone(), &t.bytes).expect("view");
        (t.name.clone(), v)
    });
    safetensors::serialize(views, None).expect("serialize")
}

/// q_proj and v_proj of rank 8 on both layers: what `config(json!({}))` describes.
fn qv_file() -> Vec<u8> {
    let mut t = Vec::new();
    for layer in 0..2 {
        t.extend(pair(layer, Module::Q, 8));
        t.extend(pair(layer, Module::V, 8));
    }
    file(&t)
}

/// [`parse_peft`], checked against [`parse_peft_file`] on the same bytes: every test of a
/// parse or a refusal also holds for the in-place path a cold load takes.
fn parse(cfg: &[u8], weights: &[u8]) -> Result<LoraAdapter, LoraError> {
    let copied = parse_peft(cfg, weights, &base(), &LoraLimits::default(), &Device::Cpu);
    let file = WeightsFile::from_bytes(weights).expect("in memory");
    let shared = parse_peft_file(cfg, &file, &base(), &LoraLimits::default(), &Device::Cpu);
    match (&copied, &shared) {
        (Ok(a), Ok(b)) => {
            assert_same(a, b);
            for (la, lb) in a.layers.iter().zip(&b.layers) {
                for (x, y) in la.modules.iter().zip(&lb.modules) {
                    if let (Some(x), Some(y)) = (x, y) {
                        assert_eq!((x.a.dtype(), x.b.dtype()), (y.a.dtype(), y.b.dtype()));
                    }
                }
            }
        }
        // The same kind of refusal (the safetensors crate's own checks name whichever bad
        // tensor its hash map yields first, so the names may differ between two calls).
        (Err(a), Err(b)) => assert_eq!(
            std::mem::discriminant(a),
            std::mem::discriminant(b),
            "{a} / {b}"
        ),
        _ => panic!(
            "parse_peft and parse_peft_file disagree: {:?} / {:?}",
            copied.as_ref().err(),
            shared.as_ref().err()
        ),
    }
    copied
}

/// Asserts a refusal whose message contains every one of `parts`.
fn refused(result: Result<LoraAdapter, LoraError>, parts: &[&str]) -> LoraError {
    let err = match result {
        Ok(_) => panic!("accepted, expected a refusal mentioning {parts:?}"),
        Err(e) => e,
    };
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "`{msg}` does not mention `{p}`");
    }
    err
}

/// The values as f32, whatever the serving dtype (f16 on the CPU).
fn vec2(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)
        .and_then(|t| t.to_vec2::<f32>())
        .expect("2-d")
}

#[test]
fn fixture_written_like_peft_parses() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/peft/tiny_qv_r8"
    );
    let cfg = std::fs::read(format!("{dir}/adapter_config.json")).expect("fixture config");
    let weights = std::fs::read(format!("{dir}/adapter_model.safetensors")).expect("fixture");
    let a = parse(&cfg, &weights).expect("PEFT fixture parses");
    assert_eq!((a.rank, a.alpha, a.use_rslora), (8, 16.0, false));
    assert_eq!(a.target_modules, ["q_proj", "v_proj"]);
    assert_eq!(a.layers.len(), 2);
    // Held as f16 on the CPU: two bytes per value.
    assert_eq!(a.size_bytes, 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8) * 2);
    for (l, layer) in a.layers.iter().enumerate() {
        for m in Module::ALL {
            let Some(p) = layer.get(m) else {
                assert!(!matches!(m, Module::Q | Module::V));
                continue;
            };
            assert_eq!(p.scale, 2.0, "alpha 16 / r 8");
            let (mi, lf) = (m.index() as f32, l as f32);
            // The generator's formulas (make_tiny_qv_r8.py), at a few elements.
            for (j, k) in [(0usize, 0usize), (3, 17), (7, 63)] {
                let (jf, kf) = (j as f32, k as f32);
                let want = ((7.0 * jf + 3.0 * kf + 5.0 * lf + mi) % 19.0 - 9.0) / 64.0;
                assert_eq!(vec2(&p.a)[j][k], want);
            }
            for (j, k) in [(0usize, 0usize), (5, 3), (31, 7)] {
                let (jf, kf) = (j as f32, k as f32);
                let want = ((5.0 * jf + 11.0 * kf + 3.0 * lf + mi) % 23.0 - 11.0) / 128.0;
                assert_eq!(vec2(&p.b)[j][k], want);
            }
        }
    }
}

/// An adapter as training would produce it: ranks and scales per module as given.
fn adapter(mods: &[(usize, Module, usize, f64)], rank: usize, alpha: f64, rs: bool) -> LoraAdapter {
    let mut layers = vec![LayerLora::default(); 2];
    let mut names = Vec::new();
    for &(l, m, r, scale) in mods {
        let (fan_in, fan_out) = base_dims(&base(), m);
        let seed = l * 7 + m.index();
        let a = Tensor::from_vec(values(r * fan_in, seed), (r, fan_in), &Device::Cpu);
        let b = Tensor::from_vec(values(fan_out * r, seed + 1), (fan_out, r), &Device::Cpu);
        let (a, b) = (a.expect("a"), b.expect("b"));
        layers[l].modules[m.index()] = Some(LoraPair {
            a,
            b,
            scale,
            int8: None,
        });
        names.push(m.hf_name().to_owned());
    }
    names.sort();
    names.dedup();
    LoraAdapter {
        layers,
        rank,
        alpha,
        use_rslora: rs,
        target_modules: names,
        size_bytes: 0,
        packed: Default::default(),
    }
}

fn assert_same(a: &LoraAdapter, b: &LoraAdapter) {
    assert_eq!(a.layers.len(), b.layers.len());
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        for m in Module::ALL {
            match (la.get(m), lb.get(m)) {
                (None, None) => {}
                (Some(x), Some(y)) => {
                    assert_eq!(vec2(&x.a), vec2(&y.a));
                    assert_eq!(vec2(&x.b), vec2(&y.b));
                    assert!(
                        (x.scale - y.scale).abs() < 1e-12,
                        "{} vs {}",
                        x.scale,
                        y.scale
                    );
                }
                _ => panic!("{} present on one side only", m.hf_name()),
            }
        }
    }
}

fn save_and_read(a: &LoraAdapter) -> (Value, Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("v1");
    save_peft(a, "tiny-base", &out).expect("save");
    let cfg = std::fs::read(out.join("adapter_config.json")).expect("config written");
    let weights = std::fs::read(out.join("adapter_model.safetensors")).expect("weights written");
    let json: Value = serde_json::from_slice(&cfg).expect("json");
    (json, cfg, weights)
}

#[test]
fn round_trip_all_modules() {
    let mut mods: Vec<_> = Module::ALL.iter().map(|&m| (0, m, 8, 2.0)).collect();
    mods.push((1, Module::Q, 8, 2.0));
    let a = adapter(&mods, 8, 16.0, false);
    let (json, cfg, weights) = save_and_read(&a);
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 8);
    assert_eq!(json["lora_alpha"], 16);
    assert_eq!(json["bias"], "none");
    assert_eq!(json["base_model_name_or_path"], "tiny-base");
    assert_eq!(json["rank_pattern"], json!({}));
    assert_eq!(json["alpha_pattern"], json!({}));
    assert_eq!(json["layers_to_transform"], Value::Null);
    let st = safetensors::SafeTensors::deserialize(&weights).expect("valid safetensors");
    assert!(st
        .tensor("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")
        .is_ok());
    let back = parse(&cfg, &weights).expect("our own output parses");
    assert_same(&a, &back);
    assert_eq!(back.target_modules.len(), 7);
    assert_eq!(
        back.size_bytes,
        2 * st
            .tensors()
            .iter()
            .map(|(_, v)| v.shape().iter().product::<usize>())
            .sum::<usize>()
    );
}

#[test]
fn round_trip_partial_layers_and_mixed_ranks() {
    // Layer 1 only; q at rank 4 with its own alpha, v at the default rank; rsLoRA.
    let q_scale = 24.0 / 2.0; // alpha 24 / sqrt(4)
    let v_scale = 16.0 / 8f64.sqrt();
    let a = adapter(
        &[(1, Module::Q, 4, q_scale), (1, Module::V, 8, v_scale)],
        8,
        16.0,
        true,
    );
    let (json, cfg, weights) = save_and_read(&a);
    assert_eq!(json["layers_to_transform"], json!([1]));
    assert_eq!(
        json["rank_pattern"],
        json!({"layers.1.self_attn.q_proj": 4})
    );
    assert_eq!(
        json["alpha_pattern"],
        json!({"layers.1.self_attn.q_proj": 24})
    );
    assert_eq!(json["use_rslora"], true);
    let back = parse(&cfg, &weights).expect("parses");
    assert_same(&a, &back);
    assert!(back.layers[0].modules.iter().all(Option::is_none));
}

#[test]
fn adapter_touching_some_layers_and_modules() {
    let mut t = Vec::new();
    t.extend(pair(1, Module::V, 8));
    let a = parse(&config(json!({})), &file(&t)).expect("parses");
    assert!(a.layers[0].modules.iter().all(Option::is_none));
    assert!(a.layers[1].get(Module::V).is_some());
    assert!(a.layers[1].get(Module::Q).is_none());
}

#[test]
fn rslora_scale() {
    let cfg = config(json!({"r": 16, "lora_alpha": 16, "use_rslora": true}));
    let mut t = Vec::new();
    t.extend(pair(0, Module::Q, 16));
    let a = parse(&cfg, &file(&t)).expect("parses");
    assert_eq!(a.layers[0].get(Module::Q).map(|p| p.scale), Some(4.0)); // 16 / sqrt(16)
}

#[test]
fn rank_and_alpha_patterns() {
    let cfg = config(json!({
        "rank_pattern": {"q_proj": 4, "model.layers.1.self_attn.v_proj": 2},
        "alpha_pattern": {"v_proj": 32},
    }));
    let mut t = Vec::new();
    for l in 0..2 {
        t.extend(pair(l, Module::Q, 4));
    }
    t.extend(pair(0, Module::V, 8));
    t.extend(pair(1, Module::V, 2));
    let a = parse(&cfg, &file(&t)).expect("parses");
    let s = |l: usize, m| a.layers[l].get(m).map(|p| p.scale);
    assert_eq!(s(0, Module::Q), Some(4.0)); // 16 / 4
    assert_eq!(s(1, Module::Q), Some(4.0));
    assert_eq!(s(0, Module::V), Some(4.0)); // 32 / 8
    assert_eq!(s(1, Module::V), Some(16.0)); // 32 / 2
    assert_eq!(a.rank, 8);

    // Wrong rank for a patterned module: the message says where the rank came from.
    let mut t = Vec::new();
    t.extend(pair(0, Module::Q, 8));
    let err = refused(
        parse(&cfg, &file(&t)),
        &["[4, 64]", "[8, 64]", "rank_pattern.q_proj"],
    );
    assert_eq!(
        err.field(),
        Some(tensor_name(0, Module::Q, Side::A).as_str())
    );
}

#[test]
fn first_pattern_key_in_file_order_wins() {
    let mut t = Vec::new();
    t.extend(pair(0, Module::Q, 2));
    t.extend(pair(1, Module::Q, 4));
    let specific_first = br#"{"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"],
        "rank_pattern": {"model.layers.0.self_attn.q_proj": 2, "q_proj": 4}}"#;
    let a = parse(specific_first, &file(&t)).expect("parses");
    assert_eq!(a.layers[0].get(Module::Q).map(|p| p.scale), Some(4.0));
    assert_eq!(a.layers[1].get(Module::Q).map(|p| p.scale), Some(2.0));
    // PEFT takes the first key that matches, so a general key first shadows the specific one.
    let general_first = br#"{"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"],
        "rank_pattern": {"q_proj": 4, "model.layers.0.self_attn.q_proj": 2}}"#;
    refused(parse(general_first, &file(&t)), &["[4, 64]", "[2, 64]"]);
}

#[test]
fn pattern_matching_is_peft_suffix_matching() {
    let p = "model.layers.11.self_attn.q_proj";
    assert!(pattern_matches("q_proj", p));
    assert!(pattern_matches("self_attn.q_proj", p));
    assert!(pattern_matches(p, p));
    assert!(pattern_matches("layers.11.self_attn.q_proj", p));
    assert!(!pattern_matches("layers.1.self_attn.q_proj", p));
    assert!(!pattern_matches("1.self_attn.q_proj", p));
    assert!(!pattern_matches("proj", p));
    assert!(!pattern_matches("k_proj", p));
    // `.` is a regex wildcard to PEFT.
    assert!(pattern_matches("layers.11.self_attn.q.proj", p));
}

#[test]
fn target_modules_forms() {
    let mut t = Vec::new();
    t.extend(pair(0, Module::Q, 8));
    let w = file(&t);
    let a = parse(&config(json!({"target_modules": "q_proj"})), &w).expect("one name");
    assert_eq!(a.target_modules, ["q_proj"]);
    let a = parse(&config(json!({"target_modules": "all-linear"})), &w).expect("all-linear");
    assert_eq!(a.target_modules.len(), 7);
    let cfg = config(json!({"target_modules": ["layers.0.self_attn.q_proj"]}));
    parse(&cfg, &w).expect("a path suffix");
    // Absent: PEFT's llama default, q_proj and v_proj.
    let a = parse(br#"{"r": 8, "lora_alpha": 16}"#, &w).expect("default targets");
    assert_eq!(a.target_modules, ["q_proj", "v_proj"]);
    // `.default.` keys, as PEFT writes in some versions, and a lower-case peft_type.
    let mut t = pair(0, Module::Q, 8);
    for r in &mut t {
        r.name = r.name.replace(".weight", ".default.weight");
    }
    parse(&config(json!({"peft_type": "lora"})), &file(&t)).expect(".default. names");
}

#[test]
fn f16_and_bf16_are_converted() {
    let (fan_in, fan_out) = base_dims(&base(), Module::Q);
    let a: Vec<u8> = (0..8 * fan_in)
        .flat_map(|i| half::f16::from_f32(i as f32 / 256.0).to_le_bytes())
        .collect();
    let b: Vec<u8> = (0..fan_out * 8)
        .flat_map(|i| half::bf16::from_f32(-(i as f32) / 64.0).to_le_bytes())
        .collect();
    let t = [
        Raw {
            name: tensor_name(0, Module::Q, Side::A),
            dtype: Dtype::F16,
            shape: vec![8, fan_in],
            bytes: a,
        },
        Raw {
            name: tensor_name(0, Module::Q, Side::B),
            dtype: Dtype::BF16,
            shape: vec![fan_out, 8],
            bytes: b,
        },
    ];
    let ad = parse(&config(json!({})), &file(&t)).expect("parses");
    let p = ad.layers[0].get(Module::Q).expect("q");
    assert_eq!(vec2(&p.a)[1][3], 67.0 / 256.0);
    assert_eq!(vec2(&p.b)[2][1], -17.0 / 64.0);
}

// ---- refusals: one per rule, each naming the field or tensor ----

#[test]
fn refuses_unknown_tensors() {
    let cases = [
        (
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "embedding",
        ),
        ("base_model.model.lm_head.lora_A.weight", "lm_head"),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "DoRA",
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
            "bias",
        ),
        (
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "not a LoRA tensor",
        ),
        (
            "base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight",
            "not a LoRA tensor",
        ),
        (
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            "not a LoRA tensor",
        ),
    ];
    for (name, why) in cases {
        let mut t: Vec<Raw> = pair(0, Module::Q, 8).into();
        t.push(raw_f32(name, &[4], 1));
        let err = refused(parse(&config(json!({})), &file(&t)), &[name, why]);
        assert_eq!(err.field(), Some(name));
    }
}

#[test]
fn refuses_missing_b() {
    let [a, _] = pair(0, Module::Q, 8);
    let b_name = tensor_name(0, Module::Q, Side::B);
    let err = refused(
        parse(&config(json!({})), &file(&[a])),
        &[b_name.as_str(), "missing"],
    );
    assert_eq!(err.field(), Some(b_name.as_str()));
}

#[test]
fn refuses_shape_mismatch() {
    let mut t: Vec<Raw> = pair(0, Module::Q, 8).into();
    t[1] = raw_f32(&tensor_name(0, Module::Q, Side::B), &[32, 8], 3); // k-sized, not q-sized
    let name = tensor_name(0, Module::Q, Side::B);
    refused(
        parse(&config(json!({})), &file(&t)),
        &[name.as_str(), "expected [64, 8]", "[32, 8]"],
    );
}

#[test]
fn refuses_rank_over_limit() {
    let err = refused(
        parse(&config(json!({"r": 128})), &qv_file()),
        &["`r`", "128", "64"],
    );
    assert_eq!(err.field(), Some("r"));
    let cfg = config(json!({"rank_pattern": {"q_proj": 65}}));
    let err = refused(parse(&cfg, &qv_file()), &["rank_pattern.q_proj", "65"]);
    assert_eq!(err.field(), Some("rank_pattern.q_proj"));
    refused(
        parse(&config(json!({"r": 0})), &qv_file()),
        &["`r`", "positive"],
    );
}

#[test]
fn a_pair_beyond_f16_range_is_served_in_f32_and_the_rest_in_f16() {
    let mut t: Vec<Raw> = pair(0, Module::V, 8).into();
    t.extend(pair(1, Module::V, 8));
    // 1e5 does not fit f16 (max 65504); 0.1 does not fit it exactly.
    t[1].bytes[0..4].copy_from_slice(&1e5f32.to_le_bytes());
    t[2].bytes[0..4].copy_from_slice(&0.1f32.to_le_bytes());
    let ad = parse(&config(json!({})), &file(&t)).expect("parses");
    let wide = ad.layers[0].get(Module::V).expect("layer 0");
    assert_eq!((wide.a.dtype(), wide.b.dtype()), (DType::F32, DType::F32));
    assert_eq!(vec2(&wide.b)[0][0], 1e5);
    let narrow = ad.layers[1].get(Module::V).expect("layer 1");
    assert_eq!(
        (narrow.a.dtype(), narrow.b.dtype()),
        (DType::F16, DType::F16)
    );
    assert_eq!(vec2(&narrow.a)[0][0], half::f16::from_f32(0.1).to_f32());
    let seed = 7 + Module::V.index();
    assert_eq!(
        vec2(&narrow.a)[0][1],
        values(2, seed)[1],
        "exact in f16 stays exact"
    );
    let elems = 8 * 64 + 32 * 8; // per pair
    assert_eq!(ad.size_bytes, elems * 4 + elems * 2);
}

#[test]
fn the_serving_copy_parses_to_the_same_tensors_bit_for_bit_and_half_the_bytes() {
    let mut t: Vec<Raw> = pair(0, Module::V, 8).into();
    t.extend(pair(1, Module::V, 8));
    t.extend(pair(1, Module::Q, 8));
    // Layer 0's pair stays f32 (1e5 is beyond f16); 0.1 is rounded when narrowed.
    t[1].bytes[0..4].copy_from_slice(&1e5f32.to_le_bytes());
    t[2].bytes[0..4].copy_from_slice(&0.1f32.to_le_bytes());
    let cfg = config(json!({}));
    let upload = file(&t);
    let from_upload = parse(&cfg, &upload).expect("parses");
    let serving = serving_weights(&from_upload).expect("serializes");
    let from_copy = parse(&cfg, &serving).expect("the copy parses");
    for (l, (x, y)) in from_upload.layers.iter().zip(&from_copy.layers).enumerate() {
        for m in Module::ALL {
            match (x.get(m), y.get(m)) {
                (None, None) => {}
                (Some(p), Some(q)) => {
                    assert_eq!(p.scale, q.scale);
                    for (u, v) in [(&p.a, &q.a), (&p.b, &q.b)] {
                        assert_eq!(u.dtype(), v.dtype(), "layer {l} {m:?}");
                        assert_eq!(u.dims(), v.dims());
                        let bits = |t: &Tensor| {
                            t.flatten_all()
                                .and_then(|t| t.to_dtype(DType::F64))
                                .and_then(|t| t.to_vec1::<f64>())
                                .expect("readable")
                        };
                        assert_eq!(bits(u), bits(v), "layer {l} {m:?}");
                    }
                }
                _ => panic!("layer {l} {m:?} present in only one of them"),
            }
        }
    }
    assert_eq!(from_copy.size_bytes, from_upload.size_bytes);
    // Two pairs of three are f16: the copy is well under the f32 upload.
    assert!(
        serving.len() < upload.len() * 3 / 4,
        "{} vs {}",
        serving.len(),
        upload.len()
    );
}

#[test]
fn an_all_f16_file_is_served_from_its_own_memory_and_others_are_copied() {
    let mut t: Vec<Raw> = pair(0, Module::V, 8).into();
    t.extend(pair(1, Module::Q, 8));
    let cfg = config(json!({}));
    let upload = file(&t);
    let copied = parse(&cfg, &upload).expect("parses");
    let limits = LoraLimits::default();
    // The f32 upload through the file path: converted copies, as parse_peft makes.
    let f32_file = WeightsFile::from_bytes(&upload).expect("in memory");
    let from_f32 = parse_peft_file(&cfg, &f32_file, &base(), &limits, &Device::Cpu).unwrap();
    assert_eq!(from_f32.size_bytes, copied.size_bytes);
    // The all-f16 serving copy: views of the file, so the adapter holds the file's bytes.
    let serving = serving_weights(&copied).expect("serializes");
    let f16_file = WeightsFile::from_bytes(&serving).expect("in memory");
    let shared = parse_peft_file(&cfg, &f16_file, &base(), &limits, &Device::Cpu).unwrap();
    assert_eq!(shared.size_bytes, serving.len());
    assert_same(&copied, &shared);
    let mut offsets = Vec::new();
    for pair in shared
        .layers
        .iter()
        .flat_map(|l| l.modules.iter().flatten())
    {
        for t in [&pair.a, &pair.b] {
            assert_eq!(t.dtype(), DType::F16);
            let (_, layout) = t.storage_and_layout();
            let (start, end) = layout.contiguous_offsets().expect("contiguous");
            assert!(end * 2 <= serving.len(), "inside the file");
            offsets.push(start);
        }
    }
    // Past the header, and each tensor at its own place.
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(offsets.len(), 4);
    assert!(offsets[0] > 0);
}

#[test]
fn refuses_non_finite_values() {
    let mut t: Vec<Raw> = pair(0, Module::V, 8).into();
    t[0].bytes[20..24].copy_from_slice(&f32::NAN.to_le_bytes());
    let name = tensor_name(0, Module::V, Side::A);
    refused(
        parse(&config(json!({})), &file(&t)),
        &[name.as_str(), "element 5", "NaN", "finite"],
    );
    t[0].bytes[20..24].copy_from_slice(&f32::INFINITY.to_le_bytes());
    refused(
        parse(&config(json!({})), &file(&t)),
        &[name.as_str(), "inf"],
    );
    // f16 files take a faster check; the answer is the same wherever the value is.
    let (fan_in, _) = base_dims(&base(), Module::V);
    for (at, bits) in [(3usize, 0x7e00u16), (510, 0xfc00)] {
        let mut a = vec![half::f16::from_f32(0.25); 8 * fan_in];
        a[at] = half::f16::from_bits(bits);
        t[0] = Raw {
            name: name.clone(),
            dtype: Dtype::F16,
            shape: vec![8, fan_in],
            bytes: a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        refused(
            parse(&config(json!({})), &file(&t)),
            &[name.as_str(), &format!("element {at} ")],
        );
    }
}

#[test]
fn refuses_unsupported_config_features() {
    let cases = [
        (json!({"use_dora": true}), "use_dora", "DoRA"),
        (json!({"bias": "all"}), "bias", "bias training"),
        (json!({"bias": "lora_only"}), "bias", "bias training"),
        (json!({"lora_bias": true}), "lora_bias", "bias training"),
        (
            json!({"fan_in_fan_out": true}),
            "fan_in_fan_out",
            "not supported",
        ),
        (
            json!({"modules_to_save": ["lm_head"]}),
            "modules_to_save",
            "lm_head",
        ),
        (json!({"peft_type": "IA3"}), "peft_type", "IA3"),
        (
            json!({"layer_replication": [[0, 2]]}),
            "layer_replication",
            "not supported",
        ),
        (
            json!({"target_modules": ".*proj"}),
            "target_modules",
            "regular expression",
        ),
        (
            json!({"target_modules": ["q_proj", "lm_head"]}),
            "target_modules",
            "lm_head",
        ),
        (json!({"target_modules": []}), "target_modules", "empty"),
        (
            json!({"rank_pattern": {"q_.*": 4}}),
            "rank_pattern.q_.*",
            "regular-expression",
        ),
        (
            json!({"lora_alpha": "sixteen"}),
            "lora_alpha",
            "invalid type",
        ),
        (json!({"r": -1}), "r", "invalid value"),
    ];
    for (patch, field, why) in cases {
        let err = refused(parse(&config(patch.clone()), &qv_file()), &[field, why]);
        assert_eq!(err.field(), Some(field), "{patch}");
    }
    // modules_to_save empty or null is fine.
    parse(&config(json!({"modules_to_save": []})), &qv_file()).expect("empty list");
    refused(parse(b"{\"r\": 8", &qv_file()), &["adapter_config.json"]);
    refused(parse(b"[1, 2]", &qv_file()), &["adapter_config.json"]);
}

#[test]
fn refuses_non_target_module() {
    let t: Vec<Raw> = pair(0, Module::K, 8).into();
    let name = tensor_name(0, Module::K, Side::A);
    refused(
        parse(&config(json!({})), &file(&t)),
        &[name.as_str(), "k_proj", "target_modules"],
    );
    // A path-suffix target covers only that layer.
    let cfg = config(json!({"target_modules": ["layers.0.self_attn.q_proj"]}));
    let t: Vec<Raw> = pair(1, Module::Q, 8).into();
    refused(
        parse(&cfg, &file(&t)),
        &["layers.1.self_attn.q_proj", "target_modules"],
    );
}

#[test]
fn refuses_layer_out_of_range() {
    let t: Vec<Raw> = pair(2, Module::Q, 8).into();
    let name = tensor_name(2, Module::Q, Side::A);
    refused(
        parse(&config(json!({})), &file(&t)),
        &[name.as_str(), "layer 2", "2 layers"],
    );
}

#[test]
fn refuses_duplicate_default_names() {
    let mut t: Vec<Raw> = pair(0, Module::Q, 8).into();
    let mut dup = raw_f32(&tensor_name(0, Module::Q, Side::A), &[8, 64], 9);
    dup.name = dup.name.replace(".weight", ".default.weight");
    t.push(dup);
    refused(parse(&config(json!({})), &file(&t)), &["duplicates"]);
}

#[test]
fn refuses_other_dtypes() {
    let mut t: Vec<Raw> = pair(0, Module::Q, 8).into();
    t[0].dtype = Dtype::I32;
    refused(
        parse(&config(json!({})), &file(&t)),
        &[t[0].name.clone().as_str(), "I32"],
    );
}

#[test]
fn refuses_malformed_safetensors() {
    let cfg = config(json!({}));
    let good = qv_file();
    refused(
        parse(&cfg, &good[..good.len() - 3]),
        &["adapter_model.safetensors", "valid"],
    );
    refused(parse(&cfg, &good[..5]), &["adapter_model.safetensors"]);
    refused(parse(&cfg, b""), &["adapter_model.safetensors"]);
    refused(
        parse(&cfg, b"PK\x03\x04 this is a zip or a pickle"),
        &["adapter_model.safetensors"],
    );
    let mut huge_header = (u64::MAX - 4).to_le_bytes().to_vec();
    huge_header.extend(b"{}");
    refused(parse(&cfg, &huge_header), &["adapter_model.safetensors"]);
    refused(parse(&cfg, &file(&[])), &["no tensors"]);
}

/// A hand-made file whose header describes `entries` (name, shape, offsets) over `data_len` bytes.
fn lying_file(entries: &[(&str, [usize; 2], [usize; 2])], data_len: usize) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    for (name, shape, offsets) in entries {
        header.insert(
            (*name).to_owned(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": offsets}),
        );
    }
    let h = serde_json::to_vec(&header).expect("header");
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(vec![0u8; data_len]);
    out
}

#[test]
fn refuses_header_lying_about_offsets() {
    let cfg = config(json!({}));
    let a = tensor_name(0, Module::Q, Side::A);
    let b = tensor_name(0, Module::Q, Side::B);
    // Offsets past the end of the data.
    let f = lying_file(
        &[(&a, [8, 64], [0, 2048]), (&b, [64, 8], [2048, 4096])],
        2048,
    );
    refused(parse(&cfg, &f), &["adapter_model.safetensors"]);
    // Overlapping tensors.
    let f = lying_file(&[(&a, [8, 64], [0, 2048]), (&b, [64, 8], [0, 2048])], 2048);
    refused(parse(&cfg, &f), &["adapter_model.safetensors"]);
    // A range that disagrees with the shape.
    let f = lying_file(
        &[(&a, [8, 64], [0, 1024]), (&b, [64, 8], [1024, 3072])],
        3072,
    );
    refused(parse(&cfg, &f), &["adapter_model.safetensors"]);
    // The honest version of the same file parses (so the refusals above are about the lies).
    let f = lying_file(
        &[(&a, [8, 64], [0, 2048]), (&b, [64, 8], [2048, 4096])],
        4096,
    );
    parse(&cfg, &f).expect("honest header");
}

#[test]
fn refuses_over_size_limit() {
    let limits = LoraLimits {
        max_rank: 64,
        max_bytes: 10_000,
    };
    let err = parse_peft(
        &config(json!({})),
        &qv_file(),
        &base(),
        &limits,
        &Device::Cpu,
    );
    let err = refused(err, &["the file", "over the limit of 10000 bytes"]);
    assert_eq!(err.field(), Some("adapter_model.safetensors"));
    // An f16 file under the limit whose f32 tensors are over it.
    let mut t = Vec::new();
    for l in 0..2 {
        for m in [Module::Q, Module::V] {
            for mut r in pair(l, m, 8) {
                r.dtype = Dtype::F16;
                r.bytes.truncate(r.bytes.len() / 2);
                t.push(r);
            }
        }
    }
    let f = file(&t);
    assert!(f.len() < 10_000);
    let err = parse_peft(&config(json!({})), &f, &base(), &limits, &Device::Cpu);
    refused(err, &["f32 in memory", "14336 bytes"]);
}
