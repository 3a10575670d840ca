//! AdamW (decoupled weight decay, bias-corrected moments — PyTorch's `torch.optim.AdamW`) over
//! the LoRA variables, with global-norm gradient clipping. Written here rather than taken from
//! candle-nn because checkpoints need the moment estimates, which candle's optimizer keeps
//! private.

use candle_core::{Result, Tensor, Var};

pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.999;
pub const EPS: f64 = 1e-8;

/// Moment estimates for each variable, in the order the variables are given.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Updates applied so far (for bias correction).
    pub t: usize,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: &[&Var], weight_decay: f64) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            m,
            v,
            t: 0,
            weight_decay,
        })
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `vars[i]`.
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        if vars.len() != grads.len() || vars.len() != self.m.len() {
            candle_core::bail!("optimizer state does not match the variables");
        }
        self.t += 1;
        let bc1 = 1.0 - BETA1.powi(self.t as i32);
        let bc2 = 1.0 - BETA2.powi(self.t as i32);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * BETA1)? + (g * (1.0 - BETA1))?)?;
            let v = ((&self.v[i] * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let p = var.as_tensor();
            let decayed = (p * (1.0 - lr * self.weight_decay))?;
            let update = ((m_hat / (v_hat.sqrt()? + EPS)?)? * lr)?;
            var.set(&(decayed - update)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping (what trainers log as `grad_norm`).
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if norm > max_norm && norm.is_finite() {
        let factor = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * factor)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_pytorch_on_two_steps() {
        // Reference: torch.optim.AdamW([p], lr=0.1, weight_decay=0.01) with p = [1.0, -2.0],
        // grads [0.5, -1.0] then [0.1, 0.3]. By hand (the same formulas):
        //   step 1: m̂ = g, v̂ = g², update = lr·g/(|g|+eps) = ±0.1; decay p·(1−0.001)
        //           p = [0.999 − 0.1, −1.998 + 0.1] = [0.899, −1.898]
        //   step 2: m = 0.9·m₁ + 0.1·g with m₁ = 0.1·g₁ = [0.05, −0.1] -> [0.055, −0.06];
        //           v = 0.999·v₁ + 0.001·g² with v₁ = 0.001·g₁² -> [0.00025975, 0.00108909];
        //           m̂ = m/0.19, v̂ = v/0.001999
        //           p = p·0.999 − 0.1·m̂/(√v̂ + 1e-8)
        let dev = Device::Cpu;
        let p = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let mut opt = AdamW::new(&[&p], 0.01).unwrap();
        opt.step(&[&p], &[Tensor::new(&[0.5f32, -1.0], &dev).unwrap()], 0.1)
            .unwrap();
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (got[0] - 0.899).abs() < 1e-6 && (got[1] + 1.898).abs() < 1e-6,
            "{got:?}"
        );
        opt.step(&[&p], &[Tensor::new(&[0.1f32, 0.3], &dev).unwrap()], 0.1)
            .unwrap();
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        let want =
            |p: f64, m: f64, v: f64| p * 0.999 - 0.1 * (m / 0.19) / ((v / 0.001_999).sqrt() + 1e-8);
        let w0 = want(0.899, 0.055, 0.999 * 0.000_25 + 0.001 * 0.01);
        let w1 = want(-1.898, -0.06, 0.999 * 0.001 + 0.001 * 0.09);
        assert!((got[0] as f64 - w0).abs() < 1e-5, "{got:?} vs {w0}");
        assert!((got[1] as f64 - w1).abs() < 1e-5, "{got:?} vs {w1}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let dev = Device::Cpu;
        let mut g = vec![
            Tensor::new(&[3.0f32], &dev).unwrap(),
            Tensor::new(&[4.0f32], &dev).unwrap(),
        ];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let a = g[0].to_vec1::<f32>().unwrap()[0];
        let b = g[1].to_vec1::<f32>().unwrap()[0];
        assert!(((a * a + b * b).sqrt() - 1.0).abs() < 1e-5);
        let mut small = vec![Tensor::new(&[0.3f32], &dev).unwrap()];
        clip_grad_norm(&mut small, 1.0).unwrap();
        assert_eq!(small[0].to_vec1::<f32>().unwrap(), vec![0.3]);
    }
}
