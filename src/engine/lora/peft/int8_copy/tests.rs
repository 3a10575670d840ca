//! The int8 copy written and read back: the same pairs, bit for bit, served from the file's
//! memory; and a damaged copy refused with the tensor named, never a panic.

use candle_core::{DType, Device};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::*;
use crate::bench::adapters::random_adapter;
use crate::engine::lora::int8::quantize_adapter;
use crate::engine::lora::peft::{parse_peft, save_peft, LoraLimits};

struct Fixture {
    base: ModelConfig,
    config: Vec<u8>,
    int8: LoraAdapter,
    file: Vec<u8>,
}

/// A random rank-8 adapter on every module of the tiny base, parsed as an upload is, its
/// int8 copy, and that copy's file.
fn fixture(seed: u64) -> Fixture {
    let base = ModelConfig::tiny_for_tests();
    let adapter = random_adapter(&base, 8, seed).expect("adapter");
    let dir = tempfile::tempdir().expect("tempdir");
    save_peft(&adapter, "tiny", dir.path()).expect("saved");
    let config = std::fs::read(dir.path().join("adapter_config.json")).expect("config");
    let upload = std::fs::read(dir.path().join("adapter_model.safetensors")).expect("weights");
    let parsed = parse_peft(
        &config,
        &upload,
        &base,
        &LoraLimits::default(),
        &Device::Cpu,
    )
    .expect("parses");
    let int8 = quantize_adapter(&parsed).expect("int8 copy");
    let file = int8_weights(&int8).expect("written");
    Fixture {
        base,
        config,
        int8,
        file,
    }
}

fn parse(f: &Fixture, bytes: Vec<u8>) -> Result<LoraAdapter, LoraError> {
    let file = Int8File::from_vec(bytes).expect("in memory");
    parse_int8_file(&f.config, &file, &f.base, &LoraLimits::default())
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

#[test]
fn an_int8_copy_reads_back_as_the_same_pairs_in_one_packed_buffer() {
    let f = fixture(3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serving-int8.safetensors");
    std::fs::write(&path, &f.file).unwrap();
    let file = Int8File::read(&path, 1 << 30).expect("read");
    assert_eq!(file.len(), f.file.len());
    assert_eq!(file.with_bytes(|b| b.to_vec()), f.file);
    let back = parse_int8_file(&f.config, &file, &f.base, &LoraLimits::default()).expect("parses");
    assert_eq!(back.layers.len(), f.int8.layers.len());
    assert_eq!(
        (back.rank, back.alpha, back.use_rslora),
        (f.int8.rank, f.int8.alpha, f.int8.use_rslora)
    );
    assert_eq!(back.target_modules, f.int8.target_modules);
    // Accounted as the whole file it keeps alive, scales included, like an f16 serving copy.
    let scales: usize = f
        .int8
        .layers
        .iter()
        .flat_map(|l| l.modules.iter().flatten())
        .map(|p| p.int8.as_ref().map_or(0, |s| 4 * (s.a.len() + s.b.len())))
        .sum();
    assert_eq!(back.size_bytes, f.file.len() + scales);
    assert!(back.size_bytes > f.int8.size_bytes);
    let mut pairs = 0;
    for (want, got) in f.int8.layers.iter().zip(&back.layers) {
        for module in Module::ALL {
            let (Some(w), Some(g)) = (want.get(module), got.get(module)) else {
                assert!(want.get(module).is_none() && got.get(module).is_none());
                continue;
            };
            assert_eq!(g.a.dtype(), DType::U8);
            assert_eq!((g.a.dims(), g.b.dims()), (w.a.dims(), w.b.dims()));
            assert_eq!((u8s(&g.a), u8s(&g.b)), (u8s(&w.a), u8s(&w.b)));
            let (ws, gs) = (w.int8.as_ref().unwrap(), g.int8.as_ref().unwrap());
            assert_eq!((&ws.a, &ws.b), (&gs.a, &gs.b));
            assert_eq!(g.scale, w.scale);
            pairs += 1;
        }
    }
    assert_eq!(pairs, f.int8.layers.len() * 7);
    // Views of the one read buffer: the delta pass gets its table.
    assert!(back.packed().is_some());
}

/// The copy's tensors, changed by `edit`, written again.
fn rewritten(
    f: &Fixture,
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) -> Vec<u8> {
    let st = SafeTensors::deserialize(&f.file).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort_by(|x, y| x.0.cmp(&y.0));
    edit(&mut tensors);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn refused(f: &Fixture, bytes: Vec<u8>) -> String {
    match parse(f, bytes) {
        Ok(_) => panic!("a damaged int8 copy parsed"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_damaged_int8_copy_is_refused_naming_what_is_wrong() {
    let f = fixture(4);
    let scales0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.scales";
    let a0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";

    let missing = rewritten(&f, |t| t.retain(|x| x.0 != scales0));
    let msg = refused(&f, missing);
    assert!(msg.contains(scales0) && msg.contains("missing"), "{msg}");

    let short = rewritten(&f, |t| {
        let s = t.iter_mut().find(|x| x.0 == scales0).unwrap();
        s.2 = vec![7];
        s.3.truncate(28);
    });
    let msg = refused(&f, short);
    assert!(msg.contains(scales0) && msg.contains("F32 [8]"), "{msg}");

    let not_finite = rewritten(&f, |t| {
        let s = t.iter_mut().find(|x| x.0 == scales0).unwrap();
        s.3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let msg = refused(&f, not_finite);
    assert!(msg.contains(scales0) && msg.contains("scale 0"), "{msg}");

    let wrong_dtype = rewritten(&f, |t| {
        let a = t.iter_mut().find(|x| x.0 == a0).unwrap();
        a.1 = Dtype::U8;
    });
    let msg = refused(&f, wrong_dtype);
    assert!(msg.contains(a0) && msg.contains("expected I8"), "{msg}");

    let stranger = rewritten(&f, |t| {
        let mut extra = t[0].clone();
        extra.0 = "base_model.model.model.layers.0.mlp.lm_head.lora_A.weight".into();
        t.push(extra);
    });
    assert!(refused(&f, stranger).contains("lm_head"));

    let mut truncated = f.file.clone();
    truncated.truncate(f.file.len() / 2);
    assert!(refused(&f, truncated).contains("not a valid safetensors file"));
    assert!(refused(&f, Vec::new()).contains("not a valid safetensors file"));
}

#[test]
fn only_int8_adapters_are_written_as_an_int8_copy() {
    let base = ModelConfig::tiny_for_tests();
    let adapter = random_adapter(&base, 4, 1).unwrap();
    let err = int8_weights(&adapter).expect_err("refused");
    assert!(err.to_string().contains("is not int8"), "{err}");
}
