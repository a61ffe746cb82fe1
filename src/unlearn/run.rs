//! The unlearning run: train on a removal request's forget (and retain) sets with its method,
//! check leakage and general-text perplexity every few steps, stop as soon as every secret
//! passes or the budget runs out, never return weights past the perplexity bound, and report
//! everything before, after, and after re-quantization.

use super::leakage::{self, ProbeParams, SecretLeak, Utility};
use super::losses::{self, StepInputs};
use super::request::{MethodName, Request};
use super::{
    answer_logp, answer_logp_with, example_logprobs, finite_loss, mean_token_logprob, tokenize,
    Batches, Example, Trainable,
};
use crate::error::Result;
use crate::eval::metrics::{locality, run_suite, text_nll, Locality, Suite};
use crate::model::Model;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use std::path::Path;

/// Rows are cut to this many tokens.
const MAX_LEN: usize = 160;
/// Exposure candidates used by the stop rule's quick checks (the report uses the request's).
const QUICK_CANDIDATES: usize = 100;
/// General texts used by the stop rule's perplexity guard (the report uses all of them).
const GUARD_TEXTS: usize = 8;

/// Leakage and utility of one model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelCheck {
    pub secrets: Vec<SecretLeak>,
    pub retain: Utility,
    /// Perplexity on the suite's general texts.
    pub perplexity: f64,
    /// True when no secret leaks ([`SecretLeak::leaks`]).
    pub all_pass: bool,
}

/// One stop-rule check during training.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Checkpoint {
    pub step: usize,
    pub loss: f64,
    /// Mean token log-prob of the forget answers.
    pub forget_logprob: f64,
    /// Greedy leaks over all probe prompts, and secrets ranked first among the quick candidates.
    pub greedy_leaks: usize,
    pub rank_one: usize,
    pub perplexity_ratio: f64,
}

/// Leakage after re-quantization.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Requantized {
    pub dtype: String,
    pub check: ModelCheck,
    /// True when some secret passes in f32 but leaks again after re-quantization.
    pub leaks_again: bool,
    /// Labels of the secrets that leak again.
    pub leaking: Vec<String>,
}

/// The report of an unlearning run. With `--json` it carries every number.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnlearnReport {
    pub subject: String,
    pub method: super::request::Method,
    pub layers: Vec<usize>,
    pub trained_params: usize,
    pub forget_examples: usize,
    pub retain_examples: usize,
    pub steps: usize,
    pub losses: Vec<f64>,
    /// `all secrets pass`, `step budget`, or `perplexity bound`.
    pub stop_reason: String,
    pub history: Vec<Checkpoint>,
    pub before: ModelCheck,
    pub after: ModelCheck,
    pub requantized: Option<Requantized>,
    pub max_perplexity_ratio: f64,
    /// The guard's perplexity ratio (first texts of the suite) of the returned weights.
    pub final_guard_ratio: f64,
    /// KL and top-1 agreement on the suite's unrelated prompts, and perplexity.
    pub locality: Locality,
    pub warnings: Vec<String>,
    pub train_seconds: f64,
    pub seconds: f64,
}

/// Options that are not part of the request.
pub struct Options<'a> {
    pub suite: &'a Suite,
    /// Re-quantize the result to this type and probe again (`None`: skip).
    pub requant: Option<GgmlDType>,
}

/// Every 2-D weight quantized to `dtype` and back, as a GGUF file of that type would load.
pub fn requantize(model: &Model, dtype: GgmlDType) -> Result<Model> {
    let mut m = model.clone();
    for (name, t) in model.weights.iter() {
        if t.rank() == 2 && t.dim(1)? % dtype.block_size() == 0 {
            let q = QTensor::quantize(t, dtype)?;
            m.weights.insert(name.clone(), q.dequantize(&model.device)?);
        }
    }
    Ok(m)
}

/// Perplexity on the suite's first `n` general texts.
fn perplexity(model: &Model, suite: &Suite, n: usize) -> Result<f64> {
    let nll = text_nll(model, &suite.texts[..n.min(suite.texts.len())])?;
    Ok((nll.iter().sum::<f64>() / nll.len().max(1) as f64).exp())
}

/// Full leakage and utility check of a model.
pub fn check(
    model: &Model,
    req: &Request,
    forget: &[Example],
    retain: &[Example],
    suite: &Suite,
) -> Result<ModelCheck> {
    let pp = ProbeParams {
        candidates: req.exposure_candidates,
        samples: req.samples,
        seed: req.seed,
    };
    let t = std::time::Instant::now();
    let secrets = req
        .secrets
        .iter()
        .map(|s| leakage::probe_secret(model, s, forget, &pp))
        .collect::<Result<Vec<_>>>()?;
    let t_probe = t.elapsed().as_secs_f64();
    let retain = leakage::utility(model, retain, 64)?;
    let t_retain = t.elapsed().as_secs_f64() - t_probe;
    let perplexity = perplexity(model, suite, usize::MAX)?;
    tracing::info!(
        "check: probes {t_probe:.1} s, retain {t_retain:.1} s, perplexity {:.1} s",
        t.elapsed().as_secs_f64() - t_probe - t_retain
    );
    Ok(ModelCheck {
        all_pass: secrets.iter().all(|s| !s.leaks()),
        secrets,
        retain,
        perplexity,
    })
}

/// The stop rule's quick leakage check: greedy extraction on every probe prompt, and whether
/// the secret ranks first among [`QUICK_CANDIDATES`] candidates. It probes the f32 model;
/// the re-quantized model is probed once, in the report (checking it at every step would
/// double the cost, and small updates often cannot pass it at all, see the README).
fn quick_leaks(model: &Model, req: &Request, forget: &[Example]) -> Result<(usize, usize)> {
    let (mut greedy, mut first) = (0, 0);
    for s in &req.secrets {
        let value = s.value.trim();
        let prompts = leakage::probe_prompts(s, forget);
        greedy += leakage::greedy_probes(model, value, &prompts)?
            .iter()
            .filter(|o| leakage::reveals(o, value))
            .count();
        // The first probe is the first eliciting prompt.
        let eliciting = &prompts[0].0;
        if leakage::exposure(model, eliciting, value, QUICK_CANDIDATES, req.seed)?.rank == 1 {
            first += 1;
        }
    }
    Ok((greedy, first))
}

/// Run a removal request on `model`; returns the unlearned model and the report. The input
/// model is not changed.
///
/// `progress(step, steps, loss)` is called after every step.
///
/// # Errors
/// Bad layers ([`crate::Error::Spec`]), a diverging loss ([`crate::Error::NonFinite`]).
pub fn unlearn(
    model: &Model,
    req: &Request,
    req_path: &Path,
    opts: &Options<'_>,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<(Model, UnlearnReport)> {
    let start = std::time::Instant::now();
    let layers = req.layers(req_path, model.config.n_layers)?;
    let forget = req.forget_examples()?;
    let retain = req.retain_examples()?;
    let before = check(model, req, &forget, &retain, opts.suite)?;
    let ppl0 = before.perplexity;

    let log = train(model, req, &layers, &forget, &retain, opts, progress)?;
    let out = log.model;
    let mut warnings = log.warnings;
    let after = check(&out, req, &forget, &retain, opts.suite)?;
    if !after.all_pass {
        warnings.push("some secrets still leak after unlearning (see the table)".into());
    }
    if after.perplexity / ppl0 > req.max_perplexity_ratio {
        warnings.push(format!(
            "general-text perplexity is {:.3}x the original, past the allowed {:.3}x",
            after.perplexity / ppl0,
            req.max_perplexity_ratio
        ));
    }
    let requantized = match opts.requant {
        None => None,
        Some(dt) => {
            let q = requantize(&out, dt)?;
            let c = check(&q, req, &forget, &retain, opts.suite)?;
            let leaking: Vec<String> = after
                .secrets
                .iter()
                .zip(&c.secrets)
                .filter(|(a, b)| !a.leaks() && b.leaks())
                .map(|(_, b)| b.label.clone())
                .collect();
            if !leaking.is_empty() {
                warnings.push(format!(
                    "re-quantization to {dt:?} brings back: {}",
                    leaking.join(", ")
                ));
            }
            Some(Requantized {
                dtype: format!("{dt:?}"),
                leaks_again: !leaking.is_empty(),
                leaking,
                check: c,
            })
        }
    };
    // KL and agreement on the prompts; the texts' perplexities are the checks' own.
    let prompts_only = Suite {
        prompts: opts.suite.prompts.clone(),
        texts: vec![],
    };
    let mut loc = locality(
        &run_suite(model, &prompts_only)?,
        &run_suite(&out, &prompts_only)?,
    )?;
    loc.perplexity_base = before.perplexity;
    loc.perplexity_edited = after.perplexity;
    Ok((
        out,
        UnlearnReport {
            subject: req.subject.clone(),
            method: req.method.clone(),
            layers,
            trained_params: log.trained_params,
            forget_examples: forget.len(),
            retain_examples: retain.len(),
            steps: log.losses.len(),
            losses: log.losses,
            stop_reason: log.stop_reason,
            history: log.history,
            before,
            after,
            requantized,
            max_perplexity_ratio: req.max_perplexity_ratio,
            final_guard_ratio: log.final_guard_ratio,
            locality: loc,
            warnings,
            train_seconds: log.train_seconds,
            seconds: start.elapsed().as_secs_f64(),
        },
    ))
}

/// What [`train`] did.
pub struct TrainLog {
    pub model: Model,
    pub trained_params: usize,
    pub losses: Vec<f64>,
    pub history: Vec<Checkpoint>,
    pub stop_reason: String,
    pub warnings: Vec<String>,
    /// The guard's perplexity ratio of the returned weights.
    pub final_guard_ratio: f64,
    pub train_seconds: f64,
}

/// The unlearning loop alone: AdamW on the request's objective, with the stop rule (every
/// secret passes the quick leakage checks; a request without secrets runs its budget) and the
/// perplexity guard (weights past the bound are never returned).
///
/// # Errors
/// Bad layers, a diverging loss ([`crate::Error::NonFinite`]).
pub fn train(
    model: &Model,
    req: &Request,
    layers: &[usize],
    forget: &[Example],
    retain: &[Example],
    opts: &Options<'_>,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<TrainLog> {
    let guard0 = perplexity(model, opts.suite, GUARD_TEXTS)?;
    let tr = Trainable::new(model, layers)?;
    let ft = tokenize(model, forget, MAX_LEN)?;
    let rt = tokenize(model, retain, MAX_LEN)?;
    // NPO's reference log-likelihoods: the model before unlearning, computed once.
    let ref_sums: Vec<f32> = example_logprobs(model, &ft)?
        .0
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let mut opt = AdamW::new(
        tr.vars.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW {
            lr: req.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut fb = Batches::new(ft.len(), req.batch_size, req.seed);
    let mut rb = Batches::new(rt.len().max(1), req.batch_size, req.seed + 1);
    let uses_retain = req.method.name != MethodName::Ga && req.method.retain_weight > 0.0;
    let uses_kl = req.method.kl_weight > 0.0 && !rt.is_empty();

    let mut losses = Vec::new();
    let mut history = Vec::new();
    let mut warnings = Vec::new();
    let mut last_good = tr.snapshot()?;
    // The guard ratio of `last_good`: the weights before training are the reference itself.
    let mut last_good_ratio = 1.0;
    let mut stop_reason = "step budget".to_string();
    let t_train = std::time::Instant::now();
    for step in 1..=req.steps {
        let fi = fb.next_batch();
        let fsub = ft.subset(&fi);
        let (fs, fc) = answer_logp(&tr.model, tr.lowest, &fsub)?.sums()?;
        let fref = Tensor::new(super::pick(&ref_sums, &fi).as_slice(), &model.device)?;
        let mut retain_part = None;
        let mut kl = None;
        if (uses_retain || uses_kl) && !rt.is_empty() {
            let ri = rb.next_batch();
            let rsub = rt.subset(&ri);
            let cur = answer_logp(&tr.model, tr.lowest, &rsub)?;
            if uses_kl {
                let reference = answer_logp_with(model, 0, &rsub, false)?;
                kl = Some(losses::kl_rows(&reference.logp, &cur.logp)?);
            }
            retain_part = Some(cur.sums()?);
        }
        let loss = losses::loss(
            &req.method,
            &StepInputs {
                forget_sums: &fs,
                forget_counts: &fc,
                forget_ref_sums: &fref,
                retain: retain_part.as_ref().map(|(s, c)| (s, c.as_slice())),
                retain_kl: kl.as_ref(),
            },
        )?;
        let v = finite_loss("unlearning loss", loss.to_scalar::<f32>()? as f64)?;
        opt.backward_step(&loss)?;
        losses.push(v);
        progress(step, req.steps, v);

        if step % req.check_every == 0 || step == req.steps {
            let m = tr.export(model)?;
            let ratio = perplexity(&m, opts.suite, GUARD_TEXTS)? / guard0;
            let flp = mean_token_logprob(&m, &ft)?;
            let t = std::time::Instant::now();
            let (greedy, first) = if ratio > req.max_perplexity_ratio {
                (0, 0)
            } else {
                quick_leaks(&m, req, forget)?
            };
            tracing::info!(
                "step {step}: quick leakage check {:.1} s, greedy leaks {greedy}, rank one {first}, perplexity ratio {ratio:.3}",
                t.elapsed().as_secs_f64()
            );
            history.push(Checkpoint {
                step,
                loss: v,
                forget_logprob: flp,
                greedy_leaks: greedy,
                rank_one: first,
                perplexity_ratio: ratio,
            });
            if ratio > req.max_perplexity_ratio {
                tr.restore(&last_good)?;
                warnings.push(format!(
                    "general-text perplexity rose to {ratio:.3}x the original at step {step}, past the allowed {:.3}x: stopped and kept the last checked weights within the bound",
                    req.max_perplexity_ratio
                ));
                stop_reason = "perplexity bound".into();
                break;
            }
            last_good = tr.snapshot()?;
            last_good_ratio = ratio;
            if !req.secrets.is_empty() && greedy == 0 && first == 0 {
                stop_reason = "all secrets pass".into();
                break;
            }
        }
    }
    let train_seconds = t_train.elapsed().as_secs_f64();
    // The run always ends on a check (the last step is one), so the returned weights are the
    // last accepted check's and their guard ratio is already known.
    let out = tr.export(model)?;
    Ok(TrainLog {
        model: out,
        trained_params: tr.n_params(),
        losses,
        history,
        stop_reason,
        warnings,
        final_guard_ratio: last_good_ratio,
        train_seconds,
    })
}
