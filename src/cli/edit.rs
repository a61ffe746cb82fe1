//! `engram edit SPEC.yaml [--model M] [--out PATH] [--patch PATH] [--suite FILE] [--json FILE]`.

use anyhow::Result;
use comfy_table::Table;
use engram::edit::patch::{self, PatchMeta};
use engram::edit::run::{run_spec_resumable, EditReport};
use engram::edit::spec::EditSpec;
use engram::eval::metrics::{score_rewrites, RewriteScores, Suite};
use engram::output::Outputs;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The edit spec (YAML).
    spec: PathBuf,
    /// Overrides the spec's model.
    #[arg(long)]
    model: Option<String>,
    /// Where to write the edited checkpoint (default: out/NAME.gguf or out/NAME/ for HF input).
    #[arg(long)]
    out: Option<PathBuf>,
    /// GGUF output tensor types: `input` (each tensor re-quantized to its input type), `auto`
    /// (each edited tensor in the smallest of input, Q8_0, F16 that keeps every score of the
    /// f32 edit; the rest byte for byte), `f16` or `f32` (matrices; norms stay f32).
    #[arg(long, default_value = "input", value_parser = ["input", "auto", "f16", "f32"])]
    out_type: String,
    /// Do not write the edited checkpoint (the patch file is still written).
    #[arg(long)]
    no_save: bool,
    /// Where to write the patch (default: out/NAME.engram.safetensors).
    #[arg(long)]
    patch: Option<PathBuf>,
    /// Unrelated prompts and general text for the locality report.
    #[arg(long, default_value = "eval/unrelated.yaml")]
    suite: PathBuf,
    /// Skip the locality report.
    #[arg(long)]
    no_locality: bool,
    #[arg(long)]
    json: Option<PathBuf>,
    /// SVG: efficacy of earlier edits against the number of edits (sequential specs).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The run's state (safetensors: the edited tensors, the method's carried state and the
    /// report so far), saved atomically after each batch (each rewrite for ROME and FT-L); a
    /// rerun with the same spec and model resumes from it.
    #[arg(long)]
    resume: Option<PathBuf>,
}

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.0}%", 100.0 * v))
        .unwrap_or_else(|| "-".into())
}

fn row(t: &mut Table, name: &str, s: &RewriteScores) {
    t.add_row(vec![
        name.to_string(),
        format!("{:.4}", s.p_new),
        s.p_true.map(|p| format!("{p:.4}")).unwrap_or("-".into()),
        pct(Some(s.es)),
        pct(s.ps),
        pct(s.ns),
        format!("{:+.3}", s.es_margin),
        s.ps_margin
            .map(|m| format!("{m:+.3}"))
            .unwrap_or("-".into()),
        s.ns_margin
            .map(|m| format!("{m:+.3}"))
            .unwrap_or("-".into()),
        pct(Some(s.gen.gen_es)),
        pct(s.gen.gen_ps),
        pct(s.gen.gen_ns),
    ]);
}

pub fn print_report(r: &EditReport) {
    for (i, w) in r.rewrites.iter().enumerate() {
        println!(
            "[{i}] {} | subject {:?} -> {:?} (was {:?}) | layer {} | {:.1} s | |ΔW| {:.3}",
            w.prompt,
            w.subject,
            w.target_new,
            w.target_true.as_deref().unwrap_or("?"),
            w.layer,
            w.edit_seconds,
            w.delta_norm
        );
        if let Some(t) = &w.search {
            println!(
                "    {} search: {} steps in {:.1} s, target P {:.3}, NLL {:.3}, KL {:.4}, |delta| {:.2}",
                if r.method == "rome" { "v*" } else { "z" },
                t.steps,
                t.seconds,
                t.target_prob,
                t.nll,
                t.kl,
                t.delta_norm
            );
        }
        let mut t = Table::new();
        t.set_header(vec![
            "",
            "P(new)",
            "P(true)",
            "ES",
            "PS",
            "NS",
            "ES margin",
            "PS margin",
            "NS margin",
            "gen ES",
            "gen PS",
            "gen NS",
        ]);
        row(&mut t, "before", &w.pre);
        row(&mut t, "after", &w.post);
        if let Some(q) = &w.requantized {
            row(&mut t, "after, re-quantized", q);
        }
        println!("{t}");
        println!("    says after: {:?}", w.post.gen.gen_text);
    }
    for (b, bt) in r.batches.iter().enumerate() {
        let layers: Vec<String> = bt
            .layers
            .iter()
            .map(|l| {
                format!(
                    "L{} |R| {:.2} |ΔW| {:.3}",
                    l.layer, l.resid_norm, l.delta_norm
                )
            })
            .collect();
        println!("batch {b}: {}", layers.join(", "));
    }
    if !r.retention.is_empty() {
        println!("{}", super::retention_table(&r.retention));
    }
    if let Some(l) = &r.locality {
        println!(
            "{}",
            super::locality_table("locality (unrelated prompts)", l)
        );
    }
    if let Some(s) = &r.stats {
        println!(
            "key statistics: {s} (statistics and context prefixes: {:.1} s)",
            r.prepare_seconds
        );
    }
    if !r.out_types.is_empty() {
        let mut t = Table::new();
        t.set_header(vec![
            "--out-type auto: tensor",
            "input type",
            "written as",
            "bytes",
        ]);
        for c in &r.out_types {
            t.add_row(vec![
                c.tensor.clone(),
                c.input_type.clone(),
                c.chosen_type.clone(),
                format!("{} -> {}", c.input_bytes, c.chosen_bytes),
            ]);
        }
        println!("{t}");
        let extra: i64 = r
            .out_types
            .iter()
            .map(|c| c.chosen_bytes as i64 - c.input_bytes as i64)
            .sum();
        println!("file-size cost of auto: {extra:+} bytes");
    }
    if r.peak_rss_mb > 0.0 {
        println!("peak memory (resident): {:.0} MB", r.peak_rss_mb);
    }
}

pub fn run(a: Args) -> Result<()> {
    // Everything the user gave is checked before any work: the spec, the model's path, and
    // every output (none may be an input, a directory or unwritable).
    let spec = EditSpec::load(&a.spec)?;
    let model_spec = a.model.clone().or(spec.model.clone());
    let model_path = engram::model::load::resolve(model_spec.as_deref())?;
    let is_gguf = !model_path.is_dir();
    let stem = a
        .spec
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or("edit".into());
    let out = a.out.clone().unwrap_or_else(|| {
        if is_gguf {
            PathBuf::from(format!("out/{stem}.gguf"))
        } else {
            PathBuf::from(format!("out/{stem}"))
        }
    });
    let patch_path = a
        .patch
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("out/{stem}.engram.safetensors")));
    if let Some(r) = &a.resume {
        super::check_outputs(&[("--resume", Some(r))], &[&a.spec, &model_path, &a.suite])?;
        let others = [
            ("--patch", Some(&patch_path)),
            ("--out", Some(&out)),
            ("--json", a.json.as_ref()),
            ("--plot", a.plot.as_ref()),
        ];
        for (flag, p) in others {
            if p == Some(r) {
                return Err(engram::Error::invalid(
                    "--resume",
                    format!(
                        "{} is also {flag}; give the state its own file",
                        r.display()
                    ),
                )
                .into());
            }
        }
    }
    let mut outs = Outputs::new(&[&a.spec, &model_path, &a.suite]);
    let patch_tmp = outs.file("--patch", &patch_path)?;
    let out_tmp = if a.no_save {
        None
    } else {
        Some(outs.model("--out", &out, !is_gguf)?)
    };
    let json_tmp = a
        .json
        .as_ref()
        .map(|j| outs.file("--json", j))
        .transpose()?;
    let plot_tmp = a
        .plot
        .as_ref()
        .map(|p| outs.file("--plot", p))
        .transpose()?;

    let mut m = super::load_model(model_spec.as_deref())?;
    spec.check_model(&a.spec, &m)?;
    let suite = if a.no_locality {
        None
    } else {
        Some(Suite::load(&a.suite)?)
    };

    let pb = indicatif::ProgressBar::new_spinner();
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    let (mut report, deltas, applied) = run_spec_resumable(
        &mut m,
        &spec,
        suite.as_ref(),
        a.resume.as_deref(),
        &mut |msg| pb.set_message(msg.to_string()),
    )?;
    pb.finish_and_clear();

    let meta = PatchMeta {
        engram_version: env!("CARGO_PKG_VERSION").into(),
        method: spec.method.name().into(),
        spec: serde_yaml::to_string(&spec)?,
        base_fingerprint: report.base_fingerprint.clone(),
        edited_fingerprint: report.edited_fingerprint.clone(),
        deltas: deltas
            .iter()
            .map(|d| {
                (
                    d.name.clone(),
                    d.layer,
                    if matches!(d.kind, engram::edit::DeltaKind::RankOne { .. }) {
                        "rank_one".into()
                    } else {
                        "dense".into()
                    },
                )
            })
            .collect(),
    };
    patch::write(&patch_tmp, &meta, &deltas, &applied)?;
    if a.out_type == "auto" && is_gguf {
        // The smallest type per edited tensor at which every score equals the f32 edit's.
        let names: Vec<String> = deltas.iter().map(|d| d.name.clone()).collect();
        let f32_scores: Vec<RewriteScores> =
            report.rewrites.iter().map(|w| w.post.clone()).collect();
        report.out_types =
            engram::edit::auto::choose_for_rewrites(&mut m, &names, &spec.rewrites, &f32_scores)?
                .choices;
    }
    if let Some(out_tmp) = &out_tmp {
        if report.out_types.is_empty() {
            super::save_model(&m, out_tmp, &a.out_type)?;
        } else {
            let types = engram::edit::auto::as_map(&report.out_types);
            engram::model::save::save(&m, out_tmp, engram::model::save::SaveAs::GgufTypes(types))?;
        }
        tracing::debug!(
            "edited model written: RSS {:.0} MB (peak {:.0} MB)",
            engram::rss_mb(),
            engram::peak_rss_mb()
        );
        if is_gguf {
            // Efficacy after re-quantization to the input's types. The edited model is
            // dropped first: two f32 copies of the weights would set the peak memory.
            let device = m.device.clone();
            drop(m);
            engram::release_memory();
            let q = engram::model::load(Some(out_tmp.to_string_lossy().as_ref()), &device)?;
            for (w, s) in report
                .rewrites
                .iter_mut()
                .zip(score_rewrites(&q, &spec.rewrites)?)
            {
                w.requantized = Some(s);
            }
        }
    }
    // The peak again, now that the re-quantized copy has been loaded and scored.
    report.peak_rss_mb = engram::peak_rss_mb();
    if let Some(j) = &json_tmp {
        super::write_json(j, &report)?;
    }
    if let Some(p) = &plot_tmp {
        super::write_retention_plot(p, &report.method, &report.retention, &[])?;
    }
    outs.commit()?;
    print_report(&report);
    println!("patch: {}", patch_path.display());
    if !a.no_save {
        println!("edited model: {}", out.display());
    }
    Ok(())
}
