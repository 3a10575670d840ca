//! The stored int8 copy of an adapter (`adapters.precision = "int8"`): its int8 pairs
//! ([`crate::engine::lora::int8`]) as a safetensors file, which a cold load reads straight into
//! the buffer the pairs are then served from. Against making the int8 copy from the f16
//! serving copy at every cold load, it halves the bytes read and hashed and leaves no copy to
//! make on the request path.
//!
//! Tensors: each pair's A and B under PEFT's names as I8 (`[r, in]`, `[out, r]`), and their
//! per-rank scales as F32 `[r]` under the same names with `.weight` replaced by `.scales`. The
//! pair's scale (alpha / r) is not stored: it comes from `adapter_config.json`, as for any
//! PEFT file. The file is the server's own (its BLAKE3 is recorded when it is written), but it
//! is parsed as carefully as an upload: a damaged one is an error, never a panic.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::config::{module_path, AdapterConfig};
use super::file::{read_whole, WARM_INT8_FILES};
use super::save::{serialize_named, NamedBytes};
use super::weights::{base_dims, parse_name, tensor_name, Side};
use super::{LoraError, LoraLimits};
use crate::engine::lora::int8::Int8Scales;
use crate::engine::lora::{LayerLora, LoraAdapter, LoraPair, Module};
use crate::engine::model::config::ModelConfig;

/// The name of a pair's scales tensor, beside its weight's `name`.
fn scales_name(layer: usize, module: Module, side: Side) -> String {
    let weight = tensor_name(layer, module, side);
    format!("{}.scales", weight.trim_end_matches(".weight"))
}

/// The safetensors bytes of `adapter`'s int8 copy. Every pair must be int8 (what
/// [`crate::engine::lora::int8::quantize_adapter`] makes).
pub fn int8_weights(adapter: &LoraAdapter) -> Result<Vec<u8>, LoraError> {
    let bad = |tensor: String, message: String| LoraError::Tensor { tensor, message };
    let mut buffers: Vec<NamedBytes> = Vec::new();
    for (layer, lora) in adapter.layers.iter().enumerate() {
        for module in Module::ALL {
            let Some(pair) = lora.get(module) else {
                continue;
            };
            let Some(scales) = &pair.int8 else {
                return Err(bad(
                    tensor_name(layer, module, Side::A),
                    "is not int8; only an int8 copy is written here".into(),
                ));
            };
            for (side, t, s) in [(Side::A, &pair.a, &scales.a), (Side::B, &pair.b, &scales.b)] {
                let name = tensor_name(layer, module, side);
                let bytes = t
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<u8>())
                    .map_err(|e| bad(name.clone(), format!("could not be read back: {e}")))?;
                buffers.push((name, Dtype::I8, t.dims().to_vec(), bytes));
                let values = s.iter().flat_map(|v| v.to_le_bytes()).collect();
                buffers.push((
                    scales_name(layer, module, side),
                    Dtype::F32,
                    vec![s.len()],
                    values,
                ));
            }
        }
    }
    serialize_named(&buffers, "the int8 copy")
}

/// An int8 copy in memory: the bytes live in one U8 CPU tensor that the pairs' A and B view.
/// Never written after the read, so what is hashed through [`Int8File::with_bytes`] is what
/// the pairs hold.
pub struct Int8File {
    bytes: Tensor,
}

impl Int8File {
    /// Reads the file at `path` into the buffer a helper touched after the previous such read
    /// (see [`super::refill_warm_buffers`]), refusing one over `max_bytes`.
    pub fn read(path: &Path, max_bytes: usize) -> std::io::Result<Self> {
        let (bytes, _) = read_whole(path, max_bytes, Some(&WARM_INT8_FILES))?;
        Self::from_vec(bytes).map_err(std::io::Error::other)
    }

    /// The bytes of a file already in memory.
    pub fn from_vec(bytes: Vec<u8>) -> candle_core::Result<Self> {
        let n = bytes.len();
        Ok(Self {
            bytes: Tensor::from_vec(bytes, n, &Device::Cpu)?,
        })
    }

    pub fn len(&self) -> usize {
        self.bytes.elem_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` on the file's bytes.
    pub fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        let (storage, _) = self.bytes.storage_and_layout();
        let bytes: &[u8] = match &*storage {
            Storage::Cpu(CpuStorage::U8(b)) => b,
            // Built from a Vec<u8> on the CPU in `from_vec`, so never another storage.
            _ => &[],
        };
        f(bytes)
    }
}

/// One pair as found in the file: where A and B lie, their shapes, and their scales.
struct Found {
    layer: usize,
    module: Module,
    scale: f64,
    a: (usize, [usize; 2]),
    b: (usize, [usize; 2]),
    scales: Int8Scales,
}

/// Parses an int8 copy against its `adapter_config.json` and the base: the same names, shapes
/// and ranks an upload is held to, A and B as I8 with finite, non-negative F32 scales of the
/// rank's length. A and B become views of `file`'s memory.
pub fn parse_int8_file(
    config_json: &[u8],
    file: &Int8File,
    base: &ModelConfig,
    limits: &LoraLimits,
) -> Result<LoraAdapter, LoraError> {
    let cfg = AdapterConfig::parse(config_json, base, limits)?;
    let found = file.with_bytes(|bytes| find_pairs(bytes, &cfg, base, limits))?;
    let view = |name: String, (start, shape): (usize, [usize; 2])| {
        file.bytes
            .narrow(0, start, shape[0] * shape[1])
            .and_then(|t| t.reshape((shape[0], shape[1])))
            .map_err(|e| LoraError::tensor(name, format!("could not be viewed in place: {e}")))
    };
    let mut layers = vec![LayerLora::default(); base.num_layers];
    // What the adapter keeps alive: the whole file (the views hold its buffer) and the scales
    // copied out of it.
    let mut size_bytes = file.len();
    for f in found {
        size_bytes += std::mem::size_of::<f32>() * (f.scales.a.len() + f.scales.b.len());
        let pair = LoraPair {
            a: view(tensor_name(f.layer, f.module, Side::A), f.a)?,
            b: view(tensor_name(f.layer, f.module, Side::B), f.b)?,
            scale: f.scale,
            int8: Some(f.scales),
        };
        layers[f.layer].modules[f.module.index()] = Some(pair);
    }
    Ok(super::adapter(&cfg, layers, size_bytes))
}

/// The four tensors of one pair in the file: A, B, A's scales, B's scales.
type Slot<'a> = [Option<(String, TensorView<'a>)>; 4];

fn find_pairs(
    bytes: &[u8],
    cfg: &AdapterConfig,
    base: &ModelConfig,
    limits: &LoraLimits,
) -> Result<Vec<Found>, LoraError> {
    if bytes.len() > limits.max_bytes {
        return Err(LoraError::TooLarge {
            what: "the int8 copy",
            bytes: bytes.len(),
            max: limits.max_bytes,
        });
    }
    let st = SafeTensors::deserialize(bytes).map_err(|e| LoraError::Safetensors {
        message: format!("the int8 copy is not a valid safetensors file: {e}"),
    })?;
    let mut tensors = st.tensors();
    tensors.sort_by(|x, y| x.0.cmp(&y.0));
    let mut slots: BTreeMap<(usize, usize), Slot<'_>> = BTreeMap::new();
    for (name, view) in tensors {
        let (weight, is_scales) = match name.strip_suffix(".scales") {
            Some(stem) => (format!("{stem}.weight"), true),
            None => (name.clone(), false),
        };
        let (layer, module, side) = parse_name(&weight)?;
        if layer >= base.num_layers || !cfg.is_target(&module_path(layer, module)) {
            return Err(LoraError::tensor(
                name,
                "is not a module adapter_config.json and the base model have",
            ));
        }
        let slot = slots.entry((layer, module.index())).or_default();
        let at = usize::from(side == Side::B) + 2 * usize::from(is_scales);
        if slot[at].is_some() {
            return Err(LoraError::tensor(name, "appears twice"));
        }
        slot[at] = Some((name, view));
    }
    if slots.is_empty() {
        return Err(LoraError::Safetensors {
            message: "the int8 copy holds no tensors".into(),
        });
    }
    let found: Vec<Result<Found, LoraError>> = slots
        .into_par_iter()
        .map(|((layer, mi), slot)| {
            let module = Module::ALL[mi];
            let resolved = cfg.resolve(&module_path(layer, module));
            let (fan_in, fan_out) = base_dims(base, module);
            let r = resolved.rank;
            let [a, b, a_scales, b_scales] = slot;
            let names = [
                tensor_name(layer, module, Side::A),
                tensor_name(layer, module, Side::B),
                scales_name(layer, module, Side::A),
                scales_name(layer, module, Side::B),
            ];
            let missing = |i: usize| LoraError::tensor(names[i].clone(), "is missing");
            let (a, b) = (a.ok_or_else(|| missing(0))?, b.ok_or_else(|| missing(1))?);
            let a_scales = a_scales.ok_or_else(|| missing(2))?;
            let b_scales = b_scales.ok_or_else(|| missing(3))?;
            Ok(Found {
                layer,
                module,
                scale: resolved.scale,
                a: (offset(bytes, &a.1), weight_shape(&a, [r, fan_in])?),
                b: (offset(bytes, &b.1), weight_shape(&b, [fan_out, r])?),
                scales: Int8Scales {
                    a: scales(&a_scales, r)?.into(),
                    b: scales(&b_scales, r)?.into(),
                },
            })
        })
        .collect();
    found.into_iter().collect()
}

/// Where a tensor's data starts in the file.
fn offset(bytes: &[u8], view: &TensorView<'_>) -> usize {
    view.data().as_ptr() as usize - bytes.as_ptr() as usize
}

fn weight_shape(
    (name, view): &(String, TensorView<'_>),
    want: [usize; 2],
) -> Result<[usize; 2], LoraError> {
    if view.dtype() != Dtype::I8 || view.shape() != want {
        return Err(LoraError::tensor(
            name.clone(),
            format!(
                "is {:?} {:?} in the int8 copy; expected I8 {want:?}",
                view.dtype(),
                view.shape()
            ),
        ));
    }
    Ok(want)
}

fn scales((name, view): &(String, TensorView<'_>), rank: usize) -> Result<Vec<f32>, LoraError> {
    if view.dtype() != Dtype::F32 || view.shape() != [rank] {
        return Err(LoraError::tensor(
            name.clone(),
            format!(
                "is {:?} {:?} in the int8 copy; expected F32 [{rank}]",
                view.dtype(),
                view.shape()
            ),
        ));
    }
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if let Some(i) = values.iter().position(|v| !v.is_finite() || *v < 0.0) {
        return Err(LoraError::tensor(
            name.clone(),
            format!("scale {i} is {}, not a finite step", values[i]),
        ));
    }
    Ok(values)
}

#[cfg(test)]
mod tests;
