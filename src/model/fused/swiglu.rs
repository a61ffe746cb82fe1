//! The SwiGLU product silu(gate) * up, fused forward and backward. See [`super`] for why ops are fused.

use super::*;

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
pub(super) struct SwiGluBwd;

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
