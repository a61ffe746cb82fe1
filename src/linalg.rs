//! The little dense linear algebra editing needs, in f64: Cholesky factorisation and solves
//! for symmetric positive-definite systems (ROME's `C^-1 k`, MEMIT's and AlphaEdit's
//! `(...)^-1 K`), and the null-space projector of a covariance (AlphaEdit), whose symmetric
//! eigendecomposition comes from nalgebra. candle has no solver; a 1536 x 1536 factorisation
//! is ~1.2 GFLOP, a fraction of a second here.

use crate::error::{Error, Result};
use crate::model::fused::dot;
use candle_core::{DType, Tensor};

/// A lower-triangular Cholesky factor `L` with `A = L L^T`, row-major `n x n`.
#[derive(Debug, Clone)]
pub struct Cholesky {
    n: usize,
    l: Vec<f64>,
}

impl Cholesky {
    /// Factor a symmetric positive-definite matrix (row-major `n x n`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the matrix is not positive definite (a pivot <= 0),
    /// e.g. a covariance from too few samples.
    pub fn factor(a: &[f64], n: usize) -> Result<Cholesky> {
        if a.len() != n * n {
            return Err(Error::invalid(
                "matrix",
                format!("expected {n}x{n} values, got {}", a.len()),
            ));
        }
        let mut l = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..=i {
                let v = a[i * n + j] - dot(&l[i * n..i * n + j], &l[j * n..j * n + j]);
                if i == j {
                    if v <= 0.0 || !v.is_finite() {
                        return Err(Error::invalid(
                            "covariance",
                            format!("not positive definite (pivot {i} = {v:e}); use more samples"),
                        ));
                    }
                    l[i * n + i] = v.sqrt();
                } else {
                    l[i * n + j] = v / l[j * n + j];
                }
            }
        }
        Ok(Cholesky { n, l })
    }

    /// Solve `A x = b`.
    pub fn solve(&self, b: &[f64]) -> Vec<f64> {
        let n = self.n;
        let l = &self.l;
        let mut y = b.to_vec();
        // L y = b, row by row.
        for i in 0..n {
            y[i] = (y[i] - dot(&l[i * n..i * n + i], &y[..i])) / l[i * n + i];
        }
        // L^T x = y, column by column of L^T (= row by row of L, contiguous in memory): once
        // x_i is known, take its share out of every earlier entry.
        for i in (0..n).rev() {
            y[i] /= l[i * n + i];
            let xi = y[i];
            for (yk, lik) in y[..i].iter_mut().zip(&l[i * n..i * n + i]) {
                *yk -= lik * xi;
            }
        }
        y
    }
}

impl Cholesky {
    /// Solve `A X = B` for a `[n, m]` f64 tensor `B` (one solve per column).
    pub fn solve_columns(&self, b: &Tensor) -> Result<Tensor> {
        let (n, m) = b.dims2()?;
        let cols: Vec<Vec<f64>> = b.t()?.contiguous()?.to_dtype(DType::F64)?.to_vec2()?;
        use rayon::prelude::*;
        let out: Vec<f64> = cols.par_iter().flat_map_iter(|c| self.solve(c)).collect();
        Ok(Tensor::from_vec(out, (m, n), b.device())?
            .t()?
            .contiguous()?)
    }

    /// Factor a `[n, n]` tensor (any float type; computed in f64).
    pub fn factor_tensor(a: &Tensor) -> Result<Cholesky> {
        let n = a.dim(0)?;
        let flat = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        Cholesky::factor(&flat, n)
    }
}

/// The eigenvalues (ascending) and the orthonormal eigenvectors (columns of `[n, n]`) of a
/// symmetric `[n, n]` matrix, in f64.
pub fn symmetric_eigen(a: &Tensor) -> Result<(Vec<f64>, Tensor)> {
    let n = a.dim(0)?;
    let flat = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    // Row-major data read as column-major is the transpose: the same matrix, as it is symmetric.
    let m = nalgebra::DMatrix::from_vec(n, n, flat);
    let e = nalgebra::SymmetricEigen::new(m);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| e.eigenvalues[i].total_cmp(&e.eigenvalues[j]));
    let values: Vec<f64> = order.iter().map(|&i| e.eigenvalues[i]).collect();
    let mut vecs = vec![0f64; n * n]; // row-major, column j = eigenvector order[j]
    for (j, &i) in order.iter().enumerate() {
        for r in 0..n {
            vecs[r * n + j] = e.eigenvectors[(r, i)];
        }
    }
    Ok((values, Tensor::from_vec(vecs, (n, n), a.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn eigen_decomposition_reconstructs() {
        // A = [[2, 1], [1, 2]]: eigenvalues 1 and 3.
        let a = Tensor::new(&[[2f64, 1.0], [1.0, 2.0]], &Device::Cpu).unwrap();
        let (vals, vecs) = symmetric_eigen(&a).unwrap();
        assert!((vals[0] - 1.0).abs() < 1e-12 && (vals[1] - 3.0).abs() < 1e-12);
        let d = Tensor::new(&[[1f64, 0.0], [0.0, 3.0]], &Device::Cpu).unwrap();
        let back = vecs.matmul(&d).unwrap().matmul(&vecs.t().unwrap()).unwrap();
        let err: f64 = (back - a)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(err < 1e-12, "{err}");
        let b = Tensor::new(&[[8f64], [8.0]], &Device::Cpu).unwrap();
        let c = Cholesky::factor(&[4.0, 2.0, 2.0, 3.0], 2).unwrap();
        let x: Vec<Vec<f64>> = c.solve_columns(&b).unwrap().to_vec2().unwrap();
        assert!((x[0][0] - 1.0).abs() < 1e-12 && (x[1][0] - 2.0).abs() < 1e-12);
    }

    #[test]
    fn solves_a_known_system() {
        // A = [[4, 2], [2, 3]], x = [1, 2] -> b = [8, 8]
        let c = Cholesky::factor(&[4.0, 2.0, 2.0, 3.0], 2).unwrap();
        let x = c.solve(&[8.0, 8.0]);
        assert!((x[0] - 1.0).abs() < 1e-12 && (x[1] - 2.0).abs() < 1e-12);
        assert!(Cholesky::factor(&[1.0, 2.0, 2.0, 1.0], 2).is_err());
    }

    #[test]
    fn solves_a_larger_system() {
        // A = M M^T + n I for a fixed pseudo-random M; n = 37 is not a multiple of the dot
        // product's eight lanes. Check A X = B for three right-hand sides.
        let n = 37;
        let m: Vec<f64> = (0..n * n)
            .map(|i| ((i * 7919 % 101) as f64 / 50.0) - 1.0)
            .collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| m[i * n + k] * m[j * n + k]).sum::<f64>();
            }
            a[i * n + i] += n as f64;
        }
        let b: Vec<f64> = (0..n * 3).map(|i| (i % 5) as f64 - 2.0).collect();
        let bt = Tensor::from_vec(b.clone(), (n, 3), &Device::Cpu).unwrap();
        let x: Vec<Vec<f64>> = Cholesky::factor(&a, n)
            .unwrap()
            .solve_columns(&bt)
            .unwrap()
            .to_vec2()
            .unwrap();
        for i in 0..n {
            for c in 0..3 {
                let ax: f64 = (0..n).map(|k| a[i * n + k] * x[k][c]).sum();
                assert!((ax - b[i * 3 + c]).abs() < 1e-9, "row {i} col {c}: {ax}");
            }
        }
    }
}
