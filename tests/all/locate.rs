//! Causal tracing: exactness on tiny models, and the claims on smollm2-135m.

use crate::common::*;
use engram::locate::{attribution, causal, LocateParams, Setup};
use engram::model::{Batch, HookPoint, Op, Positions, Trace};

fn tiny_setup(n_tokens: usize) -> Setup {
    Setup {
        prompt_ids: vec![5, 17, 3, 88, 42, 9, 61, 23][..n_tokens].to_vec(),
        tokens: (0..n_tokens).map(|i| format!("t{i}")).collect(),
        subject_range: (1, 4),
        target_id: 7,
        target: "t".into(),
        noise_std: 0.5,
    }
}

fn params() -> LocateParams {
    LocateParams {
        samples: 4,
        window: 2,
        ..Default::default()
    }
}

fn p_target(logits: &candle_core::Tensor, id: usize) -> f64 {
    let t = logits.dim(1).unwrap();
    let p = candle_nn::ops::softmax_last_dim(
        &logits.narrow(1, t - 1, 1).unwrap().contiguous().unwrap(),
    )
    .unwrap();
    let v: Vec<f32> = p
        .narrow(2, id, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64
}

/// Restoring every layer's clean state at every token gives back exactly clean P.
#[test]
fn restoring_everything_gives_clean_p() {
    for name in ["tiny-llama", "tiny-gpt2"] {
        let m = tiny(name);
        let s = tiny_setup(8);
        let r = causal::trace_setup(&m, &s, &params(), &mut || {}).unwrap();
        let n = m.config.n_layers;
        // Via the trace API: noise on the subject, every resid_post restored everywhere.
        let mut clean = Trace::new();
        for l in 0..n {
            clean.capture(HookPoint::ResidPost(l));
        }
        m.forward(&Batch::single(&s.prompt_ids), &mut clean)
            .unwrap();
        let batch = Batch {
            ids: vec![s.prompt_ids.clone(); 4],
            mask: None,
        };
        let mut t = Trace::new();
        t.push(
            HookPoint::Embed,
            Positions::Tokens(vec![1, 2, 3]),
            Op::Noise { std: 0.5, seed: 0 },
        );
        for l in 0..n {
            let c = clean
                .get(HookPoint::ResidPost(l))
                .unwrap()
                .broadcast_as((4, 8, m.config.d_model))
                .unwrap()
                .contiguous()
                .unwrap();
            t.push(HookPoint::ResidPost(l), Positions::All, Op::Replace(c));
        }
        let p = p_target(&m.forward(&batch, &mut t).unwrap(), 7);
        assert!((p - r.clean_p).abs() < 1e-6, "{name}: {p} vs {}", r.clean_p);
        // In the grid: the last layer's state at the last token is everything the head sees.
        let restored = r.grids.hidden[7][n - 1] + r.corrupted_p;
        assert!(
            (restored - r.clean_p).abs() < 1e-6,
            "{name}: {restored} vs {}",
            r.clean_p
        );
        assert!(r.corrupted_p != r.clean_p);
    }
}

/// Cells that cannot reach the prediction have exactly zero effect: tokens before the subject
/// (the noise never touches them), and the last layer's state at any token but the last.
#[test]
fn unreachable_cells_have_zero_effect() {
    let m = tiny("tiny-llama");
    let r = causal::trace_setup(&m, &tiny_setup(8), &params(), &mut || {}).unwrap();
    let n = m.config.n_layers;
    for kind in engram::locate::KINDS {
        assert!(r.grids.get(kind)[0].iter().all(|&v| v == 0.0), "{kind}");
    }
    for i in 0..7 {
        assert!(
            r.grids.hidden[i][n - 1].abs() < 1e-7,
            "token {i}: {}",
            r.grids.hidden[i][n - 1]
        );
    }
}

/// Our shortcuts (start at the layer, reuse cached positions, batch cells) give the numbers a
/// naive full forward with the same interventions gives.
#[test]
fn fast_trace_equals_naive_restoration() {
    let m = tiny("tiny-llama");
    let s = tiny_setup(8);
    let p = params();
    let r = causal::trace_setup(&m, &s, &p, &mut || {}).unwrap();
    let mut clean = Trace::new();
    for l in 0..m.config.n_layers {
        clean.capture(HookPoint::ResidPost(l));
        clean.capture(HookPoint::MlpOut(l));
    }
    m.forward(&Batch::single(&s.prompt_ids), &mut clean)
        .unwrap();
    let batch = Batch {
        ids: vec![s.prompt_ids.clone(); 4],
        mask: None,
    };
    let noise = || {
        let mut t = Trace::new();
        t.push(
            HookPoint::Embed,
            Positions::Tokens(vec![1, 2, 3]),
            Op::Noise { std: 0.5, seed: 0 },
        );
        t
    };
    let full = |point: HookPoint| {
        clean
            .get(point)
            .unwrap()
            .broadcast_as((4, 8, m.config.d_model))
            .unwrap()
            .contiguous()
            .unwrap()
    };
    for (i, l) in [(3usize, 0usize), (5, 1), (2, 1)] {
        let mut t = noise();
        t.push(
            HookPoint::ResidPost(l),
            Positions::Tokens(vec![i]),
            Op::Replace(full(HookPoint::ResidPost(l))),
        );
        let naive = p_target(&m.forward(&batch, &mut t).unwrap(), 7) - r.corrupted_p;
        assert!(
            (naive - r.grids.hidden[i][l]).abs() < 1e-6,
            "hidden ({i},{l}): {naive} vs {}",
            r.grids.hidden[i][l]
        );
        let mut t = noise();
        let (lo, hi) = engram::locate::window(l, 2, m.config.n_layers);
        for j in lo..hi {
            t.push(
                HookPoint::MlpOut(j),
                Positions::Tokens(vec![i]),
                Op::Replace(full(HookPoint::MlpOut(j))),
            );
        }
        let naive = p_target(&m.forward(&batch, &mut t).unwrap(), 7) - r.corrupted_p;
        assert!(
            (naive - r.grids.mlp[i][l]).abs() < 1e-6,
            "mlp ({i},{l}): {naive} vs {}",
            r.grids.mlp[i][l]
        );
    }
}

#[test]
fn attribution_estimates_correlate_with_the_exact_trace() {
    let m = tiny("tiny-gpt2");
    let s = tiny_setup(8);
    let small = LocateParams {
        samples: 4,
        window: 2,
        noise_multiplier: 3.0,
        seed: 0,
    };
    let exact = causal::trace_setup(
        &m,
        &Setup {
            noise_std: 0.05,
            ..s.clone()
        },
        &small,
        &mut || {},
    )
    .unwrap();
    let est = attribution::trace_setup(
        &m,
        &Setup {
            noise_std: 0.05,
            ..s
        },
        &small,
    )
    .unwrap();
    assert!((est.clean_p - exact.clean_p).abs() < 1e-6);
    assert!((est.corrupted_p - exact.corrupted_p).abs() < 1e-6);
    let flat = |r: &engram::locate::LocateResult| {
        r.grids
            .hidden
            .iter()
            .flatten()
            .copied()
            .collect::<Vec<f64>>()
    };
    let rho = engram::locate::spearman(&flat(&est), &flat(&exact));
    println!("attribution vs exact (hidden, small noise): Spearman {rho:.3}");
    assert!(rho > 0.8, "{rho}");
}

#[test]
fn subject_not_in_prompt_is_a_clear_error() {
    let m = real();
    let e = engram::locate::setup(
        m,
        "The Eiffel Tower is in",
        "Louvre",
        None,
        &LocateParams::default(),
    )
    .unwrap_err();
    assert!(e.is_bad_input() && e.to_string().contains("Louvre"), "{e}");
}

/// The Eiffel Tower on smollm2-135m (5 noise samples to keep the test short; the note and
/// README give the default 10-sample numbers).
#[test]
fn eiffel_tower_trace_on_smollm2() {
    let m = real();
    let p = LocateParams {
        samples: 5,
        ..Default::default()
    };
    let r = causal::trace(
        m,
        "The Eiffel Tower is located in the city of",
        "The Eiffel Tower",
        Some(" Paris"),
        &p,
        &mut || {},
    )
    .unwrap();
    println!(
        "clean P {:.4}, corrupted P {:.4}, suggested layer {}",
        r.clean_p, r.corrupted_p, r.suggested_layer
    );
    assert_eq!(r.subject_range, (0, 4));
    assert!(r.corrupted_p < r.clean_p / 5.0);
    let last_subject = &r.grids.hidden[r.subject_range.1 - 1];
    let best = (0..m.config.n_layers)
        .max_by(|&a, &b| last_subject[a].total_cmp(&last_subject[b]))
        .unwrap();
    println!(
        "strongest hidden effect at the last subject token: layer {best} ({:+.4})",
        last_subject[best]
    );
    assert!(best < 2 * m.config.n_layers / 3, "layer {best} is late");
    assert!(r.block_evals * 2 < r.naive_block_evals);

    // Window cells against a naive full restoration with the same noise, at the last subject
    // token: layers 0 and 2 share the rows of layer 5's window (all start at layer 0) until
    // their own windows end at layers 5 and 7; layer 9's window starts at 4, alone.
    let s = engram::locate::setup(
        m,
        "The Eiffel Tower is located in the city of",
        "The Eiffel Tower",
        Some(" Paris"),
        &p,
    )
    .unwrap();
    let (i, t, n) = (3, s.prompt_ids.len(), m.config.n_layers);
    let mut clean = Trace::new();
    for l in 0..n {
        clean.capture(HookPoint::MlpOut(l));
        clean.capture(HookPoint::AttnOut(l));
    }
    m.forward(&Batch::single(&s.prompt_ids), &mut clean)
        .unwrap();
    let batch = Batch {
        ids: vec![s.prompt_ids.clone(); p.samples],
        mask: None,
    };
    for l in [0usize, 2, 5, 9] {
        for (kind, point) in [
            ("mlp", HookPoint::MlpOut as fn(usize) -> HookPoint),
            ("attn", HookPoint::AttnOut),
        ] {
            let mut tr = Trace::new();
            tr.push(
                HookPoint::Embed,
                Positions::Tokens((0..4).collect()),
                Op::Noise {
                    std: s.noise_std,
                    seed: p.seed,
                },
            );
            let (lo, hi) = engram::locate::window(l, p.window, n);
            for j in lo..hi {
                let src = clean.get(point(j)).unwrap();
                let src = src
                    .broadcast_as((p.samples, t, src.dim(2).unwrap()))
                    .unwrap()
                    .contiguous()
                    .unwrap();
                tr.push(point(j), Positions::Tokens(vec![i]), Op::Replace(src));
            }
            let naive = p_target(&m.forward(&batch, &mut tr).unwrap(), s.target_id as usize)
                - r.corrupted_p;
            let grid = if kind == "mlp" {
                &r.grids.mlp
            } else {
                &r.grids.attn
            };
            assert!(
                (naive - grid[i][l]).abs() < 1e-4,
                "{kind} ({i},{l}): naive {naive} vs traced {}",
                grid[i][l]
            );
        }
    }
}

/// The CLI's JSON carries the documented keys and the plot is an SVG with three panels.
#[test]
fn locate_cli_writes_json_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let (j, p) = (dir.path().join("t.json"), dir.path().join("t.svg"));
    let out = crate::common::engram()
        .args([
            "locate",
            "--prompt",
            "The Eiffel Tower is located in the city of",
            "--subject",
            "The Eiffel Tower",
        ])
        .args([
            "--method",
            "attribution",
            "--json",
            j.to_str().unwrap(),
            "--plot",
            p.to_str().unwrap(),
            "--peak",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&j);
    // --peak: the trace's rate and the matmul peak of the same process, both positive.
    for k in ["linear_gflops", "matmul_peak_gflops"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {}", v[k]);
    }
    for k in [
        "clean_p",
        "corrupted_p",
        "tokens",
        "subject_range",
        "suggested_layer",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    assert_eq!(
        v["target"], " Paris",
        "default target is the greedy next token"
    );
    for k in ["hidden", "mlp", "attn"] {
        let g = v["grids"][k].as_array().unwrap();
        assert_eq!(g.len(), 10);
        assert_eq!(g[0].as_array().unwrap().len(), 30);
    }
    let svg = std::fs::read_to_string(&p).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<rect x=").count() >= 3 * 10 * 30);
}
