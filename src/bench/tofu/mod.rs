//! The TOFU benchmark (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning"), with
//! open-unlearning's metrics ([`metrics`]), scaled to a 2-core CPU:
//!
//! 1. learn forget ∪ retain: the "finetuned" model;
//! 2. learn retain alone with the same settings and step budget: the "retain" model, which
//!    never saw the forget set, the reference of forget quality and privleak;
//! 3. unlearn the forget set from the finetuned model with each method;
//! 4. score every model (base, finetuned, retain, each unlearned) on the forget set, the
//!    holdout set (MIA), the retain set, real authors and world facts.
//!
//! Departures from open-unlearning, all stated in the README:
//! - Questions are shown as `Question: {q}\nAnswer:` ([`crate::unlearn::qa_prompt`]), not in a chat
//!   template; the same prompt is used to learn, unlearn and score.
//! - ROUGE-L is [`crate::unlearn::leakage::rouge_l_recall`]: lower-cased alphanumeric words, no
//!   stemmer (open-unlearning's `rouge_score` uses `use_stemmer=True`). Greedy answers stop
//!   at their first line break.
//! - The retain set is scored on its first `retain_eval_per_author` records per author (TOFU
//!   scores a separate 400-record `retain_perturbed` split).
//! - The ZLib score compresses the answer text (open-unlearning's target text).

pub mod metrics;

use crate::error::{Error, Result};
use crate::eval::metrics::Suite;
use crate::model::Model;
use crate::unlearn::learn::{learn, LearnParams, LearnReport};
use crate::unlearn::request::{LayerSel, Method, Request, DEFAULT_CROSSINGS};
use crate::unlearn::run::{train, Options, StopReason};
use crate::unlearn::{answer_logp_with, mean_example_logprob_each, tokenize, Example, Record};
use candle_core::{Tensor, D};
use metrics as m;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// One TOFU record as published (open-unlearning's `*_perturbed` splits): the question, its
/// answer, a paraphrase of the answer, wrong answers, a paraphrase of the question. Only
/// `question` and `answer` are always required; `author` (engram's files) selects authors.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TofuRecord {
    pub question: String,
    pub answer: String,
    #[serde(default)]
    pub paraphrased_answer: Option<String>,
    #[serde(default)]
    pub perturbed_answer: Vec<String>,
    #[serde(default)]
    pub paraphrased_question: Option<String>,
    #[serde(default)]
    pub author: Option<usize>,
}

/// TOFU's files have 20 records per author, in order.
pub const RECORDS_PER_AUTHOR: usize = 20;

/// Read TOFU records: a JSON array or JSON lines.
///
/// # Errors
/// [`Error::Io`], [`Error::Spec`] naming the file and the line (JSONL) or the parse position.
pub fn load_tofu(path: &Path) -> Result<Vec<TofuRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let spec = |message: String| Error::Spec {
        path: path.into(),
        message,
    };
    let recs: Vec<TofuRecord> = crate::data::from_json_records(path, &text)?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    if recs.is_empty() {
        return Err(spec("no records".into()));
    }
    for (i, r) in recs.iter().enumerate() {
        let fields = [("question", &r.question), ("answer", &r.answer)];
        for (f, t) in fields
            .into_iter()
            .chain(
                r.paraphrased_answer
                    .iter()
                    .map(|t| ("paraphrased_answer", t)),
            )
            .chain(r.perturbed_answer.iter().map(|t| ("perturbed_answer", t)))
        {
            if t.trim().is_empty() {
                return Err(spec(format!("record {}: `{f}` is empty", i + 1)));
            }
            crate::limits::text(&format!("record {}.{f}", i + 1), t)
                .map_err(|e| spec(e.to_string()))?;
        }
    }
    Ok(recs)
}

/// The records of `authors` (each record's `author`, else its index / 20); `None`: all.
pub fn select(recs: &[TofuRecord], authors: Option<&[usize]>) -> Vec<(usize, TofuRecord)> {
    recs.iter()
        .enumerate()
        .map(|(i, r)| (r.author.unwrap_or(i / RECORDS_PER_AUTHOR), r))
        .filter(|(a, _)| authors.is_none_or(|s| s.contains(a)))
        .map(|(a, r)| (a, r.clone()))
        .collect()
}

/// One input file and its author selection.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SetSpec {
    pub path: PathBuf,
    pub authors: Option<Vec<usize>>,
}

/// The evaluation sets, loaded and checked before any work.
pub struct TofuData {
    pub forget: Vec<TofuRecord>,
    /// Retain records with their author (the training set of the retain side).
    pub retain: Vec<(usize, TofuRecord)>,
    pub holdout: Vec<TofuRecord>,
    pub real_authors: Vec<TofuRecord>,
    pub world: Vec<TofuRecord>,
}

impl TofuData {
    /// Load and check every set: forget records need a paraphrased and perturbed answers
    /// (the truth ratio), world facts and real authors perturbed answers; forget, retain and
    /// holdout share no question.
    ///
    /// # Errors
    /// [`Error::Spec`] / [`Error::InvalidArgument`] naming the file or field (the CLI names its flag).
    pub fn load(
        forget: &SetSpec,
        retain: &SetSpec,
        holdout: Option<&SetSpec>,
        real_authors: Option<&Path>,
        world: &Path,
    ) -> Result<TofuData> {
        let pick = |s: &SetSpec, flag: &str| -> Result<Vec<(usize, TofuRecord)>> {
            let v = select(&load_tofu(&s.path)?, s.authors.as_deref());
            if v.is_empty() {
                return Err(Error::invalid(
                    flag,
                    format!("selects no records of {}", s.path.display()),
                ));
            }
            Ok(v)
        };
        let strip = |v: Vec<(usize, TofuRecord)>| v.into_iter().map(|x| x.1).collect::<Vec<_>>();
        let forget_v = strip(pick(forget, "forget_authors")?);
        let retain_v = pick(retain, "retain_authors")?;
        let holdout_v = match holdout {
            Some(h) => strip(pick(h, "holdout_authors")?),
            None => vec![],
        };
        let ra = match real_authors {
            Some(p) => load_tofu(p)?,
            None => vec![],
        };
        let wf = load_tofu(world)?;
        let need = |recs: &[TofuRecord], path: &Path, para: bool| -> Result<()> {
            for (i, r) in recs.iter().enumerate() {
                if r.perturbed_answer.is_empty() || (para && r.paraphrased_answer.is_none()) {
                    return Err(Error::Spec {
                        path: path.into(),
                        message: format!(
                            "record {} (\"{}\") lacks `{}`: the truth ratio needs it",
                            i + 1,
                            r.question,
                            if para {
                                "paraphrased_answer` or `perturbed_answer"
                            } else {
                                "perturbed_answer"
                            }
                        ),
                    });
                }
            }
            Ok(())
        };
        need(&forget_v, &forget.path, true)?;
        if let Some(p) = real_authors {
            need(&ra, p, false)?;
        }
        need(&wf, world, false)?;
        // Forget, retain and holdout must be disjoint: a question in two of them would make
        // the retain model a model that saw the forget set, or the holdout a member set.
        let sets: [(&str, Vec<&str>); 3] = [
            (
                "forget",
                forget_v.iter().map(|r| r.question.as_str()).collect(),
            ),
            (
                "retain",
                retain_v.iter().map(|r| r.1.question.as_str()).collect(),
            ),
            (
                "holdout",
                holdout_v.iter().map(|r| r.question.as_str()).collect(),
            ),
        ];
        for i in 0..3 {
            for j in i + 1..3 {
                let a: HashSet<&str> = sets[i].1.iter().copied().collect();
                if let Some(q) = sets[j].1.iter().find(|q| a.contains(*q)) {
                    return Err(Error::invalid(
                        format!("--{} / --{}", sets[i].0, sets[j].0),
                        format!("the sets must be disjoint; both hold the question \"{q}\""),
                    ));
                }
            }
        }
        Ok(TofuData {
            forget: forget_v,
            retain: retain_v,
            holdout: holdout_v,
            real_authors: ra,
            world: wf,
        })
    }

    /// The retain records that are scored: the first `per_author` of each author.
    pub fn retain_eval(&self, per_author: usize) -> Vec<TofuRecord> {
        let mut seen = BTreeMap::new();
        self.retain
            .iter()
            .filter(|(a, _)| {
                let c = seen.entry(*a).or_insert(0usize);
                *c += 1;
                *c <= per_author
            })
            .map(|x| x.1.clone())
            .collect()
    }
}

/// One method's settings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MethodRun {
    pub method: Method,
    pub layers: Vec<usize>,
    pub lr: f64,
}

/// What to run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TofuParams {
    pub forget: SetSpec,
    pub retain: SetSpec,
    pub holdout: Option<SetSpec>,
    pub real_authors: Option<PathBuf>,
    pub world: PathBuf,
    pub learn: LearnParams,
    pub methods: Vec<MethodRun>,
    pub steps: usize,
    pub batch_size: usize,
    pub max_perplexity_ratio: f64,
    /// Retain records per author that are scored.
    pub retain_eval_per_author: usize,
    /// Greedy answers are cut at this many tokens (ROUGE-L).
    pub max_new_tokens: usize,
    /// Min-K%'s k.
    pub min_k: f64,
    pub seed: u64,
}

/// MIA AUCs, forget (members) against holdout (non-members); 1: the forget answers look far
/// more familiar than the holdout ones.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MiaAuc {
    pub loss: f64,
    pub zlib: f64,
    pub min_k: f64,
    pub min_k_pp: f64,
}

/// A model's scores, open-unlearning's names in the comments.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Scores {
    /// `forget_Q_A_Prob`: mean of `exp(-mean token NLL)` of the answers.
    pub forget_prob: f64,
    /// `forget_Q_A_ROUGE`.
    pub forget_rouge: f64,
    /// `forget_truth_ratio`: mean(min(tr, 1/tr)), paraphrased vs perturbed answers.
    pub forget_truth_ratio: f64,
    /// `extraction_strength` on the forget answers.
    pub extraction_strength: f64,
    /// `mia_*`; absent without a holdout set.
    pub mia_auc: Option<MiaAuc>,
    /// `forget_quality`: KS p-value against the retain model's forget truth ratios.
    pub forget_quality: f64,
    /// `privleak` from the Min-K% AUC, relative to the retain model; absent without holdout.
    pub privleak: Option<f64>,
    /// `model_utility`: harmonic mean of the sub-metrics below that are present.
    pub model_utility: f64,
    /// Which sub-metrics went into `model_utility`.
    pub utility_metrics: Vec<String>,
    /// `retain_Q_A_Prob`, `retain_Q_A_ROUGE`, `retain_Truth_Ratio` (true-better).
    pub retain_prob: f64,
    pub retain_rouge: f64,
    pub retain_truth_ratio: f64,
    /// `ra_Q_A_Prob_normalised`, `ra_Q_A_ROUGE`, `ra_Truth_Ratio`; absent without the file.
    pub real_authors_prob: Option<f64>,
    pub real_authors_rouge: Option<f64>,
    pub real_authors_truth_ratio: Option<f64>,
    /// `wf_Q_A_Prob_normalised`, `wf_Q_A_ROUGE`, `wf_Truth_Ratio`.
    pub world_facts_prob: f64,
    pub world_facts_rouge: f64,
    pub world_facts_truth_ratio: f64,
    /// Per forget question: the truth ratio (what forget quality compares).
    pub forget_truth_ratios: Vec<f64>,
    /// Per forget and holdout question: the Min-K% score (what privleak compares).
    pub forget_min_k: Vec<f64>,
    pub holdout_min_k: Vec<f64>,
    pub seconds: f64,
}

/// One unlearning method's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MethodResult {
    pub run: MethodRun,
    pub scores: Scores,
    pub steps: usize,
    pub stop_reason: StopReason,
    pub warnings: Vec<String>,
    pub train_seconds: f64,
}

/// The benchmark's report (`--json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TofuReport {
    pub params: TofuParams,
    pub sizes: BTreeMap<String, usize>,
    pub base: Scores,
    pub finetuned: Scores,
    pub retain_model: Scores,
    pub methods: BTreeMap<String, MethodResult>,
    pub learn_finetuned: LearnReport,
    pub learn_retain: LearnReport,
    /// Wall seconds per phase, in order.
    pub phases: Vec<(String, f64)>,
    pub seconds: f64,
}

/// Teacher-forced statistics of one answer.
#[derive(Default)]
struct AnswerStats {
    /// Mean token NLL.
    nll: f64,
    /// Per token: log p(target), the greedy token, and mean / variance of log p under the
    /// model's own next-token distribution (Min-K%++).
    logp: Vec<f64>,
    argmax: Vec<u32>,
    targets: Vec<u32>,
    mu: Vec<f64>,
    var: Vec<f64>,
}

/// Per-token statistics of `examples`, 16 at a time.
fn answer_stats(model: &Model, examples: &[Example]) -> Result<Vec<AnswerStats>> {
    let toks = tokenize(model, examples, 256)?;
    let mut out = Vec::with_capacity(examples.len());
    for chunk in (0..toks.len()).collect::<Vec<_>>().chunks(16) {
        let a = answer_logp_with(model, 0, &toks.subset(chunk), false)?;
        let dev = a.logp.device();
        let tgt = Tensor::new(a.targets.as_slice(), dev)?.unsqueeze(1)?;
        let lp: Vec<f32> = a.logp.gather(&tgt, 1)?.squeeze(1)?.to_vec1()?;
        let am: Vec<u32> = a.logp.argmax(D::Minus1)?.to_vec1()?;
        let p = a.logp.exp()?;
        let mu_t = (&p * &a.logp)?.sum(D::Minus1)?;
        let e2: Vec<f32> = (&p * a.logp.sqr()?)?.sum(D::Minus1)?.to_vec1()?;
        let mu: Vec<f32> = mu_t.to_vec1()?;
        let mut per: Vec<AnswerStats> = (0..chunk.len()).map(|_| Default::default()).collect();
        for (j, &r) in a.seg.iter().enumerate() {
            let s = &mut per[r];
            s.logp.push(lp[j] as f64);
            s.argmax.push(am[j]);
            s.targets.push(a.targets[j]);
            s.mu.push(mu[j] as f64);
            s.var.push((e2[j] as f64 - (mu[j] as f64).powi(2)).max(0.0));
        }
        for s in &mut per {
            s.nll = -s.logp.iter().sum::<f64>() / s.logp.len().max(1) as f64;
        }
        out.extend(per);
    }
    Ok(out)
}

/// Mean token NLL of each example (no per-token detail).
fn mean_nlls(model: &Model, examples: &[Example]) -> Result<Vec<f64>> {
    let toks = tokenize(model, examples, 256)?;
    Ok(mean_example_logprob_each(model, &toks)?
        .into_iter()
        .map(|lp| -lp)
        .collect())
}

/// Mean token NLLs of each record's `correct` answer and of its perturbed answers. Each
/// question's prompt runs once, its keys and values serving all of its options
/// ([`crate::unlearn::leakage::candidate_scores`]).
fn option_nlls(
    model: &Model,
    recs: &[TofuRecord],
    correct: impl Fn(&TofuRecord) -> String,
) -> Result<Vec<(f64, Vec<f64>)>> {
    let tok = model.tok()?;
    let mut out = Vec::with_capacity(recs.len());
    for r in recs {
        let prompt = crate::unlearn::qa_prompt(&r.question);
        let mut opts = vec![correct(r)];
        opts.extend(r.perturbed_answer.iter().cloned());
        let opts: Vec<String> = opts
            .iter()
            .map(|o| format!(" {}", o.trim_start()))
            .collect();
        let sums = crate::unlearn::leakage::candidate_scores(model, &prompt, &opts)?;
        let mut nll = Vec::with_capacity(opts.len());
        for (s, o) in sums.iter().zip(&opts) {
            let n = tok.continuation(&prompt, o)?.1.len().max(1);
            nll.push(-s / n as f64);
        }
        out.push((nll[0], nll[1..].to_vec()));
    }
    Ok(out)
}

fn qa(recs: &[TofuRecord]) -> Vec<Example> {
    recs.iter()
        .map(|r| Example::qa(&r.question, &r.answer))
        .collect()
}

/// Probability, ROUGE-L and truth ratio of a "utility" set: `normalised` probabilities over
/// the options (real authors, world facts) or plain ones (retain); the truth ratio's correct
/// answer is the paraphrase where there is one (retain), else the answer.
fn utility_set(
    model: &Model,
    recs: &[TofuRecord],
    normalised: bool,
    max_new: usize,
) -> Result<(f64, f64, Option<f64>)> {
    let rouge = m::mean(crate::unlearn::leakage::greedy_rouge(
        model,
        &qa(recs),
        max_new,
    )?);
    let with_opts: Vec<TofuRecord> = recs
        .iter()
        .filter(|r| !r.perturbed_answer.is_empty())
        .cloned()
        .collect();
    // The answers' NLLs serve the normalised probability and, where there is no paraphrase,
    // the truth ratio too: computed once.
    let answer_opts = if normalised {
        Some(option_nlls(model, &with_opts, |r| r.answer.clone())?)
    } else {
        None
    };
    let prob = match &answer_opts {
        Some(o) => m::mean(o.iter().map(|(c, w)| m::normalised_prob(*c, w))),
        None => m::mean(mean_nlls(model, &qa(recs))?.iter().map(|n| (-n).exp())),
    };
    let tr = if with_opts.is_empty() {
        None
    } else {
        let o = match answer_opts {
            Some(o) if with_opts.iter().all(|r| r.paraphrased_answer.is_none()) => o,
            _ => option_nlls(model, &with_opts, |r| {
                r.paraphrased_answer
                    .clone()
                    .unwrap_or_else(|| r.answer.clone())
            })?,
        };
        let trs: Vec<f64> = o.iter().map(|(c, w)| m::truth_ratio(*c, w)).collect();
        Some(m::truth_ratio_true_better(&trs))
    };
    Ok((prob, rouge, tr))
}

/// MIA scores of answers, higher = less likely a member: (LOSS, ZLib, Min-K%, Min-K%++).
fn mia_scores(stats: &[AnswerStats], texts: &[&str], k: f64) -> [Vec<f64>; 4] {
    let mut out: [Vec<f64>; 4] = Default::default();
    for (s, t) in stats.iter().zip(texts) {
        out[0].push(s.nll);
        out[1].push(m::zlib_score(s.nll, t));
        out[2].push(m::min_k(&s.logp, k));
        out[3].push(m::min_k_pp(&s.logp, &s.mu, &s.var, k));
    }
    out
}

/// Score one model. Forget quality and privleak are relative to the retain model: they are
/// filled in by [`relate`] once its scores exist (here: forget quality NaN, privleak None).
pub fn score(
    model: &Model,
    data: &TofuData,
    retain_eval: &[TofuRecord],
    p: &TofuParams,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Scores> {
    let t0 = std::time::Instant::now();
    let total = 5;
    progress(0, total);
    // Forget: answers (prob, ES, MIA), greedy ROUGE, paraphrased vs perturbed truth ratio.
    let forget_qa = qa(&data.forget);
    let fs = answer_stats(model, &forget_qa)?;
    let forget_rouge = m::mean(crate::unlearn::leakage::greedy_rouge(
        model,
        &forget_qa,
        p.max_new_tokens,
    )?);
    let para = option_nlls(model, &data.forget, |r| {
        r.paraphrased_answer.clone().unwrap_or_default()
    })?;
    let forget_trs: Vec<f64> = para.iter().map(|(c, w)| m::truth_ratio(*c, w)).collect();
    let es = m::mean(
        fs.iter()
            .map(|s| m::extraction_strength(&s.argmax, &s.targets)),
    );
    tracing::info!("forget scored in {:.1} s", t0.elapsed().as_secs_f64());
    progress(1, total);
    // MIA: forget against holdout.
    let texts: Vec<&str> = data.forget.iter().map(|r| r.answer.as_str()).collect();
    let f_mia = mia_scores(&fs, &texts, p.min_k);
    let (mia_auc, holdout_min_k) = if data.holdout.is_empty() {
        (None, vec![])
    } else {
        let hs = answer_stats(model, &qa(&data.holdout))?;
        let ht: Vec<&str> = data.holdout.iter().map(|r| r.answer.as_str()).collect();
        let h_mia = mia_scores(&hs, &ht, p.min_k);
        let auc = |i: usize| m::mia_auc(&f_mia[i], &h_mia[i]);
        let a = MiaAuc {
            loss: auc(0),
            zlib: auc(1),
            min_k: auc(2),
            min_k_pp: auc(3),
        };
        (Some(a), h_mia[2].clone())
    };
    tracing::info!("holdout scored at {:.1} s", t0.elapsed().as_secs_f64());
    progress(2, total);
    let (retain_prob, retain_rouge, retain_tr) =
        utility_set(model, retain_eval, false, p.max_new_tokens)?;
    tracing::info!("retain scored at {:.1} s", t0.elapsed().as_secs_f64());
    progress(3, total);
    let ra = if data.real_authors.is_empty() {
        None
    } else {
        Some(utility_set(
            model,
            &data.real_authors,
            true,
            p.max_new_tokens,
        )?)
    };
    progress(4, total);
    let (wf_prob, wf_rouge, wf_tr) = utility_set(model, &data.world, true, p.max_new_tokens)?;
    tracing::info!("world facts scored at {:.1} s", t0.elapsed().as_secs_f64());
    progress(5, total);
    let mut parts: Vec<(&str, f64)> =
        vec![("retain_prob", retain_prob), ("retain_rouge", retain_rouge)];
    if let Some(t) = retain_tr {
        parts.push(("retain_truth_ratio", t));
    }
    if let Some((pr, ro, tr)) = ra {
        parts.push(("real_authors_prob", pr));
        parts.push(("real_authors_rouge", ro));
        if let Some(t) = tr {
            parts.push(("real_authors_truth_ratio", t));
        }
    }
    parts.push(("world_facts_prob", wf_prob));
    parts.push(("world_facts_rouge", wf_rouge));
    if let Some(t) = wf_tr {
        parts.push(("world_facts_truth_ratio", t));
    }
    let values: Vec<f64> = parts.iter().map(|x| x.1).collect();
    Ok(Scores {
        forget_prob: m::mean(fs.iter().map(|s| (-s.nll).exp())),
        forget_rouge,
        forget_truth_ratio: m::truth_ratio_forget(&forget_trs),
        extraction_strength: es,
        mia_auc,
        forget_quality: f64::NAN,
        privleak: None,
        model_utility: m::harmonic_mean(&values),
        utility_metrics: parts.iter().map(|x| x.0.to_string()).collect(),
        retain_prob,
        retain_rouge,
        retain_truth_ratio: retain_tr.unwrap_or(f64::NAN),
        real_authors_prob: ra.map(|x| x.0),
        real_authors_rouge: ra.map(|x| x.1),
        real_authors_truth_ratio: ra.and_then(|x| x.2),
        world_facts_prob: wf_prob,
        world_facts_rouge: wf_rouge,
        world_facts_truth_ratio: wf_tr.unwrap_or(f64::NAN),
        forget_truth_ratios: forget_trs,
        forget_min_k: f_mia[2].clone(),
        holdout_min_k,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Fill in forget quality (KS p-value of the forget truth ratios) and privleak (from the
/// Min-K% AUC) relative to the retain model's scores.
pub fn relate(s: &mut Scores, retain_model: &Scores) {
    s.forget_quality = m::ks_2samp(&s.forget_truth_ratios, &retain_model.forget_truth_ratios).1;
    s.privleak = match (s.mia_auc, retain_model.mia_auc) {
        (Some(a), Some(r)) => Some(m::privleak(a.min_k, r.min_k)),
        _ => None,
    };
}

/// A progress event: the phase, work done and work in it.
pub struct Progress<'a> {
    pub phase: &'a str,
    pub done: usize,
    pub total: usize,
}

/// Run the protocol. `progress` hears each phase's start and steps.
///
/// # Errors
/// Bad sets (checked before any work), a diverging loss.
pub fn run(
    model: &Model,
    suite: &Suite,
    p: &TofuParams,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<TofuReport> {
    let start = std::time::Instant::now();
    let data = TofuData::load(
        &p.forget,
        &p.retain,
        p.holdout.as_ref(),
        p.real_authors.as_deref(),
        &p.world,
    )?;
    let retain_eval = data.retain_eval(p.retain_eval_per_author);
    let forget_ex = qa(&data.forget);
    let retain_ex: Vec<Example> = data
        .retain
        .iter()
        .map(|(_, r)| Example::qa(&r.question, &r.answer))
        .collect();
    let mut phases: Vec<(String, f64)> = Vec::new();
    let mut timed =
        |name: &str, t: std::time::Instant| phases.push((name.into(), t.elapsed().as_secs_f64()));
    let scored = |name: &str, mdl: &Model, progress: &mut dyn FnMut(Progress<'_>)| {
        let phase = format!("scoring {name}");
        score(mdl, &data, &retain_eval, p, &mut |done, total| {
            progress(Progress {
                phase: &phase,
                done,
                total,
            })
        })
    };

    let t = std::time::Instant::now();
    let mut base = scored("base", model, progress)?;
    timed("score base", t);

    let mut learn_set = forget_ex.clone();
    learn_set.extend(retain_ex.iter().cloned());
    let t = std::time::Instant::now();
    let total = p.learn.steps;
    let (finetuned_model, learn_finetuned) = learn(model, &learn_set, &p.learn, &mut |s, _| {
        progress(Progress {
            phase: "learning forget + retain (finetuned)",
            done: s,
            total,
        })
    })?;
    timed("learn finetuned", t);
    let t = std::time::Instant::now();
    let (retain_model, learn_retain) = learn(model, &retain_ex, &p.learn, &mut |s, _| {
        progress(Progress {
            phase: "learning retain only (retain model)",
            done: s,
            total,
        })
    })?;
    timed("learn retain model", t);
    let t = std::time::Instant::now();
    let mut finetuned = scored("finetuned", &finetuned_model, progress)?;
    timed("score finetuned", t);
    let t = std::time::Instant::now();
    let mut retain_scores = scored("retain model", &retain_model, progress)?;
    timed("score retain model", t);
    drop(retain_model);

    let rec = |e: &Example| Record {
        prompt: Some(e.prompt.clone()),
        answer: Some(e.answer.clone()),
        ..Default::default()
    };
    let mut methods = BTreeMap::new();
    for mr in &p.methods {
        let name = format!("{:?}", mr.method.name).to_lowercase();
        let req = Request {
            reference: None,
            relearn_check: None,
            saliency: None,
            optimizer: Default::default(),
            crossings: DEFAULT_CROSSINGS,
            anchor_texts: 0,
            anchor_weight: 1.0,
            anchor_prompts: None,
            anchor_prompts_n: 200,
            anchor_prompt_list: vec![],
            model: None,
            subject: "TOFU forget authors".into(),
            secrets: vec![],
            forget: forget_ex.iter().map(rec).collect(),
            retain: retain_ex.iter().map(rec).collect(),
            method: mr.method.clone(),
            layers: LayerSel::List(mr.layers.clone()),
            steps: p.steps,
            lr: mr.lr,
            batch_size: p.batch_size,
            check_every: 5,
            max_perplexity_ratio: p.max_perplexity_ratio,
            exposure_candidates: 1000,
            samples: 0,
            seed: p.seed,
        };
        let phase = format!("unlearning with {name}");
        let t = std::time::Instant::now();
        let log = train(
            &finetuned_model,
            &req,
            &mr.layers,
            &forget_ex,
            &retain_ex,
            &Options {
                suite,
                types: vec![],
                grid: None,
                reference: None,
            },
            &mut |s, total, _| {
                progress(Progress {
                    phase: &phase,
                    done: s,
                    total,
                })
            },
        )?;
        timed(&format!("unlearn {name}"), t);
        let t = std::time::Instant::now();
        let mut s = scored(&name, &log.model, progress)?;
        timed(&format!("score {name}"), t);
        relate(&mut s, &retain_scores);
        methods.insert(
            name,
            MethodResult {
                run: mr.clone(),
                scores: s,
                steps: log.losses.len(),
                stop_reason: log.stop_reason,
                warnings: log.warnings,
                train_seconds: log.train_seconds,
            },
        );
    }
    let reference = retain_scores.clone();
    relate(&mut base, &reference);
    relate(&mut finetuned, &reference);
    relate(&mut retain_scores, &reference);
    let sizes = BTreeMap::from([
        ("forget".to_string(), data.forget.len()),
        ("retain_train".to_string(), data.retain.len()),
        ("retain_eval".to_string(), retain_eval.len()),
        ("holdout".to_string(), data.holdout.len()),
        ("real_authors".to_string(), data.real_authors.len()),
        ("world_facts".to_string(), data.world.len()),
    ]);
    Ok(TofuReport {
        params: p.clone(),
        sizes,
        base,
        finetuned,
        retain_model: retain_scores,
        methods,
        learn_finetuned,
        learn_retain,
        phases,
        seconds: start.elapsed().as_secs_f64(),
    })
}
