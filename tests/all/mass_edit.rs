//! Mass and sequential editing: MEMIT and AlphaEdit on smollm2-135m.

use crate::common::*;
use candle_core::{DType, Tensor};
use engram::edit::run::{run_spec, Editor};
use engram::edit::spec::{EditSpec, Method, Sequential};
use engram::edit::{apply, WeightDelta};
use engram::eval::metrics::{score_rewrite, Suite};
use engram::model::{Batch, HookPoint, PadSide, Trace};
use std::path::Path;

fn ten() -> EditSpec {
    EditSpec::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/edits/memit-ten.yaml"
    )))
    .unwrap()
}

/// Keys `[d_mlp, n]` at `layer` over every token of the unrelated-prompt suite: knowledge
/// the edits must preserve.
fn preserved_keys(layer: usize) -> Tensor {
    let m = real();
    let suite = Suite::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/eval/unrelated.yaml"
    )))
    .unwrap();
    let tok = m.tok().unwrap();
    let seqs: Vec<Vec<u32>> = suite
        .prompts
        .iter()
        .map(|p| tok.encode(&p.prompt).unwrap())
        .collect();
    let mut cols = Vec::new();
    for chunk in seqs.chunks(64) {
        let mut tr = Trace::new();
        tr.stop_after(HookPoint::MlpKey(layer));
        let k = m
            .forward(&Batch::padded(chunk, PadSide::Right, 0), &mut tr)
            .unwrap();
        for (r, s) in chunk.iter().enumerate() {
            cols.push(k.get(r).unwrap().narrow(0, 0, s.len()).unwrap());
        }
    }
    Tensor::cat(&cols, 0)
        .unwrap()
        .t()
        .unwrap()
        .contiguous()
        .unwrap()
}

fn frobenius(t: &Tensor) -> f64 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

/// |ΔW K_p|_F / (|ΔW|_F |K_p|_F): how much an update moves the preserved keys' outputs,
/// relative to its size.
fn leakage(d: &WeightDelta, kp: &Tensor) -> f64 {
    let w = d.dense().unwrap().to_dtype(DType::F64).unwrap();
    let kp = kp.to_dtype(DType::F64).unwrap();
    frobenius(&w.matmul(&kp).unwrap()) / (frobenius(&w) * frobenius(&kp))
}

/// A batch of ten rewrites: every one succeeds (ES 100%) with MEMIT and with AlphaEdit;
/// compute leaves the model unchanged; MEMIT keeps every neighbourhood prompt that held
/// before (AlphaEdit may lose one: measured 9/10 on this file); AlphaEdit's update is
/// numerically orthogonal to the preserved-key subspace (the eigenvectors of C above the
/// threshold). How much each update moves the keys of unrelated prompts is printed.
#[test]
fn memit_and_alphaedit_edit_ten_facts_at_once() {
    let base = real();
    let fp0 = base.fingerprint().unwrap();
    let spec = ten();
    for method in [spec.method.clone(), Method::Alphaedit(Default::default())] {
        let name = method.name();
        let mut m = base.clone();
        let mut ed = Editor::new(&m, method).unwrap();
        let (deltas, trace) = ed.compute_batch(&mut m, &spec.rewrites).unwrap();
        assert_eq!(
            m.fingerprint().unwrap(),
            fp0,
            "{name}: compute changed the model"
        );
        assert_eq!(deltas.len(), 4, "one update per layer 3-6");
        println!("{name}: layers {:?}", trace.layers);
        for d in &deltas {
            apply(&mut m, d).unwrap();
        }
        let (mut es, mut ns_pre, mut ns_post) = (0.0, 0.0, 0.0);
        for r in &spec.rewrites {
            let pre = score_rewrite(base, r).unwrap();
            let post = score_rewrite(&m, r).unwrap();
            println!(
                "{name}: {} -> {}: ES {} PS {:?} NS {:?} -> {:?}",
                r.prompt, r.target_new, post.es, post.ps, pre.ns, post.ns
            );
            es += post.es;
            ns_pre += pre.ns.unwrap();
            ns_post += post.ns.unwrap();
        }
        assert_eq!(es, 10.0, "{name}: every rewrite must succeed");
        let allowed = if name == "memit" { 0.0 } else { 1.0 };
        assert!(
            ns_post >= ns_pre - allowed,
            "{name}: neighbourhood NS {ns_pre} -> {ns_post}"
        );
        let moved: Vec<f64> = deltas
            .iter()
            .map(|d| leakage(d, &preserved_keys(d.layer)))
            .collect();
        println!("{name}: |ΔW K_p| / (|ΔW| |K_p|) on unrelated prompts' keys per layer: {moved:?}");
        if let Some(spaces) = ed.null_spaces() {
            for (d, ns) in deltas.iter().zip(spaces) {
                // ΔW (I - P): the update's action on the preserved subspace.
                let w = d.dense().unwrap().to_dtype(DType::F64).unwrap();
                let n = ns.projector.dim(0).unwrap();
                let keep = (Tensor::eye(n, DType::F64, &candle_core::Device::Cpu).unwrap()
                    - &ns.projector)
                    .unwrap();
                let ratio = frobenius(&w.matmul(&keep).unwrap()) / frobenius(&w);
                println!(
                    "alphaedit layer {}: null space {} of {n}, |ΔW (I-P)| / |ΔW| = {ratio:e}",
                    d.layer, ns.dim
                );
                assert!(ratio < 1e-5, "layer {}: {ratio:e}", d.layer);
            }
        }
    }
}

/// Sequential AlphaEdit: two batches of five on the same model; the retention curve is
/// recorded after each batch, and the first batch is still in place after the second.
#[test]
fn sequential_alphaedit_keeps_earlier_edits() {
    let mut m = real().clone();
    let mut spec = ten();
    spec.method = Method::Alphaedit(Default::default());
    spec.sequential = Some(Sequential { batch_size: 5 });
    let (report, deltas, _) = run_spec(&mut m, &spec, None, &mut |_| {}).unwrap();
    println!("retention: {:?}", report.retention);
    assert_eq!(report.retention.len(), 2);
    assert_eq!(deltas.len(), 8, "4 layers x 2 batches");
    assert_eq!(report.retention[1].edits, 10);
    assert!(report.retention[0].es_earlier.is_none());
    let earlier = report.retention[1].es_earlier.unwrap();
    assert!(earlier >= 0.8, "first batch retention {earlier}");
    assert!(report.retention[1].es_all >= 0.8, "{:?}", report.retention);
}

/// Reading keys from the cached residual below the first edited layer gives the keys and
/// residuals of a full forward pass.
#[test]
fn keys_from_cached_residual_match_full_pass() {
    use engram::edit::batch::KeyPrompts;
    use engram::edit::vsearch::Request;
    let m = real();
    let spec = ten();
    let reqs: Vec<Request> = spec.rewrites[..4]
        .iter()
        .map(|r| r.request(&r.target_new))
        .collect();
    let prefixes = vec![
        String::new(),
        "Hello there. ".to_string(),
        "In the year of the long drought, ".to_string(),
    ];
    let full = KeyPrompts::new(m, &reqs, &prefixes).unwrap();
    let mut cached = KeyPrompts::new(m, &reqs, &prefixes).unwrap();
    cached.cache_below(m, 3).unwrap();
    for layer in [3, 5] {
        let (k0, h0) = full.read(m, layer, 6).unwrap();
        let (k1, h1) = cached.read(m, layer, 6).unwrap();
        assert_eq!(k0.dims(), &[m.config.d_mlp, 4]);
        assert_eq!(h0.dims(), &[m.config.d_model, 4]);
        let dk = max_abs_diff(
            &k0.to_dtype(DType::F32).unwrap(),
            &k1.to_dtype(DType::F32).unwrap(),
        );
        let dh = max_abs_diff(
            &h0.to_dtype(DType::F32).unwrap(),
            &h1.to_dtype(DType::F32).unwrap(),
        );
        assert!(
            dk < 1e-4 && dh < 1e-3,
            "layer {layer}: keys differ by {dk}, states by {dh}"
        );
        assert!(max_abs(&k0.to_dtype(DType::F32).unwrap()) > 1e-2);
    }
}

/// The z search over several rewrites at once (rows padded together, the clean pass split
/// into groups of like subject position) finds what each rewrite's search alone finds.
#[test]
fn searching_rewrites_together_equals_searching_each_alone() {
    use engram::edit::spec::continuation;
    use engram::edit::vsearch::{search, Request, SearchParams, Where};
    let m = real();
    let spec = ten();
    let targets: Vec<String> = spec.rewrites[..3]
        .iter()
        .map(|r| continuation(&r.target_new))
        .collect();
    let reqs: Vec<Request> = spec.rewrites[..3]
        .iter()
        .zip(&targets)
        .map(|(r, t)| r.request(t))
        .collect();
    let prefixes = vec![
        String::new(),
        "Hello there. ".to_string(),
        "In the year of the long drought, ".to_string(),
    ];
    // Three steps each, never stopping early.
    let params = SearchParams {
        steps: 3,
        lr: 2.0,
        weight_decay: 0.5,
        clamp_norm_factor: 0.75,
        kl_factor: 0.0625,
        stop_prob: 2.0,
    };
    let together = search(m, &reqs, &prefixes, 6, Where::ResidPost, &params, 3).unwrap();
    for (i, r) in reqs.iter().enumerate() {
        let alone = search(
            m,
            std::slice::from_ref(r),
            &prefixes,
            6,
            Where::ResidPost,
            &params,
            1,
        )
        .unwrap();
        let (a, b) = (&alone[0], &together[i]);
        assert_eq!(a.trace.steps, 3);
        let rel = |x: &Tensor, y: &Tensor| max_abs_diff(x, y) / max_abs(x);
        let (dd, dh) = (rel(&a.delta, &b.delta), rel(&a.h_bare, &b.h_bare));
        assert!(
            dd < 1e-2 && dh < 1e-4,
            "rewrite {i}: delta differs by {dd}, h by {dh}"
        );
        assert!((a.trace.target_prob - b.trace.target_prob).abs() < 1e-3);
    }
}
