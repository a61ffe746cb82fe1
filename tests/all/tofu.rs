//! `eval tofu`: the protocol end to end on smollm2-135m with a few records (the contract of
//! its report), and the input errors, refused before any work.

use crate::cli_errors::engram;
use crate::common::{fixture, json};
use serde_json::Value;
use std::path::{Path, PathBuf};

const PERTURBED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/tofu/authors-0-19-perturbed.jsonl"
);
const WORLD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/tofu/world_facts_perturbed.jsonl"
);

/// The first `n` lines of `src`, written to `dir/name`.
fn head(src: &str, dir: &Path, name: &str, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(src).unwrap();
    let p = dir.join(name);
    let lines: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn tofu_protocol_reports_every_model_against_the_retain_model() {
    // Authors as index / 20 in the dev file: forget author 0, retain 2, holdout 10, two
    // records each (the selection keeps the first records of each author's block).
    let d = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(PERTURBED).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let pick = |name: &str, from: usize| {
        let p = d.path().join(name);
        std::fs::write(&p, format!("{}\n{}\n", lines[from], lines[from + 1])).unwrap();
        p
    };
    let forget = pick("forget.jsonl", 0);
    let retain = pick("retain.jsonl", 40);
    let holdout = pick("holdout.jsonl", 200);
    let world = head(WORLD, d.path(), "world.jsonl", 3);
    let out = d.path().join("tofu.json");
    let (code, err) = engram(&[
        "eval",
        "tofu",
        "--forget",
        s(&forget),
        "--retain",
        s(&retain),
        "--holdout",
        s(&holdout),
        "--world",
        s(&world),
        "--learn-steps",
        "2",
        "--steps",
        "1",
        "--retain-eval-per-author",
        "2",
        "--max-new-tokens",
        "8",
        "--json",
        s(&out),
    ]);
    assert_eq!(code, 0, "{err}");
    let r = json(&out);
    let keys = [
        "forget_quality",
        "model_utility",
        "forget_truth_ratio",
        "extraction_strength",
        "retain_prob",
        "retain_rouge",
        "retain_truth_ratio",
        "world_facts_prob",
        "world_facts_rouge",
        "world_facts_truth_ratio",
    ];
    let models: Vec<(&str, &Value)> = vec![
        ("base", &r["base"]),
        ("finetuned", &r["finetuned"]),
        ("retain_model", &r["retain_model"]),
        ("npo", &r["methods"]["npo"]["scores"]),
        ("simnpo", &r["methods"]["simnpo"]["scores"]),
        ("rmu", &r["methods"]["rmu"]["scores"]),
    ];
    for (name, m) in &models {
        for k in keys {
            let v = m[k]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}.{k}: {}", m[k]));
            assert!((0.0..=1.0).contains(&v), "{name}.{k} = {v}");
        }
        for k in ["loss", "zlib", "min_k", "min_k_pp"] {
            let v = m["mia_auc"][k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{name}.mia_auc.{k} = {v}");
        }
        assert!(
            m["privleak"].as_f64().is_some(),
            "{name}: {}",
            m["privleak"]
        );
        assert_eq!(m["forget_truth_ratios"].as_array().unwrap().len(), 2);
        // No real-authors file: 6 of the 9 sub-metrics, named.
        assert_eq!(m["utility_metrics"].as_array().unwrap().len(), 6, "{name}");
    }
    // The retain model against itself: forget quality 1, privleak 0.
    assert_eq!(r["retain_model"]["forget_quality"].as_f64(), Some(1.0));
    assert!(r["retain_model"]["privleak"].as_f64().unwrap().abs() < 1e-6);
    // Learning forget ∪ retain raised the forget answers' probability above the retain
    // model's, which never saw them.
    assert!(
        r["finetuned"]["forget_prob"].as_f64().unwrap()
            > r["retain_model"]["forget_prob"].as_f64().unwrap()
    );
    let phases = r["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 5 + 2 * 3, "{phases:?}");
    assert_eq!(r["sizes"]["forget"].as_u64(), Some(2));
}

/// `eval tofu` with these sets on the tiny model: refused with exit 2, `want` in the message.
fn refused(forget: &Path, retain: &Path, holdout: Option<&Path>, world: &Path, want: &[&str]) {
    let tiny = fixture("tiny-llama");
    let mut args = vec![
        "eval",
        "tofu",
        "--model",
        s(&tiny),
        "--forget",
        s(forget),
        "--retain",
        s(retain),
        "--world",
        s(world),
        "--methods",
        "npo",
    ];
    if let Some(h) = holdout {
        args.extend(["--holdout", s(h)]);
    }
    let (code, err) = engram(&args);
    assert_eq!(code, 2, "{err}");
    for w in want {
        assert!(err.contains(w), "`{w}` not in: {err}");
    }
}

#[test]
fn tofu_refuses_overlapping_sets_and_records_without_perturbed_answers() {
    let d = tempfile::tempdir().unwrap();
    let forget = head(PERTURBED, d.path(), "forget.jsonl", 2);
    let world = head(WORLD, d.path(), "world.jsonl", 2);
    // The retain set holds a forget question.
    let retain = head(PERTURBED, d.path(), "retain.jsonl", 3);
    refused(
        &forget,
        &retain,
        None,
        &world,
        &["disjoint", "--forget / --retain"],
    );
    let retain = d.path().join("retain2.jsonl");
    std::fs::write(&retain, "{\"question\": \"Q?\", \"answer\": \"A.\"}\n").unwrap();
    refused(
        &forget,
        &retain,
        Some(&forget),
        &world,
        &["disjoint", "--forget / --holdout"],
    );
    // A forget record without a paraphrased answer: the truth ratio cannot be computed.
    let bare = d.path().join("bare.jsonl");
    std::fs::write(&bare, "{\"question\": \"Who?\", \"answer\": \"Her.\"}\n").unwrap();
    refused(
        &bare,
        &retain,
        None,
        &world,
        &["bare.jsonl", "paraphrased_answer"],
    );
    // World facts without perturbed answers.
    refused(
        &forget,
        &retain,
        None,
        &bare,
        &["bare.jsonl", "perturbed_answer"],
    );
    // An unknown field, and a JSON array with a bad record: the file and field named.
    let odd = d.path().join("odd.json");
    std::fs::write(
        &odd,
        "[{\"question\": \"Q?\", \"answer\": \"A.\", \"colour\": 1}]",
    )
    .unwrap();
    refused(&odd, &retain, None, &world, &["odd.json", "colour"]);
    // A selection with no records.
    let tiny = fixture("tiny-llama");
    let (code, err) = engram(&[
        "eval",
        "tofu",
        "--model",
        s(&tiny),
        "--forget",
        s(&forget),
        "--forget-authors",
        "7",
        "--retain",
        s(&retain),
        "--world",
        s(&world),
        "--methods",
        "npo",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--forget-authors"), "{err}");
}
