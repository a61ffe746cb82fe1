//! Benchmark of the value search (MEMIT's z at layer 6, or ROME's v* at layer 5) on the first
//! N CounterFact cases: wall time, Adam steps, and rows x tail tokens per step.
//!
//! cargo run --release --example zsearch_bench -- [memit|rome] [N] [chunk] [PARAMS]
//!
//! PARAMS is a YAML map of the method's spec parameters to change, e.g. `'{v_lr: 1.0}'`.
use engram::edit::memit::MemitParams;
use engram::edit::rome::RomeParams;
use engram::edit::vsearch::{search, SearchRequest, Where};
use engram::fact::continuation;
use std::path::Path;
use std::time::Instant;

fn main() -> engram::Result<()> {
    engram::tune_allocator();
    // RUST_LOG=debug shows each chunk's rows and padding.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let method = args.first().map(String::as_str).unwrap_or("memit");
    let n: usize = args.get(1).and_then(|x| x.parse().ok()).unwrap_or(16);
    let m = engram::model::load(None, &candle_core::Device::Cpu)?;
    let cases = engram::bench::counterfact::load(
        Path::new("../shared/data/counterfact/dev-2000.jsonl"),
        0,
        n,
    )?;
    let targets: Vec<String> = cases
        .iter()
        .map(|c| continuation(&c.rewrite.target_new))
        .collect();
    let reqs: Vec<SearchRequest> = cases
        .iter()
        .zip(&targets)
        .map(|(c, t)| engram::edit::vsearch::SearchRequest::of(&c.rewrite, t))
        .collect();
    let overrides = args.get(3).map(String::as_str).unwrap_or("{}");
    let bad = |e: serde_yaml::Error| engram::Error::invalid("PARAMS", e.to_string());
    let (prefixes, layer, at, params, chunk) = if method == "rome" {
        let p: RomeParams = serde_yaml::from_str(overrides).map_err(bad)?;
        let pre = engram::edit::rome::context_prefixes(&m, &p.context_templates, p.seed)?;
        (pre, 5, Where::MlpOut, p.search(), 1)
    } else {
        let p: MemitParams = serde_yaml::from_str(overrides).map_err(bad)?;
        let pre = engram::edit::rome::context_prefixes(&m, &p.context_templates, p.seed)?;
        (pre, 6, Where::ResidPost, p.search(), p.search_chunk)
    };
    let chunk = args.get(2).and_then(|x| x.parse().ok()).unwrap_or(chunk);
    let t0 = Instant::now();
    let found = search(&m, &reqs, &prefixes, layer, at, &params, chunk)?;
    let secs = t0.elapsed().as_secs_f64();
    let steps: usize = found.iter().map(|f| f.trace.steps).sum();
    let reached = found
        .iter()
        .filter(|f| f.trace.target_prob >= params.stop_prob)
        .count();
    let mean_p: f64 = found.iter().map(|f| f.trace.target_prob).sum::<f64>() / n as f64;
    println!(
        "{method}: {n} requests, chunk {chunk}: {secs:.1} s ({:.2} s per request), {steps} steps in all, {reached}/{n} reached stop_prob, mean target prob {mean_p:.3}",
        secs / n as f64
    );
    let mut hist = vec![0usize; params.steps + 1];
    for f in &found {
        hist[f.trace.steps.min(params.steps)] += 1;
    }
    let mean_norm: f64 = found.iter().map(|f| f.trace.delta_norm).sum::<f64>() / n as f64;
    println!(
        "requests by steps taken (steps: count): {:?}",
        hist.iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .collect::<Vec<_>>()
    );
    println!("mean |delta| {mean_norm:.2}");
    Ok(())
}
