//! LoRA adapters as the engine uses them: per layer and target module, the pair A [r, in],
//! B [out, r] and its scale, applied as y = W·x + scale·B(A·x) on the frozen base. Parsing and
//! validating Hugging Face PEFT files lives in [`peft`].

pub mod apply;
pub mod cache;
pub mod int8;
pub mod narrow;
pub mod packed;
pub mod peft;

use candle_core::Tensor;

/// The projections a LoRA adapter may target, in the order of [`LayerLora::modules`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [
        Module::Q,
        Module::K,
        Module::V,
        Module::O,
        Module::Gate,
        Module::Up,
        Module::Down,
    ];

    /// The PEFT / Hugging Face module name (`q_proj`, …, `down_proj`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    /// The parent path in PEFT tensor names (`self_attn` or `mlp`).
    pub fn hf_parent(self) -> &'static str {
        match self {
            Module::Q | Module::K | Module::V | Module::O => "self_attn",
            Module::Gate | Module::Up | Module::Down => "mlp",
        }
    }

    pub fn from_hf_name(name: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.hf_name() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// One adapted projection: delta = scale · B(A·x).
#[derive(Clone, Debug)]
pub struct LoraPair {
    /// [r, in], on the model's device: f32, or f16 for adapters parsed for serving on the CPU
    /// (see [`apply`]), or int8 (see `int8`); B always has A's dtype.
    pub a: Tensor,
    /// [out, r].
    pub b: Tensor,
    /// alpha / r, or alpha / sqrt(r) with rsLoRA (per module when rank/alpha patterns apply).
    pub scale: f64,
    /// Set for an int8 pair ([`int8`]): A and B are then U8 tensors holding i8 values, and
    /// these are their per-rank scales.
    pub int8: Option<int8::Int8Scales>,
}

impl LoraPair {
    /// Bytes A, B and any int8 scales take in memory.
    pub fn size_bytes(&self) -> usize {
        let weights = (self.a.elem_count() + self.b.elem_count()) * self.a.dtype().size_in_bytes();
        let scales = self
            .int8
            .as_ref()
            .map_or(0, |s| (s.a.len() + s.b.len()) * std::mem::size_of::<f32>());
        weights + scales
    }
}

/// The adapted projections of one decoder layer (indexed by [`Module::index`]).
#[derive(Clone, Debug, Default)]
pub struct LayerLora {
    pub modules: [Option<LoraPair>; 7],
}

impl LayerLora {
    pub fn get(&self, m: Module) -> Option<&LoraPair> {
        self.modules[m.index()].as_ref()
    }
}

/// A parsed, validated adapter: immutable, shared by every sequence that uses it.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// One entry per base layer; layers the adapter does not touch have no modules.
    pub layers: Vec<LayerLora>,
    /// The default rank (`r` in adapter_config.json).
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    /// Module names as in adapter_config.json (`q_proj`, …), sorted.
    pub target_modules: Vec<String>,
    /// Bytes the A/B tensors take in memory (for the resident-cache budget).
    pub size_bytes: usize,
    /// The pairs as the CPU delta pass reads them, built on first use ([`packed`]).
    pub packed: packed::PackedCell,
}

impl LoraAdapter {
    /// The adapter's table for the CPU delta pass, when its pairs are views of one buffer.
    pub fn packed(&self) -> Option<&packed::PackedAdapter> {
        self.packed.get_or_build(self)
    }
}

#[cfg(test)]
impl LoraAdapter {
    /// An adapter with no layers that claims `size_bytes`: for tests of the caches, which only
    /// look at identity and size.
    pub(crate) fn empty_for_tests(size_bytes: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            layers: Vec::new(),
            rank: 1,
            alpha: 1.0,
            use_rslora: false,
            target_modules: Vec::new(),
            size_bytes,
            packed: Default::default(),
        })
    }
}
