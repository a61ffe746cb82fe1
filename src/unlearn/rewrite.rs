//! `method: rewrite`: unlearning by a closed-form rank-one rewrite of one MLP, keyed on the
//! subject, instead of training every weight.
//!
//! The idea is ROME's (Meng et al. 2022, "Locating and Editing Factual Associations in GPT",
//! section 3.1): layer L's MLP output projection acts as a key-value memory, the key being the
//! MLP's hidden activation at the subject's last token. A rank-one update W' = W + Λ (C⁻¹k*)ᵀ
//! changes what that key maps to and, by the covariance C of ordinary keys, disturbs other keys
//! least. Text that does not name the subject barely moves: a ROME edit keeps 99% of unrelated
//! top-1 predictions, where training every weight on the forget set kept 72%.
//!
//! What is searched (the vector delta added to layer L's MLP output at the subject's last
//! token, then written as v* = W k* + delta), with one delta for all of the request's prompts:
//! - **say**: the NLL of the teacher's own continuation of each forget prompt (the reference
//!   model's, or the calibrated stand-in's), so the answer reads like a model that never saw
//!   the data;
//! - **avoid**: the unlikelihood of each secret, -log(1 - p(token)) at each of its tokens given
//!   the prompt and the secret's earlier tokens (Welleck et al. 2019, "Neural Text Generation
//!   with Unlikelihood Training"), so the secret's likelihood falls and not only its rank;
//! - **keep**: the NLL of the request's retain records that name the subject (her public facts
//!   share her key, so they must be held);
//! - KL(new || old) of the next token after the bare subject, and weight decay on
//!   |delta|² / |h|², with |delta| clamped to `clamp_norm_factor` x |h|, as ROME's v* search.
//!
//! Departures from ROME: ROME searches one target on one prompt (with context prefixes); here
//! one delta serves several prompts, each with its own target, plus the avoid and keep terms.
//! k* is the mean key over the forget prompts (ROME: over the prefixed prompt). Several layers
//! can be rewritten in turn (`layers`), each search run on the model with the earlier
//! layers' rewrites in place, as in sequential ROME.

use crate::error::{Error, Result};
use crate::linalg::Cholesky;
use crate::model::delta::{apply, Applied, WeightDelta};
use crate::model::{Batch, HookPoint, Model, Op, PadSide, Positions, Site, Trace};
use candle_core::{DType, IndexOp, Tensor, Var, D};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

use super::audit::{quick_baseline, quick_check};
use super::request::Request;
use super::run::{
    perplexity, teacher_answers, Options, StopCheck, StopReason, TrainLog, GUARD_TEXTS, MAX_LEN,
};
use super::{mean_token_logprob, tokenize, Example};
use crate::stats::{load_or_compute_layers, StatsSpec};

/// Hyper-parameters of the search (defaults: ROME's v* search on this model, see
/// `edit::rome::RomeParams`, with more steps because there are several targets).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RewriteParams {
    /// Adam steps per layer.
    pub steps: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub clamp_norm_factor: f64,
    pub kl_factor: f64,
    /// Weight of the unlikelihood of the secrets, against 1 for the say and keep NLLs.
    pub avoid_weight: f64,
    /// Weight of the keep NLL.
    pub keep_weight: f64,
    /// Tokens of the teacher's continuation decoded per forget prompt (then cut at the first
    /// sentence end): the start of an answer is what decides how it reads.
    pub say_tokens: usize,
}

impl RewriteParams {
    /// Check the values a request gave; the message names the field.
    pub fn check(&self) -> std::result::Result<(), String> {
        let pos = |v: f64| v.is_finite() && v >= 0.0;
        if self.steps == 0 || self.steps > 1000 {
            return Err("steps must be in 1..=1000".into());
        }
        if self.say_tokens == 0 || self.say_tokens > 64 {
            return Err("say_tokens must be in 1..=64".into());
        }
        let positive = |v: f64| v > 0.0 && v.is_finite();
        if !(positive(self.lr) && positive(self.clamp_norm_factor)) {
            return Err("lr and clamp_norm_factor must be finite numbers > 0".into());
        }
        if ![
            self.weight_decay,
            self.kl_factor,
            self.avoid_weight,
            self.keep_weight,
        ]
        .into_iter()
        .all(pos)
        {
            return Err(
                "weight_decay, kl_factor, avoid_weight and keep_weight must be finite numbers >= 0"
                    .into(),
            );
        }
        Ok(())
    }
}

impl Default for RewriteParams {
    fn default() -> Self {
        RewriteParams {
            steps: 40,
            lr: 0.5,
            weight_decay: 0.5,
            clamp_norm_factor: 4.0,
            kl_factor: 0.0625,
            avoid_weight: 1.0,
            keep_weight: 1.0,
            say_tokens: 8,
        }
    }
}

/// What a search term does with its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// Make the answer likely (NLL).
    Say,
    /// Make each answer token unlikely (unlikelihood).
    Avoid,
    /// Keep the answer likely (NLL, `keep_weight`).
    Keep,
}

/// One term of the search: a prompt naming the subject, an answer, and what to do with it.
#[derive(Debug, Clone)]
pub struct Term {
    pub prompt: String,
    pub answer: String,
    pub goal: Goal,
}

/// What one layer's rewrite did, for reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerRewrite {
    pub layer: usize,
    pub steps: usize,
    /// The loss terms at the last step: mean say NLL, mean avoid unlikelihood, mean keep NLL,
    /// KL.
    pub say_nll: f64,
    pub avoid: f64,
    pub keep_nll: f64,
    pub kl: f64,
    pub delta_norm: f64,
    /// |ΔW| (Frobenius).
    pub update_norm: f64,
}

/// A tokenized term: the row fed to the model, the subject's last position, the answer's
/// positions (each predicting its token) and tokens.
struct Row {
    ids: Vec<u32>,
    subject_last: usize,
    at: Vec<usize>,
    tokens: Vec<u32>,
    goal: Goal,
}

fn rows(model: &Model, subject: &str, terms: &[Term]) -> Result<Vec<Row>> {
    let tok = model.tok()?;
    terms
        .iter()
        .map(|t| {
            let (p, a) = tok.continuation(&t.prompt, &t.answer)?;
            let (_, end) = model.tok()?.subject_span(&t.prompt, subject, &p, 0)?;
            let mut ids = p.clone();
            ids.extend_from_slice(&a[..a.len() - 1]);
            Ok(Row {
                ids,
                subject_last: end - 1,
                at: (0..a.len()).map(|i| p.len() - 1 + i).collect(),
                tokens: a,
                goal: t.goal,
            })
        })
        .collect()
}

/// Each row's answer-token log-probs, `[answer tokens]` per row, and the KL row's next-token
/// log-probs, from the last block's output `resid` (`[rows, seq, d_model]`): the output head
/// runs only at the positions read.
fn read_logps(
    model: &Model,
    resid: &Tensor,
    rows: &[Row],
    kl: (usize, usize),
    differentiable: bool,
) -> Result<(Vec<Tensor>, Tensor)> {
    let dev = resid.device();
    let mut picked = Vec::with_capacity(rows.len() + 1);
    for (r, row) in rows.iter().enumerate() {
        let at = Tensor::new(row.at.iter().map(|&p| p as u32).collect::<Vec<_>>(), dev)?;
        picked.push(resid.i(r)?.index_select(&at, 0)?);
    }
    picked.push(resid.i(kl.0)?.narrow(0, kl.1, 1)?);
    let x = Tensor::cat(&picked, 0)?.unsqueeze(0)?;
    let lp = candle_nn::ops::log_softmax(&model.head(&x, differentiable)?.squeeze(0)?, D::Minus1)?;
    let mut out = Vec::with_capacity(rows.len());
    let mut at = 0;
    for row in rows {
        let n = row.tokens.len();
        let ids = Tensor::new(row.tokens.clone(), dev)?.unsqueeze(1)?;
        out.push(lp.narrow(0, at, n)?.gather(&ids, 1)?.squeeze(1)?);
        at += n;
    }
    Ok((out, lp.i(at)?))
}

/// Search delta at `layer` for `terms` and write it as a rank-one update of the layer's MLP
/// output projection, applied to `model`. `chol` factors the layer's key covariance C.
///
/// # Errors
/// Subject not in a prompt, empty answers, a non-finite loss, tensor errors.
pub fn rewrite_layer(
    model: &mut Model,
    subject: &str,
    terms: &[Term],
    layer: usize,
    chol: &Cholesky,
    p: &RewriteParams,
) -> Result<(Applied, LayerRewrite)> {
    model.config.check_layer(layer)?;
    if !terms.iter().any(|t| t.goal == Goal::Say) {
        return Err(Error::invalid(
            "rewrite",
            "needs at least one forget prompt",
        ));
    }
    let dev = model.device.clone();
    let rows = rows(model, subject, terms)?;
    // The KL row: the bare subject, read at its last token.
    let tok = model.tok()?;
    let kl_ids = tok.encode(subject)?;
    let mut all: Vec<Vec<u32>> = rows.iter().map(|r| r.ids.clone()).collect();
    all.push(kl_ids.clone());
    let kl_row = all.len() - 1;
    let batch = Batch::padded(&all, PadSide::Right, 0);
    let mut cells: Vec<(usize, usize)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (i, r.subject_last))
        .collect();
    cells.push((kl_row, kl_ids.len() - 1));

    // The clean pass: the residual entering the layer (layers below it never change, so each
    // step starts there), the keys and MLP outputs at the subject, and the KL row's old
    // log-probs.
    let last_block = HookPoint::ResidPost(model.config.n_layers - 1);
    let mut tr = Trace::new();
    tr.capture(HookPoint::ResidPre(layer))
        .capture(HookPoint::MlpKey(layer))
        .capture(HookPoint::MlpOut(layer))
        .stop_after(last_block);
    let resid_end = model.forward(&batch, &mut tr)?;
    let resid_pre = tr.take(HookPoint::ResidPre(layer)).expect("captured");
    let keys = tr.take(HookPoint::MlpKey(layer)).expect("captured");
    let outs = tr.take(HookPoint::MlpOut(layer)).expect("captured");
    let kl_at = (kl_row, kl_ids.len() - 1);
    let (_, old_kl) = read_logps(model, &resid_end, &rows, kl_at, false)?;
    let say: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].goal == Goal::Say)
        .collect();
    let pick = |t: &Tensor, i: usize| t.i((i, rows[i].subject_last));
    let k_star = (Tensor::stack(
        &say.iter()
            .map(|&i| pick(&keys, i))
            .collect::<std::result::Result<Vec<_>, _>>()?,
        0,
    )?
    .mean(0))?; // [d_mlp]
    let h_norm = pick(&outs, say[0])?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f32>()? as f64;

    let delta = Var::zeros(model.config.d_model, DType::F32, &dev)?;
    let mut opt = AdamW::new(
        vec![delta.clone()],
        ParamsAdamW {
            lr: p.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mean = |v: &[Tensor]| -> Result<Tensor> {
        if v.is_empty() {
            return Ok(Tensor::zeros((), DType::F32, &dev)?);
        }
        Ok((Tensor::stack(v, 0)?.sum_all()? / v.len() as f64)?)
    };
    let mut last = LayerRewrite {
        layer,
        steps: 0,
        say_nll: 0.0,
        avoid: 0.0,
        keep_nll: 0.0,
        kl: 0.0,
        delta_norm: 0.0,
        update_norm: 0.0,
    };
    for step in 0..p.steps {
        let mut tr = Trace::new().differentiable();
        tr.push(
            HookPoint::MlpOut(layer),
            Positions::Cells(cells.clone()),
            Op::Add(delta.as_tensor().clone()),
        );
        tr.stop_after(last_block);
        let mask = batch.mask.as_deref();
        let resid = model.forward_from(layer, &resid_pre, mask, None, &mut tr, false)?;
        let (lps, new_kl) = read_logps(model, &resid, &rows, kl_at, true)?;
        let (mut say_t, mut avoid_t, mut keep_t) = (vec![], vec![], vec![]);
        for (row, lp) in rows.iter().zip(&lps) {
            match row.goal {
                Goal::Say => say_t.push(lp.neg()?.mean_all()?),
                Goal::Keep => keep_t.push(lp.neg()?.mean_all()?),
                // -log(1 - p), with p kept below 1 so the log stays finite.
                Goal::Avoid => avoid_t.push(
                    lp.exp()?
                        .affine(-1.0, 1.0)?
                        .clamp(1e-6f32, 1f32)?
                        .log()?
                        .neg()?
                        .mean_all()?,
                ),
            }
        }
        let kl = (new_kl.exp()? * (&new_kl - &old_kl)?)?.sum_all()?;
        let (s, a, k) = (mean(&say_t)?, mean(&avoid_t)?, mean(&keep_t)?);
        let wd = (delta.as_tensor().sqr()?.sum_all()? / (h_norm * h_norm))?;
        let loss = (((&s + (&a * p.avoid_weight)?)? + (&k * p.keep_weight)?)?
            + ((&kl * p.kl_factor)? + (wd * p.weight_decay)?)?)?;
        let lv = loss.to_scalar::<f32>()? as f64;
        if !lv.is_finite() {
            return Err(Error::NonFinite {
                name: format!("rewrite loss at step {step}"),
            });
        }
        last.steps = step + 1;
        last.say_nll = s.to_scalar::<f32>()? as f64;
        last.avoid = a.to_scalar::<f32>()? as f64;
        last.keep_nll = k.to_scalar::<f32>()? as f64;
        last.kl = kl.to_scalar::<f32>()? as f64;
        tracing::debug!(
            "rewrite layer {layer} step {step}: say {:.3} avoid {:.3} keep {:.3} kl {:.3}",
            last.say_nll,
            last.avoid,
            last.keep_nll,
            last.kl
        );
        opt.backward_step(&loss)?;
        // Clamp |delta| to clamp_norm_factor x |h|, as ROME.
        let n = delta
            .as_tensor()
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()? as f64;
        let max = p.clamp_norm_factor * h_norm;
        if n > max {
            delta.set(&(delta.as_tensor() * (max / n))?)?;
        }
    }
    let d = delta.as_tensor().detach();
    last.delta_norm = d.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
    // u = C⁻¹ k*, Λ = delta / (u · k*): W' k* = W k* + delta.
    let k64: Vec<f64> = k_star.to_dtype(DType::F64)?.to_vec1()?;
    let u = chol.solve(&k64);
    let uk: f64 = u.iter().zip(&k64).map(|(a, b)| a * b).sum();
    let left = Tensor::from_vec(
        u.iter().map(|&x| x as f32).collect::<Vec<f32>>(),
        model.config.d_mlp,
        &dev,
    )?;
    let w = WeightDelta::rank_one(
        model.weight_name(layer, Site::MlpOut)?,
        layer,
        (d / uk)?,
        left,
    )?;
    last.update_norm = w.norm()?;
    Ok((apply(model, &w)?, last))
}

/// The search's terms for a request: per forget example, say the teacher's answer and avoid
/// the secret; keep each retain record whose prompt names the subject.
pub fn terms(
    teacher_answers: &[String],
    subject: &str,
    forget: &[Example],
    retain: &[Example],
) -> Vec<Term> {
    let mut v = Vec::new();
    for (e, t) in forget.iter().zip(teacher_answers) {
        let t = crate::eval::generation::first_sentence(t);
        if !t.trim().is_empty() {
            v.push(Term {
                prompt: e.prompt.clone(),
                answer: t.to_string(),
                goal: Goal::Say,
            });
        }
        v.push(Term {
            prompt: e.prompt.clone(),
            answer: e.answer.clone(),
            goal: Goal::Avoid,
        });
    }
    v.extend(
        retain
            .iter()
            .filter(|r| r.prompt.contains(subject))
            .map(|r| Term {
                prompt: r.prompt.clone(),
                answer: r.answer.clone(),
                goal: Goal::Keep,
            }),
    );
    v
}

/// `method: rewrite` in place of the training loop: rewrite each layer of `layers` in turn,
/// bring the edited tensors to the grid the file will store them in (`opts.grid`), then run
/// the stop rule's check once. Weights past the perplexity bound are never returned: the
/// model comes back unchanged, with a warning.
///
/// The key covariance C is the model's own (ROME's self-sampled statistics, cached under the
/// model's fingerprint, so the first request on a new model computes them).
///
/// # Errors
/// Subject not in a prompt, a singular covariance, a non-finite loss, tensor errors.
pub fn train(
    model: &Model,
    req: &Request,
    layers: &[usize],
    forget: &[Example],
    retain: &[Example],
    opts: &Options<'_>,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<TrainLog> {
    let p = &req.method.rewrite;
    let answers = teacher_answers(
        model,
        super::run::teacher_model(req, opts),
        &req.subject,
        forget,
        p.say_tokens,
    )?;
    let terms = terms(&answers, &req.subject, forget, retain);
    // The defaults are ROME's (200 x 128 self-sampled, seed 0), so the cache is shared.
    let spec = StatsSpec::default();
    let stats =
        load_or_compute_layers(model, &model.fingerprint()?, &spec, layers, &mut |_, _| {})?;
    let t_train = std::time::Instant::now();
    let mut m = model.clone();
    let mut losses = Vec::new();
    let mut names = Vec::new();
    for (i, (&l, s)) in layers.iter().zip(&stats).enumerate() {
        let (applied, info) = rewrite_layer(&mut m, &req.subject, &terms, l, &s.cholesky()?, p)?;
        tracing::info!("rewrite: {info:?}");
        let loss = info.say_nll + p.avoid_weight * info.avoid + p.keep_weight * info.keep_nll;
        losses.push(loss);
        names.push(applied.name);
        progress(i + 1, layers.len(), loss);
    }
    if opts.grid.is_some() {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        crate::model::quant::requantize_edited(&mut m, &names)?;
    }
    let train_seconds = t_train.elapsed().as_secs_f64();
    let ratio =
        perplexity(&m, opts.suite, GUARD_TEXTS)? / perplexity(model, opts.suite, GUARD_TEXTS)?;
    let baseline = opts.baseline();
    let qb = quick_baseline(model, baseline, &req.subject, &req.secrets, forget)?;
    let leaks = quick_check(&m, &qb, &super::run::audit_params(req))?;
    let forget_tok = tokenize(&m, forget, MAX_LEN)?;
    let history = vec![StopCheck {
        step: layers.len(),
        loss: losses.last().copied().unwrap_or(0.0),
        forget_logprob: mean_token_logprob(&m, &forget_tok)?,
        leaks,
        perplexity_ratio: ratio,
    }];
    let mut warnings = Vec::new();
    let (out, stop_reason, final_ratio) = if ratio > req.max_perplexity_ratio {
        warnings.push(format!(
            "the rewrite raised general-text perplexity to {ratio:.3}x the original, past the allowed {:.3}x: the model is returned unchanged",
            req.max_perplexity_ratio
        ));
        (model.clone(), StopReason::PerplexityBound, 1.0)
    } else if leaks.passes() {
        (m, StopReason::AllSecretsPass, ratio)
    } else {
        (m, StopReason::StepBudget, ratio)
    };
    Ok(TrainLog {
        model: out,
        trained_params: layers.len() * model.config.d_model * model.config.d_mlp,
        losses,
        history,
        stop_reason,
        warnings,
        final_guard_ratio: final_ratio,
        // The search and the update are all training here.
        setup_seconds: 0.0,
        train_seconds,
    })
}
