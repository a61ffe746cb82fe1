//! Decoding: greedy, or sampled with temperature and nucleus (top-p, Holtzman et al. 2020)
//! filtering, with a KV cache so each new token costs one position's forward.

use super::{Batch, KvCache, Model, PadSide, Trace};
use crate::error::{Error, Result};
use candle_core::{DType, IndexOp};
use rand::{Rng, SeedableRng};

/// How to decode.
#[derive(Debug, Clone, Copy)]
pub struct GenParams {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 keeps every token.
    pub top_p: f64,
    /// Keep only the k most likely tokens (0: no limit).
    pub top_k: usize,
    pub seed: u64,
    /// Stop a row at the tokenizer's end-of-sequence id.
    pub stop_at_eos: bool,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            max_new_tokens: 20,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop_at_eos: true,
        }
    }
}

impl GenParams {
    /// Check the values a user gave.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::invalid(
                "--temperature",
                "must be a finite number >= 0",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid("--top-p", "must be in (0, 1]"));
        }
        Ok(())
    }
}

/// Continue each prompt; returns the new tokens of each row (cut at EOS when asked).
///
/// Rows are left-padded into one batch, so all prompts decode together.
///
/// # Errors
/// Empty prompts, bad parameters, tensor errors.
pub fn generate(model: &Model, prompts: &[Vec<u32>], p: &GenParams) -> Result<Vec<Vec<u32>>> {
    p.validate()?;
    if prompts.is_empty() || prompts.iter().any(|r| r.is_empty()) {
        return Err(Error::invalid(
            "--prompt",
            "must contain at least one token",
        ));
    }
    let longest = prompts.iter().map(|r| r.len()).max().unwrap_or(0);
    if longest + p.max_new_tokens > model.config.max_positions {
        return Err(Error::invalid(
            "--max-new-tokens",
            format!(
                "prompt ({longest}) + new tokens ({}) exceed the context of {}",
                p.max_new_tokens, model.config.max_positions
            ),
        ));
    }
    let eos = model.tokenizer.as_ref().and_then(|t| t.eos);
    let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed);
    let batch = Batch::padded(prompts, PadSide::Left, 0);
    let mut mask = batch.mask.clone();
    let mut cache = KvCache::new(model.config.n_layers);
    let mut logits = model.forward_cached(&batch, Some(&mut cache), &mut Trace::new())?;
    let b = prompts.len();
    let mut out = vec![Vec::new(); b];
    let mut done = vec![false; b];
    for step in 0..p.max_new_tokens {
        let t = logits.dim(1)?;
        let last = logits.i((.., t - 1, ..))?.to_dtype(DType::F32)?; // (b, vocab)
        let rows: Vec<Vec<f32>> = last.to_vec2()?;
        let mut next = Vec::with_capacity(b);
        for (r, row) in rows.iter().enumerate() {
            let tok = pick(row, p, &mut rng);
            if !done[r] {
                out[r].push(tok);
                if p.stop_at_eos && Some(tok) == eos {
                    done[r] = true;
                }
            }
            next.push(vec![tok]);
        }
        if done.iter().all(|&d| d) || step + 1 == p.max_new_tokens {
            break;
        }
        if let Some(m) = mask.as_mut() {
            for row in m.iter_mut() {
                row.push(1);
            }
        }
        let step_batch = Batch {
            ids: next,
            mask: mask.clone(),
        };
        logits = model.forward_cached(&step_batch, Some(&mut cache), &mut Trace::new())?;
    }
    if p.stop_at_eos {
        for row in out.iter_mut() {
            if let Some(i) = row.iter().position(|&t| Some(t) == eos) {
                row.truncate(i);
            }
        }
    }
    Ok(out)
}

/// Choose the next token from one row of logits.
fn pick(logits: &[f32], p: &GenParams, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if p.temperature == 0.0 {
        return argmax();
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, (((v - max) as f64) / p.temperature).exp()))
        .collect();
    let z: f64 = probs.iter().map(|x| x.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for (i, w) in probs {
        kept.push((i, w / z));
        mass += w / z;
        if mass >= p.top_p || (p.top_k > 0 && kept.len() >= p.top_k) {
            break;
        }
    }
    let total: f64 = kept.iter().map(|x| x.1).sum();
    let mut u = rng.random::<f64>() * total;
    for &(i, w) in &kept {
        if u < w {
            return i as u32;
        }
        u -= w;
    }
    kept.last().map(|x| x.0 as u32).unwrap_or_else(argmax)
}
