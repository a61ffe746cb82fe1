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
//! Results are cached on disk under `$ENGRAM_HOME/stats/`, keyed by model fingerprint, layer,
//! corpus, sample count, length and seed.

use crate::error::{Error, Result};
use crate::model::generate::{generate, GenParams};
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
    pub fn cholesky(&self) -> Result<super::linalg::Cholesky> {
        let n = self.mom2.dim(0)?;
        let flat = self
            .mom2
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        super::linalg::Cholesky::factor(&flat, n)
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
    model.config.check_layer(spec.layer)?;
    let path = cache_path(base_fingerprint, spec)?;
    if path.exists() {
        let t = candle_core::safetensors::load(&path, &model.device)
            .map_err(|e| Error::bad_checkpoint(&path, e))?;
        if let (Some(m), Some(c)) = (t.get("mom2"), t.get("count")) {
            let count = c.to_dtype(DType::F64)?.to_vec1::<f64>()?[0] as usize;
            return Ok(KeyStats {
                layer: spec.layer,
                mom2: m.clone(),
                count,
                cache_path: Some(path),
            });
        }
    }
    let mut s = compute(model, spec, progress)?;
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
    Ok(s)
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
    };
    let name = format!(
        "layer{}-{corpus}-{}x{}-seed{}.safetensors",
        spec.layer, spec.samples, spec.seq_len, spec.seed
    );
    Ok(fetch::engram_home()
        .join("stats")
        .join(&fp[..16.min(fp.len())])
        .join(name))
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
            // Chunks bound the KV cache's memory.
            let chunk = 50;
            let mut done = 0;
            while done < spec.samples {
                let n = chunk.min(spec.samples - done);
                let p = GenParams {
                    max_new_tokens: spec.seq_len.saturating_sub(1),
                    temperature: 1.0,
                    top_p: 1.0,
                    top_k: 0,
                    seed: spec.seed.wrapping_add(done as u64),
                    stop_at_eos: false,
                };
                for row in generate(model, &vec![vec![start]; n], &p)? {
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
                    "--corpus",
                    format!("{} has no text", path.display()),
                ));
            }
            Ok(out)
        }
    }
}

/// Compute the statistics (no cache).
pub fn compute(
    model: &Model,
    spec: &StatsSpec,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<KeyStats> {
    let seqs = corpus_sequences(model, spec, progress)?;
    let d = model.config.d_mlp;
    let mut acc = Tensor::zeros((d, d), DType::F64, &model.device)?;
    let mut count = 0usize;
    for chunk in seqs.chunks(16) {
        let batch = Batch::padded(chunk, PadSide::Right, 0);
        let mut tr = Trace::new();
        tr.stop_after(HookPoint::MlpKey(spec.layer));
        let keys = model.forward(&batch, &mut tr)?; // (b, t, d_mlp): layers above L never run
        let mut rows = Vec::new();
        for (r, s) in chunk.iter().enumerate() {
            rows.push(keys.get(r)?.narrow(0, 0, s.len())?);
        }
        let k = Tensor::cat(&rows, 0)?.to_dtype(DType::F64)?; // (n_keys, d_mlp)
        count += k.dim(0)?;
        acc = (acc + k.t()?.matmul(&k)?)?; // accumulate in f64
    }
    let mom2 = (acc / count as f64)?;
    Ok(KeyStats {
        layer: spec.layer,
        mom2,
        count,
        cache_path: None,
    })
}

/// Path helper for callers that report where the statistics live.
pub fn describe(s: &KeyStats) -> String {
    match &s.cache_path {
        Some(p) => format!("{} keys, cached at {}", s.count, p.display()),
        None => format!("{} keys", s.count),
    }
}
