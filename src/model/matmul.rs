//! The two matrix products of a linear map, `x · Wᵀ` (forward) and `g · W` (the input's
//! gradient), handed straight to `gemm`, the crate candle's CPU backend multiplies with.
//!
//! Why not `Tensor::matmul`: candle fills every product's output with zeros before gemm
//! overwrites it, and a custom op that calls it must copy its input in and its output out.
//! On the value search's step that was about 4% of the time in `memset`/`memmove`
//! (perf, `examples/step_profile.rs`); on the output head (a `[positions, 49152]` product) it
//! is three passes over 40 MB that compute nothing. Same gemm call, same strides, same
//! numbers as `Tensor::matmul`.
//!
//! The functions return `None` where they do not apply (not f32, not on the CPU, not
//! contiguous); the caller then uses `Tensor::matmul`.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use gemm::{gemm, Parallelism};

/// Runs `f` on the f32 contents of a contiguous CPU tensor; `None` for anything else.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return None;
    }
    let (s, l) = t.storage_and_layout();
    let (a, b) = l.contiguous_offsets()?;
    match &*s {
        Storage::Cpu(CpuStorage::F32(v)) => Some(f(&v[a..b])),
        _ => None,
    }
}

/// `dst (m x n) = lhs · rhs` for row-major `dst`, with `lhs` and `rhs` given by their
/// (column, row) strides.
#[allow(clippy::too_many_arguments)]
fn product(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: &[f32],
    (rhs_cs, rhs_rs): (usize, usize),
) -> Vec<f32> {
    let len = m * n;
    let mut dst: Vec<f32> = Vec::with_capacity(len);
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the slices hold the elements the strides reach (the callers check the
    // shapes); with read_dst = false gemm writes every one of the m x n outputs without
    // reading them, so the uninitialised buffer is fully written before set_len.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
        dst.set_len(len);
    }
    dst
}

/// `x · wᵀ` for the contents `x` of a row-major `[m, k]` matrix; `None` where `w` is not a
/// contiguous f32 CPU `[n, k]` tensor.
pub fn x_wt_slice(x: &[f32], w: &Tensor) -> candle_core::Result<Option<Vec<f32>>> {
    let (n, k) = w.dims2()?;
    if k == 0 || !x.len().is_multiple_of(k) {
        return Ok(None);
    }
    Ok(with_f32(w, |ws| {
        product(x.len() / k, n, k, x, (1, k), ws, (k, 1))
    }))
}

/// `f` over the rows of `t` along its last dimension (`inner` wide, `outer` wide after);
/// `None` where `t` is not a contiguous f32 CPU tensor or `f` does not apply.
fn over_rows(
    t: &Tensor,
    inner: usize,
    outer: usize,
    f: impl FnOnce(&[f32]) -> candle_core::Result<Option<Vec<f32>>>,
) -> candle_core::Result<Option<Tensor>> {
    let mut shape = t.dims().to_vec();
    if inner == 0 || shape.last() != Some(&inner) {
        return Ok(None);
    }
    let Some(Some(y)) = with_f32(t, f).transpose()? else {
        return Ok(None);
    };
    *shape.last_mut().expect("non-empty") = outer;
    Ok(Some(Tensor::from_vec(y, shape, &Device::Cpu)?))
}

/// `x · wᵀ` over the last dimension of `x`.
///
/// # Shapes
/// `x`: `[.., k]`, `w`: `[n, k]` -> `[.., n]`.
pub fn x_wt(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (n, k) = w.dims2()?;
    over_rows(x, k, n, |xs| x_wt_slice(xs, w))
}

/// `g · w` over the last dimension of `g`.
///
/// # Shapes
/// `g`: `[.., n]`, `w`: `[n, k]` -> `[.., k]`.
pub fn g_w(g: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (n, k) = w.dims2()?;
    over_rows(g, n, k, |gs| {
        Ok(with_f32(w, |ws| {
            product(gs.len() / n, k, n, gs, (1, n), ws, (1, k))
        }))
    })
}

/// `x · wᵀ`, through [`x_wt`] where it applies, else `Tensor::matmul` (which also records
/// the product for autograd: use this only where no gradient flows, or from a custom op).
pub fn x_wt_any(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    match x_wt(x, w)? {
        Some(y) => Ok(y),
        None => x.broadcast_matmul(&w.t()?),
    }
}

/// `g · w`, through [`g_w`] where it applies, else `Tensor::matmul` (the same caveat).
pub fn g_w_any(g: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    match g_w(g, w)? {
        Some(y) => Ok(y),
        None => g.broadcast_matmul(w),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_match_tensor_matmul() {
        let dev = Device::Cpu;
        // Odd sizes, so no dimension is a multiple of gemm's register blocks.
        let x = Tensor::randn(0f32, 1.0, (3, 37, 29), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (53, 29), &dev).unwrap();
        let y = x_wt(&x, &w).unwrap().unwrap();
        let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        assert_eq!(y.dims(), &[3, 37, 53]);
        let d = (y - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        let g = Tensor::randn(0f32, 1.0, (3, 37, 53), &dev).unwrap();
        let dx = g_w(&g, &w).unwrap().unwrap();
        let want = g.broadcast_matmul(&w).unwrap();
        assert_eq!(dx.dims(), &[3, 37, 29]);
        let d = (dx - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        // Not contiguous: not handled here.
        assert!(x_wt(&x.transpose(0, 1).unwrap(), &w).unwrap().is_none());
    }
}
