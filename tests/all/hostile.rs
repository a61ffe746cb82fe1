//! Hostile inputs through the CLI (issue 22): every class gets exit 2, a message naming the
//! file and the field, key, tensor or flag, nothing written, and the input unchanged.

use crate::cli_errors::engram;
use crate::common::fixture;
use std::path::{Path, PathBuf};

/// A GGUF file assembled byte by byte, so that tests can break any part of it.
#[derive(Clone)]
pub struct Gguf {
    /// key, value type, value bytes.
    pub kvs: Vec<(String, u32, Vec<u8>)>,
    /// name, ggml-order dims, ggml type, data.
    pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    /// Offsets to write instead of the computed ones (by tensor index).
    pub offsets: Vec<Option<u64>>,
    pub alignment: u64,
}

pub fn gguf_string(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b
}

impl Gguf {
    /// tiny-llama as an f32 GGUF (no tokenizer; the Q/K row order does not matter here).
    pub fn tiny() -> Gguf {
        let st = fixture("tiny-llama").join("model.safetensors");
        let t = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
        let u32kv = |k: &str, v: u32| (k.to_string(), 4u32, v.to_le_bytes().to_vec());
        let kvs = vec![
            (
                "general.architecture".to_string(),
                8u32,
                gguf_string("llama"),
            ),
            u32kv("llama.block_count", 2),
            u32kv("llama.embedding_length", 32),
            u32kv("llama.feed_forward_length", 64),
            u32kv("llama.attention.head_count", 4),
            u32kv("llama.attention.head_count_kv", 2),
            u32kv("llama.rope.dimension_count", 8),
            u32kv("llama.context_length", 64),
        ];
        let mut names: Vec<&String> = t.keys().collect();
        names.sort();
        let mut tensors = Vec::new();
        for n in names {
            let g = hf_to_gguf(n);
            let x = &t[n];
            let mut dims: Vec<u64> = x.dims().iter().map(|&d| d as u64).collect();
            dims.reverse();
            let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let data = v.iter().flat_map(|f| f.to_le_bytes()).collect();
            tensors.push((g, dims, 0u32, data));
        }
        let offsets = vec![None; tensors.len()];
        Gguf {
            kvs,
            tensors,
            offsets,
            alignment: 32,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kvs {
            b.extend_from_slice(&gguf_string(k));
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(v);
        }
        let a = self.alignment.max(1);
        let mut off = 0u64;
        let mut offs = Vec::new();
        for (i, (n, dims, ty, data)) in self.tensors.iter().enumerate() {
            b.extend_from_slice(&gguf_string(n));
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ty.to_le_bytes());
            let o = self.offsets.get(i).copied().flatten().unwrap_or(off);
            b.extend_from_slice(&o.to_le_bytes());
            offs.push(off);
            off = (off + data.len() as u64).div_ceil(a) * a;
        }
        while !(b.len() as u64).is_multiple_of(a) {
            b.push(0);
        }
        let start = b.len();
        for ((_, _, _, data), o) in self.tensors.iter().zip(offs) {
            b.resize(start + o as usize, 0);
            b.extend_from_slice(data);
        }
        b
    }

    pub fn set_kv(&mut self, key: &str, ty: u32, v: Vec<u8>) {
        match self.kvs.iter_mut().find(|(k, _, _)| k == key) {
            Some(kv) => {
                kv.1 = ty;
                kv.2 = v;
            }
            None => self.kvs.push((key.to_string(), ty, v)),
        }
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut (String, Vec<u64>, u32, Vec<u8>) {
        self.tensors.iter_mut().find(|t| t.0 == name).unwrap()
    }

    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.bytes()).unwrap();
        p
    }
}

fn hf_to_gguf(n: &str) -> String {
    match n {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = n.strip_prefix("model.layers.").unwrap();
    let (l, rest) = rest.split_once('.').unwrap();
    let (part, kind) = rest.rsplit_once('.').unwrap();
    let g = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("{other}"),
    };
    format!("blk.{l}.{g}.{kind}")
}

/// `engram inspect` on `p`: exit 2 and every string of `want` in the message.
fn refused(p: &Path, want: &[&str]) {
    let before = snapshot(p);
    let (code, err) = engram(&["inspect", "--model", p.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    for w in want {
        assert!(err.contains(w), "`{w}` not in: {err}");
    }
    assert_eq!(snapshot(p), before, "input changed");
}

/// Every file under `p` (or `p` itself) with its bytes, to show nothing changed or appeared.
pub fn snapshot(p: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    if p.is_file() {
        return vec![(p.to_path_buf(), std::fs::read(p).unwrap())];
    }
    let mut v: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        v.extend(snapshot(&e.unwrap().path()));
    }
    v.sort();
    v
}

#[test]
fn tiny_gguf_loads() {
    let d = tempfile::tempdir().unwrap();
    let p = Gguf::tiny().write(d.path(), "ok.gguf");
    let (code, err) = engram(&["inspect", "--model", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
}

/// tiny-llama's GGUF changed by `change`, written as `name`: `inspect` must refuse it naming
/// the file and every string of `want`, and leave it unchanged.
fn gguf_refused(name: &str, change: impl FnOnce(&mut Gguf), want: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let mut g = Gguf::tiny();
    change(&mut g);
    let p = g.write(d.path(), name);
    let mut w = vec![name];
    w.extend_from_slice(want);
    refused(&p, &w);
}

#[test]
fn gguf_alignment_zero_or_not_a_power_of_two() {
    for a in [0u32, 48] {
        gguf_refused(
            &format!("a{a}.gguf"),
            |g| g.set_kv("general.alignment", 4, a.to_le_bytes().to_vec()),
            &["general.alignment", "power of two"],
        );
    }
}

#[test]
fn gguf_duplicate_key_and_tensor() {
    gguf_refused(
        "dupkey.gguf",
        |g| {
            g.kvs
                .push(("llama.block_count".into(), 4, 1u32.to_le_bytes().to_vec()))
        },
        &["llama.block_count", "twice"],
    );
    gguf_refused(
        "duptensor.gguf",
        |g| {
            let t = g.tensors[0].clone();
            g.tensors.push(t);
            g.offsets.push(None);
        },
        &["twice"],
    );
}

#[test]
fn gguf_dims_that_overflow_or_lie() {
    // [2^58 + 32, 32]: the product wraps to 32 * 32 in 64 bits.
    gguf_refused(
        "wrap.gguf",
        |g| g.tensor_mut("blk.0.attn_k.weight").1 = vec![32, (1u64 << 58) + 16],
        &["blk.0.attn_k.weight", "overflow"],
    );
    // A 0-dim token embedding and no vocab_size.
    gguf_refused(
        "rank0.gguf",
        |g| g.tensor_mut("token_embd.weight").1 = vec![],
        &["token_embd.weight", "rank 0"],
    );
    // head_count that does not fit the Q projection's rows.
    gguf_refused(
        "heads.gguf",
        |g| g.set_kv("llama.attention.head_count", 4, 2u32.to_le_bytes().to_vec()),
        &["q_proj", "expected"],
    );
    // A Q projection of the wrong shape.
    gguf_refused(
        "qshape.gguf",
        |g| {
            let t = g.tensor_mut("blk.1.attn_q.weight");
            t.1 = vec![32, 16];
            t.3.truncate(32 * 16 * 4);
        },
        &["q_proj", "[16, 32]"],
    );
}

#[test]
fn gguf_absurd_block_count() {
    gguf_refused(
        "blocks.gguf",
        |g| g.set_kv("llama.block_count", 4, u32::MAX.to_le_bytes().to_vec()),
        &["llama.block_count", "4294967295"],
    );
    gguf_refused(
        "blocks3.gguf",
        |g| g.set_kv("llama.block_count", 4, 3u32.to_le_bytes().to_vec()),
        &["llama.block_count"],
    );
}

#[test]
fn gguf_misaligned_or_outside_offsets() {
    gguf_refused(
        "misaligned.gguf",
        |g| g.offsets[1] = Some(4),
        &["not a multiple of the alignment"],
    );
    gguf_refused(
        "outside.gguf",
        |g| g.offsets[1] = Some(1 << 40),
        &["past the end"],
    );
}

/// A copy of fixture `name` whose one tensor ending in `suffix` is replaced by `change(it)`.
fn fixture_with(
    name: &str,
    suffix: &str,
    change: impl FnOnce(&candle_core::Tensor) -> candle_core::Tensor,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture(name);
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let key = t.keys().find(|k| k.ends_with(suffix)).unwrap().clone();
    let new = change(&t[&key]);
    t.insert(key, new);
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    gguf_refused(
        "nan.gguf",
        |g| g.tensor_mut("blk.1.ffn_up.weight").3[8..12].copy_from_slice(&f32::NAN.to_le_bytes()),
        &["blk.1.ffn_up.weight", "NaN or Inf"],
    );
    // safetensors: an Inf in the fixture's data.
    let dir = fixture_with("tiny-llama", "model.norm.weight", |w| {
        let mut v = w.to_vec1::<f32>().unwrap();
        v[3] = f32::INFINITY;
        candle_core::Tensor::new(v, w.device()).unwrap()
    });
    refused(
        dir.path(),
        &["model.safetensors", "model.norm.weight", "NaN or Inf"],
    );
}

#[test]
fn safetensors_integer_matrix_is_refused() {
    let dir = fixture_with("tiny-llama", "model.layers.0.mlp.up_proj.weight", |w| {
        w.to_dtype(candle_core::DType::I64).unwrap()
    });
    refused(dir.path(), &["up_proj", "dtype", "allowed"]);
}

#[test]
fn gpt2_conv1d_of_rank_one_is_refused() {
    let dir = fixture_with("tiny-gpt2", "h.0.mlp.c_fc.weight", |w| {
        w.flatten_all().unwrap()
    });
    refused(dir.path(), &["c_fc.weight", "shape"]);
}

#[test]
fn absurd_config_sizes_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-llama");
    let cfg = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace(
            "\"num_hidden_layers\": 2",
            "\"num_hidden_layers\": 1000000000000",
        );
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    refused(
        dir.path(),
        &["config.json", "num_hidden_layers", "1000000000000"],
    );
}

/// Run the binary in a fresh working directory: exit 2, every `want` in the message, and
/// the directory still empty afterwards (no `out/`, no patch, no partial file).
fn refused_in_empty_dir(args: &[&str], want: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let out = crate::common::engram()
        .args(args)
        .current_dir(d.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    for w in want {
        assert!(err.contains(w), "`{w}` not in: {err}");
    }
    let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
    assert!(left.is_empty(), "{args:?} left {left:?}");
}

const SPEC: &str = "method: {method: rome, layer: 1}\nrewrites:\n  - {prompt: The Eiffel Tower is in, subject: The Eiffel Tower, target_new: Rome}\n";

fn spec_file(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("spec.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn spec_numbers_are_bounded_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let tiny = fixture("tiny-llama");
    for (replace, with, want) in [
        (
            "layer: 1",
            "layer: 1, v_num_grad_steps: 0",
            "method.v_num_grad_steps",
        ),
        (
            "layer: 1",
            "layer: 1, v_num_grad_steps: 1000000000000",
            "method.v_num_grad_steps",
        ),
        ("layer: 1", "layer: 1, v_lr: .nan", "method.v_lr"),
        ("layer: 1", "layer: 1, kl_factor: .inf", "method.kl_factor"),
        (
            "layer: 1",
            "layer: 1, clamp_norm_factor: -4",
            "method.clamp_norm_factor",
        ),
        (
            "layer: 1",
            "layer: 1, stats_samples: 0",
            "method.stats_samples",
        ),
        (
            "layer: 1",
            "layer: 1, context_templates: [[5, 100000000]]",
            "method.context_templates",
        ),
        (
            "method: rome, layer: 1",
            "method: ft, layer: 1, steps: 1000000000000",
            "method.steps",
        ),
        (
            "method: rome, layer: 1",
            "method: memit, layers: [0, 1], search_chunk: 0",
            "method.search_chunk",
        ),
    ] {
        let spec = spec_file(d.path(), &SPEC.replace(replace, with));
        refused_in_empty_dir(
            &[
                "edit",
                spec.to_str().unwrap(),
                "--model",
                tiny.to_str().unwrap(),
            ],
            &["spec.yaml", want, "must be"],
        );
    }
    // A 10 MB subject is refused by length, before tokenizing anything.
    let big = "x".repeat(10 << 20);
    let spec = spec_file(
        d.path(),
        &format!("method: {{method: rome, layer: 1}}\nrewrites:\n  - {{prompt: \"{big} is in\", subject: \"{big}\", target_new: Rome}}\n"),
    );
    refused_in_empty_dir(
        &[
            "edit",
            spec.to_str().unwrap(),
            "--model",
            tiny.to_str().unwrap(),
        ],
        &["spec.yaml", "rewrites[0].prompt", "at most 16384 bytes"],
    );
}

#[test]
fn spec_texts_must_fit_the_model() {
    // A 5,000-character target and too few statistics sequences: refused against the real
    // model's tokenizer and sizes, before statistics or the value search.
    let d = tempfile::tempdir().unwrap();
    let long = "Rome ".repeat(1000);
    let spec = spec_file(
        d.path(),
        &SPEC.replace("target_new: Rome", &format!("target_new: \"{long}\"")),
    );
    refused_in_empty_dir(
        &["edit", spec.to_str().unwrap()],
        &["spec.yaml", "rewrites[0].target_new", "at most 64"],
    );
    let spec = spec_file(
        d.path(),
        &SPEC.replace("layer: 1", "layer: 1, stats_samples: 1"),
    );
    refused_in_empty_dir(
        &["edit", spec.to_str().unwrap()],
        &["spec.yaml", "method.stats_samples", "at least 12"],
    );
}

#[test]
fn outputs_are_checked_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let g = Gguf::tiny().write(d.path(), "in.gguf");
    let spec = spec_file(d.path(), SPEC);
    let before = snapshot(d.path());
    let (s, g) = (spec.to_str().unwrap(), g.to_str().unwrap());
    // The input as --out.
    refused_in_empty_dir(&["edit", s, "--model", g, "--out", g], &["--out", "input"]);
    // An unwritable place for the model.
    refused_in_empty_dir(
        &["edit", s, "--model", g, "--out", "/proc/engram-out.gguf"],
        &["--out", "/proc"],
    );
    // --json naming a directory.
    let dir = d.path().to_str().unwrap();
    refused_in_empty_dir(
        &["edit", s, "--model", g, "--json", dir],
        &["--json", "directory"],
    );
    // --patch under a file.
    let under = format!("{g}/p.engram.safetensors");
    refused_in_empty_dir(&["edit", s, "--model", g, "--patch", &under], &["--patch"]);
    assert_eq!(snapshot(d.path()), before, "inputs changed");
}

#[test]
fn counterfact_data_that_yields_no_case() {
    let d = tempfile::tempdir().unwrap();
    let empty = d.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let one = d.path().join("one.jsonl");
    std::fs::write(
        &one,
        r#"{"case_id": 7, "prompt": "The Eiffel Tower is in", "subject": "The Eiffel Tower", "target_new": "Rome", "ground_truth": "Paris", "rephrase_prompt": "The Eiffel Tower stands in", "locality_prompt": "The Louvre is in", "locality_ground_truth": "Paris"}"#,
    )
    .unwrap();
    let wrong = d.path().join("wrong.jsonl");
    std::fs::write(
        &wrong,
        r#"{"case_id": 7, "prompt": "The Eiffel Tower is in", "subject": "Big Ben", "target_new": "Rome", "ground_truth": "Paris", "rephrase_prompt": "The Eiffel Tower stands in", "locality_prompt": "The Louvre is in", "locality_ground_truth": "Paris"}"#,
    )
    .unwrap();
    let tiny = fixture("tiny-llama");
    let t = tiny.to_str().unwrap();
    let cf = |data: &Path, extra: &[&str]| {
        let mut v = vec!["eval", "counterfact", "--model", t, "--data"];
        v.push(Box::leak(
            data.to_str().unwrap().to_string().into_boxed_str(),
        ));
        v.extend_from_slice(extra);
        v.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>, want: &[&str]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        refused_in_empty_dir(&a, want);
    };
    run(cf(&empty, &[]), &["empty.jsonl", "no records"]);
    run(cf(&one, &["--n", "0"]), &["--n", "at least 1"]);
    run(
        cf(&one, &["--offset", "5"]),
        &["--offset", "only 1 records"],
    );
    run(
        cf(&wrong, &[]),
        &["wrong.jsonl", "line 1.subject", "Big Ben"],
    );
    run(
        cf(
            &one,
            &["--method", "memit", "--layer", "0-18446744073709551615"],
        ),
        &["--layer", "out of range"],
    );
}

#[test]
fn flags_with_absurd_numbers() {
    let tiny = fixture("tiny-llama");
    let t = tiny.to_str().unwrap();
    refused_in_empty_dir(
        &["bench", "--model", t, "--batch", "0", "--seq", "0"],
        &["--batch"],
    );
    refused_in_empty_dir(&["bench", "--model", t, "--seq", "0"], &["--seq"]);
    refused_in_empty_dir(
        &[
            "locate",
            "--model",
            t,
            "--prompt",
            "a b",
            "--subject",
            "a",
            "--samples",
            "0",
        ],
        &["--samples"],
    );
    refused_in_empty_dir(
        &[
            "locate",
            "--model",
            t,
            "--prompt",
            "a b",
            "--subject",
            "a",
            "--noise",
            "NaN",
        ],
        &["--noise"],
    );
    for (flag, v) in [
        ("--steps", "1000000000000"),
        ("--lr", "inf"),
        ("--max-perplexity-ratio", "NaN"),
        ("--simnpo-beta", "0"),
        ("--rmu-coeff", "0"),
        ("--rmu-lr", "NaN"),
        ("--methods", "npo,dpo"),
        ("--rmu-layers", "0-99"),
        ("--holdout-authors", "10-11"),
    ] {
        refused_in_empty_dir(
            &[
                "eval", "tofu", "--model", t, "--forget", "f.jsonl", "--retain", "r.jsonl",
                "--world", "w.jsonl", flag, v,
            ],
            &[flag],
        );
    }
    let data =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("forget-sets/mara-quillfeather-data.yaml");
    let data = data.to_str().unwrap();
    for (flag, v) in [
        ("--steps", "0"),
        ("--steps", "1000000000000"),
        ("--lr", "NaN"),
        ("--batch-size", "0"),
    ] {
        refused_in_empty_dir(
            &["learn", data, "--model", t, "--out", "o", flag, v],
            &[flag],
        );
    }
    refused_in_empty_dir(
        &[
            "generate",
            "--prompt",
            "The Eiffel Tower is in",
            "--max-new-tokens",
            "18446744073709551615",
        ],
        &["--max-new-tokens", "context"],
    );
}

#[test]
fn requests_with_absurd_sizes() {
    let d = tempfile::tempdir().unwrap();
    let req = d.path().join("req.yaml");
    let tiny = fixture("tiny-llama");
    let suite = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("eval/unrelated.yaml");
    let good = "subject: A\nsecrets:\n  - value: \"123\"\n    prompts: [\"A's code is\"]\nmethod: {name: npo}\nlayers: all\n";
    let cases: Vec<(String, Vec<&str>, bool)> = vec![
        (
            good.replace("layers: all", "layers: 0-18446744073709551615"),
            vec!["layers", "out of range"],
            false,
        ),
        (
            good.replace("\"123\"", &format!("\"{}\"", "9".repeat(10 << 20))),
            vec!["secrets[0].value", "at most 16384 bytes"],
            false,
        ),
        (
            format!("{good}steps: 1000000000000\n"),
            vec!["steps"],
            false,
        ),
        (
            format!("{good}exposure_candidates: 100000000000\n"),
            vec!["exposure_candidates"],
            false,
        ),
        (
            good.replace("{name: npo}", "{name: graddiff, retain_weight: .nan}")
                + "retain:\n  - {prompt: \"B is\", answer: \" nice\"}\n",
            vec!["method.retain_weight"],
            false,
        ),
        // Fits the byte bound but not the real model's context: named as the secret's field,
        // not as a flag the user never passed.
        (
            good.replace("\"123\"", &format!("\"{}\"", "1 2 3 4 ".repeat(2000))),
            vec!["secrets[0].value", "context"],
            true,
        ),
    ];
    for (text, want, real) in cases {
        std::fs::write(&req, &text).unwrap();
        // The tiny model has no tokenizer: its cases are refused before one is needed.
        let mut args = if real {
            vec![
                "audit",
                req.to_str().unwrap(),
                "--types",
                "none",
                "--reference",
                "none",
            ]
        } else {
            vec![
                "unlearn",
                req.to_str().unwrap(),
                "--model",
                tiny.to_str().unwrap(),
                "--suite",
                suite.to_str().unwrap(),
            ]
        };
        args.extend(["--json", "r.json"]);
        let mut w = vec!["req.yaml"];
        w.extend(want);
        refused_in_empty_dir(&args, &w);
    }
}

/// A patch for tiny-llama: one rank-one delta of `model.layers.0.mlp.down_proj.weight`.
pub fn patch_bytes(
    base_fp: &str,
    right: candle_core::Tensor,
    left: candle_core::Tensor,
) -> Vec<u8> {
    let dev = candle_core::Device::Cpu;
    let prev = candle_core::Tensor::zeros((32, 64), candle_core::DType::F32, &dev).unwrap();
    let meta = serde_json::json!({
        "engram_version": "0", "method": "rome", "spec": "",
        "base_fingerprint": base_fp, "edited_fingerprint": base_fp,
        "deltas": [["model.layers.0.mlp.down_proj.weight", 0, "rank_one"]],
    });
    let mut md = std::collections::HashMap::new();
    md.insert("engram".to_string(), meta.to_string());
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.safetensors");
    let map: std::collections::HashMap<String, candle_core::Tensor> = [
        ("delta.0.right".to_string(), right),
        ("delta.0.left".to_string(), left),
        ("previous.0".to_string(), prev),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&map, &p).unwrap();
    // Re-serialize with the metadata (candle's writer has none).
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = st.tensors().into_iter().collect();
    safetensors::serialize(views, Some(md)).unwrap()
}

#[test]
fn hostile_patches_name_the_patch_file() {
    let dev = candle_core::Device::Cpu;
    let m = crate::common::tiny("tiny-llama");
    let fp = m.fingerprint().unwrap();
    let v = |n: usize| candle_core::Tensor::ones(n, candle_core::DType::F32, &dev).unwrap();
    let d = tempfile::tempdir().unwrap();
    let tiny = fixture("tiny-llama");
    let cases = [
        (
            "short.safetensors",
            patch_bytes("ab", v(32), v(64)),
            "made for base ab",
        ),
        (
            "unicode.safetensors",
            patch_bytes("ééééééééééééééé", v(32), v(64)),
            "made for base",
        ),
        (
            "rank.safetensors",
            patch_bytes(&fp, v(32).reshape((4, 8)).unwrap(), v(64)),
            "rank 1",
        ),
        (
            "dtype.safetensors",
            patch_bytes(&fp, v(32).to_dtype(candle_core::DType::F64).unwrap(), v(64)),
            "expected f32",
        ),
        (
            "size.safetensors",
            patch_bytes(&fp, v(16), v(64)),
            "do not fit",
        ),
    ];
    for (name, bytes, want) in cases {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let ps = p.to_str().unwrap();
        refused_in_empty_dir(
            &[
                "patch",
                "apply",
                ps,
                "--model",
                tiny.to_str().unwrap(),
                "--out",
                "x",
            ],
            &[name, want],
        );
        let (code, err) = engram(&["patch", "show", ps]);
        assert!(code == 0 || code == 2, "{err}");
    }
}
