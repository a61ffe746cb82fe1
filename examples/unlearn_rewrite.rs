//! Experiment: `unlearn::rewrite` on a learned model, then the greedy answers and the
//! secrets' mean token log-probs on every prompt and paraphrase, and locality.
//!
//! cargo run --release --example unlearn_rewrite -- LEARNED REQUEST LAYERS(3,5) [avoid] [steps]
use engram::unlearn::rewrite::{rewrite_layer, Goal, RewriteParams, Term};
use engram::unlearn::{leakage, request::Request};

fn main() -> engram::Result<()> {
    engram::tune_allocator();
    let a: Vec<String> = std::env::args().skip(1).collect();
    let dev = candle_core::Device::Cpu;
    let learned = engram::model::load(Some(&a[0]), &dev)?;
    let reference = engram::model::load(None, &dev)?;
    let req = Request::load(std::path::Path::new(&a[1]))?;
    let layers: Vec<usize> = a[2].split(',').map(|s| s.parse().unwrap()).collect();
    let mut p = RewriteParams::default();
    if let Some(w) = a.get(3) {
        p.avoid_weight = w.parse().unwrap();
    }
    if let Some(s) = a.get(4) {
        p.steps = s.parse().unwrap();
    }
    let forget = req.forget_examples()?;
    let prompts: Vec<String> = forget.iter().map(|e| e.prompt.clone()).collect();
    let teach = leakage::greedy(&reference, &prompts, 16)?;
    let mut terms = Vec::new();
    for (e, t) in forget.iter().zip(&teach) {
        let t = engram::eval::generation::first_sentence(t).to_string();
        println!("teacher: {:?} -> {:?}", e.prompt, t);
        terms.push(Term {
            prompt: e.prompt.clone(),
            answer: t,
            goal: Goal::Say,
        });
        terms.push(Term {
            prompt: e.prompt.clone(),
            answer: e.answer.clone(),
            goal: Goal::Avoid,
        });
    }
    for r in req.retain_examples()? {
        if r.prompt.contains(&req.subject) {
            terms.push(Term {
                prompt: r.prompt.clone(),
                answer: r.answer.clone(),
                goal: Goal::Keep,
            });
        }
    }
    let fp = learned.fingerprint()?;
    let mut m = learned.clone();
    let spec = engram::edit::stats::StatsSpec {
        samples: 200,
        seq_len: 128,
        seed: 0,
        ..Default::default()
    };
    let stats =
        engram::edit::stats::load_or_compute_layers(&learned, &fp, &spec, &layers, &mut |_, _| {})?;
    let t0 = std::time::Instant::now();
    for (l, s) in layers.iter().zip(&stats) {
        let chol = s.cholesky()?;
        let (_, info) = rewrite_layer(&mut m, &req.subject, &terms, *l, &chol, &p)?;
        println!("{info:?}");
    }
    println!("rewrite {:.1} s", t0.elapsed().as_secs_f64());
    let mut all: Vec<(String, String)> = Vec::new();
    for s in &req.secrets {
        for q in s.prompts.iter().chain(&s.paraphrases) {
            all.push((q.clone(), s.value.clone()));
        }
    }
    let qs: Vec<String> = all.iter().map(|x| x.0.clone()).collect();
    let before = leakage::greedy(&learned, &qs, 16)?;
    let after = leakage::greedy(&m, &qs, 16)?;
    let refr = leakage::greedy(&reference, &qs, 16)?;
    let lp = |mm: &engram::model::Model| -> engram::Result<Vec<f64>> {
        let pairs: Vec<(&str, String)> = all
            .iter()
            .map(|(q, v)| (q.as_str(), format!(" {v}")))
            .collect();
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(a, b)| (*a, b.as_str())).collect();
        Ok(engram::eval::target_logprobs(mm, &refs)?
            .iter()
            .map(|s| s.mean_logprob)
            .collect())
    };
    let (lb, la, lr) = (lp(&learned)?, lp(&m)?, lp(&reference)?);
    for i in 0..all.len() {
        println!(
            "{:?}\n  learned {:.2} {:?}\n  after   {:.2} {:?}\n  ref     {:.2} {:?}",
            all[i].0, lb[i], before[i], la[i], after[i], lr[i], refr[i]
        );
    }
    let suite = engram::eval::metrics::Suite::load(std::path::Path::new("eval/unrelated.yaml"))?;
    let prompts_only = engram::eval::metrics::Suite {
        prompts: suite.prompts.clone(),
        texts: vec![],
    };
    let loc = engram::eval::metrics::locality(
        &engram::eval::metrics::run_suite(&learned, &prompts_only)?,
        &engram::eval::metrics::run_suite(&m, &prompts_only)?,
    )?;
    println!(
        "locality: KL {:.4} top-1 {:.3}",
        loc.kl_mean, loc.top1_agreement
    );
    Ok(())
}
