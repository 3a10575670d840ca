//! `adapter_model.safetensors`: tensor names mapped to (layer, module, A|B), each pair checked
//! against the base layer's shape and the module's rank, sizes bounded before anything is
//! allocated, values checked finite and converted to the engine's form (f16 on the CPU, f32
//! elsewhere), then placed on the device; or, for an all-f16 file read into a [`WeightsFile`]
//! (the serving copy), served as views of the file's own memory.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

use super::config::{module_path, AdapterConfig};
use super::{LoraError, LoraLimits, WeightsFile};
use crate::engine::lora::narrow::{self, Refusal};
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
pub(super) fn parse_name(name: &str) -> Result<(usize, Module, Side), LoraError> {
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

/// The adapter's layers from the bytes of a weights file, copied into tensors of the engine's
/// form; also the bytes they take.
pub(super) fn load(
    bytes: &[u8],
    cfg: &AdapterConfig,
    base: &ModelConfig,
    limits: &LoraLimits,
    device: &Device,
) -> Result<(Vec<LayerLora>, usize), LoraError> {
    convert(check(bytes, cfg, base, limits)?, base, device)
}

/// [`load`] from a [`WeightsFile`]: when the tensors are all f16 and the device is the CPU,
/// A and B become views of the file's memory (nothing copied); otherwise as [`load`]. The
/// bytes reported are then the whole file's, which the views keep alive.
pub(super) fn load_shared(
    file: &WeightsFile,
    cfg: &AdapterConfig,
    base: &ModelConfig,
    limits: &LoraLimits,
    device: &Device,
) -> Result<(Vec<LayerLora>, usize), LoraError> {
    let spans = file.with_words(|bytes, words| {
        let checked = check(bytes, cfg, base, limits)?;
        // Where each tensor's values start in `words`, when it can be served from there.
        let start = |view: &safetensors::tensor::TensorView<'_>| {
            let offset = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            (view.dtype() == Dtype::F16 && offset.is_multiple_of(2)).then_some(offset / 2)
        };
        let in_place = device.is_cpu()
            && cfg!(target_endian = "little")
            && checked
                .iter()
                .all(|c| start(&c.a.1).is_some() && start(&c.b.1).is_some());
        if !in_place {
            return convert(checked, base, device).map(Parsed::Copied);
        }
        let span = |(name, view): &(String, safetensors::tensor::TensorView<'_>)| {
            let start = start(view).unwrap_or(0);
            let values = &words[start..start + view.data().len() / 2];
            check_finite(name, values)?;
            Ok(Span {
                start,
                len: values.len(),
                shape: [view.shape()[0], view.shape()[1]],
            })
        };
        let spans: Vec<Result<_, LoraError>> = checked
            .par_iter()
            .map(|c| Ok((c.layer, c.module, c.scale, span(&c.a)?, span(&c.b)?)))
            .collect();
        spans
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map(Parsed::InPlace)
    })?;
    let spans = match spans {
        Parsed::InPlace(spans) => spans,
        Parsed::Copied(converted) => return Ok(converted),
    };
    let view = |name: String, s: Span| {
        file.words
            .narrow(0, s.start, s.len)
            .and_then(|t| t.reshape((s.shape[0], s.shape[1])))
            .map_err(|e| LoraError::tensor(name, format!("could not be viewed in place: {e}")))
    };
    let mut layers = vec![LayerLora::default(); base.num_layers];
    for (layer, module, scale, a, b) in spans {
        let pair = LoraPair {
            a: view(tensor_name(layer, module, Side::A), a)?,
            b: view(tensor_name(layer, module, Side::B), b)?,
            scale,
            int8: None,
        };
        layers[layer].modules[module.index()] = Some(pair);
    }
    Ok((layers, file.len()))
}

/// What [`load_shared`] found: every pair's place in the file, or the pairs already copied.
enum Parsed {
    InPlace(Vec<(usize, Module, f64, Span, Span)>),
    Copied((Vec<LayerLora>, usize)),
}

/// Where one tensor's values lie in a [`WeightsFile`].
struct Span {
    start: usize,
    len: usize,
    shape: [usize; 2],
}

/// Every pair of the file, named, shaped and sized against the base and the limits, not yet
/// converted.
fn check<'a>(
    bytes: &'a [u8],
    cfg: &AdapterConfig,
    base: &ModelConfig,
    limits: &LoraLimits,
) -> Result<Vec<Checked<'a>>, LoraError> {
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
    Ok(checked)
}

/// Checked pairs converted to the engine's form and placed on `device`.
fn convert(
    checked: Vec<Checked<'_>>,
    base: &ModelConfig,
    device: &Device,
) -> Result<(Vec<LayerLora>, usize), LoraError> {
    // On the CPU the engine serves A and B as f16 (as PEFT and vLLM do at inference): the
    // delta pass is bound by reading them, and f16 halves the bytes (BENCHMARKS.md). A pair
    // with a value beyond f16's range stays f32. Other devices keep f32 for the tensor path.
    //
    // Pairs convert in parallel: a cold load's cost is mostly first touches of the fresh
    // memory the tensors take (page faults, ~0.4 ms per MB on our VMs), which spread over the
    // pool like the arithmetic does.
    // Collected in order before the first error is taken, so a file with several bad tensors
    // always names the same one.
    let placed: Vec<Result<Placed, LoraError>> = checked
        .into_par_iter()
        .map(|c| {
            let halves = if device.is_cpu() {
                match (to_f16(&c.a.0, &c.a.1)?, to_f16(&c.b.0, &c.b.1)?) {
                    (Some(a), Some(b)) => Some((a, b)),
                    _ => None,
                }
            } else {
                None
            };
            let (a, b) = match halves {
                Some((a, b)) => (
                    place(&c.a.0, a, c.a.1.shape(), device)?,
                    place(&c.b.0, b, c.b.1.shape(), device)?,
                ),
                None => (
                    place(&c.a.0, to_f32(&c.a.0, &c.a.1)?, c.a.1.shape(), device)?,
                    place(&c.b.0, to_f32(&c.b.0, &c.b.1)?, c.b.1.shape(), device)?,
                ),
            };
            Ok(Placed {
                layer: c.layer,
                module: c.module,
                pair: LoraPair {
                    a,
                    b,
                    scale: c.scale,
                    int8: None,
                },
            })
        })
        .collect();
    let mut layers = vec![LayerLora::default(); base.num_layers];
    let mut resident_bytes = 0usize;
    for p in placed {
        let Placed {
            layer,
            module,
            pair,
        } = p?;
        resident_bytes += pair.size_bytes();
        layers[layer].modules[module.index()] = Some(pair);
    }
    Ok((layers, resident_bytes))
}

/// One converted pair and where it goes.
struct Placed {
    layer: usize,
    module: Module,
    pair: LoraPair,
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

/// The values as f32 (little-endian bytes, read without assuming alignment); a non-finite
/// value is refused.
fn to_f32(name: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>, LoraError> {
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => return Err(unsupported(name, other)),
    };
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(not_finite(name, i, *v));
    }
    Ok(values)
}

/// The values as f16, or `None` when one lies beyond f16's range (the caller keeps f32); a
/// non-finite value is refused.
fn to_f16(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<Option<Vec<f16>>, LoraError> {
    let data = view.data();
    let refused = |r: Refusal| match r {
        Refusal::NotFinite { index, value } => Err(not_finite(name, index, value)),
        Refusal::OutOfRange => Ok(None),
    };
    match view.dtype() {
        Dtype::F32 => {
            let mut out = vec![f16::ZERO; data.len() / 4];
            match narrow::f32_le_to_f16(data, &mut out) {
                Ok(()) => Ok(Some(out)),
                Err(r) => refused(r),
            }
        }
        Dtype::F16 => {
            let values = f16_le(data);
            check_finite(name, &values)?;
            Ok(Some(values))
        }
        Dtype::BF16 => {
            // Rare in practice; through f32 bytes, to share the checks.
            let wide: Vec<u8> = data
                .chunks_exact(2)
                .flat_map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes())
                .collect();
            let mut out = vec![f16::ZERO; data.len() / 2];
            match narrow::f32_le_to_f16(&wide, &mut out) {
                Ok(()) => Ok(Some(out)),
                Err(r) => refused(r),
            }
        }
        other => Err(unsupported(name, other)),
    }
}

/// Little-endian f16 bytes as values: one copy on a little-endian machine (the serving copy a
/// cold load reads is all f16, so this is on its path).
fn f16_le(data: &[u8]) -> Vec<f16> {
    let n = data.len() / 2;
    let mut out = vec![f16::ZERO; n];
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice_mut::<f16, u8>(&mut out).copy_from_slice(&data[..n * 2]);
    } else {
        for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
            *o = f16::from_le_bytes([c[0], c[1]]);
        }
    }
    out
}

/// Refuses a NaN or an infinity, naming the first.
fn check_finite(name: &str, values: &[f16]) -> Result<(), LoraError> {
    if all_finite(values) {
        return Ok(());
    }
    match values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        Some((i, v)) => Err(not_finite(name, i, v.to_f32())),
        None => Ok(()),
    }
}

/// Whether no value is NaN or infinite (all exponent bits set), in a form the compiler
/// vectorizes: no early exit inside a chunk.
fn all_finite(values: &[f16]) -> bool {
    values.chunks(512).all(|c| {
        c.iter().fold(0u16, |acc, v| {
            acc | u16::from(v.to_bits() & 0x7c00 == 0x7c00)
        }) == 0
    })
}

fn unsupported(name: &str, dtype: Dtype) -> LoraError {
    LoraError::tensor(
        name,
        format!("dtype {dtype:?} is not supported (F32, F16 or BF16)"),
    )
}

fn not_finite(name: &str, i: usize, v: f32) -> LoraError {
    LoraError::tensor(
        name,
        format!("element {i} is {v}: all values must be finite"),
    )
}

/// Places checked values on `device` as a tensor of `shape`.
fn place<T: candle_core::WithDType>(
    name: &str,
    values: Vec<T>,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor, LoraError> {
    Tensor::from_vec(values, shape, device)
        .map_err(|e| LoraError::tensor(name, format!("could not be placed on the device: {e}")))
}
