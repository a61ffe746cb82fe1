//! `engram unlearn REQUEST.yaml [--model M] [--out PATH] [--requant q4_1] [--show-secrets]
//! [--json FILE]`.

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use comfy_table::Table;
use engram::eval::metrics::Suite;
use engram::model::save::save_like_input;
use engram::unlearn::leakage::redact;
use engram::unlearn::request::Request;
use engram::unlearn::run::{unlearn, ModelCheck, Options, UnlearnReport};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The removal request (YAML, see forget-sets/).
    request: PathBuf,
    /// Overrides the request's model.
    #[arg(long)]
    model: Option<String>,
    /// Where to write the unlearned checkpoint (default: out/NAME.gguf, or out/NAME/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not write the checkpoint.
    #[arg(long)]
    no_save: bool,
    /// General text (perplexity bound) and unrelated prompts (KL).
    #[arg(long, default_value = "eval/unrelated.yaml")]
    suite: PathBuf,
    /// Re-quantize the result to this type and probe again.
    #[arg(long, default_value = "q4_1", value_parser = ["q4_0", "q4_1", "q8_0", "none"])]
    requant: String,
    /// Print private strings instead of `[REDACTED:label]`.
    #[arg(long)]
    show_secrets: bool,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn leak_rows(t: &mut Table, name: &str, c: &ModelCheck) {
    for s in &c.secrets {
        let np = s.probes.iter().filter(|p| p.kind == "prompt").count();
        let nq = s.probes.len() - np;
        t.add_row(vec![
            name.to_string(),
            s.label.clone(),
            format!("{}/{np}", s.prompt_leaks),
            format!("{}/{nq}", s.paraphrase_leaks),
            format!("{:.3}", s.mean_logprob),
            format!("{} of {}", s.exposure.rank, s.exposure.candidates + 1),
            format!("{:.2}", s.exposure.bits),
            format!("{}/{}", s.sampled_hits, s.samples),
            if s.leaks() { "LEAKS" } else { "passes" }.to_string(),
        ]);
    }
}

pub fn render(r: &UnlearnReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "unlearn {:?} for {:?}: layers {:?} ({} parameters), {} forget / {} retain examples\n",
        r.method.name, r.subject, r.layers, r.trained_params, r.forget_examples, r.retain_examples
    ));
    out.push_str(&format!(
        "stopped after {} steps ({}), training {:.1} s, total {:.1} s\n",
        r.steps, r.stop_reason, r.train_seconds, r.seconds
    ));
    let mut t = Table::new();
    t.set_header(vec![
        "model",
        "secret",
        "greedy leaks (prompts)",
        "greedy leaks (paraphrases)",
        "mean log-prob",
        "exposure rank",
        "exposure bits",
        "sampled hits (T=1)",
        "verdict",
    ]);
    leak_rows(&mut t, "before", &r.before);
    leak_rows(&mut t, "after", &r.after);
    if let Some(q) = &r.requantized {
        leak_rows(&mut t, &format!("after, {}", q.dtype), &q.check);
    }
    out.push_str(&format!("{t}\n"));
    let mut u = Table::new();
    u.set_header(vec![
        "model",
        "retain answer log-prob",
        "retain ROUGE-L",
        "general-text perplexity",
    ]);
    let mut urow = |name: &str, c: &ModelCheck| {
        u.add_row(vec![
            name.to_string(),
            format!("{:.3}", c.retain.answer_logprob),
            format!("{:.3}", c.retain.rouge_l),
            format!("{:.3}", c.perplexity),
        ]);
    };
    urow("before", &r.before);
    urow("after", &r.after);
    if let Some(q) = &r.requantized {
        urow(&format!("after, {}", q.dtype), &q.check);
    }
    out.push_str(&format!("{u}\n"));
    out.push_str(&format!(
        "unrelated prompts: mean KL(before || after) {:.2e}, top-1 agreement {:.1}%; perplexity bound {:.2}x, reached {:.3}x\n",
        r.locality.kl_mean,
        100.0 * r.locality.top1_agreement,
        r.max_perplexity_ratio,
        r.after.perplexity / r.before.perplexity
    ));
    if let Some(q) = &r.requantized {
        out.push_str(&format!(
            "re-quantized to {}: {}\n",
            q.dtype,
            if q.leaks_again {
                format!("LEAKS AGAIN ({})", q.leaking.join(", "))
            } else {
                "no secret comes back".into()
            }
        ));
    }
    for w in &r.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

pub fn run(a: Args) -> Result<()> {
    let req = Request::load(&a.request)?;
    let suite = Suite::load(&a.suite)?;
    let requant = match a.requant.as_str() {
        "q4_0" => Some(GgmlDType::Q4_0),
        "q4_1" => Some(GgmlDType::Q4_1),
        "q8_0" => Some(GgmlDType::Q8_0),
        _ => None,
    };
    let m = super::load_model(a.model.as_deref().or(req.model.as_deref()))?;
    // Checked before any work, so a bad layer list exits 2 at once.
    req.layers(&a.request, m.config.n_layers)?;
    let stem = a
        .request
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or("unlearned".into());
    let is_gguf = matches!(m.source.format, engram::model::Format::Gguf { .. });
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from(if is_gguf {
            format!("out/{stem}-unlearned.gguf")
        } else {
            format!("out/{stem}-unlearned")
        })
    });
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
            requant,
        },
        &mut |step, _, loss| {
            pb.set_position(step as u64);
            pb.set_message(format!("{loss:.4}"));
        },
    )?;
    pb.finish_and_clear();
    if !a.no_save {
        save_like_input(&model, &out)?;
    }
    let hide = |s: String| {
        if a.show_secrets {
            s
        } else {
            redact(&s, &req.secrets)
        }
    };
    print!("{}", hide(render(&report)));
    if !a.no_save {
        println!("unlearned model: {}", out.display());
    }
    if let Some(j) = &a.json {
        super::write_text(j, &hide(serde_json::to_string_pretty(&report)?))?;
    }
    Ok(())
}
