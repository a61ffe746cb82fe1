//! Key statistics: the uncentred covariance `C = E[k k^T]` of the keys k (input of layer L's
//! MLP output projection) over a text corpus. ROME (Meng et al. 2022, eq. 2) and MEMIT use it
//! to make an update touch other keys as little as possible.
//!
//! The reference computes C over 100k Wikipedia samples. We default to text the model samples
//! itself, started from the document separator: it needs no download, it follows the model's
//! own distribution of contexts (which is what C must describe), and 25,600 keys make a
//! well-conditioned 1536 x 1536 estimate. A real corpus (`--corpus FILE`) brings keys from the
//! text people will actually run through the edited model.
//!
//! Results are cached on disk under `$ENGRAM_STATS_DIR` (default `$ENGRAM_HOME/stats/`),
//! keyed by model fingerprint, layer, corpus, sample count, length and seed.

use crate::error::{Error, Result};
use crate::model::generate::{generate_grouped, GenParams};
use crate::model::{fetch, Batch, HookPoint, Model, PadSide, Trace};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// Where the keys come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Corpus {
    /// `samples` sequences the model samples itself (temperature 1), seeded.
    SelfSampled,
    /// A user text file, cut into sequences.
    File(PathBuf),
    /// A text file of documents, one per line (blank lines skipped): each document is one
    /// sequence, cut to `seq_len` tokens, in file order, at most `samples` of them (the spec's
    /// `stats_corpus`).
    Documents(PathBuf),
}

/// Below this many keys per dimension (`count < d_mlp`) C is singular, and
/// [`ridge_if_deficient`] adds `RIDGE * mean(diag C) * I`.
///
/// MEMIT (Meng et al. 2023, eq. 14 and the reference's `mom2_update_weight`) weighs C against
/// the edited keys' outer products instead, with C from 100k Wikipedia samples, so it never
/// meets a rank-deficient C. With a small corpus on a large model (2,000 keys for a d_mlp of
/// 14,336) some regulariser is needed: the ridge keeps the update in the span the corpus saw
/// (directions it saw are damped by C as before) and shrinks it evenly in the others.
pub const RIDGE: f64 = 0.1;

/// Add the ridge to a second moment estimated from fewer than `d` keys.
///
/// Returns the ridge added (0 when `count >= d`).
pub fn ridge_if_deficient(mom2: Tensor, count: usize) -> Result<(Tensor, f64)> {
    let d = mom2.dim(0)?;
    if count >= d {
        return Ok((mom2, 0.0));
    }
    // One f64 copy of C, with λ added on its diagonal in place (a d x d identity and its
    // scaled copy would be two more: 1.6 GB each for an 8B model's d_mlp of 14,336).
    let (dtype, device) = (mom2.dtype(), mom2.device().clone());
    let mut v = mom2.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    drop(mom2);
    let mean_diag = v.iter().step_by(d + 1).sum::<f64>() / d as f64;
    let lambda = RIDGE * mean_diag.max(f64::MIN_POSITIVE);
    for x in v.iter_mut().step_by(d + 1) {
        *x += lambda;
    }
    Ok((
        Tensor::from_vec(v, (d, d), &device)?.to_dtype(dtype)?,
        lambda,
    ))
}

/// Check a documents file before any work: readable, with at least one non-blank line.
///
/// # Errors
/// A message naming the file.
pub fn check_documents(path: &std::path::Path) -> std::result::Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if text.lines().all(|l| l.trim().is_empty()) {
        return Err(format!(
            "{} has no documents (one per line)",
            path.display()
        ));
    }
    Ok(())
}

/// What to compute.
#[derive(Debug, Clone)]
pub struct StatsSpec {
    pub layer: usize,
    pub corpus: Corpus,
    pub samples: usize,
    pub seq_len: usize,
    pub seed: u64,
}

impl Default for StatsSpec {
    fn default() -> Self {
        // 200 x 128 = 25,600 keys: the count the reference run on this model used.
        StatsSpec {
            layer: 0,
            corpus: Corpus::SelfSampled,
            samples: 200,
            seq_len: 128,
            seed: 0,
        }
    }
}

/// The second moment of the keys.
#[derive(Debug, Clone)]
pub struct KeyStats {
    pub layer: usize,
    /// `E[k k^T]`, `[d_mlp, d_mlp]`, f64.
    pub mom2: Tensor,
    /// Number of key vectors averaged.
    pub count: usize,
    pub cache_path: Option<PathBuf>,
}

impl KeyStats {
    /// The Cholesky factor of C, for solving `C u = k`.
    ///
    /// # Errors
    /// A covariance that is not positive definite (too few samples).
    pub fn cholesky(&self) -> Result<crate::linalg::Cholesky> {
        crate::linalg::Cholesky::factor_tensor(&self.mom2)
    }
}

/// Load from the cache, or compute and cache.
///
/// `progress(done, total)` reports sequences processed.
pub fn load_or_compute(
    model: &Model,
    base_fingerprint: &str,
    spec: &StatsSpec,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<KeyStats> {
    load_or_compute_layers(model, base_fingerprint, spec, &[spec.layer], progress)?
        .pop()
        .ok_or_else(|| Error::invalid("stats", "nothing computed"))
}

/// [`load_or_compute`] for several layers (`spec.layer` is ignored): the layers missing from
/// the cache share one pass over the corpus (one sampling run, one forward per chunk up to
/// the highest of them), which is what makes MEMIT's range of layers affordable.
pub fn load_or_compute_layers(
    model: &Model,
    base_fingerprint: &str,
    spec: &StatsSpec,
    layers: &[usize],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<KeyStats>> {
    // One computation at a time per process: a second caller (another thread editing the
    // same model) waits and then finds the cache, instead of sampling the corpus again.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // Each layer's cache path, once (a corpus file's path includes its hash).
    let paths = layers
        .iter()
        .map(|&l| {
            model.config.check_layer(l)?;
            cache_path(
                base_fingerprint,
                &StatsSpec {
                    layer: l,
                    ..spec.clone()
                },
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let mut found: Vec<Option<KeyStats>> = Vec::with_capacity(layers.len());
    let mut missing = Vec::new();
    for (&l, path) in layers.iter().zip(&paths) {
        // A cache file that does not load, has the wrong shape or is degenerate is
        // recomputed (and replaced), never used.
        let d = model.config.d_mlp;
        let cached = if path.exists() {
            let loaded = candle_core::safetensors::load(path, &model.device)
                .ok()
                .and_then(|t| {
                    let (m, c) = (t.get("mom2")?, t.get("count")?);
                    let count = c
                        .to_dtype(DType::F64)
                        .ok()?
                        .flatten_all()
                        .ok()?
                        .to_vec1::<f64>()
                        .ok()?;
                    Some(KeyStats {
                        layer: l,
                        mom2: m.clone(),
                        count: *count.first()? as usize,
                        cache_path: Some(path.clone()),
                    })
                })
                .filter(|s| s.mom2.dims() == [d, d] && check_usable(s).is_ok());
            if loaded.is_none() {
                tracing::warn!("{}: unusable key statistics, recomputing", path.display());
            }
            loaded
        } else {
            None
        };
        if cached.is_none() && !missing.contains(&l) {
            missing.push(l);
        }
        found.push(cached);
    }
    let mut computed = if missing.is_empty() {
        Vec::new()
    } else {
        let seqs = cached_sequences(model, base_fingerprint, spec, progress)?;
        accumulate(model, &seqs, &missing)?
    };
    for s in computed.iter_mut() {
        // Nothing degenerate is ever cached, where the next run would find it.
        check_usable(s)?;
        let i = layers.iter().position(|&l| l == s.layer).unwrap_or(0);
        let path = paths[i].clone();
        let mut map = HashMap::new();
        map.insert("mom2".to_string(), s.mom2.clone());
        map.insert(
            "count".to_string(),
            Tensor::new(&[s.count as f64], &model.device)?,
        );
        crate::model::save::write_atomic(&path, |w| {
            let bytes = safetensors_bytes(&map)?;
            use std::io::Write;
            w.write_all(&bytes).map_err(|e| Error::io(&path, e))
        })?;
        s.cache_path = Some(path);
    }
    layers
        .iter()
        .zip(found)
        .map(|(&l, f)| match f {
            Some(s) => Ok(s),
            None => computed
                .iter()
                .find(|s| s.layer == l)
                .cloned()
                .ok_or_else(|| Error::invalid("stats", format!("layer {l} not computed"))),
        })
        .collect()
}

/// Refuse statistics that no edit can use: no keys, or NaN/Inf, or a zero trace.
fn check_usable(s: &KeyStats) -> Result<()> {
    let d = s.mom2.dim(0)?;
    let flat = s
        .mom2
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let trace: f64 = flat.iter().step_by(d + 1).sum();
    if s.count == 0 || !trace.is_finite() || trace <= 0.0 {
        return Err(Error::NonFinite {
            name: format!(
                "key statistics of layer {} ({} keys, trace {trace})",
                s.layer, s.count
            ),
        });
    }
    crate::model::check_finite(&format!("key statistics of layer {}", s.layer), &s.mom2)
}

fn safetensors_bytes(map: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let p = dir.path().join("t.safetensors");
    candle_core::safetensors::save(map, &p)?;
    std::fs::read(&p).map_err(|e| Error::io(&p, e))
}

fn cache_path(fp: &str, spec: &StatsSpec) -> Result<PathBuf> {
    let corpus = match &spec.corpus {
        Corpus::SelfSampled => "self".to_string(),
        Corpus::File(p) => format!("file-{}", &fetch::sha256_file(p)?[..16]),
        Corpus::Documents(p) => format!("docs-{}", &fetch::sha256_file(p)?[..16]),
    };
    let name = format!(
        "layer{}-{corpus}-{}x{}-seed{}.safetensors",
        spec.layer, spec.samples, spec.seq_len, spec.seed
    );
    Ok(stats_root().join(&fp[..16.min(fp.len())]).join(name))
}

/// Where key statistics are cached: `$ENGRAM_STATS_DIR`, else `$ENGRAM_HOME/stats`. The
/// library's own unit tests use `target/test-stats`, and the integration tests set the
/// variable to it, so that tests never write into the user's cache.
pub fn stats_root() -> PathBuf {
    if let Some(d) = std::env::var_os("ENGRAM_STATS_DIR") {
        return PathBuf::from(d);
    }
    if cfg!(test) {
        return PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-stats"));
    }
    fetch::engram_home().join("stats")
}

/// [`corpus_sequences`], with self-sampled text cached beside the statistics (sampling is
/// most of the cost; another layer then needs only a forward pass).
fn cached_sequences(
    model: &Model,
    base_fingerprint: &str,
    spec: &StatsSpec,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Vec<u32>>> {
    if spec.corpus != Corpus::SelfSampled {
        return corpus_sequences(model, spec, progress);
    }
    let path = cache_path(base_fingerprint, spec)?.with_file_name(format!(
        "text-self-{}x{}-seed{}.json",
        spec.samples, spec.seq_len, spec.seed
    ));
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(seqs) = serde_json::from_str::<Vec<Vec<u32>>>(&text) {
            if seqs.len() == spec.samples {
                progress(spec.samples, spec.samples);
                return Ok(seqs);
            }
        }
    }
    let seqs = corpus_sequences(model, spec, progress)?;
    let json = serde_json::to_vec(&seqs).map_err(|e| Error::invalid("stats", e.to_string()))?;
    crate::model::save::write_atomic(&path, |w| {
        use std::io::Write;
        w.write_all(&json).map_err(|e| Error::io(&path, e))
    })?;
    Ok(seqs)
}

/// The token sequences of the corpus: `[samples][<= seq_len]`, each starting with the
/// document separator.
pub fn corpus_sequences(
    model: &Model,
    spec: &StatsSpec,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Vec<u32>>> {
    let tok = model.tok()?;
    let start = tok.doc_start.unwrap_or(0);
    match &spec.corpus {
        Corpus::SelfSampled => {
            let mut out = Vec::with_capacity(spec.samples);
            // Each chunk of 50 sequences draws from its own seeded stream (seed + index of its
            // first sequence); up to BATCH of them decode as one batch, which gives the same
            // text as one chunk at a time (`generate_grouped`) with larger matrix products.
            // The batch bounds the KV cache (200 x 128 positions: about 1.2 GB).
            const CHUNK: usize = 50;
            const BATCH: usize = 200;
            let p = GenParams {
                max_new_tokens: spec.seq_len.saturating_sub(1),
                temperature: 1.0,
                top_p: 1.0,
                top_k: 0,
                seed: spec.seed,
                stop_at_eos: false,
            };
            let steps = p.max_new_tokens.max(1);
            let mut done = 0;
            while done < spec.samples {
                let n = BATCH.min(spec.samples - done);
                let groups: Vec<(usize, u64)> = (done..done + n)
                    .step_by(CHUNK)
                    .map(|c| (CHUNK.min(done + n - c), spec.seed.wrapping_add(c as u64)))
                    .collect();
                let rows =
                    generate_grouped(model, &vec![vec![start]; n], &p, &groups, &mut |step| {
                        progress(done + n * step.min(steps) / steps, spec.samples)
                    })?;
                for row in rows {
                    let mut s = vec![start];
                    s.extend(row);
                    out.push(s);
                }
                done += n;
                progress(done, spec.samples);
            }
            Ok(out)
        }
        Corpus::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let ids = tok.encode(&text)?;
            let per = spec.seq_len.saturating_sub(1).max(1);
            let out: Vec<Vec<u32>> = ids
                .chunks(per)
                .take(spec.samples)
                .map(|c| {
                    let mut s = vec![start];
                    s.extend_from_slice(c);
                    s
                })
                .collect();
            if out.is_empty() {
                return Err(Error::invalid(
                    "corpus",
                    format!("{} has no text", path.display()),
                ));
            }
            Ok(out)
        }
        Corpus::Documents(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let mut out = Vec::new();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                if out.len() == spec.samples {
                    break;
                }
                let mut s = vec![start];
                let ids = tok.encode(line)?;
                s.extend(ids.iter().take(spec.seq_len.saturating_sub(1)));
                out.push(s);
            }
            if out.is_empty() {
                return Err(Error::invalid(
                    "method.stats_corpus",
                    format!("{} has no documents (one per line)", path.display()),
                ));
            }
            Ok(out)
        }
    }
}

/// Compute the statistics of one layer (no statistics cache).
pub fn compute(
    model: &Model,
    spec: &StatsSpec,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<KeyStats> {
    let seqs = corpus_sequences(model, spec, progress)?;
    accumulate(model, &seqs, &[spec.layer])?
        .pop()
        .ok_or_else(|| Error::invalid("stats", "nothing computed"))
}

/// `E[k k^T]` at each of `layers` over the sequences, in one forward per chunk.
fn accumulate(model: &Model, seqs: &[Vec<u32>], layers: &[usize]) -> Result<Vec<KeyStats>> {
    let d = model.config.d_mlp;
    let top = layers.iter().copied().max().unwrap_or(0);
    let mut acc = layers
        .iter()
        .map(|_| Tensor::zeros((d, d), DType::F64, &model.device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut count = 0usize;
    for chunk in seqs.chunks(16) {
        let batch = Batch::padded(chunk, PadSide::Right, 0);
        let mut tr = Trace::new();
        for &l in layers {
            tr.capture(HookPoint::MlpKey(l));
        }
        tr.stop_after(HookPoint::MlpKey(top)); // layers above the highest never run
        let last = model.forward(&batch, &mut tr)?; // (b, t, d_mlp) at `top`
        let n_keys: usize = chunk.iter().map(Vec::len).sum();
        for (i, &l) in layers.iter().enumerate() {
            let keys = match tr.take(HookPoint::MlpKey(l)) {
                Some(k) => k,
                None => last.clone(),
            };
            let mut rows = Vec::new();
            for (r, s) in chunk.iter().enumerate() {
                rows.push(keys.get(r)?.narrow(0, 0, s.len())?);
            }
            let k = Tensor::cat(&rows, 0)?.to_dtype(DType::F64)?; // (n_keys, d_mlp)
            acc[i] = (&acc[i] + k.t()?.matmul(&k)?)?; // accumulate in f64
        }
        count += n_keys;
    }
    layers
        .iter()
        .zip(acc)
        .map(|(&l, a)| {
            // Fewer keys than dimensions (a small corpus): ridge-regularised.
            let (mom2, ridge) = ridge_if_deficient((a / count as f64)?, count)?;
            if ridge > 0.0 {
                tracing::info!("layer {l}: {count} keys < d_mlp {d}: ridge {ridge:e} added to C");
            }
            Ok(KeyStats {
                layer: l,
                mom2,
                count,
                cache_path: None,
            })
        })
        .collect()
}

/// Path helper for callers that report where the statistics live.
pub fn describe(s: &KeyStats) -> String {
    match &s.cache_path {
        Some(p) => format!("{} keys, cached at {}", s.count, p.display()),
        None => format!("{} keys", s.count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degenerate_statistics_are_refused() {
        let dev = candle_core::Device::Cpu;
        let stats = |mom2: Tensor, count| KeyStats {
            layer: 0,
            mom2,
            count,
            cache_path: None,
        };
        let eye = Tensor::eye(4, DType::F64, &dev).unwrap();
        assert!(check_usable(&stats(eye.clone(), 10)).is_ok());
        assert!(check_usable(&stats(eye.clone(), 0)).is_err());
        let zeros = Tensor::zeros((4, 4), DType::F64, &dev).unwrap();
        assert!(check_usable(&stats(zeros, 10)).is_err());
        let nan = (eye * f64::NAN).unwrap();
        assert!(check_usable(&stats(nan, 10)).is_err());
    }
}

#[cfg(test)]
mod ridge_tests {
    use super::*;

    #[test]
    fn the_ridge_is_added_only_below_d_keys() {
        let dev = candle_core::Device::Cpu;
        // Rank one: k = (1, 2, 0), mean diag = 5/3.
        let k = Tensor::new(&[[1f64, 2.0, 0.0]], &dev).unwrap();
        let c = k.t().unwrap().matmul(&k).unwrap();
        let (r, lambda) = ridge_if_deficient(c.clone(), 1).unwrap();
        assert!((lambda - RIDGE * 5.0 / 3.0).abs() < 1e-12);
        let r: Vec<Vec<f64>> = r.to_vec2().unwrap();
        assert!((r[2][2] - lambda).abs() < 1e-12 && (r[0][1] - 2.0).abs() < 1e-12);
        let (same, none) = ridge_if_deficient(c, 3).unwrap();
        assert_eq!(none, 0.0);
        assert_eq!(same.to_vec2::<f64>().unwrap()[2][2], 0.0);
    }
}
