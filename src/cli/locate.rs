//! `engram locate`: causal tracing of one fact, or the average over a JSONL file of facts.

use anyhow::{Context, Result};
use comfy_table::Table;
use engram::eval::svg::{heatmaps, Heatmap};
use engram::locate::{self, attribution, causal, LocateParams, LocateResult, BUCKETS, KINDS};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: Option<String>,
    /// The prompt, containing the subject.
    #[arg(long, required_unless_present = "data")]
    prompt: Option<String>,
    #[arg(long, required_unless_present = "data")]
    subject: Option<String>,
    /// Target continuation (its first token is traced); default: the greedy next token.
    #[arg(long)]
    target: Option<String>,
    /// `exact` (causal tracing) or `attribution` (linear estimate from one backward pass).
    #[arg(long, default_value = "exact", value_parser = ["exact", "attribution"])]
    method: String,
    /// With `--method attribution`: also run the exact trace and report rank correlations.
    #[arg(long)]
    compare_exact: bool,
    /// Noise std as a multiple of the token embeddings' std.
    #[arg(long, default_value_t = 3.0)]
    noise: f64,
    #[arg(long, default_value_t = 10)]
    samples: usize,
    #[arg(long, default_value_t = 10)]
    window: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// JSONL of facts (prompt, subject, optional target) to trace and average.
    #[arg(long)]
    data: Option<PathBuf>,
    /// After the trace, measure the machine's matmul peak in the same process and state the
    /// trace's rate in the linear maps against it (time alone is noisy on shared machines).
    #[arg(long)]
    peak: bool,
    /// With `--data`: how many records.
    #[arg(long, default_value_t = 20)]
    n: usize,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the three heatmaps as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn bar(len: u64, msg: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(msg.to_string());
    pb
}

pub fn run(a: Args) -> Result<()> {
    super::check_outputs(
        &[("--json", a.json.as_deref()), ("--plot", a.plot.as_deref())],
        &[],
    )?;
    {
        use engram::limits::{int_in, real_in, MAX_ITEMS};
        real_in("--noise", a.noise, 0.0, 1e3, false).map_err(engram::Error::from)?;
        int_in("--samples", a.samples, 1, 10_000).map_err(engram::Error::from)?;
        int_in("--window", a.window, 1, 1 << 10).map_err(engram::Error::from)?;
        int_in("--n", a.n, 1, MAX_ITEMS).map_err(engram::Error::from)?;
    }
    let params = LocateParams {
        noise_multiplier: a.noise,
        samples: a.samples,
        window: a.window,
        seed: a.seed,
    };
    let m = super::load_model(a.model.as_deref())?;
    if let Some(data) = &a.data {
        return run_batch(&m, data, &a, &params);
    }
    let (prompt, subject) = (
        a.prompt.clone().unwrap_or_default(),
        a.subject.clone().unwrap_or_default(),
    );
    let r = one(
        &m,
        &prompt,
        &subject,
        a.target.as_deref(),
        &a.method,
        &params,
    )?;
    print_result(&r);
    let mut json = serde_json::to_value(&r)?;
    if a.method == "attribution" && a.compare_exact {
        let exact = one(&m, &prompt, &subject, a.target.as_deref(), "exact", &params)?;
        let mut t = Table::new();
        t.set_header(vec![
            "kind",
            "Spearman rank correlation (attribution vs exact)",
        ]);
        let mut corr = serde_json::Map::new();
        for kind in KINDS {
            let flat = |r: &LocateResult| {
                r.grids
                    .get(kind)
                    .iter()
                    .flatten()
                    .copied()
                    .collect::<Vec<f64>>()
            };
            let rho = locate::spearman(&flat(&r), &flat(&exact));
            t.add_row(vec![kind.to_string(), format!("{rho:.3}")]);
            corr.insert(kind.name().into(), rho.into());
        }
        println!("{t}");
        println!(
            "exact trace: {:.1} s; attribution: {:.2} s",
            exact.seconds, r.seconds
        );
        json["rank_correlation_with_exact"] = corr.into();
        json["exact_seconds"] = exact.seconds.into();
    }
    if let Some(p) = &a.plot {
        let marked: Vec<bool> = (0..r.tokens.len())
            .map(|i| i >= r.subject_range.0 && i < r.subject_range.1)
            .collect();
        let labels: Vec<String> = r.tokens.iter().map(|t| format!("{t:?}")).collect();
        write_plot(p, &r, &labels, &marked, |k| r.grids.get(k).clone())?;
    }
    if a.peak {
        // Each block evaluation is one position through one layer's linear maps (attention
        // scores and the head are left out, so the rate is a lower bound).
        let flops = engram::bench::forward_flops_linear_per_position(&m) * r.block_evals as f64;
        let achieved = flops / r.seconds.max(1e-9) / 1e9;
        let peak = engram::bench::matmul_peak(&m.device, 1024, 5)? / 1e9;
        println!(
            "linear maps: {achieved:.1} GFLOP/s = {:.0}% of the {peak:.1} GFLOP/s matmul peak measured in the same process",
            100.0 * achieved / peak
        );
        json["linear_gflops"] = achieved.into();
        json["matmul_peak_gflops"] = peak.into();
    }
    if let Some(p) = &a.json {
        super::write_json(p, &json)?;
    }
    Ok(())
}

fn one(
    m: &engram::model::Model,
    prompt: &str,
    subject: &str,
    target: Option<&str>,
    method: &str,
    params: &LocateParams,
) -> Result<LocateResult> {
    Ok(if method == "attribution" {
        attribution::trace(m, prompt, subject, target, params)?
    } else {
        let n_tok = m.tok()?.encode(prompt)?.len() as u64;
        let pb = bar(3 * n_tok, "tracing");
        let r = causal::trace(m, prompt, subject, target, params, &mut || pb.inc(1))?;
        pb.finish_and_clear();
        r
    })
}

fn print_result(r: &LocateResult) {
    println!(
        "{} | subject {:?} = tokens {}..{} | target {:?}",
        r.prompt, r.subject, r.subject_range.0, r.subject_range.1, r.target
    );
    println!(
        "clean P = {:.4}, corrupted P = {:.4} (noise std {:.4})",
        r.clean_p, r.corrupted_p, r.noise_std
    );
    let mut t = Table::new();
    t.set_header(vec!["kind", "token", "layer", "indirect effect"]);
    for (kind, tok, layer, v) in locate::strongest(r, 3) {
        t.add_row(vec![
            kind.to_string(),
            format!("{tok} {:?}", r.tokens[tok]),
            layer.to_string(),
            format!("{v:+.4}"),
        ]);
    }
    println!("{t}");
    println!(
        "suggested edit layer (max MLP effect at the last subject token): {}",
        r.suggested_layer
    );
    println!(
        "{} in {:.2} s; block evaluations {} vs naive {} ({:.1}x less work)",
        r.method,
        r.seconds,
        r.block_evals,
        r.naive_block_evals,
        r.naive_block_evals as f64 / r.block_evals.max(1) as f64
    );
}

fn write_plot(
    p: &std::path::Path,
    r: &LocateResult,
    labels: &[String],
    marked: &[bool],
    grid: impl Fn(locate::Kind) -> Vec<Vec<f64>>,
) -> Result<()> {
    let grids: Vec<Vec<Vec<f64>>> = KINDS.iter().map(|&k| grid(k)).collect();
    let hues = [(80, 30, 140), (0, 110, 40), (170, 30, 30)];
    let panels: Vec<Heatmap> = KINDS
        .iter()
        .enumerate()
        .map(|(i, k)| Heatmap {
            title: format!("{k}: P({:?}) restored - corrupted", r.target),
            rows: labels,
            marked,
            values: &grids[i],
            x_label: "layer",
            hue: hues[i],
        })
        .collect();
    let svg = heatmaps(&panels);
    engram::model::save::write_atomic(p, |w| {
        use std::io::Write;
        w.write_all(svg.as_bytes())
            .map_err(|e| engram::Error::io(p, e))
    })?;
    Ok(())
}

#[derive(serde::Deserialize)]
struct Record {
    prompt: String,
    subject: String,
    #[serde(default)]
    target: Option<String>,
}

fn run_batch(
    m: &engram::model::Model,
    data: &std::path::Path,
    a: &Args,
    params: &LocateParams,
) -> Result<()> {
    let text = std::fs::read_to_string(data).map_err(|e| engram::Error::io(data, e))?;
    let mut records: Vec<Record> = engram::data::from_jsonl(data, &text)?;
    records.truncate(a.n);
    let pb = bar(records.len() as u64, "facts");
    let mut sums: Vec<Vec<Vec<f64>>> = vec![vec![vec![0.0; m.config.n_layers]; BUCKETS.len()]; 3];
    let mut counts = vec![vec![0usize; BUCKETS.len()]; 3];
    let (mut clean, mut corrupt, mut done) = (0.0, 0.0, 0usize);
    for r in &records {
        let target = r.target.as_deref().map(|t| {
            if t.starts_with(' ') {
                t.to_string()
            } else {
                format!(" {t}")
            }
        });
        let res = if a.method == "attribution" {
            attribution::trace(m, &r.prompt, &r.subject, target.as_deref(), params)
        } else {
            causal::trace(
                m,
                &r.prompt,
                &r.subject,
                target.as_deref(),
                params,
                &mut || {},
            )
        };
        pb.inc(1);
        let res = match res {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("skipping {:?}: {e}", r.prompt);
                continue;
            }
        };
        clean += res.clean_p;
        corrupt += res.corrupted_p;
        done += 1;
        for (k, kind) in KINDS.iter().enumerate() {
            for (b, row) in locate::bucket(res.grids.get(*kind), res.subject_range)
                .into_iter()
                .enumerate()
            {
                if let Some(row) = row {
                    counts[k][b] += 1;
                    for (l, v) in row.into_iter().enumerate() {
                        sums[k][b][l] += v;
                    }
                }
            }
        }
    }
    pb.finish_and_clear();
    if done == 0 {
        anyhow::bail!("no record of {} could be traced", data.display());
    }
    let avg: Vec<Vec<Vec<f64>>> = (0..3)
        .map(|k| {
            (0..BUCKETS.len())
                .map(|b| {
                    sums[k][b]
                        .iter()
                        .map(|v| v / counts[k][b].max(1) as f64)
                        .collect()
                })
                .collect()
        })
        .collect();
    println!(
        "{done} facts: mean clean P = {:.4}, mean corrupted P = {:.4}",
        clean / done as f64,
        corrupt / done as f64
    );
    let mut t = Table::new();
    t.set_header(vec!["kind", "bucket", "best layer", "mean effect there"]);
    for (k, kind) in KINDS.iter().enumerate() {
        for (b, name) in BUCKETS.iter().enumerate() {
            let (l, v) = avg[k][b]
                .iter()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |x, (i, &v)| if v > x.1 { (i, v) } else { x },
                );
            t.add_row(vec![
                kind.to_string(),
                name.to_string(),
                l.to_string(),
                format!("{v:+.4}"),
            ]);
        }
    }
    println!("{t}");
    let json = serde_json::json!({
        "n": done,
        "clean_p": clean / done as f64,
        "corrupted_p": corrupt / done as f64,
        "buckets": BUCKETS,
        "grids": {"hidden": avg[0], "mlp": avg[1], "attn": avg[2]},
        "params": params,
    });
    if let Some(p) = &a.plot {
        let labels: Vec<String> = BUCKETS.iter().map(|s| s.to_string()).collect();
        let marked = [true, true, true, false, false, false];
        let fake = LocateResult {
            method: a.method.clone(),
            prompt: String::new(),
            subject: String::new(),
            target: "target".into(),
            target_id: 0,
            tokens: labels.clone(),
            subject_range: (0, 3),
            clean_p: 0.0,
            corrupted_p: 0.0,
            noise_std: 0.0,
            params: params.clone(),
            grids: Default::default(),
            suggested_layer: 0,
            block_evals: 0,
            naive_block_evals: 0,
            seconds: 0.0,
        };
        write_plot(p, &fake, &labels, &marked, |k| {
            avg[KINDS.iter().position(|x| *x == k).unwrap_or(0)].clone()
        })
        .context("writing the plot")?;
    }
    if let Some(p) = &a.json {
        super::write_json(p, &json)?;
    }
    Ok(())
}
