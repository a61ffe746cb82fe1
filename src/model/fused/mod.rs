//! Fused, differentiable blocks, one file per kernel, each a candle custom op with its own
//! backward pass: RMSNorm (`rms_norm.rs`), softmax (`softmax.rs`), rotary embedding
//! (`rope.rs`), the SwiGLU product (`swiglu.rs`), the whole SwiGLU MLP as one node (`mlp.rs`)
//! and grouped-query causal attention (`attention.rs`).
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

mod attention;
mod mlp;
mod rms_norm;
mod rope;
mod softmax;
mod swiglu;

pub use attention::attention;
pub(crate) use attention::dot;
pub use mlp::mlp;
pub use rms_norm::rms_norm;
pub use rope::{rope, rope_composed};
pub use softmax::softmax;
pub use swiglu::swiglu;

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
