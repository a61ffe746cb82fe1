//! RMU, representation misdirection for unlearning: Li et al. 2024, "The WMDP Benchmark:
//! Measuring and Reducing Malicious Use With Unlearning" (arXiv 2403.03218), section 5.
//!
//! With `h_l(x)` the residual stream leaving block `l` (the steered layer) and `u` a fixed
//! random unit vector:
//!
//! `L = mean ||h_l(forget) - c u||^2 + retain_weight x mean ||h_l(retain) - h_l^frozen(retain)||^2`
//!
//! Forget activations are pushed toward a scaled random direction, which later layers read as
//! noise; retain activations are held at the frozen model's. Only the MLP output projections
//! of the trained layers move (the paper trains layers l-2..l; open-unlearning's TOFU
//! configuration `configs/trainer/RMU.yaml` at d3d7cf9: layers 5-7, steering layer 7,
//! `steering_coeff` 2, `alpha` 1).
//!
//! Departures:
//! - The means run over the answer-predicting positions (the position before each answer
//!   token, where engram's other losses look), where open-unlearning masks the answer tokens
//!   themselves: one position earlier.
//! - `u` is drawn uniform in [0, 1)^d and normalised, as the paper's code, from engram's
//!   seeded generator, so a run is reproducible.
//! - The default steering coefficient is 20, not open-unlearning's 2 ([`RmuParams`]).

use super::{answer_hidden, Tokenized, Trainable};
use crate::error::{Error, Result};
use crate::model::Model;
use candle_core::Tensor;

/// RMU's settings in a request (`method: {name: rmu, rmu: {...}}`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RmuParams {
    /// `c`: the norm of the direction forget activations are pushed toward.
    #[serde(default = "d_coeff")]
    pub steering_coeff: f64,
    /// The steered layer; unset, the highest trained layer.
    #[serde(default)]
    pub layer: Option<usize>,
}

/// 20, where open-unlearning's TOFU configuration has 2: on smollm2-135m the residual leaving
/// layer 7 has a per-element RMS near 10 (the forget MSE starts near 100), and the target
/// `c u` is a small vector either way; 20 is what `eval tofu` was measured with.
fn d_coeff() -> f64 {
    20.0
}

impl Default for RmuParams {
    fn default() -> Self {
        RmuParams {
            steering_coeff: d_coeff(),
            layer: None,
        }
    }
}

impl RmuParams {
    /// Check the values a request gave; the message names the field.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !(self.steering_coeff > 0.0 && self.steering_coeff.is_finite()) {
            return Err("steering_coeff must be a finite number > 0".into());
        }
        Ok(())
    }
}

/// True for the matrices RMU trains: the MLP output projections (`down_proj`, GPT-2's
/// `mlp.c_proj`).
pub fn trains(name: &str) -> bool {
    name.ends_with("mlp.down_proj.weight") || name.ends_with("mlp.c_proj.weight")
}

/// The steering target of one run.
pub struct Rmu {
    /// The steered layer.
    pub layer: usize,
    /// `c u`, `[d_model]`.
    control: Tensor,
}

impl Rmu {
    /// The steered layer must be at or above every trained layer (a layer above it would get
    /// no gradient).
    ///
    /// # Errors
    /// A steered layer out of range or below a trained layer.
    pub fn new(model: &Model, layers: &[usize], p: &RmuParams, seed: u64) -> Result<Rmu> {
        let top = layers.iter().copied().max().unwrap_or(0);
        let layer = p.layer.unwrap_or(top);
        model.config.check_layer(layer)?;
        if layer < top {
            return Err(Error::invalid(
                "method.rmu.layer",
                format!("{layer} is below trained layer {top}: give a layer >= every trained one"),
            ));
        }
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x524d55);
        let u: Vec<f32> = (0..model.config.d_model)
            .map(|_| rng.random::<f32>())
            .collect();
        let norm = u.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        let c: Vec<f32> = u
            .iter()
            .map(|x| x / norm * p.steering_coeff as f32)
            .collect();
        Ok(Rmu {
            layer,
            control: Tensor::new(c.as_slice(), &model.device)?,
        })
    }

    /// The loss of one step: forget term plus `retain_weight` x retain term.
    ///
    /// `frozen` is the model before unlearning; `forget`, `retain` this step's batches.
    pub fn loss(
        &self,
        tr: &Trainable,
        frozen: &Model,
        forget: &Tokenized,
        retain: Option<&Tokenized>,
        retain_weight: f64,
    ) -> Result<Tensor> {
        let (h, _, _) = answer_hidden(&tr.model, tr.lowest, self.layer, forget, true)?; // [n, d]
        let f = h.broadcast_sub(&self.control)?.sqr()?.mean_all()?;
        match retain {
            Some(r) if retain_weight > 0.0 && !r.is_empty() => {
                let (hr, _, _) = answer_hidden(&tr.model, tr.lowest, self.layer, r, true)?;
                let (h0, _, _) = answer_hidden(frozen, 0, self.layer, r, false)?;
                let keep = (hr - h0.detach())?.sqr()?.mean_all()?;
                Ok((f + (keep * retain_weight)?)?)
            }
            _ => Ok(f),
        }
    }
}
