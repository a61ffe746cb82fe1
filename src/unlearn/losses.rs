//! Unlearning objectives, minimised by AdamW.
//!
//! With `s_i` the summed answer log-probability of forget example i under the model and
//! `s_ref_i` the same under the model before unlearning:
//! - GA (gradient ascent, Jang et al. 2023): `mean token log-prob of the forget answers`,
//!   i.e. minus the usual NLL, so minimising it pushes the answers away. Unbounded below,
//!   which is why it collapses a model unless stopped.
//! - GradDiff (Liu et al. 2022): GA plus `retain_weight` x NLL on the retain set.
//! - NPO (Zhang et al. 2024, eq. 3): `(2/β) mean_i log(1 + exp(β (s_i - s_ref_i)))`, which is
//!   bounded: its gradient is GA's, weighted down as the answer becomes unlikely relative to
//!   the reference. As open-unlearning's NPO, we add `retain_weight` x retain NLL.
//! - SimNPO (Fan et al. 2024): reference-free, length-normalised NPO (`simnpo.rs`), plus
//!   `retain_weight` x retain NLL.
//! - Distill: KL(teacher || model) on the forget prompts, the teacher being a model that never
//!   learned the data (run.rs, `Teacher`; after Eldan & Russinovich 2023), plus
//!   `retain_weight` x retain NLL. Bounded below by 0: it cannot collapse the model.
//! - Optional for all: `kl_weight` x KL(reference || model) of the next-token
//!   distributions at the retain answers' positions.

use super::request::{Method, MethodName};
use crate::error::Result;
use candle_core::Tensor;

/// The pieces of one step's loss.
pub struct StepInputs<'a> {
    /// Forget answers: summed log-probs `[n]` and lengths, under the model being trained.
    pub forget_sums: &'a Tensor,
    pub forget_counts: &'a [usize],
    /// The same under the reference model (constants), `[n]`; used by NPO.
    pub forget_ref_sums: &'a Tensor,
    /// Retain answers: summed log-probs and lengths, when the method uses them.
    pub retain: Option<(&'a Tensor, &'a [usize])>,
    /// KL(reference || model) on retain positions, when `kl_weight > 0`: a scalar.
    pub retain_kl: Option<&'a Tensor>,
    /// KL(teacher || model) on the distillation examples (`distill`): a scalar.
    pub forget_kl: Option<&'a Tensor>,
}

/// `log(1 + exp(z))`, computed without overflow: `max(z, 0) + log(1 + exp(-|z|))`.
pub fn softplus(z: &Tensor) -> Result<Tensor> {
    Ok((z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// The scalar loss for `method`.
pub fn loss(method: &Method, x: &StepInputs<'_>) -> Result<Tensor> {
    let forget = match method.name {
        MethodName::Ga | MethodName::Graddiff => {
            // Mean token log-prob over all forget answer tokens = -NLL.
            let total: usize = x.forget_counts.iter().sum();
            (x.forget_sums.sum_all()? / total.max(1) as f64)?
        }
        MethodName::Npo => {
            let beta = method.beta();
            let ratio = (x.forget_sums - x.forget_ref_sums)?;
            (softplus(&(ratio * beta)?)?.mean_all()? * (2.0 / beta))?
        }
        MethodName::Simnpo => {
            super::simnpo::forget_loss(x.forget_sums, x.forget_counts, method.beta(), method.gamma)?
        }
        MethodName::Rmu => {
            return Err(crate::Error::invalid(
                "method",
                "rmu's loss is on activations (rmu.rs), not on answer log-probabilities",
            ))
        }
        MethodName::Rewrite => {
            return Err(crate::Error::invalid(
                "method",
                "rewrite is closed-form and has no training loss",
            ))
        }
        MethodName::Distill => match x.forget_kl {
            Some(kl) => kl.clone(),
            None => {
                return Err(crate::Error::invalid(
                    "method",
                    "distill needs its teacher's KL term",
                ))
            }
        },
    };
    let mut l = forget;
    if method.name != MethodName::Ga && method.retain_weight > 0.0 {
        if let Some((sums, counts)) = x.retain {
            let nll = super::token_nll(sums, counts)?;
            l = (l + (nll * method.retain_weight)?)?;
        }
    }
    if method.kl_weight > 0.0 {
        if let Some(kl) = x.retain_kl {
            l = (l + (kl * method.kl_weight)?)?;
        }
    }
    Ok(l)
}

/// Mean KL(reference || model) over rows of log-probabilities.
///
/// # Shapes
/// `ref_logp`, `logp`: `[n, vocab]` -> scalar.
pub fn kl_rows(ref_logp: &Tensor, logp: &Tensor) -> Result<Tensor> {
    let p = ref_logp.exp()?;
    Ok((p * (ref_logp - logp)?)?.sum(1)?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn softplus_is_stable_and_exact() {
        let z = Tensor::new(&[-100f32, -1.0, 0.0, 2.0, 100.0], &Device::Cpu).unwrap();
        let v: Vec<f32> = softplus(&z).unwrap().to_vec1().unwrap();
        let want = [
            0.0f64,
            (1.0 + (-1f64).exp()).ln(),
            2f64.ln(),
            (1.0 + 2f64.exp()).ln(),
            100.0,
        ];
        for (a, b) in v.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn npo_at_the_reference_is_two_over_beta_ln2() {
        // s = s_ref: each term is log 2, so the loss is (2/β) ln 2.
        let dev = Device::Cpu;
        let s = Tensor::new(&[-5f32, -7.0], &dev).unwrap();
        let m = Method {
            beta: Some(0.1),
            retain_weight: 0.0,
            ..Method::new(MethodName::Npo)
        };
        let x = StepInputs {
            forget_sums: &s,
            forget_counts: &[2, 3],
            forget_ref_sums: &s,
            retain: None,
            retain_kl: None,
            forget_kl: None,
        };
        let l = loss(&m, &x).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((l - 20.0 * 2f64.ln()).abs() < 1e-4, "{l}");
        let ga = Method {
            name: MethodName::Ga,
            ..m
        };
        // GA: mean token log-prob = (-5 - 7) / 5.
        let l = loss(&ga, &x).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((l + 12.0 / 5.0).abs() < 1e-5, "{l}");
    }

    #[test]
    fn kl_of_identical_rows_is_zero() {
        let dev = Device::Cpu;
        let lp = candle_nn::ops::log_softmax(
            &Tensor::new(&[[1f32, 2.0, 3.0], [0.0, 0.0, 1.0]], &dev).unwrap(),
            1,
        )
        .unwrap();
        let kl = kl_rows(&lp, &lp).unwrap().to_scalar::<f32>().unwrap();
        assert!(kl.abs() < 1e-7);
    }
}
