//! Everything about running a checkpoint: configuration, the model families, hook points,
//! loading, saving, tokenization and generation.
//!
//! The model layer knows nothing about editing. Editing and unlearning talk to it through
//! [`Model::forward`] with a [`Trace`], and through named weight access
//! ([`Model::weight`] with a [`Site`]).

pub mod config;
pub mod delta;
pub mod fetch;
pub mod fused;
pub mod generate;
pub mod gguf_check;
pub mod gpt2;
pub mod hooks;
pub mod layers;
pub mod llama;
pub mod load;
pub mod matmul;
pub mod param;
pub mod quant;
pub mod save;
pub mod synth;
pub mod tokenizer;

pub use config::{Arch, Config};
pub use hooks::{HookPoint, Op, Positions, Trace};
pub use layers::KvCache;
pub use load::{load, load_with, Format, Source};
pub use param::{Mat, Param, Stored, WeightMode};
pub use tokenizer::Tok;

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;

/// The tensors of a model by checkpoint name (Hugging Face naming, linear weights stored
/// `[out, in]`): f32 tensors, and in [`WeightMode::Stored`] frozen matrices in their checkpoint
/// type (see [`param`]).
#[derive(Debug, Clone, Default)]
pub struct Weights {
    map: BTreeMap<String, Param>,
}

impl Weights {
    /// A map of f32 tensors.
    pub fn new(map: BTreeMap<String, Tensor>) -> Self {
        Weights {
            map: map.into_iter().map(|(n, t)| (n, Param::Dense(t))).collect(),
        }
    }

    pub fn from_params(map: BTreeMap<String, Param>) -> Self {
        Weights { map }
    }

    fn missing(name: &str) -> Error {
        Error::MissingTensor {
            path: "(model)".into(),
            name: name.to_string(),
        }
    }

    /// A weight by name, as held.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] when absent (loading checks every name, so this is a bug).
    pub fn param(&self, name: &str) -> Result<&Param> {
        self.map.get(name).ok_or_else(|| Self::missing(name))
    }

    /// A dense (f32) tensor by name: norms, biases, and every matrix not kept stored.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] when absent; [`Error::InvalidArgument`] for a stored matrix
    /// (use [`Weights::dense`] or [`Weights::mat`]).
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        match self.param(name)? {
            Param::Dense(t) => Ok(t),
            Param::Stored(s) => Err(Error::invalid(
                "weights",
                format!(
                    "`{name}` is held in its stored type {:?}; this path needs it dense",
                    s.dtype()
                ),
            )),
        }
    }

    /// A tensor's values in f32, dequantizing a stored matrix (a copy; the map is unchanged).
    pub fn dense(&self, name: &str) -> Result<Tensor> {
        self.param(name)?.dense()
    }

    /// A matrix for the linear map, dense or stored.
    pub fn mat(&self, name: &str) -> Result<Mat<'_>> {
        Ok(self.param(name)?.mat())
    }

    /// Insert or replace a dense f32 tensor (a written matrix is dense from then on).
    pub fn insert(&mut self, name: String, t: Tensor) {
        self.map.insert(name, Param::Dense(t));
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Param)> {
        self.map.iter()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn n_params(&self) -> usize {
        self.map.values().map(|t| t.elem_count()).sum()
    }

    /// Bytes the weights take in memory (stored blocks at their size, dense at 4 per value).
    pub fn size_in_bytes(&self) -> usize {
        self.map.values().map(|p| p.size_in_bytes()).sum()
    }

    /// Names of the matrices still held in their stored type.
    pub fn stored_names(&self) -> impl Iterator<Item = &String> {
        self.map
            .iter()
            .filter(|(_, p)| matches!(p, Param::Stored(_)))
            .map(|(n, _)| n)
    }
}

/// A rewritable weight matrix of a layer, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Site {
    /// The MLP output projection (`mlp.down_proj` / `mlp.c_proj`), `[d_model, d_mlp]`: the
    /// matrix ROME, MEMIT and AlphaEdit rewrite.
    MlpOut,
}

/// A batch of token rows, with an optional padding mask.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch][seq]` token ids (padded rows hold `pad_id` in their padding).
    pub ids: Vec<Vec<u32>>,
    /// `[batch][seq]`: 1 for a real token, 0 for padding; `None` when no row is padded.
    pub mask: Option<Vec<Vec<u8>>>,
}

/// Which side padding goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadSide {
    /// Real tokens first (scoring: positions line up with an unpadded run).
    Right,
    /// Padding first (generation: every row's last token is at the end).
    Left,
}

impl Batch {
    /// One unpadded row.
    pub fn single(ids: &[u32]) -> Batch {
        Batch {
            ids: vec![ids.to_vec()],
            mask: None,
        }
    }

    /// Rows of different lengths padded to the longest.
    pub fn padded(rows: &[Vec<u32>], side: PadSide, pad_id: u32) -> Batch {
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if rows.iter().all(|r| r.len() == t) {
            return Batch {
                ids: rows.to_vec(),
                mask: None,
            };
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut mask = Vec::with_capacity(rows.len());
        for r in rows {
            let pad = t - r.len();
            let (mut i, mut m) = (Vec::with_capacity(t), Vec::with_capacity(t));
            if side == PadSide::Left {
                i.extend(std::iter::repeat_n(pad_id, pad));
                m.extend(std::iter::repeat_n(0u8, pad));
            }
            i.extend_from_slice(r);
            m.extend(std::iter::repeat_n(1u8, r.len()));
            if side == PadSide::Right {
                i.extend(std::iter::repeat_n(pad_id, pad));
                m.extend(std::iter::repeat_n(0u8, pad));
            }
            ids.push(i);
            mask.push(m);
        }
        Batch {
            ids,
            mask: Some(mask),
        }
    }

    pub fn batch_size(&self) -> usize {
        self.ids.len()
    }

    pub fn seq_len(&self) -> usize {
        self.ids.first().map(|r| r.len()).unwrap_or(0)
    }
}

/// What a pass starts from: token ids, or a residual stream at some layer.
enum Input<'a> {
    Ids(&'a Tensor),
    Resid(&'a Tensor),
}

/// A loaded model: configuration, f32 weights, tokenizer, and where it came from.
///
/// Cloning is cheap: tensors are reference-counted, so a clone shares storage until a weight
/// is replaced.
#[derive(Clone)]
pub struct Model {
    pub config: Config,
    pub weights: Weights,
    pub tokenizer: Option<Tok>,
    pub source: Source,
    pub device: Device,
}

impl Model {
    /// Full-sequence logits, with the trace's interventions applied.
    ///
    /// If the trace has a stop point, returns the activation at that point instead.
    ///
    /// # Shapes
    /// Returns `[batch, seq, vocab]` (or the stop point's `[batch, seq, dim]`).
    ///
    /// # Errors
    /// Out-of-vocabulary ids, bad intervention positions, tensor errors.
    pub fn forward(&self, batch: &Batch, trace: &mut Trace) -> Result<Tensor> {
        self.forward_cached(batch, None, trace)
    }

    /// Like [`Model::forward`], continuing from (and extending) a KV cache. With a cache, the
    /// batch holds only the new tokens and `batch.mask` must cover past and new positions.
    pub fn forward_cached(
        &self,
        batch: &Batch,
        cache: Option<&mut KvCache>,
        trace: &mut Trace,
    ) -> Result<Tensor> {
        let v = self.config.vocab_size as u32;
        if let Some(&bad) = batch.ids.iter().flatten().find(|&&id| id >= v) {
            return Err(Error::invalid(
                "token id",
                format!("{bad} is outside the vocabulary of {v}"),
            ));
        }
        let ids = layers::ids_tensor(&batch.ids, &self.device)?;
        self.run(
            Input::Ids(&ids),
            0,
            batch.mask.as_deref(),
            cache,
            trace,
            false,
        )
    }

    /// Run blocks `layer..` on a given residual stream, as if it were `resid_pre(layer)`.
    ///
    /// With a cache, `resid` holds only the positions after the cached ones (the cache must
    /// hold layers `layer..`); earlier layers are never recomputed. With `last_only`, the
    /// output head runs on the last position alone. This is what makes causal tracing and
    /// ROME's v* search cheap: the unchanged prefix of layers and positions is computed once.
    ///
    /// # Shapes
    /// `resid`: `[batch, seq, d_model]`; `key_mask`: `[batch][past + seq]`; returns
    /// `[batch, seq or 1, vocab]` (or the stop point's activation).
    ///
    /// # Errors
    /// [`Error::LayerOutOfRange`], tensor errors.
    pub fn forward_from(
        &self,
        layer: usize,
        resid: &Tensor,
        key_mask: Option<&[Vec<u8>]>,
        cache: Option<&mut KvCache>,
        trace: &mut Trace,
        last_only: bool,
    ) -> Result<Tensor> {
        if layer > self.config.n_layers {
            return Err(Error::LayerOutOfRange {
                layer,
                n_layers: self.config.n_layers,
            });
        }
        self.run(
            Input::Resid(resid),
            layer,
            key_mask,
            cache,
            trace,
            last_only,
        )
    }

    fn run(
        &self,
        input: Input<'_>,
        start: usize,
        key_mask: Option<&[Vec<u8>]>,
        mut cache: Option<&mut KvCache>,
        trace: &mut Trace,
        last_only: bool,
    ) -> Result<Tensor> {
        let (cfg, w) = (&self.config, &self.weights);
        let (b, t) = match input {
            Input::Ids(ids) => ids.dims2()?,
            Input::Resid(x) => {
                let (b, t, _) = x.dims3()?;
                (b, t)
            }
        };
        let past = cache.as_ref().map(|c| c.len_at(start)).unwrap_or(0);
        let pos = layers::position_ids(b, t, past, key_mask);
        let mut ctx = layers::BlockCtx {
            bias: layers::attention_bias(b, t, past, key_mask, &self.device)?,
            rope: match cfg.arch {
                Arch::Llama => llama::prepare(cfg, &pos, &self.device)?,
                Arch::Gpt2 => gpt2::prepare(cfg, &pos, &self.device)?,
            },
            last_only: false,
        };
        // With only the last position's logits wanted, the last block computes that position
        // alone, unless the trace hooks that block past its input or stops inside it.
        let last = cfg.n_layers.saturating_sub(1);
        let inside_last = |p: HookPoint| p.layer() == Some(last) && p != HookPoint::ResidPre(last);
        let trim_last = last_only
            && !trace.interventions().iter().any(|iv| inside_last(iv.point))
            && !trace.stop_point().map(inside_last).unwrap_or(false);
        let mut x = match input {
            Input::Resid(x) => x.clone(),
            Input::Ids(ids) => {
                let pos = layers::ids_tensor(&pos, &self.device)?;
                let x = match cfg.arch {
                    Arch::Llama => llama::embed(cfg, w, ids, &pos)?,
                    Arch::Gpt2 => gpt2::embed(cfg, w, ids, &pos)?,
                };
                let x = trace.hook(HookPoint::Embed, x)?;
                if trace.stop_point() == Some(HookPoint::Embed) {
                    return Ok(x);
                }
                x
            }
        };
        for l in start..cfg.n_layers {
            ctx.last_only = trim_last && l == last;
            let c = cache.as_deref_mut();
            let step = match cfg.arch {
                Arch::Llama => llama::block(cfg, w, l, x, &ctx, c, trace)?,
                Arch::Gpt2 => gpt2::block(cfg, w, l, x, &ctx, c, trace)?,
            };
            x = match step {
                layers::Step::Continue(x) => x,
                layers::Step::Stop(y) => return Ok(y),
            };
        }
        if last_only {
            let t = x.dim(1)?; // already 1 when the last block was trimmed
            x = x.narrow(1, t - 1, 1)?;
        }
        let diff = trace.is_differentiable();
        match cfg.arch {
            Arch::Llama => llama::head(cfg, w, &x, diff),
            Arch::Gpt2 => gpt2::head(cfg, w, &x, diff),
        }
    }

    /// Final norm and output head on a residual stream.
    ///
    /// # Shapes
    /// `x`: `[..., d_model]` as `[batch, seq, d_model]` -> `[batch, seq, vocab]`.
    pub fn head(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        match self.config.arch {
            Arch::Llama => llama::head(&self.config, &self.weights, x, differentiable),
            Arch::Gpt2 => gpt2::head(&self.config, &self.weights, x, differentiable),
        }
    }

    /// The checkpoint name of a layer's matrix.
    ///
    /// # Errors
    /// [`Error::LayerOutOfRange`].
    pub fn weight_name(&self, layer: usize, site: Site) -> Result<String> {
        self.config.check_layer(layer)?;
        Ok(match site {
            Site::MlpOut => self.config.arch.mlp_out(layer),
        })
    }

    /// A layer's matrix in f32, `[out, in]` (for `MlpOut`: `[d_model, d_mlp]`); a stored
    /// matrix is dequantized into a copy.
    pub fn weight(&self, layer: usize, site: Site) -> Result<Tensor> {
        self.weights.dense(&self.weight_name(layer, site)?)
    }

    /// Replace a layer's matrix (shape and dtype must match).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`], [`Error::NonFinite`].
    pub fn set_weight(&mut self, layer: usize, site: Site, w: Tensor) -> Result<()> {
        let name = self.weight_name(layer, site)?;
        self.set_tensor(&name, w)
    }

    /// Replace a tensor by checkpoint name (shape must match; values must be finite).
    pub fn set_tensor(&mut self, name: &str, w: Tensor) -> Result<()> {
        let old = self.weights.param(name)?;
        if old.dims() != w.dims() {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                found: w.dims().to_vec(),
                expected: old.dims().to_vec(),
            });
        }
        check_finite(name, &w)?;
        self.weights
            .insert(name.to_string(), w.to_dtype(DType::F32)?);
        Ok(())
    }

    /// The tokenizer, or an error saying the checkpoint has none.
    pub fn tok(&self) -> Result<&Tok> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Tokenizer(format!(
                "{} has no tokenizer (tokenizer.json or GGUF tokenizer metadata)",
                self.source.path.display()
            ))
        })
    }

    /// SHA-256 over every tensor's name, shape and f32 bytes, in name order: identifies the
    /// exact weights an edit was computed against. A stored matrix hashes its dequantized
    /// values, so the fingerprint is the same in both [`WeightMode`]s.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        // In slices of about 1M values, so that hashing never copies a whole embedding.
        fn hash_f32(h: &mut Sha256, t: &Tensor) -> Result<()> {
            let flat = t.flatten_all()?;
            let n = flat.elem_count();
            let mut start = 0;
            while start < n {
                let len = (1 << 20).min(n - start);
                let v: Vec<f32> = flat.narrow(0, start, len)?.to_vec1()?;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                h.update(&bytes);
                start += len;
            }
            Ok(())
        }
        let mut h = Sha256::new();
        for (name, p) in self.weights.iter() {
            h.update(name.as_bytes());
            for d in p.dims() {
                h.update((*d as u64).to_le_bytes());
            }
            match p {
                Param::Dense(t) => hash_f32(&mut h, t)?,
                Param::Stored(s) => s.for_each_chunk(|_, t| hash_f32(&mut h, t))?,
            }
        }
        Ok(format!("{:x}", h.finalize()))
    }
}

/// Refuse tensors holding NaN or Inf.
pub fn check_finite(name: &str, t: &Tensor) -> Result<()> {
    // 0 * x is 0 for every finite x and NaN for NaN or ±Inf, so the sum is finite iff all are.
    let s = t
        .to_dtype(DType::F32)?
        .affine(0.0, 0.0)?
        .sum_all()?
        .to_scalar::<f32>()?;
    if !s.is_finite() {
        return Err(Error::NonFinite { name: name.into() });
    }
    Ok(())
}
