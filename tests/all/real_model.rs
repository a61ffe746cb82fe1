//! Claims on the real smollm2-135m (GGUF, Q4_1, dequantized to f32).

use crate::common::*;
use candle_core::Device;
use engram::eval::target_logprobs;
use engram::model::generate::{generate, GenParams};

#[test]
fn greedy_capital_of_france_is_paris() {
    let m = real();
    let tok = m.tok().unwrap();
    let ids = tok.encode("The capital of France is").unwrap();
    let out = generate(
        m,
        &[ids],
        &GenParams {
            max_new_tokens: 6,
            ..Default::default()
        },
    )
    .unwrap();
    let text = tok.decode(&out[0]).unwrap();
    println!("The capital of France is{text}");
    assert!(text.contains("Paris"), "{text:?}");
}

#[test]
fn eiffel_tower_paris_probability_is_about_0_70() {
    let m = real();
    let s = target_logprobs(
        m,
        &[("The Eiffel Tower is located in the city of", " Paris")],
    )
    .unwrap();
    let p = s[0].mean_logprob.exp();
    println!("P(' Paris') = {p:.4}");
    assert_eq!(s[0].target_tokens.len(), 1);
    assert!((p - 0.70).abs() < 0.02, "{p}");
}

#[test]
fn multi_token_target_scores_each_token() {
    let m = real();
    let s = target_logprobs(
        m,
        &[
            ("The capital of France is", " Paris, France"),
            ("Hello", " world"),
        ],
    )
    .unwrap();
    assert!(s[0].target_tokens.len() >= 3);
    let mean = s[0].token_logprobs.iter().sum::<f64>() / s[0].token_logprobs.len() as f64;
    assert!((mean - s[0].mean_logprob).abs() < 1e-12);
    assert!(s[0].token_logprobs.iter().all(|&x| x <= 0.0));
}

/// GGUF save then load keeps every tensor's type, with values within quantization error.
#[test]
fn gguf_save_then_load_keeps_types() {
    let m = real();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy.gguf");
    engram::model::save::save_gguf(m, &out, None, None).unwrap();
    let back = engram::model::load(Some(out.to_str().unwrap()), &Device::Cpu).unwrap();
    let (
        engram::model::Format::Gguf { tensors: a, .. },
        engram::model::Format::Gguf { tensors: b, .. },
    ) = (&m.source.format, &back.source.format)
    else {
        panic!("not gguf")
    };
    let types = |v: &Vec<(String, String, candle_core::quantized::GgmlDType)>| {
        let mut v: Vec<_> = v.iter().map(|(g, _, t)| (g.clone(), *t)).collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    assert_eq!(types(a), types(b));
    let mut worst = 0f32;
    for (n, t) in m.weights.iter() {
        let t = &t.dense().unwrap();
        let d = max_abs_diff(t, &back.weights.dense(n).unwrap());
        let scale = max_abs(t);
        // Q4_1 has 16 levels per block of 32: re-quantizing a dequantized tensor may move a
        // value by at most one step of its block, 1/15 of the block's range.
        worst = worst.max(d / scale.max(1e-6));
    }
    println!("GGUF round trip: worst max-abs-diff / max-abs-value = {worst:.4}");
    // Unchanged tensors are copied byte for byte from the input.
    assert_eq!(worst, 0.0);

    // Change one matrix: it is re-quantized to its type (within one quantization step of its
    // block, 1/15 of the block's range for Q4_1), every other tensor stays exact.
    let mut edited = m.clone();
    let w = edited.weight(3, engram::model::Site::MlpOut).unwrap();
    let w2 = (w * 1.05).unwrap();
    edited
        .set_weight(3, engram::model::Site::MlpOut, w2.clone())
        .unwrap();
    let out2 = dir.path().join("edited.gguf");
    engram::model::save::save_gguf(&edited, &out2, None, None).unwrap();
    let back2 = engram::model::load(Some(out2.to_str().unwrap()), &Device::Cpu).unwrap();
    let name = m.weight_name(3, engram::model::Site::MlpOut).unwrap();
    for (n, t) in m.weights.iter() {
        let d = max_abs_diff(
            edited.weights.get(n).unwrap(),
            back2.weights.get(n).unwrap(),
        );
        if *n == name {
            let scale = max_abs(&w2);
            println!(
                "edited matrix after Q4_1 re-quantization: max diff / max value = {:.4}",
                d / scale
            );
            assert!(d > 0.0 && d / scale <= 0.14, "{d}");
        } else {
            assert_eq!(
                max_abs_diff(&t.dense().unwrap(), &back2.weights.dense(n).unwrap()),
                0.0,
                "{n}"
            );
        }
    }
}
