//! Rotary embedding (rotate-half layout), fused. See [`super`] for why ops are fused.

use super::*;

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
