//! The little dense linear algebra editing needs, in f64: Cholesky factorisation and solves
//! for symmetric positive-definite systems (ROME's `C^-1 k`). candle has no solver; a 1536 x
//! 1536 factorisation is ~1.2 GFLOP, a fraction of a second here.

use crate::error::{Error, Result};

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
                let (ri, rj) = (&l[i * n..i * n + j], &l[j * n..j * n + j]);
                let dot: f64 = ri.iter().zip(rj).map(|(x, y)| x * y).sum();
                let v = a[i * n + j] - dot;
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
        let mut y = b.to_vec();
        for i in 0..n {
            let s: f64 = (0..i).map(|k| self.l[i * n + k] * y[k]).sum();
            y[i] = (y[i] - s) / self.l[i * n + i];
        }
        for i in (0..n).rev() {
            let s: f64 = (i + 1..n).map(|k| self.l[k * n + i] * y[k]).sum();
            y[i] = (y[i] - s) / self.l[i * n + i];
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_a_known_system() {
        // A = [[4, 2], [2, 3]], x = [1, 2] -> b = [8, 8]
        let c = Cholesky::factor(&[4.0, 2.0, 2.0, 3.0], 2).unwrap();
        let x = c.solve(&[8.0, 8.0]);
        assert!((x[0] - 1.0).abs() < 1e-12 && (x[1] - 2.0).abs() < 1e-12);
        assert!(Cholesky::factor(&[1.0, 2.0, 2.0, 1.0], 2).is_err());
    }
}
