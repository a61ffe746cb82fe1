//! Decoding: greedy, or sampled with temperature and nucleus (top-p, Holtzman et al. 2020)
//! filtering, with a KV cache so each new token costs one position's forward.

use super::{Batch, KvCache, Model, PadSide, Trace};
use crate::error::{Error, Result};
use candle_core::{DType, IndexOp};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

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
                "temperature",
                "must be a finite number >= 0",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid("top_p", "must be in (0, 1]"));
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
    generate_grouped(model, prompts, p, &[(prompts.len(), p.seed)], &mut |_| {})
}

/// [`generate`] with the rows split into consecutive groups, `(rows, seed)` each, that draw
/// from their own random streams (`p.seed` is not used). When the prompts have one length
/// (as in the key statistics), a group's rows get the tokens that a separate `generate` call
/// on those rows with that seed gives: each row's logits do not depend on the other rows, and
/// each group's draws are taken in the same order. (Prompts of different lengths are
/// left-padded to the batch's longest, which can move logits in their last bits.) So callers
/// can run many seeded chunks as one batch (larger matrix products; the weights are packed
/// once per step for all of them) without changing what they sample. `progress(steps)` is
/// called after each decoding step.
///
/// # Errors
/// Groups that do not cover the prompts, empty prompts, bad parameters, tensor errors.
pub fn generate_grouped(
    model: &Model,
    prompts: &[Vec<u32>],
    p: &GenParams,
    groups: &[(usize, u64)],
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<u32>>> {
    decode(model, prompts, p, groups, progress, &|_| false)
}

/// [`generate`], with each row stopped early once `done(row's new tokens)` holds (a row
/// stopped early keeps the tokens it has). The stop is only a saving: callers use it where
/// the tokens after that point would be discarded anyway.
pub fn generate_until(
    model: &Model,
    prompts: &[Vec<u32>],
    p: &GenParams,
    done: &dyn Fn(&[u32]) -> bool,
) -> Result<Vec<Vec<u32>>> {
    decode(
        model,
        prompts,
        p,
        &[(prompts.len(), p.seed)],
        &mut |_| {},
        done,
    )
}

fn decode(
    model: &Model,
    prompts: &[Vec<u32>],
    p: &GenParams,
    groups: &[(usize, u64)],
    progress: &mut dyn FnMut(usize),
    stop: &dyn Fn(&[u32]) -> bool,
) -> Result<Vec<Vec<u32>>> {
    p.validate()?;
    if prompts.is_empty() || prompts.iter().any(|r| r.is_empty()) {
        return Err(Error::invalid("prompt", "must contain at least one token"));
    }
    if groups.iter().map(|g| g.0).sum::<usize>() != prompts.len() {
        return Err(Error::invalid(
            "generate",
            "the seed groups must cover every prompt row",
        ));
    }
    let longest = prompts.iter().map(|r| r.len()).max().unwrap_or(0);
    if longest.saturating_add(p.max_new_tokens) > model.config.max_positions {
        return Err(Error::invalid(
            "max_new_tokens",
            format!(
                "prompt ({longest}) + new tokens ({}) exceed the context of {}",
                p.max_new_tokens, model.config.max_positions
            ),
        ));
    }
    let eos = model.tokenizer.as_ref().and_then(|t| t.eos);
    // One random stream per group; row r draws from `rngs[group_of[r]]`.
    let mut rngs: Vec<rand::rngs::StdRng> = groups
        .iter()
        .map(|&(_, seed)| rand::rngs::StdRng::seed_from_u64(seed))
        .collect();
    let group_of: Vec<usize> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, &(n, _))| std::iter::repeat_n(g, n))
        .collect();
    let batch = Batch::padded(prompts, PadSide::Left, 0);
    let mut mask = batch.mask.clone();
    let mut cache = KvCache::new(model.config.n_layers);
    // Generation may multiply stored matrices with the quantized kernel (a prompt or step of
    // at most `QMATMUL_ROWS` rows; `super::param`).
    let _qkernel = super::param::QKernelScope::enter(true);
    let mut logits = model.forward_cached(&batch, Some(&mut cache), &mut Trace::new())?;
    let b = prompts.len();
    let mut out = vec![Vec::new(); b];
    let mut done = vec![false; b];
    for step in 0..p.max_new_tokens {
        let t = logits.dim(1)?;
        let last = logits.i((.., t - 1, ..))?.to_dtype(DType::F32)?; // (b, vocab)
        let rows: Vec<Vec<f32>> = last.to_vec2()?;
        // Each sampled row takes one uniform number from its group's stream, in row order
        // (drawn here, before the rows are picked in parallel).
        let draws: Vec<f64> = group_of
            .iter()
            .map(|&g| {
                if p.temperature == 0.0 {
                    0.0
                } else {
                    rngs[g].random::<f64>()
                }
            })
            .collect();
        let picks: Vec<u32> = rows
            .par_iter()
            .zip(&draws)
            .map(|(row, &u)| pick(row, p, u))
            .collect();
        let mut next = Vec::with_capacity(b);
        for (r, tok) in picks.into_iter().enumerate() {
            if !done[r] {
                out[r].push(tok);
                if (p.stop_at_eos && Some(tok) == eos) || stop(&out[r]) {
                    done[r] = true;
                }
            }
            next.push(vec![tok]);
        }
        progress(step + 1);
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
///
/// `uniform` is the row's draw from [0, 1), used only when sampling.
fn pick(logits: &[f32], p: &GenParams, uniform: f64) -> u32 {
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
    // Most likely first, ties in token order: the order a stable sort by probability gives.
    // The weights are >= 0 and not NaN, so their bits order like their values; one integer
    // key (inverted bits, then the index) sorts unstably to that same order, faster.
    probs.sort_unstable_by_key(|&(i, w)| (u128::from(!w.to_bits()) << 64) | i as u128);
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
    let mut u = uniform * total;
    for &(i, w) in &kept {
        if u < w {
            return i as u32;
        }
        u -= w;
    }
    kept.last().map(|x| x.0 as u32).unwrap_or_else(argmax)
}
