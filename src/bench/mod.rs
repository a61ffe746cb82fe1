//! Throughput measurements stated against the machine's own matmul peak, measured in the same
//! process, so the numbers mean something on any machine (time alone is noisy here).

pub mod counterfact;
pub mod tofu;

use crate::error::Result;
use crate::model::{Batch, Model, Trace};
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

/// Best-of-`reps` f32 matmul rate in FLOP/s for `[n, n] x [n, n]`.
pub fn matmul_peak(device: &Device, n: usize, reps: usize) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let _ = a.matmul(&b)?; // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        c.device().synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best)
}

/// FLOPs of one full forward over `batch x seq` tokens, counting what the code executes:
/// every linear map, attention scores and mixing over the full (masked) square, and the head.
pub fn forward_flops(model: &Model, batch: usize, seq: usize) -> f64 {
    let c = &model.config;
    let tokens = (batch * seq) as f64;
    let (d, q) = (c.d_model as f64, (c.n_heads * c.head_dim) as f64);
    let linear = tokens * forward_flops_linear_per_position(model) * c.n_layers as f64;
    let attn = 2.0 * 2.0 * batch as f64 * (seq as f64).powi(2) * q * c.n_layers as f64;
    let head = 2.0 * tokens * d * c.vocab_size as f64;
    linear + attn + head
}

/// FLOPs of one position through one layer's linear maps (the unit of "block evaluations").
pub fn forward_flops_linear_per_position(model: &Model) -> f64 {
    let c = &model.config;
    let (d, m, hd) = (c.d_model as f64, c.d_mlp as f64, c.head_dim as f64);
    let (q, kv) = (c.n_heads as f64 * hd, c.n_kv_heads as f64 * hd);
    2.0 * match c.arch {
        crate::model::Arch::Llama => d * q + 2.0 * d * kv + q * d + 3.0 * d * m,
        crate::model::Arch::Gpt2 => 4.0 * d * d + 2.0 * d * m,
    }
}

/// Prefill throughput on random tokens.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrefillReport {
    pub batch: usize,
    pub seq: usize,
    pub best_seconds: f64,
    pub tokens_per_second: f64,
    pub gflop_per_forward: f64,
    pub achieved_gflops: f64,
    pub matmul_peak_gflops: f64,
    pub fraction_of_peak: f64,
}

/// Time `reps` forwards of a `batch x seq` batch (best of) and compare with the matmul peak.
pub fn prefill(model: &Model, batch: usize, seq: usize, reps: usize) -> Result<PrefillReport> {
    let v = model.config.vocab_size as u32;
    let ids: Vec<Vec<u32>> = (0..batch)
        .map(|r| {
            (0..seq)
                .map(|i| ((r * 7919 + i * 104729) as u32) % v)
                .collect()
        })
        .collect();
    let b = Batch { ids, mask: None };
    let _ = model.forward(&b, &mut Trace::new())?.to_dtype(DType::F32)?; // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        let y = model.forward(&b, &mut Trace::new())?;
        y.device().synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let peak = matmul_peak(&model.device, 1024, 5)?;
    let flops = forward_flops(model, batch, seq);
    Ok(PrefillReport {
        batch,
        seq,
        best_seconds: best,
        tokens_per_second: (batch * seq) as f64 / best,
        gflop_per_forward: flops / 1e9,
        achieved_gflops: flops / best / 1e9,
        matmul_peak_gflops: peak / 1e9,
        fraction_of_peak: flops / best / peak,
    })
}
