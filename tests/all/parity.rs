//! Parity with Hugging Face transformers (fixtures from scripts/make_fixtures.py).

use crate::common::*;
use engram::model::{Batch, HookPoint, Trace};

fn check_tiny(name: &str) {
    let m = tiny(name);
    let fx = json(&fixture(name).join("expected.json"));
    let ids: Vec<Vec<u32>> = serde_json::from_value(fx["ids"].clone()).unwrap();
    let mut trace = Trace::new();
    for l in 0..m.config.n_layers {
        trace.capture(HookPoint::ResidPre(l));
        trace.capture(HookPoint::MlpKey(l));
    }
    let logits = m.forward(&Batch { ids, mask: None }, &mut trace).unwrap();
    let d = max_abs_diff(&logits, &tensor3(&fx["logits"]));
    println!("{name}: logits max abs diff vs transformers = {d:e}");
    assert!(d <= 1e-4, "{name}: logits differ by {d}");
    for l in 0..m.config.n_layers {
        let r = max_abs_diff(
            trace.get(HookPoint::ResidPre(l)).unwrap(),
            &tensor3(&fx["resid_pre"][l.to_string()]),
        );
        let k = max_abs_diff(
            trace.get(HookPoint::MlpKey(l)).unwrap(),
            &tensor3(&fx["mlp_key"][l.to_string()]),
        );
        println!("{name}: layer {l}: resid_pre diff {r:e}, mlp_key diff {k:e}");
        assert!(
            r <= 1e-4 && k <= 1e-4,
            "{name} layer {l}: resid_pre {r}, mlp_key {k}"
        );
    }
}

#[test]
fn tiny_gpt2_matches_transformers() {
    check_tiny("tiny-gpt2");
}

#[test]
fn tiny_llama_gqa_matches_transformers() {
    check_tiny("tiny-llama");
}

#[test]
fn tiny_qwen2_bias_tied_matches_transformers() {
    check_tiny("tiny-qwen2");
}

/// transformers dequantizes the same GGUF file; we compare the top-20 logits per position.
#[test]
fn smollm2_gguf_matches_transformers() {
    let m = real();
    let fx = json(&fixture("smollm2-gguf-top20.json"));
    let tok = m.tok().unwrap();
    let mut worst = 0f32;
    for p in fx["prompts"].as_array().unwrap() {
        let prompt = p["prompt"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(p["ids"].clone()).unwrap();
        assert_eq!(
            tok.encode(prompt).unwrap(),
            ids,
            "tokenization of {prompt:?}"
        );
        let top_ids: Vec<Vec<u32>> = serde_json::from_value(p["top_ids"].clone()).unwrap();
        let top: Vec<Vec<f32>> = serde_json::from_value(p["top_logits"].clone()).unwrap();
        let logits: Vec<Vec<f32>> = m
            .forward(&Batch::single(&ids), &mut Trace::new())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (pos, (ids, vals)) in top_ids.iter().zip(&top).enumerate() {
            for (&id, &v) in ids.iter().zip(vals) {
                worst = worst.max((logits[pos][id as usize] - v).abs());
            }
        }
    }
    println!("smollm2 GGUF: top-20 logits max abs diff vs transformers = {worst:e} (20 prompts)");
    assert!(worst <= 1e-3, "max abs diff {worst}");
}
