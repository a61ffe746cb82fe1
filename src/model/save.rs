//! Writing checkpoints: a Hugging Face safetensors directory, or a GGUF file with each tensor
//! re-quantized to its input type (or f16/f32 on request).
//!
//! Every write goes to a temporary file or folder beside the destination and is renamed into
//! place only once complete, so a failure leaves nothing half-written. The input checkpoint is
//! never overwritten, and a model holding NaN or Inf is refused.

use super::load::{permute_qk, qk_heads, Format};
use super::{check_finite, gpt2, Arch, Model, Param};
use crate::error::{Error, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Output format for a saved model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaveAs {
    /// A Hugging Face directory with `model.safetensors`.
    HfDir,
    /// A GGUF file; `None` keeps each tensor's input type.
    Gguf(Option<GgmlDType>),
    /// A GGUF file with the named tensors (our names) in the given types and every other in
    /// its input type (`--out-type auto`, `edit/auto.rs`).
    GgufTypes(HashMap<String, GgmlDType>),
}

/// Refuse to write over the model's own input.
fn guard_input(model: &Model, out: &Path) -> Result<()> {
    let same = match (out.canonicalize(), model.source.path.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(Error::invalid(
            "out",
            format!(
                "{} is the input checkpoint; engram never overwrites it",
                out.display()
            ),
        ));
    }
    Ok(())
}

fn check_all_finite(model: &Model) -> Result<()> {
    for (name, p) in model.weights.iter() {
        // Stored matrices were checked when loaded, and nothing writes them in place.
        if let Param::Dense(t) = p {
            check_finite(name, t)?;
        }
    }
    Ok(())
}

/// Save in the given format.
pub fn save(model: &Model, out: &Path, how: SaveAs) -> Result<()> {
    match how {
        SaveAs::HfDir => save_hf_dir(model, out),
        SaveAs::Gguf(dtype) => save_gguf(model, out, dtype, None),
        SaveAs::GgufTypes(types) => save_gguf(model, out, None, Some(&types)),
    }
}

/// Save in the input's format (HF directory -> HF directory, GGUF -> GGUF with input types).
pub fn save_like_input(model: &Model, out: &Path) -> Result<()> {
    match model.source.format {
        Format::HfDir { .. } => save_hf_dir(model, out),
        Format::Gguf { .. } => save_gguf(model, out, None, None),
    }
}

/// Write a Hugging Face directory: `config.json`, `model.safetensors` (original names and
/// dtypes) and `tokenizer.json` when the input had one.
pub fn save_hf_dir(model: &Model, out: &Path) -> Result<()> {
    guard_input(model, out)?;
    check_all_finite(model)?;
    let (dtypes, prefix) = match &model.source.format {
        Format::HfDir { dtypes, prefix } => (Some(dtypes), prefix.as_str()),
        Format::Gguf { .. } => (None, ""),
    };
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".engram-tmp-")
        .permissions(umask_mode(0o777))
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?;

    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, p) in model.weights.iter() {
        let mut t = p.dense()?;
        if model.config.arch == Arch::Gpt2 && gpt2::is_conv1d(name) {
            t = t.t()?.contiguous()?; // [out, in] -> Conv1D [in, out]
        }
        let dtype = dtypes
            .and_then(|d| d.get(name))
            .copied()
            .unwrap_or(DType::F32);
        tensors.insert(format!("{prefix}{name}"), t.to_dtype(dtype)?);
    }
    let st = tmp.path().join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st)
        .map_err(|e| Error::io(&st, std::io::Error::other(e.to_string())))?;

    let cfg_out = tmp.path().join("config.json");
    match &model.source.format {
        Format::HfDir { .. } => {
            let src = model.source.path.join("config.json");
            std::fs::copy(&src, &cfg_out).map_err(|e| Error::io(&src, e))?;
            let tok = model.source.path.join("tokenizer.json");
            if tok.exists() {
                let dst = tmp.path().join("tokenizer.json");
                std::fs::copy(&tok, &dst).map_err(|e| Error::io(&tok, e))?;
            }
        }
        Format::Gguf { .. } => {
            let c = &model.config;
            let j = serde_json::json!({
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": c.d_model,
                "intermediate_size": c.d_mlp,
                "num_hidden_layers": c.n_layers,
                "num_attention_heads": c.n_heads,
                "num_key_value_heads": c.n_kv_heads,
                "head_dim": c.head_dim,
                "vocab_size": c.vocab_size,
                "max_position_embeddings": c.max_positions,
                "rms_norm_eps": c.norm_eps,
                "rope_theta": c.rope_theta,
                "tie_word_embeddings": c.tie_embeddings,
                "attention_bias": c.attn_bias,
            });
            let text = serde_json::to_string_pretty(&j)
                .map_err(|e| Error::invalid("config", e.to_string()))?;
            std::fs::write(&cfg_out, text).map_err(|e| Error::io(&cfg_out, e))?;
        }
    }
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    let tmp_path = tmp.keep();
    std::fs::rename(&tmp_path, out).map_err(|e| Error::io(out, e))?;
    Ok(())
}

/// Write a GGUF file with the input's metadata. Each tensor is re-quantized to its input type
/// (`dtype = None`) or to `dtype` (matrices only; 1-D tensors stay f32). Q and K rows are
/// permuted back to llama.cpp's layout.
///
/// # Errors
/// [`Error::InvalidArgument`] for a model that was not loaded from GGUF (the metadata to
/// write comes from the input).
pub fn save_gguf(
    model: &Model,
    out: &Path,
    dtype: Option<GgmlDType>,
    types: Option<&HashMap<String, GgmlDType>>,
) -> Result<()> {
    guard_input(model, out)?;
    check_all_finite(model)?;
    let Format::Gguf { metadata, tensors } = &model.source.format else {
        return Err(Error::invalid(
            "out",
            "GGUF output needs a GGUF input (its metadata and tokenizer are copied)",
        ));
    };
    let cfg = &model.config;
    // Tensors the model did not change are copied from the input file byte for byte, so
    // that an edit touches only what it edited (re-quantizing a dequantized tensor is not
    // always exact).
    let src_path = &model.source.path;
    let mut src = std::fs::File::open(src_path).map_err(|e| Error::io(src_path, e))?;
    let src_ct =
        gguf_file::Content::read(&mut src).map_err(|e| Error::bad_checkpoint(src_path, e))?;
    let mut qtensors = Vec::with_capacity(tensors.len());
    for (gname, ours, orig) in tensors {
        let p = model.weights.param(ours)?;
        let target = match (dtype, types.and_then(|m| m.get(ours))) {
            (_, Some(&d)) => d,
            (Some(d), None) if p.rank() >= 2 => d,
            _ => *orig,
        };
        if p.stored_type().is_some() && target == *orig {
            // Still the input's blocks: nothing wrote it.
            let q = src_ct
                .tensor(&mut src, gname, &model.device)
                .map_err(|e| Error::bad_checkpoint(src_path, e))?;
            qtensors.push((gname.clone(), q));
            continue;
        }
        let mut t = p.dense()?;
        if let Some(h) = qk_heads(cfg, ours) {
            t = permute_qk(&t, h, false)?;
        }
        if target == *orig {
            let q = src_ct
                .tensor(&mut src, gname, &t.device().clone())
                .map_err(|e| Error::bad_checkpoint(src_path, e))?;
            let unchanged = q
                .dequantize(t.device())?
                .eq(&t)?
                .to_dtype(DType::F32)?
                .min_all()?
                .to_scalar::<f32>()?
                == 1.0;
            if unchanged {
                qtensors.push((gname.clone(), q));
                continue;
            }
        }
        let q = QTensor::quantize(&t, target).map_err(|e| {
            Error::invalid(
                "dtype",
                format!("cannot quantize `{gname}` to {target:?}: {e}"),
            )
        })?;
        qtensors.push((gname.clone(), q));
    }
    let md: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = qtensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    write_atomic(out, |f| {
        gguf_file::write(f, &md, &ts)
            .map_err(|e| Error::io(out, std::io::Error::other(e.to_string())))
    })
}

/// `mode` for a new file or directory: the creating `open`/`mkdir` applies the umask, so
/// outputs get the mode `cp` would give them (0644 and 0755 under umask 022), not the 0600
/// of a temporary file.
fn umask_mode(mode: u32) -> std::fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    std::fs::Permissions::from_mode(mode)
}

/// Write a file through a temporary sibling, then rename it into place.
pub fn write_atomic(
    out: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> Result<()>,
) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".engram-tmp-")
        .permissions(umask_mode(0o666))
        .tempfile_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file());
        write(&mut w)?;
        use std::io::Write;
        w.flush().map_err(|e| Error::io(out, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(out, e))?;
    tmp.persist(out).map_err(|e| Error::io(out, e.error))?;
    Ok(())
}
