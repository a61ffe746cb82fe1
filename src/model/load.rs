//! Loading checkpoints: Hugging Face directories (single or sharded safetensors), GGUF files
//! (every tensor dequantized to f32, or in [`WeightMode::Stored`] frozen matrices kept in their
//! blocks), and aliases.
//!
//! Every tensor is checked by name and shape against what the architecture needs before the
//! model is returned, so a bad checkpoint fails here with the file's name, never in a forward.

use super::config::{Arch, Config};
use super::fetch;
use super::param::{keeps_stored, Param, Stored, WeightMode};
use super::tokenizer::Tok;
use super::{gpt2, llama, Model, Weights};
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Where a model came from, with what saving in the same format needs.
#[derive(Debug, Clone)]
pub struct Source {
    /// The directory or `.gguf` file (after alias resolution).
    pub path: PathBuf,
    /// The name the user gave (an alias or a path).
    pub spec: String,
    pub format: Format,
}

/// The on-disk format of a checkpoint.
#[derive(Debug, Clone)]
pub enum Format {
    /// A Hugging Face directory.
    HfDir {
        /// Original dtype of each tensor, by our name.
        dtypes: BTreeMap<String, DType>,
        /// Prefix stripped from every name at load (GPT-2's `transformer.`).
        prefix: String,
    },
    /// A GGUF file.
    Gguf {
        /// Every metadata entry, in file order, to write back unchanged.
        metadata: Vec<(String, Value)>,
        /// Per GGUF tensor, in file order: GGUF name, our name, original quantization type.
        tensors: Vec<(String, String, GgmlDType)>,
    },
}

impl Format {
    pub fn name(&self) -> &'static str {
        match self {
            Format::HfDir { .. } => "huggingface-safetensors",
            Format::Gguf { .. } => "gguf",
        }
    }
}

/// Resolve `--model`: `None` is the default alias; an alias is fetched on first use; anything
/// else is a path to a Hugging Face directory or a `.gguf` file.
///
/// # Errors
/// [`Error::Io`] for a path that does not exist (the message lists the aliases).
pub fn resolve(spec: Option<&str>) -> Result<PathBuf> {
    let spec = spec.unwrap_or(fetch::DEFAULT_MODEL);
    if let Some(a) = fetch::alias(spec) {
        return fetch::ensure(a);
    }
    let p = PathBuf::from(spec);
    if !p.exists() {
        let known: Vec<&str> = fetch::ALIASES.iter().map(|a| a.name).collect();
        return Err(Error::Io {
            path: p,
            reason: format!(
                "no such file or directory (and not a known alias: {})",
                known.join(", ")
            ),
        });
    }
    Ok(p)
}

/// Load a model from an alias or path (see [`resolve`]) onto `device`.
///
/// # Errors
/// Every malformed-input case names the file: missing files, truncated or inconsistent
/// safetensors, impossible GGUF counts, unknown architectures, missing config fields, missing
/// or misshapen tensors.
pub fn load(spec: Option<&str>, device: &Device) -> Result<Model> {
    load_with(spec, device, default_mode())
}

/// [`load`] with an explicit [`WeightMode`].
pub fn load_with(spec: Option<&str>, device: &Device, mode: WeightMode) -> Result<Model> {
    let path = resolve(spec)?;
    let spec = spec.unwrap_or(fetch::DEFAULT_MODEL).to_string();
    if path.is_dir() {
        load_hf_dir_with(&path, spec, device, mode)
    } else {
        load_gguf_with(&path, spec, device, mode)
    }
}

/// The mode set by [`set_default_mode`], if any.
static DEFAULT_MODE: std::sync::Mutex<Option<WeightMode>> = std::sync::Mutex::new(None);

/// Set the mode [`load`] uses in this process (the CLI's `--weights`).
pub fn set_default_mode(mode: WeightMode) {
    *DEFAULT_MODE.lock().unwrap_or_else(|e| e.into_inner()) = Some(mode);
}

/// The mode [`load`] uses: the one set by [`set_default_mode`], else `ENGRAM_WEIGHTS`
/// (`f32`, `stored` or `stored-kernel`, the `--weights` names), else f32.
pub fn default_mode() -> WeightMode {
    if let Some(m) = *DEFAULT_MODE.lock().unwrap_or_else(|e| e.into_inner()) {
        return m;
    }
    match std::env::var("ENGRAM_WEIGHTS") {
        Ok(v) => <WeightMode as clap::ValueEnum>::from_str(&v, false).unwrap_or_else(|_| {
            // The CLI refuses such a value before it gets here (clap reads the variable too);
            // a library caller is told, not silently switched.
            tracing::warn!("ENGRAM_WEIGHTS={v:?} is not f32, stored or stored-kernel: using f32");
            WeightMode::default()
        }),
        Err(_) => WeightMode::default(),
    }
}

/// Check every tensor the architecture needs against `shape_of` (our name -> dims), before
/// any data is read or reshaped. `n_tensors` bounds the layer count first, so that an absurd
/// `block_count` is refused before the expected list is built.
fn check_shapes(
    path: &Path,
    cfg: &Config,
    n_tensors: usize,
    shape_of: impl Fn(&str) -> Option<Vec<usize>>,
) -> Result<()> {
    // Every layer has at least 9 tensors (two norms, four attention and three MLP matrices;
    // GPT-2 has more).
    if cfg.n_layers > n_tensors / 9 {
        let field = if path.is_dir() {
            "num_hidden_layers / n_layer".to_string()
        } else {
            super::config::gguf_field("n_layers")
        };
        return Err(Error::BadConfig {
            path: path.into(),
            field,
            reason: format!(
                "{} layers need at least {} tensors, but the checkpoint has {n_tensors}",
                cfg.n_layers,
                cfg.n_layers.saturating_mul(9)
            ),
        });
    }
    let expected = match cfg.arch {
        Arch::Llama => llama::expected_tensors(cfg),
        Arch::Gpt2 => gpt2::expected_tensors(cfg),
    };
    for (name, shape) in expected {
        let found = shape_of(&name).ok_or_else(|| Error::MissingTensor {
            path: path.into(),
            name: name.clone(),
        })?;
        if found != shape {
            return Err(Error::ShapeMismatch {
                name: format!("{}: {name}", path.display()),
                found,
                expected: shape,
            });
        }
    }
    Ok(())
}

/// Refuse a checkpoint tensor holding NaN or Inf, naming it.
fn check_finite_weight(path: &Path, name: &str, t: &Tensor) -> Result<()> {
    if super::check_finite(name, t).is_err() {
        return Err(Error::bad_checkpoint(
            path,
            format!("tensor `{name}` holds NaN or Inf values"),
        ));
    }
    Ok(())
}

/// The safetensors dtypes a checkpoint's weights may have.
const WEIGHT_DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F64];

/// Load a Hugging Face directory: `config.json`, `model.safetensors` (or the shards named by
/// `model.safetensors.index.json`, or every `*.safetensors`), and `tokenizer.json` if present.
pub fn load_hf_dir(dir: &Path, spec: String, device: &Device) -> Result<Model> {
    load_hf_dir_with(dir, spec, device, WeightMode::F32)
}

/// [`load_hf_dir`] with an explicit [`WeightMode`]: when it keeps blocks, f16 and bf16
/// matrices stay in their half-precision bytes ([`Stored::from_half`]); f32 and f64 tensors,
/// and every vector, become f32 as before.
pub fn load_hf_dir_with(
    dir: &Path,
    spec: String,
    device: &Device,
    mode: WeightMode,
) -> Result<Model> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg = Config::from_hf_json(&cfg_path, &text)?;

    let files = safetensors_files(dir)?;
    let mut map = BTreeMap::new();
    let mut dtypes = BTreeMap::new();
    let mut prefix = String::new();
    let mut raw: Vec<(PathBuf, String, Tensor)> = Vec::new();
    for f in &files {
        let tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(f, device).map_err(|e| Error::bad_checkpoint(f, e))?;
        let mut tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        raw.extend(tensors.into_iter().map(|(n, t)| (f.clone(), n, t)));
    }
    // Names and shapes first, so that nothing is transposed or converted on a bad file.
    let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
    // Tied heads and causal-mask buffers of old GPT-2 checkpoints are not parameters.
    let is_buffer = |ours: &str| {
        cfg.arch == Arch::Gpt2
            && (ours.starts_with("lm_head.")
                || ours.ends_with(".attn.bias")
                || ours.ends_with(".attn.masked_bias"))
    };
    raw.retain(|(_, name, _)| !is_buffer(name.strip_prefix("transformer.").unwrap_or(name)));
    for (f, name, t) in &raw {
        if !WEIGHT_DTYPES.contains(&t.dtype()) {
            return Err(Error::bad_checkpoint(
                f,
                format!(
                    "tensor `{name}` has dtype {:?} (allowed: f32, f16, bf16, f64)",
                    t.dtype()
                ),
            ));
        }
        let ours = if cfg.arch == Arch::Gpt2 {
            name.strip_prefix("transformer.").unwrap_or(name)
        } else {
            name
        };
        let mut dims = t.dims().to_vec();
        if cfg.arch == Arch::Gpt2 && gpt2::is_conv1d(ours) {
            if dims.len() != 2 {
                return Err(Error::ShapeMismatch {
                    name: format!("{}: {name}", f.display()),
                    found: dims,
                    expected: vec![cfg.d_model, 0],
                });
            }
            dims.reverse(); // Conv1D [in, out] -> [out, in]
        }
        if shapes.insert(ours.to_string(), dims).is_some() {
            return Err(Error::bad_checkpoint(
                f,
                format!("tensor `{ours}` appears twice among the shards"),
            ));
        }
    }
    check_shapes(dir, &cfg, raw.len(), |n| shapes.get(n).cloned())?;
    for (f, name, t) in raw {
        check_finite_weight(&f, &name, &t)?;
        let mut name = name;
        if cfg.arch == Arch::Gpt2 {
            if let Some(rest) = name.strip_prefix("transformer.") {
                prefix = "transformer.".into();
                name = rest.to_string();
            }
        }
        dtypes.insert(name.clone(), t.dtype());
        let half = matches!(t.dtype(), DType::F16 | DType::BF16);
        let mut t = if half && mode.keeps_blocks() && t.rank() == 2 && device.is_cpu() {
            t
        } else {
            t.to_dtype(DType::F32)?
        };
        if cfg.arch == Arch::Gpt2 && gpt2::is_conv1d(&name) {
            t = t.t()?.contiguous()?; // Conv1D [in, out] -> [out, in]
        }
        let p = match t.dtype() {
            DType::F32 => Param::Dense(t),
            _ => Param::Stored(Stored::from_half(&t)?),
        };
        map.insert(name, p);
    }
    let weights = Weights::from_params(map);
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        Some(Tok::from_file(&tok_path)?)
    } else {
        None
    };
    Ok(Model {
        config: cfg,
        weights,
        tokenizer,
        source: Source {
            path: dir.into(),
            spec,
            format: Format::HfDir { dtypes, prefix },
        },
        device: device.clone(),
    })
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let j: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_checkpoint(&index, e))?;
        let map = j
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::bad_checkpoint(&index, "no `weight_map` object"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|s| dir.join(s))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().map(|x| x == "safetensors").unwrap_or(false))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::bad_checkpoint(dir, "no *.safetensors file"));
    }
    Ok(files)
}

/// Our (Hugging Face Llama) name for a llama.cpp tensor name.
pub fn gguf_to_hf(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (l, rest) = rest.split_once('.')?;
    let l: usize = l.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{l}.{hf}.{kind}"))
}

/// llama.cpp's converter permutes the rows of Q and K so that each head's rotary pairs are
/// interleaved (`w.reshape(h, 2, hd/2, d).swapaxes(1, 2)`). `inverse = true` undoes that
/// (GGUF -> Hugging Face layout); `false` applies it (for writing GGUF).
///
/// # Shapes
/// `w`: `[n_heads * head_dim, d_in]` (a bias is `[n_heads * head_dim]`).
pub fn permute_qk(w: &Tensor, n_heads: usize, inverse: bool) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let cols: usize = dims[1..].iter().product();
    let half = rows / n_heads / 2;
    let shaped = if inverse {
        w.reshape((n_heads, half, 2, cols))? // GGUF layout: (h, hd/2, 2, d)
    } else {
        w.reshape((n_heads, 2, half, cols))? // HF layout: (h, 2, hd/2, d)
    };
    Ok(shaped.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

fn meta_usize(path: &Path, md: &HashMap<String, Value>, key: &str) -> Result<usize> {
    md.get(key)
        .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
        .map(|v| v as usize)
        .ok_or_else(|| Error::BadConfig {
            path: path.into(),
            field: key.into(),
            reason: "missing or not an integer in GGUF metadata".into(),
        })
}

/// Read the architecture-neutral config from GGUF metadata (llama architecture only).
pub fn gguf_config(path: &Path, ct: &Content) -> Result<Config> {
    let md = &ct.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if arch != "llama" {
        return Err(Error::UnknownArchitecture {
            path: path.into(),
            found: arch,
            supported: "llama (GGUF)".into(),
        });
    }
    let u = |k: &str| meta_usize(path, md, &format!("llama.{k}"));
    let f = |k: &str, d: f64| {
        md.get(&format!("llama.{k}"))
            .and_then(|v| v.to_f32().ok())
            .map(f64::from)
            .unwrap_or(d)
    };
    let d_model = u("embedding_length")?;
    let n_heads = u("attention.head_count")?;
    let vocab_size = match u("vocab_size") {
        Ok(v) => v,
        Err(_) => ct
            .tensor_infos
            .get("token_embd.weight")
            .and_then(|t| t.shape.dims().first().copied())
            .ok_or_else(|| Error::MissingTensor {
                path: path.into(),
                name: "token_embd.weight".into(),
            })?,
    };
    let cfg = Config {
        arch: Arch::Llama,
        n_layers: u("block_count")?,
        d_model,
        d_mlp: u("feed_forward_length")?,
        n_heads,
        n_kv_heads: u("attention.head_count_kv").unwrap_or(n_heads),
        head_dim: u("rope.dimension_count").unwrap_or(d_model / n_heads.max(1)),
        vocab_size,
        max_positions: u("context_length").unwrap_or(4096),
        norm_eps: f("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta: f("rope.freq_base", 10000.0),
        tie_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        attn_bias: ct.tensor_infos.contains_key("blk.0.attn_q.bias"),
    };
    cfg.validate(path)
        .map_err(|e| e.rename_field(super::config::gguf_field))?;
    Ok(cfg)
}

/// Load a GGUF file of the llama architecture, dequantizing every tensor to f32 and undoing
/// llama.cpp's Q/K row permutation; the tokenizer is rebuilt from the metadata.
pub fn load_gguf(path: &Path, spec: String, device: &Device) -> Result<Model> {
    load_gguf_with(path, spec, device, WeightMode::F32)
}

/// The head count [`permute_qk`] needs for a tensor llama.cpp permutes (Q and K weights and
/// biases, by our name), `None` for every other tensor.
pub fn qk_heads(cfg: &Config, name: &str) -> Option<usize> {
    if name.contains("self_attn.q_proj") {
        Some(cfg.n_heads)
    } else if name.contains("self_attn.k_proj") {
        Some(cfg.n_kv_heads)
    } else {
        None
    }
}

/// The row order [`permute_qk`] gives: row `i` of the result is row `perm[i]` of the input.
fn qk_row_order(rows: usize, n_heads: usize, inverse: bool) -> Result<Vec<usize>> {
    let idx: Vec<f32> = (0..rows).map(|i| i as f32).collect();
    let t = Tensor::from_vec(idx, (rows, 1), &Device::Cpu)?;
    let p: Vec<f32> = permute_qk(&t, n_heads, inverse)?.flatten_all()?.to_vec1()?;
    Ok(p.into_iter().map(|v| v as usize).collect())
}

/// Refuse a stored matrix holding NaN or Inf (checked a chunk of rows at a time).
fn check_finite_stored(path: &Path, name: &str, s: &Stored) -> Result<()> {
    s.for_each_chunk(|_, t| check_finite_weight(path, name, t))
}

/// [`load_gguf`] in the given [`WeightMode`]: in `Stored`, every 2-D tensor not stored as f32
/// keeps its blocks (Q/K rows are reordered byte-wise, which is exact).
pub fn load_gguf_with(
    path: &Path,
    spec: String,
    device: &Device,
    mode: WeightMode,
) -> Result<Model> {
    super::gguf_check::check(path)?;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let ct = Content::read(&mut file).map_err(|e| Error::bad_checkpoint(path, e))?;
    let cfg = gguf_config(path, &ct)?;
    let mut ours_to_gguf = HashMap::new();
    for gname in ct.tensor_infos.keys() {
        let ours = gguf_to_hf(gname).ok_or_else(|| {
            Error::bad_checkpoint(path, format!("unexpected tensor `{gname}` for llama"))
        })?;
        ours_to_gguf.insert(ours, gname.clone());
    }
    check_shapes(path, &cfg, ct.tensor_infos.len(), |n| {
        let g = ours_to_gguf.get(n)?;
        Some(ct.tensor_infos[g].shape.dims().to_vec())
    })?;
    let mut names: Vec<(&String, u64)> =
        ct.tensor_infos.iter().map(|(n, i)| (n, i.offset)).collect();
    names.sort_by_key(|(_, off)| *off);
    let mut map = BTreeMap::new();
    let mut tensors = Vec::new();
    for (gname, _) in names {
        let ours = gguf_to_hf(gname).ok_or_else(|| {
            Error::bad_checkpoint(path, format!("unexpected tensor `{gname}` for llama"))
        })?;
        let q = ct
            .tensor(&mut file, gname, device)
            .map_err(|e| Error::bad_checkpoint(path, format!("tensor `{gname}`: {e}")))?;
        tensors.push((gname.clone(), ours.clone(), q.dtype()));
        if mode.keeps_blocks() && keeps_stored(q.dtype(), q.rank()) && device.is_cpu() {
            let mut st = Stored::new(q)?.with_kernel(mode == WeightMode::StoredKernel);
            if let Some(h) = qk_heads(&cfg, &ours) {
                st = st.permute_rows(&qk_row_order(st.dims()[0], h, true)?)?;
            }
            check_finite_stored(path, gname, &st)?;
            map.insert(ours, Param::Stored(st));
            continue;
        }
        // Rank-2 tensors dequantize on every core (`Stored::dequantize`, the same values).
        let mut t = if device.is_cpu() && q.rank() == 2 {
            Stored::new(q)?.dequantize()?
        } else {
            q.dequantize(device)?
        };
        check_finite_weight(path, gname, &t)?;
        if let Some(h) = qk_heads(&cfg, &ours) {
            t = permute_qk(&t, h, true)?;
        }
        map.insert(ours, Param::Dense(t));
    }
    let weights = Weights::from_params(map);
    let tokenizer = match Tok::from_gguf(path, &ct) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!("no tokenizer: {e}");
            None
        }
    };
    let mut metadata: Vec<(String, Value)> = ct.metadata.into_iter().collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Model {
        config: cfg,
        weights,
        tokenizer,
        source: Source {
            path: path.into(),
            spec,
            format: Format::Gguf { metadata, tensors },
        },
        device: device.clone(),
    })
}
