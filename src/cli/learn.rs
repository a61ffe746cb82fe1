//! `engram learn DATA [--model M] --out PATH [--layers all] [--steps N] [--lr X] [--seed S]`.

use anyhow::Result;
use comfy_table::Table;
use engram::limits::parse_layers;
use engram::output::Outputs;
use engram::unlearn::learn::{learn, LearnParams};
use engram::unlearn::request::Optimizer;
use engram::unlearn::{load_records, Example};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Data: JSONL or YAML records `{question, answer}`, `{prompt, answer}` or `{text}`.
    data: PathBuf,
    #[arg(long)]
    model: Option<String>,
    /// Where to write the tuned checkpoint (GGUF for GGUF input, else a HF directory).
    #[arg(long)]
    out: PathBuf,
    /// GGUF output matrix type. `input` (default) writes each matrix in its input type and
    /// trains through that type's grid (quantization-aware, straight-through estimator), so
    /// the file holds what was learned; `f16` / `f32` train in f32 and write that type.
    #[arg(long, default_value = "input", value_parser = ["input", "f16", "f32"])]
    out_type: String,
    /// Layers to train: `all`, `10-19`, `3,5,7`.
    #[arg(long, default_value = "all")]
    layers: String,
    #[arg(long, default_value_t = 60)]
    steps: usize,
    /// AdamW learning rate. Default 1e-3 when training through a quantized grid (`--out-type
    /// input` on a GGUF: a step must cross half a Q4 grid step to change the file), else 1e-4.
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Stop when one pass over the data has a mean answer-token NLL at or below this.
    #[arg(long, default_value_t = 0.05)]
    target_loss: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train only this share of each matrix's entries, those with the largest gradient
    /// (0 < x <= 1; default: all).
    #[arg(long)]
    saliency: Option<f64>,
    /// How weights move: `adamw` (default), `sgd` (max-norm steepest descent) or `grid`
    /// (greedy grid descent: each step moves the `--crossings` entries with the best
    /// gain-to-locality-cost ratio one grid step; see `src/unlearn/grid_descent.rs`).
    #[arg(long, value_enum, default_value_t = Optimizer::Adamw)]
    optimizer: Optimizer,
    /// `--optimizer grid`: entries moved per step.
    #[arg(long, default_value_t = 2000)]
    crossings: usize,
    /// Prompts whose answers must stay as they are: a JSONL or YAML file of records with a
    /// `prompt` (CounterFact's records work as they are) or a `question` (TOFU's). Each step
    /// adds `--keep-weight` x KL(before || now) on the model's own continuation of a batch of
    /// them, so the data's answer style does not spread to other prompts.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// `--keep`: use the file's first N prompts.
    #[arg(long, default_value_t = 200)]
    keep_n: usize,
    #[arg(long, default_value_t = 1.0)]
    keep_weight: f64,
    /// `--keep` prompts that are also this locality suite's prompts are dropped, so that the
    /// suite stays a held-out measure of what learning moved.
    #[arg(long, default_value = "eval/unrelated.yaml")]
    suite: PathBuf,
    /// Only records whose `author` is in this range (TOFU data), e.g. `0-9`.
    #[arg(long)]
    authors: Option<String>,
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let mut recs = load_records(&a.data)?;
    if let Some(sel) = &a.authors {
        let keep = parse_layers(sel, usize::MAX, "--authors")?;
        recs.retain(|r| r.author.is_some_and(|x| keep.contains(&x)));
        if recs.is_empty() {
            return Err(engram::Error::invalid(
                "--authors",
                format!("no record of {} has an author in `{sel}`", a.data.display()),
            )
            .into());
        }
    }
    let data: Vec<Example> = recs
        .iter()
        .enumerate()
        .map(|(i, r)| r.example(&format!("{}: record {}", a.data.display(), i + 1)))
        .collect::<engram::Result<_>>()?;
    {
        use engram::limits::{int_in, real_in, MAX_STEPS};
        int_in("--steps", a.steps, 1, MAX_STEPS).map_err(engram::Error::from)?;
        int_in("--batch-size", a.batch_size, 1, 10_000).map_err(engram::Error::from)?;
        real_in("--target-loss", a.target_loss, 0.0, 1e6, false).map_err(engram::Error::from)?;
        int_in("--keep-n", a.keep_n, 1, 100_000).map_err(engram::Error::from)?;
        real_in("--keep-weight", a.keep_weight, 0.0, 1e6, false).map_err(engram::Error::from)?;
        if let Some(lr) = a.lr {
            real_in("--lr", lr, 0.0, 10.0, true).map_err(engram::Error::from)?;
        }
    }
    let keep = match &a.keep {
        Some(f) => {
            let mut k = engram::unlearn::learn::load_keep_prompts(f, a.keep_n)?;
            let suite = engram::eval::metrics::Suite::load(&a.suite)?;
            let n = k.len();
            k.retain(|p| !suite.prompts.iter().any(|s| s.prompt.trim() == p.trim()));
            if k.len() < n {
                eprintln!(
                    "--keep: {} of {n} prompts are in {} and are left out",
                    n - k.len(),
                    a.suite.display()
                );
            }
            k
        }
        None => vec![],
    };
    let model_path = engram::model::load::resolve(a.model.as_deref())?;
    let mut outs = Outputs::new(&[&a.data, &model_path]);
    let out_tmp = outs.model("--out", &a.out, model_path.is_dir())?;
    let json_tmp = a
        .json
        .as_ref()
        .map(|j| outs.file("--json", j))
        .transpose()?;
    let m = super::load_model(a.model.as_deref())?;
    let mut p = LearnParams::defaults(m.config.n_layers);
    p.layers = parse_layers(&a.layers, m.config.n_layers, "--layers")?;
    p.steps = a.steps;
    p.batch_size = a.batch_size;
    p.target_loss = a.target_loss;
    p.seed = a.seed;
    if let Some(x) = a.saliency {
        if !(x > 0.0 && x <= 1.0) {
            return Err(engram::Error::invalid("--saliency", "must be a share in (0, 1]").into());
        }
        p.saliency = Some(x);
    }
    p.optimizer = a.optimizer;
    p.keep = keep;
    p.keep_weight = a.keep_weight;
    {
        use engram::limits::int_in;
        int_in("--crossings", a.crossings, 1, 100_000_000).map_err(engram::Error::from)?;
    }
    p.crossings = a.crossings;
    let is_gguf = matches!(m.source.format, engram::model::Format::Gguf { .. });
    if is_gguf && a.out_type == "input" {
        p.grid = Some(engram::model::quant::DeployType::Input);
    }
    p.lr = a.lr.unwrap_or(if p.grid.is_some() { 1e-3 } else { 1e-4 });
    let pb = indicatif::ProgressBar::new(p.steps as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "learn {bar:30} {pos}/{len} loss {msg} [{elapsed_precise} < {eta_precise}]",
        )?,
    );
    let (tuned, report) = learn(&m, &data, &p, &mut |_, loss| {
        pb.inc(1);
        pb.set_message(format!("{loss:.4}"));
    })?;
    pb.finish_and_clear();
    super::save_model(&tuned, &out_tmp, &a.out_type)?;
    if let Some(j) = &json_tmp {
        super::write_json(j, &report)?;
    }
    outs.commit()?;
    let mut t = Table::new();
    t.set_header(vec!["learn", "value"]);
    t.add_row(vec!["examples".to_string(), report.examples.to_string()]);
    t.add_row(vec![
        "trained parameters".to_string(),
        report.trained_params.to_string(),
    ]);
    t.add_row(vec!["steps".to_string(), report.steps.to_string()]);
    t.add_row(vec![
        "answer NLL before -> after".to_string(),
        format!("{:.4} -> {:.4}", report.loss_before, report.loss_after),
    ]);
    t.add_row(vec![
        "reached target loss".to_string(),
        report.reached_target.to_string(),
    ]);
    t.add_row(vec![
        "seconds".to_string(),
        format!("{:.1}", report.seconds),
    ]);
    println!("{t}");
    println!("tuned model: {}", a.out.display());
    Ok(())
}
