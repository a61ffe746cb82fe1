//! Lifelong editing: resumable sequential runs and NAS (`alphaedit-nas`).

use crate::common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// `eval counterfact --sequential` on `n` cases in batches of 2 with AlphaEdit + NAS at
/// layers 5-6, with extra flags.
fn seq_n(dir: &Path, n: &str, json: &str, extra: &[&str]) -> Command {
    let mut c = engram();
    c.args([
        "eval",
        "counterfact",
        "--data",
        CF_DEV,
        "--method",
        "alphaedit-nas",
    ])
    .args([
        "--layer",
        "5-6",
        "--n",
        n,
        "--batch-size",
        "2",
        "--sequential",
    ])
    .args(["--json", json])
    .args([
        "--suite",
        concat!(env!("CARGO_MANIFEST_DIR"), "/eval/unrelated.yaml"),
    ])
    .args(extra)
    .current_dir(dir);
    c
}

fn seq_cmd(dir: &Path, json: &str, extra: &[&str]) -> Command {
    seq_n(dir, "6", json, extra)
}

fn ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    err
}

/// The batches a state file says are done (its safetensors header's run metadata).
fn batches_done(state: &Path) -> Option<u64> {
    let bytes = std::fs::read(state).ok()?;
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(bytes.get(8..8 + n)?).ok()?;
    let run: serde_json::Value =
        serde_json::from_str(header["__metadata__"]["engram_run"].as_str()?).ok()?;
    run["batches_done"].as_u64()
}

/// The report without its timings (which differ between runs).
fn numbers(path: &Path) -> serde_json::Value {
    let mut v = json(path);
    for row in v["cases"].as_array_mut().unwrap() {
        let row = row.as_object_mut().unwrap();
        for k in ["edit_seconds", "eval_seconds", "eval_split"] {
            row.remove(k);
        }
    }
    let s = v["summary"].as_object_mut().unwrap();
    s.retain(|k, _| !k.contains("seconds") && !k.contains("eval_split"));
    v.as_object_mut().unwrap().remove("edit_seconds_mean");
    let seq = v["sequential"].as_object_mut().unwrap();
    for k in ["seconds_total", "batch_seconds", "resumed_at_batch"] {
        seq.remove(k);
    }
    v
}

/// A run stopped by `--max-batches`, then killed mid-run, then resumed ends with exactly the
/// numbers of an uninterrupted run: per-case scores, retention, first-batch ES, fluency,
/// locality and NAS's reference norm.
#[test]
fn a_killed_sequential_run_resumes_to_the_same_numbers() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("run.state");
    let state_s = state.to_str().unwrap();
    let t0 = Instant::now();
    ok(seq_cmd(d.path(), "whole.json", &[]));
    println!("uninterrupted run: {:.0} s", t0.elapsed().as_secs_f64());

    // 1. Stop cleanly after one batch.
    let err = ok(seq_cmd(
        d.path(),
        "parts.json",
        &["--resume", state_s, "--max-batches", "1"],
    ));
    assert!(err.contains("stopped after"), "{err}");
    assert!(
        !d.path().join("parts.json").exists(),
        "no report before the end"
    );
    assert_eq!(batches_done(&state), Some(1));

    // 2. Resume, and kill the process as soon as the second batch is saved (during the third).
    let mut child = seq_cmd(d.path(), "parts.json", &["--resume", state_s])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    while batches_done(&state) != Some(2) {
        assert!(Instant::now() < deadline, "the second batch never came");
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed, not finished: {status}");
    assert!(!d.path().join("parts.json").exists());
    assert_eq!(batches_done(&state), Some(2), "the state survives the kill");

    // 3. Resume to the end.
    let err = ok(seq_cmd(d.path(), "parts.json", &["--resume", state_s]));
    assert!(err.contains("resumed after 2 batches"), "{err}");
    let parts = numbers(&d.path().join("parts.json"));
    let whole = numbers(&d.path().join("whole.json"));
    assert_eq!(parts, whole, "resumed and uninterrupted runs differ");
    let seq = &whole["sequential"];
    assert_eq!(seq["retention"].as_array().unwrap().len(), 3);
    assert_eq!(seq["first_batch"].as_array().unwrap().len(), 2);
    assert!(seq["norm_anchor"]["reference"].as_f64().unwrap() > 0.0);
    assert!(seq["locality"]["kl_mean"].as_f64().unwrap() >= 0.0);
    assert_eq!(
        json(&d.path().join("parts.json"))["sequential"]["resumed_at_batch"],
        2
    );

    // 4. The state belongs to its run: other flags are refused, naming what differs.
    let out = seq_n(d.path(), "4", "other.json", &["--resume", state_s])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--resume") && err.contains("cases or batch size"),
        "{err}"
    );
    assert!(!d.path().join("other.json").exists());
}

/// A sequential spec run (`edit --resume`) that dies after its first batch resumes from the
/// state and ends with the uninterrupted run's scores, retention and edited weights; the
/// patch of the resumed run restores the unedited model exactly.
#[test]
fn a_crashed_sequential_spec_resumes_to_the_same_report() {
    use engram::edit::run::run_spec_resumable;
    use engram::edit::spec::{EditSpec, Method, Sequential};
    let mut spec = EditSpec::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/edits/memit-ten.yaml"
    )))
    .unwrap();
    spec.method = Method::by_name("alphaedit-nas").unwrap();
    spec.method.set_layers(vec![5, 6]);
    spec.sequential = Some(Sequential { batch_size: 5 });
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("spec.state");

    let mut whole_m = real().clone();
    let (whole, _, _) = run_spec_resumable(&mut whole_m, &spec, None, None, &mut |_| {}).unwrap();

    // The progress callback dies when the second batch starts: the first batch's state is saved.
    let mut crashed = real().clone();
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_spec_resumable(&mut crashed, &spec, None, Some(&state), &mut |msg| {
            assert!(!msg.starts_with("batch 1"), "simulated crash");
        })
    }));
    assert!(died.is_err(), "the run was meant to die");
    assert_eq!(batches_done(&state), Some(1));

    let mut m = real().clone();
    let mut said = Vec::new();
    let (resumed, deltas, applied) =
        run_spec_resumable(&mut m, &spec, None, Some(&state), &mut |msg| {
            said.push(msg.to_string())
        })
        .unwrap();
    assert!(
        said.iter().any(|s| s == "resumed after 1 batches"),
        "{said:?}"
    );
    let scores = |r: &engram::edit::run::EditReport| {
        serde_json::to_value(
            r.rewrites
                .iter()
                .map(|w| (&w.pre, &w.post, w.batch))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    };
    assert_eq!(scores(&resumed), scores(&whole));
    assert_eq!(
        serde_json::to_value(&resumed.retention).unwrap(),
        serde_json::to_value(&whole.retention).unwrap()
    );
    assert_eq!(resumed.edited_fingerprint, whole.edited_fingerprint);
    // One dense delta per tensor for the first batch, then the second batch's own.
    assert_eq!(deltas.len(), 2 + 2);
    engram::edit::revert(&mut m, &applied).unwrap();
    assert_eq!(m.fingerprint().unwrap(), real().fingerprint().unwrap());
}

/// NAS's targets on a tiny GPT-2 (its MLP output has a bias): the first batch sets the
/// reference norm m (the mean of |v*| = |W k + b + δ| after dropping the top 5%); each target
/// is h - v0 + v* rescaled to norm m; a v* longer than 2 m is left out (target h).
#[test]
fn nas_rescales_value_vectors_to_the_reference_norm() {
    use candle_core::{DType, Device, Tensor};
    use engram::edit::nas::NormAnchor;
    use engram::edit::vsearch::{Found, SearchTrace};
    use engram::model::Site;
    let m = tiny("tiny-gpt2");
    let (d, dm) = (m.config.d_model, m.config.d_mlp);
    let layer = 1;
    let found = |seed: u64, scale: f64| -> Found {
        let r = |n: usize, s: u64| {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i as u64 * 7919 + s * 104_729) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            Tensor::from_vec(v, n, &Device::Cpu).unwrap()
        };
        Found {
            k_star: r(dm, seed),
            k_bare: r(dm, seed),
            h_mean: r(d, seed + 1),
            h_bare: r(d, seed + 1),
            delta: (r(d, seed + 2) * scale).unwrap(),
            trace: SearchTrace {
                layer,
                steps: 1,
                target_prob: 1.0,
                nll: 0.0,
                kl: 0.0,
                delta_norm: 0.0,
                n_prompts: 1,
                seconds: 0.0,
            },
        }
    };
    let v0 = |f: &Found| -> Tensor {
        let w = m.weight(layer, Site::MlpOut).unwrap();
        let b = m
            .weights
            .get(&format!("h.{layer}.mlp.c_proj.bias"))
            .unwrap();
        (w.matmul(&f.k_bare.unsqueeze(1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap()
            + b)
            .unwrap()
    };
    let norm = |t: &Tensor| -> f64 {
        t.to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let first: Vec<Found> = (0..4).map(|i| found(i, 1.0 + i as f64)).collect();
    let norms: Vec<f64> = first
        .iter()
        .map(|f| norm(&(v0(f) + &f.delta).unwrap()))
        .collect();
    let mut a = NormAnchor::default();
    let z = a.targets(&m, layer, &first).unwrap(); // (d, 4)
    let ref_m = a.reference.unwrap();
    let mean = norms.iter().sum::<f64>() / 4.0;
    assert!(
        (ref_m - mean).abs() < 1e-5 * mean,
        "4 values, none dropped: {ref_m} vs {mean}"
    );
    for (i, f) in first.iter().enumerate() {
        let col = z.narrow(1, i, 1).unwrap().squeeze(1).unwrap();
        let h = f.h_bare.to_dtype(DType::F64).unwrap();
        let v_star = ((&col - &h).unwrap() + v0(f).to_dtype(DType::F64).unwrap()).unwrap();
        if norms[i] > 2.0 * ref_m {
            assert!(norm(&(&col - &h).unwrap()) < 1e-5, "skipped: target h");
        } else {
            assert!((norm(&v_star) - ref_m).abs() < 1e-4 * ref_m, "rewrite {i}");
        }
    }
    // A later batch keeps m; a huge delta is left out.
    let later = vec![found(9, 1.0), found(10, 1e4)];
    let z = a.targets(&m, layer, &later).unwrap();
    assert_eq!(a.reference, Some(ref_m));
    assert_eq!(a.skipped, 1);
    let col = z.narrow(1, 1, 1).unwrap().squeeze(1).unwrap();
    let h = later[1].h_bare.to_dtype(DType::F64).unwrap();
    assert!(norm(&(col - h).unwrap()) < 1e-5);
}

/// Bad uses of the resumable run's flags exit 2 naming the flag, before any work.
#[test]
fn resume_flags_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let cf = |extra: &[&str]| {
        let out = engram()
            .args(["eval", "counterfact", "--data", CF_DEV, "--n", "2"])
            .args(extra)
            .current_dir(d.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for (extra, flag) in [
        (
            &["--max-batches", "1", "--resume", "s.state"][..],
            "--max-batches",
        ),
        (&["--retention-every", "100"][..], "--retention-every"),
        (&["--sequential", "--max-batches", "1"][..], "--max-batches"),
        (
            &["--sequential", "--max-batches", "0", "--resume", "s.state"][..],
            "--max-batches",
        ),
    ] {
        let (code, err) = cf(extra);
        assert_eq!(code, Some(2), "{extra:?}: {err}");
        assert!(err.contains(flag), "{extra:?}: {err}");
    }
    // A file that is not a run state.
    std::fs::write(d.path().join("junk.state"), b"not a state").unwrap();
    let (code, err) = cf(&[
        "--sequential",
        "--method",
        "alphaedit",
        "--layer",
        "5-6",
        "--no-locality",
        "--resume",
        "junk.state",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--resume") && err.contains("junk.state"),
        "{err}"
    );
    // `edit --resume` may not be another output.
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/edits/eiffel-rome.yaml");
    let out = engram()
        .args([
            "edit",
            spec,
            "--no-locality",
            "--json",
            "r.json",
            "--resume",
            "r.json",
        ])
        .current_dir(d.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--resume") && err.contains("--json"), "{err}");
    assert!(!d.path().join("r.json").exists());
}
