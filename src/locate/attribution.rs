//! Attribution patching: a linear estimate of every causal-tracing cell from one clean run,
//! one corrupted run and one backward pass (Nanda 2023, "Attribution Patching: Activation
//! Patching At Industrial Scale"; Syed et al. 2023).
//!
//! For a state a at (token i, layer l), restoring it changes P by about
//! `(a_clean - a_corrupted) · dP/da`, the gradient taken on the corrupted run. The MLP and
//! attention kinds sum this over the same window of layers as the exact trace. The estimate is
//! first-order: it is good where P is near-linear in the state, and can miss saturating
//! effects, so the report states its rank correlation with the exact trace.

use super::{setup, window, Grids, LocateParams, LocateResult, Setup};
use crate::error::{Error, Result};
use crate::model::{Batch, HookPoint, Model, Op, Positions, Trace};
use candle_core::{DType, IndexOp, Tensor, Var};
use std::time::Instant;

/// Estimate the three causal-tracing grids of one fact.
///
/// # Errors
/// As [`super::causal::trace`].
pub fn trace(
    model: &Model,
    prompt: &str,
    subject: &str,
    target: Option<&str>,
    params: &LocateParams,
) -> Result<LocateResult> {
    let t0 = Instant::now();
    let s = setup(model, prompt, subject, target, params)?;
    let mut r = trace_setup(model, &s, params)?;
    r.prompt = prompt.into();
    r.subject = subject.into();
    r.seconds = t0.elapsed().as_secs_f64();
    Ok(r)
}

/// Estimate the grids of a prepared [`Setup`].
pub fn trace_setup(model: &Model, s: &Setup, params: &LocateParams) -> Result<LocateResult> {
    let t0 = Instant::now();
    let s = s.clone();
    let n = model.config.n_layers;
    let t = s.prompt_ids.len();
    let rows = params.samples;
    let tid = s.target_id as usize;
    let points = |l: usize| {
        [
            HookPoint::ResidPost(l),
            HookPoint::MlpOut(l),
            HookPoint::AttnOut(l),
        ]
    };

    let mut clean = Trace::new();
    for l in 0..n {
        for p in points(l) {
            clean.capture(p);
        }
    }
    let logits = model.forward(&Batch::single(&s.prompt_ids), &mut clean)?;
    let clean_p = softmax_p(&logits.i((.., t - 1, ..))?, tid)?
        .mean_all()?
        .to_scalar::<f32>()? as f64;

    // Corrupted run with gradients. candle keeps gradients only for leaf variables, so a zero
    // `Var` of the activation's full shape is added at every restorable state: the gradient
    // with respect to it is dP/da at each (row, token).
    let d = model.config.d_model;
    let mut corrupt = Trace::new().differentiable();
    corrupt.push(
        HookPoint::Embed,
        Positions::Tokens((s.subject_range.0..s.subject_range.1).collect()),
        Op::Noise {
            std: s.noise_std,
            seed: params.seed,
        },
    );
    let mut probes = std::collections::HashMap::new();
    for l in 0..n {
        for p in points(l) {
            let v = Var::zeros((rows, t, d), DType::F32, &model.device)?;
            corrupt.push(p, Positions::All, Op::Add(v.as_tensor().clone()));
            corrupt.capture(p);
            probes.insert(p, v);
        }
    }
    let batch = Batch {
        ids: vec![s.prompt_ids.clone(); rows],
        mask: None,
    };
    let logits = model.forward(&batch, &mut corrupt)?;
    let p = softmax_p(&logits.i((.., t - 1, ..))?, tid)?.mean_all()?; // mean over samples
    let corrupted_p = p.to_scalar::<f32>()? as f64;
    let grads = p.backward()?;

    // Per (point): estimated effect per token, [t].
    let missing = |what: &str, point: HookPoint| {
        Error::invalid("attribution", format!("no {what} at {point}"))
    };
    let effect = |point: HookPoint| -> Result<Vec<f64>> {
        let a = corrupt
            .get(point)
            .ok_or_else(|| missing("activation", point))?;
        let g = probes
            .get(&point)
            .and_then(|v| grads.get(v.as_tensor()))
            .ok_or_else(|| missing("gradient", point))?;
        let c = clean
            .get(point)
            .ok_or_else(|| missing("clean activation", point))?;
        let delta = c.broadcast_sub(a)?; // (rows, t, d)
        let e = (delta * g)?.sum(2)?.sum(0)?; // (t): sum over rows of delta_r · dmean/da_r
        Ok(e.to_dtype(DType::F64)?.to_vec1()?)
    };
    let mut per: [Vec<Vec<f64>>; 3] = [vec![], vec![], vec![]]; // kind -> layer -> token
    for l in 0..n {
        for (k, point) in points(l).into_iter().enumerate() {
            per[k].push(effect(point)?);
        }
    }
    let mut grids = Grids {
        hidden: vec![vec![0.0; n]; t],
        mlp: vec![vec![0.0; n]; t],
        attn: vec![vec![0.0; n]; t],
    };
    // per[kind][layer][token] -> grids.kind[token][layer] (a transpose, plus the window sums).
    #[allow(clippy::needless_range_loop)]
    for i in 0..t {
        for l in 0..n {
            grids.hidden[i][l] = per[0][l][i];
            let (lo, hi) = window(l, params.window, n);
            grids.mlp[i][l] = (lo..hi).map(|j| per[1][j][i]).sum();
            grids.attn[i][l] = (lo..hi).map(|j| per[2][j][i]).sum();
        }
    }
    let block = (rows * t * n) as u64;
    // Clean (1 row), corrupted (rows) forward, and a backward costing about two forwards.
    let evals = ((t * n) as u64 + 3 * block, 3 * (t * n) as u64 * block);
    let secs = t0.elapsed().as_secs_f64();
    let ps = (clean_p, corrupted_p);
    Ok(LocateResult::from_grids(
        "attribution",
        s,
        params,
        ps,
        grids,
        evals,
        secs,
    ))
}

/// P(target) per row from `[rows, vocab]` logits (composed softmax: differentiable).
fn softmax_p(logits: &Tensor, tid: usize) -> Result<Tensor> {
    let p = candle_nn::ops::softmax(logits, candle_core::D::Minus1)?;
    Ok(p.narrow(1, tid, 1)?.squeeze(1)?)
}
