//! Locate: where does a model store a fact?
//!
//! Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT",
//! section 2.1 and appendix B) in [`causal`], and its linear estimate, attribution patching
//! (Nanda 2023; Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit
//! Discovery"), in [`attribution`]. Both share the setup here: the prompt's tokens, the
//! subject's token span, the target token and the noise level.

pub mod attribution;
pub mod causal;

use crate::error::{Error, Result};
use crate::model::{Batch, Model, Trace};
use candle_core::{DType, IndexOp};

/// The three kinds of state causal tracing restores: the hidden state (residual stream) at a
/// layer, or a window of layers' MLP or attention outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Hidden,
    Mlp,
    Attn,
}

impl Kind {
    /// The name reports and JSON use.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hidden => "hidden",
            Kind::Mlp => "mlp",
            Kind::Attn => "attn",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Every kind, in the order grids, plots and tables list them.
pub const KINDS: [Kind; 3] = [Kind::Hidden, Kind::Mlp, Kind::Attn];

/// Hyper-parameters of a trace. Defaults follow the ROME reference (`causal_trace.py`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LocateParams {
    /// Noise std as a multiple of the token embeddings' std (ROME: 3x the std of subject
    /// embeddings over a corpus; we use the std of the whole embedding matrix, which needs no
    /// corpus and is within a few percent of it on smollm2-135m).
    pub noise_multiplier: f64,
    /// Noise samples (ROME: 10).
    pub samples: usize,
    /// Layers restored together for the MLP and attention kinds (ROME: 10).
    pub window: usize,
    pub seed: u64,
}

impl Default for LocateParams {
    fn default() -> Self {
        LocateParams {
            noise_multiplier: 3.0,
            samples: 10,
            window: 10,
            seed: 0,
        }
    }
}

/// One fact to trace.
#[derive(Debug, Clone)]
pub struct Setup {
    pub prompt_ids: Vec<u32>,
    /// Display strings of the prompt's tokens.
    pub tokens: Vec<String>,
    /// `[start, end)` token positions of the subject.
    pub subject_range: (usize, usize),
    /// The target token whose probability is traced.
    pub target_id: u32,
    pub target: String,
    /// Absolute noise std.
    pub noise_std: f64,
}

/// Standard deviation of every entry of the token embedding matrix.
pub fn embedding_std(model: &Model) -> Result<f64> {
    let name = model.config.arch.embedding();
    // A copy in f32 (a stored embedding is dequantized), then f64.
    let e = model
        .weights
        .dense(name)?
        .flatten_all()?
        .to_dtype(DType::F64)?;
    let n = e.elem_count() as f64;
    let mean = e.sum_all()?.to_scalar::<f64>()? / n;
    let var = e.affine(1.0, -mean)?.sqr()?.sum_all()?.to_scalar::<f64>()? / n;
    Ok(var.sqrt())
}

/// Tokenize, find the subject, pick the target (default: the greedy next token).
pub fn setup(
    model: &Model,
    prompt: &str,
    subject: &str,
    target: Option<&str>,
    params: &LocateParams,
) -> Result<Setup> {
    if params.samples == 0 {
        return Err(Error::invalid("samples", "must be at least 1"));
    }
    if params.window == 0 {
        return Err(Error::invalid("window", "must be at least 1"));
    }
    let tok = model.tok()?;
    let prompt_ids = tok.encode(prompt)?;
    if prompt_ids.is_empty() {
        return Err(Error::invalid("prompt", "must not be empty"));
    }
    let subject_range = tok.subject_span(prompt, subject, &prompt_ids, 0)?;
    let target_id = match target {
        Some(t) => tok.continuation(prompt, t)?.1[0],
        None => {
            let logits = model.forward(&Batch::single(&prompt_ids), &mut Trace::new())?;
            logits
                .i((0, prompt_ids.len() - 1))?
                .argmax(0)?
                .to_scalar::<u32>()?
        }
    };
    let tokens = prompt_ids
        .iter()
        .map(|&id| tok.decode(&[id]))
        .collect::<Result<_>>()?;
    Ok(Setup {
        tokens,
        subject_range,
        target: tok.decode(&[target_id])?,
        target_id,
        noise_std: params.noise_multiplier * embedding_std(model)?,
        prompt_ids,
    })
}

/// What a trace reports, exact or estimated.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LocateResult {
    pub method: String,
    pub prompt: String,
    pub subject: String,
    pub target: String,
    pub target_id: u32,
    pub tokens: Vec<String>,
    pub subject_range: (usize, usize),
    pub clean_p: f64,
    pub corrupted_p: f64,
    pub noise_std: f64,
    pub params: LocateParams,
    /// Indirect effects `P_restored - P_corrupted`, each `[token][layer]`.
    pub grids: Grids,
    /// The layer with the largest MLP effect at the last subject token.
    pub suggested_layer: usize,
    /// Work done, in (row x position x layer) block evaluations, against the naive count
    /// (every cell a full forward of every position through every layer).
    pub block_evals: u64,
    pub naive_block_evals: u64,
    pub seconds: f64,
}

impl LocateResult {
    /// Assemble a result from a setup and its grids (prompt and subject are filled in by the
    /// caller that has the strings).
    #[allow(clippy::too_many_arguments)]
    pub fn from_grids(
        method: &str,
        s: Setup,
        params: &LocateParams,
        (clean_p, corrupted_p): (f64, f64),
        grids: Grids,
        (block_evals, naive_block_evals): (u64, u64),
        seconds: f64,
    ) -> LocateResult {
        LocateResult {
            method: method.into(),
            prompt: String::new(),
            subject: String::new(),
            target: s.target,
            target_id: s.target_id,
            suggested_layer: suggest_layer(&grids, s.subject_range),
            tokens: s.tokens,
            subject_range: s.subject_range,
            clean_p,
            corrupted_p,
            noise_std: s.noise_std,
            params: params.clone(),
            grids,
            block_evals,
            naive_block_evals,
            seconds,
        }
    }
}

/// Indirect-effect grids, `[token][layer]`.
#[derive(Debug, Clone, serde::Serialize, Default)]
pub struct Grids {
    pub hidden: Vec<Vec<f64>>,
    pub mlp: Vec<Vec<f64>>,
    pub attn: Vec<Vec<f64>>,
}

impl Grids {
    pub fn get(&self, kind: Kind) -> &Vec<Vec<f64>> {
        match kind {
            Kind::Hidden => &self.hidden,
            Kind::Mlp => &self.mlp,
            Kind::Attn => &self.attn,
        }
    }

    pub fn get_mut(&mut self, kind: Kind) -> &mut Vec<Vec<f64>> {
        match kind {
            Kind::Hidden => &mut self.hidden,
            Kind::Mlp => &mut self.mlp,
            Kind::Attn => &mut self.attn,
        }
    }
}

/// The argmax over layers of the MLP grid at the last subject token.
pub fn suggest_layer(grids: &Grids, subject_range: (usize, usize)) -> usize {
    let row = &grids.mlp[subject_range.1 - 1];
    row.iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0
}

/// The edit layer for a model when none is given: the documented one of a known alias, or
/// else the median of the layers causal tracing suggests ([`suggest_layer`]) for up to three
/// of `facts` (prompt, subject, true target). Exact tracing, not attribution patching: on
/// smollm2-135m the linear estimate put the Darrieux fact's MLP peak at layer 0, the exact
/// trace at layer 5. Returns the layer and how it was chosen, for the report.
///
/// # Errors
/// No facts to trace for an unknown model; tracing errors.
pub fn default_layer(
    model: &Model,
    facts: &[(&str, &str, Option<&str>)],
) -> Result<(usize, String)> {
    let known = crate::model::fetch::ALIASES.iter().find(|a| {
        model.source.spec == a.name
            || model.source.path.canonicalize().ok()
                == crate::model::fetch::cached_path(a).canonicalize().ok()
    });
    if let Some(a) = known {
        return Ok((
            a.edit_layer,
            format!(
                "layer {}: the documented default for {}",
                a.edit_layer, a.name
            ),
        ));
    }
    if facts.is_empty() {
        return Err(Error::invalid(
            "layer",
            "give a layer: the model is not a known alias and there is no fact to locate it from",
        ));
    }
    let mut layers = Vec::new();
    for &(prompt, subject, target) in facts.iter().take(3) {
        let r = causal::trace(
            model,
            prompt,
            subject,
            target,
            &LocateParams::default(),
            &mut || {},
        )?;
        layers.push(suggest_layer(&r.grids, r.subject_range));
    }
    let mut sorted = layers.clone();
    sorted.sort_unstable();
    let layer = sorted[sorted.len() / 2];
    Ok((
        layer,
        format!(
            "layer {layer}: the median of the layers causal tracing suggests for the first {} facts ({layers:?})",
            layers.len()
        ),
    ))
}

/// Layers restored together around `layer` (ROME: `range(max(0, l - w/2), min(n, l - (-w//2))`).
pub fn window(layer: usize, w: usize, n_layers: usize) -> (usize, usize) {
    let lo = layer.saturating_sub(w / 2);
    let hi = (layer + w.div_ceil(2)).min(n_layers);
    (lo, hi.max(layer + 1))
}

/// The `(kind, token, layer, effect)` cells with the largest effects.
pub fn strongest(r: &LocateResult, per_kind: usize) -> Vec<(Kind, usize, usize, f64)> {
    let mut out = Vec::new();
    for kind in KINDS {
        let mut cells: Vec<(usize, usize, f64)> = r
            .grids
            .get(kind)
            .iter()
            .enumerate()
            .flat_map(|(t, row)| row.iter().enumerate().map(move |(l, &v)| (t, l, v)))
            .collect();
        cells.sort_by(|a, b| b.2.total_cmp(&a.2));
        out.extend(
            cells
                .into_iter()
                .take(per_kind)
                .map(|(t, l, v)| (kind, t, l, v)),
        );
    }
    out
}

/// Spearman rank correlation of two equally long samples (average ranks for ties).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    fn ranks(x: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
        let mut r = vec![0.0; x.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
                j += 1;
            }
            let avg = (i + j) as f64 / 2.0 + 1.0;
            for &k in &idx[i..=j] {
                r[k] = avg;
            }
            i = j + 1;
        }
        r
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    if va == 0.0 || vb == 0.0 {
        return 0.0;
    }
    cov / (va * vb).sqrt()
}

/// ROME's token buckets for averaging traces of prompts of different lengths.
pub const BUCKETS: [&str; 6] = [
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
];

/// Average a `[token][layer]` grid into the six [`BUCKETS`] (`None` for an empty bucket).
pub fn bucket(grid: &[Vec<f64>], subject_range: (usize, usize)) -> Vec<Option<Vec<f64>>> {
    let (lo, hi) = subject_range;
    let t = grid.len();
    let groups: [Vec<usize>; 6] = [
        vec![lo],
        (lo + 1..hi.saturating_sub(1)).collect(),
        if hi - 1 > lo { vec![hi - 1] } else { vec![] },
        if hi < t - 1 { vec![hi] } else { vec![] },
        (hi + 1..t.saturating_sub(1)).collect(),
        if t > hi { vec![t - 1] } else { vec![] },
    ];
    groups
        .iter()
        .map(|g| {
            if g.is_empty() {
                return None;
            }
            let n = grid[0].len();
            Some(
                (0..n)
                    .map(|l| g.iter().map(|&i| grid[i][l]).sum::<f64>() / g.len() as f64)
                    .collect(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_a_prompt() {
        // tokens: 0 1 [2 3 4] 5 6 7 ; subject 2..5
        let grid: Vec<Vec<f64>> = (0..8).map(|i| vec![i as f64]).collect();
        let b = bucket(&grid, (2, 5));
        let v: Vec<Option<f64>> = b.iter().map(|x| x.as_ref().map(|r| r[0])).collect();
        assert_eq!(
            v,
            vec![
                Some(2.0),
                Some(3.0),
                Some(4.0),
                Some(5.0),
                Some(6.0),
                Some(7.0)
            ]
        );
    }

    #[test]
    fn spearman_of_monotone_and_reversed() {
        let a = [1.0, 2.0, 3.0, 4.0];
        assert!((spearman(&a, &[10.0, 20.0, 30.0, 40.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&a, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    }

    #[test]
    fn window_is_centred_and_clipped() {
        assert_eq!(window(0, 10, 30), (0, 5));
        assert_eq!(window(15, 10, 30), (10, 20));
        assert_eq!(window(29, 10, 30), (24, 30));
    }
}
