//! The packed table against the tensors it describes: the same deltas bit for bit for f16
//! serving copies and int8 copies, and no table where the pairs do not share one buffer.

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::bench::adapters::random_adapter;
use crate::engine::lora::apply::{add_deltas_cpu, add_pairs_cpu};
use crate::engine::lora::int8::{quantize_adapter, quantize_pair};
use crate::engine::lora::peft::{parse_peft, parse_peft_file, save_peft, serving_weights};
use crate::engine::lora::peft::{LoraLimits, WeightsFile};
use crate::engine::model::config::ModelConfig;

/// A random rank-8 adapter on every module of the tiny base, as a cold load serves it: parsed
/// from its f16 serving copy, so every pair is a view of the file's one buffer.
fn served(seed: u64) -> LoraAdapter {
    let cfg = ModelConfig::tiny_for_tests();
    let adapter = random_adapter(&cfg, 8, seed).expect("adapter");
    let dir = tempfile::tempdir().expect("tempdir");
    save_peft(&adapter, "tiny", dir.path()).expect("saved");
    let config = std::fs::read(dir.path().join("adapter_config.json")).expect("config");
    let upload = std::fs::read(dir.path().join("adapter_model.safetensors")).expect("weights");
    let limits = LoraLimits::default();
    // Parsed as an upload is (to f16), then written and read back as the serving copy.
    let parsed = parse_peft(&config, &upload, &cfg, &limits, &Device::Cpu).expect("parses");
    let serving = serving_weights(&parsed).expect("serving copy");
    let file = WeightsFile::from_bytes(&serving).expect("in memory");
    parse_peft_file(&config, &file, &cfg, &limits, &Device::Cpu).expect("parses")
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 + seed * 11) % 101) as f32 / 50.0 - 1.0)
        .collect()
}

/// Every projection of every layer, three rows with the adapter on rows 0 and 2: the packed
/// pair and the tensors give the same outputs, bit for bit.
fn assert_same_deltas(adapter: &LoraAdapter) {
    let packed = adapter.packed().expect("a table");
    let view = packed.lock();
    let rows: &[u32] = &[0, 2];
    let mut checked = 0;
    for (layer, lora) in adapter.layers.iter().enumerate() {
        for module in Module::ALL {
            let Some(pair) = lora.get(module) else {
                assert!(view.pair(layer, module).is_none());
                continue;
            };
            let cpu = view.pair(layer, module).expect("in the table");
            let (out, inp) = (pair.b.dims()[0], pair.a.dims()[1]);
            let xs = Tensor::from_vec(values(3 * inp, layer), (3, inp), &Device::Cpu).unwrap();
            let base = Tensor::from_vec(values(3 * out, 7), (3, out), &Device::Cpu).unwrap();
            let (want, got) = (base.copy().unwrap(), base.copy().unwrap());
            assert!(add_deltas_cpu(&want, &xs, &[(pair, rows)]).unwrap());
            assert!(add_pairs_cpu(&got, &xs, &[(cpu, rows)]).unwrap());
            let (want, got) = (
                want.to_vec2::<f32>().unwrap(),
                got.to_vec2::<f32>().unwrap(),
            );
            assert_eq!(want, got, "layer {layer} {module:?}");
            assert_ne!(
                want[0],
                base.to_vec2::<f32>().unwrap()[0],
                "a delta was added"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, adapter.layers.len() * 7);
}

#[test]
fn an_f16_serving_copy_packs_and_gives_the_tensors_deltas() {
    let adapter = served(1);
    assert_eq!(
        adapter.layers[0].modules[0].as_ref().unwrap().a.dtype(),
        DType::F16
    );
    assert_same_deltas(&adapter);
}

#[test]
fn an_int8_copy_packs_and_gives_the_tensors_deltas() {
    let adapter = quantize_adapter(&served(2)).expect("int8");
    assert!(adapter.layers[0].modules[0]
        .as_ref()
        .unwrap()
        .int8
        .is_some());
    assert_same_deltas(&adapter);
}

#[test]
fn pairs_in_separate_buffers_or_of_mixed_kinds_get_no_table() {
    let cfg = ModelConfig::tiny_for_tests();
    // Made tensor by tensor: each pair has its own storage.
    let f32s = random_adapter(&cfg, 8, 3).unwrap();
    assert!(f32s.packed().is_none(), "f32 tensors are not packed");
    let mut f16s = f32s.clone();
    for p in f16s
        .layers
        .iter_mut()
        .flat_map(|l| l.modules.iter_mut().flatten())
    {
        p.a = p.a.to_dtype(DType::F16).unwrap();
        p.b = p.b.to_dtype(DType::F16).unwrap();
    }
    assert!(f16s.packed().is_none(), "one buffer per tensor");
    // One pair of a served adapter swapped for an int8 one: two kinds, two buffers.
    let mut mixed = served(4);
    let first = mixed.layers[0].modules[0].take().unwrap();
    mixed.layers[0].modules[0] = Some(quantize_pair(&first).unwrap());
    assert!(mixed.packed().is_none());
    // The served adapter with one pair dropped still packs, and that pair is absent.
    let mut partial = served(5);
    partial.layers[1].modules[Module::Down.index()] = None;
    let packed = partial.packed().expect("still one buffer");
    assert!(packed.lock().pair(1, Module::Down).is_none());
    assert!(packed.lock().pair(1, Module::Up).is_some());
    assert!(packed
        .lock()
        .pair(partial.layers.len(), Module::Q)
        .is_none());
}

#[test]
fn a_clone_starts_without_the_table_so_changes_to_it_are_seen() {
    let adapter = served(6);
    assert!(adapter.packed().is_some());
    let mut changed = adapter.clone();
    assert_eq!(format!("{:?}", changed.packed), "PackedCell(not built)");
    changed.layers[0].modules[0] = None;
    let packed = changed.packed().expect("rebuilt");
    assert!(packed.lock().pair(0, Module::Q).is_none());
    assert!(adapter
        .packed()
        .unwrap()
        .lock()
        .pair(0, Module::Q)
        .is_some());
}
