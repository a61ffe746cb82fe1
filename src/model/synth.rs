//! Synthetic checkpoints with the block shapes of real models, for measuring memory and time
//! at scale on a machine that has only the default model (`engram model synth`).
//!
//! The weights are random (`N(0, 0.02²)`, norms 1), so the file says nothing about quality.
//! It carries the default model's tokenizer (the `tokenizer.*` metadata of smollm2-135m), and
//! its embedding (and output head) have that tokenizer's 49,152 rows instead of the real
//! model's vocabulary: [`Shape::n_params`] states the resulting count.
//!
//! Types follow llama.cpp's quantizer (`llama_model_quantize`, `src/llama-quant.cpp`):
//! - `q4_k_m`: Q4_K everywhere, except Q6_K for the output head and for `attn_v` and
//!   `ffn_down` on the layers llama.cpp's `use_more_bits` picks (the first and last eighth, and
//!   every third layer between). These are the main rules only: llama.cpp has further
//!   special cases (by GQA factor, expert count, tensor counts) that this does not copy, so a
//!   real Q4_K_M file of the model can differ in a few tensors' types and in size by a few
//!   percent. A matrix whose rows do not fit 256-wide K-quant blocks takes
//!   llama.cpp's fallback (Q4_K -> Q5_0, Q6_K -> Q8_0; [`super::quant::fitting_type`]).
//! - `q8_0` and `f16`: every matrix in that type.
//! - Norm vectors and biases are f32, as llama.cpp writes them.
//!
//! One random matrix is drawn and quantized per (shape, type) and written for every layer that
//! has it: writing an 8B-shaped file then takes seconds, not the minutes of quantizing 8B
//! random values, and loading it still reads every tensor from the file.

use super::quant::fitting_type;
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The architecture of a real model, as its `config.json` gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub name: &'static str,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_mlp: usize,
    /// The real model's vocabulary (the synthetic file uses the default tokenizer's instead).
    pub real_vocab: usize,
    pub tie_embeddings: bool,
    pub attn_bias: bool,
    pub rope_theta: f32,
    pub norm_eps: f32,
}

/// Rows of the embedding in a synthetic file: the default tokenizer's vocabulary.
pub const SYNTH_VOCAB: usize = 49152;

/// The shapes `engram model synth --like` knows.
pub const SHAPES: [Shape; 3] = [
    // meta-llama/Llama-3.2-1B config.json
    Shape {
        name: "llama-3.2-1b",
        d_model: 2048,
        n_layers: 16,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 64,
        d_mlp: 8192,
        real_vocab: 128256,
        tie_embeddings: true,
        attn_bias: false,
        rope_theta: 500000.0,
        norm_eps: 1e-5,
    },
    // Qwen/Qwen2.5-3B config.json
    Shape {
        name: "qwen2.5-3b",
        d_model: 2048,
        n_layers: 36,
        n_heads: 16,
        n_kv_heads: 2,
        head_dim: 128,
        d_mlp: 11008,
        real_vocab: 151936,
        tie_embeddings: true,
        attn_bias: true,
        rope_theta: 1000000.0,
        norm_eps: 1e-6,
    },
    // meta-llama/Llama-3.1-8B config.json
    Shape {
        name: "llama-3.1-8b",
        d_model: 4096,
        n_layers: 32,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        d_mlp: 14336,
        real_vocab: 128256,
        tie_embeddings: false,
        attn_bias: false,
        rope_theta: 500000.0,
        norm_eps: 1e-5,
    },
];

/// A shape by name.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the known shapes.
pub fn shape(name: &str) -> Result<Shape> {
    SHAPES
        .iter()
        .find(|s| s.name == name)
        .copied()
        .ok_or_else(|| {
            let known: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
            Error::invalid(
                "like",
                format!("unknown shape `{name}`; known: {}", known.join(", ")),
            )
        })
}

/// The file types `engram model synth --type` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthType {
    #[value(name = "q4_k_m")]
    Q4KM,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "f16")]
    F16,
}

impl SynthType {
    pub fn name(self) -> &'static str {
        match self {
            SynthType::Q4KM => "q4_k_m",
            SynthType::Q8_0 => "q8_0",
            SynthType::F16 => "f16",
        }
    }
}

/// llama.cpp's `use_more_bits(i_layer, n_layers)`.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

impl Shape {
    /// Every tensor of the synthetic file: GGUF name and dims `[rows, cols]` (`[n]` for
    /// vectors), in llama.cpp's order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (d, m) = (self.d_model, self.d_mlp);
        let (q, kv) = (
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        let mut v = vec![("token_embd.weight".to_string(), vec![SYNTH_VOCAB, d])];
        for l in 0..self.n_layers {
            let b = format!("blk.{l}");
            v.push((format!("{b}.attn_norm.weight"), vec![d]));
            v.push((format!("{b}.attn_q.weight"), vec![q, d]));
            v.push((format!("{b}.attn_k.weight"), vec![kv, d]));
            v.push((format!("{b}.attn_v.weight"), vec![kv, d]));
            if self.attn_bias {
                v.push((format!("{b}.attn_q.bias"), vec![q]));
                v.push((format!("{b}.attn_k.bias"), vec![kv]));
                v.push((format!("{b}.attn_v.bias"), vec![kv]));
            }
            v.push((format!("{b}.attn_output.weight"), vec![d, q]));
            v.push((format!("{b}.ffn_norm.weight"), vec![d]));
            v.push((format!("{b}.ffn_gate.weight"), vec![m, d]));
            v.push((format!("{b}.ffn_up.weight"), vec![m, d]));
            v.push((format!("{b}.ffn_down.weight"), vec![d, m]));
        }
        v.push(("output_norm.weight".to_string(), vec![d]));
        if !self.tie_embeddings {
            v.push(("output.weight".to_string(), vec![SYNTH_VOCAB, d]));
        }
        v
    }

    /// Parameters of the synthetic file (with [`SYNTH_VOCAB`] embedding rows).
    pub fn n_params(&self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, d)| d.iter().product::<usize>())
            .sum()
    }

    /// Parameters of the real model (its own vocabulary).
    pub fn real_params(&self) -> usize {
        let heads = if self.tie_embeddings { 1 } else { 2 };
        self.n_params() + heads * (self.real_vocab - SYNTH_VOCAB) * self.d_model
    }

    /// The type a tensor is written in.
    pub fn type_of(&self, name: &str, dims: &[usize], ty: SynthType) -> GgmlDType {
        if dims.len() != 2 {
            return GgmlDType::F32;
        }
        let want = match ty {
            SynthType::F16 => GgmlDType::F16,
            SynthType::Q8_0 => GgmlDType::Q8_0,
            SynthType::Q4KM => {
                let layer = name
                    .strip_prefix("blk.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|l| l.parse::<usize>().ok());
                let more = layer.is_some_and(|l| use_more_bits(l, self.n_layers));
                if name == "output.weight"
                    || (more
                        && (name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight")))
                {
                    GgmlDType::Q6K
                } else {
                    GgmlDType::Q4K
                }
            }
        };
        // Q6_K's fallback in llama.cpp is Q8_0 (fitting_type's default).
        fitting_type(want, dims[1])
    }
}

/// What [`write`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    pub like: String,
    pub file_type: String,
    pub n_params: usize,
    pub real_params: usize,
    pub file_bytes: u64,
    /// Tensors per GGUF type, e.g. `{"Q4K": 193, "Q6K": 33, "F32": 65}`.
    pub types: std::collections::BTreeMap<String, usize>,
}

/// Write a synthetic GGUF of `shape` in `ty` to `out` (atomically), with `tok_from`'s
/// tokenizer metadata.
///
/// # Errors
/// I/O errors naming the file; a `tok_from` that is not a GGUF with a tokenizer.
pub fn write(
    shape: &Shape,
    ty: SynthType,
    seed: u64,
    tok_from: &Path,
    out: &Path,
) -> Result<Written> {
    let mut src = std::fs::File::open(tok_from).map_err(|e| Error::io(tok_from, e))?;
    let ct = gguf_file::Content::read(&mut src).map_err(|e| Error::bad_checkpoint(tok_from, e))?;
    let mut md: Vec<(String, Value)> = ct
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if md.is_empty() {
        return Err(Error::bad_checkpoint(
            tok_from,
            "no tokenizer metadata to copy",
        ));
    }
    let u = |v: usize| Value::U32(v as u32);
    md.extend([
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String(format!("engram synthetic {}", shape.name)),
        ),
        ("llama.block_count".into(), u(shape.n_layers)),
        ("llama.context_length".into(), u(8192)),
        ("llama.embedding_length".into(), u(shape.d_model)),
        ("llama.feed_forward_length".into(), u(shape.d_mlp)),
        ("llama.attention.head_count".into(), u(shape.n_heads)),
        ("llama.attention.head_count_kv".into(), u(shape.n_kv_heads)),
        ("llama.rope.dimension_count".into(), u(shape.head_dim)),
        ("llama.rope.freq_base".into(), Value::F32(shape.rope_theta)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(shape.norm_eps),
        ),
        ("llama.vocab_size".into(), u(SYNTH_VOCAB)),
    ]);
    md.sort_by(|a, b| a.0.cmp(&b.0));

    let mut drawn: HashMap<(Vec<usize>, GgmlDType, bool), QTensor> = HashMap::new();
    let mut order = Vec::new();
    let mut types = std::collections::BTreeMap::new();
    for (name, dims) in shape.tensors() {
        let dt = shape.type_of(&name, &dims, ty);
        *types.entry(format!("{dt:?}")).or_insert(0) += 1;
        let norm = name.contains("norm");
        let key = (dims.clone(), dt, norm);
        if !drawn.contains_key(&key) {
            // Each drawn matrix from its own stream: seed + how many were drawn before it.
            let t = if norm {
                Tensor::ones(dims.as_slice(), DType::F32, &Device::Cpu)?
            } else {
                let k = seed.wrapping_add(drawn.len() as u64);
                super::hooks::gaussian(&dims, 0.02, k, &Device::Cpu)?
            };
            drawn.insert(key.clone(), QTensor::quantize(&t, dt)?);
        }
        order.push((name, key));
    }
    let md_ref: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = order.iter().map(|(n, k)| (n.as_str(), &drawn[k])).collect();
    super::save::write_atomic(out, |f| {
        gguf_file::write(f, &md_ref, &ts)
            .map_err(|e| Error::io(out, std::io::Error::other(e.to_string())))
    })?;
    let file_bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    Ok(Written {
        like: shape.name.into(),
        file_type: ty.name().into(),
        n_params: shape.n_params(),
        real_params: shape.real_params(),
        file_bytes,
        types,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_published_models() {
        // Published: Llama-3.2-1B 1.24B, Qwen2.5-3B 3.09B, Llama-3.1-8B 8.03B.
        let want = [1.236e9, 3.086e9, 8.030e9];
        for (s, w) in SHAPES.iter().zip(want) {
            let r = s.real_params() as f64;
            assert!((r - w).abs() / w < 0.01, "{}: {r}", s.name);
        }
    }

    #[test]
    fn q4_k_m_mixes_like_llama_cpp() {
        let s = shape("llama-3.1-8b").unwrap();
        let t = |n: &str, d: &[usize]| s.type_of(n, d, SynthType::Q4KM);
        assert_eq!(t("blk.0.ffn_down.weight", &[4096, 14336]), GgmlDType::Q6K);
        // n = 32: layers 0-3 and 28-31, and 6, 9, ... ((i - 4) % 3 == 2).
        assert_eq!(t("blk.6.ffn_down.weight", &[4096, 14336]), GgmlDType::Q6K);
        assert_eq!(t("blk.5.ffn_down.weight", &[4096, 14336]), GgmlDType::Q4K);
        assert_eq!(t("blk.4.attn_v.weight", &[1024, 4096]), GgmlDType::Q4K);
        assert_eq!(t("blk.30.attn_v.weight", &[1024, 4096]), GgmlDType::Q6K);
        assert_eq!(t("blk.4.attn_q.weight", &[4096, 4096]), GgmlDType::Q4K);
        assert_eq!(t("output.weight", &[49152, 4096]), GgmlDType::Q6K);
        assert_eq!(t("blk.4.attn_norm.weight", &[4096]), GgmlDType::F32);
        assert!(shape("gpt-5").is_err());
    }
}
