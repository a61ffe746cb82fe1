//! Weight deltas: a change to one matrix, written into a model ([`apply`]) and undone bit for
//! bit ([`revert`]). Editing methods compute them; evaluation, unlearning's closed-form
//! rewrite and the patch files apply and revert them.

use super::{check_finite, Model};
use crate::error::{Error, Result};
use candle_core::Tensor;

/// A change to one weight matrix `[out, in]`.
#[derive(Debug, Clone)]
pub struct WeightDelta {
    /// The checkpoint name of the matrix.
    pub name: String,
    pub layer: usize,
    pub kind: DeltaKind,
}

/// How the change is stored.
#[derive(Debug, Clone)]
pub enum DeltaKind {
    /// `right ⊗ left`: `right` `[out]`, `left` `[in]` (ROME's Λ and C^-1 k*).
    RankOne { right: Tensor, left: Tensor },
    /// A dense `[out, in]` difference (fine-tuning).
    Dense(Tensor),
}

impl WeightDelta {
    /// A rank-one delta; refuses NaN or Inf.
    pub fn rank_one(name: String, layer: usize, right: Tensor, left: Tensor) -> Result<Self> {
        check_finite(&name, &right)?;
        check_finite(&name, &left)?;
        Ok(WeightDelta {
            name,
            layer,
            kind: DeltaKind::RankOne { right, left },
        })
    }

    /// The dense `[out, in]` matrix.
    pub fn dense(&self) -> Result<Tensor> {
        Ok(match &self.kind {
            DeltaKind::RankOne { right, left } => {
                right.unsqueeze(1)?.matmul(&left.unsqueeze(0)?)?
            }
            DeltaKind::Dense(d) => d.clone(),
        })
    }

    /// Frobenius norm of the change.
    pub fn norm(&self) -> Result<f64> {
        Ok(self.dense()?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64)
    }
}

/// What [`apply`] replaced, so that [`revert`] restores it exactly.
#[derive(Debug, Clone)]
pub struct Applied {
    pub name: String,
    pub previous: Tensor,
}

/// Add a delta to the model's weights.
///
/// # Errors
/// A missing tensor, a shape mismatch, a non-finite result.
pub fn apply(model: &mut Model, delta: &WeightDelta) -> Result<Applied> {
    let previous = model.weights.dense(&delta.name)?;
    let d = delta.dense()?;
    if d.dims() != previous.dims() {
        return Err(Error::ShapeMismatch {
            name: delta.name.clone(),
            found: d.dims().to_vec(),
            expected: previous.dims().to_vec(),
        });
    }
    model.set_tensor(&delta.name, (&previous + d)?)?;
    Ok(Applied {
        name: delta.name.clone(),
        previous,
    })
}

/// Undo [`apply`]s, most recent last in `applied` (they are undone in reverse order).
pub fn revert(model: &mut Model, applied: &[Applied]) -> Result<()> {
    for a in applied.iter().rev() {
        model.set_tensor(&a.name, a.previous.clone())?;
    }
    Ok(())
}
