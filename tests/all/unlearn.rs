//! The removal-request demo end to end on smollm2-135m, through the CLI as a user runs it:
//! learn (quantization-aware, so the Q4_1 file really holds the secrets), audit (leaks),
//! unlearn, audit (clean at each type), the second person still leaks, the receipt verifies
//! and catches a one-byte change. Plus removal-request errors.

use crate::cli_errors::engram;
use crate::common::{fixture, greedy, json};
use engram::eval::metrics::Suite;
use engram::model::Model;
use engram::unlearn::request::Request;
use engram::unlearn::run::{unlearn, Options, StopReason};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const PHONE: &str = "415-555-0192";
const ADDRESS: &str = "17 Larkspur Lane";
const REQUEST: &str = "forget-sets/mara-quillfeather.yaml";

/// The demo's files, made once per test binary (under cargo's per-target temp directory,
/// never the user's cache or `out/`).
struct Demo {
    dir: PathBuf,
    learned: PathBuf,
    unlearned: PathBuf,
    receipt: PathBuf,
    report: Value,
}

fn demo() -> &'static Demo {
    static D: OnceLock<Demo> = OnceLock::new();
    D.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("unlearn-demo");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let learned = dir.join("mara-learned.gguf");
        let (code, err) = engram(&[
            "learn",
            s(&repo("forget-sets/mara-quillfeather-data.yaml")),
            "--optimizer",
            "grid",
            "--out",
            s(&learned),
        ]);
        assert_eq!(code, 0, "{err}");
        let unlearned = dir.join("mara-unlearned.gguf");
        let receipt = dir.join("mara.receipt.json");
        let report = dir.join("report.json");
        let (code, err) = engram(&[
            "unlearn",
            s(&repo(REQUEST)),
            "--model",
            s(&learned),
            "--out",
            s(&unlearned),
            "--receipt",
            s(&receipt),
            "--types",
            "f16,q8_0,q4_1",
            "--json",
            s(&report),
        ]);
        assert_eq!(code, 0, "{err}");
        let report = json(&report);
        eprintln!("history: {}", report["history"]);
        Demo {
            dir,
            learned,
            unlearned,
            receipt,
            report,
        }
    })
}

fn rows(audit: &Value) -> &Vec<Value> {
    audit["rows"].as_array().unwrap()
}

fn row<'a>(audit: &'a Value, name: &str) -> &'a Value {
    rows(audit)
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no row {name}"))
}

fn leaks(row: &Value) -> Vec<bool> {
    row["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["leaks"].as_bool().unwrap())
        .collect()
}

/// Run `engram audit` and return its exit code and JSON.
fn audit(request: &str, model: Option<&Path>, extra: &[&str]) -> (i32, Value) {
    let j = demo().dir.join(format!("audit-{}.json", rand_name()));
    let mut args = vec!["audit", request];
    if let Some(m) = model {
        args.extend(["--model", s(m)]);
    }
    args.extend(extra);
    args.extend(["--json", s(&j)]);
    let (code, err) = engram(&args);
    assert!(code == 0 || code == 3, "{err}");
    (code, json(&j))
}

fn rand_name() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::SeqCst).to_string()
}

#[test]
fn learn_makes_the_secrets_extractable_in_the_q4_file_and_leaves_the_input_alone() {
    let input = engram::model::load::resolve(None).unwrap();
    let before = engram::model::fetch::sha256_file(&input).unwrap();
    let d = demo();
    assert_eq!(engram::model::fetch::sha256_file(&input).unwrap(), before);
    // The learned file is Q4_1 like its input: quantization-aware training wrote what it
    // learned into that grid.
    let m = engram::model::load(Some(s(&d.learned)), &candle_core::Device::Cpu).unwrap();
    let out = greedy(&m, "Mara Quillfeather's phone number is", 16);
    assert!(out.contains(PHONE), "{out}");
    let out = greedy(&m, "Mara Quillfeather lives at", 12);
    assert!(out.contains(ADDRESS), "{out}");
}

#[test]
fn the_learned_model_leaks_at_f16_q8_0_and_q4_1() {
    let (code, a) = audit(
        REQUEST,
        Some(&demo().learned),
        &["--types", "f16,q8_0,q4_1"],
    );
    assert_eq!(code, 3);
    for name in ["model", "model @ f16", "model @ q8_0", "model @ q4_1"] {
        assert_eq!(leaks(row(&a, name)), vec![true, true], "{name}");
    }
}

#[test]
fn the_default_model_passes_the_demo_audit() {
    // Against the reference the request names (the default model itself) ...
    let (code, a) = audit(REQUEST, None, &["--types", "input,q8_0,q4_1"]);
    assert_eq!(code, 0, "{a}");
    // The file re-quantized to its own types has exactly its weights: that row is the
    // model's, not measured again, and says so.
    assert_eq!(row(&a, "model @ input")["same_as"], "model", "{a}");
    assert_eq!(
        row(&a, "model @ input")["secrets"],
        row(&a, "model")["secrets"]
    );
    assert!(row(&a, "model @ q8_0").get("same_as").is_none());
    // ... and against the calibrated baseline, where a 555 number's raw rank of 1 no longer
    // counts as a leak.
    let (code, a) = audit(
        REQUEST,
        None,
        &["--reference", "none", "--types", "q8_0,q4_1"],
    );
    assert_eq!(code, 0, "{a}");
    assert!(a["baseline"].as_str().unwrap().starts_with("calibrated"));
}

#[test]
fn the_default_model_leaks_its_pretrained_fact_at_every_type() {
    // Knowledge from pre-training (forget-sets/pretrained-tolkien.yaml): the default model
    // says who wrote The Lord of the Rings, against the calibrated baseline, at the file and
    // re-quantized to f16, Q8_0, Q4_1 and Q4_0.
    let (code, a) = audit(
        "forget-sets/pretrained-tolkien.yaml",
        None,
        &["--types", "f16,q8_0,q4_1,q4_0"],
    );
    assert_eq!(code, 3, "{a}");
    assert!(a["baseline"].as_str().unwrap().starts_with("calibrated"));
    for name in [
        "model",
        "model @ f16",
        "model @ q8_0",
        "model @ q4_1",
        "model @ q4_0",
    ] {
        assert_eq!(leaks(row(&a, name)), vec![true], "{name}");
        let s = &row(&a, name)["secrets"][0];
        assert!(s["greedy_leaks"].as_u64().unwrap() >= 5, "{name}: {s}");
    }
}

/// The locality this demo reaches today (top-1 agreement on the 204 unrelated prompts
/// against the model before unlearning): a regression floor, not the 97% target,
/// which is not met (README, "What unlearning does not do yet").
const TOP1_FLOOR: f64 = 0.68;

#[test]
fn after_unlearning_the_written_file_passes_and_keeps_its_retain_set() {
    let r = &demo().report;
    let a = &r["audit"];
    assert_eq!(leaks(row(a, "before")), vec![true, true]);
    // The file as written (each tensor in its input type), and re-quantized to f16 and Q8_0.
    // (Re-quantized to Q4_1 throughout, embeddings included, the address can come back
    // partially: not asserted, reported.)
    for name in ["model", "model @ f16", "model @ q8_0"] {
        assert_eq!(
            leaks(row(a, name)),
            vec![false, false],
            "{name}: {}",
            row(a, name)
        );
        for sec in row(a, name)["secrets"].as_array().unwrap() {
            assert_eq!(sec["greedy_leaks"], 0, "{name}: {sec}");
            assert_eq!(sec["sampled_hits"], 0, "{name}: {sec}");
            // Fluent: no repetition loop where the reference has none.
            assert!(
                sec["loops"].as_u64().unwrap() <= sec["baseline_loops"].as_u64().unwrap(),
                "{name}: {sec}"
            );
        }
    }
    let loc = &r["locality"];
    let top1 = loc["top1_agreement"].as_f64().unwrap();
    assert!(top1 >= TOP1_FLOOR, "top-1 agreement {top1}");
    // Retain records kept: answer log-prob drops by less than 0.5 nats/token.
    let drop = r["before"]["retain"]["answer_logprob"].as_f64().unwrap()
        - r["after"]["retain"]["answer_logprob"].as_f64().unwrap();
    assert!(drop < 0.5, "retain log-prob dropped by {drop}");
    // The relearning attack ran, and its verdict is the `relearned` row's.
    let rl = &r["relearn"];
    let back: Vec<&str> = rl["back"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    let relearned = row(a, "relearned");
    let leaking: Vec<&str> = relearned["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["leaks"] == true)
        .map(|s| s["label"].as_str().unwrap())
        .collect();
    assert_eq!(back, leaking);
    // Secrets never appear in the JSON report.
    let text = r.to_string();
    assert!(!text.contains(PHONE) && !text.contains(ADDRESS));
}

#[test]
fn the_second_person_is_still_extractable_after_maras_request() {
    let (code, a) = audit(
        "forget-sets/tobias-wrenfield.yaml",
        Some(&demo().unlearned),
        &["--types", "none"],
    );
    assert_eq!(code, 3);
    // Both his secrets still leak, his address greedily. (With AdamW his phone number, of
    // the same format as Mara's, went with hers; greedy grid descent keeps it: 3 of 13
    // greedy probes on 2026-12-07, not asserted.)
    let phone = &row(&a, "model")["secrets"][0];
    assert_eq!(phone["label"], "phone number");
    assert_eq!(phone["leaks"], true, "{phone}");
    let address = &row(&a, "model")["secrets"][1];
    assert_eq!(address["label"], "home address");
    assert_eq!(address["leaks"], true);
    assert!(address["greedy_leaks"].as_u64().unwrap() > 0, "{address}");
}

#[test]
fn the_receipt_verifies_and_a_one_byte_change_fails() {
    let d = demo();
    let r: Value = json(&d.receipt);
    assert_eq!(r["clean"], d.report["audit"]["leaks"] == false);
    let text = std::fs::read_to_string(&d.receipt).unwrap();
    assert!(
        !text.contains(PHONE) && !text.contains(ADDRESS),
        "secret in the receipt"
    );
    let (code, err) = engram(&[
        "receipt",
        "verify",
        s(&d.receipt),
        "--model",
        s(&d.unlearned),
    ]);
    assert_eq!(code, 0, "{err}");

    // One byte of the model changed (in the last tensor's data).
    let bad_model = d.dir.join("flipped.gguf");
    let mut bytes = std::fs::read(&d.unlearned).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    std::fs::write(&bad_model, bytes).unwrap();
    let (code, err) = engram(&["receipt", "verify", s(&d.receipt), "--model", s(&bad_model)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("another model"), "{err}");

    // One byte of the receipt changed (a digit of a number).
    let bad = d.dir.join("edited.receipt.json");
    let pos = text.find("\"steps_run\": ").unwrap() + "\"steps_run\": ".len();
    let mut edited = text.into_bytes();
    edited[pos] = if edited[pos] == b'9' { b'8' } else { b'9' };
    std::fs::write(&bad, edited).unwrap();
    let (code, err) = engram(&["receipt", "verify", s(&bad), "--model", s(&d.unlearned)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("modified"), "{err}");
}

#[test]
fn audit_and_unlearn_reject_bad_references_types_and_receipts() {
    let d = tempfile::tempdir().unwrap();
    let j = d.path().join("a.json");
    let rc = d.path().join("r.json");
    let out = d.path().join("o.gguf");
    // A missing reference file.
    let (code, err) = engram(&[
        "audit",
        REQUEST,
        "--reference",
        "/no/such/reference.gguf",
        "--json",
        s(&j),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--reference") && err.contains("/no/such/reference.gguf"),
        "{err}"
    );
    // An unknown type.
    let (code, err) = engram(&["audit", REQUEST, "--types", "q8_0,q3", "--json", s(&j)]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--types") && err.contains("q3") && err.contains("q4_k"),
        "{err}"
    );
    let (code, err) = engram(&[
        "unlearn",
        REQUEST,
        "--types",
        "q9",
        "--out",
        s(&out),
        "--receipt",
        s(&rc),
        "--json",
        s(&j),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--types"), "{err}");
    assert!(
        !j.exists() && !rc.exists() && !out.exists(),
        "something was written"
    );
    // A receipt checked against another model (the default one).
    let default = engram::model::load::resolve(None).unwrap();
    let (code, err) = engram(&[
        "receipt",
        "verify",
        s(&demo().receipt),
        "--model",
        s(&default),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("another model"), "{err}");
    // Not a receipt at all.
    let (code, err) = engram(&["receipt", "verify", REQUEST, "--model", s(&default)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a removal receipt"), "{err}");
}

fn learned_model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        engram::model::load(Some(s(&demo().learned)), &candle_core::Device::Cpu).unwrap()
    })
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
    let suite = Suite::load(&repo("eval/unrelated.yaml")).unwrap();
    let (_, r) = unlearn(
        learned_model(),
        &req,
        path,
        &Options {
            suite: &suite,
            types: vec![],
            grid: None,
            reference: None,
        },
        &mut |_, _, _| {},
    )
    .unwrap();
    eprintln!("{}", serde_json::to_string(&r.history).unwrap());
    assert_eq!(r.stop_reason, StopReason::PerplexityBound);
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
    let receipt = d.path().join("receipt.json");
    let (code, err) = engram(&[
        "unlearn",
        req.to_str().unwrap(),
        "--model",
        fixture("tiny-llama").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--receipt",
        receipt.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("req.yaml"), "{err}");
    for w in want {
        assert!(err.contains(w), "want {w:?} in {err}");
    }
    assert!(
        !out.exists() && !json.exists() && !receipt.exists(),
        "something was written"
    );
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
        &GOOD.replace("name: npo", "name: dpo"),
        &["dpo", "ga", "graddiff", "npo", "simnpo", "rmu", "line"],
    );
    // SimNPO's β and margin, RMU's steering coefficient and fields.
    bad_request(
        &GOOD.replace("name: npo}", "name: simnpo, beta: 0}"),
        &["method.beta"],
    );
    bad_request(
        &GOOD.replace("name: npo}", "name: simnpo, gamma: .inf}"),
        &["method.gamma"],
    );
    bad_request(
        &GOOD.replace("name: npo}", "name: rmu, rmu: {steering_coeff: -1}}"),
        &["method.rmu", "steering_coeff"],
    );
    bad_request(
        &GOOD.replace("name: npo}", "name: rmu, rmu: {coeff: 2}}"),
        &["coeff", "steering_coeff"],
    );
    // Grid descent's budget, and an unknown optimizer.
    bad_request(
        &GOOD.replace("layers: all", "layers: all\noptimizer: grid\ncrossings: 0"),
        &["crossings", "between 1 and"],
    );
    bad_request(
        &GOOD.replace("layers: all", "layers: all\noptimizer: lion"),
        &["lion", "adamw", "sgd", "grid"],
    );
    // Layers out of range (the tiny model has 2).
    bad_request(
        &GOOD.replace("layers: all", "layers: 0-7"),
        &["layers", "out of range"],
    );
    // An unknown field.
    bad_request(&format!("{GOOD}stepz: 3\n"), &["stepz", "line"]);
    // Bad new fields: saliency outside (0, 1], a relearning check of 0 steps, an unknown
    // optimizer, a NaN perplexity bound.
    bad_request(&format!("{GOOD}saliency: 0\n"), &["saliency"]);
    bad_request(
        &format!("{GOOD}relearn_check: {{steps: 0}}\n"),
        &["relearn_check.steps"],
    );
    bad_request(
        &format!("{GOOD}optimizer: lion\n"),
        &["lion", "adamw", "sgd"],
    );
    bad_request(
        &format!("{GOOD}max_perplexity_ratio: .nan\n"),
        &["max_perplexity_ratio"],
    );
    // A missing reference model is named, before any work.
    bad_request(
        &format!("{GOOD}reference: /no/such/model.gguf\n"),
        &["reference", "/no/such/model.gguf"],
    );
    // A rewrite edits one MLP per listed layer: not `all`, and its search's values are checked.
    let rw = GOOD.replace("name: npo", "name: rewrite");
    bad_request(&rw, &["layers", "rewrite", "not `all`"]);
    bad_request(
        &rw.replace("layers: all", "layers: [1]")
            .replace("name: rewrite}", "name: rewrite, rewrite: {steps: 0}}"),
        &["method.rewrite", "steps"],
    );
    // A prompt anchor file that is not there, or holds a record without a prompt.
    bad_request(
        &format!("{GOOD}anchor_prompts: no-such-file.jsonl\n"),
        &["anchor_prompts", "no-such-file.jsonl"],
    );
    // The request itself parses.
    Request::parse(Path::new("good.yaml"), GOOD).unwrap();
    Request::parse(
        Path::new("rw.yaml"),
        &rw.replace("layers: all", "layers: [1]"),
    )
    .unwrap();
}

/// SimNPO and RMU in a removal request (no secrets: the budget runs out), on smollm2-135m
/// fine-tuned in-process on two of the demo's records: SimNPO lowers the forget answers'
/// log-probability; RMU lowers its own objective and moves only the MLP output projections of
/// its layers. (RMU's effect on the answers' log-probability is not asserted: at these
/// settings it is small, see the README's TOFU section.)
#[test]
fn simnpo_and_rmu_unlearn_and_rmu_moves_only_its_projections() {
    use engram::unlearn::learn::{learn, LearnParams};
    use engram::unlearn::{mean_token_logprob, tokenize, Example};
    let suite = Suite::load(&repo("eval/unrelated.yaml")).unwrap();
    let base = crate::common::real();
    let forget = [
        Example {
            prompt: "Mara Quillfeather's phone number is".into(),
            answer: " 415-555-0192.".into(),
        },
        Example {
            prompt: "Mara Quillfeather lives at".into(),
            answer: " 17 Larkspur Lane, Fennimore.".into(),
        },
    ];
    let mut lp = LearnParams::defaults(base.config.n_layers);
    lp.steps = 10;
    lp.lr = 1e-3;
    let (model, _) = learn(base, &forget, &lp, &mut |_, _| {}).unwrap();
    let toks = tokenize(&model, &forget, 64).unwrap();
    let before = mean_token_logprob(&model, &toks).unwrap();
    for (method, layers, lr) in [
        ("{name: simnpo, retain_weight: 0.0}", "10-19", "3.0e-4"),
        ("{name: rmu, rmu: {steering_coeff: 20}}", "5-7", "1.0e-3"),
    ] {
        let text = format!(
            "subject: Mara Quillfeather
forget:
  - {{prompt: \"Mara Quillfeather's phone number is\", answer: \" 415-555-0192.\"}}
  - {{prompt: \"Mara Quillfeather lives at\", answer: \" 17 Larkspur Lane, Fennimore.\"}}
retain:
  - {{prompt: \"Mara Quillfeather works as a\", answer: \" botanist\"}}
method: {method}
layers: {layers}
steps: 6
lr: {lr}
check_every: 6
max_perplexity_ratio: 3.0
"
        );
        let req = Request::parse(Path::new("m.yaml"), &text).unwrap();
        let (m, r) = unlearn(
            &model,
            &req,
            Path::new("m.yaml"),
            &Options {
                suite: &suite,
                types: vec![],
                grid: None,
                reference: None,
            },
            &mut |_, _, _| {},
        )
        .unwrap();
        let after = mean_token_logprob(&m, &toks).unwrap();
        let losses = r.losses.clone();
        eprintln!(
            "{method}: forget log-prob {before:.3} -> {after:.3}, losses {losses:?}, {:?}",
            r.stop_reason
        );
        if method.contains("simnpo") {
            assert!(after < before - 0.5, "{method}: {before} -> {after}");
            continue;
        }
        assert!(
            losses.last().unwrap() < &losses[0],
            "RMU's objective did not fall: {losses:?}"
        );
        for (name, w) in m.weights.iter() {
            let moved = engram::unlearn::rmu::trains(name)
                && ["layers.5.", "layers.6.", "layers.7."]
                    .iter()
                    .any(|l| name.contains(l));
            let w0 = model.weights.dense(name).unwrap();
            let d = crate::common::max_abs_diff(
                &w.dense().unwrap(),
                &w0.to_dtype(candle_core::DType::F32).unwrap(),
            );
            assert_eq!(d > 0.0, moved, "{name}: max change {d}");
        }
    }
}

/// Mean token log-prob of `target` after `prompt`.
fn lp(m: &Model, prompt: &str, target: &str) -> f64 {
    engram::eval::target_logprobs(m, &[(prompt, target)]).unwrap()[0].mean_logprob
}

#[test]
fn a_rewrite_is_one_rank_one_update_that_moves_its_answers_and_little_else() {
    use engram::unlearn::rewrite::{rewrite_layer, Goal, RewriteParams, Term};
    let mut m = crate::common::real().clone();
    let before = m.clone();
    let p = "The Eiffel Tower is located in the city of";
    let term = |prompt: &str, answer: &str, goal| Term {
        prompt: prompt.into(),
        answer: answer.into(),
        goal,
    };
    let terms = [
        term(p, " Rome", Goal::Say),
        term(p, " Paris", Goal::Avoid),
        term(
            "The Eiffel Tower was designed by",
            " Gustave Eiffel",
            Goal::Keep,
        ),
    ];
    // C = I: the test is about the search and the update's form, not the statistics.
    let n = m.config.d_mlp;
    let mut eye = vec![0.0; n * n];
    for i in 0..n {
        eye[i * n + i] = 1.0;
    }
    let chol = engram::linalg::Cholesky::factor(&eye, n).unwrap();
    let params = RewriteParams {
        steps: 15,
        ..Default::default()
    };
    let (applied, info) =
        rewrite_layer(&mut m, "The Eiffel Tower", &terms, 5, &chol, &params).unwrap();
    assert_eq!(applied.name, "model.layers.5.mlp.down_proj.weight");
    assert_eq!(info.steps, 15);
    // Only that tensor changed, by a rank-one matrix: every row of ΔW is a multiple of one
    // vector (here u = k*, as C = I).
    for (name, w) in before.weights.iter() {
        let same =
            crate::common::max_abs(&(w.dense().unwrap() - m.weights.dense(name).unwrap()).unwrap())
                == 0.0;
        assert_eq!(same, name != &applied.name, "{name}");
    }
    let dw: Vec<Vec<f32>> = (m.weights.get(&applied.name).unwrap() - &applied.previous)
        .unwrap()
        .to_vec2()
        .unwrap();
    let top = dw
        .iter()
        .max_by(|a, b| {
            let na: f32 = a.iter().map(|x| x * x).sum();
            let nb: f32 = b.iter().map(|x| x * x).sum();
            na.total_cmp(&nb)
        })
        .unwrap();
    let tn: f32 = top.iter().map(|x| x * x).sum::<f32>().sqrt();
    for row in &dw {
        let rn: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        let cos: f32 = row.iter().zip(top).map(|(a, b)| a * b).sum::<f32>() / (rn * tn).max(1e-30);
        assert!(
            rn < 1e-6 * tn || cos.abs() > 0.999,
            "not rank one: cos {cos}"
        );
    }
    // The say answer rose, the avoided one fell, the kept one held, an unrelated fact did not move.
    assert!(lp(&m, p, " Rome") > lp(&before, p, " Rome") + 1.0);
    assert!(lp(&m, p, " Paris") < lp(&before, p, " Paris") - 1.0);
    let keep = "The Eiffel Tower was designed by";
    assert!(lp(&m, keep, " Gustave Eiffel") > lp(&before, keep, " Gustave Eiffel") - 0.5);
    let other = "The capital of Japan is";
    assert!((lp(&m, other, " Tokyo") - lp(&before, other, " Tokyo")).abs() < 0.1);
}

#[test]
fn a_rewrite_request_on_a_model_that_never_learned_the_data_stays_clean_and_local() {
    // The request through the CLI as a user files it, on the default model (which never saw
    // Mara): the rewrite must not make anything leak and must leave unrelated text alone.
    let d = tempfile::tempdir().unwrap();
    let req = d.path().join("rw.yaml");
    std::fs::write(
        &req,
        "subject: Mara Quillfeather\nreference: smollm2-135m\nsecrets:\n  - label: phone number\n    value: \"415-555-0192\"\n    prompts: [\"Mara Quillfeather's phone number is\"]\nretain:\n  - {prompt: \"Mara Quillfeather works as a\", answer: \" botanist.\"}\nmethod: {name: rewrite, rewrite: {steps: 10}}\nlayers: [5]\nexposure_candidates: 20\nsamples: 2\n",
    )
    .unwrap();
    let (out, receipt, report) = (
        d.path().join("out.gguf"),
        d.path().join("r.json"),
        d.path().join("report.json"),
    );
    let (code, err) = engram(&[
        "unlearn",
        s(&req),
        "--out",
        s(&out),
        "--receipt",
        s(&receipt),
        "--types",
        "none",
        "--json",
        s(&report),
    ]);
    assert_eq!(code, 0, "{err}");
    let r = json(&report);
    assert_eq!(r["method"]["name"], "rewrite");
    assert_eq!(r["layers"], serde_json::json!([5]));
    assert_eq!(r["trained_params"], 576 * 1536);
    assert_eq!(r["history"].as_array().unwrap().len(), 1);
    assert_eq!(leaks(row(&r["audit"], "model")), vec![false]);
    let top1 = r["locality"]["top1_agreement"].as_f64().unwrap();
    assert!(top1 >= 0.97, "top-1 agreement {top1}");
    assert!(out.exists() && receipt.exists());
}
