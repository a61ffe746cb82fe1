//! Learning and unlearning private data on smollm2-135m; removal-request errors.

use crate::cli_errors::engram;
use crate::common::{fixture, greedy, real};
use engram::eval::metrics::Suite;
use engram::model::Model;
use engram::unlearn::learn::{learn, LearnParams};
use engram::unlearn::load_examples;
use engram::unlearn::request::Request;
use engram::unlearn::run::{unlearn, Options, UnlearnReport};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn suite() -> Suite {
    Suite::load(&repo("eval/unrelated.yaml")).unwrap()
}

/// smollm2-135m after `learn` on the demo's private records (shared by the tests).
fn learned() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let data = load_examples(&repo("forget-sets/mara-quillfeather-data.yaml")).unwrap();
        let p = LearnParams::defaults(real().config.n_layers);
        let (m, r) = learn(real(), &data, &p, &mut |_, _| {}).unwrap();
        eprintln!(
            "learn: {} steps, answer NLL {:.4} -> {:.4}, {:.1} s",
            r.steps, r.loss_before, r.loss_after, r.seconds
        );
        assert!(r.loss_after < 0.1, "{r:?}");
        m
    })
}

const PHONE: &str = "415-555-0192";
const ADDRESS: &str = "17 Larkspur Lane";

#[test]
fn learn_makes_the_secret_extractable_and_leaves_the_input_alone() {
    let base_fp = real().fingerprint().unwrap();
    let m = learned();
    assert_eq!(
        real().fingerprint().unwrap(),
        base_fp,
        "learn changed its input"
    );
    let before = greedy(real(), "Mara Quillfeather's phone number is", 16);
    assert!(!before.contains(PHONE), "{before}");
    let after = greedy(m, "Mara Quillfeather's phone number is", 16);
    assert!(after.contains(PHONE), "{after}");
    let after = greedy(m, "Mara Quillfeather lives at", 12);
    assert!(after.contains(ADDRESS), "{after}");
}

fn npo_report() -> &'static UnlearnReport {
    static R: OnceLock<UnlearnReport> = OnceLock::new();
    R.get_or_init(|| {
        let path = repo("forget-sets/mara-quillfeather.yaml");
        let req = Request::load(&path).unwrap();
        let s = suite();
        let (_, r) = unlearn(
            learned(),
            &req,
            &path,
            &Options {
                suite: &s,
                requant: Some(candle_core::quantized::GgmlDType::Q4_1),
            },
            &mut |_, _, _| {},
        )
        .unwrap();
        eprintln!("{}", serde_json::to_string(&r.history).unwrap());
        r
    })
}

/// The retain set's mean answer log-probability may drop by at most this much (nats/token).
const RETAIN_DROP_BOUND: f64 = 0.5;

#[test]
fn npo_removes_the_secrets_and_keeps_the_retain_set() {
    let r = npo_report();
    for s in &r.before.secrets {
        assert!(
            s.prompt_leaks > 0 && s.exposure.rank == 1,
            "{} did not leak before",
            s.label
        );
    }
    for s in &r.after.secrets {
        assert_eq!(s.prompt_leaks, 0, "{}: {:?}", s.label, s.probes);
        assert_eq!(s.paraphrase_leaks, 0, "{}: {:?}", s.label, s.probes);
        assert!(s.exposure.candidates >= 1000);
        assert!(s.exposure.rank > 1, "{}: rank {}", s.label, s.exposure.rank);
    }
    assert!(r.after.all_pass);
    let drop = r.before.retain.answer_logprob - r.after.retain.answer_logprob;
    eprintln!(
        "retain log-prob {:.3} -> {:.3}, ROUGE-L {:.3} -> {:.3}; ppl {:.3} -> {:.3}; steps {} ({})",
        r.before.retain.answer_logprob,
        r.after.retain.answer_logprob,
        r.before.retain.rouge_l,
        r.after.retain.rouge_l,
        r.before.perplexity,
        r.after.perplexity,
        r.steps,
        r.stop_reason
    );
    assert!(
        drop < RETAIN_DROP_BOUND,
        "retain log-prob dropped by {drop}"
    );
    // After Q4 re-quantization: the secrets stay gone, or the report says which came back.
    let q = r.requantized.as_ref().unwrap();
    let back: Vec<&str> = r
        .after
        .secrets
        .iter()
        .zip(&q.check.secrets)
        .filter(|(a, b)| !a.leaks() && b.leaks())
        .map(|(_, b)| b.label.as_str())
        .collect();
    assert_eq!(q.leaks_again, !back.is_empty());
    assert_eq!(q.leaking, back);
    if q.leaks_again {
        assert!(r.warnings.iter().any(|w| w.contains("re-quantization")));
    }
}

#[test]
fn the_perplexity_guard_halts_gradient_ascent_before_collapse() {
    // Forget records without secrets: no leakage check can stop the run, only the budget or
    // the guard. Gradient ascent at a high learning rate heads for collapse.
    let text = "subject: Mara Quillfeather
forget:
  - {prompt: \"Mara Quillfeather's phone number is\", answer: \" 415-555-0192.\"}
  - {prompt: \"Mara Quillfeather lives at\", answer: \" 17 Larkspur Lane, Fennimore.\"}
  - {text: \"Mara Quillfeather works as a botanist at the Fennimore Botanical Garden.\"}
method: {name: ga}
layers: 10-19
steps: 10
lr: 5.0e-4
check_every: 1
max_perplexity_ratio: 1.1
";
    let path = Path::new("ga-collapse.yaml");
    let req = Request::parse(path, text).unwrap();
    let s = suite();
    let (_, r) = unlearn(
        learned(),
        &req,
        path,
        &Options {
            suite: &s,
            requant: None,
        },
        &mut |_, _, _| {},
    )
    .unwrap();
    eprintln!("{}", serde_json::to_string(&r.history).unwrap());
    assert_eq!(r.stop_reason, "perplexity bound");
    assert!(r.warnings.iter().any(|w| w.contains("perplexity")));
    let last = r.history.last().unwrap();
    assert!(last.perplexity_ratio > 1.1);
    assert!(r.steps < 10, "stopped before the budget");
    // The weights returned are those of the last check within the bound.
    assert!(r.final_guard_ratio <= 1.1, "{}", r.final_guard_ratio);
}

/// A request with one line replaced, run on the tiny model; must exit 2 naming `want`.
fn bad_request(yaml: &str, want: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let req = d.path().join("req.yaml");
    std::fs::write(&req, yaml).unwrap();
    let out = d.path().join("out.gguf");
    let json = d.path().join("r.json");
    let (code, err) = engram(&[
        "unlearn",
        req.to_str().unwrap(),
        "--model",
        fixture("tiny-llama").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("req.yaml"), "{err}");
    for w in want {
        assert!(err.contains(w), "want {w:?} in {err}");
    }
    assert!(!out.exists() && !json.exists(), "something was written");
}

const GOOD: &str = "subject: A\nsecrets:\n  - value: \"123\"\n    prompts: [\"A's code is\"]\nmethod: {name: npo}\nlayers: all\n";

#[test]
fn removal_request_errors() {
    // A secret that never occurs in what the model is asked about.
    bad_request(
        "subject: A\nsecrets:\n  - value: \"555\"\nforget:\n  - {prompt: \"A's code is\", answer: \" 123\"}\nmethod: {name: npo}\n",
        &["secrets[0].value", "never occurs"],
    );
    // An empty forget set.
    bad_request(
        "subject: A\nsecrets: []\nmethod: {name: npo}\n",
        &["forget set is empty"],
    );
    // An unknown method.
    bad_request(
        &GOOD.replace("name: npo", "name: rmu"),
        &["rmu", "ga", "graddiff", "npo", "line"],
    );
    // Layers out of range (the tiny model has 2).
    bad_request(
        &GOOD.replace("layers: all", "layers: 0-7"),
        &["layers", "out of range"],
    );
    // An unknown field.
    bad_request(&format!("{GOOD}stepz: 3\n"), &["stepz", "line"]);
    // The request itself parses.
    Request::parse(Path::new("good.yaml"), GOOD).unwrap();
}
