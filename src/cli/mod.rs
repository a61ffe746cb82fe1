//! Command-line interface: clap derive, one file per subcommand. Each parses its flags, calls
//! one library function, prints a table (stdout) and optionally writes `--json FILE`.

mod audit;
mod bench;
mod edit;
mod eval;
mod generate;
mod inspect;
mod learn;
mod locate;
mod logprob;
mod model_cmd;
mod patch;
mod receipt;
mod stats;
mod tofu;
mod unlearn;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::Path;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "engram",
    version,
    about = "Locate, edit and unlearn facts in language models"
)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); also RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    /// How GGUF matrices are held: `f32` (every tensor dequantized; the reference path),
    /// `stored` (frozen matrices stay in their quantized blocks, only edited or trained ones
    /// become f32; same numbers as f32) or `stored-kernel` (as stored, and generation uses
    /// llama.cpp's integer kernel: faster, not bit-identical).
    #[arg(long, global = true, value_enum, env = "ENGRAM_WEIGHTS")]
    weights: Option<engram::model::WeightMode>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage models in the cache.
    Model(model_cmd::Args),
    /// Show a model's architecture, sizes and tensor types.
    Inspect(inspect::Args),
    /// Continue a prompt (greedy or sampled).
    Generate(generate::Args),
    /// Mean token log-probability of a target continuation.
    Logprob(logprob::Args),
    /// Apply an edit spec (ROME, FT-L) and report efficacy, generalisation and locality.
    Edit(edit::Args),
    /// Benchmarks and locality reports (CounterFact, compare).
    Eval(Box<eval::Args>),
    /// Key statistics C = E[k k^T] of a layer (cached).
    Stats(stats::Args),
    /// Show, apply or revert a patch file.
    Patch(patch::Args),
    /// Fine-tune a model on question/answer pairs or text (AdamW, loss on answers).
    Learn(learn::Args),
    /// Remove private data on request (GA, GradDiff, NPO) and prove it no longer leaks.
    Unlearn(unlearn::Args),
    /// Probe a model for a removal request's secrets against a reference (exit 3: leaks).
    Audit(audit::Args),
    /// Verify a removal receipt against its model.
    Receipt(receipt::Args),
    /// Causal tracing: which layers and tokens carry a fact.
    Locate(locate::Args),
    /// Prefill throughput against the machine's measured matmul peak.
    Bench(bench::Args),
}

pub fn run() -> Result<ExitCode> {
    let matches = Cli::command().get_matches();
    let leaf = leaf_command(&matches);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Some(w) = cli.weights {
        engram::model::load::set_default_mode(w);
    }
    let result = (move || -> Result<ExitCode> {
        match cli.cmd {
            Cmd::Model(a) => model_cmd::run(a),
            Cmd::Inspect(a) => inspect::run(a),
            Cmd::Generate(a) => generate::run(a),
            Cmd::Logprob(a) => logprob::run(a),
            Cmd::Locate(a) => locate::run(a),
            Cmd::Edit(a) => edit::run(a),
            Cmd::Stats(a) => stats::run(a),
            Cmd::Eval(a) => eval::run(*a),
            Cmd::Patch(a) => patch::run(a),
            Cmd::Bench(a) => bench::run(a),
            Cmd::Learn(a) => learn::run(a),
            Cmd::Unlearn(a) => unlearn::run(a),
            Cmd::Audit(a) => return audit::run(a),
            Cmd::Receipt(a) => return receipt::run(a),
        }?;
        Ok(ExitCode::SUCCESS)
    })();
    result.map_err(|e| with_flag_names(e, &leaf))
}

/// Load `--model` (default alias when absent) on the CPU, or CUDA with the `cuda` feature.
pub fn load_model(spec: Option<&str>) -> Result<engram::model::Model> {
    let device = device()?;
    Ok(engram::model::load(spec, &device)?)
}

pub fn device() -> Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    {
        return Ok(candle_core::Device::cuda_if_available(0)?);
    }
    #[allow(unreachable_code)]
    Ok(candle_core::Device::Cpu)
}

/// Write `value` as pretty JSON to `path`, atomically.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    write_text(path, &serde_json::to_string_pretty(value)?)
}

/// Write `text` to `path`, atomically.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    engram::model::save::write_atomic(path, |w| {
        use std::io::Write;
        w.write_all(text.as_bytes())
            .map_err(|e| engram::Error::io(path, e))
    })?;
    Ok(())
}

/// Save a tuned or edited model: in the input's format, GGUF matrices as `out_type` (`input`:
/// each tensor re-quantized to its input type; `f16`, `f32`).
pub fn save_model(m: &engram::model::Model, out: &Path, out_type: &str) -> Result<()> {
    use candle_core::quantized::GgmlDType;
    use engram::model::save::{save, save_like_input, SaveAs};
    let is_gguf = matches!(m.source.format, engram::model::Format::Gguf { .. });
    match (is_gguf, out_type) {
        (true, "f16") => save(m, out, SaveAs::Gguf(Some(GgmlDType::F16)))?,
        (true, "f32") => save(m, out, SaveAs::Gguf(Some(GgmlDType::F32)))?,
        _ => save_like_input(m, out)?,
    }
    Ok(())
}

/// The locality summary shared by `edit` and `eval locality`: prompts, mean KL, top-1
/// agreement and perplexity of the base and the edited model.
pub fn locality_table(header: &str, l: &engram::eval::metrics::Locality) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.set_header(vec![header, "value"]);
    t.add_row(vec!["prompts".to_string(), l.kl.len().to_string()]);
    t.add_row(vec![
        "mean KL(base || edited)".to_string(),
        format!("{:.3e}", l.kl_mean),
    ]);
    t.add_row(vec![
        "top-1 agreement".to_string(),
        format!("{:.1}%", 100.0 * l.top1_agreement),
    ]);
    t.add_row(vec![
        "perplexity base -> edited".to_string(),
        format!("{:.3} -> {:.3}", l.perplexity_base, l.perplexity_edited),
    ]);
    t
}

/// The retention table of a sequential edit: ES of all edits so far, of earlier batches, of
/// the first 1,000 and of the first batch.
pub fn retention_table(points: &[engram::edit::run::RetentionPoint]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.set_header(vec![
        "edits so far",
        "ES of all so far",
        "ES of earlier batches",
        "ES of the first 1,000",
        "ES of the first batch",
    ]);
    let pct = |x: Option<f64>| {
        x.map(|x| format!("{:.1}%", 100.0 * x))
            .unwrap_or("-".into())
    };
    for p in points {
        t.add_row(vec![
            p.edits.to_string(),
            pct(Some(p.es_all)),
            pct(p.es_earlier),
            pct(p.es_first_1000),
            pct(p.es_first_batch),
        ]);
    }
    t
}

/// Write the retention curves as SVG: ES of earlier edits (of all edits for the first
/// batch) at each retention point, and, for a CounterFact run, the ES of the first batch
/// after every batch.
pub fn write_retention_plot(
    path: &Path,
    method: &str,
    points: &[engram::edit::run::RetentionPoint],
    first_batch: &[engram::bench::counterfact::FirstBatchPoint],
) -> Result<()> {
    let pts: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.edits as f64, p.es_earlier.unwrap_or(p.es_all)))
        .collect();
    let mut series = vec![(format!("{method}: ES of earlier edits"), pts)];
    if !first_batch.is_empty() {
        series.push((
            format!("{method}: ES of the first batch"),
            first_batch.iter().map(|p| (p.edits as f64, p.es)).collect(),
        ));
    }
    let svg = engram::eval::svg::line("Retention", "edits so far", "ES", &series);
    write_text(path, &svg)
}

/// Check single-file outputs before any work (none a directory, an input or unwritable); each
/// is later written atomically on its own. Commands writing several files stage them with
/// [`engram::output::Outputs`] instead.
pub fn check_outputs(outputs: &[(&str, Option<&Path>)], inputs: &[&Path]) -> Result<()> {
    let mut o = engram::output::Outputs::new(inputs);
    for (flag, p) in outputs {
        if let Some(p) = p {
            o.file(flag, p)?;
        }
    }
    Ok(()) // dropping `o` removes any directory it created
}

/// The subcommand that runs (`eval counterfact`), as clap describes it.
fn leaf_command(matches: &clap::ArgMatches) -> clap::Command {
    let mut cmd = Cli::command();
    let mut m = matches;
    while let Some((name, sub)) = m.subcommand() {
        match cmd.find_subcommand(name) {
            Some(c) => cmd = c.clone(),
            None => break,
        }
        m = sub;
    }
    cmd
}

/// The library names the field a bad value came from (`top_p`); on the command line that
/// value came from a flag, so the message names the flag (`--top-p`) where the running
/// subcommand has one of that name. Other errors pass unchanged.
fn with_flag_names(e: anyhow::Error, cmd: &clap::Command) -> anyhow::Error {
    let Some(engram::Error::InvalidArgument { option, reason }) = e.downcast_ref() else {
        return e;
    };
    let id = option.replace('-', "_");
    match cmd
        .get_arguments()
        .find(|a| a.get_id().as_str() == id)
        .and_then(|a| a.get_long())
    {
        Some(long) => engram::Error::invalid(format!("--{long}"), reason.clone()).into(),
        None => e,
    }
}
