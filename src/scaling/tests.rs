//! Unit tests of `scaling`: reference values from an independent 50-digit mpmath computation
//! (the snippet is in the comments), and invariants checked over many budgets.

// Reference values are pasted verbatim as mpmath printed them (17 significant digits).
#![allow(clippy::excessive_precision)]

use super::*;

/// Relative difference, for comparing against reference values.
fn rel(a: f64, b: f64) -> f64 {
    ((a - b) / b).abs()
}

fn assert_close(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        rel(got, want) <= tol,
        "{what}: got {got:e}, want {want:e} (rel {:e} > {tol:e})",
        rel(got, want)
    );
}

const BUDGETS: [f64; 8] = [1e18, 3.3e19, 1e21, 1e22, 5.76e23, 1e24, 1e26, 1e27];

// Reference values: mpmath at 50 digits, independently of this code:
//   from mpmath import mp, mpf, sqrt; mp.dps = 50
//   E,A,B,a,b = map(mpf, ('1.69','406.4','410.7','0.34','0.28'))       # hoffmann2022
//   E,A,B,a,b = map(mpf, ('1.8172','482.01','2085.43','0.3478','0.3658')) # besiroglu2024
//   L = lambda N, D: E + A/N**a + B/D**b
//   C = mpf('1e22'); N = sqrt(C/120); D = 20*N                         # rule of thumb
//   G = (a*A/(b*B))**(1/(a+b)); No = G*(C/6)**(b/(a+b)); Do = (C/6)**(a/(a+b))/G
//   Kaplan: mpf('1.3e9')*(C/mpf('8.64e19'))**mpf('0.73')
#[test]
fn rule_of_thumb_reproduces_the_classic_1e22_example() {
    let p = plan(1e22, Fit::Hoffmann2022, None).expect("plan");
    let r = p.rule_of_thumb;
    assert_close(r.params, 9_128_709_291.752_768_6, 1e-14, "N");
    assert_close(r.tokens, 182_574_185_835.055_37, 1e-14, "D");
    assert_close(r.loss, 2.145_500_774_539_478_4, 1e-14, "loss");
    // The rounded figures: N ≈ 9.1B, D ≈ 183B, loss ≈ 2.146.
    assert_eq!(human_count(r.params), "9.13B");
    assert_eq!(human_count(r.tokens), "183B");
    assert_eq!(format!("{:.3}", r.loss), "2.146");
    let b = plan(1e22, Fit::Besiroglu2024, None).expect("plan");
    assert_close(
        b.rule_of_thumb.loss,
        2.141_112_702_503_669_8,
        1e-14,
        "loss b",
    );
}

#[test]
fn compute_optimal_matches_reference_for_both_fits() {
    // (fit, C, N_opt, D_opt, D/N, L) from the mpmath snippet above.
    let cases = [
        (
            Fit::Hoffmann2022,
            1e22,
            5_160_473_684.851_612_4,
            322_967_767_776.649_58,
            62.584_907_413_579_109,
            2.138_614_084_502_857_3,
        ),
        (
            Fit::Besiroglu2024,
            1e22,
            9_045_158_314.062_049_7,
            184_260_640_753.582_43,
            20.371_190_238_552_458,
            2.141_110_960_425_096_9,
        ),
        (
            Fit::Hoffmann2022,
            1e24,
            41_296_702_419.415_179,
            4_035_834_749_563.689_4,
            97.727_772_754_714_846,
            1.911_195_419_914_262_3,
        ),
        (
            Fit::Besiroglu2024,
            1e24,
            95_860_654_045.682_036,
            1_738_634_774_881.071_5,
            18.137_105_282_554_526,
            1.959_712_402_564_146_2,
        ),
    ];
    for (fit, c, n, d, ratio, loss) in cases {
        let o = plan(c, fit, None).expect("plan").compute_optimal;
        assert_close(o.params, n, 1e-12, "N_opt");
        assert_close(o.tokens, d, 1e-12, "D_opt");
        assert_close(o.tokens_per_param, ratio, 1e-12, "D/N");
        assert_close(o.loss, loss, 1e-14, "loss");
    }
}

#[test]
fn kaplan_matches_reference() {
    assert_close(
        kaplan2020_params(1e22),
        41_714_622_744.376_079,
        1e-12,
        "1e22",
    );
    assert_close(
        kaplan2020_params(1e24),
        1_203_062_861_358.222_5,
        1e-12,
        "1e24",
    );
}

#[test]
fn every_allocation_spends_exactly_the_budget_and_the_rule_keeps_twenty_to_one() {
    for fit in Fit::ALL {
        for c in BUDGETS {
            let p = plan(c, fit, None).expect("plan");
            for a in [p.rule_of_thumb, p.compute_optimal] {
                assert_close(6.0 * a.params * a.tokens, c, 1e-12, "6ND = C");
                assert_close(a.tokens / a.params, a.tokens_per_param, 1e-14, "D/N");
            }
            assert_close(
                p.rule_of_thumb.tokens / p.rule_of_thumb.params,
                20.0,
                1e-15,
                "20",
            );
        }
    }
}

#[test]
fn compute_optimal_beats_every_other_split_of_the_same_budget() {
    for fit in Fit::ALL {
        let k = fit.constants();
        for c in BUDGETS {
            let (n, d) = k.compute_optimal(c);
            let best = k.loss(n, d);
            for f in [0.5, 0.9, 0.99, 1.01, 1.1, 2.0] {
                let (n2, d2) = (n * f, d / f);
                assert!(k.loss(n2, d2) > best, "{fit} C={c:e} factor {f}");
            }
            assert!(best <= k.loss(rule_of_thumb(c).0, rule_of_thumb(c).1));
        }
    }
}

// Reference: mpmath, same constants as above, ℓ = L(N_opt, D_opt); N(D) = (A/(ℓ−E−B/D^b))^(1/a);
// bisection (400 steps) in u = ln D on 6D/(6D+2T) − b·B·D^−b/(a·(ℓ−E−B·D^−b)) = 0, then
// total = 6·N·D + 2·N·T, saving = 1 − total/(C + 2·N_opt·T). C = 1e22, T = 1e13.
#[test]
fn inference_aware_matches_reference() {
    let cases = [
        (
            Fit::Hoffmann2022,
            1_565_636_740.949_774_5,
            2_149_824_257_587.594_9,
            5.150_779_788_458_075_4e22,
            0.545_022_194_675_824_06,
        ),
        (
            Fit::Besiroglu2024,
            2_776_013_087.882_298,
            1_488_978_402_428.966_3,
            8.032_080_295_394_727_4e22,
            0.579_258_927_347_398_54,
        ),
    ];
    for (fit, n, d, total, saving) in cases {
        let ia = plan(1e22, fit, Some(1e13))
            .expect("plan")
            .inference_aware
            .expect("ia");
        assert_close(ia.params, n, 1e-9, "N");
        assert_close(ia.tokens, d, 1e-9, "D");
        assert_close(ia.total_flops, total, 1e-10, "total");
        assert_close(ia.saving_vs_compute_optimal, saving, 1e-9, "saving");
    }
}

#[test]
fn inference_aware_keeps_the_loss_and_never_costs_more_than_compute_optimal() {
    for fit in Fit::ALL {
        let k = fit.constants();
        for c in BUDGETS {
            for t in [0.0, 1.0, 1e9, 1e12, 1e15, 1e18, 1e24, 1e30] {
                let p = plan(c, fit, Some(t)).expect("plan");
                let ia = p.inference_aware.expect("ia");
                let o = p.compute_optimal;
                assert_close(k.loss(ia.params, ia.tokens), ia.loss_target, 1e-10, "L = ℓ");
                assert_eq!(ia.loss_target, o.loss);
                let base = c + 2.0 * o.params * t;
                assert!(ia.total_flops <= base, "{fit} C={c:e} T={t:e}");
                assert!(ia.saving_vs_compute_optimal >= 0.0);
                assert_close(ia.train_flops, 6.0 * ia.params * ia.tokens, 1e-14, "train");
                assert_close(
                    ia.total_flops,
                    ia.train_flops + ia.inference_flops,
                    1e-14,
                    "sum",
                );
                if t == 0.0 {
                    assert_eq!((ia.params, ia.tokens), (o.params, o.tokens), "T = 0");
                    assert_eq!(ia.saving_vs_compute_optimal, 0.0);
                } else if 2.0 * o.params * t > 1e-6 * c {
                    // Serving makes a smaller model trained longer the better deal.
                    assert!(ia.params < o.params && ia.tokens > o.tokens);
                    assert!(ia.saving_vs_compute_optimal > 0.0);
                }
                // A local minimum along the constraint: nudging D either way costs more.
                for f in [0.999, 1.001] {
                    let d2 = ia.tokens * f;
                    if let Some(n2) = k.params_for_loss(ia.loss_target, d2) {
                        assert!(6.0 * n2 * d2 + 2.0 * n2 * t >= ia.total_flops * (1.0 - 1e-12));
                    }
                }
            }
        }
    }
}

#[test]
fn solver_with_negligible_inference_lands_on_the_compute_optimal_point() {
    // The bisection itself (T > 0 skips the T = 0 shortcut) finds the tangency of C.
    for fit in Fit::ALL {
        let k = fit.constants();
        for c in BUDGETS {
            let (n, d) = k.compute_optimal(c);
            let ia = inference_aware(&k, c, 1e-30);
            assert_close(ia.params, n, 1e-9, "N");
            assert_close(ia.tokens, d, 1e-9, "D");
        }
    }
}

#[test]
fn invalid_inputs_are_refused_naming_the_field() {
    for c in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let e = plan(c, Fit::Hoffmann2022, None).expect_err("bad flops");
        assert!(e.to_string().starts_with("flops"), "{e}");
    }
    // Subnormal budget: C/6 underflows to zero params.
    let e = plan(f64::from_bits(1), Fit::Hoffmann2022, None).expect_err("tiny");
    assert!(matches!(e, ScalingError::FlopsOutOfRange(_)), "{e}");
    for t in [-1.0, f64::NAN, f64::INFINITY] {
        let e = plan(1e22, Fit::Hoffmann2022, Some(t)).expect_err("bad T");
        assert!(e.to_string().starts_with("inference_tokens"), "{e}");
    }
    let e = plan(1e22, Fit::Hoffmann2022, Some(1e300)).expect_err("huge T");
    assert!(
        matches!(e, ScalingError::InferenceTokensOutOfRange(_)),
        "{e}"
    );
    let e = "kaplan".parse::<Fit>().expect_err("unknown fit");
    assert!(e.to_string().contains("fit `kaplan`"), "{e}");
    assert_eq!("besiroglu2024".parse::<Fit>(), Ok(Fit::Besiroglu2024));
}

#[test]
fn extreme_but_finite_budgets_still_plan() {
    for fit in Fit::ALL {
        let k = fit.constants();
        for c in [1e-6, 1.0, 1e100, 1e300, 1e307] {
            for t in [1e12, 1e40] {
                let ia = plan(c, fit, Some(t))
                    .expect("plan")
                    .inference_aware
                    .expect("ia");
                assert_close(k.loss(ia.params, ia.tokens), ia.loss_target, 1e-10, "L = ℓ");
                assert!(ia.saving_vs_compute_optimal >= 0.0, "C={c:e} T={t:e}");
            }
        }
    }
}

#[test]
fn json_has_exactly_the_documented_shape() {
    let v = serde_json::to_value(plan(1e22, Fit::Hoffmann2022, Some(1e13)).expect("plan"))
        .expect("json");
    let keys = |v: &serde_json::Value| -> Vec<String> {
        v.as_object().expect("object").keys().cloned().collect()
    };
    let mut top = keys(&v);
    top.sort();
    assert_eq!(
        top,
        [
            "compute_optimal",
            "constants",
            "fit",
            "flops",
            "inference_aware",
            "kaplan2020",
            "rule_of_thumb"
        ]
    );
    assert_eq!(v["fit"], "hoffmann2022");
    assert_eq!(v["constants"]["E"], 1.69);
    assert_eq!(v["constants"]["beta"], 0.28);
    assert_eq!(v["rule_of_thumb"]["tokens_per_param"], 20.0);
    let mut ia = keys(&v["inference_aware"]);
    ia.sort();
    assert_eq!(
        ia,
        [
            "inference_flops",
            "inference_tokens",
            "loss_target",
            "params",
            "saving_vs_compute_optimal",
            "tokens",
            "total_flops",
            "train_flops"
        ]
    );
    let v = serde_json::to_value(plan(1e22, Fit::Hoffmann2022, None).expect("plan")).expect("json");
    assert!(v.get("inference_aware").is_none());
}

#[test]
fn human_units_round_to_three_significant_digits() {
    let cases = [
        (9.1287e9, "9.13B"),
        (182.57e9, "183B"),
        (41.7146e6, "41.7M"),
        (999.96e6, "1.00B"),
        (2.1498e12, "2.15T"),
        (12.0, "12.0"),
        (5e15, "5.00e15"),
    ];
    for (x, want) in cases {
        assert_eq!(human_count(x), want);
    }
}

#[test]
fn cli_prints_a_table_or_the_endpoint_json() {
    let mut args = ChinchillaArgs {
        flops: 1e22,
        fit: Fit::Hoffmann2022,
        inference_tokens: None,
        json: false,
    };
    let table = run_cli(&args).expect("table");
    assert!(
        table.contains("9.13B params") && table.contains("183B tokens"),
        "{table}"
    );
    assert!(table.contains("2.1455"), "{table}");
    args.inference_tokens = Some(1e13);
    let table = run_cli(&args).expect("table");
    assert!(
        table.contains("saving vs compute-optimal") && table.contains("54.5%"),
        "{table}"
    );
    args.json = true;
    // Compared as text: serde_json's parser may round the last bit, its writer never does.
    let direct =
        serde_json::to_string_pretty(&plan(1e22, Fit::Hoffmann2022, Some(1e13)).expect("plan"))
            .expect("json");
    assert_eq!(run_cli(&args).expect("json"), direct + "\n");
    args.flops = -1.0;
    assert!(run_cli(&args)
        .expect_err("bad")
        .to_string()
        .contains("flops"));
}

#[test]
fn cli_args_parse_with_clap() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: ChinchillaArgs,
    }
    let cli = Cli::try_parse_from([
        "x",
        "--flops",
        "1e22",
        "--fit",
        "besiroglu2024",
        "--inference-tokens",
        "1e13",
        "--json",
    ])
    .expect("parse");
    assert_eq!(cli.args.flops, 1e22);
    assert_eq!(cli.args.fit, Fit::Besiroglu2024);
    assert_eq!(cli.args.inference_tokens, Some(1e13));
    assert!(cli.args.json);
    assert!(Cli::try_parse_from(["x", "--flops", "1e22", "--fit", "kaplan"]).is_err());
    assert!(Cli::try_parse_from(["x"]).is_err());
}
