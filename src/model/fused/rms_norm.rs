//! RMSNorm: one fused op forward, one backward. See [`super`] for why ops are fused.

use super::*;

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
