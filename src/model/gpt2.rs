//! The GPT-2 family.
//!
//! Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"; reference code
//! `transformers/models/gpt2/modeling_gpt2.py`. Pre-LayerNorm blocks, learned absolute
//! positions, fused q/k/v projection `c_attn`, and a GELU (tanh approximation, "gelu_new")
//! MLP `c_proj(gelu(c_fc(x)))`. The checkpoint stores linear weights as Conv1D `[in, out]`;
//! loading transposes them to `[out, in]` so every family shares one convention, and saving
//! transposes them back. Names drop the optional `transformer.` prefix.

use super::config::Config;
use super::hooks::{HookPoint, Trace};
use super::layers::{attend, attention_bias, layer_norm, linear, position_ids, KvCache};
use super::Weights;
use crate::error::Result;
use candle_core::Tensor;

/// The Conv1D weights, which are transposed at load and save.
pub fn is_conv1d(name: &str) -> bool {
    name.ends_with("attn.c_attn.weight")
        || name.ends_with("attn.c_proj.weight")
        || name.ends_with("mlp.c_fc.weight")
        || name.ends_with("mlp.c_proj.weight")
}

/// Every tensor a GPT-2 checkpoint must have, with its shape (after the Conv1D transpose).
pub fn expected_tensors(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let (d, m) = (cfg.d_model, cfg.d_mlp);
    let mut v = vec![
        ("wte.weight".to_string(), vec![cfg.vocab_size, d]),
        ("wpe.weight".to_string(), vec![cfg.max_positions, d]),
        ("ln_f.weight".to_string(), vec![d]),
        ("ln_f.bias".to_string(), vec![d]),
    ];
    for l in 0..cfg.n_layers {
        let p = format!("h.{l}");
        for ln in ["ln_1", "ln_2"] {
            v.push((format!("{p}.{ln}.weight"), vec![d]));
            v.push((format!("{p}.{ln}.bias"), vec![d]));
        }
        v.push((format!("{p}.attn.c_attn.weight"), vec![3 * d, d]));
        v.push((format!("{p}.attn.c_attn.bias"), vec![3 * d]));
        v.push((format!("{p}.attn.c_proj.weight"), vec![d, d]));
        v.push((format!("{p}.attn.c_proj.bias"), vec![d]));
        v.push((format!("{p}.mlp.c_fc.weight"), vec![m, d]));
        v.push((format!("{p}.mlp.c_fc.bias"), vec![m]));
        v.push((format!("{p}.mlp.c_proj.weight"), vec![d, m]));
        v.push((format!("{p}.mlp.c_proj.bias"), vec![d]));
    }
    v
}

/// The GPT-2 forward pass.
///
/// # Shapes
/// `ids`: `[batch, seq]`; `key_mask`: `[batch][past + seq]`; returns `[batch, seq, vocab]`
/// (or the trace's stop-point activation).
pub fn forward(
    cfg: &Config,
    w: &Weights,
    ids: &Tensor,
    key_mask: Option<&[Vec<u8>]>,
    mut cache: Option<&mut KvCache>,
    trace: &mut Trace,
) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let device = ids.device();
    let diff = trace.is_differentiable();
    let stop = trace.stop_point();
    let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
    let pos = position_ids(b, t, past, key_mask);
    if let Some(&p) = pos.iter().flatten().max() {
        if p as usize >= cfg.max_positions {
            return Err(crate::Error::PositionOutOfRange {
                position: p as usize,
                seq_len: cfg.max_positions,
            });
        }
    }
    let pos = super::layers::ids_tensor(&pos, device)?;
    let bias = attention_bias(b, t, past, key_mask, device)?;
    let (nh, hd, d) = (cfg.n_heads, cfg.head_dim, cfg.d_model);

    let wte = w.get("wte.weight")?;
    let tok = wte.embedding(&ids.flatten_all()?)?.reshape((b, t, d))?;
    let pe = w
        .get("wpe.weight")?
        .embedding(&pos.flatten_all()?)?
        .reshape((b, t, d))?;
    let mut x = trace.hook(HookPoint::Embed, (tok + pe)?)?;
    if stop == Some(HookPoint::Embed) {
        return Ok(x);
    }
    for l in 0..cfg.n_layers {
        let p = format!("h.{l}");
        let g = |n: &str| w.get(&format!("{p}.{n}"));
        macro_rules! hook {
            ($point:expr, $x:expr) => {{
                let y = trace.hook($point, $x)?;
                if stop == Some($point) {
                    return Ok(y);
                }
                y
            }};
        }
        x = hook!(HookPoint::ResidPre(l), x);

        // Attention.
        let h = layer_norm(&x, g("ln_1.weight")?, g("ln_1.bias")?, cfg.norm_eps, diff)?;
        let qkv = linear(&h, g("attn.c_attn.weight")?, Some(g("attn.c_attn.bias")?))?; // (b, t, 3d)
        let split = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, i * d, d)?
                .reshape((b, t, nh, hd))?
                .transpose(1, 2)?) // (b, nh, t, hd)
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?.contiguous()?);
        let (k, v) = KvCache::extend(cache.as_deref_mut(), l, k, v)?; // (b, kv_heads, past + t, hd)
        let y = attend(&q, &k, &v, bias.as_ref(), diff)?; // (b, t, d)
        let a = linear(&y, g("attn.c_proj.weight")?, Some(g("attn.c_proj.bias")?))?;
        let a = hook!(HookPoint::AttnOut(l), a);
        x = (x + a)?;

        // MLP.
        let h = layer_norm(&x, g("ln_2.weight")?, g("ln_2.bias")?, cfg.norm_eps, diff)?;
        let h = hook!(HookPoint::MlpIn(l), h);
        let key = linear(&h, g("mlp.c_fc.weight")?, Some(g("mlp.c_fc.bias")?))?.gelu()?;
        let key = hook!(HookPoint::MlpKey(l), key); // (b, t, d_mlp)
        let m = linear(&key, g("mlp.c_proj.weight")?, Some(g("mlp.c_proj.bias")?))?;
        let m = hook!(HookPoint::MlpOut(l), m);
        x = (x + m)?;
        x = hook!(HookPoint::ResidPost(l), x);
    }
    let x = layer_norm(
        &x,
        w.get("ln_f.weight")?,
        w.get("ln_f.bias")?,
        cfg.norm_eps,
        diff,
    )?;
    linear(&x, wte, None)
}
