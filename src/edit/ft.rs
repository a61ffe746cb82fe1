//! FT-L: fine-tune one MLP output matrix on the new fact under an L-infinity constraint, the
//! baseline of the ROME paper (Meng et al. 2022, section 4.2; Zhu et al. 2020, "Modifying
//! Memories in Transformer Models"). Defaults are the reference's `hparams/FT/gpt2-xl_constr.json`.

use super::DeltaKind;
use super::WeightDelta;
use crate::error::{Error, Result};
use crate::model::{Batch, HookPoint, Model, Site, Trace};
use candle_core::{DType, Tensor, Var, D};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

/// FT-L hyper-parameters.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FtParams {
    /// The layer whose MLP output projection is tuned (the same matrix ROME rewrites).
    #[serde(default)]
    pub layer: Option<usize>,
    /// Adam steps (reference: 25).
    #[serde(default = "d_steps")]
    pub steps: usize,
    /// Learning rate (reference: 5e-4).
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// |W' - W|_inf bound (reference: 5e-4).
    #[serde(default = "d_norm")]
    pub norm_constraint: f64,
}

fn d_steps() -> usize {
    25
}
fn d_lr() -> f64 {
    5e-4
}
fn d_norm() -> f64 {
    5e-4
}

/// Fine-tune layer `layer`'s MLP output matrix so that `prompt` continues with `target`.
/// The model is not changed.
pub fn compute(
    model: &Model,
    layer: usize,
    prompt: &str,
    target: &str,
    p: &FtParams,
) -> Result<WeightDelta> {
    model.config.check_layer(layer)?;
    let tok = model.tok()?;
    let (pi, ti) = tok.continuation(prompt, target)?;
    let mut ids = pi.clone();
    ids.extend_from_slice(&ti[..ti.len() - 1]);
    let batch = Batch::single(&ids);
    let mut tr = Trace::new();
    tr.stop_after(HookPoint::ResidPre(layer));
    let resid = model.forward(&batch, &mut tr)?.detach(); // layers below L never change

    let name = model.weight_name(layer, Site::MlpOut)?;
    let w0 = model.weight(layer, Site::MlpOut)?.clone();
    let w = Var::from_tensor(&w0)?;
    let mut m = model.clone();
    m.weights.insert(name.clone(), w.as_tensor().clone());
    let mut opt = AdamW::new(
        vec![w.clone()],
        ParamsAdamW {
            lr: p.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let targets = Tensor::new(ti.as_slice(), &model.device)?.unsqueeze(1)?;
    for _ in 0..p.steps {
        let logits = m.forward_from(
            layer,
            &resid,
            None,
            None,
            &mut Trace::new().differentiable(),
            false,
        )?;
        let lp = candle_nn::ops::log_softmax(
            &logits.squeeze(0)?.narrow(0, pi.len() - 1, ti.len())?,
            D::Minus1,
        )?;
        let nll = (lp.gather(&targets, 1)?.mean_all()? * -1.0)?;
        opt.backward_step(&nll)?;
        // Project back into the L-infinity ball around the original weights.
        let d = (w.as_tensor() - &w0)?.clamp(-p.norm_constraint, p.norm_constraint)?;
        w.set(&(&w0 + d)?)?;
    }
    let delta = (w.as_tensor().to_dtype(DType::F32)? - &w0)?;
    crate::model::check_finite(&name, &delta)
        .map_err(|_| Error::NonFinite { name: name.clone() })?;
    Ok(WeightDelta {
        name,
        layer,
        kind: DeltaKind::Dense(delta),
    })
}
