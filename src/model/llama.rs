//! The Llama family: Llama, Mistral, Qwen2 (q/k/v bias), SmolLM.
//!
//! Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"; reference code
//! `transformers/models/llama/modeling_llama.py`. Pre-RMSNorm blocks, rotary position
//! embeddings (Su et al. 2021) in the "rotate half" layout of the Hugging Face checkpoints,
//! grouped-query attention, and a SwiGLU MLP: `down_proj(silu(gate_proj(x)) * up_proj(x))`.
//! Weight names are the checkpoint's (`model.layers.{l}.mlp.down_proj.weight`, ...).

use super::config::{Arch, Config};
use super::fused::swiglu;
use super::hooks::{HookPoint, Trace};
use super::layers::{attend, hook, linear, rms_norm, BlockCtx, KvCache, Step};
use super::{Mat, Weights};
use crate::error::Result;
use candle_core::{Device, Tensor};

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
        let p = Arch::Llama.layer_prefix(l);
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

/// `x * cos + rotate_half(x) * sin`, with `rotate_half([x1, x2]) = [-x2, x1]` (one fused op
/// with its backward pass, `fused::rope`).
///
/// # Shapes
/// `x`: `[batch, heads, seq, head_dim]`, `cos`, `sin`: `[batch, 1, seq, head_dim]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(super::fused::rope(x, cos, sin)?)
}

/// Per-pass tables shared by every block: rotary cos/sin for the pass's positions.
pub fn prepare(
    cfg: &Config,
    pos: &[Vec<u32>],
    device: &Device,
) -> Result<Option<(Tensor, Tensor)>> {
    Ok(Some(rope_tables(cfg, pos, device)?))
}

/// Token embeddings.
///
/// # Shapes
/// `ids`: `[batch, seq]` -> `[batch, seq, d_model]`.
pub fn embed(cfg: &Config, w: &Weights, ids: &Tensor, _pos: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let ids = ids.flatten_all()?;
    let rows = w.mat("model.embed_tokens.weight")?.rows(&ids)?;
    Ok(rows.reshape((b, t, cfg.d_model))?)
}

/// One decoder block: `x + attn(norm(x))`, then `x + mlp(norm(x))`, with its hook points.
///
/// # Shapes
/// `x`: `[batch, seq, d_model]` (the residual entering block `l`).
pub fn block(
    cfg: &Config,
    w: &Weights,
    l: usize,
    x: Tensor,
    ctx: &BlockCtx,
    cache: Option<&mut KvCache>,
    trace: &mut Trace,
) -> Result<Step> {
    let (b, t, _) = x.dims3()?;
    let diff = trace.is_differentiable();
    let stop = trace.stop_point();
    let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let (cos, sin) = ctx
        .rope
        .as_ref()
        .ok_or_else(|| crate::Error::invalid("rope", "missing tables"))?;
    let p = Arch::Llama.layer_prefix(l);
    let g = |n: &str| w.get(&format!("{p}.{n}"));
    let mat = |n: &str| w.mat(&format!("{p}.{n}"));
    let opt = |n: &str| if cfg.attn_bias { g(n).ok() } else { None };
    let x = hook!(trace, stop, HookPoint::ResidPre(l), x);

    // Attention.
    let h = rms_norm(&x, g("input_layernorm.weight")?, cfg.norm_eps, diff)?;
    let q = linear(
        &h,
        mat("self_attn.q_proj.weight")?,
        opt("self_attn.q_proj.bias"),
    )?;
    let k = linear(
        &h,
        mat("self_attn.k_proj.weight")?,
        opt("self_attn.k_proj.bias"),
    )?;
    let v = linear(
        &h,
        mat("self_attn.v_proj.weight")?,
        opt("self_attn.v_proj.bias"),
    )?;
    let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?; // (b, nh, t, hd)
    let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?; // (b, nkv, t, hd)
    let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?; // (b, nkv, t, hd)
    let q = apply_rope(&q, cos, sin)?;
    let k = apply_rope(&k, cos, sin)?;
    let (k, v) = KvCache::extend(cache, l, k, v)?; // (b, nkv, past + t, hd)
    let (q, x, bias) = ctx.trim(q, x)?; // t -> 1 when only the last position is wanted
    let y = attend(&q, &k, &v, bias.as_ref(), diff)?; // (b, t, nh * hd), grouped heads
    let a = linear(&y, mat("self_attn.o_proj.weight")?, None)?;
    let a = hook!(trace, stop, HookPoint::AttnOut(l), a);
    let x = (x + a)?;

    // MLP.
    let h = rms_norm(
        &x,
        g("post_attention_layernorm.weight")?,
        cfg.norm_eps,
        diff,
    )?;
    let h = hook!(trace, stop, HookPoint::MlpIn(l), h);
    let (wg, wu, wd) = (
        mat("mlp.gate_proj.weight")?,
        mat("mlp.up_proj.weight")?,
        mat("mlp.down_proj.weight")?,
    );
    let key_seen = trace.touches(HookPoint::MlpKey(l));
    let fused = match (key_seen, diff) {
        (false, false) if h.device().is_cpu() => Some(mlp_in_row_blocks(&h, wg, wu, wd)?),
        // One autograd node for the whole MLP (the value search; None when weights train).
        (false, true) => super::fused::mlp(&h, wg, wu, wd)?,
        _ => None,
    };
    let m = if let Some(m) = fused {
        m
    } else {
        let gate = linear(&h, wg, None)?; // (b, t, d_mlp)
        let up = linear(&h, wu, None)?;
        // silu(gate) * up, one fused op.
        let key = hook!(trace, stop, HookPoint::MlpKey(l), swiglu(&gate, &up)?);
        linear(&key, wd, None)?
    };
    let m = hook!(trace, stop, HookPoint::MlpOut(l), m);
    let x = (x + m)?;
    Ok(Step::Continue(hook!(
        trace,
        stop,
        HookPoint::ResidPost(l),
        x
    )))
}

/// Rows per block in [`mlp_in_row_blocks`].
const MLP_ROW_BLOCK: usize = 512;

/// The MLP `down(silu(gate(h)) * up(h))`, `MLP_ROW_BLOCK` positions at a time, for passes
/// that neither differentiate nor look at the key.
///
/// Why: on a large batch (causal tracing runs up to ~10,000 positions per layer) the
/// `[positions, d_mlp]` intermediates outgrow the caches, and the three matrix products ran at
/// 58-68% of the square-matmul peak; in blocks of 512 positions, 79-84% (`examples/gemm_shapes.rs`,
/// 8192 and 16384 positions). Same numbers: each position's row is computed the same way.
///
/// # Shapes
/// `h`: `[batch, seq, d_model]` -> `[batch, seq, d_model]`.
fn mlp_in_row_blocks(h: &Tensor, wg: Mat<'_>, wu: Mat<'_>, wd: Mat<'_>) -> Result<Tensor> {
    let (b, t, d) = h.dims3()?;
    let n = b * t;
    let mlp = |x: &Tensor| -> Result<Tensor> {
        let key = swiglu(&linear(x, wg, None)?, &linear(x, wu, None)?)?;
        linear(&key, wd, None)
    };
    if n <= MLP_ROW_BLOCK {
        return mlp(h);
    }
    let rows = h.reshape((1, n, d))?;
    let parts = (0..n)
        .step_by(MLP_ROW_BLOCK)
        .map(|i| mlp(&rows.narrow(1, i, MLP_ROW_BLOCK.min(n - i))?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 1)?.reshape((b, t, d))?)
}

/// Final norm and output head.
///
/// # Shapes
/// `x`: `[batch, seq, d_model]` -> `[batch, seq, vocab]`.
pub fn head(cfg: &Config, w: &Weights, x: &Tensor, diff: bool) -> Result<Tensor> {
    let x = rms_norm(x, w.get("model.norm.weight")?, cfg.norm_eps, diff)?;
    let head = if cfg.tie_embeddings {
        w.mat("model.embed_tokens.weight")?
    } else {
        w.mat("lm_head.weight")?
    };
    linear(&x, head, None)
}
