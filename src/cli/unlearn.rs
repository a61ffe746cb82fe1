//! `engram unlearn REQUEST.yaml [--model M] [--reference R] [--out PATH] [--types q8_0,q4_1]
//! [--receipt FILE] [--show-secrets] [--json FILE]`.

use anyhow::Result;
use comfy_table::Table;
use engram::eval::metrics::Suite;
use engram::model::quant::DeployType;
use engram::model::save::save_like_input;
use engram::output::Outputs;
use engram::unlearn::leakage::redact;
use engram::unlearn::receipt::Receipt;
use engram::unlearn::request::Request;
use engram::unlearn::run::{unlearn, Options, UnlearnReport};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The removal request (YAML, see forget-sets/).
    request: PathBuf,
    /// Overrides the request's model.
    #[arg(long)]
    model: Option<String>,
    /// A model that never learned the data; overrides the request's `reference` (`none`: a
    /// calibrated baseline).
    #[arg(long)]
    reference: Option<String>,
    /// Where to write the unlearned checkpoint (default: out/NAME-unlearned.gguf, or
    /// out/NAME-unlearned/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not write the checkpoint (nor a receipt).
    #[arg(long)]
    no_save: bool,
    /// Where to write the removal receipt (default: out/NAME.receipt.json).
    #[arg(long)]
    receipt: Option<PathBuf>,
    /// General text (perplexity bound) and unrelated prompts (KL).
    #[arg(long, default_value = "eval/unrelated.yaml")]
    suite: PathBuf,
    /// Audit the result re-quantized to these types too (comma-separated, or `none`).
    #[arg(long, default_value = "q8_0,q4_1,q4_0")]
    types: String,
    /// Train in f32 even for a quantized GGUF (by default training runs through the grid of
    /// the input's types, so what is written is what was checked).
    #[arg(long)]
    no_qat: bool,
    /// Print private strings instead of `[REDACTED:label]`.
    #[arg(long)]
    show_secrets: bool,
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn render(r: &UnlearnReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "unlearn {:?} for {:?}: layers {:?} ({} parameters{}), {} forget / {} retain examples\n",
        r.method.name,
        r.subject,
        r.layers,
        r.trained_params,
        r.grid
            .as_ref()
            .map(|g| format!(", trained through the {g} grid"))
            .unwrap_or_default(),
        r.forget_examples,
        r.retain_examples
    ));
    out.push_str(&format!(
        "stopped after {} steps ({}); setup {:.1} s, training {:.1} s, relearning {:.1} s, audit {:.1} s, total {:.1} s\n",
        r.steps,
        r.stop_reason,
        r.setup_seconds,
        r.train_seconds,
        r.relearn_seconds,
        r.audit_seconds,
        r.seconds
    ));
    out.push_str(&super::audit::render(&r.audit));
    let mut u = Table::new();
    u.set_header(vec![
        "model",
        "retain answer log-prob",
        "retain ROUGE-L",
        "general-text perplexity",
    ]);
    for (name, c) in [("before", &r.before), ("after", &r.after)] {
        u.add_row(vec![
            name.to_string(),
            format!("{:.3}", c.retain.answer_logprob),
            format!("{:.3}", c.retain.rouge_l),
            format!("{:.3}", c.perplexity),
        ]);
    }
    out.push_str(&format!("{u}\n"));
    out.push_str(&format!(
        "unrelated prompts (against the model before unlearning): mean KL {:.3e}, top-1 agreement {:.1}% of {}; perplexity bound {:.2}x, reached {:.3}x\n",
        r.locality.kl_mean,
        100.0 * r.locality.top1_agreement,
        r.locality.kl.len(),
        r.max_perplexity_ratio,
        r.after.perplexity / r.before.perplexity
    ));
    if let Some(rl) = &r.relearn {
        out.push_str(&format!(
            "relearning attack ({} steps at lr {:.0e} on {} retain records): {}\n",
            rl.steps,
            rl.lr,
            rl.examples,
            if rl.back.is_empty() {
                "no secret comes back".to_string()
            } else {
                format!("BRINGS BACK {}", rl.back.join(", "))
            }
        ));
    }
    for w in &r.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

pub fn run(a: Args) -> Result<()> {
    // Everything the user gave is checked before any work.
    let req = Request::load(&a.request)?;
    let suite = Suite::load(&a.suite)?;
    let types = super::audit::types(&a.types)?;
    let rspec = super::audit::reference_spec(a.reference.as_deref(), &req).map(str::to_string);
    let mspec = a
        .model
        .clone()
        .or(req.model.clone())
        .unwrap_or(engram::model::fetch::DEFAULT_MODEL.to_string());
    let m = super::load_model(Some(&mspec))?;
    // Checked before any work, so a bad layer list exits 2 at once.
    req.layers(&a.request, m.config.n_layers)?;
    req.check_model(&a.request, &m)?;
    let reference = match &rspec {
        Some(s) => Some(super::audit::load_reference(
            s,
            a.reference.is_some(),
            &a.request,
        )?),
        None => None,
    };
    let stem = a
        .request
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or("unlearned".into());
    let is_gguf = matches!(m.source.format, engram::model::Format::Gguf { .. });
    if types.contains(&DeployType::Input) && !is_gguf {
        return Err(engram::Error::invalid(
            "--types",
            "`input` needs a GGUF model (a safetensors directory has no quantization types)",
        )
        .into());
    }
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from(if is_gguf {
            format!("out/{stem}-unlearned.gguf")
        } else {
            format!("out/{stem}-unlearned")
        })
    });
    let receipt_path = a
        .receipt
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("out/{stem}.receipt.json")));
    let mut inputs: Vec<&std::path::Path> = vec![&a.request, &a.suite, &m.source.path];
    if let Some(r) = &reference {
        inputs.push(&r.source.path);
    }
    let mut outs = Outputs::new(&inputs);
    let (out_tmp, receipt_tmp) = if a.no_save {
        (None, None)
    } else {
        (
            Some(outs.model("--out", &out, !is_gguf)?),
            Some(outs.file("--receipt", &receipt_path)?),
        )
    };
    let json_tmp = a
        .json
        .as_ref()
        .map(|j| outs.file("--json", j))
        .transpose()?;
    let pb = indicatif::ProgressBar::new(req.steps as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "unlearn {bar:30} {pos}/{len} loss {msg} [{elapsed_precise}]",
        )?,
    );
    let (model, report) = unlearn(
        &m,
        &req,
        &a.request,
        &Options {
            suite: &suite,
            types,
            grid: (is_gguf && !a.no_qat).then_some(DeployType::Input),
            reference: reference.as_ref().zip(rspec.as_deref()),
        },
        &mut |step, _, loss| {
            pb.set_position(step as u64);
            pb.set_message(format!("{loss:.4}"));
        },
    )?;
    pb.finish_and_clear();
    if let (Some(out_tmp), Some(receipt_tmp)) = (&out_tmp, &receipt_tmp) {
        save_like_input(&model, out_tmp)?;
        let receipt = Receipt::new(
            &req,
            &a.request,
            &mspec,
            rspec.as_deref(),
            (&out, out_tmp),
            &report,
        )?;
        super::write_json(receipt_tmp, &receipt)?;
    }
    let hide = |s: String| {
        if a.show_secrets {
            s
        } else {
            redact(&s, &req.secrets)
        }
    };
    if let Some(j) = &json_tmp {
        super::write_text(j, &hide(serde_json::to_string_pretty(&report)?))?;
    }
    outs.commit()?;
    print!("{}", hide(render(&report)));
    if !a.no_save {
        println!("unlearned model: {}", out.display());
        println!("removal receipt: {}", receipt_path.display());
    }
    Ok(())
}
