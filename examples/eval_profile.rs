//! Where a CounterFact case's scoring spends its time on one model: the probability
//! comparisons (ES/PS/NS) against the generation scores, one case at a time as after an edit.
//!
//! cargo run --release --example eval_profile -- DATA [n] [reps]
use engram::bench::counterfact;
use engram::eval::{generation, metrics};
use std::time::Instant;

fn main() -> engram::Result<()> {
    engram::tune_allocator();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let data = std::path::PathBuf::from(&args[0]);
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(4);
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    let m = engram::model::load(None, &candle_core::Device::Cpu)?;
    let cases = counterfact::load(&data, 0, n)?;
    let (mut all, mut gen) = (0f64, 0f64);
    let mut texts = Vec::new();
    for _ in 0..reps {
        texts.clear();
        for c in &cases {
            let r = std::slice::from_ref(&c.rewrite);
            let t0 = Instant::now();
            let s = metrics::score_rewrites(&m, r)?;
            let t1 = Instant::now();
            let g = generation::score_many(&m, r)?;
            let t2 = Instant::now();
            all += (t1 - t0).as_secs_f64();
            gen += (t2 - t1).as_secs_f64();
            texts.push((s[0].gen.gen_text.clone(), g[0].gen_text.clone()));
        }
    }
    let per = (n * reps) as f64;
    println!(
        "per case: score_rewrites {:.3} s, of which generation {:.3} s, probabilities {:.3} s",
        all / per,
        gen / per,
        (all - gen) / per
    );
    for (a, b) in texts.iter().take(3) {
        println!("{a:?} | {b:?}");
    }
    Ok(())
}
