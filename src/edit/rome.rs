//! ROME: Rank-One Model Editing (Meng et al. 2022, "Locating and Editing Factual Associations
//! in GPT", section 3 and appendix; reference `rome/compute_u.py`, `rome/compute_v.py`).
//!
//! A fact (subject, relation, object) is read at layer L's MLP: the key k at the subject's
//! last token selects a value v = W k written into the residual stream. ROME finds
//! - k*: the mean key at the subject's last token over the prompt and prefixed variants;
//! - v*: by gradient descent, the MLP output that makes the model say the new object, with a
//!   KL term that keeps "{subject} is a" unchanged and a weight decay.
//!
//! It then writes the rank-one update `W' = W + Λ (C^-1 k*)^T` with
//! `Λ = (v* - W k*) / ((C^-1 k*)^T k*)`, which maps k* to v* while moving other keys (in the
//! metric of their covariance C) as little as possible.
//!
//! Departures from the reference, each for speed and each leaving the numbers unchanged:
//! - layers below L never change, so their output is computed once, not at every step;
//! - rows are left-padded so every subject's last token sits in one column P; positions before
//!   P never change, so their keys and values are cached once and only positions P.. are
//!   recomputed at each step;
//! - the output head runs only at the positions the loss reads;
//! - only the delta is trainable.
//!
//! One departure in substance: v* is `W k* + delta` (the reference uses the bare prompt's key
//! in place of k*), so that the update's formula is exactly the paper's.

use super::linalg::Cholesky;
use super::stats::KeyStats;
use super::WeightDelta;
use crate::error::{Error, Result};
use crate::locate::subject_span_from;
use crate::model::generate::{generate, GenParams};
use crate::model::{Batch, HookPoint, KvCache, Model, Op, Positions, Site, Trace};
use candle_core::{DType, IndexOp, Tensor, Var, D};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

/// ROME's hyper-parameters. Defaults are the reference's `hparams/ROME/gpt2-xl.json` unless
/// the comment says otherwise.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RomeParams {
    /// The layer whose MLP output projection is rewritten. `None`: the spec must give one, or
    /// `engram locate` suggests one.
    #[serde(default)]
    pub layer: Option<usize>,
    /// Adam steps for v* (reference: 20).
    #[serde(default = "d_steps")]
    pub v_num_grad_steps: usize,
    /// Adam learning rate (reference: 0.5).
    #[serde(default = "d_lr")]
    pub v_lr: f64,
    /// Weight decay on |delta| / |v|^2 (reference: 0.5).
    #[serde(default = "d_wd")]
    pub v_weight_decay: f64,
    /// |delta| <= factor * |v| (reference: 4).
    #[serde(default = "d_clamp")]
    pub clamp_norm_factor: f64,
    /// Weight of KL(new || old) on "{subject} is a" (reference: 0.0625).
    #[serde(default = "d_kl")]
    pub kl_factor: f64,
    /// Stop once the target's mean token probability over the prompts reaches this. The
    /// reference's own test (total loss < 0.05) never fired on smollm2-135m; this one does.
    #[serde(default = "d_stop")]
    pub stop_prob: f64,
    /// Context prefixes: (tokens, count) pairs (reference: [[5, 10], [10, 10]]).
    #[serde(default = "d_ctx")]
    pub context_templates: Vec<(usize, usize)>,
    /// Key statistics: self-sampled sequences and their length (reference run on this model:
    /// 25,600 keys).
    #[serde(default = "d_samples")]
    pub stats_samples: usize,
    #[serde(default = "d_seq")]
    pub stats_seq_len: usize,
    #[serde(default)]
    pub seed: u64,
}

fn d_steps() -> usize {
    20
}
fn d_lr() -> f64 {
    0.5
}
fn d_wd() -> f64 {
    0.5
}
fn d_clamp() -> f64 {
    4.0
}
fn d_kl() -> f64 {
    0.0625
}
fn d_stop() -> f64 {
    0.9
}
fn d_ctx() -> Vec<(usize, usize)> {
    vec![(5, 10), (10, 10)]
}
fn d_samples() -> usize {
    200
}
fn d_seq() -> usize {
    128
}

impl Default for RomeParams {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("defaults parse")
    }
}

/// One requested rewrite, as ROME needs it.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The prompt, containing the subject (e.g. "The Eiffel Tower is located in the city of").
    pub prompt: &'a str,
    pub subject: &'a str,
    /// The new object, as a continuation (leading space included: " Rome").
    pub target: &'a str,
}

/// What the v* search did, for reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RomeTrace {
    pub layer: usize,
    pub steps: usize,
    /// Mean target probability over the prompts at the last step.
    pub target_prob: f64,
    pub nll: f64,
    pub kl: f64,
    pub delta_norm: f64,
    pub n_prompts: usize,
}

/// Generate ROME's context prefixes: `count` texts of `tokens` tokens each, sampled from the
/// document separator (top-k 5, as the reference's `generate_fast`), seeded. The first entry
/// is the empty prefix.
pub fn context_prefixes(model: &Model, spec: &[(usize, usize)], seed: u64) -> Result<Vec<String>> {
    let tok = model.tok()?;
    let start = tok.doc_start.unwrap_or(0);
    let mut out = vec![String::new()];
    for (i, &(len, count)) in spec.iter().enumerate() {
        let p = GenParams {
            max_new_tokens: len.saturating_sub(1).max(1),
            temperature: 1.0,
            top_p: 1.0,
            top_k: 5,
            seed: seed.wrapping_add(i as u64 * 1000),
            stop_at_eos: false,
        };
        for row in generate(model, &vec![vec![start]; count], &p)? {
            let text = tok.decode(&row)?.replace(['{', '}'], " ");
            let text = text.replace("<|endoftext|>", " ").replace('\n', " ");
            out.push(format!("{}. ", text.trim()));
        }
    }
    Ok(out)
}

/// Compute the rank-one update for one rewrite. The model is not changed.
///
/// # Shapes
/// Returns a delta for `[d_model, d_mlp]` = `right [d_model] x left [d_mlp]`.
///
/// # Errors
/// Subject not in the prompt, empty target, layer out of range, a singular covariance, or a
/// non-finite result.
pub fn compute(
    model: &Model,
    req: &Request<'_>,
    params: &RomeParams,
    stats: &KeyStats,
    chol: &Cholesky,
    prefixes: &[String],
) -> Result<(WeightDelta, RomeTrace)> {
    let layer = stats.layer;
    let cfg = &model.config;
    cfg.check_layer(layer)?;
    let n = cfg.n_layers;
    let tok = model.tok()?;
    if req.target.trim().is_empty() {
        return Err(Error::invalid("target_new", "must not be empty"));
    }

    // Rows: each prefix + prompt, followed by the target minus its last token; then the KL row.
    struct Row {
        ids: Vec<u32>,
        lookup: usize,
        prompt_len: usize,
        target: Vec<u32>,
    }
    let mut rows = Vec::new();
    for pre in prefixes {
        let text = format!("{pre}{}", req.prompt);
        let (p, t) = tok.continuation(&text, req.target)?;
        let (_, end) = subject_span_from(model, &text, req.subject, &p, pre.len())?;
        let mut ids = p.clone();
        ids.extend_from_slice(&t[..t.len() - 1]);
        rows.push(Row {
            ids,
            lookup: end - 1,
            prompt_len: p.len(),
            target: t,
        });
    }
    let kl_text = format!("{} is a", req.subject);
    let kl_ids = tok.encode(&kl_text)?;
    let (_, kl_end) = subject_span_from(model, &kl_text, req.subject, &kl_ids, 0)?;
    rows.push(Row {
        ids: kl_ids,
        lookup: kl_end - 1,
        prompt_len: 0,
        target: vec![],
    });
    let kl_row = rows.len() - 1;
    let n_prompts = rows.len() - 1;

    // Align every lookup at column P (left padding), pad the tails on the right.
    let p_col = rows.iter().map(|r| r.lookup).max().unwrap_or(0);
    let tail = rows
        .iter()
        .map(|r| r.ids.len() - r.lookup)
        .max()
        .unwrap_or(1);
    let width = p_col + tail;
    let mut ids = Vec::with_capacity(rows.len());
    let mut mask = Vec::with_capacity(rows.len());
    for r in &rows {
        let left = p_col - r.lookup;
        let right = width - left - r.ids.len();
        let mut i = vec![0u32; left];
        i.extend_from_slice(&r.ids);
        i.extend(std::iter::repeat_n(0u32, right));
        let mut m = vec![0u8; left];
        m.extend(std::iter::repeat_n(1u8, r.ids.len()));
        m.extend(std::iter::repeat_n(0u8, right));
        ids.push(i);
        mask.push(m);
    }
    let batch = Batch {
        ids,
        mask: Some(mask.clone()),
    };

    let t_start = std::time::Instant::now();
    // One clean pass: KV cache, the residual entering L, keys and MLP outputs at the lookups.
    let mut tr = Trace::new();
    tr.capture(HookPoint::ResidPre(layer));
    tr.capture(HookPoint::MlpKey(layer));
    tr.capture(HookPoint::MlpOut(layer));
    // Stop before the head: only the KL row's lookup position needs logits.
    tr.stop_after(HookPoint::ResidPost(n - 1));
    let mut cache = KvCache::new(n);
    let last = model.forward_cached(&batch, Some(&mut cache), &mut tr)?; // (b, width, d)
    let kl_logits = model.head(
        &last
            .i((kl_row..kl_row + 1, p_col..p_col + 1))?
            .contiguous()?,
        false,
    )?;
    let kl_base = candle_nn::ops::log_softmax(&kl_logits.flatten_all()?, D::Minus1)?.detach(); // (vocab)
    let resid = tr
        .take(HookPoint::ResidPre(layer))
        .ok_or_else(|| Error::invalid("rome", "no residual"))?;
    let keys = tr
        .take(HookPoint::MlpKey(layer))
        .ok_or_else(|| Error::invalid("rome", "no keys"))?;
    let outs = tr
        .take(HookPoint::MlpOut(layer))
        .ok_or_else(|| Error::invalid("rome", "no outputs"))?;
    let k_star = keys.i((0..n_prompts, p_col))?.mean(0)?; // (d_mlp)
    let v_cur = outs.i((0..n_prompts, p_col))?.mean(0)?; // W k* (+ b): the map is affine
    let v_norm = outs
        .i((0, p_col))?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f32>()? as f64;

    // Loss positions: row r's target token j is predicted at column lookup-relative
    // (prompt_len - 1 + j) - lookup.
    let mut gather = Vec::new();
    let mut target_ids = Vec::new();
    let mut row_of = Vec::new();
    for (r, row) in rows.iter().enumerate().take(n_prompts) {
        for (j, &t) in row.target.iter().enumerate() {
            let rel = row.prompt_len - 1 + j - row.lookup;
            gather.push((r * tail + rel) as u32);
            target_ids.push(t);
            row_of.push(r);
        }
    }
    let gather = Tensor::new(gather.as_slice(), &model.device)?;
    let target_t = Tensor::new(target_ids.as_slice(), &model.device)?.unsqueeze(1)?;
    // Mean over each row's tokens, then over rows: weight 1 / (rows * tokens in row).
    let weights: Vec<f32> = row_of
        .iter()
        .map(|&r| 1.0 / (n_prompts as f32 * rows[r].target.len() as f32))
        .collect();
    let weights = Tensor::new(weights.as_slice(), &model.device)?;

    tracing::debug!(
        "rome: clean pass {:.2}s ({} rows x {} columns)",
        t_start.elapsed().as_secs_f64(),
        rows.len(),
        width
    );
    let resid_tail = resid.narrow(1, p_col, tail)?.detach();
    let prefix_cache = cache.truncate(p_col)?;
    let delta = Var::zeros(cfg.d_model, DType::F32, &model.device)?;
    let mut opt = AdamW::new(
        vec![delta.clone()],
        ParamsAdamW {
            lr: params.v_lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let cells: Vec<(usize, usize)> = (0..rows.len()).map(|r| (r, 0)).collect();
    let mut out = RomeTrace {
        layer,
        steps: 0,
        target_prob: 0.0,
        nll: 0.0,
        kl: 0.0,
        delta_norm: 0.0,
        n_prompts,
    };
    for step in 0..params.v_num_grad_steps {
        let mut tr = Trace::new().differentiable();
        tr.push(
            HookPoint::MlpOut(layer),
            Positions::Cells(cells.clone()),
            Op::Add(delta.as_tensor().clone()),
        );
        tr.stop_after(HookPoint::ResidPost(n - 1));
        let mut c = prefix_cache.clone();
        let x = model.forward_from(
            layer,
            &resid_tail,
            Some(&mask),
            Some(&mut c),
            &mut tr,
            false,
        )?; // (b, tail, d)
        let flat = x.reshape((rows.len() * tail, cfg.d_model))?;
        let picked = flat.index_select(&gather, 0)?.unsqueeze(0)?; // (1, positions, d)
        let lp = candle_nn::ops::log_softmax(&model.head(&picked, true)?.squeeze(0)?, D::Minus1)?;
        let tok_lp = lp.gather(&target_t, 1)?.squeeze(1)?; // (positions)
        let nll = (tok_lp.mul(&weights)?.sum_all()? * -1.0)?;
        let kl_x = x.i((kl_row, 0))?.unsqueeze(0)?.unsqueeze(0)?;
        let kl_lp =
            candle_nn::ops::log_softmax(&model.head(&kl_x, true)?.flatten_all()?, D::Minus1)?;
        // KL(new || old), as the reference's kl_div(init, new, log_target=True).
        let kl = kl_lp.exp()?.mul(&(kl_lp.clone() - &kl_base)?)?.sum_all()?;
        // sqrt has an infinite derivative at 0 (the first step); the epsilon keeps the
        // gradient finite where torch.norm uses the subgradient 0.
        let dnorm = (delta.as_tensor().sqr()?.sum_all()? + 1e-12)?.sqrt()?;
        let wd = (dnorm.clone() * (params.v_weight_decay / (v_norm * v_norm)))?;
        let loss = ((nll.clone() + (kl.clone() * params.kl_factor)?)? + wd)?;

        out.steps = step + 1;
        out.nll = nll.to_scalar::<f32>()? as f64;
        out.kl = kl.to_scalar::<f32>()? as f64;
        // Mean over prompts of the target's geometric-mean token probability.
        let per_row = row_mean_probs(&tok_lp.to_vec1::<f32>()?, &row_of, n_prompts);
        out.target_prob = per_row;
        if out.target_prob >= params.stop_prob {
            break;
        }
        opt.backward_step(&loss)?;
        // Clamp |delta| <= clamp * |v| (reference: projection after each step).
        let max_norm = params.clamp_norm_factor * v_norm;
        let norm = delta
            .as_tensor()
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()? as f64;
        if norm > max_norm {
            delta.set(&(delta.as_tensor() * (max_norm / norm))?)?;
        }
    }
    out.delta_norm = delta
        .as_tensor()
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f32>()? as f64;

    // u = C^-1 k*, Λ = (v* - W k*) / (u · k*) with v* = W k* + delta.
    let d_mlp = cfg.d_mlp;
    let k64: Vec<f64> = k_star.to_dtype(DType::F64)?.to_vec1()?;
    let u = chol.solve(&k64);
    tracing::debug!(
        "rome: solve done at {:.2}s",
        t_start.elapsed().as_secs_f64()
    );
    let uk: f64 = u.iter().zip(&k64).map(|(a, b)| a * b).sum();
    let v_star = (v_cur + delta.as_tensor())?;
    let wk = outs.i((0..n_prompts, p_col))?.mean(0)?; // = W k* (+ b)
    let lambda = ((v_star - wk)? / uk)?;
    let left = Tensor::from_vec(
        u.iter().map(|&x| x as f32).collect::<Vec<f32>>(),
        d_mlp,
        &model.device,
    )?;
    let delta =
        WeightDelta::rank_one(model.weight_name(layer, Site::MlpOut)?, layer, lambda, left)?;
    Ok((delta, out))
}

/// Mean over rows of exp(mean token log-prob of the row).
fn row_mean_probs(tok_lp: &[f32], row_of: &[usize], n_rows: usize) -> f64 {
    let mut sum = vec![0f64; n_rows];
    let mut cnt = vec![0usize; n_rows];
    for (&lp, &r) in tok_lp.iter().zip(row_of) {
        sum[r] += lp as f64;
        cnt[r] += 1;
    }
    let total: f64 = (0..n_rows)
        .filter(|&r| cnt[r] > 0)
        .map(|r| (sum[r] / cnt[r] as f64).exp())
        .sum();
    total / n_rows as f64
}
