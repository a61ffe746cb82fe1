//! How much of a ROME edit each of its prompts receives: for the bare prompt and each prefixed
//! variant, the layer-5 key k at the subject's last token and the ratio u.k / u.k*, where
//! u = C^-1 k* (the rank-one update moves a key's output by delta times this ratio).
//!
//! cargo run --release --example key_ratio -- "Veracode, whose headquarters are in" Veracode
//!
//! `HALF=1`: k* weighs the bare prompt 0.5 (ROME's `bare_key_weight`), else the plain mean of
//! all prompts (the reference). `CONCAT=1`: prefixed prompts are token-concatenated, so the
//! subject keeps the bare prompt's tokenization. `PREFIXES=20`: the reference's 20 context
//! prefixes instead of our default 10.
use candle_core::{DType, IndexOp};
use engram::edit::rome::RomeParams;
use engram::model::{Batch, HookPoint, Trace};
use engram::stats::{self, StatsSpec};

fn main() -> engram::Result<()> {
    engram::tune_allocator();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let prompt = &args[0];
    let subject = &args[1];
    let m = engram::model::load(None, &candle_core::Device::Cpu)?;
    let mut p = RomeParams::default();
    if std::env::var("PREFIXES").as_deref() == Ok("20") {
        p.context_templates = vec![(5, 10), (10, 10)];
    }
    let pre = engram::edit::rome::context_prefixes(&m, &p.context_templates, p.seed)?;
    let fp = m.fingerprint()?;
    let spec = StatsSpec {
        samples: p.stats_samples,
        seq_len: p.stats_seq_len,
        seed: p.seed,
        layer: 5,
        ..Default::default()
    };
    let st = stats::load_or_compute(&m, &fp, &spec, &mut |_, _| {})?;
    let chol = st.cholesky()?;
    let tok = m.tok()?;
    let mut keys = Vec::new();
    for pr in &pre {
        let text = format!("{pr}{prompt}");
        let concat = std::env::var("CONCAT").is_ok() && !pr.is_empty();
        let (ids, s, e) = if concat {
            let mut ids = tok.encode(pr.trim_end())?;
            let bare = tok.encode(prompt)?;
            let (s, e) = m.tok()?.subject_span(prompt, subject, &bare, 0)?;
            let off = ids.len();
            ids.extend_from_slice(&bare);
            (ids, s + off, e + off)
        } else {
            let ids = tok.encode(&text)?;
            let (s, e) = m.tok()?.subject_span(&text, subject, &ids, pr.len())?;
            (ids, s, e)
        };
        let mut tr = Trace::new();
        tr.capture(HookPoint::MlpKey(5));
        m.forward(&Batch::single(&ids), &mut tr)?;
        let k = tr
            .take(HookPoint::MlpKey(5))
            .unwrap()
            .i((0, e - 1))?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let subj: Vec<String> = ids[s..e]
            .iter()
            .map(|&t| tok.decode(&[t]).unwrap())
            .collect();
        println!("{:?}", subj);
        keys.push(k);
    }
    let n = keys.len() as f64;
    let d = keys[0].len();
    let half = std::env::var("HALF").is_ok();
    let kstar: Vec<f64> = (0..d)
        .map(|j| {
            if half {
                0.5 * keys[0][j] + 0.5 * keys[1..].iter().map(|k| k[j]).sum::<f64>() / (n - 1.0)
            } else {
                keys.iter().map(|k| k[j]).sum::<f64>() / n
            }
        })
        .collect();
    let u = chol.solve(&kstar);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let uk = dot(&u, &kstar);
    for (i, k) in keys.iter().enumerate() {
        println!("prompt {i}: u.k/u.k* = {:.3}", dot(&u, k) / uk);
    }
    Ok(())
}
