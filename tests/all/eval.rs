//! Evaluation on smollm2-135m: locality reports and the CounterFact runner.

use crate::common::*;
use engram::eval::metrics::{locality, run_suite, Suite};
use std::path::Path;

fn suite() -> Suite {
    Suite::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/eval/unrelated.yaml"
    )))
    .unwrap()
}

#[test]
fn default_suite_is_large_enough() {
    let s = suite();
    assert!(s.prompts.len() >= 200 && s.texts.len() >= 20);
}

#[test]
fn compare_against_itself_and_a_scaled_copy() {
    let m = real();
    let s = suite();
    let base = run_suite(m, &s).unwrap();
    let same = locality(&base, &run_suite(m, &s).unwrap()).unwrap();
    assert_eq!(same.kl_mean, 0.0);
    assert_eq!(same.top1_agreement, 1.0);
    assert_eq!(same.perplexity_base, same.perplexity_edited);
    let mut scaled = m.clone();
    let w = (scaled.weight(3, engram::model::Site::MlpOut).unwrap() * 1.1).unwrap();
    scaled
        .set_weight(3, engram::model::Site::MlpOut, w)
        .unwrap();
    let moved = locality(&base, &run_suite(&scaled, &s).unwrap()).unwrap();
    println!(
        "scaled layer 3 MLP out by 1.1: KL {:.3e}, agreement {:.3}",
        moved.kl_mean, moved.top1_agreement
    );
    assert!(moved.kl_mean > 0.0);
}

/// The runner on 20 records (FT-L, cheap), with ES_pre checked a second way.
#[test]
fn counterfact_runner_on_20_records() {
    let data = Path::new(CF_DEV);
    let cases = engram::bench::counterfact::load(data, 0, 20).unwrap();
    assert_eq!(cases.len(), 20);
    let mut m = real().clone();
    let method = engram::edit::spec::Method::Ft(engram::edit::ft::FtParams {
        layer: Some(5),
        steps: 3,
        lr: 5e-4,
        norm_constraint: 5e-4,
    });
    let dir = tempfile::tempdir().unwrap();
    let resume = dir.path().join("rows.jsonl");
    let rows = engram::bench::counterfact::run(
        &mut m,
        method.clone(),
        &cases,
        1,
        Default::default(),
        Some(&resume),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(rows.len(), 20);
    assert_eq!(
        std::fs::read_to_string(&resume).unwrap().lines().count(),
        20
    );
    let s = engram::bench::counterfact::summarise(&rows, "ft");
    // Second way: P(new) > P(true) straight from the log-probabilities.
    let mut wins = 0;
    for c in &cases {
        let r = &c.rewrite;
        let new = format!(" {}", r.target_new);
        let old = format!(" {}", r.target_true.as_ref().unwrap());
        let lp =
            engram::eval::target_logprobs(real(), &[(&r.prompt, &new), (&r.prompt, &old)]).unwrap();
        wins += (lp[0].mean_logprob > lp[1].mean_logprob) as usize;
    }
    assert_eq!(s.es_pre, wins as f64 / 20.0);
    // Generation-based scores agree with the texts the rows carry.
    use engram::eval::generation::contains_answer;
    let said: Vec<f64> = rows
        .iter()
        .zip(&cases)
        .map(|(row, c)| contains_answer(&row.pre.gen.gen_text, &c.rewrite.target_new) as u8 as f64)
        .collect();
    assert_eq!(s.gen_es_pre, said.iter().sum::<f64>() / 20.0);
    assert!(rows.iter().all(|r| !r.pre.gen.gen_text.is_empty()));
    assert_eq!(
        m.fingerprint().unwrap(),
        real().fingerprint().unwrap(),
        "every case reverts"
    );
    // Resuming skips what is done.
    let again = engram::bench::counterfact::run(
        &mut m,
        method,
        &cases,
        1,
        Default::default(),
        Some(&resume),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(again.len(), 20);
    assert_eq!(
        std::fs::read_to_string(&resume).unwrap().lines().count(),
        20
    );
}

/// The CounterFact runner's re-quantized scores (edited tensors fake-quantized in memory)
/// equal those `edit` measures on the GGUF file it wrote and reloaded, for the same FT-L edit.
#[test]
fn requantized_scores_match_the_written_file() {
    let d = tempfile::tempdir().unwrap();
    let data = CF_DEV;
    let first = std::fs::read_to_string(data).unwrap();
    let rec: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    let s = |k: &str| rec[k].as_str().unwrap().to_string();
    let spec = d.path().join("case0.yaml");
    let yaml = serde_json::json!({
        "method": {"method": "ft", "layer": 5},
        "rewrites": [{
            "prompt": s("prompt"), "subject": s("subject"), "target_new": s("target_new"),
            "target_true": s("ground_truth"), "paraphrases": [s("rephrase_prompt")],
            "neighborhood": [{"prompt": s("locality_prompt"), "answer": s("locality_ground_truth")}],
        }],
    });
    std::fs::write(&spec, serde_yaml::to_string(&yaml).unwrap()).unwrap();
    let (ej, cj) = (d.path().join("edit.json"), d.path().join("cf.json"));
    let run = |args: &[&str]| {
        let out = crate::common::engram()
            .args(args)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "edit",
        spec.to_str().unwrap(),
        "--no-locality",
        "--json",
        ej.to_str().unwrap(),
    ]);
    run(&[
        "eval",
        "counterfact",
        "--data",
        data,
        "--method",
        "ft",
        "--layer",
        "5",
        "--n",
        "1",
        "--json",
        cj.to_str().unwrap(),
    ]);
    let e = json(&ej);
    let c = json(&cj);
    let file = &e["rewrites"][0]["requantized"];
    let mem = &c["summary"];
    println!("file: {file}\nmemory: {mem}");
    for (f, m) in [
        ("es", "requant_es"),
        ("ps", "requant_ps"),
        ("ns", "requant_ns"),
        ("gen_es", "requant_gen_es"),
    ] {
        assert_eq!(file[f].as_f64().unwrap(), mem[m].as_f64().unwrap(), "{f}");
    }
    let margin = (file["es_margin"].as_f64().unwrap()
        - c["cases"][0]["requant"]["es_margin"].as_f64().unwrap())
    .abs();
    assert!(margin < 1e-6, "ES margin differs by {margin}");
}

/// `eval counterfact --wild --out-type auto`: the free-generation scores count what the rows'
/// answers say, and the re-quantized scores are taken at the types chosen per case, which
/// keep every outcome of the f32 edit.
#[test]
fn counterfact_runner_takes_wild_and_auto_types() {
    let d = tempfile::tempdir().unwrap();
    let cj = d.path().join("cf.json");
    let out = crate::common::engram()
        .args([
            "eval",
            "counterfact",
            "--data",
            CF_DEV,
            "--method",
            "ft",
            "--layer",
            "5",
        ])
        .args(["--n", "2", "--wild", "--out-type", "auto", "--json"])
        .arg(&cj)
        .current_dir(d.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("WILD") && stdout.contains("auto"),
        "{stdout}"
    );
    let c = json(&cj);
    let s = &c["summary"];
    let cases = c["cases"].as_array().unwrap();
    let data = engram::bench::counterfact::load(Path::new(CF_DEV), 0, 2).unwrap();
    let mut said = 0.0;
    for (row, case) in cases.iter().zip(&data) {
        let w = &row["pre"]["wild"];
        let text = w["gen_text"].as_str().unwrap();
        assert!(!text.is_empty());
        said +=
            engram::eval::generation::contains_answer(text, &case.rewrite.target_new) as u8 as f64;
        assert!(row["post"]["wild"]["gen_text"].is_string());
        let types = row["out_types"].as_array().unwrap();
        assert!(!types.is_empty(), "{row}");
        for t in types {
            assert!(
                ["Q4_1", "Q8_0", "F16"].contains(&t["chosen_type"].as_str().unwrap()),
                "{t}"
            );
        }
        for k in ["es", "ps", "ns", "gen_es", "gen_ps", "gen_ns"] {
            assert_eq!(
                row["requant"][k], row["post"][k],
                "{k}: the chosen types keep the edit"
            );
        }
    }
    assert_eq!(s["wild_es_pre"].as_f64().unwrap(), said / 2.0);
    let counted: u64 = s["out_types"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        counted as usize,
        cases
            .iter()
            .map(|r| r["out_types"].as_array().unwrap().len())
            .sum::<usize>()
    );
}

/// Stopping a row once its first sentence is settled gives exactly the text of decoding all
/// 20 tokens and cutting afterwards.
#[test]
fn early_stopping_changes_no_generated_text() {
    use engram::eval::generation::{continuations, first_sentence, GEN_TOKENS};
    let m = real();
    let data = Path::new(CF_DEV);
    let cases = engram::bench::counterfact::load(data, 0, 6).unwrap();
    let mut prompts: Vec<&str> = Vec::new();
    for c in &cases {
        prompts.push(&c.rewrite.prompt);
        prompts.extend(c.rewrite.paraphrases.iter().map(String::as_str));
    }
    let fast = continuations(m, &prompts).unwrap();
    let tok = m.tok().unwrap();
    let rows: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode(p).unwrap()).collect();
    let p = engram::model::generate::GenParams {
        max_new_tokens: GEN_TOKENS,
        ..Default::default()
    };
    let full = engram::model::generate::generate(m, &rows, &p).unwrap();
    for (f, ids) in fast.iter().zip(full) {
        let text = tok.decode(&ids).unwrap();
        assert_eq!(f, first_sentence(&text), "full text {text:?}");
    }
}

/// `eval counterfact` without `--layer`: the default model's documented layer, or for a model
/// engram does not know, the layer causal tracing suggests on the data's own facts; the
/// report says which.
#[test]
fn counterfact_without_a_layer_says_which_it_chose() {
    let d = tempfile::tempdir().unwrap();
    let data = CF_DEV;
    let copy = d.path().join("copy.gguf");
    std::fs::copy(&real().source.path, &copy).unwrap();
    for (model, want) in [
        (None, "documented default"),
        (Some(&copy), "causal tracing"),
    ] {
        let j = d.path().join("cf.json");
        let mut c = crate::common::engram();
        c.args([
            "eval",
            "counterfact",
            "--data",
            data,
            "--method",
            "ft",
            "--n",
            "1",
        ])
        .args(["--json", j.to_str().unwrap()])
        .current_dir(d.path());
        if let Some(m) = model {
            c.args(["--model", m.to_str().unwrap()]);
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.contains(want), "{err}");
        let v = json(&j);
        assert!(v["layer_choice"].as_str().unwrap().contains(want));
        assert_eq!(v["layers"], serde_json::json!([5]), "{}", v["layer_choice"]);
    }
}
