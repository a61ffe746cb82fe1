//! NAS, norm-anchor scaling (Liu, Zhu, Miao and Fujisawa 2026, "Norm Anchors Make Model Edits
//! Last", arXiv 2602.02543; followed as its reference code implements it, SasyaTitech/NAS
//! 5acab48, `NAS/compute_z.py` and `util/vstar_stats.py`). A plug-in for the batched
//! editors' z targets, used here by AlphaEdit (`norm_anchor: true`, or
//! `--method alphaedit-nas`).
//!
//! Why: in sequential editing the value a rewrite asks the last edited layer L to output, and
//! the edited weights, feed each other: a larger W makes a larger v*, which makes a larger
//! update. The paper shows this loop grows norms about exponentially and collapses the model
//! after a few thousand edits; rescaling each v* to a norm taken from the unedited model cuts
//! the loop.
//!
//! With k the key of layer L at the bare prompt's subject token, v0 = W_L k (+ bias) its MLP
//! output, h the residual after L there and δ the z search's result, v* = v0 + δ is the MLP
//! output the rewrite asks for, and with m the reference norm:
//! - if |v*| > 2 m the rewrite is left out of the update (v* = v0: its target is the current
//!   residual, the reference's "skipping delta");
//! - otherwise v* is rescaled to norm m;
//! - the target residual is z = (h - v0) + v*.
//!
//! Departure: the reference measures m once per model over `nas_restart` = 1000 random
//! CounterFact rewrites searched on the unedited model (the upper-trimmed mean of |v*|,
//! dropping the top 5%). We take it from the first batch the editor computes, which is
//! searched on the unedited model anyway, with the same trim; in a sequential run of batches
//! of 100 that is 100 searches instead of 1000 extra ones (about ten batches' time here). The
//! reference norm is part of a resumable run's state, so a resumed run uses the same m.

use super::vsearch::Found;
use crate::error::{Error, Result};
use crate::model::{Model, Site};
use candle_core::{DType, Tensor};

/// The fraction of v* norms kept (from the smallest) when the reference norm is measured.
pub const KEEP_QUANTILE: f64 = 0.95;
/// A v* longer than this many reference norms is left out of the update.
pub const SKIP_FACTOR: f64 = 2.0;

/// The reference norm and what the anchor did to the last batch.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct NormAnchor {
    /// m: the upper-trimmed mean of |v*| over the first batch (unedited model).
    pub reference: Option<f64>,
    /// Rewrites left out so far (|v*| > 2 m).
    pub skipped: usize,
}

/// Mean of `values` after dropping the largest floor((1 - q) n) (the reference's
/// `_upper_trimmed_mean`).
pub fn upper_trimmed_mean(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let drop = ((1.0 - q) * v.len() as f64).floor() as usize;
    let kept = &v[..v.len() - drop.min(v.len().saturating_sub(1))];
    kept.iter().sum::<f64>() / kept.len().max(1) as f64
}

impl NormAnchor {
    /// The anchored targets `[d_model, N]` f64 for a batch's searches at layer `layer` (the
    /// last edited). Sets the reference norm on the first call.
    ///
    /// # Errors
    /// Tensor errors; a non-finite or zero reference norm.
    pub fn targets(&mut self, model: &Model, layer: usize, found: &[Found]) -> Result<Tensor> {
        let w = model.weight(layer, Site::MlpOut)?; // [d_model, d_mlp]
        let bias_name = model
            .weight_name(layer, Site::MlpOut)?
            .replace(".weight", ".bias");
        let bias = model
            .weights
            .contains(&bias_name)
            .then(|| model.weights.get(&bias_name))
            .transpose()?;
        // v0 and v* per rewrite, [N, d_model].
        let keys = Tensor::stack(&found.iter().map(|f| &f.k_bare).collect::<Vec<_>>(), 0)?;
        let mut v0 = keys.matmul(&w.t()?)?;
        if let Some(b) = bias {
            v0 = v0.broadcast_add(b)?;
        }
        let delta = Tensor::stack(&found.iter().map(|f| &f.delta).collect::<Vec<_>>(), 0)?;
        let h = Tensor::stack(&found.iter().map(|f| &f.h_bare).collect::<Vec<_>>(), 0)?;
        let (v0, delta, h) = (
            v0.to_dtype(DType::F64)?,
            delta.to_dtype(DType::F64)?,
            h.to_dtype(DType::F64)?,
        );
        let v_star = (&v0 + &delta)?;
        let norms: Vec<f64> = v_star.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
        let m = match self.reference {
            Some(m) => m,
            None => {
                let m = upper_trimmed_mean(&norms, KEEP_QUANTILE);
                if !(m.is_finite() && m > 0.0) {
                    return Err(Error::invalid(
                        "method.norm_anchor",
                        format!("the reference norm of v* is {m}; it must be positive"),
                    ));
                }
                self.reference = Some(m);
                m
            }
        };
        // Per rewrite: the factor on v* (0 with v0 kept: skipped).
        let mut rows = Vec::with_capacity(found.len());
        for (i, &n) in norms.iter().enumerate() {
            let v0_i = v0.get(i)?;
            let v = if n > SKIP_FACTOR * m || n == 0.0 {
                self.skipped += 1;
                v0_i.clone()
            } else {
                (v_star.get(i)? * (m / n))?
            };
            rows.push(((h.get(i)? - v0_i)? + v)?);
        }
        Ok(Tensor::stack(&rows, 1)?) // (d_model, N)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimmed_mean_drops_the_top_five_percent() {
        // 20 values: floor(0.05 * 20) = 1 dropped.
        let mut v: Vec<f64> = (1..=19).map(f64::from).collect();
        v.push(1000.0);
        assert_eq!(upper_trimmed_mean(&v, 0.95), 10.0);
        // 19 values: none dropped.
        assert_eq!(upper_trimmed_mean(&v[..19], 0.95), 10.0);
        assert_eq!(upper_trimmed_mean(&[3.0], 0.95), 3.0);
    }
}
