//! Unlearning: teach a model facts (`learn`), then remove private data from it on request
//! (`unlearn`), and check with leakage probes that it can no longer be extracted.
//!
//! - [`learn`]: fine-tuning with AdamW on question/answer pairs or text, the loss on answer
//!   tokens only. It makes a model that has really memorised private data, and it is the
//!   fine-tuning baseline.
//! - [`request`]: removal requests (`forget-sets/*.yaml`).
//! - [`losses`]: gradient ascent, GradDiff and NPO (Zhang et al. 2024, "Negative Preference
//!   Optimization"), with an optional KL-to-reference term on the retain set.
//! - [`grid_descent`]: greedy descent on the quantization grid (`optimizer: grid`): a budget
//!   of single grid steps per step, chosen by gain per unit of locality cost.
//! - [`leakage`]: greedy and sampled extraction, the secret's log-probability, exposure
//!   (Carlini et al. 2019, "The Secret Sharer"), retain-set utility.
//! - [`run`]: the unlearning loop with its stop rule, and the before/after report (also after
//!   re-quantization to Q4, since quantization can bring forgotten data back: Zhang et al.
//!   2025, "Catastrophic Failure of LLM Unlearning via Quantization").
//!
//! Everything here talks to the model through `forward` with a [`Trace`] and named weights.

pub mod audit;
pub mod grid_descent;
pub mod leakage;
pub mod learn;
pub mod losses;
pub mod receipt;
pub mod request;
pub mod rewrite;
pub mod rmu;
pub mod run;
pub mod simnpo;

use crate::error::{Error, Result};
use crate::model::quant::{self, DeployType};
use crate::model::{Batch, HookPoint, Model, PadSide, Trace};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor, Var, D};
use std::collections::HashMap;
use std::path::Path;

/// One training or probe example: the model reads `prompt` and should (or should not) say
/// `answer` next. Plain text becomes an example whose prompt is its first word
/// ([`Example::from_text`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub prompt: String,
    pub answer: String,
}

/// How a question is shown to the model. TOFU wraps questions in a chat template; a base
/// completion format works on both base and instruct checkpoints and keeps prompts short.
pub fn qa_prompt(question: &str) -> String {
    format!("Question: {question}\nAnswer:")
}

impl Example {
    /// A question/answer pair in engram's QA format ([`qa_prompt`]); the answer follows a space.
    pub fn qa(question: &str, answer: &str) -> Example {
        Example {
            prompt: qa_prompt(question),
            answer: format!(" {}", answer.trim_start()),
        }
    }

    /// Plain text: the first word is the prompt and the rest the answer, so the loss covers
    /// every token but the first.
    pub fn from_text(text: &str) -> Result<Example> {
        let text = text.trim();
        let cut = text.find(char::is_whitespace).unwrap_or(text.len());
        if cut == text.len() {
            return Err(Error::invalid(
                "text",
                format!("`{text}` needs at least two words"),
            ));
        }
        Ok(Example {
            prompt: text[..cut].to_string(),
            answer: text[cut..].to_string(),
        })
    }
}

/// A record of a data file or a removal request: `{question, answer}`, `{prompt, answer}` or
/// `{text}`; TOFU's `author` index is kept for selection. Other fields are errors.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    #[serde(default)]
    pub question: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub answer: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    /// TOFU's author index, used by `--authors` selections.
    #[serde(default)]
    pub author: Option<usize>,
}

impl Record {
    /// The record as a training example.
    ///
    /// # Errors
    /// A record that is neither a QA pair, a prompt/answer pair nor text.
    pub fn example(&self, where_: &str) -> Result<Example> {
        for (field, t) in [
            ("question", &self.question),
            ("prompt", &self.prompt),
            ("answer", &self.answer),
            ("text", &self.text),
        ] {
            if let Some(t) = t {
                crate::limits::text(&format!("{where_}.{field}"), t).map_err(Error::from)?;
            }
        }
        match (&self.question, &self.prompt, &self.answer, &self.text) {
            (Some(q), None, Some(a), None) if !a.trim().is_empty() => Ok(Example::qa(q, a)),
            (None, Some(p), Some(a), None) if !a.is_empty() && !p.is_empty() => Ok(Example {
                prompt: p.clone(),
                answer: a.clone(),
            }),
            (None, None, None, Some(t)) => Example::from_text(t),
            _ => Err(Error::invalid(
                where_,
                "a record needs `question` + `answer`, `prompt` + `answer`, or `text` (non-empty)",
            )),
        }
    }
}

/// Read records from JSONL (one object per line) or YAML (a list of objects).
///
/// # Errors
/// [`Error::Io`], [`Error::Spec`] naming the file and line.
pub fn load_records(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let recs: Vec<Record> = if ext == "yaml" || ext == "yml" {
        crate::data::from_yaml(path, &text)?
    } else {
        crate::data::from_jsonl(path, &text)?
    };
    if recs.is_empty() {
        return Err(Error::Spec {
            path: path.into(),
            message: "no records".into(),
        });
    }
    Ok(recs)
}

/// Load a data file as examples.
pub fn load_examples(path: &Path) -> Result<Vec<Example>> {
    load_records(path)?
        .iter()
        .enumerate()
        .map(|(i, r)| {
            r.example(&format!("record {}", i + 1))
                .map_err(|e| Error::Spec {
                    path: path.into(),
                    message: e.to_string(),
                })
        })
        .collect()
}

/// The trainable copy of a model: the 2-D weights of the chosen layers are [`Var`]s.
pub struct Trainable {
    pub model: Model,
    pub vars: Vec<(String, Var)>,
    /// The lowest trained layer: layers below it never change and run without gradients.
    pub lowest: usize,
    /// Quantization-aware training: the grid each trained matrix is stored on. When a var has
    /// a grid, the forward pass sees its fake-quantized value (what the written file holds)
    /// and the gradient passes straight through to the latent f32 weight
    /// ([`Trainable::sync`]). Empty: plain f32 training.
    pub grid: HashMap<String, GgmlDType>,
}

impl Trainable {
    /// Make the matrices (attention and MLP; not norms, not embeddings) of `layers` trainable.
    ///
    /// # Errors
    /// [`Error::LayerOutOfRange`], an empty layer list.
    pub fn new(model: &Model, layers: &[usize]) -> Result<Trainable> {
        if layers.is_empty() {
            return Err(Error::invalid("layers", "at least one layer is needed"));
        }
        for &l in layers {
            model.config.check_layer(l)?;
        }
        let mut m = model.clone();
        let mut vars = Vec::new();
        for (name, t) in model.weights.iter() {
            let Some(l) = model.config.arch.layer_of(name) else {
                continue;
            };
            if layers.contains(&l) && t.rank() == 2 {
                let v = Var::from_tensor(&t.dense()?)?;
                m.weights.insert(name.clone(), v.as_tensor().clone());
                vars.push((name.clone(), v));
            }
        }
        Ok(Trainable {
            model: m,
            vars,
            lowest: *layers.iter().min().unwrap_or(&0),
            grid: HashMap::new(),
        })
    }

    /// Train through the grid of `ty` (see [`Trainable::grid`]); `None` trains in f32.
    ///
    /// # Errors
    /// `input` on a model not loaded from GGUF.
    pub fn with_grid(mut self, ty: Option<DeployType>) -> Result<Trainable> {
        if let Some(ty) = ty {
            let g = quant::grid(&self.model, ty)?;
            self.grid = self
                .vars
                .iter()
                .filter_map(|(n, _)| g.get(n).map(|t| (n.clone(), *t)))
                .collect();
        }
        self.sync()?;
        Ok(self)
    }

    /// Move every latent weight on a grid to a seeded random point of its own grid cell,
    /// keeping its quantized value (the model is unchanged, bit for bit).
    ///
    /// Why: the latent weights of a quantized model sit exactly on grid points, so an
    /// optimizer that moves them all at about the same rate (Adam's first steps move every
    /// entry by about `lr`) carries them all across a cell boundary in the same step, and
    /// the quantized model jumps. Spread over their cells, a share of about `lr / step` of
    /// them crosses each step, and the change is gradual (in the spirit of stochastic
    /// rounding; our addition, not from a paper). The offset is up to 0.45 of the local step,
    /// estimated per 32 values as range / (levels - 1); a block's extremes (which set its
    /// grid) and any entry whose offset would change its quantized value keep their grid
    /// point.
    pub fn jitter(&mut self, seed: u64) -> Result<()> {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for (n, v) in &self.vars {
            let Some(&g) = self.grid.get(n) else { continue };
            let levels: f64 = match g {
                GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => 16.0,
                GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => 32.0,
                GgmlDType::Q6K => 64.0,
                GgmlDType::Q8_0 => 256.0,
                _ => continue,
            };
            let w = v.as_tensor().detach();
            let (rows, cols) = w.dims2()?;
            if cols % 32 != 0 {
                continue;
            }
            let q = quant::fake_quant(&w, g)?;
            let shape = (rows, cols / 32, 32);
            let blocks = q.reshape(shape)?;
            let (hi, lo) = (
                blocks.max_keepdim(2)?.broadcast_as(shape)?,
                blocks.min_keepdim(2)?.broadcast_as(shape)?,
            );
            let step = ((&hi - &lo)? / (levels - 1.0))?;
            let u: Vec<f32> = (0..rows * cols)
                .map(|_| rand::Rng::random_range(&mut rng, -0.45f32..0.45))
                .collect();
            let u = Tensor::from_vec(u, shape, w.device())?;
            // A block's extremes set its grid (its range, or its largest magnitude): they stay
            // put, so the grid stays where it is.
            let zero = u.zeros_like()?;
            let u = blocks
                .eq(&hi)?
                .where_cond(&zero, &blocks.eq(&lo)?.where_cond(&zero, &u)?)?;
            let moved = (blocks + (u * step)?)?.reshape((rows, cols))?;
            let same = quant::fake_quant(&moved, g)?.eq(&q)?;
            if tracing::enabled!(tracing::Level::DEBUG) {
                let kept: f32 = same.to_dtype(DType::F32)?.mean_all()?.to_scalar()?;
                tracing::debug!(
                    "jitter {n}: {:.1}% of entries kept their quantized value",
                    100.0 * kept
                );
            }
            v.set(&same.where_cond(&moved, &q)?)?;
        }
        self.sync()
    }

    /// Put the weights the next forward pass uses into the model: for a var on a grid,
    /// `w + stop_gradient(q(w) - w)`, which equals the quantized `q(w)` in value and has the
    /// gradient of `w` (the straight-through estimator). Call after every optimizer step.
    /// Plain f32 training needs nothing: the model holds the vars themselves.
    pub fn sync(&mut self) -> Result<()> {
        if self.grid.is_empty() {
            return Ok(());
        }
        use rayon::prelude::*;
        let eff: Vec<(String, Tensor)> = self
            .vars
            .par_iter()
            .filter_map(|(n, v)| self.grid.get(n).map(|g| (n, v, *g)))
            .map(|(n, v, g)| -> Result<(String, Tensor)> {
                let w = v.as_tensor();
                let q = quant::fake_quant(w, g)?;
                let offset = (q - w.detach())?.detach();
                Ok((n.clone(), w.broadcast_add(&offset)?))
            })
            .collect::<Result<_>>()?;
        for (n, t) in eff {
            self.model.weights.insert(n, t);
        }
        Ok(())
    }

    /// The trained weights as plain tensors (a copy), to put back into a model.
    pub fn snapshot(&self) -> Result<Vec<(String, Tensor)>> {
        self.vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
            .collect()
    }

    /// Restore weights from a [`Trainable::snapshot`].
    pub fn restore(&mut self, snap: &[(String, Tensor)]) -> Result<()> {
        for ((_, v), (_, t)) in self.vars.iter().zip(snap) {
            v.set(t)?;
        }
        self.sync()
    }

    /// A plain model holding the current trained weights (no gradient tracking).
    ///
    /// # Errors
    /// [`Error::NonFinite`] when a trained weight holds NaN or Inf.
    pub fn export(&self, base: &Model) -> Result<Model> {
        let mut m = base.clone();
        for (n, v) in &self.vars {
            let t = v.as_tensor().detach().copy()?;
            crate::model::check_finite(n, &t)?;
            // On a grid, the model is what the file will hold: the quantized value.
            let t = match self.grid.get(n) {
                Some(g) => quant::fake_quant(&t, *g)?,
                None => t,
            };
            m.weights.insert(n.clone(), t);
        }
        Ok(m)
    }

    pub fn n_params(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Train only the matrices whose name passes `keep`; the others become constants again
    /// (RMU trains only the MLP output projections of its layers).
    ///
    /// # Errors
    /// No matrix passes.
    pub fn keep_only(mut self, keep: impl Fn(&str) -> bool) -> Result<Trainable> {
        let (kept, dropped): (Vec<_>, Vec<_>) = self.vars.into_iter().partition(|(n, _)| keep(n));
        if kept.is_empty() {
            return Err(Error::invalid("layers", "no trainable matrix matches"));
        }
        for (n, v) in dropped {
            self.model.weights.insert(n.clone(), v.as_tensor().detach());
            self.grid.remove(&n);
        }
        self.vars = kept;
        Ok(self)
    }
}

/// Examples tokenized for scoring: rows `prompt + answer[..-1]` and where the answer sits.
#[derive(Clone)]
pub struct Tokenized {
    pub rows: Vec<Vec<u32>>,
    /// Per example: (prompt length, answer tokens).
    pub spans: Vec<(usize, Vec<u32>)>,
}

impl Tokenized {
    /// The examples at `idx`.
    pub fn subset(&self, idx: &[usize]) -> Tokenized {
        Tokenized {
            rows: pick(&self.rows, idx),
            spans: pick(&self.spans, idx),
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// `n` texts the model samples itself (temperature 1, seeded), `tokens` tokens each from the
/// document separator (token 0), as examples whose answer is every sampled token.
pub fn sample_texts(model: &Model, n: usize, tokens: usize, seed: u64) -> Result<Tokenized> {
    let outs = crate::model::generate::generate(
        model,
        &vec![vec![0u32]; n],
        &crate::model::generate::GenParams {
            max_new_tokens: tokens,
            temperature: 1.0,
            seed,
            stop_at_eos: false,
            ..Default::default()
        },
    )?;
    let mut rows = Vec::with_capacity(n);
    let mut spans = Vec::with_capacity(n);
    for o in outs {
        let mut r = vec![0u32];
        r.extend_from_slice(&o[..o.len() - 1]);
        rows.push(r);
        spans.push((1, o));
    }
    Ok(Tokenized { rows, spans })
}

/// Tokenize examples (answers as continuations of their prompts), cut to `max_len` tokens.
pub fn tokenize(model: &Model, examples: &[Example], max_len: usize) -> Result<Tokenized> {
    let tok = model.tok()?;
    let mut rows = Vec::with_capacity(examples.len());
    let mut spans = Vec::with_capacity(examples.len());
    for e in examples {
        let (p, mut a) = tok.continuation(&e.prompt, &e.answer)?;
        let room = max_len.saturating_sub(p.len()).max(1);
        a.truncate(room);
        let mut r = p.clone();
        r.extend_from_slice(&a[..a.len() - 1]);
        rows.push(r);
        spans.push((p.len(), a));
    }
    Ok(Tokenized { rows, spans })
}

/// Log-probabilities over the vocabulary at every answer position, differentiable with
/// respect to the trainable weights.
///
/// Layers below `lowest` run once without gradients; the output head runs only at answer
/// positions (most of a batch's logits would otherwise be thrown away).
///
/// # Shapes
/// Returns `logp` `[n_answer_tokens, vocab]`, with each row's target token id and the index
/// of the example it belongs to.
pub fn answer_logp(model: &Model, lowest: usize, t: &Tokenized) -> Result<AnswerLogp> {
    answer_logp_with(model, lowest, t, true)
}

/// [`answer_logp`], with the fused (faster, not differentiable) kernels when
/// `differentiable` is false.
pub fn answer_logp_with(
    model: &Model,
    lowest: usize,
    t: &Tokenized,
    differentiable: bool,
) -> Result<AnswerLogp> {
    let (picked, targets, seg) =
        answer_hidden(model, lowest, model.config.n_layers - 1, t, differentiable)?;
    let logits = model
        .head(&picked.unsqueeze(0)?, differentiable)?
        .squeeze(0)?; // [n, vocab]
    Ok(AnswerLogp {
        logp: candle_nn::ops::log_softmax(&logits, D::Minus1)?,
        targets,
        seg,
        n_examples: t.rows.len(),
    })
}

/// The residual stream leaving block `layer` at every answer-predicting position (the
/// position before each answer token), with each position's target token and example index.
/// Layers below `lowest` run once without gradients.
///
/// # Shapes
/// Returns `[n_answer_tokens, d_model]`.
pub fn answer_hidden(
    model: &Model,
    lowest: usize,
    layer: usize,
    t: &Tokenized,
    differentiable: bool,
) -> Result<(Tensor, Vec<u32>, Vec<usize>)> {
    let dev = &model.device;
    let batch = Batch::padded(&t.rows, PadSide::Right, 0);
    let seq = batch.seq_len();
    let mut tr = Trace::new();
    tr.stop_after(HookPoint::ResidPre(lowest));
    let resid = model.forward(&batch, &mut tr)?.detach();
    let mut tr = if differentiable {
        Trace::new().differentiable()
    } else {
        Trace::new()
    };
    tr.stop_after(HookPoint::ResidPost(layer));
    let h = model.forward_from(lowest, &resid, batch.mask.as_deref(), None, &mut tr, false)?;
    let d = h.dim(D::Minus1)?;
    let mut idx = Vec::new();
    let mut targets = Vec::new();
    let mut seg = Vec::new();
    for (r, (plen, ans)) in t.spans.iter().enumerate() {
        for (i, &id) in ans.iter().enumerate() {
            idx.push((r * seq + plen + i - 1) as u32);
            targets.push(id);
            seg.push(r);
        }
    }
    let flat = h.reshape((t.rows.len() * seq, d))?;
    let picked = flat.index_select(&Tensor::new(idx.as_slice(), dev)?, 0)?;
    Ok((picked, targets, seg))
}

/// See [`answer_logp`].
pub struct AnswerLogp {
    /// `[n_answer_tokens, vocab]`.
    pub logp: Tensor,
    pub targets: Vec<u32>,
    /// Example index of each row.
    pub seg: Vec<usize>,
    pub n_examples: usize,
}

impl AnswerLogp {
    /// Per-example summed token log-probabilities `[n_examples]` and answer lengths.
    pub fn sums(&self) -> Result<(Tensor, Vec<usize>)> {
        let dev = self.logp.device();
        let n = self.targets.len();
        let tok_lp = self
            .logp
            .gather(&Tensor::new(self.targets.as_slice(), dev)?.unsqueeze(1)?, 1)?
            .squeeze(1)?; // [n]
                          // Segment sums as a [n_examples, n] 0/1 matrix times the token log-probs.
        let mut s = vec![0f32; self.n_examples * n];
        let mut counts = vec![0usize; self.n_examples];
        for (j, &r) in self.seg.iter().enumerate() {
            s[r * n + j] = 1.0;
            counts[r] += 1;
        }
        let s = Tensor::from_vec(s, (self.n_examples, n), dev)?;
        Ok((s.matmul(&tok_lp.unsqueeze(1)?)?.squeeze(1)?, counts))
    }
}

/// Per-example answer log-likelihoods ([`answer_logp`] then [`AnswerLogp::sums`]).
///
/// # Shapes
/// Returns `(sum [n_examples], answer lengths)`.
pub fn answer_logprobs(
    model: &Model,
    lowest: usize,
    t: &Tokenized,
) -> Result<(Tensor, Vec<usize>)> {
    answer_logp(model, lowest, t)?.sums()
}

/// Per-example summed answer log-probabilities and answer lengths, without gradients (fused
/// kernels), in chunks of 16 examples so the `[tokens, vocab]` log-probabilities stay small.
pub fn example_logprobs(model: &Model, t: &Tokenized) -> Result<(Vec<f64>, Vec<usize>)> {
    let (mut sums, mut counts) = (Vec::with_capacity(t.len()), Vec::with_capacity(t.len()));
    for chunk in (0..t.len()).collect::<Vec<_>>().chunks(16) {
        let (s, c) = answer_logp_with(model, 0, &t.subset(chunk), false)?.sums()?;
        sums.extend(s.to_vec1::<f32>()?.into_iter().map(f64::from));
        counts.extend(c);
    }
    Ok((sums, counts))
}

/// Mean token log-probability over all answer tokens of `t` (no gradients).
pub fn mean_token_logprob(model: &Model, t: &Tokenized) -> Result<f64> {
    let (sums, counts) = example_logprobs(model, t)?;
    Ok(sums.iter().sum::<f64>() / counts.iter().sum::<usize>().max(1) as f64)
}

/// Each example's mean token log-probability of its answer (no gradients).
pub fn mean_example_logprob_each(model: &Model, t: &Tokenized) -> Result<Vec<f64>> {
    let (sums, counts) = example_logprobs(model, t)?;
    Ok(sums
        .iter()
        .zip(&counts)
        .map(|(s, &c)| s / c as f64)
        .collect())
}

/// Mean over examples of each answer's mean token log-probability (no gradients).
pub fn mean_example_logprob(model: &Model, t: &Tokenized) -> Result<f64> {
    let (sums, counts) = example_logprobs(model, t)?;
    let per: f64 = sums.iter().zip(&counts).map(|(s, &c)| s / c as f64).sum();
    Ok(per / sums.len().max(1) as f64)
}

/// Mean token NLL over all answer tokens of a batch (the fine-tuning loss).
pub fn token_nll(sums: &Tensor, counts: &[usize]) -> Result<Tensor> {
    let total: usize = counts.iter().sum();
    Ok((sums.sum_all()? * (-1.0 / total.max(1) as f64))?)
}

/// Saliency masks (SURE, Zhang et al. 2025, "Catastrophic Failure of LLM Unlearning via
/// Quantization", arXiv 2410.16454, section 5): per trained matrix, 1 on the `frac` share of
/// entries with the largest forget-loss gradient |d NLL_forget / d w| at the start, 0
/// elsewhere. Only those entries move. SURE thresholds whole modules by their gradient norm;
/// we keep entries, which moves fewer weights for the same forget loss.
///
/// # Shapes
/// One mask per var, each the var's shape.
pub fn saliency_masks(tr: &Trainable, forget_tok: &Tokenized, frac: f64) -> Result<Vec<Tensor>> {
    let (sums, counts) = answer_logp(&tr.model, tr.lowest, forget_tok)?.sums()?;
    let nll = token_nll(&sums, &counts)?;
    let grads = nll.backward()?;
    let mut masks = Vec::with_capacity(tr.vars.len());
    for (_, v) in &tr.vars {
        let t = v.as_tensor();
        let Some(g) = grads.get(t) else {
            masks.push(t.zeros_like()?);
            continue;
        };
        let a = g.abs()?;
        let mut vals: Vec<f32> = a.flatten_all()?.to_vec1()?;
        let keep = ((vals.len() as f64 * frac).ceil() as usize).clamp(1, vals.len());
        let k = vals.len() - keep;
        let (_, th, _) = vals.select_nth_unstable_by(k, f32::total_cmp);
        let th = *th;
        masks.push(a.ge(th)?.to_dtype(candle_core::DType::F32)?);
    }
    Ok(masks)
}

/// One step of steepest descent under the max-norm: every trained entry moves by
/// `lr * g / max|g|`, so the entry with the largest gradient moves `lr` and the others in
/// proportion. Through a quantization grid this spreads the moments at which entries cross
/// to a neighbouring grid point (the most salient first), where Adam's sign-like first steps
/// move every entry by about `lr` at once and so cross them all together. (Our departure
/// from NPO's paper, which uses AdamW.)
pub fn max_norm_step(
    tr: &Trainable,
    grads: &candle_core::backprop::GradStore,
    lr: f64,
) -> Result<()> {
    let mut gmax = 0f32;
    for (_, v) in &tr.vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            gmax = gmax.max(g.abs()?.max_all()?.to_scalar::<f32>()?);
        }
    }
    if gmax <= 0.0 || !gmax.is_finite() {
        return Ok(());
    }
    for (_, v) in &tr.vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            v.set(&(v.as_tensor() - (g * (lr / gmax as f64))?)?)?;
        }
    }
    Ok(())
}

/// Multiply each var's gradient by its mask ([`saliency_masks`]).
pub fn apply_masks(
    tr: &Trainable,
    grads: &mut candle_core::backprop::GradStore,
    masks: &[Tensor],
) -> Result<()> {
    for ((_, var), mask) in tr.vars.iter().zip(masks) {
        if let Some(g) = grads.remove(var.as_tensor()) {
            grads.insert(var.as_tensor(), (g * mask)?);
        }
    }
    Ok(())
}

/// A seeded sequence of minibatch index lists that walks the data in shuffled epochs.
pub struct Batches {
    order: Vec<usize>,
    at: usize,
    size: usize,
    rng: rand::rngs::StdRng,
}

impl Batches {
    pub fn new(n: usize, size: usize, seed: u64) -> Batches {
        use rand::SeedableRng;
        // `at = n`: the first call shuffles.
        Batches {
            order: (0..n).collect(),
            at: n,
            size: size.clamp(1, n.max(1)),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    pub fn next_batch(&mut self) -> Vec<usize> {
        use rand::seq::SliceRandom;
        if self.at + self.size > self.order.len() {
            self.order.shuffle(&mut self.rng);
            self.at = 0;
        }
        let b = self.order[self.at..self.at + self.size].to_vec();
        self.at += self.size;
        b
    }
}

/// Pick `idx` from a slice.
pub fn pick<T: Clone>(v: &[T], idx: &[usize]) -> Vec<T> {
    idx.iter().map(|&i| v[i].clone()).collect()
}

/// Check a loss value is finite.
pub fn finite_loss(name: &str, v: f64) -> Result<f64> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Error::NonFinite { name: name.into() })
    }
}
