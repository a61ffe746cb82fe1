//! Greedy descent on the quantization grid (`optimizer: grid` in a removal request).
//!
//! Why: a quantized file can only change by whole grid steps, so what moves unrelated
//! predictions is the number and placement of entries that step to a neighbouring grid point.
//! AdamW through a straight-through estimator moves every latent weight by about `lr` per
//! step, whatever its gradient, so a share of about `lr / step` of *all* entries crosses each
//! step: millions of small, mostly useless changes (the demo's distill run crossed ~10% of
//! 106 M entries and moved one unrelated prediction in three). Here a step moves only the
//! `crossings` entries whose one-step move lowers the loss most, each by exactly one grid step:
//!
//! - moving entry `i` by `-sign(g_i) d_i` gains `|g_i| d_i` to first order and costs
//!   `c_i = (w / 2) F_ii d_i^2`, the second-order growth of the locality anchor, where `F` is
//!   the diagonal Fisher of the model before training on the anchor texts (they are its own
//!   samples, so the squared gradient of their log-likelihood estimates the Fisher, and the
//!   anchor's KL grows as `d^T F d / 2` around the start) and `w` the anchor's weight;
//! - the score is `max(0, |g_i| d_i - c_i) / (c_i + mean c)`: net gain per unit of cost, the
//!   mean cost keeping entries whose gain and cost are both near zero from winning (ranked
//!   by the net gain alone, the moves went where the model is fragile: 1,400 of them tripled
//!   general-text perplexity); without a cost, the first-order gain;
//! - the best-scoring entries move, at most `crossings` per step and one per matrix row;
//! - a block's extremes never move (they set its scale and offset), so every other entry of
//!   the block keeps its value and the file holds exactly the model trained.
//!
//! This is in the spirit of Bop (Helwegen et al. 2019, "Latent Weights Do Not Exist:
//! Rethinking Binarized Neural Network Optimization", arXiv 1906.02107), which flips a binary
//! weight only when its gradient signal passes a threshold instead of keeping latent weights,
//! and of Selective Synaptic Dampening (Foster et al. 2023, arXiv 2308.07707), which picks the
//! parameters that matter for the forget set much more than for the rest by a Fisher ratio.
//! Our departures: a top-k budget per step instead of Bop's threshold, no momentum, the
//! second-order anchor cost instead of SSD's ratio, and moves of one grid step instead of
//! SSD's dampening.
//!
//! Matrices without a grid (f32 training) move by `lr` per selected entry: sparse sign
//! descent. K-quant grids (super-blocks with searched scales) are not supported: moving one
//! entry can change its sub-block's scale.

use super::{answer_logp, Tokenized, Trainable};
use crate::error::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};

/// Values per block of the grids this optimizer supports.
const BLOCK: usize = 32;

/// The grid step of every entry of `q` (a matrix already on grid `g`), `[rows, cols]`, and the
/// mask (1.0) of entries that may move: not a block extreme.
fn steps(q: &Tensor, g: GgmlDType) -> Result<(Tensor, Tensor)> {
    let (rows, cols) = q.dims2()?;
    let shape = (rows, cols / BLOCK, BLOCK);
    let b = q.reshape(shape)?;
    let hi = b.max_keepdim(2)?;
    let lo = b.min_keepdim(2)?;
    let amax = hi.abs()?.maximum(&lo.abs()?)?;
    // ggml's block formats: Q4_1/Q5_1 are min + d * q with d = (max - min) / (levels - 1);
    // Q4_0 / Q5_0 / Q8_0 are d * q with |d| = amax / 8, / 16, / 127.
    let d = match g {
        GgmlDType::Q4_1 => ((&hi - &lo)? / 15.0)?,
        GgmlDType::Q5_1 => ((&hi - &lo)? / 31.0)?,
        GgmlDType::Q4_0 => (amax / 8.0)?,
        GgmlDType::Q5_0 => (amax / 16.0)?,
        GgmlDType::Q8_0 => (amax / 127.0)?,
        other => {
            return Err(Error::invalid(
                "optimizer",
                format!(
                    "`grid` supports matrices stored as q4_0, q4_1, q5_0, q5_1 or q8_0, not {other:?}; use `adamw`"
                ),
            ))
        }
    };
    let d = d.broadcast_as(shape)?;
    let hi = hi.broadcast_as(shape)?;
    let lo = lo.broadcast_as(shape)?;
    let extreme = (b.eq(&hi)?.to_dtype(DType::F32)? + b.eq(&lo)?.to_dtype(DType::F32)?)?;
    let movable = extreme.eq(0f32)?.to_dtype(DType::F32)?;
    Ok((d.reshape((rows, cols))?, movable.reshape((rows, cols))?))
}

/// `next` (the moved copy of `w`, both `[rows, cols]`) quantized to grid `ty`, with every
/// block whose quantized values are not exactly the intended ones put back to `w`'s. That
/// removes the f32 rounding of `w + d`, and undoes the rare move that would change a block's
/// scale (in Q4_0 / Q5_0 a new extreme of the other sign flips the grid).
fn on_grid(w: &Tensor, next: &Tensor, d: &Tensor, ty: GgmlDType) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let shape = (rows, cols / BLOCK, BLOCK);
    let q = crate::model::quant::fake_quant(next, ty)?;
    let off = (q.sub(next)?.abs()? - (d * 0.25)?)?.reshape(shape)?;
    let bad = off
        .max_keepdim(2)?
        .gt(0f32)?
        .broadcast_as(shape)?
        .reshape((rows, cols))?;
    Ok(bad.where_cond(w, &q)?)
}

/// Greedy grid descent: see the module header.
pub struct GridDescent {
    /// At most this many entries move per step.
    pub crossings: usize,
    /// Per trainable matrix, the predicted anchor cost of moving each entry one step,
    /// `(w / 2) F_ii d_i^2` (`None`: no second-order term), and its mean over all entries.
    cost: Option<(Vec<Tensor>, f64)>,
    /// The step of matrices without a grid.
    lr: f64,
}

impl GridDescent {
    /// Check the trainable matrices' grids and put every latent weight exactly on its grid.
    ///
    /// # Errors
    /// A grid type the optimizer does not support, a row width that is not a multiple of 32.
    pub fn new(tr: &mut Trainable, crossings: usize, lr: f64) -> Result<GridDescent> {
        for (n, v) in &tr.vars {
            if let Some(&g) = tr.grid.get(n) {
                let w = v.as_tensor().detach();
                if w.dims2()?.1 % BLOCK != 0 {
                    return Err(Error::invalid(
                        "optimizer",
                        format!("`grid`: {n}'s rows are not a multiple of {BLOCK} wide"),
                    ));
                }
                let q = crate::model::quant::fake_quant(&w, g)?;
                steps(&q, g)?;
                v.set(&q)?;
            }
        }
        tr.sync()?;
        Ok(GridDescent {
            crossings,
            cost: None,
            lr,
        })
    }

    /// Add the second-order anchor cost: the diagonal Fisher of the model (as it is now) on
    /// `texts` (its own samples), each text's sampled tokens scored on their own and averaged
    /// per token, times `weight / 2` and the squared grid step.
    pub fn with_fisher(mut self, tr: &Trainable, texts: &Tokenized, weight: f64) -> Result<Self> {
        let mut acc: Vec<Tensor> = tr
            .vars
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<_>>()?;
        let mut tokens = 0usize;
        for i in 0..texts.len() {
            let (sums, counts) = answer_logp(&tr.model, tr.lowest, &texts.subset(&[i]))?.sums()?;
            tokens += counts.iter().sum::<usize>();
            let grads = sums.sum_all()?.backward()?;
            for ((_, v), a) in tr.vars.iter().zip(acc.iter_mut()) {
                if let Some(g) = grads.get(v.as_tensor()) {
                    *a = (&*a + g.sqr()?)?;
                }
            }
        }
        let scale = weight / 2.0 / tokens.max(1) as f64;
        let (mut sum, mut n) = (0f64, 0usize);
        let mut cost = Vec::with_capacity(acc.len());
        for ((name, v), f) in tr.vars.iter().zip(acc) {
            let d = self.steps_of(tr, name, &v.as_tensor().detach())?.0;
            let c = ((f * d.sqr()?)? * scale)?;
            sum += c.sum_all()?.to_scalar::<f32>()? as f64;
            n += c.elem_count();
            cost.push(c);
        }
        self.cost = Some((cost, sum / n.max(1) as f64));
        Ok(self)
    }

    /// The step and the movable mask of a trainable matrix (see [`steps`]; without a grid,
    /// every entry moves by `lr`).
    fn steps_of(&self, tr: &Trainable, name: &str, w: &Tensor) -> Result<(Tensor, Tensor)> {
        match tr.grid.get(name) {
            Some(&ty) => steps(w, ty),
            None => Ok(((w.ones_like()? * self.lr)?, w.ones_like()?)),
        }
    }

    /// One step: move the best-scoring entries one grid step against their gradient. Returns
    /// how many moved. The caller syncs the model ([`Trainable::sync`]), as after any update.
    pub fn step(&self, tr: &mut Trainable, grads: &GradStore) -> Result<usize> {
        // Per matrix: gain per entry, the signed move, and a strided sample of the gains to
        // find the global threshold without sorting every entry.
        let mut cands: Vec<Option<(Tensor, Tensor, Tensor)>> = Vec::with_capacity(tr.vars.len());
        let mut sample: Vec<f32> = Vec::new();
        let mut total = 0usize;
        for (i, (n, v)) in tr.vars.iter().enumerate() {
            let Some(g) = grads.get(v.as_tensor()) else {
                cands.push(None);
                continue;
            };
            let w = v.as_tensor().detach();
            let (d, movable) = self.steps_of(tr, n, &w)?;
            // First-order gain; with the anchor cost, the net gain per unit of cost plus the
            // mean cost (so that entries whose gain and cost are both near zero do not win).
            let mut gain = (g.abs()? * &d)?;
            if let Some((cost, mean)) = &self.cost {
                gain = ((gain - &cost[i])?.relu()? / (&cost[i] + *mean)?)?;
            }
            let gain = (gain * movable)?;
            let mv = (g.sign()? * &d)?.neg()?;
            let flat: Vec<f32> = gain.flatten_all()?.to_vec1()?;
            total += flat.len();
            sample.extend(flat.iter().step_by(97).copied());
            cands.push(Some((gain, mv, d)));
        }
        if self.crossings == 0 || sample.is_empty() {
            return Ok(0);
        }
        // The gain above which about `crossings` of `total` entries lie.
        let share = (self.crossings as f64 / total as f64).min(1.0);
        let k = ((sample.len() as f64) * (1.0 - share)).floor() as usize;
        let k = k.min(sample.len() - 1);
        let (_, th, _) = sample.select_nth_unstable_by(k, f32::total_cmp);
        let th = th.max(f32::MIN_POSITIVE);
        let mut moved = 0usize;
        for ((n, v), c) in tr.vars.iter().zip(cands) {
            let Some((gain, mv, d)) = c else { continue };
            // At most one entry per output row: moves in one row add up coherently (a row's
            // output shifts by the sum of d_j x_j), which the diagonal estimate cannot see.
            let row_best = gain.max_keepdim(1)?.broadcast_as(gain.shape())?;
            let pick =
                (gain.ge(th)?.to_dtype(DType::F32)? * gain.eq(&row_best)?.to_dtype(DType::F32)?)?;
            let count = pick.sum_all()?.to_scalar::<f32>()? as usize;
            if count == 0 {
                continue;
            }
            moved += count;
            let w = v.as_tensor().detach();
            let mut next = (&w + (mv * pick)?)?;
            if let Some(&ty) = tr.grid.get(n) {
                next = on_grid(&w, &next, &d, ty)?;
            }
            v.set(&next)?;
        }
        tracing::debug!("grid step: threshold {th:.3e}, {moved} of {total} entries moved");
        Ok(moved)
    }
}
