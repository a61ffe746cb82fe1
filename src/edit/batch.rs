//! Mass editing over a range of layers, the procedure MEMIT (Meng et al. 2023, "Mass-Editing
//! Memory in a Transformer", algorithm 1; reference `memit/memit_main.py`) and AlphaEdit
//! (Fang et al. 2025) share; they differ only in how one layer's update is solved, which each
//! method's own file provides as a [`LayerSolver`].
//!
//! 1. For each rewrite i, search z_i: the residual after the last edited layer L that makes the
//!    model say the new object (`vsearch.rs`, [`Where::ResidPost`]).
//! 2. For each edited layer l, lowest first: recompute the keys K (`[d_mlp, N]`) at l and the
//!    current residuals h_i at L with the updates so far applied; the residual still to write
//!    is R = (z - h) / (layers remaining), so each layer takes its share; the solver turns
//!    (K, R) into ΔW_l, which is applied before the next layer's keys are read.
//!
//! The model is changed while computing (step 2 needs it) and restored before returning,
//! also on errors.

use super::nas::NormAnchor;
use super::vsearch::{self, Found, SearchParams, SearchRequest, SearchTrace, Where};
use super::{apply, revert, Applied, DeltaKind, WeightDelta};
use crate::error::{Error, Result};
use crate::model::{Batch, HookPoint, Model, PadSide, Site, Trace};
use candle_core::{DType, IndexOp, Tensor};

/// Turns one layer's keys and residuals into its weight change.
pub trait LayerSolver {
    /// `i`: index of `layer` among the edited layers. `keys`: `[d_mlp, N]` f64. `resid`:
    /// `[d_model, N]` f64. Returns ΔW `[d_model, d_mlp]` f64.
    fn solve(&mut self, i: usize, layer: usize, keys: &Tensor, resid: &Tensor) -> Result<Tensor>;
}

/// What one batch did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BatchTrace {
    /// Per rewrite: the z search.
    pub searches: Vec<SearchTrace>,
    /// Per layer: |R| (mean over rewrites) before its update and |ΔW| (Frobenius).
    pub layers: Vec<LayerTrace>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LayerTrace {
    pub layer: usize,
    pub resid_norm: f64,
    pub delta_norm: f64,
}

/// Compute the updates of `layers` (ascending) for a batch of rewrites. With `anchor`, the z
/// targets are NAS's (`nas.rs`). The model is restored before returning.
///
/// # Errors
/// A subject not in its prompt, an empty target, a layer out of range, a failed solve, a
/// non-finite result.
#[allow(clippy::too_many_arguments)]
pub fn compute(
    model: &mut Model,
    reqs: &[SearchRequest<'_>],
    layers: &[usize],
    prefixes: &[String],
    search: &SearchParams,
    chunk: usize,
    solver: &mut dyn LayerSolver,
    anchor: Option<&mut NormAnchor>,
) -> Result<(Vec<WeightDelta>, BatchTrace)> {
    let z_layer = last_layer(model, layers)?;
    let t0 = std::time::Instant::now();
    let found = vsearch::search(
        model,
        reqs,
        prefixes,
        z_layer,
        Where::ResidPost,
        search,
        chunk,
    )?;
    // z_i = h_i + delta_i: the target residual at the bare prompt's subject token.
    let z = match anchor {
        Some(a) => a.targets(model, z_layer, &found)?,
        None => Tensor::stack(
            &found
                .iter()
                .map(|f: &Found| &f.h_bare + &f.delta)
                .collect::<candle_core::Result<Vec<_>>>()?,
            1,
        )?
        .to_dtype(DType::F64)?,
    }; // (d_model, N)
    let t1 = std::time::Instant::now();
    let (deltas, layer_traces) = spread_targets(model, reqs, layers, prefixes, &z, solver)?;
    tracing::debug!(
        "batch of {}: z search {:.1} s, spreading over {} layers {:.1} s",
        reqs.len(),
        (t1 - t0).as_secs_f64(),
        layers.len(),
        t1.elapsed().as_secs_f64()
    );
    Ok((
        deltas,
        BatchTrace {
            searches: found.into_iter().map(|f| f.trace).collect(),
            layers: layer_traces,
        },
    ))
}

/// Step 2 alone: spread the target residuals `z` (`[d_model, N]` f64, after the last of
/// `layers`) over `layers`. The model is restored before returning.
pub fn spread_targets(
    model: &mut Model,
    reqs: &[SearchRequest<'_>],
    layers: &[usize],
    prefixes: &[String],
    z: &Tensor,
    solver: &mut dyn LayerSolver,
) -> Result<(Vec<WeightDelta>, Vec<LayerTrace>)> {
    let z_layer = last_layer(model, layers)?;
    let mut applied: Vec<Applied> = Vec::new();
    let result = spread(
        model,
        reqs,
        layers,
        prefixes,
        z_layer,
        z,
        solver,
        &mut applied,
    );
    revert(model, &applied)?;
    result
}

/// The last of `layers` (where z lives), after checking they are ascending, distinct and in
/// range.
fn last_layer(model: &Model, layers: &[usize]) -> Result<usize> {
    if layers.is_empty() || layers.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::invalid(
            "method.layers",
            format!("{layers:?}: give one or more distinct layers in ascending order"),
        ));
    }
    for &l in layers {
        model.config.check_layer(l)?;
    }
    Ok(layers[layers.len() - 1])
}

#[allow(clippy::too_many_arguments)]
fn spread(
    model: &mut Model,
    reqs: &[SearchRequest<'_>],
    layers: &[usize],
    prefixes: &[String],
    z_layer: usize,
    z: &Tensor,
    solver: &mut dyn LayerSolver,
    applied: &mut Vec<Applied>,
) -> Result<(Vec<WeightDelta>, Vec<LayerTrace>)> {
    let mut deltas = Vec::new();
    let mut traces = Vec::new();
    let mut prompts = KeyPrompts::new(model, reqs, prefixes)?;
    for (i, &layer) in layers.iter().enumerate() {
        let t0 = std::time::Instant::now();
        let (keys, h) = prompts.read(model, layer, z_layer)?; // then layer `layer` changes
        let remaining = (layers.len() - i) as f64;
        let resid = ((z - h)? / remaining)?; // (d_model, N)
        let t1 = std::time::Instant::now();
        let dw = solver.solve(i, layer, &keys, &resid)?;
        tracing::debug!(
            "layer {layer}: keys read in {:.2} s, solved in {:.2} s",
            (t1 - t0).as_secs_f64(),
            t1.elapsed().as_secs_f64()
        );
        let resid_norm = resid
            .sqr()?
            .sum(0)?
            .sqrt()?
            .mean_all()?
            .to_scalar::<f64>()?;
        let d = WeightDelta {
            name: model.weight_name(layer, Site::MlpOut)?,
            layer,
            kind: DeltaKind::Dense(dw.to_dtype(DType::F32)?),
        };
        crate::model::check_finite(&d.name, &dw)?;
        traces.push(LayerTrace {
            layer,
            resid_norm,
            delta_norm: d.norm()?,
        });
        applied.push(apply(model, &d)?);
        deltas.push(d);
    }
    Ok((deltas, traces))
}

/// A batch's prompts (each rewrite's prompt under each context prefix), tokenized once and
/// cut into chunks of like length, for reading keys and residuals again after each layer's
/// update.
///
/// Three savings over running every prompt through the model at each read, none changing a
/// number:
/// - a prompt is cut after its subject's last token, the only position read (causal
///   attention: later tokens cannot change it);
/// - keys are read from all prompts but the residual after `z_layer` from the bare prompts
///   only, so the prefixed prompts stop at the key;
/// - each read keeps the residual entering its layer, and the next read starts there: MEMIT
///   reads layers in ascending order and changes only the layer just read, so nothing below
///   it changes in between. A read at a lower layer than the last starts from the embeddings.
pub struct KeyPrompts {
    /// Every (rewrite, prefix) prompt, for the keys.
    all: RowSet,
    /// The bare prompts, for the residuals.
    bare: RowSet,
    n_reqs: usize,
    n_prefixes: usize,
}

/// Prompts cut into chunks, with the residual entering the layer last read.
struct RowSet {
    chunks: Vec<KeyChunk>,
}

struct KeyChunk {
    batch: Batch,
    /// Per row: its index in the set's flat order and its lookup position.
    rows: Vec<(usize, usize)>,
    /// The residual entering layer `.0`, `[rows, width, d_model]`.
    base: Option<(usize, Tensor)>,
}

impl RowSet {
    /// Rows per forward pass.
    const CHUNK: usize = 64;

    /// `seqs`: per prompt, its ids ending at the lookup.
    fn new(seqs: Vec<Vec<u32>>) -> RowSet {
        // Sorted by length, a chunk pads little (prefixed prompts are about ten tokens longer
        // than bare ones).
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].len());
        let chunks = order
            .chunks(Self::CHUNK)
            .map(|idx| {
                let ids: Vec<Vec<u32>> = idx.iter().map(|&i| seqs[i].clone()).collect();
                KeyChunk {
                    batch: Batch::padded(&ids, PadSide::Right, 0),
                    rows: idx.iter().map(|&i| (i, seqs[i].len() - 1)).collect(),
                    base: None,
                }
            })
            .collect();
        RowSet { chunks }
    }

    /// `point` (at or above `layer`) at each prompt's lookup, in the set's flat order; keeps
    /// the residual entering `layer` for the next read.
    fn read(&mut self, model: &Model, layer: usize, point: HookPoint) -> Result<Vec<Tensor>> {
        let missing = || Error::invalid("keys", "capture missing");
        let mut out: Vec<Option<Tensor>> =
            vec![None; self.chunks.iter().map(|c| c.rows.len()).sum()];
        for c in &mut self.chunks {
            let mut tr = Trace::new();
            tr.capture(HookPoint::ResidPre(layer));
            tr.capture(point);
            tr.stop_after(point);
            match &c.base {
                Some((from, x)) if *from <= layer => {
                    let mask = c.batch.mask.as_deref();
                    model.forward_from(*from, x, mask, None, &mut tr, false)?;
                }
                _ => {
                    model.forward(&c.batch, &mut tr)?;
                }
            }
            let y = tr.take(point).ok_or_else(missing)?;
            c.base = Some((
                layer,
                tr.take(HookPoint::ResidPre(layer)).ok_or_else(missing)?,
            ));
            for (r, &(i, pos)) in c.rows.iter().enumerate() {
                out[i] = Some(y.i((r, pos))?);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

impl KeyPrompts {
    /// Tokenize every prompt and cut it after its subject's last token.
    ///
    /// # Errors
    /// A subject not in its prompt, tokenizer errors.
    pub fn new(
        model: &Model,
        reqs: &[SearchRequest<'_>],
        prefixes: &[String],
    ) -> Result<KeyPrompts> {
        let tok = model.tok()?;
        let mut seqs = Vec::with_capacity(reqs.len() * prefixes.len());
        for req in reqs {
            for pre in prefixes {
                let text = format!("{pre}{}", req.prompt);
                let mut ids = tok.encode(&text)?;
                let (_, end) = model
                    .tok()?
                    .subject_span(&text, req.subject, &ids, pre.len())?;
                ids.truncate(end);
                seqs.push(ids);
            }
        }
        let bare = seqs.iter().step_by(prefixes.len()).cloned().collect();
        Ok(KeyPrompts {
            all: RowSet::new(seqs),
            bare: RowSet::new(bare),
            n_reqs: reqs.len(),
            n_prefixes: prefixes.len(),
        })
    }

    /// Keys at `layer` and residuals after `z_layer` (>= `layer`) at each rewrite's subject
    /// token, with the model as it is now.
    ///
    /// The key of rewrite i is MEMIT's `compute_ks`: the mean of (the bare prompt's key, the
    /// mean of the prefixed prompts' keys); the residual is the bare prompt's.
    ///
    /// Reads must come in ascending `layer` order, with no layer below the one last read
    /// changed in between (what MEMIT does); a read at a lower layer starts afresh.
    ///
    /// # Shapes
    /// Returns `[d_mlp, N]` and `[d_model, N]`, f64.
    ///
    /// # Errors
    /// `z_layer` below `layer`, tensor errors.
    pub fn read(
        &mut self,
        model: &Model,
        layer: usize,
        z_layer: usize,
    ) -> Result<(Tensor, Tensor)> {
        if z_layer < layer {
            return Err(Error::invalid(
                "layers",
                format!("the residual layer {z_layer} is below the key layer {layer}"),
            ));
        }
        let np = self.n_prefixes;
        let keys = self.all.read(model, layer, HookPoint::MlpKey(layer))?;
        let states = self
            .bare
            .read(model, layer, HookPoint::ResidPost(z_layer))?;
        let mut kcols = Vec::with_capacity(self.n_reqs);
        for q in 0..self.n_reqs {
            let r0 = q * np;
            let bare = &keys[r0];
            let k = if np > 1 {
                let rest = Tensor::stack(&keys[r0 + 1..r0 + np], 0)?.mean(0)?;
                ((bare + rest)? / 2.0)?
            } else {
                bare.clone()
            };
            kcols.push(k);
        }
        Ok((
            Tensor::stack(&kcols, 1)?.to_dtype(DType::F64)?,
            Tensor::stack(&states, 1)?.to_dtype(DType::F64)?,
        ))
    }
}
