//! The Llama family: Llama, Mistral, Qwen2 (q/k/v bias), SmolLM.
//!
//! Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"; reference code
//! `transformers/models/llama/modeling_llama.py`. Pre-RMSNorm blocks, rotary position
//! embeddings (Su et al. 2021) in the "rotate half" layout of the Hugging Face checkpoints,
//! grouped-query attention, and a SwiGLU MLP: `down_proj(silu(gate_proj(x)) * up_proj(x))`.
//! Weight names are the checkpoint's (`model.layers.{l}.mlp.down_proj.weight`, ...).

use super::config::Config;
use super::hooks::{HookPoint, Trace};
use super::layers::{attend, attention_bias, linear, position_ids, repeat_kv, rms_norm, KvCache};
use super::Weights;
use crate::error::Result;
use candle_core::{Device, Tensor, D};

/// Every tensor a Llama checkpoint must have, with its shape.
pub fn expected_tensors(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let (d, m, hd) = (cfg.d_model, cfg.d_mlp, cfg.head_dim);
    let (q, kv) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
    let mut v = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![cfg.vocab_size, d],
        ),
        ("model.norm.weight".to_string(), vec![d]),
    ];
    if !cfg.tie_embeddings {
        v.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, d]));
    }
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.input_layernorm.weight"), vec![d]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![q, d]));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d]));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d]));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![d, q]));
        if cfg.attn_bias {
            v.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            v.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            v.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![m, d]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![m, d]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![d, m]));
    }
    v
}

/// cos and sin tables for the given positions, in the rotate-half layout.
///
/// # Shapes
/// `pos`: `[batch][seq]`; returns two `[batch, 1, seq, head_dim]` tensors.
fn rope_tables(cfg: &Config, pos: &[Vec<u32>], device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64) as f32)
        .collect();
    let (b, t) = (pos.len(), pos.first().map(|p| p.len()).unwrap_or(0));
    let mut freqs = Vec::with_capacity(b * t * cfg.head_dim);
    for row in pos {
        for &p in row {
            // The two halves share frequencies (rotate-half layout).
            for _ in 0..2 {
                freqs.extend(inv.iter().map(|f| p as f32 * f));
            }
        }
    }
    let f = Tensor::from_vec(freqs, (b, 1, t, cfg.head_dim), device)?;
    Ok((f.cos()?, f.sin()?))
}

/// `x * cos + rotate_half(x) * sin`, with `rotate_half([x1, x2]) = [-x2, x1]`.
///
/// # Shapes
/// `x`: `[batch, heads, seq, head_dim]`, `cos`, `sin`: `[batch, 1, seq, head_dim]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

/// The Llama forward pass.
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
    let (cos, sin) = rope_tables(cfg, &pos, device)?;
    let bias = attention_bias(b, t, past, key_mask, device)?;
    let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);

    let emb = w.get("model.embed_tokens.weight")?;
    let x = emb
        .embedding(&ids.flatten_all()?)?
        .reshape((b, t, cfg.d_model))?;
    let mut x = trace.hook(HookPoint::Embed, x)?;
    if stop == Some(HookPoint::Embed) {
        return Ok(x);
    }
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        let g = |n: &str| w.get(&format!("{p}.{n}"));
        let opt = |n: &str| {
            if cfg.attn_bias {
                g(n).ok()
            } else {
                None
            }
        };
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
        let h = rms_norm(&x, g("input_layernorm.weight")?, cfg.norm_eps, diff)?;
        let q = linear(
            &h,
            g("self_attn.q_proj.weight")?,
            opt("self_attn.q_proj.bias"),
        )?;
        let k = linear(
            &h,
            g("self_attn.k_proj.weight")?,
            opt("self_attn.k_proj.bias"),
        )?;
        let v = linear(
            &h,
            g("self_attn.v_proj.weight")?,
            opt("self_attn.v_proj.bias"),
        )?;
        let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?; // (b, nh, t, hd)
        let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?; // (b, nkv, t, hd)
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?; // (b, nkv, t, hd)
        let q = apply_rope(&q, &cos, &sin)?;
        let k = apply_rope(&k, &cos, &sin)?;
        let (k, v) = KvCache::extend(cache.as_deref_mut(), l, k, v)?; // (b, kv_heads, past + t, hd)
        let k = repeat_kv(k, nh / nkv)?; // (b, nh, past + t, hd)
        let v = repeat_kv(v, nh / nkv)?;
        let y = attend(&q, &k, &v, bias.as_ref(), diff)?; // (b, t, nh * hd)
        let a = linear(&y, g("self_attn.o_proj.weight")?, None)?;
        let a = hook!(HookPoint::AttnOut(l), a);
        x = (x + a)?;

        // MLP.
        let h = rms_norm(
            &x,
            g("post_attention_layernorm.weight")?,
            cfg.norm_eps,
            diff,
        )?;
        let h = hook!(HookPoint::MlpIn(l), h);
        let gate = linear(&h, g("mlp.gate_proj.weight")?, None)?.silu()?; // (b, t, d_mlp)
        let up = linear(&h, g("mlp.up_proj.weight")?, None)?;
        let key = hook!(HookPoint::MlpKey(l), (gate * up)?);
        let m = linear(&key, g("mlp.down_proj.weight")?, None)?;
        let m = hook!(HookPoint::MlpOut(l), m);
        x = (x + m)?;
        x = hook!(HookPoint::ResidPost(l), x);
    }
    let x = rms_norm(&x, w.get("model.norm.weight")?, cfg.norm_eps, diff)?;
    let head = if cfg.tie_embeddings {
        emb
    } else {
        w.get("lm_head.weight")?
    };
    linear(&x, head, None)
}
