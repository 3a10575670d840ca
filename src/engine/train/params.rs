//! The trainable LoRA parameters: per layer and target module a pair A [r, in], B [out, r] as
//! candle `Var`s, initialised as PEFT does (A Kaiming-uniform, B zero, so training starts from
//! the base exactly), and their conversion to the serving [`LoraAdapter`].

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::hyper::Hyper;
use crate::engine::lora::{LayerLora, LoraAdapter, LoraPair, Module};
use crate::engine::model::Llama;

/// One trainable projection.
#[derive(Clone, Debug)]
pub struct TrainPair {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

/// All trainable pairs: `layers[l][module.index()]`.
#[derive(Clone, Debug)]
pub struct TrainableLora {
    pub layers: Vec<[Option<TrainPair>; 7]>,
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub target_modules: Vec<String>,
}

/// (out, in) of a projection in `model`.
fn dims(model: &Llama, layer: usize, m: Module) -> (usize, usize) {
    let l = &model.layers[layer];
    let lin = match m {
        Module::Q => &l.attn.q_proj,
        Module::K => &l.attn.k_proj,
        Module::V => &l.attn.v_proj,
        Module::O => &l.attn.o_proj,
        Module::Gate => &l.mlp.gate_proj,
        Module::Up => &l.mlp.up_proj,
        Module::Down => &l.mlp.down_proj,
    };
    (lin.out_features(), lin.in_features())
}

impl TrainableLora {
    /// Fresh parameters for `model`, reproducible from `hyper.seed`. A follows PEFT's
    /// `kaiming_uniform_(a=√5)`, i.e. U(−1/√in, 1/√in); B starts at zero.
    pub fn init(model: &Llama, hyper: &Hyper, device: &Device) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(hyper.seed);
        let modules = hyper.modules();
        let scale = hyper.scale();
        let mut layers = Vec::with_capacity(model.layers.len());
        for li in 0..model.layers.len() {
            let mut pairs: [Option<TrainPair>; 7] = Default::default();
            for &m in &modules {
                let (out, inp) = dims(model, li, m);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..hyper.rank * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (hyper.rank, inp), device)?)?;
                let b = Var::zeros((out, hyper.rank), DType::F32, device)?;
                pairs[m.index()] = Some(TrainPair { a, b, scale });
            }
            layers.push(pairs);
        }
        Ok(Self {
            layers,
            rank: hyper.rank,
            alpha: hyper.alpha,
            use_rslora: hyper.use_rslora,
            target_modules: hyper.target_modules.clone(),
        })
    }

    /// Every trainable variable with a stable name (`{layer}.{module}.{a|b}`), in a fixed order.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for (li, pairs) in self.layers.iter().enumerate() {
            for m in Module::ALL {
                if let Some(p) = &pairs[m.index()] {
                    out.push((format!("{li}.{}.a", m.hf_name()), &p.a));
                    out.push((format!("{li}.{}.b", m.hf_name()), &p.b));
                }
            }
        }
        out
    }

    pub fn get(&self, layer: usize, m: Module) -> Option<&TrainPair> {
        self.layers.get(layer).and_then(|p| p[m.index()].as_ref())
    }

    /// A detached copy in the serving representation.
    pub fn to_adapter(&self) -> Result<LoraAdapter> {
        let mut size_bytes = 0;
        let mut layers = Vec::with_capacity(self.layers.len());
        for pairs in &self.layers {
            let mut l = LayerLora::default();
            for m in Module::ALL {
                if let Some(p) = &pairs[m.index()] {
                    let a = p.a.as_tensor().detach().copy()?;
                    let b = p.b.as_tensor().detach().copy()?;
                    size_bytes += (a.elem_count() + b.elem_count()) * 4;
                    l.modules[m.index()] = Some(LoraPair {
                        a,
                        b,
                        scale: p.scale,
                        int8: None,
                    });
                }
            }
            layers.push(l);
        }
        Ok(LoraAdapter {
            layers,
            rank: self.rank,
            alpha: self.alpha,
            use_rslora: self.use_rslora,
            target_modules: self.target_modules.clone(),
            size_bytes,
            packed: Default::default(),
        })
    }
}
