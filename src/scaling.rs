//! Scaling-law planner: given a training budget of C FLOPs, how many parameters N and training
//! tokens D, and what loss, according to the published laws. Rule of thumb (20 tokens per
//! parameter), the Chinchilla parametric fit L(N, D) = E + A/N^α + B/D^β with two named constant
//! sets (Hoffmann et al. 2022 as printed; Besiroglu et al. 2024, Epoch AI's replication), its
//! compute-optimal allocation, Kaplan et al. 2020 for comparison, and the inference-aware optimum
//! of Sardana et al. 2024 for a model that will serve T tokens in its lifetime. C = 6·N·D
//! throughout; losses are in nats per token. Pure functions plus the `adapterd chinchilla` CLI
//! (`ChinchillaArgs`, `run_cli`, `render_table`); no I/O, no HTTP (that is `api::chinchilla`).

use std::fmt::Write as _;
use std::str::FromStr;

use serde::Serialize;

/// Tokens per parameter of the Chinchilla rule of thumb.
pub const RULE_TOKENS_PER_PARAM: f64 = 20.0;

/// One FLOP budget C costs 6·N·D to train N parameters on D tokens.
const FLOPS_PER_PARAM_TOKEN: f64 = 6.0;

/// Serving one token costs about 2·N FLOPs (one forward pass).
const INFERENCE_FLOPS_PER_PARAM_TOKEN: f64 = 2.0;

/// A named set of constants for L(N, D) = E + A/N^α + B/D^β.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Fit {
    /// Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"), values as printed.
    #[default]
    #[value(name = "hoffmann2022")]
    Hoffmann2022,
    /// Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt", Epoch AI).
    #[value(name = "besiroglu2024")]
    Besiroglu2024,
}

impl Fit {
    /// Every fit, in the order the API documents them.
    pub const ALL: [Fit; 2] = [Fit::Hoffmann2022, Fit::Besiroglu2024];

    /// The name used in the API, the CLI and the JSON (`hoffmann2022`, `besiroglu2024`).
    pub fn name(self) -> &'static str {
        match self {
            Fit::Hoffmann2022 => "hoffmann2022",
            Fit::Besiroglu2024 => "besiroglu2024",
        }
    }

    /// Where the constants come from, for humans.
    pub fn source(self) -> &'static str {
        match self {
            Fit::Hoffmann2022 => "Hoffmann et al. 2022, constants as printed",
            Fit::Besiroglu2024 => "Besiroglu et al. 2024, Epoch AI replication",
        }
    }

    pub fn constants(self) -> Constants {
        match self {
            Fit::Hoffmann2022 => Constants {
                e: 1.69,
                a: 406.4,
                b: 410.7,
                alpha: 0.34,
                beta: 0.28,
            },
            Fit::Besiroglu2024 => Constants {
                e: 1.8172,
                a: 482.01,
                b: 2085.43,
                alpha: 0.3478,
                beta: 0.3658,
            },
        }
    }
}

impl std::fmt::Display for Fit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Fit {
    type Err = ScalingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fit::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| ScalingError::UnknownFit(s.to_string()))
    }
}

/// The constants of L(N, D) = E + A/N^α + B/D^β; serialised as `{"E","A","B","alpha","beta"}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Constants {
    #[serde(rename = "E")]
    pub e: f64,
    #[serde(rename = "A")]
    pub a: f64,
    #[serde(rename = "B")]
    pub b: f64,
    pub alpha: f64,
    pub beta: f64,
}

impl Constants {
    /// L(N, D) in nats per token.
    pub fn loss(&self, params: f64, tokens: f64) -> f64 {
        self.e + self.a / params.powf(self.alpha) + self.b / tokens.powf(self.beta)
    }

    /// The (N, D) minimising L(N, D) subject to 6·N·D = C:
    /// G = (αA/(βB))^(1/(α+β)), N = G·(C/6)^(β/(α+β)), D = G⁻¹·(C/6)^(α/(α+β)).
    pub fn compute_optimal(&self, flops: f64) -> (f64, f64) {
        let s = self.alpha + self.beta;
        let g = (self.alpha * self.a / (self.beta * self.b)).powf(1.0 / s);
        let c6 = flops / FLOPS_PER_PARAM_TOKEN;
        (g * c6.powf(self.beta / s), c6.powf(self.alpha / s) / g)
    }

    /// The parameter count that reaches `loss` with `tokens` training tokens, if any:
    /// N = (A / (ℓ − E − B/D^β))^(1/α). `None` when even infinitely many parameters fall short.
    pub fn params_for_loss(&self, loss: f64, tokens: f64) -> Option<f64> {
        self.params_for_reducible_loss(loss - self.e, tokens)
    }

    /// As [`Self::params_for_loss`], given the reducible loss ℓ − E itself, which keeps its
    /// precision when ℓ is within rounding of E (huge budgets).
    fn params_for_reducible_loss(&self, reducible: f64, tokens: f64) -> Option<f64> {
        let room = reducible - self.b / tokens.powf(self.beta);
        (room > 0.0).then(|| (self.a / room).powf(1.0 / self.alpha))
    }
}

/// The Chinchilla rule of thumb, D = 20·N and 6·N·D = C: N = sqrt(C/120), D = 20·N.
pub fn rule_of_thumb(flops: f64) -> (f64, f64) {
    let n = (flops / (FLOPS_PER_PARAM_TOKEN * RULE_TOKENS_PER_PARAM)).sqrt();
    (n, RULE_TOKENS_PER_PARAM * n)
}

/// Kaplan et al. 2020: N = 1.3e9 · C_min^0.73 with C_min in PF-days (1 PF-day = 8.64e19 FLOPs).
pub fn kaplan2020_params(flops: f64) -> f64 {
    1.3e9 * (flops / 8.64e19).powf(0.73)
}

/// The inference-aware optimum of Sardana et al. 2024 ("Beyond Chinchilla-Optimal").
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct InferenceAware {
    /// T, the tokens the model will serve in its lifetime.
    pub inference_tokens: f64,
    /// ℓ, the loss of the compute-optimal model at C; the inference-aware model matches it.
    pub loss_target: f64,
    pub params: f64,
    pub tokens: f64,
    /// 6·N·D.
    pub train_flops: f64,
    /// 2·N·T.
    pub inference_flops: f64,
    pub total_flops: f64,
    /// 1 − total / (C + 2·N_opt·T): the fraction of the compute-optimal model's lifetime cost
    /// (training at C plus serving T tokens) saved. 0 when T = 0.
    pub saving_vs_compute_optimal: f64,
    /// C + 2·N_opt·T, the lifetime cost of the compute-optimal model (not in the JSON).
    #[serde(skip)]
    pub compute_optimal_total_flops: f64,
}

/// Minimises 6·N·D + 2·N·T subject to L(N, D) = ℓ, ℓ being the compute-optimal loss at `flops`.
///
/// On the constraint N(D) = (A/(ℓ − E − B·D^−β))^(1/α); with u = ln D the cost's stationarity
/// condition is g(u) = 6D/(6D + 2T) − βB·D^−β / (α·(ℓ − E − B·D^−β)) = 0. The first term rises
/// with D and the second falls, so g is strictly increasing from −∞ (where N(D) → ∞) to 1: one
/// root, found by bisection in u down to adjacent floats. g is evaluated in log space, so a huge
/// T cannot overflow it. At T = 0 the answer is the compute-optimal point itself.
pub fn inference_aware(k: &Constants, flops: f64, inference_tokens: f64) -> InferenceAware {
    let (n_opt, d_opt) = k.compute_optimal(flops);
    let target = k.loss(n_opt, d_opt);
    let base_total = flops + INFERENCE_FLOPS_PER_PARAM_TOKEN * n_opt * inference_tokens;
    if inference_tokens == 0.0 {
        return InferenceAware {
            inference_tokens,
            loss_target: target,
            params: n_opt,
            tokens: d_opt,
            train_flops: flops,
            inference_flops: 0.0,
            total_flops: flops,
            saving_vs_compute_optimal: 0.0,
            compute_optimal_total_flops: flops,
        };
    }
    // T/(3D) = exp(ln T − ln 3 − u); zero when T = 0.
    let ln_t3 = if inference_tokens > 0.0 {
        (inference_tokens / 3.0).ln()
    } else {
        f64::NEG_INFINITY
    };
    // ℓ − E summed from its terms, not subtracted: at large C it is far below E's last digit.
    let room = k.a / n_opt.powf(k.alpha) + k.b / d_opt.powf(k.beta);
    let g = |u: f64| -> f64 {
        let x = k.b * (-k.beta * u).exp();
        let r = room - x;
        if r <= 0.0 {
            return f64::NEG_INFINITY;
        }
        1.0 / (1.0 + (ln_t3 - u).exp()) - k.beta * x / (k.alpha * r)
    };
    // Bracket: below, the D at which N(D) is infinite; above, D_opt stepped up until g ≥ 0.
    let mut lo = (k.b / room).ln() / k.beta;
    let mut hi = d_opt.ln();
    let mut step = 1.0;
    while g(hi) < 0.0 && hi.is_finite() {
        lo = hi;
        hi += step;
        step *= 2.0;
    }
    while lo.is_finite() && hi.is_finite() {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if g(mid) < 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let tokens = hi.exp();
    let params = k
        .params_for_reducible_loss(room, tokens)
        .unwrap_or(f64::INFINITY);
    let mut ia = InferenceAware {
        inference_tokens,
        loss_target: target,
        params,
        tokens,
        train_flops: FLOPS_PER_PARAM_TOKEN * params * tokens,
        inference_flops: INFERENCE_FLOPS_PER_PARAM_TOKEN * params * inference_tokens,
        total_flops: 0.0,
        saving_vs_compute_optimal: 0.0,
        compute_optimal_total_flops: base_total,
    };
    ia.total_flops = ia.train_flops + ia.inference_flops;
    // Rounding can leave the root a hair worse than the compute-optimal point (T ≈ 0): that
    // point is feasible, so the optimum never costs more than it.
    if ia.total_flops.is_finite() && base_total.is_finite() && ia.total_flops > base_total {
        ia.params = n_opt;
        ia.tokens = d_opt;
        ia.train_flops = flops;
        ia.inference_flops = INFERENCE_FLOPS_PER_PARAM_TOKEN * n_opt * inference_tokens;
        ia.total_flops = base_total;
    }
    ia.saving_vs_compute_optimal = 1.0 - ia.total_flops / base_total;
    ia
}

/// One (N, D) allocation of a budget and the fit's loss there.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Allocation {
    pub params: f64,
    pub tokens: f64,
    pub tokens_per_param: f64,
    pub loss: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Kaplan {
    pub params: f64,
}

/// Everything `GET /v1/chinchilla` answers; its JSON is the API's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Plan {
    pub flops: f64,
    pub fit: Fit,
    pub constants: Constants,
    pub rule_of_thumb: Allocation,
    pub compute_optimal: Allocation,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inference_aware: Option<InferenceAware>,
    pub kaplan2020: Kaplan,
}

/// Why no plan: each message names the input at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScalingError {
    #[error("flops must be a finite number greater than 0, got {0}")]
    InvalidFlops(f64),
    #[error("flops = {0:e} is out of range: the plan's numbers do not fit in a 64-bit float")]
    FlopsOutOfRange(f64),
    #[error("inference_tokens must be a finite number of tokens >= 0, got {0}")]
    InvalidInferenceTokens(f64),
    #[error(
        "inference_tokens = {0:e} is out of range: the plan's numbers do not fit in a 64-bit float"
    )]
    InferenceTokensOutOfRange(f64),
    #[error("fit `{0}` is unknown; use hoffmann2022 or besiroglu2024")]
    UnknownFit(String),
}

fn all_finite_positive(xs: &[f64]) -> bool {
    xs.iter().all(|x| x.is_finite() && *x > 0.0)
}

/// The whole plan for a budget of `flops`, with the inference-aware optimum when
/// `inference_tokens` is given. Refuses inputs that are not finite, `flops <= 0`,
/// `inference_tokens < 0`, and budgets whose answers overflow or underflow f64.
pub fn plan(flops: f64, fit: Fit, inference_tokens: Option<f64>) -> Result<Plan, ScalingError> {
    if !(flops.is_finite() && flops > 0.0) {
        return Err(ScalingError::InvalidFlops(flops));
    }
    if let Some(t) = inference_tokens {
        if !(t.is_finite() && t >= 0.0) {
            return Err(ScalingError::InvalidInferenceTokens(t));
        }
    }
    let k = fit.constants();
    let (rn, rd) = rule_of_thumb(flops);
    let (on, od) = k.compute_optimal(flops);
    let p = Plan {
        flops,
        fit,
        constants: k,
        rule_of_thumb: Allocation {
            params: rn,
            tokens: rd,
            tokens_per_param: RULE_TOKENS_PER_PARAM,
            loss: k.loss(rn, rd),
        },
        compute_optimal: Allocation {
            params: on,
            tokens: od,
            tokens_per_param: od / on,
            loss: k.loss(on, od),
        },
        inference_aware: None,
        kaplan2020: Kaplan {
            params: kaplan2020_params(flops),
        },
    };
    let (r, o) = (&p.rule_of_thumb, &p.compute_optimal);
    if !all_finite_positive(&[
        r.params,
        r.tokens,
        r.loss,
        o.params,
        o.tokens,
        o.tokens_per_param,
        o.loss,
        p.kaplan2020.params,
    ]) {
        return Err(ScalingError::FlopsOutOfRange(flops));
    }
    let Some(t) = inference_tokens else {
        return Ok(p);
    };
    let ia = inference_aware(&k, flops, t);
    let ok = all_finite_positive(&[ia.params, ia.tokens, ia.train_flops, ia.total_flops])
        && ia.inference_flops.is_finite()
        && ia.saving_vs_compute_optimal.is_finite()
        && ia.compute_optimal_total_flops.is_finite();
    if !ok {
        return Err(ScalingError::InferenceTokensOutOfRange(t));
    }
    Ok(Plan {
        inference_aware: Some(ia),
        ..p
    })
}

/// A count in human units with three significant digits: 9.13B, 183B, 41.7M, 2.15T; beyond
/// 999T (or below 1) in scientific notation, 1.23e15.
pub fn human_count(x: f64) -> String {
    const UNITS: [(f64, &str); 5] = [(1.0, ""), (1e3, "K"), (1e6, "M"), (1e9, "B"), (1e12, "T")];
    if !x.is_finite() || x < 1.0 {
        return format!("{x:.2e}");
    }
    for (scale, unit) in UNITS {
        let v = x / scale;
        let digits = if v >= 99.95 {
            0
        } else if v >= 9.995 {
            1
        } else {
            2
        };
        // Rounding may carry into the next unit (999.7M -> 1.00B).
        if format!("{v:.digits$}").parse::<f64>().unwrap_or(v) < 1000.0 {
            return format!("{v:.digits$}{unit}");
        }
    }
    format!("{x:.2e}")
}

/// A FLOP count in scientific notation with three significant digits, e.g. `1.00e22`.
pub fn human_flops(x: f64) -> String {
    format!("{x:.2e}")
}

/// The readable table `adapterd chinchilla` prints by default.
pub fn render_table(plan: &Plan) -> String {
    let k = &plan.constants;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Scaling-law plan for C = {} FLOPs (C = 6·N·D), fit {} ({})",
        human_flops(plan.flops),
        plan.fit,
        plan.fit.source()
    );
    let _ = writeln!(
        s,
        "L(N, D) = {} + {}/N^{} + {}/D^{}  (nats/token)\n",
        k.e, k.a, k.alpha, k.b, k.beta
    );
    let _ = writeln!(
        s,
        "{:<17} {:>14}  {:>14}  {:>12}  {:>7}",
        "allocation", "params", "tokens", "tokens/param", "loss"
    );
    let row = |s: &mut String, name: &str, a: &Allocation| {
        let _ = writeln!(
            s,
            "{:<17} {:>14}  {:>14}  {:>12.1}  {:>7.4}",
            name,
            format!("{} params", human_count(a.params)),
            format!("{} tokens", human_count(a.tokens)),
            a.tokens_per_param,
            a.loss
        );
    };
    row(&mut s, "rule of thumb", &plan.rule_of_thumb);
    row(&mut s, "compute-optimal", &plan.compute_optimal);
    let _ = writeln!(
        s,
        "{:<17} {:>14}  {:>14}  {:>12}  {:>7}",
        "kaplan2020",
        format!("{} params", human_count(plan.kaplan2020.params)),
        "-",
        "-",
        "-"
    );
    if let Some(ia) = &plan.inference_aware {
        let _ = writeln!(
            s,
            "\nInference-aware (Sardana et al. 2024) for {} lifetime inference tokens, same loss {:.4}:",
            human_count(ia.inference_tokens),
            ia.loss_target
        );
        let _ = writeln!(
            s,
            "  {} params, {} tokens ({:.1} tokens/param)",
            human_count(ia.params),
            human_count(ia.tokens),
            ia.tokens / ia.params
        );
        let _ = writeln!(
            s,
            "  training {} + inference {} = {} FLOPs",
            human_flops(ia.train_flops),
            human_flops(ia.inference_flops),
            human_flops(ia.total_flops)
        );
        let _ = writeln!(
            s,
            "  saving vs compute-optimal (lifetime {} FLOPs): {:.1}%",
            human_flops(ia.compute_optimal_total_flops),
            100.0 * ia.saving_vs_compute_optimal
        );
    }
    s
}

/// `adapterd chinchilla`: the plan as a table, or as the endpoint's JSON with `--json`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChinchillaArgs {
    /// Training compute budget C in FLOPs, e.g. 1e22.
    #[arg(long)]
    pub flops: f64,
    /// Constants of the parametric loss L(N, D).
    #[arg(long, value_enum, default_value_t = Fit::Hoffmann2022)]
    pub fit: Fit,
    /// Lifetime inference tokens T: adds the inference-aware optimum.
    #[arg(long)]
    pub inference_tokens: Option<f64>,
    /// Print the same JSON as GET /v1/chinchilla instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `adapterd chinchilla`; returns the text to print.
pub fn run_cli(args: &ChinchillaArgs) -> anyhow::Result<String> {
    let p = plan(args.flops, args.fit, args.inference_tokens)?;
    if args.json {
        Ok(serde_json::to_string_pretty(&p)? + "\n")
    } else {
        Ok(render_table(&p))
    }
}

#[cfg(test)]
mod tests;
