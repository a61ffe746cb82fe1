//! The whole SwiGLU MLP as one autograd node. See [`super`] for why ops are fused.

use super::swiglu::SwiGluBwd;
use super::*;

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
