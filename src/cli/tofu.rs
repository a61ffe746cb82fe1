//! `engram eval tofu --data authors.jsonl --world world_facts.jsonl [...]`: the TOFU
//! unlearning benchmark (learn some authors, forget a few, retain the rest).

use anyhow::Result;
use comfy_table::Table;
use engram::eval::metrics::Suite;
use engram::limits::parse_layers;
use engram::unlearn::learn::LearnParams;
use engram::unlearn::request::MethodName;
use engram::unlearn::tofu::{run, TofuEval, TofuParams};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TofuArgs {
    #[arg(long)]
    model: Option<String>,
    /// TOFU question/answer pairs with an `author` index.
    #[arg(long)]
    data: PathBuf,
    /// Multiple-choice world facts (question, option1..4, answer).
    #[arg(long)]
    world: PathBuf,
    #[arg(long, default_value = "0-9")]
    learn_authors: String,
    #[arg(long, default_value = "0-1")]
    forget_authors: String,
    #[arg(long, default_value = "2-9")]
    retain_authors: String,
    /// Comma-separated: ga, graddiff, npo.
    #[arg(long, default_value = "ga,graddiff,npo")]
    methods: String,
    #[arg(long, default_value_t = 60)]
    learn_steps: usize,
    #[arg(long, default_value_t = 1e-4)]
    learn_lr: f64,
    /// NPO's inverse temperature.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Weight of the retain-set NLL (graddiff, npo).
    #[arg(long, default_value_t = 1.0)]
    retain_weight: f64,
    /// Weight of KL(learned || unlearned) on retain answers.
    #[arg(long, default_value_t = 0.0)]
    kl_weight: f64,
    /// Unlearning steps and learning rate.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 2e-5)]
    lr: f64,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value = "all")]
    layers: String,
    #[arg(long, default_value_t = 1.5)]
    max_perplexity_ratio: f64,
    #[arg(long, default_value_t = 5)]
    retain_eval_per_author: usize,
    #[arg(long, default_value = "eval/unrelated.yaml")]
    suite: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn row(t: &mut Table, name: &str, e: &TofuEval, secs: Option<f64>) {
    t.add_row(vec![
        name.to_string(),
        format!("{:.3}", e.forget.answer_logprob),
        format!("{:.3}", e.forget.rouge_l),
        format!("{:.3}", e.retain.answer_logprob),
        format!("{:.3}", e.retain.rouge_l),
        format!("{:.1}%", 100.0 * e.world_facts_accuracy),
        secs.map(|s| format!("{s:.0}")).unwrap_or("-".into()),
    ]);
}

pub fn run_tofu(a: TofuArgs) -> Result<()> {
    super::check_outputs(&[("--json", a.json.as_deref())], &[])?;
    {
        use engram::limits::{int_in, real_in, MAX_STEPS};
        int_in("--learn-steps", a.learn_steps, 1, MAX_STEPS).map_err(engram::Error::from)?;
        real_in("--learn-lr", a.learn_lr, 0.0, 10.0, true).map_err(engram::Error::from)?;
        real_in("--beta", a.beta, 0.0, 1e6, true).map_err(engram::Error::from)?;
        real_in("--retain-weight", a.retain_weight, 0.0, 1e6, false)
            .map_err(engram::Error::from)?;
        real_in("--kl-weight", a.kl_weight, 0.0, 1e6, false).map_err(engram::Error::from)?;
        int_in("--steps", a.steps, 1, MAX_STEPS).map_err(engram::Error::from)?;
        real_in("--lr", a.lr, 0.0, 10.0, true).map_err(engram::Error::from)?;
        int_in("--batch-size", a.batch_size, 1, 10_000).map_err(engram::Error::from)?;
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
            0,
            10_000,
        )
        .map_err(engram::Error::from)?;
    }
    let m = super::load_model(a.model.as_deref())?;
    let n = m.config.n_layers;
    let authors = |s: &str, flag: &str| parse_layers(s, usize::MAX, flag);
    let methods = a
        .methods
        .split(',')
        .map(|x| match x.trim() {
            "ga" => Ok(MethodName::Ga),
            "graddiff" => Ok(MethodName::Graddiff),
            "npo" => Ok(MethodName::Npo),
            other => Err(engram::Error::invalid(
                "--methods",
                format!("`{other}`: allowed ga, graddiff, npo"),
            )),
        })
        .collect::<engram::Result<Vec<_>>>()?;
    let mut learn = LearnParams::defaults(n);
    learn.steps = a.learn_steps;
    learn.lr = a.learn_lr;
    learn.seed = a.seed;
    let p = TofuParams {
        learn_authors: authors(&a.learn_authors, "--learn-authors")?,
        forget_authors: authors(&a.forget_authors, "--forget-authors")?,
        retain_authors: authors(&a.retain_authors, "--retain-authors")?,
        learn,
        methods,
        beta: a.beta,
        retain_weight: a.retain_weight,
        kl_weight: a.kl_weight,
        steps: a.steps,
        lr: a.lr,
        batch_size: a.batch_size,
        layers: parse_layers(&a.layers, n, "--layers")?,
        max_perplexity_ratio: a.max_perplexity_ratio,
        retain_eval_per_author: a.retain_eval_per_author,
        seed: a.seed,
    };
    let suite = Suite::load(&a.suite)?;
    let t0 = std::time::Instant::now();
    let r = run(&m, &a.data, &a.world, &suite, &p, &mut |phase| {
        eprintln!("[{:>6.0} s] {phase}", t0.elapsed().as_secs_f64());
    })?;
    let mut t = Table::new();
    t.set_header(vec![
        "model",
        "forget log-prob",
        "forget ROUGE-L",
        "retain log-prob",
        "retain ROUGE-L",
        "world facts",
        "seconds",
    ]);
    row(&mut t, "base", &r.base, None);
    row(&mut t, "learned", &r.learned, Some(r.learn.seconds));
    for x in &r.methods {
        row(
            &mut t,
            &format!("{:?} ({} steps, {})", x.method, x.steps, x.stop_reason),
            &x.eval,
            Some(x.train_seconds),
        );
    }
    println!("{t}");
    println!(
        "learn: {} steps, answer NLL {:.3} -> {:.3}; total {:.0} s",
        r.learn.steps, r.learn.loss_before, r.learn.loss_after, r.seconds
    );
    for x in &r.methods {
        for w in &x.warnings {
            println!("warning ({:?}): {w}", x.method);
        }
    }
    if let Some(j) = &a.json {
        super::write_json(j, &r)?;
    }
    Ok(())
}
