//! Mechanics of the model layer on tiny models: traces, gradients, padding, caching, saving.

use crate::common::*;
use candle_core::{Device, Tensor, Var, D};
use engram::model::generate::{generate, generate_grouped, GenParams};
use engram::model::save::{save_hf_dir, SaveAs};
use engram::model::{Batch, HookPoint, Op, PadSide, Positions, Trace};

fn rows() -> Batch {
    Batch {
        ids: vec![vec![5, 17, 3, 88, 42, 9], vec![90, 2, 33, 47, 12, 76]],
        mask: None,
    }
}

#[test]
fn empty_trace_is_bit_identical_to_a_capturing_trace() {
    for name in ["tiny-llama", "tiny-gpt2"] {
        let m = tiny(name);
        let plain = m.forward(&rows(), &mut Trace::new()).unwrap();
        let mut t = Trace::new();
        for l in 0..m.config.n_layers {
            for p in [
                HookPoint::ResidPre(l),
                HookPoint::AttnOut(l),
                HookPoint::MlpIn(l),
                HookPoint::MlpKey(l),
                HookPoint::MlpOut(l),
                HookPoint::ResidPost(l),
            ] {
                t.capture(p);
            }
        }
        let hooked = m.forward(&rows(), &mut t).unwrap();
        assert_eq!(max_abs_diff(&plain, &hooked), 0.0, "{name}");
        assert_eq!(
            t.get(HookPoint::MlpKey(1)).unwrap().dims(),
            &[2, 6, m.config.d_mlp]
        );
    }
}

#[test]
fn mlp_in_row_blocks_matches_the_whole_batch() {
    // 576 positions (more than 512): a pass that looks at no MLP key runs the MLP in row blocks;
    // capturing the keys forces the whole-batch path.
    let m = tiny("tiny-llama");
    let ids: Vec<Vec<u32>> = (0..12)
        .map(|r| {
            (0..48)
                .map(|j| ((r * 31 + j * 7) % 90 + 1) as u32)
                .collect()
        })
        .collect();
    let batch = Batch { ids, mask: None };
    let blocked = m.forward(&batch, &mut Trace::new()).unwrap();
    let mut t = Trace::new();
    for l in 0..m.config.n_layers {
        t.capture(HookPoint::MlpKey(l));
    }
    let whole = m.forward(&batch, &mut t).unwrap();
    let diff = max_abs_diff(&blocked, &whole);
    assert!(diff < 1e-5, "row blocks differ by {diff}");
}

#[test]
fn replacing_an_activation_with_itself_changes_nothing() {
    let m = tiny("tiny-llama");
    let mut t = Trace::new();
    t.capture(HookPoint::ResidPre(1));
    let base = m.forward(&rows(), &mut t).unwrap();
    let act = t.take(HookPoint::ResidPre(1)).unwrap();
    let mut r = Trace::new();
    r.push(
        HookPoint::ResidPre(1),
        Positions::Tokens(vec![1, 4]),
        Op::Replace(act),
    );
    let out = m.forward(&rows(), &mut r).unwrap();
    assert_eq!(max_abs_diff(&base, &out), 0.0);
}

#[test]
fn replacing_with_another_run_changes_only_later_positions() {
    let m = tiny("tiny-llama");
    let other = Batch {
        ids: vec![vec![1, 1, 1, 1, 1, 1]; 2],
        mask: None,
    };
    let mut t = Trace::new();
    t.capture(HookPoint::ResidPre(0));
    m.forward(&other, &mut t).unwrap();
    let act = t.take(HookPoint::ResidPre(0)).unwrap();
    let base = m.forward(&rows(), &mut Trace::new()).unwrap();
    let mut r = Trace::new();
    r.push(
        HookPoint::ResidPre(0),
        Positions::Tokens(vec![3]),
        Op::Replace(act),
    );
    let out = m.forward(&rows(), &mut r).unwrap();
    let before = max_abs_diff(
        &base.narrow(1, 0, 3).unwrap(),
        &out.narrow(1, 0, 3).unwrap(),
    );
    let after = max_abs_diff(
        &base.narrow(1, 3, 3).unwrap(),
        &out.narrow(1, 3, 3).unwrap(),
    );
    assert_eq!(
        before, 0.0,
        "causal attention: earlier positions cannot change"
    );
    assert!(after > 1e-3, "the patched position must change ({after})");
}

#[test]
fn stop_after_returns_the_activation() {
    let m = tiny("tiny-gpt2");
    let mut t = Trace::new();
    t.stop_after(HookPoint::MlpKey(0));
    let y = m.forward(&rows(), &mut t).unwrap();
    assert_eq!(y.dims(), &[2, 6, m.config.d_mlp]);
}

#[test]
fn fused_and_composed_kernels_give_the_same_logits() {
    for name in ["tiny-llama", "tiny-gpt2", "tiny-qwen2"] {
        let m = tiny(name);
        let a = m.forward(&rows(), &mut Trace::new()).unwrap();
        let b = m
            .forward(&rows(), &mut Trace::new().differentiable())
            .unwrap();
        let d = max_abs_diff(&a, &b);
        println!("{name}: fused vs composed max abs diff {d:e}");
        assert!(d <= 1e-5, "{name}: {d}");
    }
}

/// The gradient with respect to a vector added at `mlp_out` matches central differences.
#[test]
fn gradient_through_add_matches_finite_differences() {
    for name in ["tiny-llama", "tiny-gpt2"] {
        let m = tiny(name);
        let d = m.config.d_model;
        let v = Var::from_tensor(&Tensor::zeros(d, candle_core::DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let w = Tensor::randn(0f32, 1.0, m.config.vocab_size, &Device::Cpu).unwrap();
        let loss_of = |vec: &Tensor| -> Tensor {
            let mut t = Trace::new().differentiable();
            t.push(
                HookPoint::MlpOut(0),
                Positions::Cells(vec![(0, 2), (1, 4)]),
                Op::Add(vec.clone()),
            );
            let logits = m.forward(&rows(), &mut t).unwrap(); // (2, 6, vocab)
            let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
            lp.narrow(1, 5, 1)
                .unwrap()
                .broadcast_mul(&w)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let loss = loss_of(v.as_tensor());
        let grads = loss.backward().unwrap();
        let g: Vec<f32> = grads.get(v.as_tensor()).unwrap().to_vec1().unwrap();
        let eps = 1e-2f32;
        let mut worst = 0f32;
        for i in [0, 3, d / 2, d - 1] {
            let mut e = vec![0f32; d];
            e[i] = eps;
            let e = Tensor::from_vec(e, d, &Device::Cpu).unwrap();
            let plus = loss_of(&e).to_scalar::<f32>().unwrap();
            let minus = loss_of(&e.neg().unwrap()).to_scalar::<f32>().unwrap();
            let fd = (plus - minus) / (2.0 * eps);
            // Error relative to the gradient's scale: f32 central differences of a loss of
            // this size carry absolute noise of about 1e-3.
            let scale = g.iter().fold(0f32, |a, x| a.max(x.abs()));
            let rel = (fd - g[i]).abs() / scale;
            worst = worst.max(rel);
            println!(
                "{name}: coord {i}: analytic {:.5} finite-difference {fd:.5}",
                g[i]
            );
        }
        assert!(worst < 2e-2, "{name}: relative error {worst}");
        assert!(g.iter().any(|x| x.abs() > 1e-4), "gradient must not vanish");
    }
}

#[test]
fn padded_rows_match_unpadded_runs() {
    for name in ["tiny-llama", "tiny-gpt2"] {
        let m = tiny(name);
        let a = vec![5u32, 17, 3, 88, 42, 9];
        let b = vec![90u32, 2, 33];
        let single_b = m
            .forward(&Batch::single(&b), &mut Trace::new())
            .unwrap()
            .squeeze(0)
            .unwrap();
        for side in [PadSide::Right, PadSide::Left] {
            let batch = Batch::padded(&[a.clone(), b.clone()], side, 0);
            let out = m.forward(&batch, &mut Trace::new()).unwrap();
            let row_b = out.get(1).unwrap();
            let row_b = match side {
                PadSide::Right => row_b.narrow(0, 0, 3).unwrap(),
                PadSide::Left => row_b.narrow(0, 3, 3).unwrap(),
            };
            let d = max_abs_diff(&row_b, &single_b);
            assert!(d <= 1e-4, "{name} {side:?}: {d}");
        }
    }
}

#[test]
fn cached_greedy_decoding_matches_full_recomputation() {
    for name in ["tiny-llama", "tiny-gpt2"] {
        let m = tiny(name);
        let prompt = vec![5u32, 17, 3, 88];
        let p = GenParams {
            max_new_tokens: 8,
            stop_at_eos: false,
            ..Default::default()
        };
        let cached = generate(&m, std::slice::from_ref(&prompt), &p)
            .unwrap()
            .remove(0);
        let mut ids = prompt.clone();
        for _ in 0..8 {
            let logits = m.forward(&Batch::single(&ids), &mut Trace::new()).unwrap();
            let last = logits.squeeze(0).unwrap().get(ids.len() - 1).unwrap();
            ids.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
        }
        assert_eq!(cached, ids[prompt.len()..].to_vec(), "{name}");
        // Batched, left-padded decoding gives each row what it gets alone.
        let other = vec![90u32, 2];
        let both = generate(&m, &[prompt.clone(), other.clone()], &p).unwrap();
        assert_eq!(both[0], cached, "{name}");
        assert_eq!(both[1], generate(&m, &[other], &p).unwrap()[0], "{name}");
    }
}

#[test]
fn sampling_is_seeded() {
    let m = tiny("tiny-llama");
    let p = GenParams {
        max_new_tokens: 12,
        temperature: 1.0,
        top_p: 0.9,
        top_k: 0,
        seed: 3,
        stop_at_eos: false,
    };
    let a = generate(&m, &[vec![5, 17]], &p).unwrap();
    let b = generate(&m, &[vec![5, 17]], &p).unwrap();
    let c = generate(&m, &[vec![5, 17]], &GenParams { seed: 4, ..p }).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn grouped_sampling_matches_separate_calls() {
    // What the key statistics rely on: seeded chunks decoded as one batch sample exactly
    // what each chunk samples alone.
    let m = tiny("tiny-llama");
    for top_p in [1.0, 0.9] {
        let p = GenParams {
            max_new_tokens: 12,
            temperature: 1.0,
            top_p,
            top_k: 0,
            seed: 0,
            stop_at_eos: false,
        };
        let rows = vec![vec![5u32, 17]; 5];
        let mut steps = 0;
        let all = generate_grouped(&m, &rows, &p, &[(2, 7), (3, 11)], &mut |s| steps = s).unwrap();
        let first = generate(&m, &rows[..2], &GenParams { seed: 7, ..p }).unwrap();
        let second = generate(&m, &rows[2..], &GenParams { seed: 11, ..p }).unwrap();
        assert_eq!(all[..2], first[..], "top_p {top_p}");
        assert_eq!(all[2..], second[..], "top_p {top_p}");
        assert_ne!(first[0], first[1], "rows of a group draw different numbers");
        assert_eq!(steps, 12);
    }
    // Groups must cover the rows.
    let p = GenParams::default();
    assert!(generate_grouped(&m, &[vec![5], vec![6]], &p, &[(1, 0)], &mut |_| {}).is_err());
}

#[test]
fn safetensors_save_then_load_is_identical() {
    for name in ["tiny-llama", "tiny-gpt2", "tiny-qwen2"] {
        let m = tiny(name);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("copy");
        engram::model::save::save(&m, &out, SaveAs::HfDir).unwrap();
        let back = engram::model::load(Some(out.to_str().unwrap()), &Device::Cpu).unwrap();
        assert_eq!(back.weights.len(), m.weights.len());
        for (n, t) in m.weights.iter() {
            assert_eq!(
                max_abs_diff(&t.dense().unwrap(), &back.weights.dense(n).unwrap()),
                0.0,
                "{name}: {n}"
            );
        }
        assert_eq!(back.config, m.config);
    }
}

#[test]
fn saving_refuses_non_finite_weights_and_the_input_path() {
    let mut m = tiny("tiny-llama");
    let src = fixture("tiny-llama");
    let err = save_hf_dir(&m, &src).unwrap_err();
    assert!(err.to_string().contains("never overwrites"), "{err}");
    let w = m.weight(0, engram::model::Site::MlpOut).unwrap().clone();
    let nan = (w.ones_like().unwrap() * f64::NAN).unwrap();
    let e = m
        .set_weight(0, engram::model::Site::MlpOut, nan)
        .unwrap_err();
    assert!(matches!(e, engram::Error::NonFinite { .. }), "{e}");
    let e = m
        .set_weight(7, engram::model::Site::MlpOut, w.clone())
        .unwrap_err();
    assert!(
        matches!(
            e,
            engram::Error::LayerOutOfRange {
                layer: 7,
                n_layers: 2
            }
        ),
        "{e}"
    );
}

#[test]
fn gguf_qk_permutation_round_trips() {
    let w = Tensor::arange(0f32, 8.0 * 6.0, &Device::Cpu)
        .unwrap()
        .reshape((8, 6))
        .unwrap();
    let p = engram::model::load::permute_qk(&w, 2, false).unwrap();
    assert!(max_abs_diff(&p, &w) > 0.0);
    let back = engram::model::load::permute_qk(&p, 2, true).unwrap();
    assert_eq!(max_abs_diff(&back, &w), 0.0);
}

/// Starting at layer l from a captured residual, with the cache of an earlier run holding the
/// first positions, gives the same logits as a full forward.
#[test]
fn forward_from_a_layer_and_position_matches_a_full_forward() {
    for name in ["tiny-llama", "tiny-gpt2"] {
        let m = tiny(name);
        let b = rows();
        let mut t = Trace::new();
        t.capture(HookPoint::ResidPre(1));
        let mut cache = engram::model::KvCache::new(m.config.n_layers);
        let full = m.forward_cached(&b, Some(&mut cache), &mut t).unwrap();
        let resid = t.take(HookPoint::ResidPre(1)).unwrap();
        let y = m
            .forward_from(1, &resid, None, None, &mut Trace::new(), false)
            .unwrap();
        assert!(max_abs_diff(&full, &y) <= 1e-5, "{name}");
        // Positions 0..4 from the cache, 4..6 recomputed, head on the last only.
        let mut part = cache.truncate(4).unwrap();
        let tail = resid.narrow(1, 4, 2).unwrap();
        let y = m
            .forward_from(1, &tail, None, Some(&mut part), &mut Trace::new(), true)
            .unwrap();
        let d = max_abs_diff(&full.narrow(1, 5, 1).unwrap(), &y);
        assert!(d <= 1e-5, "{name}: {d}");
        // With only the last logits wanted the last block runs the last position alone,
        // unless the trace hooks inside it: then every position is still there to hook.
        let last = m.config.n_layers - 1;
        let mut t2 = Trace::new();
        t2.capture(HookPoint::MlpOut(last));
        let y2 = m
            .forward_from(1, &resid, None, None, &mut t2, true)
            .unwrap();
        let seen = t2.take(HookPoint::MlpOut(last)).unwrap();
        assert_eq!(seen.dim(1).unwrap(), resid.dim(1).unwrap(), "{name}");
        let t_len = full.dim(1).unwrap();
        let d = max_abs_diff(&full.narrow(1, t_len - 1, 1).unwrap(), &y2);
        assert!(d <= 1e-5, "{name}: {d}");
    }
}

/// A sharded checkpoint (model.safetensors.index.json + shards) loads the same tensors.
#[test]
fn sharded_safetensors_load_like_a_single_file() {
    let src = fixture("tiny-llama");
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let sub: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&sub, dir.path().join(shard)).unwrap();
        for n in part.iter() {
            map.insert((*n).clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded = engram::model::load(Some(dir.path().to_str().unwrap()), &Device::Cpu).unwrap();
    let single = tiny("tiny-llama");
    let a = single.forward(&rows(), &mut Trace::new()).unwrap();
    let b = sharded.forward(&rows(), &mut Trace::new()).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

/// A character-level tokenizer for the tiny GPT-2 (vocabulary 96: the 95 printable ASCII
/// characters, then `<|endoftext|>`), so that text-level code runs on it.
fn char_tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = (32u8..127)
        .enumerate()
        .map(|(i, c)| ((c as char).to_string(), serde_json::json!(i)))
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 95, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "vocab": vocab, "merges": []}
    })
    .to_string()
}

/// Learning on GPT-2 selects its layers' matrices by the family's names (`h.{l}.`; the
/// earlier `layer_of` matched only `transformer.h.` and trained nothing) and the loss falls.
#[test]
fn learning_on_gpt2_trains_its_layers() {
    use engram::unlearn::learn::{learn, LearnParams};
    use engram::unlearn::Example;
    let src = fixture("tiny-gpt2");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("tokenizer.json"), char_tokenizer_json()).unwrap();
    let m = engram::model::load(Some(dir.path().to_str().unwrap()), &Device::Cpu).unwrap();
    assert_eq!(m.tok().unwrap().encode("Ab c").unwrap().len(), 4);
    let data = vec![Example {
        prompt: "Q: code?\nA:".into(),
        answer: " 7341".into(),
    }];
    let mut p = LearnParams::defaults(m.config.n_layers);
    p.steps = 20;
    p.lr = 1e-2;
    p.target_loss = 0.0;
    let (_, r) = learn(&m, &data, &p, &mut |_, _| {}).unwrap();
    // Every layer's four matrices: c_attn, attn c_proj, c_fc, mlp c_proj.
    let want: usize = (0..m.config.n_layers)
        .flat_map(|l| ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"].map(move |n| (l, n)))
        .map(|(l, n)| {
            m.weights
                .param(&format!("h.{l}.{n}.weight"))
                .unwrap()
                .elem_count()
        })
        .sum();
    assert_eq!(r.trained_params, want);
    // The tied head is not trained and its random rows are small (std 0.02 in 32 dims), so
    // logits span about +-0.6 and the NLL cannot fall far below ln(96) - 0.6 = 3.97: measured
    // 4.58 -> 3.94 in 20 steps.
    assert!(
        r.loss_after < r.loss_before - 0.4,
        "{} -> {}",
        r.loss_before,
        r.loss_after
    );
}
