//! The experiment loop behind the README's unlearning-locality numbers: train a removal
//! request (the stop rule included, no audit, no relearning) on a model and print each stop
//! check, the time, and KL / top-1 agreement on eval/unrelated.yaml against the input.
//!
//! cargo run --release --example unlearn_sweep -- MODEL REQUEST.yaml [REQUEST2.yaml ...]
use engram::eval::metrics::{locality, run_suite, Suite};
use engram::model::quant::DeployType;
use engram::unlearn::request::Request;
use engram::unlearn::run::{train, Options};
use std::path::Path;

fn main() -> engram::Result<()> {
    engram::tune_allocator();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dev = candle_core::Device::Cpu;
    let m = engram::model::load(Some(&args[0]), &dev)?;
    let suite = Suite::load(Path::new("eval/unrelated.yaml"))?;
    let prompts = Suite {
        prompts: suite.prompts.clone(),
        texts: vec![],
    };
    let base = run_suite(&m, &prompts)?;
    let mut refs = std::collections::HashMap::new();
    for path in &args[1..] {
        let req = Request::load(Path::new(path))?;
        let reference = engram::model::load(req.reference.as_deref(), &dev)?;
        let layers = req.layers(Path::new(path), m.config.n_layers)?;
        let forget = req.forget_examples()?;
        let retain = req.retain_examples()?;
        let t = std::time::Instant::now();
        let log = train(
            &m,
            &req,
            &layers,
            &forget,
            &retain,
            &Options {
                suite: &suite,
                types: vec![],
                grid: Some(DeployType::Input),
                reference: Some((&reference, "reference")),
            },
            &mut |_, _, _| {},
        )?;
        let secs = t.elapsed().as_secs_f64();
        let after = run_suite(&log.model, &prompts)?;
        let loc = locality(&base, &after)?;
        let rname = req.reference.clone().unwrap_or_default();
        if !refs.contains_key(&rname) {
            refs.insert(rname.clone(), run_suite(&reference, &prompts)?);
        }
        let rl = locality(&refs[&rname], &after)?;
        let rb = locality(&refs[&rname], &base)?;
        println!(
            "  against the reference: before KL {:.4} top-1 {:.1}%, after KL {:.4} top-1 {:.1}%",
            rb.kl_mean,
            100.0 * rb.top1_agreement,
            rl.kl_mean,
            100.0 * rl.top1_agreement
        );
        for c in &log.history {
            println!(
                "  step {:>3}: loss {:.4} forget log-prob {:.3} ppl ratio {:.3} {:?}",
                c.step, c.loss, c.forget_logprob, c.perplexity_ratio, c.leaks
            );
        }
        println!(
            "{path}: {} steps, {:?}, {secs:.1} s, KL {:.4}, top-1 {:.1}%",
            log.losses.len(),
            log.stop_reason,
            loc.kl_mean,
            100.0 * loc.top1_agreement
        );
    }
    Ok(())
}
