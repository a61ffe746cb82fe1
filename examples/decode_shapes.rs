//! `x · Wᵀ` at decode shapes (few rows) through gemm: time per product and the weight bytes
//! read per second, for the shapes of one SmolLM2 block and its output head.
//!
//! cargo run --release --example decode_shapes
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (n, k) in [(1536usize, 576usize), (576, 1536), (576, 576), (49152, 576)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        for m in [1usize, 2, 4, 13, 26, 64] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let reps = if n > 10000 { 5 } else { 50 };
            let _ = engram::model::matmul::x_wt_slice(&xs, &w)?;
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let t = Instant::now();
                let _ = engram::model::matmul::x_wt_slice(&xs, &w)?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{n}x{k} m={m:3}: {:8.1} us, {:6.1} GB/s of weights, {:6.1} GFLOP/s",
                best * 1e6,
                (n * k * 4) as f64 / best / 1e9,
                (2 * m * n * k) as f64 / best / 1e9
            );
        }
    }
    Ok(())
}
