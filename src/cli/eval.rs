//! `engram eval counterfact ...` and `engram eval compare ...`.

use anyhow::Result;
use clap::Subcommand;
use comfy_table::Table;
use engram::bench::counterfact::{self, SeqEvent};
use engram::edit::spec::{EditSpec, Method};
use engram::eval::metrics::{fluency, locality, run_suite, Suite};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: EvalCmd,
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Edit each CounterFact record from the unedited model and score ES, PS, NS.
    Counterfact(CfArgs),
    /// Locality of an edited model against its base: KL, top-1 agreement, perplexity, fluency.
    Compare(CompareArgs),
    /// TOFU: learn fictitious authors, unlearn some with GA / GradDiff / NPO, score both sets.
    Tofu(super::tofu::TofuArgs),
}

#[derive(clap::Args)]
struct CfArgs {
    #[arg(long)]
    model: Option<String>,
    /// EasyEdit's flattened CounterFact (JSONL) or ROME's counterfact.json.
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value = "rome", value_parser = ["rome", "ft", "memit", "alphaedit", "alphaedit-nas"])]
    method: String,
    /// Take the method and its hyper-parameters from an edit spec instead.
    #[arg(long)]
    spec: Option<PathBuf>,
    /// Layer(s) to edit, overriding the spec: `5`, or for MEMIT / AlphaEdit `3-6` or `3,5`.
    #[arg(long)]
    layer: Option<String>,
    /// Cases edited together by MEMIT / AlphaEdit (ROME and FT-L edit one at a time).
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Apply the batches one after another to the same model, measuring retention of earlier
    /// edits after each batch; the final scores are on the final model.
    #[arg(long)]
    sequential: bool,
    /// SVG (with --sequential): ES of earlier edits against the number of edits made.
    #[arg(long)]
    plot: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Per-case JSONL; a rerun skips the cases already in it. With --sequential: the run's
    /// state (safetensors: the edited tensors, the method's carried state, progress), saved
    /// atomically after each batch; a rerun with the same flags resumes from it.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// With --sequential: stop after this many batches (the state is saved in --resume;
    /// rerun to go on).
    #[arg(long)]
    max_batches: Option<usize>,
    /// With --sequential: measure the ES of all edits so far every this many edits (0: after
    /// every batch); the first batch's ES is measured after every batch.
    #[arg(long, default_value_t = 0)]
    retention_every: usize,
    /// With --sequential: the unrelated-prompt suite for the final locality (KL, top-1
    /// agreement, perplexity) against the unedited model.
    #[arg(long, default_value = "eval/unrelated.yaml")]
    suite: PathBuf,
    /// With --sequential: skip the final locality measure (and --suite).
    #[arg(long)]
    no_locality: bool,
    /// Also score free generation (WILD-style questions, answers not cut at a sentence or at
    /// the target's length; src/eval/wild.rs), before and after each edit.
    #[arg(long)]
    wild: bool,
    /// For GGUF input, the types the re-quantized scores are taken at: `input` (each edited
    /// tensor in its input type) or `auto` (the smallest of input, Q8_0, F16 that keeps every
    /// score of the f32 edit, as `edit --out-type auto` writes).
    #[arg(long, default_value = "input", value_parser = ["input", "auto"])]
    out_type: String,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct CompareArgs {
    #[arg(long)]
    base: Option<String>,
    #[arg(long)]
    edited: String,
    #[arg(long, default_value = "eval/unrelated.yaml")]
    suite: PathBuf,
    /// Prompts to generate from for the fluency measure.
    #[arg(long, default_value_t = 20)]
    fluency_prompts: usize,
    #[arg(long)]
    json: Option<PathBuf>,
    /// SVG: KL per prompt.
    #[arg(long)]
    plot: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    match a.cmd {
        EvalCmd::Counterfact(a) => run_cf(a),
        EvalCmd::Compare(a) => run_compare(a),
        EvalCmd::Tofu(a) => super::tofu::run_tofu(a),
    }
}

fn run_cf(a: CfArgs) -> Result<()> {
    super::check_outputs(
        &[
            ("--json", a.json.as_deref()),
            ("--plot", a.plot.as_deref()),
            ("--resume", a.resume.as_deref()),
        ],
        &[&a.data],
    )?;
    let mut method = match &a.spec {
        Some(p) => EditSpec::load(p)?.method,
        None => Method::by_name(&a.method)?,
    };
    engram::limits::int_in("--batch-size", a.batch_size, 1, 10_000).map_err(engram::Error::from)?;
    if !a.sequential {
        for (flag, given) in [
            ("--max-batches", a.max_batches.is_some()),
            ("--retention-every", a.retention_every != 0),
        ] {
            if given {
                return Err(engram::Error::invalid(flag, "needs --sequential").into());
            }
        }
    }
    if let Some(m) = a.max_batches {
        engram::limits::int_in("--max-batches", m, 1, 1_000_000).map_err(engram::Error::from)?;
        if a.resume.is_none() {
            return Err(engram::Error::invalid(
                "--max-batches",
                "needs --resume FILE (where the state is saved to go on from)",
            )
            .into());
        }
    }
    let suite = if a.sequential && !a.no_locality {
        Some(Suite::load(&a.suite)?)
    } else {
        None
    };
    method.check().map_err(engram::Error::from)?;
    let cases = counterfact::load(&a.data, a.offset, a.n)?;
    let mut m = super::load_model(a.model.as_deref())?;
    if let Some(l) = &a.layer {
        method.set_layers(engram::limits::parse_layers(
            l,
            m.config.n_layers,
            "--layer",
        )?);
    }
    let mut layer_choice = None;
    if method.layers().is_empty() {
        let facts: Vec<(&str, &str, Option<&str>)> = cases
            .iter()
            .map(|c| {
                let r = &c.rewrite;
                (
                    r.prompt.as_str(),
                    r.subject.as_str(),
                    r.target_true.as_deref(),
                )
            })
            .collect();
        let (layer, why) = engram::locate::default_layer(&m, &facts)?;
        eprintln!("{why} (give --layer to choose)");
        method.set_layers(vec![layer]);
        layer_choice = Some(why);
    }
    for l in method.layers() {
        m.config.check_layer(l)?;
    }
    let as_spec = EditSpec {
        model: None,
        method: method.clone(),
        sequential: None,
        rewrites: cases.iter().map(|c| c.rewrite.clone()).collect(),
    };
    as_spec.check_model_at(&a.data, &m, &|i| {
        format!("record {} (case_id {})", a.offset + i + 1, cases[i].case_id)
    })?;
    let pb = indicatif::ProgressBar::new(cases.len() as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(format!("{} (key statistics first)", method.name()));
    let name = method.name().to_string();
    let layers = method.layers();
    let mut seq = None;
    let opts = counterfact::RunOptions {
        wild: a.wild,
        auto_types: a.out_type == "auto",
    };
    let rows =
        if a.sequential {
            let seq_opts = counterfact::SeqOptions {
                state: a.resume.as_deref(),
                max_batches: a.max_batches,
                retention_every: a.retention_every,
                suite: suite.as_ref(),
            };
            let run = counterfact::run_sequential(
                &mut m,
                method,
                &cases,
                a.batch_size,
                opts,
                seq_opts,
                &mut |e| {
                    let msg = match e {
                        SeqEvent::Scoring { cases, after } => {
                            let when = if after {
                                "after the last edit"
                            } else {
                                "before editing"
                            };
                            format!("{name}: scoring {cases} cases {when}")
                        }
                        SeqEvent::Resumed { batches, edits } => {
                            pb.set_position(edits as u64);
                            format!("{name}: resumed after {batches} batches ({edits} edits)")
                        }
                        SeqEvent::Stopped { batches, edits } => format!(
                        "{name}: stopped after {batches} batches ({edits} edits); run again with \
                         the same --resume to go on"
                    ),
                        SeqEvent::Batch {
                            done,
                            total,
                            seconds,
                            first_batch_es,
                            retention,
                        } => {
                            pb.set_position(done as u64);
                            let mut m = format!(
                                "{name}: {done}/{total} edits applied (batch {seconds:.0} s)"
                            );
                            if let Some(r) = retention {
                                m += &format!(", ES of all so far {:.1}%", 100.0 * r.es_all);
                            }
                            if let Some(f) = first_batch_es {
                                m += &format!(", of the first batch {:.1}%", 100.0 * f);
                            }
                            m
                        }
                    };
                    if pb.is_hidden() {
                        // No terminal (a log file): one line per event instead of the bar.
                        eprintln!("{msg}, {:.0} s", pb.elapsed().as_secs_f64());
                    }
                    pb.set_message(msg);
                },
            )?;
            let Some(run) = run else {
                pb.finish_and_clear();
                eprintln!(
                "stopped after --max-batches {}: the state is in {}; run the same command again \
                 to go on",
                a.max_batches.unwrap_or(0),
                a.resume.as_deref().unwrap_or(std::path::Path::new("-")).display()
            );
                return Ok(());
            };
            let rows = run.rows.clone();
            seq = Some(run);
            rows
        } else {
            counterfact::run(
                &mut m,
                method,
                &cases,
                a.batch_size,
                opts,
                a.resume.as_deref(),
                &mut |r| {
                    pb.set_message(format!(
                        "case {}: ES {} NS {}",
                        r.case_id, r.post.es, r.post.ns
                    ));
                    pb.inc(1);
                    if pb.is_hidden() && pb.position().is_multiple_of(10) {
                        eprintln!(
                            "{name}: {}/{} cases, {:.0} s",
                            pb.position(),
                            cases.len(),
                            pb.elapsed().as_secs_f64()
                        );
                    }
                },
            )?
        };
    pb.finish_and_clear();
    let s = counterfact::summarise(&rows, &name);
    let mut t = Table::new();
    t.set_header(vec!["metric", "before", "after (95% CI)"]);
    let f = |x: f64| format!("{:.1}%", 100.0 * x);
    t.add_row(vec![
        "ES".into(),
        f(s.es_pre),
        format!("{} ± {:.1}", f(s.es), 100.0 * s.es_ci95),
    ]);
    t.add_row(vec![
        "PS".into(),
        f(s.ps_pre),
        format!("{} ± {:.1}", f(s.ps), 100.0 * s.ps_ci95),
    ]);
    t.add_row(vec![
        "NS".into(),
        f(s.ns_pre),
        format!("{} ± {:.1}", f(s.ns), 100.0 * s.ns_ci95),
    ]);
    t.add_row(vec![
        "Score (harmonic mean)".into(),
        f(s.score_pre),
        f(s.score),
    ]);
    t.add_row(vec![
        "generated ES / PS / NS".into(),
        format!(
            "{:.1}% / {:.1}% / {:.1}%",
            100.0 * s.gen_es_pre,
            100.0 * s.gen_ps_pre,
            100.0 * s.gen_ns_pre
        ),
        format!(
            "{:.1}% / {:.1}% / {:.1}%",
            100.0 * s.gen_es,
            100.0 * s.gen_ps,
            100.0 * s.gen_ns
        ),
    ]);
    if let (Some(es), Some(ps), Some(ns), Some(g)) =
        (s.requant_es, s.requant_ps, s.requant_ns, s.requant_gen_es)
    {
        t.add_row(vec![
            "after re-quantizing the edited tensors: ES / PS / NS, gen ES".into(),
            "".into(),
            format!(
                "{:.1}% / {:.1}% / {:.1}%, {:.1}%",
                100.0 * es,
                100.0 * ps,
                100.0 * ns,
                100.0 * g
            ),
        ]);
    }
    if let (Some(es), Some(ps), Some(ns)) = (s.wild_es, s.wild_ps, s.wild_ns) {
        t.add_row(vec![
            "free answers to questions (WILD-style): ES / PS / NS".into(),
            format!(
                "{:.1}% / {:.1}% / {:.1}%",
                100.0 * s.wild_es_pre.unwrap_or(0.0),
                100.0 * s.wild_ps_pre.unwrap_or(0.0),
                100.0 * s.wild_ns_pre.unwrap_or(0.0)
            ),
            format!(
                "{:.1}% / {:.1}% / {:.1}%",
                100.0 * es,
                100.0 * ps,
                100.0 * ns
            ),
        ]);
    }
    if let (Some(types), Some(extra)) = (&s.out_types, s.out_type_extra_bytes_mean) {
        let list: Vec<String> = types.iter().map(|(t, n)| format!("{t} x{n}")).collect();
        t.add_row(vec![
            "types chosen for the edited tensors (auto), size cost per case".into(),
            "".into(),
            format!("{}, {:+.0} bytes", list.join(", "), extra),
        ]);
    }
    t.add_row(vec![
        "margins ES / PS / NS".into(),
        "".into(),
        format!(
            "{:+.3} / {:+.3} / {:+.3}",
            s.es_margin, s.ps_margin, s.ns_margin
        ),
    ]);
    t.add_row(vec![
        "edit seconds mean / median".into(),
        "".into(),
        format!("{:.2} / {:.2}", s.edit_seconds_mean, s.edit_seconds_median),
    ]);
    t.add_row(vec![
        "evaluation seconds per case (before / after / re-quantized)".into(),
        "".into(),
        format!(
            "{:.2} ({:.2} / {:.2} / {:.2})",
            s.eval_seconds_mean,
            s.eval_split_mean.before,
            s.eval_split_mean.after,
            s.eval_split_mean.requant
        ),
    ]);
    if let Some(r) = &seq {
        t.add_row(vec![
            "fluency (n-gram entropy)".into(),
            format!("{:.3}", r.fluency_before),
            format!("{:.3}", r.fluency_after),
        ]);
        if let Some(l) = &r.locality {
            t.add_row(vec![
                "unrelated prompts: KL / top-1 agreement".into(),
                "".into(),
                format!("{:.4} / {:.1}%", l.kl_mean, 100.0 * l.top1_agreement),
            ]);
            t.add_row(vec![
                "perplexity (general text)".into(),
                format!("{:.3}", l.perplexity_base),
                format!("{:.3}", l.perplexity_edited),
            ]);
        }
        if let Some(last) = r.weight_norms.last() {
            let base: Vec<String> = r
                .edited_tensors
                .iter()
                .map(|n| {
                    r.base_weight_norms
                        .iter()
                        .find(|(b, _)| b == n)
                        .map(|(_, v)| format!("{v:.2}"))
                        .unwrap_or("-".into())
                })
                .collect();
            let now: Vec<String> = last.iter().map(|v| format!("{v:.2}")).collect();
            t.add_row(vec![
                "|W| of the edited matrices".into(),
                base.join(" "),
                now.join(" "),
            ]);
        }
        t.add_row(vec![
            "collapse point (first batch's ES < 60%)".into(),
            "".into(),
            r.collapse_point
                .map(|c| format!("{c} edits"))
                .unwrap_or_else(|| "none".into()),
        ]);
        if let Some(na) = &r.norm_anchor {
            t.add_row(vec![
                "NAS reference norm / rewrites left out".into(),
                "".into(),
                format!("{:.3} / {}", na.reference.unwrap_or(f64::NAN), na.skipped),
            ]);
        }
        t.add_row(vec![
            "total seconds / per batch (mean)".into(),
            "".into(),
            format!(
                "{:.0} / {:.1}",
                r.seconds_total,
                r.batch_seconds.iter().sum::<f64>() / r.batch_seconds.len().max(1) as f64
            ),
        ]);
    }
    let mode = match (&seq, a.batch_size) {
        (Some(_), b) => format!("sequential batches of {b}, final model"),
        (None, 1) => "each from the unedited model".to_string(),
        (None, b) => format!("batches of {b}, each from the unedited model"),
    };
    println!(
        "{} on {} cases ({}; {} failed)",
        s.method, s.n, mode, s.failed
    );
    println!("{t}");
    if let Some(r) = &seq {
        println!("{}", super::retention_table(&r.retention));
        if let Some(p) = &a.plot {
            super::write_retention_plot(p, &s.method, &r.retention, &r.first_batch)?;
        }
    }
    if let Some(j) = &a.json {
        super::write_json(
            j,
            &serde_json::json!({ "summary": s, "layers": layers, "layer_choice": layer_choice, "cases": rows, "n": s.n, "es": s.es, "ps": s.ps, "ns": s.ns, "score": s.score, "es_pre": s.es_pre, "ps_pre": s.ps_pre, "ns_pre": s.ns_pre, "edit_seconds_mean": s.edit_seconds_mean, "batch_size": a.batch_size, "sequential": seq.as_ref().map(|r| serde_json::json!({"retention": r.retention, "first_batch": r.first_batch, "collapse_point": r.collapse_point, "fluency_before": r.fluency_before, "fluency_after": r.fluency_after, "locality": r.locality, "norm_anchor": r.norm_anchor, "seconds_total": r.seconds_total, "batch_seconds": r.batch_seconds, "weight_norms": r.weight_norms, "edited_tensors": r.edited_tensors, "base_weight_norms": r.base_weight_norms, "resumed_at_batch": r.resumed_at_batch})) }),
        )?;
    }
    Ok(())
}

fn run_compare(a: CompareArgs) -> Result<()> {
    super::check_outputs(
        &[("--json", a.json.as_deref()), ("--plot", a.plot.as_deref())],
        &[&a.suite],
    )?;
    engram::limits::int_in("--fluency-prompts", a.fluency_prompts, 0, 10_000)
        .map_err(engram::Error::from)?;
    let suite = Suite::load(&a.suite)?;
    let base = super::load_model(a.base.as_deref())?;
    let edited = super::load_model(Some(&a.edited))?;
    let rb = run_suite(&base, &suite)?;
    let re = run_suite(&edited, &suite)?;
    let loc = locality(&rb, &re)?;
    let prompts: Vec<String> = suite
        .prompts
        .iter()
        .take(a.fluency_prompts)
        .map(|p| p.prompt.clone())
        .collect();
    let (fb, fe) = (fluency(&base, &prompts)?, fluency(&edited, &prompts)?);
    let mut order: Vec<usize> = (0..loc.kl.len()).collect();
    order.sort_by(|&i, &j| loc.kl[j].total_cmp(&loc.kl[i]));
    let mut t = super::locality_table("measure", &loc);
    t.add_row(vec![
        "fluency (n-gram entropy) base / edited".to_string(),
        format!("{fb:.3} / {fe:.3}"),
    ]);
    println!("{t}");
    let mut moved = Table::new();
    moved.set_header(vec!["most moved prompts", "KL"]);
    for &i in order.iter().take(5) {
        moved.add_row(vec![
            suite.prompts[i].prompt.clone(),
            format!("{:.3e}", loc.kl[i]),
        ]);
    }
    println!("{moved}");
    if let Some(p) = &a.plot {
        let labels: Vec<String> = suite.prompts.iter().map(|p| p.prompt.clone()).collect();
        let svg = engram::eval::svg::bars("KL(base || edited) per prompt", &labels, &loc.kl);
        engram::model::save::write_atomic(p, |w| {
            use std::io::Write;
            w.write_all(svg.as_bytes())
                .map_err(|e| engram::Error::io(p, e))
        })?;
    }
    if let Some(j) = &a.json {
        let most: Vec<_> = order
            .iter()
            .take(10)
            .map(|&i| serde_json::json!({"prompt": suite.prompts[i].prompt, "kl": loc.kl[i]}))
            .collect();
        super::write_json(
            j,
            &serde_json::json!({
                "kl": loc.kl, "kl_mean": loc.kl_mean, "top1_agreement": loc.top1_agreement,
                "perplexity_base": loc.perplexity_base, "perplexity_edited": loc.perplexity_edited,
                "fluency_base": fb, "fluency_edited": fe, "most_moved": most,
            }),
        )?;
    }
    Ok(())
}
