//! The step loop: picks each optimizer step's examples (a seeded shuffle per epoch, so the
//! same seed and data train the same adapter, and a resumed job continues exactly where its
//! checkpoint left off), splits them into micro-batches under a token budget, accumulates
//! gradients normalised over the whole step, clips, and applies AdamW at the scheduled rate.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Result, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::checkpoint::Checkpoint;
use super::data::{DpoExample, Examples, SftExample};
use super::forward::{target_logprobs, Scored};
use super::hyper::Hyper;
use super::loss::{dpo_loss, sequence_sums, sft_loss, DpoInputs, DpoStats};
use super::optim::{clip_grad_norm, AdamW};
use super::params::TrainableLora;
use crate::engine::lora::LoraAdapter;
use crate::engine::model::Llama;

/// Tokens one forward/backward pass may hold; a step's examples are split into micro-batches
/// under this budget (an example longer than it still runs, alone). Bounds activation memory
/// whatever `batch_size` is, without changing the result: losses are normalised per step.
const MICRO_BATCH_TOKENS: usize = 2048;

/// What one optimizer step did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepReport {
    /// Steps completed, this one included.
    pub step: usize,
    pub total_steps: usize,
    /// Fractional epochs completed.
    pub epoch: f64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    /// Tokens through the trainable forward this step.
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Means over the step's pairs (DPO only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoStats>,
}

pub struct Trainer {
    model: Arc<Llama>,
    hyper: Hyper,
    examples: Examples,
    lora: TrainableLora,
    opt: AdamW,
    step: usize,
    total_steps: usize,
    /// Reference log-probabilities (chosen, rejected) per DPO example: the reference is the
    /// frozen base, so each is computed once.
    ref_logps: HashMap<usize, (f32, f32)>,
}

impl Trainer {
    pub fn new(model: Arc<Llama>, hyper: Hyper, examples: Examples) -> Result<Self> {
        if examples.is_empty() {
            candle_core::bail!("no training examples");
        }
        let lora = TrainableLora::init(&model, &hyper, model.device())?;
        let vars: Vec<_> = lora.named_vars().into_iter().map(|(_, v)| v).collect();
        let opt = AdamW::new(&vars, hyper.weight_decay)?;
        let total_steps = hyper.total_steps(examples.len());
        Ok(Self {
            model,
            hyper,
            examples,
            lora,
            opt,
            step: 0,
            total_steps,
            ref_logps: HashMap::new(),
        })
    }

    pub fn hyper(&self) -> &Hyper {
        &self.hyper
    }

    pub fn steps_done(&self) -> usize {
        self.step
    }

    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.total_steps
    }

    pub fn lora(&self) -> &TrainableLora {
        &self.lora
    }

    /// The trained adapter in serving form (a detached copy).
    pub fn adapter(&self) -> Result<LoraAdapter> {
        self.lora.to_adapter()
    }

    /// Example indices of optimizer step `step`: slots step·B .. step·B + B of the endless
    /// sequence of epochs, each epoch a permutation seeded by (seed, epoch).
    fn step_indices(&self, step: usize) -> Vec<usize> {
        let n = self.examples.len();
        let b = self.hyper.batch_size;
        let mut out = Vec::with_capacity(b);
        let mut perm: Option<(usize, Vec<usize>)> = None;
        for slot in step * b..step * b + b {
            let epoch = slot / n;
            if perm.as_ref().map(|(e, _)| *e) != Some(epoch) {
                let mut p: Vec<usize> = (0..n).collect();
                let seed = self.hyper.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                p.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
                perm = Some((epoch, p));
            }
            if let Some((_, p)) = &perm {
                out.push(p[slot % n]);
            }
        }
        out
    }

    /// Runs one optimizer step.
    pub fn step(&mut self) -> Result<StepReport> {
        if self.is_done() {
            candle_core::bail!("training already finished");
        }
        let started = Instant::now();
        let indices = self.step_indices(self.step);
        let named = self.lora.named_vars();
        let vars: Vec<_> = named.iter().map(|(_, v)| *v).collect();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut accumulate = |store: &candle_core::backprop::GradStore| -> Result<()> {
            for (slot, var) in grads.iter_mut().zip(&vars) {
                if let Some(g) = store.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    });
                }
            }
            Ok(())
        };
        let (loss, tokens, dpo) = match &self.examples {
            Examples::Sft(all) => {
                let batch: Vec<&SftExample> = indices.iter().map(|&i| &all[i]).collect();
                let (loss, tokens) = sft_step(&self.model, &self.lora, &batch, &mut accumulate)?;
                (loss, tokens, None)
            }
            Examples::Dpo(all) => {
                let batch: Vec<(usize, &DpoExample)> =
                    indices.iter().map(|&i| (i, &all[i])).collect();
                let (loss, tokens, stats) = dpo_step(
                    &self.model,
                    &self.lora,
                    &batch,
                    self.hyper.beta,
                    &mut self.ref_logps,
                    &mut accumulate,
                )?;
                (loss, tokens, Some(stats))
            }
        };
        let mut grads = grads
            .into_iter()
            .zip(&vars)
            .map(|(g, v)| match g {
                Some(g) => Ok(g),
                None => v.as_tensor().zeros_like(),
            })
            .collect::<Result<Vec<_>>>()?;
        let grad_norm = clip_grad_norm(&mut grads, self.hyper.max_grad_norm)?;
        let lr = self.hyper.lr_at(self.step, self.total_steps);
        self.opt.step(&vars, &grads, lr)?;
        self.step += 1;
        let seconds = started.elapsed().as_secs_f64();
        let n = self.examples.len() as f64;
        Ok(StepReport {
            step: self.step,
            total_steps: self.total_steps,
            epoch: (self.step * self.hyper.batch_size) as f64 / n,
            loss,
            learning_rate: lr,
            grad_norm,
            tokens,
            seconds,
            tokens_per_s: tokens as f64 / seconds.max(1e-9),
            dpo,
        })
    }

    /// The state a resume needs.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let mut ck = Checkpoint {
            step: self.step,
            adam_t: self.opt.t,
            hyper: serde_json::to_string(&self.hyper).unwrap_or_default(),
            vars: HashMap::new(),
            adam_m: HashMap::new(),
            adam_v: HashMap::new(),
        };
        for (i, (name, var)) in self.lora.named_vars().into_iter().enumerate() {
            ck.vars
                .insert(name.clone(), var.as_tensor().detach().copy()?);
            ck.adam_m.insert(name.clone(), self.opt.m[i].clone());
            ck.adam_v.insert(name, self.opt.v[i].clone());
        }
        Ok(ck)
    }

    /// Continues from `ck`, which must come from a job with the same hyperparameters.
    pub fn restore(&mut self, ck: &Checkpoint) -> anyhow::Result<()> {
        let hyper = serde_json::to_string(&self.hyper)?;
        anyhow::ensure!(
            ck.hyper == hyper,
            "the checkpoint was written with other hyperparameters"
        );
        anyhow::ensure!(
            ck.step <= self.total_steps,
            "the checkpoint is at step {} of a {}-step job",
            ck.step,
            self.total_steps
        );
        let named = self.lora.named_vars();
        for (i, (name, var)) in named.iter().enumerate() {
            let get = |map: &HashMap<String, Tensor>| -> anyhow::Result<Tensor> {
                let t = map
                    .get(name)
                    .ok_or_else(|| anyhow::anyhow!("the checkpoint lacks {name}"))?;
                anyhow::ensure!(
                    t.dims() == var.as_tensor().dims(),
                    "checkpoint tensor {name} has shape {:?}, expected {:?}",
                    t.dims(),
                    var.as_tensor().dims()
                );
                // Checkpoints are read onto the CPU; the parameters live on the model's device.
                Ok(t.to_device(self.model.device())?)
            };
            var.set(&get(&ck.vars)?)?;
            self.opt.m[i] = get(&ck.adam_m)?;
            self.opt.v[i] = get(&ck.adam_v)?;
        }
        self.opt.t = ck.adam_t;
        self.step = ck.step;
        Ok(())
    }

    /// Writes a checkpoint of the current state to `path`.
    pub fn save_checkpoint(&self, path: &Path) -> anyhow::Result<()> {
        self.checkpoint()?.save(path)
    }
}

/// Splits items into consecutive groups whose token counts stay under the budget.
fn micro_batches<T>(items: &[T], tokens: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, it) in items.iter().enumerate() {
        let t = tokens(it);
        if i > start && used + t > MICRO_BATCH_TOKENS {
            out.push(&items[start..i]);
            start = i;
            used = 0;
        }
        used += t;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// SFT: mean cross-entropy over the step's target tokens. Returns (loss, tokens).
fn sft_step(
    model: &Llama,
    lora: &TrainableLora,
    batch: &[&SftExample],
    accumulate: &mut impl FnMut(&candle_core::backprop::GradStore) -> Result<()>,
) -> Result<(f64, usize)> {
    let normalizer: usize = batch
        .iter()
        .map(|e| e.targets.iter().filter(|t| **t).count())
        .sum();
    let (mut loss_sum, mut tokens) = (0f64, 0usize);
    for mb in micro_batches(batch, |e| e.tokens.len()) {
        let seqs: Vec<Scored<'_>> = mb
            .iter()
            .map(|e| Scored {
                tokens: &e.tokens,
                targets: &e.targets,
            })
            .collect();
        tokens += mb.iter().map(|e| e.tokens.len()).sum::<usize>();
        let logp = target_logprobs(model, Some(lora), &seqs)?;
        if logp.elem_count() == 0 {
            continue;
        }
        let loss = sft_loss(&logp, normalizer)?;
        loss_sum += loss.to_scalar::<f32>()? as f64;
        accumulate(&loss.backward()?)?;
    }
    Ok((loss_sum, tokens))
}

/// The two sequences of a pair: prompt+chosen and prompt+rejected, targets on the completions.
fn pair_sequences(e: &DpoExample) -> [(Vec<u32>, Vec<bool>); 2] {
    let seq = |completion: &[u32]| {
        let mut tokens = e.prompt.clone();
        tokens.extend_from_slice(completion);
        let mut targets = vec![false; e.prompt.len()];
        targets.extend(std::iter::repeat_n(true, completion.len()));
        (tokens, targets)
    };
    [seq(&e.chosen), seq(&e.rejected)]
}

/// Summed completion log-probabilities, [pairs, 2] (chosen, rejected), under the policy
/// (`lora`) or the reference (`None`).
fn pair_logps(
    model: &Llama,
    lora: Option<&TrainableLora>,
    seqs: &[(Vec<u32>, Vec<bool>)],
) -> Result<Tensor> {
    let scored: Vec<Scored<'_>> = seqs
        .iter()
        .map(|(t, m)| Scored {
            tokens: t,
            targets: m,
        })
        .collect();
    let counts: Vec<usize> = seqs
        .iter()
        .map(|(_, m)| m.iter().filter(|t| **t).count())
        .collect();
    let logp = target_logprobs(model, lora, &scored)?;
    sequence_sums(&logp, &counts)?.reshape((seqs.len() / 2, 2))
}

/// DPO: the sigmoid loss averaged over the step's pairs. Returns (loss, tokens, mean stats).
fn dpo_step(
    model: &Llama,
    lora: &TrainableLora,
    batch: &[(usize, &DpoExample)],
    beta: f64,
    ref_cache: &mut HashMap<usize, (f32, f32)>,
    accumulate: &mut impl FnMut(&candle_core::backprop::GradStore) -> Result<()>,
) -> Result<(f64, usize, DpoStats)> {
    let pairs = batch.len();
    let mut total = DpoStats::default();
    let (mut loss_sum, mut tokens) = (0f64, 0usize);
    let pair_tokens =
        |(_, e): &(usize, &DpoExample)| 2 * e.prompt.len() + e.chosen.len() + e.rejected.len();
    for mb in micro_batches(batch, pair_tokens) {
        let seqs: Vec<(Vec<u32>, Vec<bool>)> =
            mb.iter().flat_map(|(_, e)| pair_sequences(e)).collect();
        tokens += seqs.iter().map(|(t, _)| t.len()).sum::<usize>();
        // Reference log-probabilities of pairs not seen yet, without a graph.
        let missing: Vec<usize> = (0..mb.len())
            .filter(|&i| !ref_cache.contains_key(&mb[i].0))
            .collect();
        if !missing.is_empty() {
            let ref_seqs: Vec<(Vec<u32>, Vec<bool>)> = missing
                .iter()
                .flat_map(|&i| seqs[2 * i..2 * i + 2].iter().cloned())
                .collect();
            let r = pair_logps(model, None, &ref_seqs)?
                .detach()
                .to_vec2::<f32>()?;
            for (&i, row) in missing.iter().zip(r) {
                ref_cache.insert(mb[i].0, (row[0], row[1]));
            }
        }
        let mut refs = Vec::with_capacity(mb.len() * 2);
        for (idx, _) in mb {
            let (c, r) = ref_cache
                .get(idx)
                .copied()
                .ok_or_else(|| candle_core::Error::Msg("reference log-prob missing".into()))?;
            refs.extend([c, r]);
        }
        let refs = Tensor::from_vec(refs, (mb.len(), 2), model.device())?;
        let policy = pair_logps(model, Some(lora), &seqs)?;
        let col = |t: &Tensor, i: usize| t.narrow(1, i, 1).and_then(|c| c.squeeze(1));
        let (pc, pr) = (col(&policy, 0)?, col(&policy, 1)?);
        let (rc, rr) = (col(&refs, 0)?, col(&refs, 1)?);
        let inputs = DpoInputs {
            policy_chosen: &pc,
            policy_rejected: &pr,
            ref_chosen: &rc,
            ref_rejected: &rr,
        };
        let (loss, stats) = dpo_loss(&inputs, beta, pairs)?;
        loss_sum += loss.to_scalar::<f32>()? as f64;
        total.chosen_reward += stats.chosen_reward;
        total.rejected_reward += stats.rejected_reward;
        total.reward_margin += stats.reward_margin;
        total.reward_accuracy += stats.reward_accuracy;
        accumulate(&loss.backward()?)?;
    }
    let n = pairs.max(1) as f64;
    let mean = DpoStats {
        chosen_reward: total.chosen_reward / n,
        rejected_reward: total.rejected_reward / n,
        reward_margin: total.reward_margin / n,
        reward_accuracy: total.reward_accuracy / n,
    };
    Ok((loss_sum, tokens, mean))
}
