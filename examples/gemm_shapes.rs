//! Matmul rates for the shapes a block runs, against the square peak, in one process:
//! separate q/k/v and gate/up maps against merged ones, weights read transposed (`x · Wᵀ`, as
//! `linear` does) against weights stored as `[in, out]`, the whole MLP on all rows against
//! blocks of rows (what `llama::mlp_in_row_blocks` does), and the output head.
//! A benchmark for choosing shapes, not a test: the rates move with the machine's load.
//!
//! `cargo run --release --example gemm_shapes -- [rows]`
use candle_core::{Device, Tensor};
use std::time::Instant;

fn rate(f: &dyn Fn() -> Tensor, flops: f64) -> f64 {
    let _ = f();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let _ = f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    flops / best / 1e9
}

fn main() -> candle_core::Result<()> {
    let m: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(2048);
    let dev = Device::Cpu;
    let d = 576;
    let peak = engram::bench::matmul_peak(&dev, 1024, 5).unwrap() / 1e9;
    println!("square peak 1024: {peak:.1} GFLOP/s");
    let x = Tensor::randn(0f32, 1.0, (m, d), &dev)?;
    for &(name, outs) in &[
        ("q,k,v separate", &[576usize, 192, 192][..]),
        ("qkv merged", &[960][..]),
        ("o", &[576][..]),
        ("gate,up separate", &[1536, 1536][..]),
        ("gate+up merged", &[3072][..]),
    ] {
        let ws: Vec<Tensor> = outs
            .iter()
            .map(|&o| Tensor::randn(0f32, 1.0, (o, d), &dev).unwrap())
            .collect();
        let wt: Vec<Tensor> = ws
            .iter()
            .map(|w| w.t().unwrap().contiguous().unwrap())
            .collect();
        let flops: f64 = outs.iter().map(|&o| 2.0 * (m * d * o) as f64).sum();
        let a = rate(
            &|| {
                let mut y = None;
                for w in &ws {
                    y = Some(x.matmul(&w.t().unwrap()).unwrap());
                }
                y.unwrap()
            },
            flops,
        );
        let b = rate(
            &|| {
                let mut y = None;
                for w in &wt {
                    y = Some(x.matmul(w).unwrap());
                }
                y.unwrap()
            },
            flops,
        );
        println!(
            "{name:18} m={m}: x·Wᵀ {a:6.1} GFLOP/s ({:.0}%), x·W(in,out) {b:6.1} ({:.0}%)",
            100.0 * a / peak,
            100.0 * b / peak
        );
    }
    let h = Tensor::randn(0f32, 1.0, (m, 1536), &dev)?;
    let wd = Tensor::randn(0f32, 1.0, (576, 1536), &dev)?;
    let c = rate(
        &|| h.matmul(&wd.t().unwrap()).unwrap(),
        2.0 * (m * 1536 * 576) as f64,
    );
    let wdt = wd.t()?.contiguous()?;
    let e = rate(&|| h.matmul(&wdt).unwrap(), 2.0 * (m * 1536 * 576) as f64);
    println!(
        "{:18} m={m}: x·Wᵀ {c:6.1} GFLOP/s ({:.0}%), x·W(in,out) {e:6.1} ({:.0}%)",
        "down",
        100.0 * c / peak,
        100.0 * e / peak
    );
    // The whole MLP (gate, up, SwiGLU, down) on all rows at once, and in row chunks.
    let wg = Tensor::randn(0f32, 0.05, (1536, d), &dev)?;
    let wu = Tensor::randn(0f32, 0.05, (1536, d), &dev)?;
    let mlp = |x: &Tensor| -> Tensor {
        let g = x.matmul(&wg.t().unwrap()).unwrap();
        let u = x.matmul(&wu.t().unwrap()).unwrap();
        let k = engram::model::fused::swiglu(&g, &u).unwrap();
        k.matmul(&wd.t().unwrap()).unwrap()
    };
    let flops = 2.0 * 3.0 * (m * d * 1536) as f64;
    let whole = rate(&|| mlp(&x), flops);
    print!(
        "mlp m={m}: whole {whole:6.1} GFLOP/s ({:.0}%)",
        100.0 * whole / peak
    );
    for chunk in [512usize, 1024, 2048] {
        let r = rate(
            &|| {
                let parts: Vec<Tensor> = (0..m)
                    .step_by(chunk)
                    .map(|i| mlp(&x.narrow(0, i, chunk.min(m - i)).unwrap()))
                    .collect();
                Tensor::cat(&parts, 0).unwrap()
            },
            flops,
        );
        print!(", chunks of {chunk} {r:6.1} ({:.0}%)", 100.0 * r / peak);
    }
    println!();
    // The output head on `m / 8` rows: all at once, and in blocks of 64 rows.
    let wh = Tensor::randn(0f32, 0.05, (49152, d), &dev)?;
    let hm = (m / 8).max(64);
    let xh = Tensor::randn(0f32, 1.0, (hm, d), &dev)?;
    let flops = 2.0 * (hm * d * 49152) as f64;
    let whole = rate(&|| xh.matmul(&wh.t().unwrap()).unwrap(), flops);
    let blocks = rate(
        &|| {
            let parts: Vec<Tensor> = (0..hm)
                .step_by(64)
                .map(|i| {
                    xh.narrow(0, i, 64.min(hm - i))
                        .unwrap()
                        .matmul(&wh.t().unwrap())
                        .unwrap()
                })
                .collect();
            parts.last().unwrap().clone()
        },
        flops,
    );
    println!(
        "head on {hm} rows: whole {whole:6.1} GFLOP/s ({:.0}%), blocks of 64 {blocks:6.1} ({:.0}%)",
        100.0 * whole / peak,
        100.0 * blocks / peak
    );
    Ok(())
}
