//! SimNPO: Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization
//! for LLM Unlearning" (arXiv 2410.07163), eq. 4:
//!
//! `L = -(2/β) mean_i log σ(-(β/|y_i|) log π(y_i|x_i) - γ)`
//!
//! NPO ([`super::losses`]) compares each forget answer's likelihood with a reference model's;
//! SimNPO drops the reference and length-normalises instead, so long answers do not get the
//! larger share of the gradient. As in open-unlearning (`src/trainer/unlearn/simnpo.py` at
//! d3d7cf9) the margin enters as `β (NLL_i/|y_i| - δ)`, i.e. γ here is open-unlearning's
//! `delta` (default 0), and the retain NLL is added with `retain_weight`.
//!
//! Departure: open-unlearning weighs the forget term with `gamma = 0.125` and the retain term
//! with `alpha = 1`. Adam is invariant to the loss's scale, so that is the same optimisation as
//! forget + 8 x retain; engram's `retain_weight` is that ratio (`eval tofu`'s SimNPO default 8).

use crate::error::Result;
use candle_core::Tensor;

/// β of open-unlearning's TOFU configuration (`configs/trainer/SimNPO.yaml`).
pub const DEFAULT_BETA: f64 = 4.5;

/// The SimNPO forget term.
///
/// # Shapes
/// `sums`: `[n]` summed answer log-probs under the model being trained; `counts`: the `n`
/// answer lengths. Returns a scalar.
pub fn forget_loss(sums: &Tensor, counts: &[usize], beta: f64, gamma: f64) -> Result<Tensor> {
    let inv: Vec<f32> = counts.iter().map(|&c| 1.0 / c.max(1) as f32).collect();
    let inv = Tensor::new(inv.as_slice(), sums.device())?;
    // Mean token NLL per answer, `[n]`.
    let nll = (sums * &inv)?.neg()?;
    // -log σ(z) = softplus(-z) with z = β (nll - γ).
    let z = ((nll - gamma)? * beta)?;
    Ok((super::losses::softplus(&z.neg()?)?.mean_all()? * (2.0 / beta))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn simnpo_by_hand() {
        // Answers of 2 and 4 tokens, summed log-probs -2 and -8: mean NLLs 1 and 2. With
        // β = 2, γ = 0.5: z = 1 and 3; loss = (2/2) mean(softplus(-1), softplus(-3)).
        let dev = Device::Cpu;
        let s = Tensor::new(&[-2f32, -8.0], &dev).unwrap();
        let l = forget_loss(&s, &[2, 4], 2.0, 0.5)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let sp = |x: f64| (1.0 + x.exp()).ln();
        let want = (sp(-1.0) + sp(-3.0)) / 2.0;
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
    }
}
