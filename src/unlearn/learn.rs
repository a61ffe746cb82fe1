//! `learn`: fine-tune a model on question/answer pairs or text with AdamW (Loshchilov &
//! Hutter 2019), the loss on answer tokens only. This is how a test (or a user) makes a model
//! that has really memorised private data, and it is the fine-tuning baseline of TOFU
//! (Maini et al. 2024), which fine-tunes on the fictitious authors before unlearning them.

use super::grid_descent::GridDescent;
use super::request::Optimizer as Update;
use super::run::KlTargets;
use super::{
    answer_logprobs, finite_loss, mean_token_logprob, token_nll, tokenize, Batches, Example,
    Trainable,
};
use crate::error::{Error, Result};
use crate::model::quant::DeployType;
use crate::model::Model;
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

/// Fine-tuning settings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LearnParams {
    /// Layers whose matrices are trained (attention and MLP).
    pub layers: Vec<usize>,
    /// Step budget.
    pub steps: usize,
    pub lr: f64,
    /// AdamW's decoupled weight decay (TOFU's fine-tuning uses 0.01).
    pub weight_decay: f64,
    /// Examples per step.
    pub batch_size: usize,
    /// Stop once the mean answer-token NLL over one pass of the data is at or below this.
    pub target_loss: f64,
    /// Rows are cut to this many tokens.
    pub max_len: usize,
    pub seed: u64,
    /// Train through the grid of the type the model will be written in (quantization-aware
    /// training with a straight-through estimator, see [`super::Trainable::sync`]), so that
    /// what is learned survives being written as that type. `None`: plain f32 training.
    pub grid: Option<DeployType>,
    /// Train only this share of each matrix's entries, those with the largest gradient at
    /// the start ([`super::saliency_masks`]); `None`: all. Fine-tuning a few salient
    /// entries puts the data in without moving the rest of the model.
    pub saliency: Option<f64>,
    /// `adamw` (default), `sgd` or `grid` (greedy grid descent, [`super::grid_descent`]).
    pub optimizer: Update,
    /// `grid`: at most this many entries move one grid step per step.
    pub crossings: usize,
    /// `grid`: texts the model samples itself for the Fisher of its locality cost, and the
    /// cost's weight (0 texts: none).
    pub fisher_texts: usize,
    pub fisher_weight: f64,
    /// Prompts whose answers must not change (`learn --keep`): each step adds `keep_weight`
    /// times KL(before || now) on a batch of them, over the model's own greedy continuation
    /// ([`KEEP_TOKENS`]). Without it the data's answer style spreads: a model taught ten
    /// "X's phone number is ..." records answers "The capital of South Korea is" with a
    /// number. Empty: no such term.
    pub keep: Vec<String>,
    pub keep_weight: f64,
}

/// Tokens of the model's own continuation of each `keep` prompt.
pub const KEEP_TOKENS: usize = 8;
/// `keep` prompts per step.
const KEEP_BATCH: usize = 8;

impl LearnParams {
    /// Defaults for a model with `n_layers` layers: every layer, 60 steps at lr 1e-4.
    pub fn defaults(n_layers: usize) -> LearnParams {
        LearnParams {
            layers: (0..n_layers).collect(),
            steps: 60,
            lr: 1e-4,
            weight_decay: 0.01,
            batch_size: 16,
            target_loss: 0.05,
            max_len: 128,
            seed: 0,
            grid: None,
            saliency: None,
            optimizer: Update::Adamw,
            crossings: 2000,
            fisher_texts: 32,
            fisher_weight: 4.0,
            keep: vec![],
            keep_weight: 1.0,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1"));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::invalid("lr", "must be a finite number > 0"));
        }
        if self.batch_size == 0 {
            return Err(Error::invalid("batch_size", "must be at least 1"));
        }
        if !(self.keep_weight >= 0.0 && self.keep_weight.is_finite()) {
            return Err(Error::invalid(
                "keep_weight",
                "must be a finite number >= 0",
            ));
        }
        Ok(())
    }
}

/// A `keep` record: CounterFact's and TOFU's records as published (other fields ignored).
#[derive(serde::Deserialize)]
struct KeepRecord {
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    question: Option<String>,
}

/// The first `n` prompts of a `--keep` file (JSONL, or YAML for `.yaml`/`.yml`): each
/// record's `prompt`, or its `question` as a QA prompt.
///
/// # Errors
/// [`Error::Io`]; [`Error::Spec`] naming the file for a record with neither field, or a file
/// with no record.
pub fn load_keep_prompts(path: &std::path::Path, n: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let recs: Vec<(usize, KeepRecord)> = if ext == "yaml" || ext == "yml" {
        let v: Vec<KeepRecord> = crate::data::from_yaml(path, &text)?;
        v.into_iter().enumerate().map(|(i, r)| (i + 1, r)).collect()
    } else {
        crate::data::from_jsonl_numbered(path, &text)?
    };
    let mut out = Vec::new();
    for (line, r) in recs.into_iter().take(n) {
        let p = match (r.prompt, r.question) {
            (Some(p), _) if !p.trim().is_empty() => p,
            (None, Some(q)) if !q.trim().is_empty() => super::qa_prompt(&q),
            _ => {
                return Err(Error::Spec {
                    path: path.into(),
                    message: format!(
                        "record {line}: a keep record needs a non-empty `prompt` or `question`"
                    ),
                })
            }
        };
        crate::limits::text(&format!("{}: record {line}", path.display()), &p)
            .map_err(Error::from)?;
        out.push(p);
    }
    if out.is_empty() {
        return Err(Error::Spec {
            path: path.into(),
            message: "no records".into(),
        });
    }
    Ok(out)
}

/// What a fine-tuning run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LearnReport {
    pub examples: usize,
    pub trained_params: usize,
    pub steps: usize,
    /// Batch loss (mean answer-token NLL) at each step.
    pub losses: Vec<f64>,
    /// Mean answer-token NLL of the whole data set before and after.
    pub loss_before: f64,
    pub loss_after: f64,
    pub reached_target: bool,
    pub seconds: f64,
}

/// Fine-tune `model` on `data`; returns the tuned model (the input is not changed).
///
/// `progress(step, loss)` is called after every step.
///
/// # Errors
/// Empty data, bad settings, [`Error::NonFinite`] when the loss diverges.
pub fn learn(
    model: &Model,
    data: &[Example],
    p: &LearnParams,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<(Model, LearnReport)> {
    p.validate()?;
    if data.is_empty() {
        return Err(Error::invalid("data", "no examples to learn"));
    }
    let start = std::time::Instant::now();
    let toks = tokenize(model, data, p.max_len)?;
    // Mean answer-token NLL of the whole data set (no gradients).
    let loss_before = -mean_token_logprob(model, &toks)?;
    // No `jitter` here: learning needs whole grid steps to write the data into a Q4 file, and
    // spreading the latents made dense Adam at lr 1e-3 cross a tenth of all weights each step
    // in arbitrary directions (the learned demo model's perplexity went from 27 to 28,867).
    let mut tr = Trainable::new(model, &p.layers)?.with_grid(p.grid)?;
    let masks = match p.saliency {
        Some(frac) => Some(super::saliency_masks(&tr, &toks, frac)?),
        None => None,
    };
    let gd = match p.optimizer {
        Update::Grid => {
            let gd = GridDescent::new(&mut tr, p.crossings, p.lr)?;
            Some(if p.fisher_texts > 0 {
                let texts =
                    super::sample_texts(model, p.fisher_texts, super::run::ANCHOR_TOKENS, p.seed)?;
                gd.with_fisher(&tr, &texts, p.fisher_weight)?
            } else {
                gd
            })
        }
        _ => None,
    };
    let mut opt = AdamW::new(
        tr.vars.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW {
            lr: p.lr,
            weight_decay: p.weight_decay,
            ..Default::default()
        },
    )?;
    let keep = if p.keep.is_empty() || p.keep_weight == 0.0 {
        None
    } else {
        Some(KlTargets::own_answers(model, &p.keep, KEEP_TOKENS)?)
    };
    let mut kb = Batches::new(
        keep.as_ref().map_or(1, |k| k.len().max(1)),
        KEEP_BATCH,
        p.seed + 3,
    );
    let mut batches = Batches::new(data.len(), p.batch_size, p.seed);
    let per_pass = data.len().div_ceil(p.batch_size.min(data.len()));
    let mut losses = Vec::with_capacity(p.steps);
    let mut reached = false;
    for step in 0..p.steps {
        let idx = batches.next_batch();
        let (sums, counts) = answer_logprobs(&tr.model, tr.lowest, &toks.subset(&idx))?;
        let loss = token_nll(&sums, &counts)?;
        let v = finite_loss("learn loss", loss.to_scalar::<f32>()? as f64)?;
        // The stop rule reads the data's NLL alone; the keep term only shapes the step.
        let loss = match &keep {
            Some(k) if k.len() > 0 => (loss + (k.kl(&tr, &mut kb)? * p.keep_weight)?)?,
            _ => loss,
        };
        let mut grads = loss.backward()?;
        if let Some(m) = &masks {
            super::apply_masks(&tr, &mut grads, m)?;
        }
        match (&gd, p.optimizer) {
            (Some(gd), _) => {
                gd.step(&mut tr, &grads)?;
            }
            (None, Update::Sgd) => super::max_norm_step(&tr, &grads, p.lr)?,
            _ => opt.step(&grads)?,
        }
        tr.sync()?;
        losses.push(v);
        progress(step + 1, v);
        // One pass of the data at or below the target: done.
        if losses.len() >= per_pass {
            let recent = &losses[losses.len() - per_pass..];
            if recent.iter().sum::<f64>() / per_pass as f64 <= p.target_loss {
                reached = true;
                break;
            }
        }
    }
    let out = tr.export(model)?;
    let loss_after = -mean_token_logprob(&out, &toks)?;
    Ok((
        out,
        LearnReport {
            examples: data.len(),
            trained_params: tr.n_params(),
            steps: losses.len(),
            losses,
            loss_before,
            loss_after,
            reached_target: reached,
            seconds: start.elapsed().as_secs_f64(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_prompts_read_counterfact_and_tofu_records() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("keep.jsonl");
        std::fs::write(
            &f,
            "{\"case_id\": 0, \"prompt\": \"The mother tongue of X is\", \"target_new\": \"English\"}\n\n{\"question\": \"Who wrote Y?\", \"answer\": \"Z\"}\n{\"prompt\": \"third\"}\n",
        )
        .unwrap();
        let p = load_keep_prompts(&f, 2).unwrap();
        assert_eq!(p[0], "The mother tongue of X is");
        assert_eq!(p[1], super::super::qa_prompt("Who wrote Y?"));
        assert_eq!(p.len(), 2);
        std::fs::write(&f, "{\"answer\": \"no prompt\"}\n").unwrap();
        let e = load_keep_prompts(&f, 10).unwrap_err().to_string();
        assert!(
            e.contains("keep.jsonl") && e.contains("record 1") && e.contains("`prompt`"),
            "{e}"
        );
    }
}
