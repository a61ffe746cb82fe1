//! `engram bench [--model M] [--batch B] [--seq T] [--json FILE]`: load time, prefill
//! throughput and the FLOP rate as a fraction of the matmul peak measured in the same process.

use anyhow::Result;
use comfy_table::Table;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    seq: usize,
    #[arg(long, default_value_t = 5)]
    reps: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct Report {
    load_seconds: f64,
    prefill: engram::bench::PrefillReport,
}

pub fn run(a: Args) -> Result<()> {
    use engram::limits::int_in;
    int_in("--batch", a.batch, 1, 1024).map_err(engram::Error::from)?;
    int_in("--seq", a.seq, 1, 1 << 16).map_err(engram::Error::from)?;
    int_in("--reps", a.reps, 1, 1000).map_err(engram::Error::from)?;
    super::check_outputs(&[("--json", a.json.as_deref())], &[])?;
    // Resolve (and fetch) first so that the load time excludes any download.
    let path = engram::model::load::resolve(a.model.as_deref())?;
    let t0 = Instant::now();
    let m = super::load_model(Some(path.to_string_lossy().as_ref()))?;
    let load_seconds = t0.elapsed().as_secs_f64();
    int_in("--seq", a.seq, 1, m.config.max_positions).map_err(engram::Error::from)?;
    let p = engram::bench::prefill(&m, a.batch, a.seq, a.reps)?;
    let mut t = Table::new();
    t.set_header(vec!["measure", "value"]);
    t.add_row(vec![
        "load + dequantize (s)".into(),
        format!("{load_seconds:.2}"),
    ]);
    t.add_row(vec![
        "prefill batch".into(),
        format!("{} x {}", p.batch, p.seq),
    ]);
    t.add_row(vec![
        "prefill best (s)".into(),
        format!("{:.3}", p.best_seconds),
    ]);
    t.add_row(vec![
        "tokens/s".into(),
        format!("{:.0}", p.tokens_per_second),
    ]);
    t.add_row(vec![
        "GFLOP per forward".into(),
        format!("{:.1}", p.gflop_per_forward),
    ]);
    t.add_row(vec![
        "achieved GFLOP/s".into(),
        format!("{:.1}", p.achieved_gflops),
    ]);
    t.add_row(vec![
        "matmul peak GFLOP/s (1024^3, same process)".into(),
        format!("{:.1}", p.matmul_peak_gflops),
    ]);
    t.add_row(vec![
        "fraction of peak".into(),
        format!("{:.0}%", 100.0 * p.fraction_of_peak),
    ]);
    println!("{t}");
    if let Some(j) = a.json {
        super::write_json(
            &j,
            &Report {
                load_seconds,
                prefill: p,
            },
        )?;
    }
    Ok(())
}
