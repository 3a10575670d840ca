//! Writing an adapter in PEFT's own format: `adapter_config.json` with the fields PEFT writes
//! (sorted keys, as PEFT's `json.dumps(..., sort_keys=True)`) and `adapter_model.safetensors`
//! with f32 tensors under PEFT's key names, so PEFT, vLLM and LoRAX load what we train.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Map, Value};

use super::config::scale;
use super::weights::{tensor_name, Side};
use super::LoraError;
use crate::engine::lora::{LoraAdapter, Module};

/// Writes adapter_config.json + adapter_model.safetensors in PEFT format (keys
/// `base_model.model.model.layers.{i}.{self_attn|mlp}.{q_proj..}.lora_{A,B}.weight`), so
/// PEFT/vLLM/LoRAX can load what we train. `dir` is created if missing; both files are
/// fsynced (the caller renames the directory into place).
///
/// A module whose rank differs from `adapter.rank`, or whose scale is not what `lora_alpha`
/// gives at its rank, gets a `rank_pattern` / `alpha_pattern` entry keyed by its own path, so
/// PEFT reproduces the same scale. Adapters trained with one rank and alpha need neither, which
/// matters because vLLM and LoRAX read only `r` and `lora_alpha`.
pub fn save_peft(
    adapter: &LoraAdapter,
    base_model_name: &str,
    dir: &Path,
) -> Result<(), LoraError> {
    let bad = |tensor: String, message: String| LoraError::Tensor { tensor, message };
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    let mut modules: BTreeSet<String> = adapter.target_modules.iter().cloned().collect();
    let mut layers_used = BTreeSet::new();

    for (layer, lora) in adapter.layers.iter().enumerate() {
        for module in Module::ALL {
            let Some(pair) = lora.get(module) else {
                continue;
            };
            let a_name = tensor_name(layer, module, Side::A);
            let b_name = tensor_name(layer, module, Side::B);
            if pair.int8.is_some() {
                return Err(bad(a_name, INT8_REFUSED.into()));
            }
            let (a_dims, a_bytes) = to_bytes(&pair.a).map_err(|e| bad(a_name.clone(), e))?;
            let (b_dims, b_bytes) = to_bytes(&pair.b).map_err(|e| bad(b_name.clone(), e))?;
            let rank = match (a_dims.as_slice(), b_dims.as_slice()) {
                ([r, _], [_, rb]) if r == rb && *r > 0 => *r,
                _ => {
                    return Err(bad(
                        a_name,
                        format!(
                            "lora_A {a_dims:?} and lora_B {b_dims:?} are not [r, in] and [out, r]"
                        ),
                    ))
                }
            };
            let key = format!("layers.{layer}.{}.{}", module.hf_parent(), module.hf_name());
            if rank != adapter.rank {
                rank_pattern.insert(key.clone(), json!(rank));
            }
            let alpha = if adapter.use_rslora {
                pair.scale * (rank as f64).sqrt()
            } else {
                pair.scale * rank as f64
            };
            let expected = scale(adapter.alpha, rank, adapter.use_rslora);
            if (pair.scale - expected).abs() > 1e-9 * expected.abs().max(1e-12) {
                alpha_pattern.insert(key, number(alpha));
            }
            modules.insert(module.hf_name().to_owned());
            layers_used.insert(layer);
            buffers.push((a_name, a_dims, a_bytes));
            buffers.push((b_name, b_dims, b_bytes));
        }
    }

    // PEFT's layers_to_transform: given only when the adapter skips some layers, so PEFT
    // creates LoRA modules exactly where we have weights.
    let layers_to_transform = if layers_used.len() == adapter.layers.len() {
        Value::Null
    } else {
        json!(layers_used.iter().collect::<Vec<_>>())
    };
    let config = json!({
        "alpha_pattern": alpha_pattern,
        "auto_mapping": null,
        "base_model_name_or_path": base_model_name,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": layers_to_transform,
        "lora_alpha": number(adapter.alpha),
        "lora_bias": false,
        "lora_dropout": 0.0,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": adapter.rank,
        "rank_pattern": rank_pattern,
        "revision": null,
        "target_modules": modules.into_iter().collect::<Vec<_>>(),
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": adapter.use_rslora,
    });

    let views = buffers
        .iter()
        .map(|(name, dims, bytes)| {
            TensorView::new(Dtype::F32, dims.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| bad(name.clone(), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // transformers and PEFT tag PyTorch-written files this way; some loaders check it.
    let metadata = [("format".to_owned(), "pt".to_owned())]
        .into_iter()
        .collect();
    let weights = safetensors::serialize(views, Some(metadata)).map_err(|e| LoraError::Io {
        path: dir.join("adapter_model.safetensors").display().to_string(),
        message: e.to_string(),
    })?;
    let config_text = serde_json::to_vec_pretty(&config).map_err(|e| LoraError::Io {
        path: dir.join("adapter_config.json").display().to_string(),
        message: e.to_string(),
    })?;

    std::fs::create_dir_all(dir).map_err(|e| LoraError::Io {
        path: dir.display().to_string(),
        message: e.to_string(),
    })?;
    write_synced(&dir.join("adapter_config.json"), &config_text)?;
    write_synced(&dir.join("adapter_model.safetensors"), &weights)?;
    Ok(())
}

/// A whole number as a JSON integer (PEFT's `lora_alpha` is an int), anything else as a float.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// Int8 pairs exist only in the resident cache (`adapters.precision = "int8"`); writing one
/// out would store a rounded adapter as if it were the original.
const INT8_REFUSED: &str = "is held in int8 for serving; write adapters from their f16/f32 form";

fn to_bytes(t: &candle_core::Tensor) -> Result<(Vec<usize>, Vec<u8>), String> {
    let dims = t.dims().to_vec();
    let values = t
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| format!("could not be read back: {e}"))?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!("element {i} is not finite; refusing to save it"));
    }
    Ok((dims, values.iter().flat_map(|v| v.to_le_bytes()).collect()))
}

/// The adapter's tensors as they are resident (f16 where they narrowed, else f32), under
/// PEFT's key names: the serving copy the registry writes beside an upload, so a cold load
/// reads, hashes and converts half the bytes of an f32 upload. Paired with the uploaded
/// `adapter_config.json` it parses through [`super::parse_peft`] to the same tensors, bit for
/// bit, as the upload did.
pub fn serving_weights(adapter: &LoraAdapter) -> Result<Vec<u8>, LoraError> {
    let bad = |tensor: String, message: String| LoraError::Tensor { tensor, message };
    let mut buffers: Vec<NamedBytes> = Vec::new();
    for (layer, lora) in adapter.layers.iter().enumerate() {
        for module in Module::ALL {
            let Some(pair) = lora.get(module) else {
                continue;
            };
            if pair.int8.is_some() {
                return Err(bad(
                    tensor_name(layer, module, Side::A),
                    INT8_REFUSED.into(),
                ));
            }
            for (side, t) in [(Side::A, &pair.a), (Side::B, &pair.b)] {
                let name = tensor_name(layer, module, side);
                let (dtype, bytes) = resident_bytes(t).map_err(|e| bad(name.clone(), e))?;
                buffers.push((name, dtype, t.dims().to_vec(), bytes));
            }
        }
    }
    serialize_named(&buffers, "the serving copy")
}

/// One tensor to write: its name, dtype, shape and little-endian bytes.
pub(super) type NamedBytes = (String, Dtype, Vec<usize>, Vec<u8>);

/// `buffers` as a safetensors file; `what` names the file in an error.
pub(super) fn serialize_named(buffers: &[NamedBytes], what: &str) -> Result<Vec<u8>, LoraError> {
    let views = buffers
        .iter()
        .map(|(name, dtype, dims, bytes)| {
            TensorView::new(*dtype, dims.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| LoraError::Tensor {
                    tensor: name.clone(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| LoraError::Safetensors {
        message: format!("could not serialize {what}: {e}"),
    })
}

/// Little-endian bytes of a tensor in its own dtype (f16 or f32).
fn resident_bytes(t: &candle_core::Tensor) -> Result<(Dtype, Vec<u8>), String> {
    let read = |e: candle_core::Error| format!("could not be read back: {e}");
    let flat = t.flatten_all().map_err(read)?;
    match t.dtype() {
        candle_core::DType::F16 => {
            let v = flat.to_vec1::<half::f16>().map_err(read)?;
            Ok((Dtype::F16, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        }
        candle_core::DType::F32 => {
            let v = flat.to_vec1::<f32>().map_err(read)?;
            Ok((Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        }
        other => Err(format!("dtype {other:?} is not one the engine serves")),
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), LoraError> {
    let io = |e: std::io::Error| LoraError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}
