//! Fused, differentiable element-wise blocks: RMSNorm, softmax, rotary embedding and the
//! SwiGLU product, each one candle custom op with its own backward pass.
//!
//! Why: composed from candle's primitives, an RMSNorm is six ops and a rotary embedding
//! seven, each a pass over memory, and in a differentiable pass (the v* search, unlearning)
//! the autograd graph keeps every intermediate alive until the backward pass. A fused op makes
//! one pass and keeps only its inputs and output. The numbers are those of the composed forms
//! (same formulas, same f32 rounding order where the order matters); tests below compare the
//! values and gradients.
//!
//! The kernels cover contiguous f32 tensors on the CPU; anything else takes the composed path
//! (see the `*_any` functions), so every device and dtype still works.

use super::param::{Mat, Param};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// Whether the fused kernels apply: f32 on the CPU.
fn fusable(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

/// The f32 contents of a contiguous CPU tensor, copied out.
fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

// The element-wise ops below split their work over rayon's threads (the matrix products
// already do): single-threaded, they left the second core idle for about 5% of a causal
// trace and of a value-search step (perf). Each element is computed as before.

/// Elements per parallel task of the element-wise ops.
const ELEMENT_BLOCK: usize = 1 << 14;

/// Rows of `d` elements per parallel task (at least one).
fn rows_per_block(d: usize) -> usize {
    (ELEMENT_BLOCK / d.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x * r * w, r = 1 / sqrt(mean(x^2) + eps), over the last dimension.

/// r = 1 / sqrt(mean(x^2) + eps) of one row.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "engram-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(xs, xl, self.name())?;
        let w = f32s(ws, wl, self.name())?;
        let d = w.len();
        let mut y = vec![0f32; x.len()];
        let block = d * rows_per_block(d);
        y.par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .for_each(|(yb, xb)| {
                for (xr, yr) in xb.chunks_exact(d).zip(yb.chunks_exact_mut(d)) {
                    let r = inv_rms(xr, self.eps);
                    for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                        *o = v * r * g;
                    }
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gx = x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &g.contiguous()?,
            &RmsNormBwd { eps: self.eps },
        )?;
        // The weight's gradient only when something wants it (fine-tuning of norms).
        let gw = if w.track_op() {
            let d = w.dim(0)?;
            let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?
                .sqrt()?
                .recip()?;
            let xn = x.broadcast_mul(&r)?;
            Some((g * xn)?.reshape(((), d))?.sum(0)?)
        } else {
            None
        };
        Ok((Some(gx), gw))
    }
}

/// dx = r (g w) - x r^3 mean((g w) x).
struct RmsNormBwd {
    eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "engram-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(xs, xl, self.name())?;
        let w = f32s(ws, wl, self.name())?;
        let g = f32s(gs, gl, self.name())?;
        let d = w.len();
        let mut dx = vec![0f32; x.len()];
        let block = d * rows_per_block(d);
        dx.par_chunks_mut(block)
            .zip(x.par_chunks(block).zip(g.par_chunks(block)))
            .for_each(|(db, (xb, gb))| {
                for ((xr, gr), dr) in xb
                    .chunks_exact(d)
                    .zip(gb.chunks_exact(d))
                    .zip(db.chunks_exact_mut(d))
                {
                    let r = inv_rms(xr, self.eps);
                    let dot = xr
                        .iter()
                        .zip(gr)
                        .zip(w)
                        .map(|((a, b), c)| a * b * c)
                        .sum::<f32>()
                        / d as f32;
                    let c = r * r * r * dot;
                    for (((o, &xv), &gv), &wv) in dr.iter_mut().zip(xr).zip(gr).zip(w) {
                        *o = r * gv * wv - xv * c;
                    }
                }
            });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// RMSNorm over the last dimension, differentiable in `x` (and in `w` when it is trained).
///
/// # Shapes
/// `x`: `[.., d]`, `w`: `[d]`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !fusable(&[x, w]) {
        return candle_nn::ops::rms_norm_slow(x, w, eps as f32);
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension.

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "engram-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let m = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = (v - m).exp();
                sum += *o;
            }
            for o in yr.iter_mut() {
                *o /= sum;
            }
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            y.contiguous()?
                .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd)?,
        ))
    }
}

/// dx = y (g - sum(g y)).
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "engram-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32s(ys, yl, self.name())?;
        let g = f32s(gs, gl, self.name())?;
        let d = yl.dims().last().copied().unwrap_or(1).max(1);
        let mut dx = vec![0f32; y.len()];
        for ((yr, gr), dr) in y
            .chunks_exact(d)
            .zip(g.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            let dot = yr.iter().zip(gr).map(|(a, b)| a * b).sum::<f32>();
            for ((o, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
                *o = yv * (gv - dot);
            }
        }
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}

/// Softmax over the last dimension, differentiable.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    if !fusable(&[x]) {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding, rotate-half layout: y = x cos + R(x) sin, R([x1, x2]) = [-x2, x1].

struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Rows of the tables (the batch, or 1 for one table shared by every row).
    rows: usize,
    /// The backward map: dx = g cos + R^T(g sin), with R^T([z1, z2]) = [z2, -z1].
    transpose: bool,
}

impl Rope {
    fn run(&self, x: &[f32], dims: &[usize]) -> Result<Vec<f32>> {
        let (b, h, t, hd) = match dims {
            [b, h, t, hd] => (*b, *h, *t, *hd),
            _ => candle_core::bail!("rope: expected [batch, heads, seq, head_dim], got {dims:?}"),
        };
        if self.cos.len() != self.rows * t * hd || (self.rows != 1 && self.rows != b) {
            candle_core::bail!("rope: tables do not match {dims:?}");
        }
        let half = hd / 2;
        let mut y = vec![0f32; x.len()];
        // One task per batch row: `[h, t, hd]` of y.
        y.par_chunks_mut(h * t * hd)
            .enumerate()
            .for_each(|(bi, yb)| {
                let tb = if self.rows == 1 { 0 } else { bi };
                for hi in 0..h {
                    for ti in 0..t {
                        let o = (hi * t + ti) * hd;
                        let c = &self.cos[(tb * t + ti) * hd..][..hd];
                        let s = &self.sin[(tb * t + ti) * hd..][..hd];
                        let xr = &x[bi * h * t * hd + o..][..hd];
                        let yr = &mut yb[o..o + hd];
                        for j in 0..hd {
                            let rot = if self.transpose {
                                // R^T(x s)
                                if j < half {
                                    xr[j + half] * s[j + half]
                                } else {
                                    -(xr[j - half] * s[j - half])
                                }
                            } else if j < half {
                                -xr[j + half] * s[j]
                            } else {
                                xr[j - half] * s[j]
                            };
                            yr[j] = xr[j] * c[j] + rot;
                        }
                    }
                }
            });
        Ok(y)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "engram-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        Ok((CpuStorage::F32(self.run(x, l.dims())?), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let back = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            rows: self.rows,
            transpose: !self.transpose,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// The composed rotary embedding (any device and dtype).
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

/// `x * cos + rotate_half(x) * sin`, differentiable in `x` (the tables are constants).
///
/// # Shapes
/// `x`: `[batch, heads, seq, head_dim]`, `cos`, `sin`: `[batch or 1, 1, seq, head_dim]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !fusable(&[x, cos, sin]) || x.rank() != 4 || cos.rank() != 4 {
        return rope_composed(x, cos, sin);
    }
    let op = Rope {
        cos: to_vec(cos)?,
        sin: to_vec(sin)?,
        rows: cos.dim(0)?,
        transpose: false,
    };
    x.contiguous()?.apply_op1(op)
}

// ---------------------------------------------------------------------------------------------
// SwiGLU product: y = silu(gate) * up.

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "engram-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32s(gs, gl, self.name())?;
        let u = f32s(us, ul, self.name())?;
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(ELEMENT_BLOCK)
            .zip(g.par_chunks(ELEMENT_BLOCK).zip(u.par_chunks(ELEMENT_BLOCK)))
            .for_each(|(yb, (gb, ub))| {
                for ((o, &a), &b) in yb.iter_mut().zip(gb).zip(ub) {
                    *o = (a / (1.0 + (-a).exp())) * b;
                }
            });
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.contiguous()?.apply_op3_no_bwd(
            &up.contiguous()?,
            &grad.contiguous()?,
            &SwiGluBwd,
        )?; // [2, ..]: d gate, d up
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// d gate = G up s (1 + a (1 - s)), d up = G silu(a), with s = sigmoid(a); stacked [2, ..].
struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "engram-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = f32s(gs, gl, self.name())?;
        let u = f32s(us, ul, self.name())?;
        let g = f32s(ds, dl, self.name())?;
        let n = a.len();
        let mut out = vec![0f32; 2 * n];
        let (d_gate, d_up) = out.split_at_mut(n);
        let e = ELEMENT_BLOCK;
        d_gate
            .par_chunks_mut(e)
            .zip(d_up.par_chunks_mut(e))
            .enumerate()
            .for_each(|(c, (dg, du))| {
                let o = c * e;
                for i in 0..dg.len() {
                    let (a, u, g) = (a[o + i], u[o + i], g[o + i]);
                    let s = sigmoid(a);
                    dg[i] = g * u * s * (1.0 + a * (1.0 - s));
                    du[i] = g * a * s;
                }
            });
        let mut dims = vec![2];
        dims.extend_from_slice(gl.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `silu(gate) * up`, differentiable in both.
///
/// # Shapes
/// `gate`, `up`: the same shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !fusable(&[gate, up]) || gate.shape() != up.shape() {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

// ---------------------------------------------------------------------------------------------
// The whole SwiGLU MLP as one autograd node: y = (silu(h Wg^T) * (h Wu^T)) Wd^T.
//
// Composed, a differentiable MLP is four nodes (three linear maps and the SwiGLU product), and
// candle's backward pass gives each node's input a fresh zero gradient and adds into it: about
// nine passes over `[positions, d_mlp]` tensors per layer per step of the value search that
// compute nothing. As one node, the backward pass is two element-wise products (fused) and
// three matrix products, and only h's gradient is accumulated.

struct Mlp {
    /// The forward pass's output, `[positions, d_model]`, computed outside the graph.
    y: Tensor,
    /// Kept for the backward pass, `[positions, d_mlp]`.
    gate: Tensor,
    up: Tensor,
    /// Dense or stored (`super::param`): frozen either way.
    wg: Param,
    wu: Param,
    wd: Param,
}

fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

impl CustomOp1 for Mlp {
    fn name(&self) -> &'static str {
        "engram-mlp"
    }

    /// The output was computed when the node was built; this hands it to the graph.
    fn cpu_fwd(&self, _s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(to_vec(&self.y)?), l.shape().clone()))
    }

    /// dkey = g Wd; (dgate, dup) = SwiGLU's backward; dh = dgate Wg + dup Wu.
    fn bwd(&self, h: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let n = self.gate.dim(0)?;
        let g = g.contiguous()?.reshape((n, self.wd.dims()[0]))?;
        let dkey = self.wd.g_w(&g).map_err(wrap)?; // (n, d_mlp)
        let both = self.gate.apply_op3_no_bwd(&self.up, &dkey, &SwiGluBwd)?; // [2, n, d_mlp]
        let dh = (self.wg.g_w(&both.get(0)?).map_err(wrap)?
            + self.wu.g_w(&both.get(1)?).map_err(wrap)?)?;
        Ok(Some(dh.reshape(h.shape())?))
    }
}

/// The SwiGLU MLP `down(silu(gate(h)) * up(h))` as one differentiable node in `h`; `None`
/// where it does not apply (nothing to differentiate, weights that are trained, or not f32 on
/// the CPU), and the caller composes it instead. Same numbers as the composed form. The
/// matrices may be stored ones (`super::param`): the products then go through their blocks.
///
/// # Shapes
/// `h`: `[batch, seq, d_model]`; `wg`, `wu`: `[d_mlp, d_model]`; `wd`: `[d_model, d_mlp]`.
pub fn mlp(h: &Tensor, wg: Mat<'_>, wu: Mat<'_>, wd: Mat<'_>) -> Result<Option<Tensor>> {
    let dense: Vec<&Tensor> = [wg, wu, wd].iter().filter_map(|w| w.as_dense()).collect();
    let trained = dense.iter().any(|w| w.is_variable() || w.track_op());
    if !h.track_op() || trained || !fusable(&[&[h][..], &dense[..]].concat()) {
        return Ok(None);
    }
    let (wg, wu, wd) = (wg.to_param(), wu.to_param(), wd.to_param());
    let (b, t, d) = h.dims3()?;
    let x = h.detach().contiguous()?.reshape((b * t, d))?;
    let gate = wg.x_wt(&x).map_err(wrap)?;
    let up = wu.x_wt(&x).map_err(wrap)?;
    let y = wd.x_wt(&swiglu(&gate, &up)?).map_err(wrap)?;
    let node = Mlp {
        y: y.reshape((b, t, wd.dims()[0]))?,
        gate,
        up,
        wg,
        wu,
        wd,
    };
    Ok(Some(h.contiguous()?.apply_op1(node)?))
}

// ---------------------------------------------------------------------------------------------
// Attention over grouped key/value heads: y = softmax(q k^T * scale + bias) v.
//
// Composed from candle's primitives this is a copy of every key and value head per query head
// (grouped-query attention), a transposed copy of the keys, one small matmul per (row, head)
// for the scores and another for the weighted sum, and a softmax pass; with the short
// sequences of causal tracing and the v* search, those copies and calls cost more than the
// arithmetic. The fused op reads each key/value head in place and keeps one row of scores.

/// `a . b` in eight independent partial sums, which the compiler turns into vector
/// instructions (a single running sum is a chain of dependent additions it may not reorder).
/// For f32 here and f64 in `edit::linalg`.
pub(crate) fn dot<T>(a: &[T], b: &[T]) -> T
where
    T: Copy + Default + std::ops::Add<Output = T> + std::ops::Mul<Output = T> + std::iter::Sum,
{
    let mut acc = [T::default(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = acc[l] + x[l] * y[l];
        }
    }
    acc.into_iter().sum::<T>() + tail
}

/// y += a x.
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// Shapes of one attention call.
#[derive(Clone, Copy)]
struct AttnDims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    /// Keys (past + t).
    tk: usize,
    hd: usize,
}

/// The attention's constants: the scale and the additive bias `[1 or b, t, tk]`.
struct AttnConst {
    scale: f32,
    bias: Option<Vec<f32>>,
    bias_rows: usize,
}

impl AttnConst {
    /// Row `bi`'s `[t, tk]` bias.
    fn bias_of(&self, bi: usize, d: AttnDims) -> Option<&[f32]> {
        let n = d.t * d.tk;
        let r = if self.bias_rows == 1 { 0 } else { bi };
        self.bias.as_ref().map(|b| &b[r * n..(r + 1) * n])
    }

    /// p[i][j] = softmax_j(q_i . k_j * scale + bias[i][j]) for one (row, head).
    ///
    /// `q`: `[t, hd]` with query i at `q[i * q_stride..]`, `k`: `[tk, hd]`, `p`: `[t, tk]`.
    fn probs(
        &self,
        q: &[f32],
        q_stride: usize,
        k: &[f32],
        bias: Option<&[f32]>,
        d: AttnDims,
        p: &mut [f32],
    ) {
        let (hd, tk) = (d.hd, d.tk);
        for i in 0..d.t {
            let qi = &q[i * q_stride..i * q_stride + hd];
            let row = &mut p[i * tk..(i + 1) * tk];
            let mut m = f32::NEG_INFINITY;
            for (j, o) in row.iter_mut().enumerate() {
                let mut s = dot(qi, &k[j * hd..(j + 1) * hd]) * self.scale;
                if let Some(b) = bias {
                    s += b[i * tk + j];
                }
                *o = s;
                m = m.max(s);
            }
            if m == f32::NEG_INFINITY {
                row.fill(0.0); // every key masked: no attention (never built by our masks)
                continue;
            }
            let mut sum = 0f32;
            for o in row.iter_mut() {
                *o = (*o - m).exp();
                sum += *o;
            }
            for o in row.iter_mut() {
                *o /= sum;
            }
        }
    }
}

fn attn_dims(q: &Layout, k: &Layout) -> Result<AttnDims> {
    let (b, nh, t, hd) = q.shape().dims4()?;
    let (_, nkv, tk, _) = k.shape().dims4()?;
    Ok(AttnDims {
        b,
        nh,
        nkv,
        t,
        tk,
        hd,
    })
}

/// One attention call's inputs as f32 slices, with its shapes.
struct AttnInputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    d: AttnDims,
}

impl<'a> AttnInputs<'a> {
    fn new(
        name: &str,
        (qs, ql): (&'a CpuStorage, &Layout),
        (ks, kl): (&'a CpuStorage, &Layout),
        (vs, vl): (&'a CpuStorage, &Layout),
    ) -> Result<Self> {
        Ok(AttnInputs {
            q: f32s(qs, ql, name)?,
            k: f32s(ks, kl, name)?,
            v: f32s(vs, vl, name)?,
            d: attn_dims(ql, kl)?,
        })
    }

    /// Row `bi`, query head `h`: fills `p` with its pattern `[t, tk]` and returns the offset
    /// of its key/value head within the row's `[nkv, tk, hd]` block, and its q `[t, hd]`,
    /// k and v `[tk, hd]`.
    fn head(
        &self,
        c: &AttnConst,
        bi: usize,
        h: usize,
        p: &mut [f32],
    ) -> (usize, &'a [f32], &'a [f32], &'a [f32]) {
        let d = self.d;
        let (qn, kn) = (d.t * d.hd, d.tk * d.hd);
        let g0 = (h / (d.nh / d.nkv)) * kn;
        let g = bi * d.nkv * kn + g0;
        let qo = (bi * d.nh + h) * qn;
        let (q, k, v) = (&self.q[qo..qo + qn], &self.k[g..g + kn], &self.v[g..g + kn]);
        c.probs(q, d.hd, k, c.bias_of(bi, d), d, p);
        (g0, q, k, v)
    }
}

struct Attention(std::sync::Arc<AttnConst>);

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "engram-attention"
    }

    /// q `[b, nh, t, hd]`, k, v `[b, nkv, tk, hd]` -> y `[b, t, nh, hd]`.
    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = AttnInputs::new(self.name(), (qs, ql), (ks, kl), (vs, vl))?;
        let (d, c) = (x.d, &self.0);
        let mut y = vec![0f32; d.b * d.t * d.nh * d.hd];
        y.par_chunks_mut(d.t * d.nh * d.hd)
            .enumerate()
            .for_each(|(bi, yb)| {
                let mut p = vec![0f32; d.t * d.tk];
                for h in 0..d.nh {
                    let (_, _, _, vg) = x.head(c, bi, h, &mut p);
                    for i in 0..d.t {
                        let yo = &mut yb[(i * d.nh + h) * d.hd..(i * d.nh + h + 1) * d.hd];
                        for (j, &pij) in p[i * d.tk..(i + 1) * d.tk].iter().enumerate() {
                            if pij != 0.0 {
                                axpy(yo, pij, &vg[j * d.hd..(j + 1) * d.hd]);
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.t, d.nh, d.hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = to_vec(&g.contiguous()?)?;
        let flat = q.apply_op3_no_bwd(
            k,
            v,
            &AttentionBwd {
                c: self.0.clone(),
                dy,
            },
        )?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = flat.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = flat.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = flat.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The attention's gradients, flattened as [dq | dk | dv]. With P the pattern and dy the
/// output's gradient (per row and head): dv += P^T dy; dP = dy v^T;
/// dS = P (dP - rowsum(P dP)); dq = dS k * scale; dk += dS^T q * scale.
struct AttentionBwd {
    c: std::sync::Arc<AttnConst>,
    /// `[b, t, nh, hd]`.
    dy: Vec<f32>,
}

impl CustomOp3 for AttentionBwd {
    fn name(&self) -> &'static str {
        "engram-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = AttnInputs::new(self.name(), (qs, ql), (ks, kl), (vs, vl))?;
        let (d, c, dy) = (x.d, &self.c, &self.dy);
        let (nq, nk) = (x.q.len(), x.k.len());
        let mut out = vec![0f32; nq + 2 * nk];
        let (dq, dkv) = out.split_at_mut(nq);
        let (dk, dv) = dkv.split_at_mut(nk);
        let kv_row = d.nkv * d.tk * d.hd;
        dq.par_chunks_mut(d.nh * d.t * d.hd)
            .zip(dk.par_chunks_mut(kv_row))
            .zip(dv.par_chunks_mut(kv_row))
            .enumerate()
            .for_each(|(bi, ((dqb, dkb), dvb))| {
                let mut p = vec![0f32; d.t * d.tk];
                let mut ds = vec![0f32; d.tk];
                for h in 0..d.nh {
                    // The pattern is recomputed here rather than kept from the forward pass.
                    let (g0, qh, kg, vg) = x.head(c, bi, h, &mut p);
                    for i in 0..d.t {
                        let o = ((bi * d.t + i) * d.nh + h) * d.hd;
                        let dyi = &dy[o..o + d.hd];
                        let pi = &p[i * d.tk..(i + 1) * d.tk];
                        // dP_ij = dy_i . v_j; D_i = sum_j P_ij dP_ij.
                        let mut dsum = 0f32;
                        for (j, dsj) in ds.iter_mut().enumerate() {
                            *dsj = dot(dyi, &vg[j * d.hd..(j + 1) * d.hd]);
                            dsum += pi[j] * *dsj;
                        }
                        let qi = &qh[i * d.hd..(i + 1) * d.hd];
                        let dqi = &mut dqb[(h * d.t + i) * d.hd..(h * d.t + i + 1) * d.hd];
                        for (j, &pij) in pi.iter().enumerate() {
                            if pij == 0.0 {
                                continue;
                            }
                            let s = pij * (ds[j] - dsum) * c.scale;
                            let kj = g0 + j * d.hd;
                            axpy(&mut dvb[kj..kj + d.hd], pij, dyi);
                            axpy(dqi, s, &kg[j * d.hd..(j + 1) * d.hd]);
                            axpy(&mut dkb[kj..kj + d.hd], s, qi);
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(nq + 2 * nk)))
    }
}

/// Scaled dot-product attention over grouped key/value heads, differentiable in q, k and v;
/// `None` where the fused kernel does not apply (not f32 on the CPU; the caller composes it).
///
/// # Shapes
/// `q`: `[b, nh, t, hd]`, `k`, `v`: `[b, nkv, tk, hd]` (nh a multiple of nkv), `bias`:
/// `[1 or b, 1, t, tk]`, additive (-inf masks a key); returns `[b, t, nh, hd]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    let mut all = vec![q, k, v];
    all.extend(bias);
    if !fusable(&all) {
        return Ok(None);
    }
    let (b, nh, t, _) = q.dims4()?;
    let (bk, nkv, tk, _) = k.dims4()?;
    if bk != b || nkv == 0 || nh % nkv != 0 || k.dims() != v.dims() {
        return Ok(None);
    }
    let (bias, bias_rows) = match bias {
        Some(x) => {
            let (r, _, bt, btk) = x.dims4()?;
            if (r != 1 && r != b) || bt != t || btk != tk {
                return Ok(None);
            }
            (Some(to_vec(&x.contiguous()?)?), r)
        }
        None => (None, 1),
    };
    let c = std::sync::Arc::new(AttnConst {
        scale: scale as f32,
        bias,
        bias_rows,
    });
    Ok(Some(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention(c),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        // A small LCG: reproducible values in [-2, 2).
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Value and gradients of `f` (fused) and `g` (composed) under the loss sum(out * probe).
    fn compare(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        composed: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> (f32, f32) {
        let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let out = f(&ts).unwrap();
            let probe = rand(out.dims(), 99);
            let grads = (&out * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gs: Vec<Tensor> = vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).unwrap().clone())
                .collect();
            (out, gs)
        };
        let (yf, gf) = run(&fused);
        let (yc, gc) = run(&composed);
        let dy = max_diff(&yf, &yc);
        let dg = gf
            .iter()
            .zip(&gc)
            .map(|(a, b)| max_diff(a, b))
            .fold(0f32, f32::max);
        (dy, dg)
    }

    #[test]
    fn rms_norm_matches_composed() {
        // The second shape spans several parallel blocks, the last one partial.
        for (shape, d) in [([3, 5, 16], 16), ([4, 300, 64], 64)] {
            let x = rand(&shape, 1);
            let w = rand(&[d], 2);
            let (dy, dg) = compare(
                &[x, w],
                |t| rms_norm(&t[0], &t[1], 1e-5),
                |t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-5),
            );
            assert!(
                dy < 1e-5 && dg < 1e-4,
                "{shape:?}: value {dy}, gradient {dg}"
            );
        }
    }

    #[test]
    fn softmax_matches_composed() {
        let x = rand(&[2, 3, 4, 7], 3);
        let (dy, dg) = compare(
            &[x],
            |t| softmax(&t[0]),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1),
        );
        assert!(dy < 1e-6 && dg < 1e-5, "value {dy}, gradient {dg}");
    }

    #[test]
    fn rope_matches_composed() {
        let x = rand(&[2, 3, 5, 8], 4);
        // Tables in the rotate-half layout are not needed for the identity to hold: any
        // tables work, so random ones test the transpose in the backward pass.
        for rows in [1, 2] {
            let cos = rand(&[rows, 1, 5, 8], 5);
            let sin = rand(&[rows, 1, 5, 8], 6);
            let (c, s) = (cos.clone(), sin.clone());
            let (dy, dg) = compare(
                std::slice::from_ref(&x),
                move |t| rope(&t[0], &cos, &sin),
                move |t| rope_composed(&t[0], &c, &s),
            );
            assert!(
                dy < 1e-6 && dg < 1e-5,
                "rows {rows}: value {dy}, gradient {dg}"
            );
        }
    }

    #[test]
    fn swiglu_matches_composed() {
        // The second shape spans two parallel blocks, the last one partial.
        for shape in [[3, 4, 10], [5, 40, 100]] {
            let g = rand(&shape, 7);
            let u = rand(&shape, 8);
            let (dy, dg) = compare(&[g, u], |t| swiglu(&t[0], &t[1]), |t| t[0].silu()? * &t[1]);
            assert!(
                dy < 1e-6 && dg < 1e-5,
                "{shape:?}: value {dy}, gradient {dg}"
            );
        }
    }

    #[test]
    fn mlp_node_matches_composed() {
        let (dm, dmlp) = (16, 40);
        let h = rand(&[3, 5, dm], 21);
        let wg = (rand(&[dmlp, dm], 22) * 0.2).unwrap();
        let wu = (rand(&[dmlp, dm], 23) * 0.2).unwrap();
        let wd = (rand(&[dm, dmlp], 24) * 0.2).unwrap();
        let (a, b, c) = (wg.clone(), wu.clone(), wd.clone());
        let (dy, dg) = compare(
            &[h],
            move |t| Ok(mlp(&t[0], (&wg).into(), (&wu).into(), (&wd).into())?.expect("fusable")),
            move |t| {
                let lin = |x: &Tensor, w: &Tensor| x.broadcast_matmul(&w.t()?);
                lin(&swiglu(&lin(&t[0], &a)?, &lin(&t[0], &b)?)?, &c)
            },
        );
        assert!(dy < 1e-5 && dg < 1e-4, "value {dy}, gradient {dg}");
    }

    #[test]
    fn attention_matches_composed() {
        // Grouped heads (6 query heads over 2 key/value heads), a cached prefix of 3 keys,
        // a causal mask with a padded key in row 1, and a bias shared by all rows.
        let (b, nh, nkv, t, tk, hd) = (2, 6, 2, 4, 7, 16);
        let q = rand(&[b, nh, t, hd], 11);
        let k = rand(&[b, nkv, tk, hd], 12);
        let v = rand(&[b, nkv, tk, hd], 13);
        let mask = vec![vec![1u8; tk], {
            let mut m = vec![1u8; tk];
            m[1] = 0;
            m
        }];
        let dev = Device::Cpu;
        for bias in [
            crate::model::layers::attention_bias(b, t, tk - t, Some(&mask), &dev).unwrap(),
            crate::model::layers::attention_bias(b, t, tk - t, None, &dev).unwrap(),
        ] {
            let scale = 1.0 / (hd as f64).sqrt();
            let (b1, b2) = (bias.clone(), bias.clone());
            let (dy, dg) = compare(
                &[q.clone(), k.clone(), v.clone()],
                move |x| Ok(attention(&x[0], &x[1], &x[2], b1.as_ref(), scale)?.unwrap()),
                move |x| {
                    let rep = |y: &Tensor| {
                        y.unsqueeze(2)?
                            .expand((b, nkv, nh / nkv, tk, hd))?
                            .reshape((b, nh, tk, hd))
                    };
                    let (kr, vr) = (rep(&x[1])?, rep(&x[2])?);
                    let s = (x[0].matmul(&kr.t()?)? * scale)?;
                    let s = match &b2 {
                        Some(bb) => s.broadcast_add(bb)?,
                        None => s,
                    };
                    let p = candle_nn::ops::softmax(&s, D::Minus1)?;
                    p.matmul(&vr)?.transpose(1, 2)?.contiguous()
                },
            );
            assert!(dy < 1e-5 && dg < 1e-4, "value {dy}, gradient {dg}");
        }
    }

    #[test]
    fn constant_weight_gets_no_gradient_work() {
        // A norm weight that is not trained: the backward pass returns no gradient for it.
        let x = Var::from_tensor(&rand(&[2, 8], 9)).unwrap();
        let w = rand(&[8], 10);
        let y = rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(&w).is_none());
    }
}
