//! Building blocks shared by the model families: linear maps, norms, attention, KV cache.
//!
//! Each op that has a fused candle kernel without a backward pass (softmax, RMSNorm,
//! LayerNorm) takes a `differentiable` flag and then uses a form with a backward pass, so
//! gradients can flow (ROME's v* search, fine-tuning, unlearning): our fused ops in
//! `fused/` (RMSNorm, softmax), candle's composed form for LayerNorm. A test checks both
//! give the same logits.

use super::param::Mat;
use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// `x @ w^T + b`, for a dense or a stored `w` (see [`super::param`]).
///
/// # Shapes
/// `x`: `[batch, seq, in]`, `w`: `[out, in]`, `b`: `[out]`; returns `[batch, seq, out]`.
pub fn linear<'a>(x: &Tensor, w: impl Into<Mat<'a>>, b: Option<&Tensor>) -> Result<Tensor> {
    let w = w.into();
    let (bs, t, d) = x.dims3()?;
    let out = w.out_dim()?;
    let x2 = x.reshape((bs * t, d))?;
    let y = match w {
        Mat::Stored(s) if x2.track_op() => x2
            .contiguous()?
            .apply_op1(super::param::StoredLinear(s.clone()))?,
        Mat::Stored(s) => s.x_wt(&x2)?,
        Mat::Dense(w) => {
            // When gradients flow through x but w is a constant, candle's matmul backward
            // would still compute (and allocate) a weight-sized gradient for w; the custom op
            // below returns only the input's gradient. Same forward numbers; about a third
            // less backward work.
            let w_const = !w.is_variable() && !w.track_op();
            if x2.track_op() && w_const && x2.device().is_cpu() {
                x2.contiguous()?.apply_op1(NoWeightGrad { w: w.clone() })?
            } else if !x2.track_op() && w_const {
                super::matmul::x_wt_any(&x2, w)?
            } else {
                x2.matmul(&w.t()?)?
            }
        }
    };
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    Ok(y.reshape((bs, t, out))?)
}

/// RMSNorm (Zhang & Sennrich 2019): `x / sqrt(mean(x²) + eps) * w`.
///
/// # Shapes
/// `x`: `[batch, seq, d]`, `w`: `[d]`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, differentiable: bool) -> Result<Tensor> {
    Ok(if differentiable {
        super::fused::rms_norm(x, w, eps)?
    } else {
        candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?
    })
}

/// LayerNorm (Ba et al. 2016) with weight and bias.
///
/// # Shapes
/// `x`: `[batch, seq, d]`, `w`, `b`: `[d]`.
pub fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    differentiable: bool,
) -> Result<Tensor> {
    Ok(if differentiable {
        candle_nn::ops::layer_norm_slow(x, w, b, eps as f32)?
    } else {
        candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32)?
    })
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor, differentiable: bool) -> Result<Tensor> {
    Ok(if differentiable {
        super::fused::softmax(x)?
    } else {
        candle_nn::ops::softmax_last_dim(x)?
    })
}

/// Keys and values of earlier positions, one entry per layer, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer: keys and values `[batch, n_kv_heads, past, head_dim]`.
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![None; n_layers],
        }
    }

    /// Number of positions cached at the first layer.
    pub fn len(&self) -> usize {
        self.len_at(0)
    }

    /// Number of positions cached at layer `l`.
    pub fn len_at(&self, l: usize) -> usize {
        self.layers
            .get(l)
            .and_then(|l| l.as_ref())
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache with every row repeated `k` times (batch-major: copy 0 of all rows, then
    /// copy 1, ...), so one prefix can serve many continuations.
    pub fn repeat(&self, k: usize) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|e| match e {
                Some((kt, vt)) => Ok(Some((
                    Tensor::cat(&vec![kt; k], 0)?,
                    Tensor::cat(&vec![vt; k], 0)?,
                ))),
                None => Ok(None),
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { layers })
    }

    /// Keep only the rows (batch entries) in `idx` (a u32 tensor), in its order.
    pub fn select_rows(&self, idx: &Tensor) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|e| match e {
                Some((k, v)) => Ok(Some((
                    k.contiguous()?.index_select(idx, 0)?,
                    v.contiguous()?.index_select(idx, 0)?,
                ))),
                None => Ok(None),
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { layers })
    }

    /// Keep only the first `n` positions of every layer.
    pub fn truncate(&self, n: usize) -> Result<KvCache> {
        if n == 0 {
            return Ok(KvCache::new(self.layers.len()));
        }
        let layers = self
            .layers
            .iter()
            .map(|e| match e {
                Some((k, v)) => Ok(Some((k.narrow(2, 0, n)?, v.narrow(2, 0, n)?))),
                None => Ok(None),
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { layers })
    }

    /// Put `n` zero positions before the cached ones in every layer (left padding: the
    /// caller's key mask must mark them as padding).
    pub fn pad_left(&self, n: usize) -> Result<KvCache> {
        if n == 0 {
            return Ok(self.clone());
        }
        let pad = |t: &Tensor| -> Result<Tensor> {
            let (b, h, _, d) = t.dims4()?;
            let z = Tensor::zeros((b, h, n, d), t.dtype(), t.device())?;
            Ok(Tensor::cat(&[&z, t], 2)?)
        };
        let layers = self
            .layers
            .iter()
            .map(|e| match e {
                Some((k, v)) => Ok(Some((pad(k)?, pad(v)?))),
                None => Ok(None),
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { layers })
    }

    /// The rows of several caches of equal length, one after another.
    pub fn cat_rows(parts: &[KvCache]) -> Result<KvCache> {
        let n = parts.first().map(|c| c.layers.len()).unwrap_or(0);
        let layers = (0..n)
            .map(|l| {
                let ks: Option<Vec<&Tensor>> = parts
                    .iter()
                    .map(|c| c.layers[l].as_ref().map(|(k, _)| k))
                    .collect();
                let vs: Option<Vec<&Tensor>> = parts
                    .iter()
                    .map(|c| c.layers[l].as_ref().map(|(_, v)| v))
                    .collect();
                match (ks, vs) {
                    (Some(ks), Some(vs)) => Ok(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?))),
                    _ => Ok(None),
                }
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { layers })
    }

    /// Append this step's keys and values to layer `l` of the cache (if any) and return the
    /// keys and values of all positions so far.
    ///
    /// # Shapes
    /// `k`, `v`: `[batch, kv_heads, seq, head_dim]` -> `[batch, kv_heads, past + seq, head_dim]`.
    pub fn extend(
        cache: Option<&mut KvCache>,
        l: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let Some(c) = cache else {
            return Ok((k, v));
        };
        let (k, v) = match c.layers[l].take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        c.layers[l] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// Additive attention bias `[batch, 1, seq, past + seq]`: 0 where query i (at absolute index
/// past + i) may see key j, -inf elsewhere. A key is visible when it is not in the future and
/// is not padding. A query always sees itself, so padded rows never become all -inf.
///
/// # Shapes
/// `key_mask`: `[batch, past + seq]` of 0/1 (1 = real token), or `None` for no padding.
pub fn attention_bias(
    batch: usize,
    seq: usize,
    past: usize,
    key_mask: Option<&[Vec<u8>]>,
    device: &Device,
) -> Result<Option<Tensor>> {
    if seq == 1 && key_mask.is_none() {
        return Ok(None);
    }
    let total = past + seq;
    let rows = if key_mask.is_some() { batch } else { 1 };
    let mut v = vec![0f32; rows * seq * total];
    for r in 0..rows {
        for i in 0..seq {
            let qi = past + i;
            for j in 0..total {
                let visible =
                    j <= qi && (j == qi || key_mask.map(|m| m[r][j] != 0).unwrap_or(true));
                if !visible {
                    v[(r * seq + i) * total + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(v, (rows, 1, seq, total), device)?))
}

/// Repeat key/value heads for grouped-query attention.
///
/// # Shapes
/// `x`: `[batch, n_kv_heads, seq, head_dim]` -> `[batch, n_kv_heads * n_rep, seq, head_dim]`.
pub fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, h, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, h, n_rep, t, d))?
        .reshape((b, h * n_rep, t, d))?)
}

/// Scaled dot-product attention with an additive bias, over grouped key/value heads: query
/// head h reads key/value head h / (n_heads / n_kv_heads). On the CPU in f32 this is one fused
/// op with its backward pass (`fused::attention`); elsewhere the heads are repeated and the
/// attention composed from candle's ops.
///
/// # Shapes
/// `q`: `[batch, n_heads, seq, head_dim]`, `k`, `v`: `[batch, n_kv_heads, total, head_dim]`,
/// `bias`: `[batch or 1, 1, seq, total]`; returns `[batch, seq, n_heads * head_dim]`.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    differentiable: bool,
) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let scale = 1.0 / (hd as f64).sqrt();
    if let Some(y) = super::fused::attention(q, k, v, bias, scale)? {
        return Ok(y.reshape((b, t, h * hd))?); // (b, t, h, hd), contiguous
    }
    let n_rep = h / k.dim(1)?;
    let (k, v) = (repeat_kv(k.clone(), n_rep)?, repeat_kv(v.clone(), n_rep)?);
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?; // (b, h, t, total)
    let scores = match bias {
        Some(bias) => scores.broadcast_add(bias)?,
        None => scores,
    };
    let p = softmax(&scores, differentiable)?;
    let y = p.matmul(&v.contiguous()?)?; // (b, h, t, hd)
    Ok(y.transpose(1, 2)?.reshape((b, t, h * hd))?)
}

/// Position ids from a key mask: the count of real tokens before each position (padding
/// positions get the id of the last real token before them, or 0).
///
/// # Shapes
/// Returns `[batch][seq]` for the last `seq` positions of a mask of length `past + seq`.
pub fn position_ids(
    batch: usize,
    seq: usize,
    past: usize,
    key_mask: Option<&[Vec<u8>]>,
) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|r| match key_mask {
            None => (past..past + seq).map(|p| p as u32).collect(),
            Some(m) => {
                let mut count = 0u32;
                let mut out = Vec::with_capacity(seq);
                for (j, &real) in m[r].iter().enumerate() {
                    let id = if real != 0 {
                        count += 1;
                        count - 1
                    } else {
                        count.saturating_sub(1)
                    };
                    if j >= past {
                        out.push(id);
                    }
                }
                out
            }
        })
        .collect()
}

/// A `[batch, seq]` u32 tensor from rows of ids.
pub fn ids_tensor(rows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let b = rows.len();
    let t = rows.first().map(|r| r.len()).unwrap_or(0);
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (b, t), device)?.to_dtype(DType::U32)?)
}

/// Run the trace's interventions at a hook point inside a block; if the trace stops after
/// that point, return from the block with [`Step::Stop`]. One call per site:
/// `let x = hook!(trace, stop, HookPoint::ResidPre(l), x);`
macro_rules! hook {
    ($trace:expr, $stop:expr, $point:expr, $x:expr) => {{
        let y = $trace.hook($point, $x)?;
        if $stop == Some($point) {
            return Ok($crate::model::layers::Step::Stop(y));
        }
        y
    }};
}
pub(crate) use hook;

/// What every block of one pass shares.
#[derive(Debug, Clone)]
pub struct BlockCtx {
    /// Additive attention bias `[batch or 1, 1, seq, past + seq]`, or none (no mask needed).
    pub bias: Option<Tensor>,
    /// Rotary cos/sin `[batch, 1, seq, head_dim]` (Llama family).
    pub rope: Option<(Tensor, Tensor)>,
    /// Compute the block's output at the last position only: keys and values of every
    /// position still enter the attention (and the cache). Set by the model for the last
    /// block when only the last position's logits are wanted and nothing hooks that block.
    pub last_only: bool,
}

impl BlockCtx {
    /// With `last_only`, the queries, residual and bias of the last position only.
    ///
    /// # Shapes
    /// `q`: `[batch, heads, seq, head_dim]`, `x`: `[batch, seq, d_model]`; the seq axis
    /// becomes 1.
    pub fn trim(&self, q: Tensor, x: Tensor) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let t = x.dim(1)?;
        if !self.last_only || t == 1 {
            return Ok((q, x, self.bias.clone()));
        }
        let bias = match &self.bias {
            Some(b) => Some(b.narrow(2, t - 1, 1)?),
            None => None,
        };
        Ok((q.narrow(2, t - 1, 1)?, x.narrow(1, t - 1, 1)?, bias))
    }
}

/// The result of one block: go on with this residual, or stop (the trace's stop point).
#[derive(Debug)]
pub enum Step {
    Continue(Tensor),
    Stop(Tensor),
}

/// A custom op's result handed back as CPU storage (contiguous, from offset 0).
pub(crate) fn cpu_output(
    y: Tensor,
    op: &str,
) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    let y = y.contiguous()?;
    let shape = y.shape().clone();
    let (storage, layout) = y.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(c) if layout.start_offset() == 0 => Ok((c.clone(), shape)),
        _ => Err(candle_core::Error::Msg(format!("{op}: unexpected storage"))),
    }
}

/// `x @ w^T` whose backward returns only `grad @ w` (w is a constant).
struct NoWeightGrad {
    w: Tensor,
}

impl candle_core::CustomOp1 for NoWeightGrad {
    fn name(&self) -> &'static str {
        "linear-no-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (start, end) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("linear-no-weight-grad: input must be contiguous".into())
        })?;
        let data = &s.as_slice::<f32>()?[start..end];
        if let Some(y) = super::matmul::x_wt_slice(data, &self.w)? {
            let mut dims = l.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = self.w.dim(0)?;
            }
            return Ok((candle_core::CpuStorage::F32(y), dims.into()));
        }
        let x = Tensor::from_slice(data, l.shape(), &Device::Cpu)?;
        cpu_output(x.matmul(&self.w.t()?)?, "linear-no-weight-grad")
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(super::matmul::g_w_any(&grad.contiguous()?, &self.w)?))
    }
}
