//! The unlearning run: train on a removal request's forget (and retain) sets with its method,
//! check leakage and general-text perplexity every few steps, stop as soon as every secret
//! passes or the budget runs out, never return weights past the perplexity bound, and report
//! everything before, after, after re-quantization and after a relearning attack, each
//! against a reference state (audit.rs).

use super::audit::{
    audit_model, is_verdict_row, quick_baseline, quick_check, AuditParams, AuditReport, Baseline,
    QuickCheck,
};
use super::grid_descent::GridDescent;
use super::leakage::{self, Utility};
use super::learn::{learn, LearnParams};
use super::losses::{self, StepInputs};
use super::request::{MethodName, Optimizer as Update, Request};
use super::rmu::Rmu;
use super::{
    answer_logp, answer_logp_with, example_logprobs, finite_loss, mean_token_logprob, tokenize,
    Batches, Example, Trainable,
};
use crate::error::Result;
use crate::eval::metrics::{locality, run_suite, text_nll, Locality, Suite};
use crate::model::quant::DeployType;
use crate::model::Model;
use candle_core::Tensor;
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use std::path::Path;

/// Rows are cut to this many tokens.
pub(crate) const MAX_LEN: usize = 160;
/// General texts used by the stop rule's perplexity guard (the report uses all of them).
pub(crate) const GUARD_TEXTS: usize = 8;

/// Utility of one model: the retain set and general text.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelCheck {
    pub retain: Utility,
    /// Perplexity on the suite's general texts.
    pub perplexity: f64,
}

/// One stop-rule check during training.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StopCheck {
    pub step: usize,
    pub loss: f64,
    /// Mean token log-prob of the forget answers.
    pub forget_logprob: f64,
    /// The quick leakage check (greedy, partial and log-prob tests against the baseline).
    pub leaks: QuickCheck,
    pub perplexity_ratio: f64,
}

/// Why the unlearning loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Every secret passed the stop rule's check.
    AllSecretsPass,
    /// The step budget ran out.
    StepBudget,
    /// General-text perplexity passed the bound; the last checked weights within it are kept.
    PerplexityBound,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::AllSecretsPass => "all secrets pass",
            StopReason::StepBudget => "step budget",
            StopReason::PerplexityBound => "perplexity bound",
        })
    }
}

/// The relearning attack's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Relearn {
    pub steps: usize,
    pub lr: f64,
    /// Fine-tuning examples (the request's retain records).
    pub examples: usize,
    /// Labels of the secrets that leak again after relearning (the `relearned` audit row).
    pub back: Vec<String>,
    pub seconds: f64,
}

/// The report of an unlearning run. With `--json` it carries every number.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnlearnReport {
    pub subject: String,
    pub method: super::request::Method,
    pub layers: Vec<usize>,
    pub trained_params: usize,
    /// The grid training ran through (`input`: the input file's types), if any.
    pub grid: Option<String>,
    pub forget_examples: usize,
    pub retain_examples: usize,
    pub steps: usize,
    pub losses: Vec<f64>,
    pub stop_reason: StopReason,
    pub history: Vec<StopCheck>,
    pub before: ModelCheck,
    pub after: ModelCheck,
    /// Every leakage verdict: rows `reference`, `before`, `model` (the result), `model @ TYPE`
    /// per audited type, and `relearned` when the relearning check ran.
    pub audit: AuditReport,
    pub relearn: Option<Relearn>,
    pub max_perplexity_ratio: f64,
    /// The guard's perplexity ratio (first texts of the suite) of the returned weights.
    pub final_guard_ratio: f64,
    /// KL and top-1 agreement on the suite's unrelated prompts, and perplexity, against the
    /// model before unlearning.
    pub locality: Locality,
    pub warnings: Vec<String>,
    /// Before the first step: the guard's perplexity, the anchor texts, the grid-descent
    /// Fisher, the teacher's targets and the stop rule's baseline.
    pub setup_seconds: f64,
    pub train_seconds: f64,
    pub relearn_seconds: f64,
    pub audit_seconds: f64,
    pub seconds: f64,
}

/// Options that are not part of the request.
pub struct Options<'a> {
    pub suite: &'a Suite,
    /// Audit the result re-quantized to these types too.
    pub types: Vec<DeployType>,
    /// Train through this type's grid (quantization-aware, see `Trainable::sync`).
    pub grid: Option<DeployType>,
    /// The model that never learned the data, and its name (`None`: calibrated baseline).
    pub reference: Option<(&'a Model, &'a str)>,
}

impl Options<'_> {
    /// The stop rule's baseline: the reference model, or the calibrated stand-ins without one.
    pub fn baseline(&self) -> Baseline<'_> {
        match self.reference {
            Some((r, n)) => Baseline::Reference(r, n),
            None => Baseline::Calibrated,
        }
    }
}

/// Perplexity on the suite's first `n` general texts.
pub(crate) fn perplexity(model: &Model, suite: &Suite, n: usize) -> Result<f64> {
    let nll = text_nll(model, &suite.texts[..n.min(suite.texts.len())])?;
    Ok((nll.iter().sum::<f64>() / nll.len().max(1) as f64).exp())
}

/// Retain-set utility and general-text perplexity of a model.
pub fn check(model: &Model, retain: &[Example], suite: &Suite) -> Result<ModelCheck> {
    Ok(ModelCheck {
        retain: leakage::utility(model, retain, 64)?,
        perplexity: perplexity(model, suite, usize::MAX)?,
    })
}

/// The audit's thresholds and probe counts for a request.
pub fn audit_params(req: &Request) -> AuditParams {
    AuditParams::new(req.exposure_candidates, req.samples, req.seed)
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
    let before = check(model, &retain, opts.suite)?;
    let ppl0 = before.perplexity;
    let lap = |what: &str| {
        tracing::info!(
            "unlearn: {what} done at {:.1} s",
            start.elapsed().as_secs_f64()
        )
    };
    lap("retain and perplexity check before");

    let log = train(model, req, &layers, &forget, &retain, opts, progress)?;
    let out = log.model;
    let mut warnings = log.warnings;
    lap("training");
    let after = check(&out, &retain, opts.suite)?;
    lap("retain and perplexity check after");
    if after.perplexity / ppl0 > req.max_perplexity_ratio {
        warnings.push(format!(
            "general-text perplexity is {:.3}x the original, past the allowed {:.3}x",
            after.perplexity / ppl0,
            req.max_perplexity_ratio
        ));
    }
    // The relearning attack: an attacker fine-tunes the released model in f32 on public text
    // about the subject and general facts (the retain records), never the secrets.
    let t_relearn = std::time::Instant::now();
    let relearned = match (&req.relearn_check, retain.is_empty()) {
        (Some(rc), false) => {
            let mut lp = LearnParams::defaults(model.config.n_layers);
            // The attacker is not bound to the layers the method changed: a rewrite touches
            // one MLP, the attack fine-tunes every layer.
            lp.layers = if req.method.name == MethodName::Rewrite {
                (0..model.config.n_layers).collect()
            } else {
                layers.clone()
            };
            lp.steps = rc.steps;
            lp.lr = rc.lr;
            lp.batch_size = req.batch_size;
            lp.target_loss = 0.0;
            lp.seed = req.seed;
            let (m, _) = learn(&out, &retain, &lp, &mut |_, _| {})?;
            Some((m, rc.clone()))
        }
        (Some(_), true) => {
            warnings.push("relearn_check needs retain records; skipped".into());
            None
        }
        (None, _) => None,
    };
    let relearn_seconds = t_relearn.elapsed().as_secs_f64();
    lap("relearning");
    let mut extra: Vec<(String, &Model)> = vec![("before".into(), model)];
    if let Some((m, _)) = &relearned {
        extra.push(("relearned".into(), m));
    }
    let audit = audit_model(
        &out,
        opts.reference,
        req,
        &opts.types,
        &extra,
        &audit_params(req),
    )?;
    lap("audit");
    for row in audit.rows.iter().filter(|r| is_verdict_row(&r.name)) {
        let leaking: Vec<&str> = row
            .secrets
            .iter()
            .filter(|s| s.leaks)
            .map(|s| s.label.as_str())
            .collect();
        if !leaking.is_empty() {
            warnings.push(format!("{}: still leaks: {}", row.name, leaking.join(", ")));
        }
    }
    let relearn = relearned.map(|(_, rc)| {
        let back: Vec<String> = audit
            .rows
            .iter()
            .find(|r| r.name == "relearned")
            .map(|r| {
                r.secrets
                    .iter()
                    .filter(|s| s.leaks)
                    .map(|s| s.label.clone())
                    .collect()
            })
            .unwrap_or_default();
        if !back.is_empty() {
            warnings.push(format!(
                "relearning ({} steps on the retain records) brings back: {}",
                rc.steps,
                back.join(", ")
            ));
        }
        Relearn {
            steps: rc.steps,
            lr: rc.lr,
            examples: retain.len(),
            back,
            seconds: relearn_seconds,
        }
    });
    // KL and agreement on the prompts; the texts' perplexities are the checks' own.
    let prompts_only = Suite {
        prompts: opts.suite.prompts.clone(),
        texts: vec![],
    };
    let mut loc = locality(
        &run_suite(model, &prompts_only)?,
        &run_suite(&out, &prompts_only)?,
    )?;
    lap("locality");
    loc.perplexity_base = before.perplexity;
    loc.perplexity_edited = after.perplexity;
    Ok((
        out,
        UnlearnReport {
            subject: req.subject.clone(),
            method: req.method.clone(),
            layers,
            trained_params: log.trained_params,
            grid: opts.grid.map(|g| g.name().to_string()),
            forget_examples: forget.len(),
            retain_examples: retain.len(),
            steps: log.losses.len(),
            losses: log.losses,
            stop_reason: log.stop_reason,
            history: log.history,
            before,
            after,
            audit_seconds: audit.seconds,
            audit,
            relearn,
            max_perplexity_ratio: req.max_perplexity_ratio,
            final_guard_ratio: log.final_guard_ratio,
            locality: loc,
            warnings,
            setup_seconds: log.setup_seconds,
            train_seconds: log.train_seconds,
            relearn_seconds,
            seconds: start.elapsed().as_secs_f64(),
        },
    ))
}

/// Anchor texts per step.
const ANCHOR_BATCH: usize = 4;
/// Prompt-anchor examples per step.
const PROMPT_ANCHOR_BATCH: usize = 8;
/// Tokens per anchor text.
pub(crate) const ANCHOR_TOKENS: usize = 48;

/// Tokens of the teacher's own continuation of a forget prompt.
const TEACHER_TOKENS: usize = 16;

/// Examples with fixed next-token distributions to pull the model towards: KL(target ||
/// model) at every answer position of a batch. The locality anchor ([`KlTargets::anchor`])
/// and the distillation teacher ([`KlTargets::teacher`]) are its two sources.
pub(crate) struct KlTargets {
    pub(crate) examples: super::Tokenized,
    /// Per example: `[answer tokens, vocab]` target log-probs.
    logp: Vec<Tensor>,
}

impl KlTargets {
    /// KL(target || model) over the answer positions of the next batch of examples.
    pub(crate) fn kl(&self, tr: &Trainable, batches: &mut Batches) -> Result<Tensor> {
        let idx = batches.next_batch();
        let cur = answer_logp(&tr.model, tr.lowest, &self.examples.subset(&idx))?;
        let refs: Vec<&Tensor> = idx.iter().map(|&i| &self.logp[i]).collect();
        losses::kl_rows(&Tensor::cat(&refs, 0)?, &cur.logp)
    }

    pub(crate) fn len(&self) -> usize {
        self.examples.len()
    }

    /// The model's own behaviour on `prompts`: its greedy continuation of each, `tokens`
    /// long, with its log-probabilities at every answer position (the first of which is the
    /// next-token distribution a locality check compares). `learn --keep` pulls towards it so
    /// that the data's answer style does not spread to other prompts.
    pub(crate) fn own_answers(
        model: &Model,
        prompts: &[String],
        tokens: usize,
    ) -> Result<KlTargets> {
        let answers = leakage::greedy(model, prompts, tokens)?;
        let pairs = prompts
            .iter()
            .cloned()
            .zip(answers)
            .filter(|(_, a)| !a.trim().is_empty())
            .collect();
        KlTargets::from_pairs(model, model, None, pairs)
    }

    /// The locality anchor: texts the model before unlearning samples itself, with its
    /// log-probabilities at every position. A step adds KL(before || now) on a few of them, so
    /// the update is pushed to leave ordinary text alone. (Not in NPO's paper, whose retain
    /// term is the NLL of a retain set; this is the KL-on-retain variant of open-unlearning's
    /// `NPO` with `retain_loss_type: KL`, on self-sampled text instead of a data set, as our
    /// key statistics use.)
    fn anchor(model: &Model, n: usize, seed: u64) -> Result<KlTargets> {
        let texts = super::sample_texts(model, n, ANCHOR_TOKENS, seed)?;
        let mut reference = Vec::with_capacity(n);
        for i in 0..texts.len() {
            reference.push(answer_logp_with(model, 0, &texts.subset(&[i]), false)?.logp);
        }
        Ok(KlTargets {
            examples: texts,
            logp: reference,
        })
    }

    /// The distillation teacher (`method: distill`): what a model that never learned the data
    /// predicts on the forget prompts. Its examples are each forget example (the secret's path,
    /// so the secret's likelihood falls to the teacher's) and the teacher's own greedy
    /// continuation of each forget prompt (its path, so the answer reads like the teacher's).
    ///
    /// The teacher is the reference model, or without one the model before unlearning with the
    /// subject's name replaced by a stand-in: the generic prediction of Eldan & Russinovich
    /// 2023, "Who's Harry Potter?" (arXiv 2310.02238, section 3), who get it by replacing the
    /// anchored terms with generic ones. They fine-tune on the generic predictions as labels; we
    /// minimise KL(teacher || model) over the whole next-token distribution, which keeps the
    /// teacher's uncertainty (our departure).
    fn teacher(
        model: &Model,
        reference: Option<&Model>,
        subject: &str,
        forget: &[Example],
    ) -> Result<KlTargets> {
        let (teacher, swap) = teacher_of(model, reference, subject);
        let mut pairs: Vec<(String, String)> = forget
            .iter()
            .map(|e| (e.prompt.clone(), e.answer.clone()))
            .collect();
        for (e, c) in forget.iter().zip(teacher_answers(
            model,
            reference,
            subject,
            forget,
            TEACHER_TOKENS,
        )?) {
            if !c.trim().is_empty() {
                pairs.push((e.prompt.clone(), c));
            }
        }
        KlTargets::from_pairs(model, teacher, swap, pairs)
    }

    /// Targets for `(prompt, answer)` pairs: the teacher's log-probs at the answer positions,
    /// the teacher reading the prompt with `swap` applied.
    fn from_pairs(
        model: &Model,
        teacher: &Model,
        swap: Option<(&str, &str)>,
        pairs: Vec<(String, String)>,
    ) -> Result<KlTargets> {
        let tok = model.tok()?;
        let sw = |p: &str| match swap {
            Some((a, b)) => p.replace(a, b),
            None => p.to_string(),
        };
        let (mut rows, mut spans, mut logp) = (Vec::new(), Vec::new(), Vec::new());
        for (prompt, answer) in pairs {
            let (p, a) = tok.continuation(&prompt, &answer)?;
            // The teacher reads its own prompt (swapped) followed by the same answer tokens,
            // so its answer positions line up with the model's.
            let tp = tok.encode(&sw(&prompt))?;
            let mut trow = tp.clone();
            trow.extend_from_slice(&a[..a.len() - 1]);
            let t = super::Tokenized {
                rows: vec![trow],
                spans: vec![(tp.len(), a.clone())],
            };
            logp.push(answer_logp_with(teacher, 0, &t, false)?.logp);
            let mut r = p.clone();
            r.extend_from_slice(&a[..a.len() - 1]);
            rows.push(r);
            spans.push((p.len(), a));
        }
        Ok(KlTargets {
            examples: super::Tokenized { rows, spans },
            logp,
        })
    }
}

/// The reference the request's teacher reads the forget prompts with (`None`: the model
/// itself with a stand-in's name, see [`teacher_of`]).
pub(crate) fn teacher_model<'a>(req: &Request, opts: &Options<'a>) -> Option<&'a Model> {
    match req.method.teacher {
        super::request::Teacher::Reference => opts.reference.map(|(m, _)| m),
        super::request::Teacher::StandIn => None,
    }
}

/// The teacher of the forget prompts and the name swap it reads them with: the reference
/// model, or without one the model itself with the subject replaced by a stand-in.
fn teacher_of<'a>(
    model: &'a Model,
    reference: Option<&'a Model>,
    subject: &'a str,
) -> (&'a Model, Option<(&'a str, &'a str)>) {
    match reference {
        Some(r) => (r, None),
        None => (model, Some((subject, super::audit::STAND_INS[0]))),
    }
}

/// The teacher's greedy continuation of each forget prompt, `tokens` tokens long (see
/// [`KlTargets::teacher`]); a stand-in's name in an answer goes back to the subject's.
pub(crate) fn teacher_answers(
    model: &Model,
    reference: Option<&Model>,
    subject: &str,
    forget: &[Example],
    tokens: usize,
) -> Result<Vec<String>> {
    let (teacher, swap) = teacher_of(model, reference, subject);
    let prompts: Vec<String> = forget
        .iter()
        .map(|e| match swap {
            Some((a, b)) => e.prompt.replace(a, b),
            None => e.prompt.clone(),
        })
        .collect();
    Ok(leakage::greedy(teacher, &prompts, tokens)?
        .into_iter()
        .map(|c| match swap {
            Some((a, b)) => c.replace(b, a),
            None => c,
        })
        .collect())
}

/// What [`train`] did.
pub struct TrainLog {
    pub model: Model,
    pub trained_params: usize,
    pub losses: Vec<f64>,
    pub history: Vec<StopCheck>,
    pub stop_reason: StopReason,
    pub warnings: Vec<String>,
    /// The guard's perplexity ratio of the returned weights.
    pub final_guard_ratio: f64,
    /// Before the first step (see [`UnlearnReport::setup_seconds`]), and the steps.
    pub setup_seconds: f64,
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
    if req.method.name == MethodName::Rewrite {
        return super::rewrite::train(model, req, layers, forget, retain, opts, progress);
    }
    let t_setup = std::time::Instant::now();
    let guard0 = perplexity(model, opts.suite, GUARD_TEXTS)?;
    let rmu = match req.method.name {
        MethodName::Rmu => Some(Rmu::new(model, layers, &req.method.rmu, req.seed)?),
        _ => None,
    };
    let mut tr = Trainable::new(model, layers)?;
    if rmu.is_some() {
        tr = tr.keep_only(super::rmu::trains)?;
    }
    let mut tr = tr.with_grid(opts.grid)?;
    if opts.grid.is_some() && req.optimizer != Update::Grid {
        tr.jitter(req.seed)?;
    }
    let forget_tok = tokenize(model, forget, MAX_LEN)?;
    let retain_tok = tokenize(model, retain, MAX_LEN)?;
    // NPO's reference log-likelihoods: the model before unlearning, computed once.
    let ref_sums: Vec<f32> = example_logprobs(model, &forget_tok)?
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
    let masks = match req.saliency {
        Some(frac) => Some(super::saliency_masks(&tr, &forget_tok, frac)?),
        None => None,
    };
    let anchor = if req.anchor_texts > 0 {
        Some(KlTargets::anchor(model, req.anchor_texts, req.seed)?)
    } else {
        None
    };
    let mut ab = Batches::new(req.anchor_texts.max(1), ANCHOR_BATCH, req.seed + 2);
    // The prompt anchor (`anchor_prompts`), without the locality suite's own prompts.
    let held_out: Vec<String> = req
        .anchor_prompt_list
        .iter()
        .filter(|p| {
            !opts
                .suite
                .prompts
                .iter()
                .any(|s| s.prompt.trim() == p.trim())
        })
        .cloned()
        .collect();
    let prompt_anchor = if held_out.is_empty() {
        None
    } else {
        Some(KlTargets::own_answers(
            model,
            &held_out,
            super::learn::KEEP_TOKENS,
        )?)
    };
    let mut pb = Batches::new(
        prompt_anchor.as_ref().map_or(1, KlTargets::len),
        PROMPT_ANCHOR_BATCH,
        req.seed + 4,
    );
    let grid_descent = match req.optimizer {
        Update::Grid => {
            let gd = GridDescent::new(&mut tr, req.crossings, req.lr)?;
            // The locality cost's Fisher covers both anchors' positions.
            let mut fisher_on: Option<super::Tokenized> =
                anchor.as_ref().map(|a| a.examples.clone());
            if let Some(p) = &prompt_anchor {
                let f = fisher_on.get_or_insert_with(|| super::Tokenized {
                    rows: vec![],
                    spans: vec![],
                });
                f.rows.extend(p.examples.rows.iter().cloned());
                f.spans.extend(p.examples.spans.iter().cloned());
            }
            Some(match fisher_on {
                Some(t) if req.anchor_weight > 0.0 && !t.is_empty() => {
                    gd.with_fisher(&tr, &t, req.anchor_weight)?
                }
                _ => gd,
            })
        }
        _ => None,
    };
    let teacher = if req.method.name == MethodName::Distill {
        Some(KlTargets::teacher(
            model,
            teacher_model(req, opts),
            &req.subject,
            forget,
        )?)
    } else {
        None
    };
    let mut db = Batches::new(
        teacher.as_ref().map_or(1, KlTargets::len),
        req.batch_size,
        req.seed + 3,
    );
    let mut fb = Batches::new(forget_tok.len(), req.batch_size, req.seed);
    let mut rb = Batches::new(retain_tok.len().max(1), req.batch_size, req.seed + 1);
    let uses_retain = req.method.name != MethodName::Ga && req.method.retain_weight > 0.0;
    let uses_kl = req.method.kl_weight > 0.0 && !retain_tok.is_empty();

    let mut losses = Vec::new();
    let mut history = Vec::new();
    let mut warnings = Vec::new();
    let mut last_good = tr.snapshot()?;
    // The guard ratio of `last_good`: the weights before training are the reference itself.
    let mut last_good_ratio = 1.0;
    let mut stop_reason = StopReason::StepBudget;
    let ap = audit_params(req);
    let baseline = opts.baseline();
    let qb = quick_baseline(model, baseline, &req.subject, &req.secrets, forget)?;
    let setup_seconds = t_setup.elapsed().as_secs_f64();
    let t_train = std::time::Instant::now();
    for step in 1..=req.steps {
        let fi = fb.next_batch();
        let loss = if let Some(rmu) = &rmu {
            // RMU's objective is on activations; its retain term needs a retain batch.
            let rsub = (uses_retain && !retain_tok.is_empty())
                .then(|| retain_tok.subset(&rb.next_batch()));
            rmu.loss(
                &tr,
                model,
                &forget_tok.subset(&fi),
                rsub.as_ref(),
                req.method.retain_weight,
            )?
        } else {
            let (fs, fc, forget_kl) = match &teacher {
                // Distillation: the forget part is the KL to the teacher on its own examples.
                Some(t) => {
                    let z = Tensor::zeros(fi.len(), candle_core::DType::F32, &model.device)?;
                    (z, vec![1; fi.len()], Some(t.kl(&tr, &mut db)?))
                }
                None => {
                    let (fs, fc) =
                        answer_logp(&tr.model, tr.lowest, &forget_tok.subset(&fi))?.sums()?;
                    (fs, fc, None)
                }
            };
            let fref = Tensor::new(super::pick(&ref_sums, &fi).as_slice(), &model.device)?;
            let mut retain_part = None;
            let mut kl = None;
            if (uses_retain || uses_kl) && !retain_tok.is_empty() {
                let ri = rb.next_batch();
                let rsub = retain_tok.subset(&ri);
                let cur = answer_logp(&tr.model, tr.lowest, &rsub)?;
                if uses_kl {
                    let reference = answer_logp_with(model, 0, &rsub, false)?;
                    kl = Some(losses::kl_rows(&reference.logp, &cur.logp)?);
                }
                retain_part = Some(cur.sums()?);
            }
            losses::loss(
                &req.method,
                &StepInputs {
                    forget_sums: &fs,
                    forget_counts: &fc,
                    forget_ref_sums: &fref,
                    retain: retain_part.as_ref().map(|(s, c)| (s, c.as_slice())),
                    retain_kl: kl.as_ref(),
                    forget_kl: forget_kl.as_ref(),
                },
            )?
        };
        let loss = match &anchor {
            Some(a) => (loss + (a.kl(&tr, &mut ab)? * req.anchor_weight)?)?,
            None => loss,
        };
        let loss = match &prompt_anchor {
            Some(a) => (loss + (a.kl(&tr, &mut pb)? * req.anchor_weight)?)?,
            None => loss,
        };
        let v = finite_loss("unlearning loss", loss.to_scalar::<f32>()? as f64)?;
        let mut grads = loss.backward()?;
        if let Some(masks) = &masks {
            super::apply_masks(&tr, &mut grads, masks)?;
        }
        match req.optimizer {
            Update::Adamw => opt.step(&grads)?,
            Update::Sgd => super::max_norm_step(&tr, &grads, req.lr)?,
            Update::Grid => {
                if let Some(gd) = &grid_descent {
                    gd.step(&mut tr, &grads)?;
                }
            }
        }
        tr.sync()?;
        losses.push(v);
        progress(step, req.steps, v);

        if step % req.check_every == 0 || step == req.steps {
            let m = tr.export(model)?;
            let ratio = perplexity(&m, opts.suite, GUARD_TEXTS)? / guard0;
            let flp = mean_token_logprob(&m, &forget_tok)?;
            let t = std::time::Instant::now();
            let leaks = if ratio > req.max_perplexity_ratio {
                QuickCheck::default()
            } else {
                quick_check(&m, &qb, &ap)?
            };
            tracing::info!(
                "step {step}: quick leakage check {:.1} s, {leaks:?}, perplexity ratio {ratio:.3}",
                t.elapsed().as_secs_f64()
            );
            history.push(StopCheck {
                step,
                loss: v,
                forget_logprob: flp,
                leaks,
                perplexity_ratio: ratio,
            });
            if ratio > req.max_perplexity_ratio {
                tr.restore(&last_good)?;
                warnings.push(format!(
                    "general-text perplexity rose to {ratio:.3}x the original at step {step}, past the allowed {:.3}x: stopped and kept the last checked weights within the bound",
                    req.max_perplexity_ratio
                ));
                stop_reason = StopReason::PerplexityBound;
                break;
            }
            last_good = tr.snapshot()?;
            last_good_ratio = ratio;
            if !req.secrets.is_empty() && leaks.passes() {
                stop_reason = StopReason::AllSecretsPass;
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
        setup_seconds,
        train_seconds,
    })
}
