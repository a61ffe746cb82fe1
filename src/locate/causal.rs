//! Exact causal tracing (Meng et al. 2022, section 2.1; reference `experiments/causal_trace.py`).
//!
//! Three runs: a clean run; a corrupted run with Gaussian noise on the subject tokens'
//! embeddings (one noise sample per batch row); and, for every (token i, layer l), a
//! corrupted run in which one state is restored to its clean value. The indirect effect is
//! `P_restored(target) - P_corrupted(target)`, averaged over the noise samples.
//!
//! Where we depart from the reference, for speed only (the numbers are the same):
//! - a restoration at layer l starts from the corrupted run's residual at that layer: layers
//!   below it are never recomputed;
//! - positions before token i are identical to the corrupted run at every layer (attention is
//!   causal), so their keys and values come from the corrupted run's KV cache and only
//!   positions i.. are recomputed;
//! - all cells of one token run in one pass up the layers: a cell's rows join the batch at
//!   the layer where they first differ from the corrupted run, so the batch grows layer by
//!   layer and no state is computed twice;
//! - MLP and attention windows that start at the same layer (ROME's windows clipped at layer
//!   0) restore the same layers until the narrowest ends, so they share one set of rows and
//!   each forks off where its own window ends (about 4% fewer block evaluations on a 12-token
//!   prompt);
//! - the output head runs on the last position only;
//! - tokens before the subject are never changed by the noise, so restoring them has exactly
//!   zero effect; they are not run.

use super::{setup, window, Grids, Kind, LocateParams, LocateResult, Setup, KINDS};
use crate::error::Result;
use crate::model::{Batch, HookPoint, KvCache, Model, Op, Positions, Trace};
use candle_core::{DType, IndexOp, Tensor, D};
use std::time::Instant;

/// Trace one fact exactly. `progress` is called after each (kind, token) row.
///
/// # Errors
/// Subject not in the prompt, empty prompt, bad parameters, tensor errors.
pub fn trace(
    model: &Model,
    prompt: &str,
    subject: &str,
    target: Option<&str>,
    params: &LocateParams,
    progress: &mut dyn FnMut(),
) -> Result<LocateResult> {
    let t0 = Instant::now();
    let s = setup(model, prompt, subject, target, params)?;
    let mut r = trace_setup(model, &s, params, progress)?;
    r.prompt = prompt.into();
    r.subject = subject.into();
    r.seconds = t0.elapsed().as_secs_f64();
    Ok(r)
}

/// Trace a prepared [`Setup`] (token ids, subject span, target id, noise level): the entry
/// point for callers that already hold token ids.
pub fn trace_setup(
    model: &Model,
    s: &Setup,
    params: &LocateParams,
    progress: &mut dyn FnMut(),
) -> Result<LocateResult> {
    let t0 = Instant::now();
    let s = s.clone();
    let n = model.config.n_layers;
    let t = s.prompt_ids.len();
    let rows = params.samples;
    let tid = s.target_id as usize;
    let (sub_lo, sub_hi) = s.subject_range;

    // Clean run: capture every restorable state.
    let mut clean = Trace::new();
    for l in 0..n {
        clean.capture(HookPoint::ResidPost(l));
        clean.capture(HookPoint::MlpOut(l));
        clean.capture(HookPoint::AttnOut(l));
    }
    let logits = model.forward(&Batch::single(&s.prompt_ids), &mut clean)?;
    let clean_p = prob(&logits.i((.., t - 1..t, ..))?, tid)?[0];

    // Corrupted run: `rows` noise samples, with its residuals and KV cache kept.
    let batch = Batch {
        ids: vec![s.prompt_ids.clone(); rows],
        mask: None,
    };
    let mut corrupt = Trace::new();
    corrupt.push(
        HookPoint::Embed,
        Positions::Tokens((sub_lo..sub_hi).collect()),
        Op::Noise {
            std: s.noise_std,
            seed: params.seed,
        },
    );
    for l in 0..n {
        corrupt.capture(HookPoint::ResidPre(l));
    }
    let mut cache = KvCache::new(n);
    let logits = model.forward_cached(&batch, Some(&mut cache), &mut corrupt)?;
    let corrupted_p = mean(&prob(&logits.i((.., t - 1..t, ..))?, tid)?);

    // The residual entering layer l of the corrupted run; index n is the final residual.
    let mut resid_in: Vec<Tensor> = (0..n)
        .map(|l| corrupt.take(HookPoint::ResidPre(l)).expect("captured"))
        .collect();
    // Final residual = resid_pre(n-1) + attn + mlp of the last layer; recompute from n-1.
    let mut last = Trace::new();
    last.stop_after(HookPoint::ResidPost(n - 1));
    resid_in.push(model.forward_from(n - 1, &resid_in[n - 1], None, None, &mut last, false)?);

    let mut grids = Grids {
        hidden: vec![vec![0.0; n]; t],
        mlp: vec![vec![0.0; n]; t],
        attn: vec![vec![0.0; n]; t],
    };
    let (mut evals, naive) = (0u64, (3 * t * n * rows * t * n) as u64);
    // One pass over the layers per token i (positions i.. are recomputed; earlier ones come
    // from the corrupted run's cache). A cell's rows join the batch at the layer where its
    // run starts to differ from the corrupted run: a hidden cell (i, l) at layer l + 1 with
    // its residual patched, an MLP or attention cell one layer above the start of its window
    // (that first layer differs only at token i and runs at that position alone). So the
    // batch grows up the stack ("staircase") and every cell is computed once, in large
    // matrix products.
    for i in sub_lo..t {
        let ti = Instant::now();
        let ev0 = evals;
        let len = t - i;
        let cached = cache.truncate(i)?;
        // (kind, layer, first row) of each cell in the batch so far; the rows of the batch.
        let mut cells: Vec<(Kind, usize, usize)> = Vec::new();
        let mut next_row = 0;
        // Window cells that share a lead's rows until their own window ends:
        // (layer where it ends, kind, cell layer, the lead's first row).
        let mut forks: Vec<(usize, Kind, usize, usize)> = Vec::new();
        let mut x: Option<Tensor> = None;
        let mut tail_logits = Vec::new();
        for j in 0..=n {
            // Rows joining at layer j.
            let mut join = Vec::new();
            let base = resid_in[j].narrow(1, i, len)?;
            if j >= 1 {
                let clean_state = clean.get(HookPoint::ResidPost(j - 1)).expect("captured");
                join.push(patch_first(&base, &clean_state.narrow(1, i, 1)?)?);
                cells.push((Kind::Hidden, j - 1, next_row));
                next_row += rows;
            }
            // A window cell whose window ends here leaves its lead: until now both restored
            // the same layers, so its states entering layer j are the lead's. Past the last
            // layer nothing differs: it takes the lead's probabilities.
            for &(_, kind, l, src) in forks.iter().filter(|f| f.0 == j) {
                match &x {
                    Some(xs) if j < n => {
                        join.push(xs.narrow(0, src, rows)?);
                        cells.push((kind, l, next_row));
                        next_row += rows;
                    }
                    _ => cells.push((kind, l, src)),
                }
            }
            // An MLP or attention cell differs from the corrupted run only at token i in the
            // first layer of its window, so that layer runs at position i alone (the rest of
            // the batch does not need it) and the cell joins one layer up, patched like a
            // hidden cell. Cells whose windows start at the same layer share that run.
            let starts: Vec<usize> = (0..n)
                .filter(|&l| j >= 1 && window(l, params.window, n).0 == j - 1)
                .collect();
            if !starts.is_empty() {
                let lo = j - 1;
                let x1 = resid_in[lo].narrow(1, i, 1)?; // (rows, 1, d)
                let x1 = Tensor::cat(&[&x1, &x1], 0)?; // rows restoring the MLP, then attention
                let mut tr = Trace::new();
                for (g, point) in [HookPoint::MlpOut(lo), HookPoint::AttnOut(lo)]
                    .into_iter()
                    .enumerate()
                {
                    let src = clean.get(point).expect("captured").narrow(1, i, 1)?;
                    let src = src.broadcast_as((2 * rows, 1, src.dim(2)?))?;
                    let at = (g * rows..(g + 1) * rows).map(|r| (r, 0)).collect();
                    tr.push(point, Positions::Cells(at), Op::Replace(src));
                }
                tr.stop_after(HookPoint::ResidPost(lo));
                let mut c = layer_cache(&cached, lo, 2)?;
                let y = model.forward_from(lo, &x1, None, c.as_mut(), &mut tr, false)?;
                evals += (2 * rows) as u64;
                // Windows that start together restore the same layers until the narrowest
                // ends (ROME's windows at the bottom of the stack, clipped at layer 0): one set
                // of rows, the widest window's, runs for all of them, and each of the others
                // forks off a copy where its own window ends.
                let end = |l: usize| window(l, params.window, n).1;
                let lead = starts
                    .iter()
                    .copied()
                    .max_by_key(|&l| end(l))
                    .expect("non-empty");
                for (g, kind) in [Kind::Mlp, Kind::Attn].into_iter().enumerate() {
                    let restored = patch_first(&base, &y.narrow(0, g * rows, rows)?)?;
                    let lead_row = next_row;
                    join.push(restored.clone());
                    cells.push((kind, lead, lead_row));
                    next_row += rows;
                    for &l in starts.iter().filter(|&&l| l != lead) {
                        if end(l) == j {
                            // Its window is its first layer alone: it parts at once.
                            join.push(restored.clone());
                            cells.push((kind, l, next_row));
                            next_row += rows;
                        } else {
                            forks.push((end(l), kind, l, lead_row));
                        }
                    }
                }
            }
            if j == n {
                // x holds the last position's logits of the rows so far; the hidden cell
                // (i, n - 1) that joins here only needs the head.
                for r in join {
                    tail_logits.push(model.head(&r.narrow(1, len - 1, 1)?, false)?);
                }
                break;
            }
            if !join.is_empty() {
                let mut parts: Vec<Tensor> = x.take().into_iter().collect();
                parts.extend(join);
                x = Some(Tensor::cat(&parts, 0)?); // (cells * rows, len, d)
            }
            let Some(xj) = x.take() else { continue };
            let b = xj.dim(0)?;
            // In the last layer only the last position feeds the logits: a restore at token
            // i < t - 1 there changes nothing, and the model computes that position alone.
            let last = j + 1 == n;
            // Restore the clean MLP / attention output at token i (position 0) for the rows
            // of every window cell whose window holds layer j.
            let mut tr = Trace::new();
            for (kind, point) in [
                (Kind::Mlp, HookPoint::MlpOut(j)),
                (Kind::Attn, HookPoint::AttnOut(j)),
            ] {
                let at: Vec<(usize, usize)> = cells
                    .iter()
                    .filter(|&&(k, l, _)| {
                        let (lo, hi) = window(l, params.window, n);
                        k == kind && (lo..hi).contains(&j)
                    })
                    .flat_map(|&(_, _, r0)| (r0..r0 + rows).map(|r| (r, 0)))
                    .collect();
                if at.is_empty() || (last && len > 1) {
                    continue;
                }
                let src = clean.get(point).expect("captured").narrow(1, i, len)?;
                let src = src.broadcast_as((b, len, src.dim(2)?))?;
                tr.push(point, Positions::Cells(at), Op::Replace(src));
            }
            if !last {
                tr.stop_after(HookPoint::ResidPost(j));
            }
            let mut c = layer_cache(&cached, j, b / rows)?;
            // The last layer returns the logits of the last position: (b, 1, vocab).
            x = Some(model.forward_from(j, &xj, None, c.as_mut(), &mut tr, last)?);
            evals += (b * if last { 1 } else { len }) as u64;
        }
        let mut p = prob(&x.expect("cells at every token"), tid)?;
        for l in &tail_logits {
            p.extend(prob(l, tid)?);
        }
        for &(kind, l, r0) in &cells {
            grids.get_mut(kind)[i][l] = mean(&p[r0..r0 + rows]) - corrupted_p;
        }
        for _ in 0..KINDS.len() {
            progress();
        }
        tracing::debug!(
            "token {i}: {len} positions, {} block evaluations, {:.2} s",
            evals - ev0,
            ti.elapsed().as_secs_f64()
        );
    }
    for _ in 0..sub_lo * KINDS.len() {
        progress(); // rows before the subject: exactly zero effect, nothing to run
    }
    let secs = t0.elapsed().as_secs_f64();
    let ps = (clean_p, corrupted_p);
    Ok(LocateResult::from_grids(
        "causal-trace",
        s,
        params,
        ps,
        grids,
        (evals, naive),
        secs,
    ))
}

/// Layer `l` of the corrupted run's cache (positions before the traced token), its `rows`
/// noise samples repeated `copies` times (batch-major); `None` when nothing is cached.
fn layer_cache(cached: &KvCache, l: usize, copies: usize) -> Result<Option<KvCache>> {
    if cached.layers[l].is_none() {
        return Ok(None);
    }
    let mut one = KvCache::new(cached.layers.len());
    one.layers[l] = cached.layers[l].clone();
    Ok(Some(one.repeat(copies)?))
}

/// The corrupted residual with its first position set to the restored state.
///
/// # Shapes
/// `corrupt`: `[rows, len, d]`, `clean`: `[1 or rows, 1, d]`; returns `[rows, len, d]`.
fn patch_first(corrupt: &Tensor, clean: &Tensor) -> Result<Tensor> {
    let (rows, len, d) = corrupt.dims3()?;
    let restored = clean.broadcast_as((rows, 1, d))?.contiguous()?;
    if len == 1 {
        return Ok(restored);
    }
    Ok(Tensor::cat(
        &[&restored, &corrupt.narrow(1, 1, len - 1)?],
        1,
    )?)
}

/// P(target) per row from `[rows, 1, vocab]` logits.
fn prob(logits: &Tensor, tid: usize) -> Result<Vec<f64>> {
    let p = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?.contiguous()?)?;
    let v: Vec<f32> = p.narrow(D::Minus1, tid, 1)?.flatten_all()?.to_vec1()?;
    Ok(v.into_iter().map(f64::from).collect())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}
