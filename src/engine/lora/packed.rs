//! An adapter's pairs as the CPU delta pass reads them: where each A and B lies in the one
//! buffer they all view, with rank, dimensions, scale and any int8 scales, in a table of a few
//! bytes per pair. Read through the tensors instead, a decode step follows every pair's
//! metadata (tensor, shape, strides, storage lock) per projection, and all of it is cold by
//! then, the base weights having streamed through the cache in between: ~1 ms a step at 8
//! adapters on a 2-core VM (BENCHMARKS.md). With the table a step locks each adapter's buffer
//! once and reads one entry per projection.

use std::sync::OnceLock;

use candle_core::{CpuStorage, Storage, StorageRef, Tensor};

use super::apply::CpuPair;
use super::{LoraAdapter, Module};

/// Where one pair lies in the buffer, in elements.
#[derive(Clone, Copy, Debug)]
struct Span {
    a: usize,
    b: usize,
    /// Start of the pair's rank A scales, then its rank B scales, in `PackedAdapter::scales`.
    scales: usize,
    rank: u32,
    in_dim: u32,
    out_dim: u32,
    scale: f32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Elem {
    F16,
    Int8,
}

/// The table of one adapter whose pairs are all f16, or all int8, views of one CPU buffer:
/// what an f16 serving copy parses into and what an int8 copy is made as.
#[derive(Debug)]
pub struct PackedAdapter {
    /// A tensor on the shared buffer: it keeps the buffer alive and gives the lock.
    buffer: Tensor,
    elem: Elem,
    /// Per layer, per module ([`Module::index`]).
    spans: Vec<[Option<Span>; 7]>,
    /// int8 scales of every pair, placed by `Span::scales`.
    scales: Vec<f32>,
}

impl PackedAdapter {
    /// The table of `adapter`, or `None` when its pairs are not all f16 (or all int8)
    /// contiguous views of one CPU buffer; such adapters take the per-tensor path.
    pub fn build(adapter: &LoraAdapter) -> Option<Self> {
        let mut buffer: Option<Buffer> = None;
        let mut elem = None;
        let mut scales = Vec::new();
        let mut spans = Vec::with_capacity(adapter.layers.len());
        for layer in &adapter.layers {
            let mut row = [None; 7];
            for (slot, pair) in row.iter_mut().zip(&layer.modules) {
                let Some(pair) = pair else { continue };
                let this = if pair.int8.is_some() {
                    Elem::Int8
                } else {
                    Elem::F16
                };
                if *elem.get_or_insert(this) != this {
                    return None;
                }
                let (rank, in_dim) = pair.a.dims2().ok()?;
                let (out_dim, b_rank) = pair.b.dims2().ok()?;
                if b_rank != rank {
                    return None;
                }
                let (a0, a1) = locate(&pair.a, this, &mut buffer)?;
                let (b0, b1) = locate(&pair.b, this, &mut buffer)?;
                if a1 - a0 != rank * in_dim || b1 - b0 != out_dim * rank {
                    return None;
                }
                let at = scales.len();
                if let Some(s) = &pair.int8 {
                    if s.a.len() != rank || s.b.len() != rank {
                        return None;
                    }
                    scales.extend_from_slice(&s.a);
                    scales.extend_from_slice(&s.b);
                }
                *slot = Some(Span {
                    a: a0,
                    b: b0,
                    scales: at,
                    rank: u32::try_from(rank).ok()?,
                    in_dim: u32::try_from(in_dim).ok()?,
                    out_dim: u32::try_from(out_dim).ok()?,
                    scale: pair.scale as f32,
                });
            }
            spans.push(row);
        }
        Some(Self {
            buffer: buffer?.tensor,
            elem: elem?,
            spans,
            scales,
        })
    }

    /// Locks the buffer for reading (one step's delta passes).
    pub fn lock(&self) -> PackedView<'_> {
        let (storage, _) = self.buffer.storage_and_layout();
        PackedView {
            storage,
            packed: self,
        }
    }
}

/// The first tensor met, and its storage's identity (address and length of its values): every
/// other tensor must view the same storage.
struct Buffer {
    tensor: Tensor,
    address: usize,
    len: usize,
}

/// The element range of `t` in the shared buffer, which `t` sets when it is the first.
fn locate(t: &Tensor, elem: Elem, buffer: &mut Option<Buffer>) -> Option<(usize, usize)> {
    if !t.device().is_cpu() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let range = layout.contiguous_offsets()?;
    let (address, len) = match (&*storage, elem) {
        (Storage::Cpu(CpuStorage::F16(v)), Elem::F16) => (v.as_ptr().addr(), v.len()),
        (Storage::Cpu(CpuStorage::U8(v)), Elem::Int8) => (v.as_ptr().addr(), v.len()),
        _ => return None,
    };
    drop(storage);
    match buffer {
        // Two live allocations never share an address: same address and length, same storage.
        Some(b) if (b.address, b.len) != (address, len) => return None,
        Some(_) => {}
        None => {
            *buffer = Some(Buffer {
                tensor: t.clone(),
                address,
                len,
            })
        }
    }
    Some(range)
}

/// An adapter's table with its buffer locked for reading.
pub struct PackedView<'a> {
    storage: StorageRef<'a>,
    packed: &'a PackedAdapter,
}

impl PackedView<'_> {
    /// The pair of `module` in `layer`, or `None` where the adapter does not adapt it.
    pub fn pair(&self, layer: usize, module: Module) -> Option<CpuPair<'_>> {
        let s = self.packed.spans.get(layer)?[module.index()].as_ref()?;
        let (rank, in_dim, out_dim) = (s.rank as usize, s.in_dim as usize, s.out_dim as usize);
        let (a, b) = (s.a..s.a + rank * in_dim, s.b..s.b + out_dim * rank);
        // `build` checked every range against the buffer; `get` keeps this total anyway.
        match (&*self.storage, self.packed.elem) {
            (Storage::Cpu(CpuStorage::F16(v)), Elem::F16) => {
                Some(CpuPair::f16(v.get(a)?, v.get(b)?, rank, s.scale))
            }
            (Storage::Cpu(CpuStorage::U8(v)), Elem::Int8) => {
                let scales = self.packed.scales.get(s.scales..s.scales + 2 * rank)?;
                let (a_scales, b_scales) = scales.split_at(rank);
                Some(CpuPair::int8(
                    bytemuck::cast_slice(v.get(a)?),
                    a_scales,
                    bytemuck::cast_slice(v.get(b)?),
                    b_scales,
                    s.scale,
                ))
            }
            _ => None,
        }
    }
}

/// A [`LoraAdapter`]'s table, built on first use. An adapter is immutable once shared (the
/// engine holds it in an `Arc`); a clone, which may be changed, starts without a table.
#[derive(Default)]
pub struct PackedCell(OnceLock<Option<PackedAdapter>>);

impl PackedCell {
    pub fn get_or_build(&self, adapter: &LoraAdapter) -> Option<&PackedAdapter> {
        self.0
            .get_or_init(|| {
                let built = PackedAdapter::build(adapter);
                tracing::debug!(
                    packed = built.is_some(),
                    "delta table of an adapter: packed, or its tensors read per projection"
                );
                built
            })
            .as_ref()
    }
}

impl Clone for PackedCell {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for PackedCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0.get() {
            None => "PackedCell(not built)",
            Some(None) => "PackedCell(none)",
            Some(Some(_)) => "PackedCell(built)",
        })
    }
}

#[cfg(test)]
mod tests;
