//! The GPT-2 family.
//!
//! Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"; reference code
//! `transformers/models/gpt2/modeling_gpt2.py`. Pre-LayerNorm blocks, learned absolute
//! positions, fused q/k/v projection `c_attn`, and a GELU (tanh approximation, "gelu_new")
//! MLP `c_proj(gelu(c_fc(x)))`. The checkpoint stores linear weights as Conv1D `[in, out]`;
//! loading transposes them to `[out, in]` so every family shares one convention, and saving
//! transposes them back. Names drop the optional `transformer.` prefix.

use super::config::{Arch, Config};
use super::hooks::{HookPoint, Trace};
use super::layers::{attend, hook, layer_norm, linear, BlockCtx, KvCache, Step};
use super::Weights;
use crate::error::Result;
use candle_core::{Device, Tensor};

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
        let p = Arch::Gpt2.layer_prefix(l);
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

/// GPT-2 needs no per-pass tables (positions are embedded up front).
pub fn prepare(
    _cfg: &Config,
    _pos: &[Vec<u32>],
    _device: &Device,
) -> Result<Option<(Tensor, Tensor)>> {
    Ok(None)
}

/// Token plus learned position embeddings.
///
/// # Shapes
/// `ids`, `pos`: `[batch, seq]` -> `[batch, seq, d_model]`.
pub fn embed(cfg: &Config, w: &Weights, ids: &Tensor, pos: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let d = cfg.d_model;
    let max = pos.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
    if max >= cfg.max_positions {
        return Err(crate::Error::PositionOutOfRange {
            position: max,
            seq_len: cfg.max_positions,
        });
    }
    let tok = w
        .mat("wte.weight")?
        .rows(&ids.flatten_all()?)?
        .reshape((b, t, d))?;
    let pe = w
        .mat("wpe.weight")?
        .rows(&pos.flatten_all()?)?
        .reshape((b, t, d))?;
    Ok((tok + pe)?)
}

/// One block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`, with its hook points.
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
    let (nh, hd, d) = (cfg.n_heads, cfg.head_dim, cfg.d_model);
    let p = Arch::Gpt2.layer_prefix(l);
    let g = |n: &str| w.get(&format!("{p}.{n}"));
    let mat = |n: &str| w.mat(&format!("{p}.{n}"));
    let x = hook!(trace, stop, HookPoint::ResidPre(l), x);

    // Attention.
    let h = layer_norm(&x, g("ln_1.weight")?, g("ln_1.bias")?, cfg.norm_eps, diff)?;
    let qkv = linear(&h, mat("attn.c_attn.weight")?, Some(g("attn.c_attn.bias")?))?; // (b, t, 3d)
    let split = |i: usize| -> Result<Tensor> {
        Ok(qkv
            .narrow(2, i * d, d)?
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?) // (b, nh, t, hd)
    };
    let (q, k, v) = (split(0)?, split(1)?, split(2)?.contiguous()?);
    let (k, v) = KvCache::extend(cache, l, k, v)?; // (b, nh, past + t, hd)
    let (q, x, bias) = ctx.trim(q, x)?; // t -> 1 when only the last position is wanted
    let y = attend(&q, &k, &v, bias.as_ref(), diff)?; // (b, t, d)
    let a = linear(&y, mat("attn.c_proj.weight")?, Some(g("attn.c_proj.bias")?))?;
    let a = hook!(trace, stop, HookPoint::AttnOut(l), a);
    let x = (x + a)?;

    // MLP.
    let h = layer_norm(&x, g("ln_2.weight")?, g("ln_2.bias")?, cfg.norm_eps, diff)?;
    let h = hook!(trace, stop, HookPoint::MlpIn(l), h);
    let key = linear(&h, mat("mlp.c_fc.weight")?, Some(g("mlp.c_fc.bias")?))?.gelu()?;
    let key = hook!(trace, stop, HookPoint::MlpKey(l), key); // (b, t, d_mlp)
    let m = linear(&key, mat("mlp.c_proj.weight")?, Some(g("mlp.c_proj.bias")?))?;
    let m = hook!(trace, stop, HookPoint::MlpOut(l), m);
    let x = (x + m)?;
    Ok(Step::Continue(hook!(
        trace,
        stop,
        HookPoint::ResidPost(l),
        x
    )))
}

/// Final LayerNorm and the tied output head.
///
/// # Shapes
/// `x`: `[batch, seq, d_model]` -> `[batch, seq, vocab]`.
pub fn head(cfg: &Config, w: &Weights, x: &Tensor, diff: bool) -> Result<Tensor> {
    let x = layer_norm(
        x,
        w.get("ln_f.weight")?,
        w.get("ln_f.bias")?,
        cfg.norm_eps,
        diff,
    )?;
    linear(&x, w.mat("wte.weight")?, None)
}
