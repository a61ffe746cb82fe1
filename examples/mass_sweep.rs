//! Hyper-parameter sweep behind the README's MEMIT / AlphaEdit choices: the z search of
//! `edits/memit-ten.yaml` runs once, then each setting spreads the same targets over layers
//! 3-6 and is scored (ES / PS / NS counts of 10, KL and top-1 agreement on eval/unrelated.yaml).
//!
//! cargo run --release --example mass_sweep -- memit:15000 memit:3000 alphaedit:0.02:10
use candle_core::{DType, Tensor};
use engram::edit::alphaedit::{AlphaEdit, AlphaEditParams};
use engram::edit::apply;
use engram::edit::batch::{spread_targets, LayerSolver};
use engram::edit::memit::{Memit, MemitParams};
use engram::edit::spec::EditSpec;
use engram::edit::vsearch::{search, SearchRequest, Where};
use engram::eval::metrics::{locality, run_suite, score_rewrite, Suite};
use engram::fact::continuation;
use engram::stats::{load_or_compute_layers, StatsSpec};
use std::path::Path;

fn main() -> engram::Result<()> {
    engram::tune_allocator();
    let mut m = engram::model::load(None, &candle_core::Device::Cpu)?;
    let fp = m.fingerprint()?;
    let spec = EditSpec::load(Path::new("edits/memit-ten.yaml"))?;
    let layers = vec![3usize, 4, 5, 6];
    let p = MemitParams::default();
    let stats = load_or_compute_layers(&m, &fp, &StatsSpec::default(), &layers, &mut |_, _| {})?;
    for s in &stats {
        let (vals, _) = engram::linalg::symmetric_eigen(&s.mom2)?;
        let n = vals.len();
        println!(
            "layer {}: eigenvalues of C min {:.2e}, median {:.2e}, max {:.2e}; below 2e-2: {}, 1e-2: {}, 5e-3: {}",
            s.layer,
            vals[0],
            vals[n / 2],
            vals[n - 1],
            vals.iter().filter(|&&v| v < 2e-2).count(),
            vals.iter().filter(|&&v| v < 1e-2).count(),
            vals.iter().filter(|&&v| v < 5e-3).count()
        );
    }
    let prefixes = engram::edit::rome::context_prefixes(&m, &p.context_templates, p.seed)?;
    let targets: Vec<String> = spec
        .rewrites
        .iter()
        .map(|r| continuation(&r.target_new))
        .collect();
    let reqs: Vec<SearchRequest> = spec
        .rewrites
        .iter()
        .zip(&targets)
        .map(|(r, t)| engram::edit::vsearch::SearchRequest::of(r, t))
        .collect();
    let found = search(
        &m,
        &reqs,
        &prefixes,
        6,
        Where::ResidPost,
        &p.search(),
        p.search_chunk,
    )?;
    let z: Vec<Tensor> = found
        .iter()
        .map(|f| &f.h_bare + &f.delta)
        .collect::<candle_core::Result<_>>()?;
    let z = Tensor::stack(&z, 1)?.to_dtype(DType::F64)?;
    let suite = Suite::load(Path::new("eval/unrelated.yaml"))?;
    let base_run = run_suite(&m, &suite)?;
    for arg in std::env::args().skip(1) {
        let parts: Vec<&str> = arg.split(':').collect();
        let num = |i: usize| {
            parts
                .get(i)
                .and_then(|x| x.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let mut solver: Box<dyn LayerSolver> = match parts[0] {
            "memit" => Box::new(Memit {
                stats: &stats,
                lambda: num(1),
            }),
            _ => {
                let ap = AlphaEditParams {
                    nullspace_threshold: num(1),
                    l2: num(2),
                    ..Default::default()
                };
                Box::new(AlphaEdit::new(&stats, &ap)?)
            }
        };
        let (ds, _) = spread_targets(&mut m, &reqs, &layers, &prefixes, &z, solver.as_mut())?;
        let mut e = m.clone();
        for d in &ds {
            apply(&mut e, d)?;
        }
        let (mut es, mut ps, mut ns) = (0.0, 0.0, 0.0);
        for r in &spec.rewrites {
            let s = score_rewrite(&e, r)?;
            es += s.es;
            ps += s.ps.unwrap_or(0.0);
            ns += s.ns.unwrap_or(0.0);
        }
        let l = locality(&base_run, &run_suite(&e, &suite)?)?;
        println!(
            "{arg}: ES {es}/10 PS {ps}/10 NS {ns}/10 | KL {:.2e} top-1 {:.1}% | perplexity {:.3} -> {:.3}",
            l.kl_mean,
            100.0 * l.top1_agreement,
            l.perplexity_base,
            l.perplexity_edited
        );
    }
    Ok(())
}
