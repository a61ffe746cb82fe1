//! Where one step of the v* search spends its time: the forward and backward of blocks
//! `layer..` on a batch shaped like a ROME search (rows x tail positions, with a cached prefix),
//! against the linear maps of those blocks alone (the matmul floor).
//!
//! cargo run --release --example step_profile -- [rows] [tail] [past] [layer] [reps]
use candle_core::{DType, Device, Tensor, Var};
use engram::model::{Batch, HookPoint, KvCache, Trace};
use std::time::Instant;

fn main() -> engram::Result<()> {
    engram::tune_allocator();
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let get = |i: usize, d: usize| a.get(i).copied().unwrap_or(d);
    let (rows, tail, past, layer, reps) = (get(0, 22), get(1, 8), get(2, 22), get(3, 5), get(4, 5));
    let dev = Device::Cpu;
    let m = engram::model::load(None, &dev)?;
    let cfg = m.config.clone();
    let n = cfg.n_layers;
    // The clean pass: cache of `past` positions, the residual entering `layer` after them.
    let ids: Vec<Vec<u32>> = (0..rows)
        .map(|r| {
            (0..past + tail)
                .map(|j| (100 + 37 * r + 11 * j) as u32 % 40000)
                .collect()
        })
        .collect();
    let mut tr = Trace::new();
    tr.capture(HookPoint::ResidPre(layer));
    tr.stop_after(HookPoint::ResidPost(n - 1));
    let mut cache = KvCache::new(n);
    m.forward_cached(&Batch { ids, mask: None }, Some(&mut cache), &mut tr)?;
    let resid = tr.take(HookPoint::ResidPre(layer)).expect("captured");
    let resid = resid.narrow(1, past, tail)?.contiguous()?;
    let prefix = cache.truncate(past)?;
    let delta = Var::zeros((rows, tail, cfg.d_model), DType::F32, &dev)?;

    let (mut fwd, mut bwd) = (0f64, 0f64);
    for _ in 0..reps {
        let t0 = Instant::now();
        let x = (&resid + delta.as_tensor())?;
        let mut tr = Trace::new().differentiable();
        tr.stop_after(HookPoint::ResidPost(n - 1));
        let mut c = prefix.clone();
        let y = m.forward_from(layer, &x, None, Some(&mut c), &mut tr, false)?;
        let loss = y.sqr()?.sum_all()?;
        let t1 = Instant::now();
        let g = loss.backward()?;
        let _ = g.get(delta.as_tensor()).expect("grad");
        let t2 = Instant::now();
        fwd += (t1 - t0).as_secs_f64();
        bwd += (t2 - t1).as_secs_f64();
    }
    // The linear maps alone (forward, then the input gradient: grad @ W), same shapes.
    let names = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ];
    let mut lin = 0f64;
    let mut flops = 0f64;
    for _ in 0..reps {
        let t0 = Instant::now();
        for l in layer..n {
            for nm in names {
                let w = m.weights.get(&format!("model.layers.{l}.{nm}"))?;
                let (o, i) = w.dims2()?;
                let x = Tensor::ones((rows * tail, i), DType::F32, &dev)?;
                let y = x.matmul(&w.t()?)?;
                let g = y.matmul(w)?;
                let _ = g.dims();
                flops += 4.0 * (rows * tail * o * i) as f64;
            }
        }
        lin += t0.elapsed().as_secs_f64();
    }
    // Attention alone (scores, mask, softmax, weighted sum over grouped heads), forward and
    // backward, once per block, at the same shapes.
    let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let q = Var::randn(0f32, 1., (rows, nh, tail, hd), &dev)?;
    let kv = Var::randn(0f32, 1., (rows, nkv, past + tail, hd), &dev)?;
    let bias = engram::model::layers::attention_bias(rows, tail, past, None, &dev)?;
    let mut att = 0f64;
    for _ in 0..reps {
        let t0 = Instant::now();
        for _ in layer..n {
            let (k, v) = (kv.as_tensor(), kv.as_tensor());
            let y = engram::model::layers::attend(q.as_tensor(), k, v, bias.as_ref(), true)?;
            let g = y.sqr()?.sum_all()?.backward()?;
            let _ = g.get(q.as_tensor());
        }
        att += t0.elapsed().as_secs_f64();
    }
    let r = reps as f64;
    println!(
        "attention alone (fwd + bwd, {} blocks): {:.3} s",
        n - layer,
        att / r
    );
    println!(
        "rows {rows} x tail {tail} (past {past}), layers {layer}..{n}: forward {:.3} s, backward {:.3} s, step {:.3} s; linears alone (fwd + input grad) {:.3} s = {:.1} GFLOP/s; blocks {:.0}% over the linears",
        fwd / r,
        bwd / r,
        (fwd + bwd) / r,
        lin / r,
        flops / lin / 1e9,
        100.0 * ((fwd + bwd) / lin - 1.0)
    );
    Ok(())
}
