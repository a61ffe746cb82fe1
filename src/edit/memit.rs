//! MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2023, section 4; reference
//! `memit/memit_main.py`). Thousands of rewrites at once, spread over a range of layers
//! (`batch.rs`); each layer's update is the least-squares solution that writes the residuals
//! R for the new keys K while keeping the outputs of the old keys (summarised by their
//! second moment C):
//!
//! `ΔW = R K^T (λ C + K K^T)^-1`, with λ = `mom2_update_weight`.

use super::batch::LayerSolver;
use super::vsearch::SearchParams;
use crate::error::{Error, Result};
use crate::linalg::Cholesky;
use crate::stats::KeyStats;
use candle_core::Tensor;

/// MEMIT's hyper-parameters. Defaults are the reference's `hparams/MEMIT/EleutherAI_gpt-j-6B.json`
/// unless the comment says otherwise.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MemitParams {
    /// The edited layers, ascending; the z search runs after the last. Default 3-6 on
    /// smollm2-135m: the block of early MLP layers around ROME's layer 5, whose MLP effect at
    /// the subject's last token is strongest in causal traces (the reference uses 3-8 of
    /// GPT-J's 28).
    #[serde(default = "d_layers")]
    pub layers: Vec<usize>,
    /// Adam steps for z (reference: 25).
    #[serde(default = "d_steps")]
    pub v_num_grad_steps: usize,
    /// Adam learning rate (reference: 0.5; engram: 2.0). Adam moves every coordinate by about
    /// `lr` per step whatever the gradient's scale, so the rate sets how fast |delta| can grow;
    /// on smollm2-135m the z deltas end near 79 (|delta| <= 0.75 |h|), which 0.5 needs at least
    /// seven steps to reach. First 48 CounterFact cases (`examples/zsearch_bench.rs`): 0.5 took
    /// 739 steps (46 of 48 reached P 0.9), 1.0 539, 2.0 419 (48 of 48), 3.0 399 (47 of 48).
    /// On 100 cases in one batch, 0.5 and 2.0 give the same ES/PS/NS outcome but in 1 ES,
    /// 1 NS and 5 PS cases (ES 94/93, PS 82/81, NS 67/66), in 3.0 vs 1.8 s per edit.
    #[serde(default = "d_lr")]
    pub v_lr: f64,
    /// Weight decay on |delta| / |h|^2 (reference: 0.5).
    #[serde(default = "d_wd")]
    pub v_weight_decay: f64,
    /// |delta| <= factor * |h| (reference: 0.75).
    #[serde(default = "d_clamp")]
    pub clamp_norm_factor: f64,
    /// KL weight on "{subject} is a" (reference: 0.0625).
    #[serde(default = "d_kl")]
    pub kl_factor: f64,
    /// Stop a rewrite's search at this mean target probability (as ROME in engram).
    #[serde(default = "d_stop")]
    pub stop_prob: f64,
    /// λ, the weight of the preserved keys' second moment. The reference's 15000 writes too
    /// little on smollm2-135m: each layer's update realises a small part of its residual.
    /// On edits/memit-ten.yaml, 15000 gave ES 6/10, 5000 ES 9/10 (NS 10/10), 3000 ES 10/10 (NS 10/10),
    /// 2000 and 1000 ES 10/10 (NS 9/10). Chosen on that file; the CounterFact benchmark in
    /// the README is the check on other facts.
    #[serde(default = "d_lambda")]
    pub mom2_update_weight: f64,
    /// Context prefixes: (tokens, count) pairs (reference: [[10, 5]]).
    #[serde(default = "d_ctx")]
    pub context_templates: Vec<(usize, usize)>,
    /// Key statistics: self-sampled sequences and their length (as ROME in engram).
    #[serde(default = "d_samples")]
    pub stats_samples: usize,
    #[serde(default = "d_seq")]
    pub stats_seq_len: usize,
    /// Key statistics from a text file, one document per line (cut to `stats_seq_len`
    /// tokens, at most `stats_samples` documents), instead of self-sampled text; relative
    /// paths are from the working directory. See `stats::Corpus::Documents`.
    #[serde(default)]
    pub stats_corpus: Option<std::path::PathBuf>,
    /// Rewrites whose z is searched in one backward pass (memory grows with it).
    #[serde(default = "d_chunk")]
    pub search_chunk: usize,
    #[serde(default)]
    pub seed: u64,
}

pub(crate) fn d_layers() -> Vec<usize> {
    vec![3, 4, 5, 6]
}
pub(crate) fn d_steps() -> usize {
    25
}
pub(crate) fn d_lr() -> f64 {
    2.0
}
pub(crate) fn d_wd() -> f64 {
    0.5
}
pub(crate) fn d_clamp() -> f64 {
    0.75
}
pub(crate) fn d_kl() -> f64 {
    0.0625
}
pub(crate) fn d_stop() -> f64 {
    0.9
}
fn d_lambda() -> f64 {
    3000.0
}
pub(crate) fn d_ctx() -> Vec<(usize, usize)> {
    vec![(10, 5)]
}
pub(crate) fn d_samples() -> usize {
    200
}
pub(crate) fn d_seq() -> usize {
    128
}
pub(crate) fn d_chunk() -> usize {
    16
}

impl Default for MemitParams {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("defaults parse")
    }
}

impl MemitParams {
    pub fn search(&self) -> SearchParams {
        SearchParams {
            steps: self.v_num_grad_steps,
            lr: self.v_lr,
            weight_decay: self.v_weight_decay,
            clamp_norm_factor: self.clamp_norm_factor,
            kl_factor: self.kl_factor,
            stop_prob: self.stop_prob,
        }
    }
}

/// MEMIT's per-layer solve, holding each edited layer's key statistics.
pub struct Memit<'a> {
    pub stats: &'a [KeyStats],
    pub lambda: f64,
}

impl LayerSolver for Memit<'_> {
    fn solve(&mut self, i: usize, layer: usize, keys: &Tensor, resid: &Tensor) -> Result<Tensor> {
        let s = self
            .stats
            .get(i)
            .filter(|s| s.layer == layer)
            .ok_or_else(|| Error::invalid("memit", format!("no statistics for layer {layer}")))?;
        // A = λ C + K K^T (symmetric positive definite); ΔW = R (A^-1 K)^T.
        let a = ((&s.mom2 * self.lambda)? + keys.matmul(&keys.t()?)?)?;
        let adj = Cholesky::factor_tensor(&a)?.solve_columns(keys)?; // (d_mlp, N)
        Ok(resid.matmul(&adj.t()?)?)
    }
}
