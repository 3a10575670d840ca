//! `adapter_model.safetensors`: tensor names mapped to (layer, module, A|B), each pair checked
//! against the base layer's shape and the module's rank, sizes bounded before anything is
//! allocated, values converted to f32 and checked finite, then placed on the device.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use super::config::{module_path, AdapterConfig};
use super::{LoraError, LoraLimits};
use crate::engine::lora::{LayerLora, LoraPair, Module};
use crate::engine::model::config::ModelConfig;

const PREFIX: &str = "base_model.model.model.layers.";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Side {
    A,
    B,
}

impl Side {
    pub fn hf_name(self) -> &'static str {
        match self {
            Side::A => "lora_A",
            Side::B => "lora_B",
        }
    }
}

/// The name PEFT saves a tensor under (the adapter name `default` stripped, as PEFT does).
pub(super) fn tensor_name(layer: usize, module: Module, side: Side) -> String {
    format!(
        "{PREFIX}{layer}.{}.{}.{}.weight",
        module.hf_parent(),
        module.hf_name(),
        side.hf_name()
    )
}

/// (in, out) features of a projection in the base model.
pub(super) fn base_dims(base: &ModelConfig, module: Module) -> (usize, usize) {
    let q = base.num_heads * base.head_dim;
    let kv = base.num_kv_heads * base.head_dim;
    match module {
        Module::Q => (base.hidden_size, q),
        Module::K | Module::V => (base.hidden_size, kv),
        Module::O => (q, base.hidden_size),
        Module::Gate | Module::Up => (base.hidden_size, base.intermediate_size),
        Module::Down => (base.intermediate_size, base.hidden_size),
    }
}

/// Reads `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}[.default].weight`.
/// Anything else is refused with a message saying what the tensor looks like it is for.
fn parse_name(name: &str) -> Result<(usize, Module, Side), LoraError> {
    let parsed = (|| {
        let rest = name.strip_prefix(PREFIX)?;
        let (layer, rest) = rest.split_once('.')?;
        // Canonical decimal only, so `01` and `1` cannot name the same layer twice.
        let canonical = layer == "0" || !layer.starts_with('0');
        if layer.is_empty() || !canonical || !layer.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let layer: usize = layer.parse().ok()?;
        let mut parts = rest.split('.');
        let parent = parts.next()?;
        let module = Module::from_hf_name(parts.next()?)?;
        if module.hf_parent() != parent {
            return None;
        }
        let side = match parts.next()? {
            "lora_A" => Side::A,
            "lora_B" => Side::B,
            _ => return None,
        };
        let tail: Vec<&str> = parts.collect();
        if tail != ["weight"] && tail != ["default", "weight"] {
            return None;
        }
        Some((layer, module, side))
    })();
    if let Some(p) = parsed {
        return Ok(p);
    }
    let why = if name.contains("lora_embedding") || name.contains("embed_tokens") {
        "embedding adapters are not supported"
    } else if name.contains("lm_head") {
        "lm_head adapters are not supported"
    } else if name.contains("magnitude") {
        "DoRA (magnitude vectors) is not supported"
    } else if name.ends_with(".bias") {
        "bias training is not supported"
    } else {
        "not a LoRA tensor this server understands (expected \
         base_model.model.model.layers.{i}.{self_attn|mlp}.{q|k|v|o|gate|up|down}_proj.lora_{A|B}.weight)"
    };
    Err(LoraError::tensor(name, why))
}

struct Slot<'a> {
    a: Option<(String, safetensors::tensor::TensorView<'a>)>,
    b: Option<(String, safetensors::tensor::TensorView<'a>)>,
}

/// One checked pair, not yet converted.
struct Checked<'a> {
    layer: usize,
    module: Module,
    scale: f64,
    a: (String, safetensors::tensor::TensorView<'a>),
    b: (String, safetensors::tensor::TensorView<'a>),
}

pub(super) fn load(
    bytes: &[u8],
    cfg: &AdapterConfig,
    base: &ModelConfig,
    limits: &LoraLimits,
    device: &Device,
) -> Result<(Vec<LayerLora>, usize), LoraError> {
    if bytes.len() > limits.max_bytes {
        return Err(LoraError::TooLarge {
            what: "the file",
            bytes: bytes.len(),
            max: limits.max_bytes,
        });
    }
    // The safetensors crate checks the header length, the JSON, dtypes, and that the offsets
    // tile the data exactly; a malformed file is an error here, never a panic later.
    let st = SafeTensors::deserialize(bytes).map_err(|e| LoraError::Safetensors {
        message: format!("not a valid safetensors file: {e}"),
    })?;
    let mut tensors = st.tensors();
    if tensors.is_empty() {
        return Err(LoraError::Safetensors {
            message: "the file holds no tensors".into(),
        });
    }
    // Sorted, so that the first error reported does not depend on hash order.
    tensors.sort_by(|x, y| x.0.cmp(&y.0));

    let mut slots: BTreeMap<(usize, usize), Slot> = BTreeMap::new();
    for (name, view) in tensors {
        let (layer, module, side) = parse_name(&name)?;
        if layer >= base.num_layers {
            return Err(LoraError::tensor(
                name,
                format!(
                    "layer {layer} does not exist: the base model has {} layers",
                    base.num_layers
                ),
            ));
        }
        if !cfg.is_target(&module_path(layer, module)) {
            return Err(LoraError::tensor(
                name,
                format!(
                    "adapts {} of layer {layer}, which target_modules {:?} does not name",
                    module.hf_name(),
                    cfg.module_names()
                ),
            ));
        }
        let slot = slots
            .entry((layer, module.index()))
            .or_insert(Slot { a: None, b: None });
        let place = match side {
            Side::A => &mut slot.a,
            Side::B => &mut slot.b,
        };
        if let Some((first, _)) = place {
            return Err(LoraError::tensor(
                name,
                format!("duplicates `{first}` (both the plain and the `.default` name)"),
            ));
        }
        *place = Some((name, view));
    }

    let mut checked = Vec::with_capacity(slots.len());
    let mut size_bytes = 0usize;
    for ((layer, mi), slot) in slots {
        let module = Module::ALL[mi];
        let (a, b) = match (slot.a, slot.b) {
            (Some(a), Some(b)) => (a, b),
            (Some((present, _)), None) | (None, Some((present, _))) => {
                let missing_side = if present.contains("lora_A") {
                    Side::B
                } else {
                    Side::A
                };
                return Err(LoraError::tensor(
                    tensor_name(layer, module, missing_side),
                    format!(
                        "is missing, but `{present}` is present: each adapted module needs \
                         both lora_A and lora_B"
                    ),
                ));
            }
            (None, None) => continue,
        };
        let resolved = cfg.resolve(&module_path(layer, module));
        let (fan_in, fan_out) = base_dims(base, module);
        let r = resolved.rank;
        check_view(&a, [r, fan_in], "[r, in]", module, &resolved.rank_field)?;
        check_view(&b, [fan_out, r], "[out, r]", module, &resolved.rank_field)?;
        size_bytes = size_bytes
            .saturating_add((r * fan_in).saturating_mul(4))
            .saturating_add((fan_out * r).saturating_mul(4));
        checked.push(Checked {
            layer,
            module,
            scale: resolved.scale,
            a,
            b,
        });
    }
    // Checked on shapes before converting, so an oversized adapter allocates nothing.
    if size_bytes > limits.max_bytes {
        return Err(LoraError::TooLarge {
            what: "the adapter as f32 in memory",
            bytes: size_bytes,
            max: limits.max_bytes,
        });
    }

    let mut layers = vec![LayerLora::default(); base.num_layers];
    for c in checked {
        let a = to_tensor(&c.a.0, &c.a.1, device)?;
        let b = to_tensor(&c.b.0, &c.b.1, device)?;
        layers[c.layer].modules[c.module.index()] = Some(LoraPair {
            a,
            b,
            scale: c.scale,
        });
    }
    Ok((layers, size_bytes))
}

fn check_view(
    (name, view): &(String, safetensors::tensor::TensorView<'_>),
    expected: [usize; 2],
    layout: &str,
    module: Module,
    rank_field: &str,
) -> Result<(), LoraError> {
    if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(LoraError::tensor(
            name.as_str(),
            format!(
                "dtype {:?} is not supported (F32, F16 or BF16)",
                view.dtype()
            ),
        ));
    }
    if view.shape() != expected {
        return Err(LoraError::tensor(
            name.as_str(),
            format!(
                "shape {:?} does not match the base: expected {expected:?} ({layout} for {}, \
                 rank from `{rank_field}`)",
                view.shape(),
                module.hf_name()
            ),
        ));
    }
    Ok(())
}

/// Converts to f32 (little-endian bytes, read without assuming alignment), refuses non-finite
/// values, and places the tensor on `device`.
fn to_tensor(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
    device: &Device,
) -> Result<Tensor, LoraError> {
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(LoraError::tensor(
                name,
                format!("dtype {other:?} is not supported (F32, F16 or BF16)"),
            ))
        }
    };
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(LoraError::tensor(
            name,
            format!("element {i} is {v}: all values must be finite"),
        ));
    }
    Tensor::from_vec(values, view.shape(), device)
        .map_err(|e| LoraError::tensor(name, format!("could not be placed on the device: {e}")))
}
