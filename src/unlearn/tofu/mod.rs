//! The TOFU benchmark (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning"), scaled to
//! a 2-core CPU: fine-tune on the question/answer pairs of some fictitious authors, then
//! unlearn a few of them with each method, and measure before and after:
//! - forget set: mean answer log-probability and ROUGE-L recall of greedy answers;
//! - retain set: the same (on the first `retain_eval_per_author` pairs of each author);
//! - world facts: multiple-choice accuracy, the option with the highest mean token
//!   log-probability after the question.

pub mod metrics;

use super::leakage::{utility, Utility};
use super::learn::{learn, LearnParams, LearnReport};
use super::request::{LayerSel, Method, MethodName, Request};
use super::run::{train, Options};
use super::{load_records, Example, Record};
use crate::error::{Error, Result};
use crate::eval::logprob::target_logprobs;
use crate::eval::metrics::Suite;
use crate::model::Model;
use std::path::Path;

/// What to run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TofuParams {
    pub learn_authors: Vec<usize>,
    pub forget_authors: Vec<usize>,
    pub retain_authors: Vec<usize>,
    pub learn: LearnParams,
    pub methods: Vec<MethodName>,
    /// NPO's β, the retain-NLL weight and the KL weight of every method.
    pub beta: f64,
    pub retain_weight: f64,
    pub kl_weight: f64,
    pub steps: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub layers: Vec<usize>,
    pub max_perplexity_ratio: f64,
    /// Retain pairs per author used for ROUGE-L and log-probability.
    pub retain_eval_per_author: usize,
    pub seed: u64,
}

/// Scores of one model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TofuEval {
    pub forget: Utility,
    pub retain: Utility,
    pub world_facts_accuracy: f64,
    pub world_facts: usize,
}

/// One unlearning method's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TofuMethod {
    pub method: MethodName,
    pub eval: TofuEval,
    pub steps: usize,
    pub stop_reason: crate::unlearn::run::StopReason,
    pub warnings: Vec<String>,
    pub train_seconds: f64,
}

/// The benchmark's report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TofuReport {
    pub params: TofuParams,
    pub base: TofuEval,
    pub learned: TofuEval,
    pub learn: LearnReport,
    pub methods: Vec<TofuMethod>,
    pub seconds: f64,
}

/// A world-facts question with four options.
#[derive(Debug, Clone, serde::Deserialize)]
struct WorldFact {
    question: String,
    option1: String,
    option2: String,
    option3: String,
    option4: String,
    answer: String,
}

/// Multiple-choice accuracy on world facts.
pub fn world_facts_accuracy(model: &Model, path: &Path) -> Result<(f64, usize)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut facts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: WorldFact = serde_json::from_str(line).map_err(|e| Error::Spec {
            path: path.into(),
            message: format!("line {}: {e}", i + 1),
        })?;
        facts.push(f);
    }
    let mut right = 0;
    for chunk in facts.chunks(16) {
        let mut pairs = Vec::new();
        let prompts: Vec<String> = chunk
            .iter()
            .map(|f| super::qa_prompt(&f.question))
            .collect();
        let options: Vec<[String; 4]> = chunk
            .iter()
            .map(|f| {
                [&f.option1, &f.option2, &f.option3, &f.option4].map(|o| format!(" {}", o.trim()))
            })
            .collect();
        for (p, o) in prompts.iter().zip(&options) {
            for x in o {
                pairs.push((p.as_str(), x.as_str()));
            }
        }
        let scores = target_logprobs(model, &pairs)?;
        for (k, f) in chunk.iter().enumerate() {
            let s = &scores[4 * k..4 * k + 4];
            let best = (0..4)
                .max_by(|&a, &b| s[a].mean_logprob.total_cmp(&s[b].mean_logprob))
                .unwrap_or(0);
            if options[k][best].trim() == f.answer.trim() {
                right += 1;
            }
        }
    }
    Ok((right as f64 / facts.len().max(1) as f64, facts.len()))
}

fn evaluate(
    model: &Model,
    forget: &[Example],
    retain_eval: &[Example],
    world: &Path,
) -> Result<TofuEval> {
    let (acc, n) = world_facts_accuracy(model, world)?;
    Ok(TofuEval {
        forget: utility(model, forget, 64)?,
        retain: utility(model, retain_eval, 64)?,
        world_facts_accuracy: acc,
        world_facts: n,
    })
}

/// Run the benchmark. `progress(phase)` names each phase as it starts.
pub fn run(
    model: &Model,
    authors_path: &Path,
    world_path: &Path,
    suite: &Suite,
    p: &TofuParams,
    progress: &mut dyn FnMut(&str),
) -> Result<TofuReport> {
    let start = std::time::Instant::now();
    let recs = load_records(authors_path)?;
    let select = |set: &[usize]| -> Result<Vec<(usize, Example)>> {
        recs.iter()
            .enumerate()
            .filter(|(_, r)| r.author.is_some_and(|a| set.contains(&a)))
            .map(|(i, r)| {
                Ok((
                    r.author.unwrap_or(0),
                    r.example(&format!("record {}", i + 1))?,
                ))
            })
            .collect()
    };
    let learn_set: Vec<Example> = select(&p.learn_authors)?.into_iter().map(|x| x.1).collect();
    let forget: Vec<Example> = select(&p.forget_authors)?
        .into_iter()
        .map(|x| x.1)
        .collect();
    let retain_all = select(&p.retain_authors)?;
    if learn_set.is_empty() || forget.is_empty() || retain_all.is_empty() {
        return Err(Error::invalid(
            "--learn-authors/--forget-authors/--retain-authors",
            format!("a selection has no records in {}", authors_path.display()),
        ));
    }
    let mut per_author = std::collections::HashMap::new();
    let retain_eval: Vec<Example> = retain_all
        .iter()
        .filter(|(a, _)| {
            let c = per_author.entry(*a).or_insert(0usize);
            *c += 1;
            *c <= p.retain_eval_per_author
        })
        .map(|x| x.1.clone())
        .collect();
    let retain: Vec<Example> = retain_all.into_iter().map(|x| x.1).collect();

    progress("evaluating the base model");
    let base = evaluate(model, &forget, &retain_eval, world_path)?;
    progress("learning the authors");
    let (learned_model, learn_report) = learn(model, &learn_set, &p.learn, &mut |_, _| {})?;
    progress("evaluating the learned model");
    let learned = evaluate(&learned_model, &forget, &retain_eval, world_path)?;
    let rec = |e: &Example| Record {
        prompt: Some(e.prompt.clone()),
        answer: Some(e.answer.clone()),
        ..Default::default()
    };
    let mut methods = Vec::new();
    for &name in &p.methods {
        progress(&format!("unlearning with {name:?}"));
        let req = Request {
            reference: None,
            relearn_check: None,
            saliency: None,
            optimizer: Default::default(),
            anchor_texts: 0,
            anchor_weight: 1.0,
            model: None,
            subject: "TOFU forget authors".into(),
            secrets: vec![],
            forget: forget.iter().map(rec).collect(),
            retain: retain.iter().map(rec).collect(),
            method: Method {
                name,
                beta: p.beta,
                retain_weight: p.retain_weight,
                kl_weight: p.kl_weight,
                rewrite: Default::default(),
            },
            layers: LayerSel::List(p.layers.clone()),
            steps: p.steps,
            lr: p.lr,
            batch_size: p.batch_size,
            check_every: 5,
            max_perplexity_ratio: p.max_perplexity_ratio,
            exposure_candidates: 1000,
            samples: 0,
            seed: p.seed,
        };
        let log = train(
            &learned_model,
            &req,
            &p.layers,
            &forget,
            &retain,
            &Options {
                suite,
                types: vec![],
                grid: None,
                reference: None,
            },
            &mut |_, _, _| {},
        )?;
        progress(&format!("evaluating {name:?}"));
        let eval = evaluate(&log.model, &forget, &retain_eval, world_path)?;
        methods.push(TofuMethod {
            method: name,
            eval,
            steps: log.losses.len(),
            stop_reason: log.stop_reason,
            warnings: log.warnings,
            train_seconds: log.train_seconds,
        });
    }
    Ok(TofuReport {
        params: p.clone(),
        base,
        learned,
        learn: learn_report,
        methods,
        seconds: start.elapsed().as_secs_f64(),
    })
}
