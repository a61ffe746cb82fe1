//! `engram stats [--model M] --layer L [--corpus FILE | --self-samples N] [--seq-len T]`.

use anyhow::Result;
use engram::stats::{self, Corpus, StatsSpec};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    layer: usize,
    /// A text file to take keys from (default: text the model samples itself).
    #[arg(long, conflicts_with = "self_samples")]
    corpus: Option<PathBuf>,
    /// Number of sequences (self-sampled, or cut from the corpus).
    #[arg(long, default_value_t = 200)]
    self_samples: usize,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    super::check_outputs(&[("--json", a.json.as_deref())], &[])?;
    let m = super::load_model(a.model.as_deref())?;
    m.config.check_layer(a.layer)?;
    engram::limits::int_in("--seq-len", a.seq_len, 2, m.config.max_positions)
        .map_err(engram::Error::from)?;
    engram::limits::int_in("--self-samples", a.self_samples, 1, 1_000_000)
        .map_err(engram::Error::from)?;
    let spec = StatsSpec {
        layer: a.layer,
        corpus: a
            .corpus
            .clone()
            .map(Corpus::File)
            .unwrap_or(Corpus::SelfSampled),
        samples: a.self_samples,
        seq_len: a.seq_len,
        seed: a.seed,
    };
    let fp = m.fingerprint()?;
    let pb = indicatif::ProgressBar::new(spec.samples as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "sampling [{bar:30}] {pos}/{len} {elapsed} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let t0 = std::time::Instant::now();
    let s = stats::load_or_compute(&m, &fp, &spec, &mut |done, _| pb.set_position(done as u64))?;
    pb.finish_and_clear();
    let c: Vec<Vec<f64>> = s.mom2.to_dtype(candle_core::DType::F64)?.to_vec2()?;
    let trace: f64 = (0..c.len()).map(|i| c[i][i]).sum();
    println!(
        "layer {}: {} ({:.1} s); trace(C) = {trace:.4}",
        a.layer,
        stats::describe(&s),
        t0.elapsed().as_secs_f64()
    );
    if let Some(j) = &a.json {
        super::write_json(
            j,
            &serde_json::json!({
                "layer": a.layer, "keys": s.count, "trace": trace,
                "cache": s.cache_path.as_ref().map(|p| p.display().to_string()),
                "seconds": t0.elapsed().as_secs_f64(),
            }),
        )?;
    }
    Ok(())
}
