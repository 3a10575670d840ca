//! The two objectives, on target-token log-probabilities from [`super::forward`]:
//! SFT cross-entropy over completion tokens only (TRL's completion-only loss), and DPO's
//! sigmoid loss against the frozen base as reference (TRL's behaviour with a PEFT model).

use candle_core::{Result, Tensor};

/// Sum of −log p over the target tokens, divided by `normalizer` (the number of target
/// tokens in the whole optimizer step, so accumulated micro-batches give the step's mean).
pub fn sft_loss(logprobs: &Tensor, normalizer: usize) -> Result<Tensor> {
    (logprobs.sum_all()?.neg()? / normalizer.max(1) as f64)?.reshape(())
}

/// Per-sequence sums of `logprobs` (concatenated targets of each sequence, `counts[i]` each):
/// log π(y|x) for a completion is the sum over its tokens.
pub fn sequence_sums(logprobs: &Tensor, counts: &[usize]) -> Result<Tensor> {
    let mut sums = Vec::with_capacity(counts.len());
    let mut offset = 0;
    for &c in counts {
        sums.push(logprobs.narrow(0, offset, c)?.sum_all()?);
        offset += c;
    }
    Tensor::stack(&sums, 0)
}

/// log σ(x) without overflow and with the exact derivative 1 − σ(x) everywhere (DPO starts at
/// x = 0 exactly, so a kinked formula such as min(x, 0) − log(1 + e^{−|x|}) would give the
/// first step a wrong gradient): −log(1 + e^{−x}) for x ≥ 0, x − log(1 + e^{x}) below.
/// Each branch sees its input clamped at ±80 so the branch not taken stays finite.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let xa = x.maximum(-80f64)?;
    let a = (xa.neg()?.exp()? + 1.0)?.log()?.neg()?;
    let xb = x.minimum(80f64)?;
    let b = (&xb - (xb.exp()? + 1.0)?.log()?)?;
    x.ge(0f64)?.where_cond(&a, &b)
}

/// What the DPO loss and its monitoring numbers are made of, per pair: log-probabilities of
/// the chosen and rejected completions under the policy (differentiable) and the reference.
pub struct DpoInputs<'a> {
    pub policy_chosen: &'a Tensor,
    pub policy_rejected: &'a Tensor,
    pub ref_chosen: &'a Tensor,
    pub ref_rejected: &'a Tensor,
}

/// Batch statistics TRL reports for DPO (means over the pairs).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct DpoStats {
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub reward_margin: f64,
    pub reward_accuracy: f64,
}

/// −log σ(β·((πc − rc) − (πr − rr))) summed over the pairs and divided by `normalizer` (pairs
/// in the optimizer step); also the per-pair rewards β(π − r), summed for averaging later.
pub fn dpo_loss(x: &DpoInputs<'_>, beta: f64, normalizer: usize) -> Result<(Tensor, DpoStats)> {
    let chosen = ((x.policy_chosen - x.ref_chosen)? * beta)?;
    let rejected = ((x.policy_rejected - x.ref_rejected)? * beta)?;
    let logits = (&chosen - &rejected)?;
    let loss = (log_sigmoid(&logits)?.sum_all()?.neg()? / normalizer.max(1) as f64)?;
    let c: Vec<f32> = chosen.detach().to_vec1()?;
    let r: Vec<f32> = rejected.detach().to_vec1()?;
    let mut stats = DpoStats::default();
    for (c, r) in c.iter().zip(&r) {
        stats.chosen_reward += *c as f64;
        stats.rejected_reward += *r as f64;
        stats.reward_margin += (*c - *r) as f64;
        stats.reward_accuracy += if c > r { 1.0 } else { 0.0 };
    }
    Ok((loss, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn sft_loss_is_the_mean_negative_logprob_over_the_step() {
        // -(−0.5 − 1.5 − 1.0) / 4 = 0.75 (the 4th target of the step is in another micro-batch)
        let l = sft_loss(&t(&[-0.5, -1.5, -1.0]), 4).unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - 0.75).abs() < 1e-6);
    }

    #[test]
    fn sequence_sums_split_by_counts() {
        let s = sequence_sums(&t(&[1., 2., 3., 4., 5.]), &[2, 3]).unwrap();
        assert_eq!(s.to_vec1::<f32>().unwrap(), vec![3., 12.]);
    }

    #[test]
    fn dpo_loss_matches_the_reference_formula() {
        // Reference (Python, math module, TRL's sigmoid loss):
        //   beta = 0.1
        //   pairs (pc, pr, rc, rr) = (-10, -12, -11, -11), (-5, -4, -5, -5)
        //   logits = 0.1*((pc-rc)-(pr-rr)) = 0.1*(1-(-1)) = 0.2 ; 0.1*(0-1) = -0.1
        //   loss = mean(-log(sigmoid(l))) = (0.598138869381 + 0.744396660073) / 2 = 0.671267764727
        let pc = t(&[-10., -5.]);
        let pr = t(&[-12., -4.]);
        let rc = t(&[-11., -5.]);
        let rr = t(&[-11., -5.]);
        let inputs = DpoInputs {
            policy_chosen: &pc,
            policy_rejected: &pr,
            ref_chosen: &rc,
            ref_rejected: &rr,
        };
        let (loss, stats) = dpo_loss(&inputs, 0.1, 2).unwrap();
        let loss = loss.to_scalar::<f32>().unwrap();
        assert!((loss - 0.671_267_76).abs() < 1e-5, "{loss}");
        // rewards: chosen 0.1*1 + 0.1*0 = 0.1, rejected 0.1*(-1) + 0.1*1 = 0.0 (sums over pairs)
        assert!((stats.chosen_reward - 0.1).abs() < 1e-6);
        assert!((stats.rejected_reward - 0.0).abs() < 1e-6);
        assert!((stats.reward_margin - 0.1).abs() < 1e-6);
        assert_eq!(stats.reward_accuracy, 1.0);
    }

    #[test]
    fn log_sigmoid_is_stable_and_differentiable() {
        let x = Var::from_tensor(&t(&[-80.0, -1.0, 0.0, 2.0, 80.0])).unwrap();
        let y = log_sigmoid(x.as_tensor()).unwrap();
        let v = y.to_vec1::<f32>().unwrap();
        // log σ(x) for the inputs above, from Python: -80, -1.3132617, -0.6931472, -0.1269280, ~-1.8e-35
        let want = [
            -80.0,
            -1.313_261_7,
            -std::f32::consts::LN_2,
            -0.126_928,
            0.0,
        ];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{v:?}");
        }
        // d/dx log σ(x) = 1 − σ(x): 1, 0.7310586, 0.5, 0.1192029, ~0
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let want = [1.0, 0.731_058_6, 0.5, 0.119_202_9, 0.0];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{g:?}");
        }
    }
}
