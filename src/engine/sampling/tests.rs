//! Tests for sampling: validation, greedy and seeded draws, top-k/top-p against a full sort,
//! logprob reporting, and logit adjustments.

use super::*;

fn params(temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        seed: Some(seed),
        top_logprobs: 0,
        adjust: LogitAdjust::default(),
        min_p: None,
    }
}

fn assert_close(a: f64, b: f64, tol: f64) {
    assert!((a - b).abs() <= tol, "{a} vs {b} (tol {tol})");
}

fn assert_dist(got: &[(u32, f64)], want: &[(u32, f64)]) {
    assert_eq!(
        got.iter().map(|&(i, _)| i).collect::<Vec<_>>(),
        want.iter().map(|&(i, _)| i).collect::<Vec<_>>(),
        "kept tokens"
    );
    for (&(_, g), &(_, w)) in got.iter().zip(want) {
        assert_close(g, w, 1e-6);
    }
}

/// Probabilities 0.1, 0.4, 0.2, 0.3 as logits, so masks are easy to read.
fn four() -> Vec<f32> {
    [0.1f32, 0.4, 0.2, 0.3].iter().map(|p| p.ln()).collect()
}

// Reference (python3, no numpy):
//   import math
//   x = [1.0, 2.0, 3.0, 0.5]
//   lse = math.log(sum(math.exp(v) for v in x))       # 3.460773489156851
//   [v - lse for v in x]
//   # [-2.460773489156851, -1.4607734891568511, -0.4607734891568511, -2.960773489156851]
#[test]
fn greedy_reports_raw_log_softmax_and_top() {
    let mut s = Sampler::new(SamplingParams {
        top_logprobs: 3,
        ..SamplingParams::greedy()
    });
    let out = s.sample(&[1.0, 2.0, 3.0, 0.5]);
    assert_eq!(out.token, 2);
    assert_close(f64::from(out.logprob), -0.460_773_489_156_851_1, 1e-6);
    let want = [
        (2, -0.460_773_489_156_851_1),
        (1, -1.460_773_489_156_851_1),
        (0, -2.460_773_489_156_851),
    ];
    assert_eq!(out.top.len(), 3);
    for (&(gi, gv), &(wi, wv)) in out.top.iter().zip(&want) {
        assert_eq!(gi, wi);
        assert_close(f64::from(gv), wv, 1e-6);
    }
}

// Same reference as above: log_softmax([1, 2, 3, 0.5])[3] = -2.960773489156851.
#[test]
fn score_reports_any_tokens_raw_logprob_and_top() {
    let out = score(&[1.0, 2.0, 3.0, 0.5], 3, 2);
    assert_eq!(out.token, 3);
    assert_close(f64::from(out.logprob), -2.960_773_489_156_851, 1e-6);
    assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    assert_eq!(score(&[f32::NAN; 4], 1, 2).logprob, f32::NEG_INFINITY);
    assert_eq!(score(&[0.0; 4], 9, 0).logprob, f32::NEG_INFINITY);
}

#[test]
fn logprob_is_raw_even_when_temperature_differs() {
    // Only one token can be drawn under top_k = 1, whatever the temperature.
    let mut s = Sampler::new(SamplingParams {
        top_logprobs: 1,
        ..params(0.3, Some(1), None, 7)
    });
    let out = s.sample(&[1.0, 2.0, 3.0, 0.5]);
    assert_eq!(out.token, 2);
    assert_close(f64::from(out.logprob), -0.460_773_489_156_851_1, 1e-6);
    assert_eq!(out.top.len(), 1);
}

#[test]
fn greedy_ties_go_to_lowest_id() {
    let mut s = Sampler::new(SamplingParams {
        top_logprobs: 4,
        ..SamplingParams::greedy()
    });
    let out = s.sample(&[1.0, 3.0, 3.0, 2.0, 3.0]);
    assert_eq!(out.token, 1);
    let ids: Vec<u32> = out.top.iter().map(|&(i, _)| i).collect();
    assert_eq!(ids, vec![1, 2, 4, 3]);
}

#[test]
fn nan_is_never_chosen_and_all_nan_is_token_zero() {
    let mut s = Sampler::new(SamplingParams {
        top_logprobs: 5,
        ..SamplingParams::greedy()
    });
    let out = s.sample(&[f32::NAN, 1.0, f32::NAN]);
    assert_eq!(out.token, 1);
    assert_eq!(out.logprob, 0.0);
    assert_eq!(out.top, vec![(1, 0.0)]);

    let out = s.sample(&[f32::NAN, f32::NEG_INFINITY, f32::NAN]);
    assert_eq!(out.token, 0);
    assert_eq!(out.logprob, f32::NEG_INFINITY);
    assert!(out.top.is_empty());
    assert_eq!(s.sample(&[]).token, 0);

    // The sampling paths must not pick a NaN either, nor panic on +inf.
    for p in [
        params(1.0, None, None, 1),
        params(1.0, Some(2), None, 1),
        params(1.0, None, Some(0.9), 1),
    ] {
        let mut s = Sampler::new(p);
        for _ in 0..200 {
            let t = s.sample(&[f32::NAN, 0.0, f32::NAN, 0.5, f32::NAN]).token;
            assert!(t == 1 || t == 3, "drew {t}");
        }
        let out = s.sample(&[0.0, f32::INFINITY, f32::NAN]);
        assert_eq!(out.token, 1);
        assert_eq!(out.logprob, 0.0);
    }
}

#[test]
fn top_k_mask() {
    // python3: p = [.1,.4,.2,.3]; k=2 keeps ids 1,3 -> [.4/.7, .3/.7] = [0.5714285714, 0.4285714286]
    let mut s = Sampler::new(params(1.0, Some(2), None, 0));
    assert_dist(
        &s.distribution(&four()),
        &[(1, 0.571_428_571_4), (3, 0.428_571_428_6)],
    );
    // k >= vocab is the plain softmax.
    let mut s = Sampler::new(params(1.0, Some(10), None, 0));
    assert_dist(
        &s.distribution(&four()),
        &[(0, 0.1), (1, 0.4), (2, 0.2), (3, 0.3)],
    );
}

#[test]
fn top_k_ties_keep_lower_ids() {
    let mut s = Sampler::new(params(1.0, Some(2), None, 0));
    let d = s.distribution(&[0.0, 1.0, 0.0, 1.0, 1.0]);
    assert_dist(&d, &[(1, 0.5), (3, 0.5)]);
}

#[test]
fn top_p_mask() {
    // Sorted .4, .3, .2, .1: cumulative .4, .7 -> top_p .65 keeps ids 1,3, renormalised
    // to [.4/.7, .3/.7]; top_p .75 also keeps id 2 -> [.4/.9, .2/.9, .3/.9].
    let mut s = Sampler::new(params(1.0, None, Some(0.65), 0));
    assert_dist(
        &s.distribution(&four()),
        &[(1, 0.571_428_571_4), (3, 0.428_571_428_6)],
    );
    let mut s = Sampler::new(params(1.0, None, Some(0.75), 0));
    assert_dist(
        &s.distribution(&four()),
        &[
            (1, 0.444_444_444_4),
            (2, 0.222_222_222_2),
            (3, 0.333_333_333_3),
        ],
    );
    // Below the largest probability: just the top token.
    let mut s = Sampler::new(params(1.0, None, Some(0.3), 0));
    assert_dist(&s.distribution(&four()), &[(1, 1.0)]);
}

// python3:
//   p = [.1,.4,.2,.3]
//   # top_k=3 then top_p=.5: renormalised [.4,.3,.2]/.9 = [.444,.333,.222]; cum .444, .778
//   # -> keeps ids 1,3 with [.4/.7, .3/.7]
//   # temperature 2 then top_p .5: q = [math.sqrt(v) for v in p]; q = [v/sum(q) for v in q]
//   # -> [0.16270, 0.32540, 0.23009, 0.28181]; sorted cum .3254, .6072 -> ids 1,3,
//   # renormalised [0.32540/0.60721, 0.28181/0.60721] = [0.535898, 0.464102]
#[test]
fn processing_order_temperature_then_top_k_then_top_p() {
    let mut s = Sampler::new(params(1.0, Some(3), Some(0.5), 0));
    assert_dist(
        &s.distribution(&four()),
        &[(1, 0.571_428_571_4), (3, 0.428_571_428_6)],
    );
    let mut s = Sampler::new(params(2.0, None, Some(0.5), 0));
    assert_dist(&s.distribution(&four()), &[(1, 0.535_898), (3, 0.464_102)]);
    // Temperature alone: [0.162700, 0.325401, 0.230093, 0.281805] (as above).
    let mut s = Sampler::new(params(2.0, None, None, 0));
    let d = s.distribution(&four());
    for (&(_, g), w) in d.iter().zip([0.162_700, 0.325_401, 0.230_093, 0.281_805]) {
        assert_close(g, w, 1e-5);
    }
}

#[test]
fn same_seed_same_draws_different_seed_differs() {
    let logits = vec![0.0f32; 64];
    let draws = |seed: u64, top_p: Option<f32>| {
        let mut s = Sampler::new(params(1.0, None, top_p, seed));
        (0..100)
            .map(|_| s.sample(&logits).token)
            .collect::<Vec<_>>()
    };
    for top_p in [None, Some(0.9)] {
        assert_eq!(draws(42, top_p), draws(42, top_p));
        assert_ne!(draws(42, top_p), draws(43, top_p));
    }
}

#[test]
fn empirical_distribution_matches_softmax() {
    // softmax([0, 1, 2, 0.5]) (python3: e = [math.exp(v) for v in x]; [v/sum(e) for v in e])
    // = [0.0783941, 0.2130973, 0.5792585, 0.1292500]. With 20k draws one standard deviation
    // of a frequency is at most 0.0035, so 0.015 is over 4 sigma (and the seed is fixed).
    let want = [0.078_394_1, 0.213_097_3, 0.579_258_5, 0.129_250_0];
    let logits = [0.0f32, 1.0, 2.0, 0.5];
    for p in [
        params(1.0, None, None, 11),
        params(1.0, Some(4), None, 11),
        params(1.0, None, Some(1.0), 11),
    ] {
        let mut s = Sampler::new(p);
        let mut counts = [0usize; 4];
        let n = 20_000;
        for _ in 0..n {
            counts[s.sample(&logits).token as usize] += 1;
        }
        for (c, w) in counts.iter().zip(want) {
            assert_close(*c as f64 / n as f64, w, 0.015);
        }
    }
}

#[test]
fn tiny_top_p_is_greedy() {
    let logits = [0.3f32, 1.2, 1.1, -0.5, 1.19];
    for seed in 0..200 {
        let mut s = Sampler::new(params(1.5, None, Some(1e-6), seed));
        assert_eq!(s.sample(&logits).token, 1);
    }
}

/// Reference for the big-vocab paths: full sort, then the same rules, written naively.
fn reference_kept(logits: &[f32], t: f32, k: Option<usize>, p: Option<f32>) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.sort_by(|&a, &b| {
        let (x, y) = (logits[a as usize], logits[b as usize]);
        y.total_cmp(&x).then(a.cmp(&b))
    });
    if let Some(k) = k {
        ids.truncate(k);
    }
    let max = logits[ids[0] as usize];
    let w: Vec<f64> = ids
        .iter()
        .map(|&i| f64::from(((logits[i as usize] - max) / t).exp()))
        .collect();
    let total: f64 = w.iter().sum();
    if let Some(p) = p {
        let mut mass = 0.0;
        for (n, wi) in w.iter().enumerate() {
            mass += wi;
            if mass >= f64::from(p) * total {
                ids.truncate(n + 1);
                break;
            }
        }
    }
    ids.sort();
    ids
}

#[test]
fn vocab_sized_selection_matches_full_sort() {
    let mut rng = StdRng::seed_from_u64(5);
    let logits: Vec<f32> = (0..49_152)
        .map(|_| rng.random::<f32>() * 12.0 - 6.0)
        .collect();
    for (t, k, p) in [
        (1.0, Some(50), None),
        (1.0, Some(5000), None),
        (0.9, Some(300), Some(0.8)),
        (0.9, Some(30), Some(0.8)),
        (0.7, None, Some(0.9)),
        (1.0, None, Some(0.5)),
        (1.3, Some(1000), Some(0.95)),
        (0.1, None, Some(0.99)),
    ] {
        let mut s = Sampler::new(params(t, k, p, 3));
        let got: Vec<u32> = s.distribution(&logits).iter().map(|&(i, _)| i).collect();
        assert_eq!(
            got,
            reference_kept(&logits, t, k, p),
            "t={t} k={k:?} p={p:?}"
        );
        let want = reference_kept(&logits, t, k, p);
        for _ in 0..20 {
            let tok = s.sample(&logits).token;
            assert!(want.binary_search(&tok).is_ok());
        }
    }
}

#[test]
fn exp_neg_matches_std_exp() {
    let mut x = 0.0f32;
    while x > -87.0 {
        let (got, want) = (exp_neg(x), x.exp());
        assert!(
            (got - want).abs() <= want * 4.0 * f32::EPSILON + f32::MIN_POSITIVE,
            "exp({x}) = {got}, want {want}"
        );
        x -= 0.001_37;
    }
    assert_eq!(exp_neg(0.0), 1.0);
    assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_neg(-100.0), 0.0);
}

#[test]
fn blocked_draw_finds_every_block() {
    // Weight only in a few tokens spread over many blocks: each is drawn, nothing else is.
    let mut logits = vec![f32::NEG_INFINITY; 5000];
    for &i in &[3usize, 700, 2600, 4999] {
        logits[i] = 0.0;
    }
    let mut s = Sampler::new(params(1.0, None, None, 9));
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..400 {
        seen.insert(s.sample(&logits).token);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec![3, 700, 2600, 4999]
    );
}

#[test]
fn tiny_temperature_is_greedy() {
    let mut s = Sampler::new(params(1e-6, None, None, 1));
    for _ in 0..50 {
        assert_eq!(s.sample(&[0.0, 5.0, 5.0, 1.0]).token, 1);
    }
    // Small but above the cutoff: still sampled, and never a NaN weight.
    let mut s = Sampler::new(params(1e-4, None, None, 1));
    assert_eq!(s.sample(&[0.0, 5.0, 4.0, 1.0]).token, 1);
}

#[test]
fn random_inputs_never_panic_or_pick_masked_tokens() {
    let mut rng = StdRng::seed_from_u64(77);
    for _ in 0..3000 {
        let len = rng.random_range(1..700);
        let logits: Vec<f32> = (0..len)
            .map(|_| match rng.random_range(0..20) {
                0 => f32::NAN,
                1 => f32::NEG_INFINITY,
                2 if rng.random_bool(0.05) => f32::INFINITY,
                _ => rng.random::<f32>() * 40.0 - 20.0,
            })
            .collect();
        let p = SamplingParams {
            temperature: [0.0, 0.05, 0.7, 1.0, 2.0][rng.random_range(0..5)],
            top_k: [None, Some(1), Some(3), Some(300), Some(5000)][rng.random_range(0..5)],
            top_p: [None, Some(1e-6), Some(0.5), Some(0.95)][rng.random_range(0..4)],
            seed: Some(rng.random()),
            top_logprobs: rng.random_range(0..=20),
            adjust: LogitAdjust::default(),
            min_p: None,
        };
        let out = Sampler::new(p.clone()).sample(&logits);
        let drawable = logits.iter().any(|&x| clean(x) > f32::NEG_INFINITY);
        if drawable {
            let chosen = clean(logits[out.token as usize]);
            assert!(chosen > f32::NEG_INFINITY, "{p:?} chose a masked token");
            assert!(out.logprob <= 1e-5 && !out.logprob.is_nan(), "{p:?}");
        } else {
            assert_eq!((out.token, out.top.len()), (0, 0));
        }
        assert!(out.top.len() <= p.top_logprobs);
        assert!(out.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }
}

#[test]
fn validation_names_the_field() {
    let v = |t, p, k, n| SamplingParams::validate(t, p, k, None, n, 1.0);
    let field = |r: Result<SamplingParams, SamplingError>| r.map(|_| ()).unwrap_err().field();

    assert_eq!(field(v(Some(2.5), None, None, None)), "temperature");
    assert_eq!(field(v(Some(-0.1), None, None, None)), "temperature");
    assert_eq!(field(v(Some(f32::NAN), None, None, None)), "temperature");
    assert_eq!(
        field(v(Some(f32::INFINITY), None, None, None)),
        "temperature"
    );
    assert_eq!(field(v(None, Some(0.0), None, None)), "top_p");
    assert_eq!(field(v(None, Some(1.01), None, None)), "top_p");
    assert_eq!(field(v(None, Some(f32::NAN), None, None)), "top_p");
    assert_eq!(field(v(None, None, Some(-2), None)), "top_k");
    assert_eq!(field(v(None, None, None, Some(21))), "top_logprobs");
    assert_eq!(field(v(None, None, None, Some(-1))), "top_logprobs");
    assert_eq!(
        field(SamplingParams::validate(None, None, None, None, None, 3.0)),
        "temperature"
    );

    let err = v(Some(2.5), None, None, None).map(|_| ()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "temperature must be a finite number between 0 and 2, got 2.5"
    );
}

#[test]
fn validation_defaults_and_normalisation() {
    let ok = SamplingParams::validate(None, None, None, None, None, 0.7).unwrap();
    assert_eq!(
        ok,
        SamplingParams {
            temperature: 0.7,
            top_k: None,
            top_p: None,
            seed: None,
            top_logprobs: 0,
            adjust: LogitAdjust::default(),
            min_p: None,
        }
    );
    let ok =
        SamplingParams::validate(Some(0.0), Some(1.0), Some(0), Some(9), Some(20), 1.0).unwrap();
    assert_eq!(
        ok,
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: Some(9),
            top_logprobs: 20,
            adjust: LogitAdjust::default(),
            min_p: None,
        }
    );
    let ok = SamplingParams::validate(Some(2.0), Some(0.5), Some(40), None, Some(0), 1.0).unwrap();
    assert_eq!((ok.top_k, ok.top_p), (Some(40), Some(0.5)));
    let ok = SamplingParams::validate(None, None, Some(-1), None, None, 1.0).unwrap();
    assert_eq!(ok.top_k, None);
}

#[test]
fn adjustments_change_the_choice_but_not_the_reported_logprobs() {
    let logits = [1.0, 2.0, 3.0, 0.5];
    // A bias of +5 on token 0 makes it the greedy choice; its logprob is still the raw one.
    let mut s = Sampler::new(SamplingParams {
        adjust: LogitAdjust::validate(None, None, vec![(0, 5.0)], 4).unwrap(),
        ..SamplingParams::greedy()
    });
    let out = s.sample(&logits);
    assert_eq!(out.token, 0);
    assert_close(f64::from(out.logprob), -2.460_773_489_156_851, 1e-6);
    // A frequency penalty of 2 moves greedy decoding off a token once it has been
    // chosen: 3 → 2 after one pick of token 2 (3 - 2 = 1 < 2), then 2 - 2 = 0 < 1.
    let mut s = Sampler::new(SamplingParams {
        adjust: LogitAdjust::validate(None, Some(2.0), vec![], 4).unwrap(),
        ..SamplingParams::greedy()
    });
    let picks: Vec<u32> = (0..3).map(|_| s.sample(&logits).token).collect();
    assert_eq!(picks, vec![2, 1, 0]);
    // A bias of -100 bans a token even when sampling.
    let mut s = Sampler::new(SamplingParams {
        temperature: 1.0,
        seed: Some(7),
        adjust: LogitAdjust::validate(None, None, vec![(2, -100.0)], 4).unwrap(),
        ..SamplingParams::greedy()
    });
    assert!((0..200).all(|_| s.sample(&logits).token != 2));
}

#[test]
fn min_p_keeps_tokens_at_least_min_p_times_as_likely_as_the_best() {
    // Weights at T = 1 relative to the best: 1, e^-1 ≈ 0.37, e^-2 ≈ 0.14, e^-3 ≈ 0.05.
    let logits = [3.0, 2.0, 1.0, 0.0];
    for (top_k, top_p, want) in [
        (None, None, vec![0, 1]),
        (Some(3), None, vec![0, 1]),
        (None, Some(0.99), vec![0, 1]),
        (Some(1), None, vec![0]),
    ] {
        let p = SamplingParams {
            temperature: 1.0,
            top_k,
            top_p,
            seed: Some(1),
            ..SamplingParams::greedy()
        }
        .with_min_p(Some(0.2))
        .unwrap();
        let mut s = Sampler::new(p);
        let d = s.distribution(&logits);
        let ids: Vec<u32> = d.iter().map(|&(i, _)| i).collect();
        assert_eq!(ids, want, "top_k {top_k:?} top_p {top_p:?}");
        let total: f64 = d.iter().map(|&(_, p)| p).sum();
        assert!((total - 1.0).abs() < 1e-6, "renormalised: {total}");
    }
    // Temperature flattens the distribution first: at T = 2 the weights are 1, 0.61, 0.37 and
    // 0.22, so min_p 0.3 keeps three tokens.
    let p = SamplingParams {
        temperature: 2.0,
        ..SamplingParams::greedy()
    }
    .with_min_p(Some(0.3))
    .unwrap();
    let d = Sampler::new(p).distribution(&logits);
    assert_eq!(d.iter().map(|&(i, _)| i).collect::<Vec<_>>(), vec![0, 1, 2]);
    for bad in [-0.1, 1.5, f32::NAN] {
        let e = SamplingParams::greedy().with_min_p(Some(bad)).unwrap_err();
        assert_eq!(e.field(), "min_p");
    }
    assert_eq!(
        SamplingParams::greedy()
            .with_min_p(Some(0.0))
            .unwrap()
            .min_p,
        None
    );
}

#[test]
fn json_mode_skips_refused_tokens_and_ends_when_the_object_closes() {
    use crate::engine::json_mode::{JsonConstraint, Vocabulary};
    use std::sync::Arc;
    // Token 0 ("x") is always the model's favourite and never valid JSON here.
    let vocab = Arc::new(Vocabulary {
        bytes: ["x", "{", "}", "\"k\":1", ""]
            .iter()
            .map(|t| t.as_bytes().into())
            .collect(),
        eos: vec![4],
    });
    let logits = [9.0, 1.0, 2.0, 3.0, 8.0];
    let mut s = Sampler::new(SamplingParams::greedy());
    s.constrain(JsonConstraint::new(vocab.clone()));
    let picks: Vec<u32> = (0..4).map(|_| s.sample(&logits).token).collect();
    // "x" and end-of-sequence (the two favourites) are refused until the object closes: "{",
    // then the pair (3.0 beats "}" at 2.0), then "}", then end-of-sequence at once.
    assert_eq!(picks, vec![1, 3, 2, 4]);
    // Sampling at a high temperature obeys the same constraint.
    let mut s = Sampler::new(SamplingParams {
        temperature: 2.0,
        seed: Some(5),
        ..SamplingParams::greedy()
    });
    s.constrain(JsonConstraint::new(vocab));
    let first = s.sample(&logits).token;
    assert_eq!(first, 1, "only '{{' can start the object");
}
