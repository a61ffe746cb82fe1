//! Causal attention with grouped-query heads, fused forward and backward. See [`super`] for why ops are fused.

use super::*;

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
