//! An architecture-neutral model configuration, parsed from a Hugging Face `config.json` or
//! from GGUF metadata. The raw serde structs stay private; the rest of engram sees [`Config`].

use crate::error::{Error, Result};
use serde_json::Value as Json;
use std::path::Path;

/// The model families engram can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama, Mistral, Qwen2 (q/k/v bias), SmolLM: pre-RMSNorm, RoPE, SwiGLU MLP.
    Llama,
    /// GPT-2: pre-LayerNorm, learned positions, GELU MLP, Conv1D weights.
    Gpt2,
}

/// Each family's checkpoint names (Hugging Face naming, as [`super::Weights`] holds them; the
/// GGUF names of llama-family files are mapped in `load::gguf_to_hf` and back in `save`).
/// Everything that needs a weight's name asks here.
impl Arch {
    /// The prefix of layer `l`'s tensors, without the trailing dot.
    pub fn layer_prefix(self, l: usize) -> String {
        match self {
            Arch::Llama => format!("model.layers.{l}"),
            Arch::Gpt2 => format!("h.{l}"),
        }
    }

    /// The layer a tensor belongs to, for a name of this family (`None`: embeddings, final
    /// norm, head). A GPT-2 name may keep its checkpoint's `transformer.` prefix.
    pub fn layer_of(self, name: &str) -> Option<usize> {
        let rest = match self {
            Arch::Llama => name.strip_prefix("model.layers."),
            Arch::Gpt2 => name
                .strip_prefix("transformer.")
                .unwrap_or(name)
                .strip_prefix("h."),
        }?;
        rest.split('.').next()?.parse().ok()
    }

    /// The token embedding matrix `[vocab, d_model]` (GPT-2's is also the tied head).
    pub fn embedding(self) -> &'static str {
        match self {
            Arch::Llama => "model.embed_tokens.weight",
            Arch::Gpt2 => "wte.weight",
        }
    }

    /// The matrix ROME, MEMIT and AlphaEdit rewrite: layer `l`'s MLP output projection
    /// `[d_model, d_mlp]`.
    pub fn mlp_out(self, l: usize) -> String {
        let proj = match self {
            Arch::Llama => "mlp.down_proj",
            Arch::Gpt2 => "mlp.c_proj",
        };
        format!("{}.{proj}.weight", self.layer_prefix(l))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Gpt2 => "gpt2",
        }
    }
}

/// The resolved configuration every model family runs from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    pub arch: Arch,
    pub n_layers: usize,
    pub d_model: usize,
    pub d_mlp: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_positions: usize,
    pub norm_eps: f64,
    /// RoPE base frequency (Llama family only).
    pub rope_theta: f64,
    /// The output head shares the token embedding matrix.
    pub tie_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2; always true for GPT-2).
    pub attn_bias: bool,
}

const SUPPORTED: &str = "llama, mistral, qwen2, gpt2";

/// The `config.json` name of a [`Config`] field, so that errors name what the file says.
fn hf_field(model_type: &str, ours: &str) -> String {
    let gpt2 = model_type == "gpt2";
    match ours {
        "n_layers" if gpt2 => "n_layer",
        "n_layers" => "num_hidden_layers",
        "d_model" if gpt2 => "n_embd",
        "d_model" => "hidden_size",
        "d_mlp" if gpt2 => "n_inner",
        "d_mlp" => "intermediate_size",
        "n_heads" if gpt2 => "n_head",
        "n_heads" => "num_attention_heads",
        "n_kv_heads" => "num_key_value_heads",
        "max_positions" if gpt2 => "n_positions",
        "max_positions" => "max_position_embeddings",
        "norm_eps" if gpt2 => "layer_norm_epsilon",
        "norm_eps" => "rms_norm_eps",
        other => other,
    }
    .to_string()
}

/// The GGUF metadata key of a [`Config`] field (llama architecture).
pub fn gguf_field(ours: &str) -> String {
    let k = match ours {
        "n_layers" => "block_count",
        "d_model" => "embedding_length",
        "d_mlp" => "feed_forward_length",
        "n_heads" => "attention.head_count",
        "n_kv_heads" => "attention.head_count_kv",
        "head_dim" => "rope.dimension_count",
        "max_positions" => "context_length",
        "norm_eps" => "attention.layer_norm_rms_epsilon",
        "rope_theta" => "rope.freq_base",
        other => return other.to_string(),
    };
    format!("llama.{k}")
}

impl Config {
    /// Parse a Hugging Face `config.json`.
    ///
    /// # Errors
    /// [`Error::UnknownArchitecture`] for a `model_type` engram cannot run,
    /// [`Error::BadConfig`] naming the missing or impossible field.
    pub fn from_hf_json(path: &Path, text: &str) -> Result<Config> {
        let j: Json = serde_json::from_str(text).map_err(|e| Error::BadConfig {
            path: path.into(),
            field: "(file)".into(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let model_type =
            j.get("model_type")
                .and_then(Json::as_str)
                .ok_or_else(|| Error::BadConfig {
                    path: path.into(),
                    field: "model_type".into(),
                    reason: format!("missing (expected one of {SUPPORTED})"),
                })?;
        let get = |field: &str| -> Result<usize> {
            j.get(field)
                .and_then(Json::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| Error::BadConfig {
                    path: path.into(),
                    field: field.into(),
                    reason: "missing or not a non-negative integer".into(),
                })
        };
        let get_or = |field: &str, default: usize| -> Result<usize> {
            match j.get(field) {
                None | Some(Json::Null) => Ok(default),
                Some(_) => get(field),
            }
        };
        let getf = |field: &str, default: f64| -> f64 {
            j.get(field).and_then(Json::as_f64).unwrap_or(default)
        };
        let cfg = match model_type {
            "llama" | "mistral" | "qwen2" => {
                let d_model = get("hidden_size")?;
                let n_heads = get("num_attention_heads")?;
                let head_dim = get_or("head_dim", d_model / n_heads.max(1))?;
                Config {
                    arch: Arch::Llama,
                    n_layers: get("num_hidden_layers")?,
                    d_model,
                    d_mlp: get("intermediate_size")?,
                    n_heads,
                    n_kv_heads: get_or("num_key_value_heads", n_heads)?,
                    head_dim,
                    vocab_size: get("vocab_size")?,
                    max_positions: get_or("max_position_embeddings", 4096)?,
                    norm_eps: getf("rms_norm_eps", 1e-6),
                    rope_theta: getf("rope_theta", 10000.0),
                    tie_embeddings: j
                        .get("tie_word_embeddings")
                        .and_then(Json::as_bool)
                        .unwrap_or(false),
                    attn_bias: model_type == "qwen2"
                        || j.get("attention_bias")
                            .and_then(Json::as_bool)
                            .unwrap_or(false),
                }
            }
            "gpt2" => {
                let d_model = get("n_embd")?;
                let n_heads = get("n_head")?;
                Config {
                    arch: Arch::Gpt2,
                    n_layers: get("n_layer")?,
                    d_model,
                    d_mlp: get_or("n_inner", 4 * d_model)?,
                    n_heads,
                    n_kv_heads: n_heads,
                    head_dim: d_model / n_heads.max(1),
                    vocab_size: get("vocab_size")?,
                    max_positions: get_or("n_positions", 1024)?,
                    norm_eps: getf("layer_norm_epsilon", 1e-5),
                    rope_theta: 0.0,
                    tie_embeddings: true,
                    attn_bias: true,
                }
            }
            other => {
                return Err(Error::UnknownArchitecture {
                    path: path.into(),
                    found: other.into(),
                    supported: SUPPORTED.into(),
                })
            }
        };
        cfg.validate(path)
            .map_err(|e| e.rename_field(|f| hf_field(model_type, f)))?;
        Ok(cfg)
    }

    /// Check the numbers fit together.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, reason: String| Error::BadConfig {
            path: path.into(),
            field: field.into(),
            reason,
        };
        // Upper bounds far above any released model (Llama-3.1-405B: 126 layers, d_model
        // 16,384, d_mlp 53,248, 128 heads, a 128K context), so that an absurd header is
        // refused before anything is sized from it.
        for (field, v, max) in [
            ("n_layers", self.n_layers, 1 << 10),
            ("d_model", self.d_model, 1 << 16),
            ("d_mlp", self.d_mlp, 1 << 20),
            ("n_heads", self.n_heads, 1 << 10),
            ("n_kv_heads", self.n_kv_heads, 1 << 10),
            ("head_dim", self.head_dim, 1 << 12),
            ("vocab_size", self.vocab_size, 1 << 22),
            ("max_positions", self.max_positions, 1 << 24),
        ] {
            if v == 0 || v > max {
                return Err(bad(field, format!("{v}: must be from 1 to {max}")));
            }
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return Err(bad(
                "norm_eps",
                format!("{}: must be finite, above 0 and below 1", self.norm_eps),
            ));
        }
        if self.arch == Arch::Llama && !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(bad(
                "rope_theta",
                format!("{}: must be finite and positive", self.rope_theta),
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(bad(
                "n_kv_heads",
                format!(
                    "{} does not divide the {} attention heads",
                    self.n_kv_heads, self.n_heads
                ),
            ));
        }
        if self.arch == Arch::Gpt2 && !self.d_model.is_multiple_of(self.n_heads) {
            return Err(bad(
                "n_head",
                format!("{} does not divide n_embd {}", self.n_heads, self.d_model),
            ));
        }
        if self.arch == Arch::Llama && !self.head_dim.is_multiple_of(2) {
            return Err(bad("head_dim", "RoPE needs an even head dimension".into()));
        }
        Ok(())
    }

    /// Check a layer index.
    ///
    /// # Errors
    /// [`Error::LayerOutOfRange`].
    pub fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.n_layers {
            return Err(Error::LayerOutOfRange {
                layer,
                n_layers: self.n_layers,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Arch;

    #[test]
    fn layer_of_knows_both_families() {
        assert_eq!(
            Arch::Llama.layer_of("model.layers.12.mlp.down_proj.weight"),
            Some(12)
        );
        // GPT-2 weights are named `h.{l}.` once the `transformer.` prefix is stripped.
        assert_eq!(Arch::Gpt2.layer_of("h.3.mlp.c_proj.weight"), Some(3));
        assert_eq!(
            Arch::Gpt2.layer_of("transformer.h.3.attn.c_attn.weight"),
            Some(3)
        );
        assert_eq!(Arch::Gpt2.layer_of("wte.weight"), None);
        assert_eq!(Arch::Llama.layer_of("model.norm.weight"), None);
        assert_eq!(Arch::Llama.layer_of("h.3.mlp.c_proj.weight"), None);
        for arch in [Arch::Llama, Arch::Gpt2] {
            assert_eq!(arch.layer_of(&arch.mlp_out(7)), Some(7));
            assert_eq!(
                arch.layer_of(&format!("{}.x", arch.layer_prefix(4))),
                Some(4)
            );
        }
    }
}
