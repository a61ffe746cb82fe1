//! `engram eval tofu --forget F --retain R [--holdout H] [--real-authors RA] --world W`: the
//! TOFU unlearning benchmark with open-unlearning's metrics (learn forget ∪ retain, learn
//! retain alone as the reference, unlearn with each method, score every model).

use anyhow::Result;
use comfy_table::Table;
use engram::bench::tofu::{run, MethodRun, Progress, Scores, SetSpec, TofuParams};
use engram::eval::metrics::Suite;
use engram::limits::parse_layers;
use engram::unlearn::learn::LearnParams;
use engram::unlearn::request::{Method, MethodName};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TofuArgs {
    #[arg(long)]
    model: Option<String>,
    /// TOFU records to forget (question, answer, paraphrased_answer, perturbed_answer), JSON
    /// array or JSONL.
    #[arg(long)]
    forget: PathBuf,
    /// Authors of `--forget` to use (a record's `author`, else its index / 20); default all.
    #[arg(long)]
    forget_authors: Option<String>,
    /// Records to retain: learned by both models, scored on `--retain-eval-per-author` each.
    #[arg(long)]
    retain: PathBuf,
    #[arg(long)]
    retain_authors: Option<String>,
    /// Records never learned, for the membership-inference AUCs and privleak.
    #[arg(long)]
    holdout: Option<PathBuf>,
    #[arg(long)]
    holdout_authors: Option<String>,
    /// Real-author questions with perturbed answers (TOFU's `real_authors_perturbed`).
    #[arg(long)]
    real_authors: Option<PathBuf>,
    /// World facts with perturbed answers (TOFU's `world_facts_perturbed`).
    #[arg(long)]
    world: PathBuf,
    /// Comma-separated: ga, graddiff, npo, simnpo, rmu.
    #[arg(long, default_value = "npo,simnpo,rmu")]
    methods: String,
    /// Learning (both models): steps and learning rate.
    #[arg(long, default_value_t = 40)]
    learn_steps: usize,
    #[arg(long, default_value_t = 2e-4)]
    learn_lr: f64,
    /// Unlearning steps, batch size and learning rate (ga, graddiff, npo; SimNPO and RMU have
    /// their own rates).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 2e-5)]
    lr: f64,
    /// Layers trained by ga, graddiff, npo and simnpo.
    #[arg(long, default_value = "all")]
    layers: String,
    /// NPO's β.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Retain-NLL weight of graddiff and npo.
    #[arg(long, default_value_t = 1.0)]
    retain_weight: f64,
    /// SimNPO's β, margin γ and retain weight (open-unlearning: β 4.5, δ 0, gamma 0.125 on the
    /// forget term and alpha 1 on retain, i.e. retain 8x forget).
    #[arg(long, default_value_t = 4.5)]
    simnpo_beta: f64,
    #[arg(long, default_value_t = 0.0)]
    simnpo_gamma: f64,
    #[arg(long, default_value_t = 8.0)]
    simnpo_retain_weight: f64,
    #[arg(long, default_value_t = 1e-4)]
    simnpo_lr: f64,
    /// RMU: trained layers (their MLP output projections; the highest is steered), steering
    /// coefficient (open-unlearning's 2 is for Llama's residual scale; 20 here), retain weight
    /// and learning rate.
    #[arg(long, default_value = "5-7")]
    rmu_layers: String,
    #[arg(long, default_value_t = 20.0)]
    rmu_coeff: f64,
    #[arg(long, default_value_t = 1.0)]
    rmu_retain_weight: f64,
    #[arg(long, default_value_t = 1e-3)]
    rmu_lr: f64,
    #[arg(long, default_value_t = 1.5)]
    max_perplexity_ratio: f64,
    #[arg(long, default_value_t = 5)]
    retain_eval_per_author: usize,
    /// Greedy answers (ROUGE-L) stop at this many tokens.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    #[arg(long, default_value = "eval/unrelated.yaml")]
    suite: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn opt(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3}")).unwrap_or("-".into())
}

fn row(t: &mut Table, name: &str, s: &Scores, reference: bool) {
    let fq = if reference {
        "1 (itself)".to_string()
    } else if s.forget_quality < 1e-3 {
        format!("{:.1e}", s.forget_quality)
    } else {
        format!("{:.3}", s.forget_quality)
    };
    t.add_row(vec![
        name.to_string(),
        fq,
        format!("{:.3}", s.model_utility),
        format!("{:.3}", s.forget_truth_ratio),
        format!("{:.3}", s.forget_prob),
        format!("{:.3}", s.forget_rouge),
        format!("{:.3}", s.extraction_strength),
        opt(s.mia_auc.map(|a| a.min_k)),
        opt(s.privleak),
        format!("{:.3}", s.retain_rouge),
        format!("{:.3}", s.world_facts_prob),
        format!("{:.0}", s.seconds),
    ]);
}

pub fn run_tofu(a: TofuArgs) -> Result<()> {
    use engram::limits::{int_in, real_in, MAX_STEPS};
    super::check_outputs(&[("--json", a.json.as_deref())], &[])?;
    int_in("--learn-steps", a.learn_steps, 1, MAX_STEPS).map_err(engram::Error::from)?;
    real_in("--learn-lr", a.learn_lr, 0.0, 10.0, true).map_err(engram::Error::from)?;
    int_in("--steps", a.steps, 1, MAX_STEPS).map_err(engram::Error::from)?;
    int_in("--batch-size", a.batch_size, 1, 10_000).map_err(engram::Error::from)?;
    for (flag, v) in [
        ("--lr", a.lr),
        ("--simnpo-lr", a.simnpo_lr),
        ("--rmu-lr", a.rmu_lr),
    ] {
        real_in(flag, v, 0.0, 10.0, true).map_err(engram::Error::from)?;
    }
    for (flag, v) in [
        ("--beta", a.beta),
        ("--simnpo-beta", a.simnpo_beta),
        ("--rmu-coeff", a.rmu_coeff),
    ] {
        real_in(flag, v, 0.0, 1e6, true).map_err(engram::Error::from)?;
    }
    for (flag, v) in [
        ("--retain-weight", a.retain_weight),
        ("--simnpo-retain-weight", a.simnpo_retain_weight),
        ("--rmu-retain-weight", a.rmu_retain_weight),
    ] {
        real_in(flag, v, 0.0, 1e6, false).map_err(engram::Error::from)?;
    }
    real_in("--simnpo-gamma", a.simnpo_gamma, -1e6, 1e6, false).map_err(engram::Error::from)?;
    real_in(
        "--max-perplexity-ratio",
        a.max_perplexity_ratio,
        1.0,
        1e6,
        true,
    )
    .map_err(engram::Error::from)?;
    int_in(
        "--retain-eval-per-author",
        a.retain_eval_per_author,
        1,
        10_000,
    )
    .map_err(engram::Error::from)?;
    int_in("--max-new-tokens", a.max_new_tokens, 1, 1024).map_err(engram::Error::from)?;
    if a.holdout_authors.is_some() && a.holdout.is_none() {
        return Err(engram::Error::invalid("--holdout-authors", "needs --holdout FILE").into());
    }
    let m = super::load_model(a.model.as_deref())?;
    let n = m.config.n_layers;
    let authors = |s: &Option<String>, flag: &str| -> engram::Result<Option<Vec<usize>>> {
        s.as_deref()
            .map(|s| parse_layers(s, usize::MAX, flag))
            .transpose()
    };
    let layers = parse_layers(&a.layers, n, "--layers")?;
    // Checked only when RMU runs: the default 5-7 does not exist in a 2-layer model.
    let rmu_layers = || parse_layers(&a.rmu_layers, n, "--rmu-layers");
    let methods = a
        .methods
        .split(',')
        .map(|x| {
            let name = match x.trim() {
                "ga" => MethodName::Ga,
                "graddiff" => MethodName::Graddiff,
                "npo" => MethodName::Npo,
                "simnpo" => MethodName::Simnpo,
                "rmu" => MethodName::Rmu,
                other => {
                    return Err(engram::Error::invalid(
                        "--methods",
                        format!("`{other}`: allowed ga, graddiff, npo, simnpo, rmu"),
                    ))
                }
            };
            let mut method = Method::new(name);
            let (mut ls, mut lr) = (layers.clone(), a.lr);
            match name {
                MethodName::Simnpo => {
                    method.beta = Some(a.simnpo_beta);
                    method.gamma = a.simnpo_gamma;
                    method.retain_weight = a.simnpo_retain_weight;
                    lr = a.simnpo_lr;
                }
                MethodName::Rmu => {
                    method.rmu.steering_coeff = a.rmu_coeff;
                    method.retain_weight = a.rmu_retain_weight;
                    ls = rmu_layers()?;
                    lr = a.rmu_lr;
                }
                _ => {
                    method.beta = Some(a.beta);
                    method.retain_weight = a.retain_weight;
                }
            }
            Ok(MethodRun {
                method,
                layers: ls,
                lr,
            })
        })
        .collect::<engram::Result<Vec<_>>>()?;
    let mut learn = LearnParams::defaults(n);
    learn.steps = a.learn_steps;
    learn.lr = a.learn_lr;
    learn.seed = a.seed;
    let p = TofuParams {
        forget: SetSpec {
            path: a.forget.clone(),
            authors: authors(&a.forget_authors, "--forget-authors")?,
        },
        retain: SetSpec {
            path: a.retain.clone(),
            authors: authors(&a.retain_authors, "--retain-authors")?,
        },
        holdout: match &a.holdout {
            Some(h) => Some(SetSpec {
                path: h.clone(),
                authors: authors(&a.holdout_authors, "--holdout-authors")?,
            }),
            None => None,
        },
        real_authors: a.real_authors.clone(),
        world: a.world.clone(),
        learn,
        methods,
        steps: a.steps,
        batch_size: a.batch_size,
        max_perplexity_ratio: a.max_perplexity_ratio,
        retain_eval_per_author: a.retain_eval_per_author,
        max_new_tokens: a.max_new_tokens,
        min_k: 0.4,
        seed: a.seed,
    };
    let suite = Suite::load(&a.suite)?;
    use std::io::IsTerminal;
    let t0 = std::time::Instant::now();
    let mut bar: Option<(String, indicatif::ProgressBar)> = None;
    let style =
        indicatif::ProgressStyle::with_template("{elapsed:>5} {msg:40} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    let r = run(&m, &suite, &p, &mut |e: Progress<'_>| {
        if bar.as_ref().is_none_or(|(ph, _)| ph != e.phase) {
            if let Some((_, b)) = bar.take() {
                b.finish();
            }
            // Without a terminal the bars are hidden: one line per phase instead (logs).
            if !std::io::stderr().is_terminal() {
                eprintln!("[{:>6.0} s] {}", t0.elapsed().as_secs_f64(), e.phase);
            }
            let b = indicatif::ProgressBar::new(e.total as u64).with_style(style.clone());
            b.set_message(e.phase.to_string());
            bar = Some((e.phase.to_string(), b));
        }
        if let Some((_, b)) = &bar {
            b.set_position(e.done as u64);
        }
    })?;
    if let Some((_, b)) = bar.take() {
        b.finish();
    }
    let mut t = Table::new();
    t.set_header(vec![
        "model",
        "forget quality",
        "model utility",
        "forget TR",
        "forget prob",
        "forget ROUGE",
        "extraction",
        "MIA Min-K AUC",
        "privleak",
        "retain ROUGE",
        "world prob",
        "score s",
    ]);
    row(&mut t, "base", &r.base, false);
    row(&mut t, "finetuned", &r.finetuned, false);
    row(&mut t, "retain model", &r.retain_model, true);
    for (name, x) in &r.methods {
        row(
            &mut t,
            &format!("{name} ({} steps, {})", x.steps, x.stop_reason),
            &x.scores,
            false,
        );
    }
    println!("{t}");
    println!(
        "model utility = harmonic mean of {} sub-metrics: {}",
        r.retain_model.utility_metrics.len(),
        r.retain_model.utility_metrics.join(", ")
    );
    let target = 0.9 * r.retain_model.model_utility;
    for (name, x) in &r.methods {
        let ok = x.scores.forget_quality >= 0.05 && x.scores.model_utility >= target;
        println!(
            "{name}: forget quality {:.3} (target >= 0.05), model utility {:.3} (target >= 0.9 x retain = {target:.3}): {}",
            x.scores.forget_quality,
            x.scores.model_utility,
            if ok { "meets the target" } else { "misses the target" }
        );
        for w in &x.warnings {
            println!("warning ({name}): {w}");
        }
    }
    let phases: Vec<String> = r
        .phases
        .iter()
        .map(|(n, s)| format!("{n} {s:.0} s"))
        .collect();
    println!("time: {}; total {:.0} s", phases.join(", "), r.seconds);
    if let Some(j) = &a.json {
        super::write_json(j, &r)?;
    }
    Ok(())
}
