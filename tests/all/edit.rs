//! Editing: ROME and FT-L on smollm2-135m, patches, specs and their errors.

use crate::cli_errors::engram;
use crate::common::*;
use engram::edit::spec::EditSpec;
use engram::edit::{apply, patch, revert};
use engram::fact::Rewrite;
use std::path::Path;

fn eiffel() -> Rewrite {
    EditSpec::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/edits/eiffel-rome.yaml"
    )))
    .unwrap()
    .rewrites
    .remove(0)
}

/// The Eiffel Tower moves to Rome; a paraphrase follows; the Louvre stays in Paris. Compute
/// leaves the model unchanged; apply then revert restores it bit for bit; the patch file
/// applies to the base and reverts exactly, and refuses the wrong base.
#[test]
fn rome_moves_the_eiffel_tower_to_rome() {
    let base = real();
    let fp0 = base.fingerprint().unwrap();
    let r = eiffel();
    let (delta, trace) = rome_editor().lock().unwrap().compute(base, &r).unwrap();
    assert_eq!(
        base.fingerprint().unwrap(),
        fp0,
        "compute must not change the model"
    );
    println!("v* search: {:?}", trace);

    let mut m = base.clone();
    let applied = apply(&mut m, &delta).unwrap();
    let moved = greedy(&m, "The Eiffel Tower is located in the city of", 4);
    let para = greedy(&m, "The Eiffel Tower can be found in the city of", 4);
    let louvre = greedy(&m, "The Louvre is located in the city of", 4);
    println!("edited: {moved:?} | paraphrase: {para:?} | Louvre: {louvre:?}");
    assert!(moved.contains("Rome"), "{moved:?}");
    assert!(para.contains("Rome"), "{para:?}");
    assert!(louvre.contains("Paris"), "{louvre:?}");
    // Generation-based scores: what the model says before and after.
    let pre = engram::eval::metrics::score_rewrite(base, &r).unwrap();
    let post = engram::eval::metrics::score_rewrite(&m, &r).unwrap();
    println!(
        "says before {:?}, after {:?}",
        pre.gen.gen_text, post.gen.gen_text
    );
    assert_eq!(pre.gen.gen_es, 0.0);
    assert!(pre.gen.gen_text.contains("Paris"), "{:?}", pre.gen.gen_text);
    assert_eq!(post.gen.gen_es, 1.0);
    assert!(
        post.gen.gen_text.contains("Rome"),
        "{:?}",
        post.gen.gen_text
    );
    let fp1 = m.fingerprint().unwrap();
    assert_ne!(fp1, fp0);

    // Patch file: apply to a fresh base gives the same weights; revert restores the base.
    let dir = tempfile::tempdir().unwrap();
    let pp = dir.path().join("eiffel.engram.safetensors");
    let meta = patch::PatchMeta {
        engram_version: "test".into(),
        method: "rome".into(),
        spec: String::new(),
        base_fingerprint: fp0.clone(),
        edited_fingerprint: fp1.clone(),
        deltas: vec![(delta.name.clone(), delta.layer, "rank_one".into())],
    };
    patch::write(
        &pp,
        &meta,
        std::slice::from_ref(&delta),
        std::slice::from_ref(&applied),
    )
    .unwrap();
    let pt = patch::read(&pp).unwrap();
    let mut fresh = base.clone();
    patch::apply(&mut fresh, &pt, &pp).unwrap();
    assert_eq!(fresh.fingerprint().unwrap(), fp1);
    let e = patch::apply(&mut fresh, &pt, &pp).unwrap_err();
    assert!(e.is_bad_input() && e.to_string().contains("base"), "{e}");
    patch::revert(&mut fresh, &pt, &pp).unwrap();
    assert_eq!(fresh.fingerprint().unwrap(), fp0);

    revert(&mut m, &[applied]).unwrap();
    let w0 = base.weights.get(&delta.name).unwrap();
    assert_eq!(max_abs_diff(w0, m.weights.get(&delta.name).unwrap()), 0.0);
    assert_eq!(m.fingerprint().unwrap(), fp0);
}

#[test]
fn ft_l_respects_its_norm_bound_and_raises_the_target() {
    let base = real();
    let r = eiffel();
    let p = engram::edit::ft::FtParams {
        layer: Some(5),
        steps: 10,
        lr: 5e-4,
        norm_constraint: 5e-4,
    };
    let d = engram::edit::ft::compute(base, 5, &r.prompt, " Rome", &p).unwrap();
    let dense = d.dense().unwrap();
    let linf = max_abs(&dense);
    assert!(linf <= 5e-4 + 1e-7, "{linf}");
    let before = engram::eval::metrics::score_rewrite(base, &r).unwrap();
    let mut m = base.clone();
    apply(&mut m, &d).unwrap();
    let after = engram::eval::metrics::score_rewrite(&m, &r).unwrap();
    println!("FT-L P(Rome): {:.4} -> {:.4}", before.p_new, after.p_new);
    assert!(after.p_new > before.p_new);
}

/// Bad specs: a clear error naming the file and field, exit code 2, nothing written.
#[test]
fn bad_specs_exit_2_and_write_nothing() {
    let good = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/edits/eiffel-rome.yaml"
    ))
    .unwrap();
    let cases = [
        (
            good.replace("subject: \"The Eiffel Tower\"", "subject: \"Big Ben\""),
            "rewrites[0].subject",
        ),
        (
            good.replace("target_new: \"Rome\"", "target_new: \"\""),
            "rewrites[0].target_new",
        ),
        (good.replace("layer: 5 ", "layer: 99 "), "method.layer"),
        (good.replace("method: rome", "method: romeo"), "romeo"),
        (
            good.replace("layer: 5 ", "layer: 5\n  kl_factr: 1 "),
            "kl_factr",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (text, needle)) in cases.iter().enumerate() {
        let spec = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&spec, text).unwrap();
        let out = dir.path().join(format!("out{i}.gguf"));
        let patch = dir.path().join(format!("p{i}.engram.safetensors"));
        let (code, err) = engram(&[
            "edit",
            spec.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--patch",
            patch.to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "case {i}: {err}");
        assert!(
            err.contains(&format!("bad{i}.yaml")) && err.contains(needle),
            "case {i}: {err}"
        );
        assert!(
            !out.exists() && !patch.exists(),
            "case {i}: something was written"
        );
    }
    // Leftover temporary files would show as extra entries.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), cases.len(), "{names:?}");
}

/// Bad MEMIT / AlphaEdit specs: exit 2 naming the field, before any statistics are computed.
#[test]
fn bad_batched_specs_exit_2() {
    let good =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/edits/memit-ten.yaml"))
            .unwrap();
    let cases = [
        (
            good.replace("layers: [3, 4, 5, 6]", "layers: [3, 4, 99]"),
            "method.layers",
        ),
        (
            good.replace("layers: [3, 4, 5, 6]", "layers: [5, 3]"),
            "method.layers",
        ),
        (
            good.replace("layers: [3, 4, 5, 6]", "layers: []"),
            "method.layers",
        ),
        (
            good.replace(
                "method: memit",
                "method: alphaedit\n  mom2_update_weight: 1",
            ),
            "mom2_update_weight",
        ),
        (
            good.replace("rewrites:", "sequential: {batch_size: 0}\nrewrites:"),
            "sequential.batch_size",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (text, needle)) in cases.iter().enumerate() {
        let spec = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&spec, text).unwrap();
        let out = dir.path().join(format!("out{i}.gguf"));
        let (code, err) = engram(&[
            "edit",
            spec.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "case {i}: {err}");
        assert!(
            err.contains(&format!("bad{i}.yaml")) && err.contains(needle),
            "case {i}: {err}"
        );
        assert!(!out.exists(), "case {i}: something was written");
    }
}

/// A patch applied to the wrong base: exit 2, nothing written.
#[test]
fn patch_on_the_wrong_base_exits_2() {
    let m = tiny("tiny-llama");
    let dir = tempfile::tempdir().unwrap();
    let pp = dir.path().join("x.engram.safetensors");
    let w = m.weight(0, engram::model::Site::MlpOut).unwrap();
    let d = engram::edit::WeightDelta {
        name: "model.layers.0.mlp.down_proj.weight".into(),
        layer: 0,
        kind: engram::edit::DeltaKind::Dense(w.zeros_like().unwrap()),
    };
    let meta = patch::PatchMeta {
        engram_version: "test".into(),
        method: "ft".into(),
        spec: String::new(),
        base_fingerprint: "0".repeat(64),
        edited_fingerprint: "1".repeat(64),
        deltas: vec![(d.name.clone(), 0, "dense".into())],
    };
    let applied = engram::edit::Applied {
        name: d.name.clone(),
        previous: w.clone(),
    };
    patch::write(&pp, &meta, &[d], &[applied]).unwrap();
    let out = dir.path().join("out");
    let (code, err) = engram(&[
        "patch",
        "apply",
        pp.to_str().unwrap(),
        "--model",
        fixture("tiny-llama").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("x.engram.safetensors") && err.contains("base"),
        "{err}"
    );
    assert!(!out.exists());
}

/// `--out-type auto` on the Eiffel edit: the Q4_1 grid keeps every score, so the edited
/// matrix stays Q4_1 at no size cost, and the file carries every other tensor unchanged.
#[test]
fn out_type_auto_keeps_the_input_type_when_it_holds_the_edit() {
    let d = tempfile::tempdir().unwrap();
    let (out, j) = (d.path().join("auto.gguf"), d.path().join("auto.json"));
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/edits/eiffel-rome.yaml");
    let o = crate::common::engram()
        .args(["edit", spec, "--out-type", "auto", "--no-locality"])
        .args([
            "--out",
            out.to_str().unwrap(),
            "--json",
            j.to_str().unwrap(),
        ])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&j);
    let t = &r["out_types"][0];
    assert_eq!(t["tensor"], "model.layers.5.mlp.down_proj.weight");
    assert_eq!(t["input_type"], "Q4_1");
    assert_eq!(t["chosen_type"], "Q4_1");
    assert_eq!(t["input_bytes"], t["chosen_bytes"]);
    let q = engram::model::load(Some(out.to_str().unwrap()), &candle_core::Device::Cpu).unwrap();
    for (name, w) in real().weights.iter() {
        if name != "model.layers.5.mlp.down_proj.weight" {
            assert_eq!(
                max_abs_diff(&w.dense().unwrap(), &q.weights.dense(name).unwrap()),
                0.0,
                "{name}"
            );
        }
    }
}

/// Key statistics are cached under `target/test-stats`, not in the user's `~/.cache/engram`:
/// the shared ROME editor's layer-5 statistics are found there.
#[test]
fn key_statistics_are_cached_under_target() {
    drop(rome_editor().lock().unwrap());
    assert_eq!(
        std::env::var("ENGRAM_STATS_DIR").unwrap(),
        TEST_STATS,
        "the tests point the library at target/test-stats"
    );
    let fp = real().fingerprint().unwrap();
    let dir = Path::new(TEST_STATS).join(&fp[..16]);
    let cached: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        cached.iter().any(|f| f.starts_with("layer5-self-")),
        "{dir:?} holds {cached:?}"
    );
}

/// `stats_corpus`: key statistics from a documents file. 40 short documents give fewer keys
/// than d_mlp (1,536), so C is ridge-regularised; the edit still holds, and the statistics are
/// cached under the corpus's hash. A missing corpus is refused before any work, naming the field.
#[test]
fn stats_corpus_takes_keys_from_documents_with_a_ridge() {
    let d = tempfile::tempdir().unwrap();
    let corpus = d.path().join("docs.txt");
    let docs: Vec<String> = (0..40)
        .map(|i| {
            format!(
                "Document {i}: the river town kept {} boats and a stone bridge.",
                i * 3
            )
        })
        .collect();
    std::fs::write(&corpus, docs.join("\n\n")).unwrap();
    let spec_src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/edits/eiffel-rome.yaml"
    ))
    .unwrap();
    let with = |c: &str| {
        spec_src.replace(
            "  layer: 5",
            &format!("  layer: 5\n  stats_corpus: {c}\n  stats_samples: 100\n  stats_seq_len: 32"),
        )
    };
    let spec = d.path().join("spec.yaml");
    std::fs::write(&spec, with(corpus.to_str().unwrap())).unwrap();
    let j = d.path().join("r.json");
    let o = crate::common::engram()
        .args([
            "edit",
            spec.to_str().unwrap(),
            "--no-locality",
            "--json",
            j.to_str().unwrap(),
        ])
        .args(["--out", d.path().join("o.gguf").to_str().unwrap()])
        .current_dir(d.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&j)["rewrites"][0]["post"]["es"], 1.0);
    assert!(stdout.contains("-docs-"), "{stdout}");
    let keys: usize = stdout
        .split("key statistics: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        keys < 1536,
        "{keys} keys: the test must take the ridge path"
    );

    let missing = d.path().join("missing.yaml");
    std::fs::write(&missing, with("no-such-corpus.txt")).unwrap();
    let o = crate::common::engram()
        .args(["edit", missing.to_str().unwrap()])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("method.stats_corpus") && err.contains("no-such-corpus.txt"),
        "{err}"
    );
}
