//! Softmax over the last dimension, fused forward and backward. See [`super`] for why ops are fused.

use super::*;

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
