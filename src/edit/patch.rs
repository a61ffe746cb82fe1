//! Patch files (`NAME.engram.safetensors`): the weight deltas of an edit (rank-one factors
//! where the method gives them), the weights they replaced (so that `revert` is exact), and
//! metadata (spec, method, base and edited fingerprints).

use super::{Applied, DeltaKind, WeightDelta};
use crate::error::{Error, Result};
use crate::model::Model;
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// Metadata stored in the safetensors header.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PatchMeta {
    pub engram_version: String,
    pub method: String,
    /// The spec that produced it, as YAML.
    pub spec: String,
    /// Fingerprint of the weights the patch applies to.
    pub base_fingerprint: String,
    /// Fingerprint of the weights after applying it (for `revert`).
    pub edited_fingerprint: String,
    /// Per delta, in application order: tensor name, layer, "rank_one" or "dense".
    pub deltas: Vec<(String, usize, String)>,
}

/// A loaded patch.
#[derive(Debug, Clone)]
pub struct Patch {
    pub meta: PatchMeta,
    pub deltas: Vec<WeightDelta>,
    /// The weights each delta replaced, in order.
    pub previous: Vec<Tensor>,
}

/// Write a patch atomically.
pub fn write(
    path: &Path,
    meta: &PatchMeta,
    deltas: &[WeightDelta],
    applied: &[Applied],
) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (i, d) in deltas.iter().enumerate() {
        match &d.kind {
            DeltaKind::RankOne { right, left } => {
                tensors.insert(format!("delta.{i}.right"), right.clone());
                tensors.insert(format!("delta.{i}.left"), left.clone());
            }
            DeltaKind::Dense(t) => {
                tensors.insert(format!("delta.{i}.dense"), t.clone());
            }
        }
    }
    for (i, a) in applied.iter().enumerate() {
        tensors.insert(format!("previous.{i}"), a.previous.clone());
    }
    let json = serde_json::to_string(meta).map_err(|e| Error::invalid("patch", e.to_string()))?;
    let mut md = HashMap::new();
    md.insert("engram".to_string(), json);
    let views: Vec<(String, Tensor)> = tensors.into_iter().collect();
    let data: Vec<(String, TensorView)> = views
        .iter()
        .map(|(n, t)| (n.clone(), TensorView(t.clone())))
        .collect();
    let bytes = safetensors::serialize(data, Some(md))
        .map_err(|e| Error::invalid("patch", e.to_string()))?;
    crate::model::save::write_atomic(path, |w| {
        use std::io::Write;
        w.write_all(&bytes).map_err(|e| Error::io(path, e))
    })
}

/// Read a patch.
pub fn read(path: &Path) -> Result<Patch> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |reason: String| Error::Patch {
        path: path.into(),
        reason,
    };
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("engram"))
        .ok_or_else(|| bad("not an engram patch (no `engram` metadata)".into()))?;
    let meta: PatchMeta = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let t = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
        .map_err(|e| bad(e.to_string()))?;
    let get = |n: String| {
        t.get(&n)
            .cloned()
            .ok_or_else(|| bad(format!("missing tensor `{n}`")))
    };
    // Every tensor is checked for dtype, rank and agreement with the weights it replaced,
    // so that a crafted or damaged patch fails here, naming the file, not in the maths.
    let checked = |n: String, rank: usize| -> Result<Tensor> {
        let t = get(n.clone())?;
        if t.dtype() != candle_core::DType::F32 || t.rank() != rank {
            return Err(bad(format!(
                "tensor `{n}` is {:?} of shape {:?}; expected f32 of rank {rank}",
                t.dtype(),
                t.dims()
            )));
        }
        crate::model::check_finite(&n, &t)
            .map_err(|_| bad(format!("tensor `{n}` holds NaN or Inf")))?;
        Ok(t)
    };
    let mut deltas = Vec::new();
    let mut previous = Vec::new();
    for (i, (name, layer, kind)) in meta.deltas.iter().enumerate() {
        let prev = checked(format!("previous.{i}"), 2)?;
        let kind = match kind.as_str() {
            "rank_one" => {
                let right = checked(format!("delta.{i}.right"), 1)?;
                let left = checked(format!("delta.{i}.left"), 1)?;
                if [right.dim(0)?, left.dim(0)?] != prev.dims() {
                    return Err(bad(format!(
                        "delta {i}: factors of {} x {} do not fit the replaced weights {:?}",
                        right.dim(0)?,
                        left.dim(0)?,
                        prev.dims()
                    )));
                }
                DeltaKind::RankOne { right, left }
            }
            "dense" => {
                let d = checked(format!("delta.{i}.dense"), 2)?;
                if d.dims() != prev.dims() {
                    return Err(bad(format!(
                        "delta {i}: a dense delta of {:?} does not fit the replaced weights {:?}",
                        d.dims(),
                        prev.dims()
                    )));
                }
                DeltaKind::Dense(d)
            }
            other => {
                return Err(bad(format!(
                    "delta {i}: kind `{other}` (allowed: rank_one, dense)"
                )))
            }
        };
        deltas.push(WeightDelta {
            name: name.clone(),
            layer: *layer,
            kind,
        });
        previous.push(prev);
    }
    Ok(Patch {
        meta,
        deltas,
        previous,
    })
}

/// The first 12 characters of a fingerprint, for messages (a crafted patch may hold a short
/// or non-ASCII one: never sliced by bytes).
pub fn short(fp: &str) -> String {
    fp.chars().take(12).collect()
}

/// Check that every delta names a weight of `model` with the shape of the weights it
/// replaced.
fn check_fits(model: &Model, patch: &Patch, path: &Path) -> Result<()> {
    for (i, (d, prev)) in patch.deltas.iter().zip(&patch.previous).enumerate() {
        let w = model.weights.param(&d.name).map_err(|_| Error::Patch {
            path: path.into(),
            reason: format!(
                "delta {i} changes `{}`, which the model does not have",
                d.name
            ),
        })?;
        if w.dims() != prev.dims() {
            return Err(Error::Patch {
                path: path.into(),
                reason: format!(
                    "delta {i}: `{}` is {:?} in the model but {:?} in the patch",
                    d.name,
                    w.dims(),
                    prev.dims()
                ),
            });
        }
    }
    Ok(())
}

/// Apply a patch; refuses a model whose fingerprint is not the patch's base.
pub fn apply(model: &mut Model, patch: &Patch, path: &Path) -> Result<()> {
    let fp = model.fingerprint()?;
    if fp != patch.meta.base_fingerprint {
        return Err(Error::Patch {
            path: path.into(),
            reason: format!(
                "made for base {}…, but the model is {}… (a different checkpoint or already edited)",
                short(&patch.meta.base_fingerprint),
                short(&fp)
            ),
        });
    }
    check_fits(model, patch, path)?;
    for d in &patch.deltas {
        super::apply(model, d)?;
    }
    Ok(())
}

/// Undo a patch bit for bit; refuses a model that is not the patch's edited result.
pub fn revert(model: &mut Model, patch: &Patch, path: &Path) -> Result<()> {
    let fp = model.fingerprint()?;
    if fp != patch.meta.edited_fingerprint {
        return Err(Error::Patch {
            path: path.into(),
            reason: format!(
                "reverts edited weights {}…, but the model is {}… (re-quantized outputs cannot be reverted exactly; use the f32 result)",
                short(&patch.meta.edited_fingerprint),
                short(&fp)
            ),
        });
    }
    check_fits(model, patch, path)?;
    for (d, prev) in patch.deltas.iter().zip(&patch.previous).rev() {
        model.set_tensor(&d.name, prev.clone())?;
    }
    Ok(())
}

/// Adapter: a candle tensor as a safetensors view (f32 or f64, contiguous little-endian
/// bytes; any other dtype is written as f32).
pub(crate) struct TensorView(pub Tensor);

impl safetensors::View for TensorView {
    fn dtype(&self) -> safetensors::Dtype {
        match self.0.dtype() {
            candle_core::DType::F64 => safetensors::Dtype::F64,
            _ => safetensors::Dtype::F32,
        }
    }
    fn shape(&self) -> &[usize] {
        self.0.dims()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let flat = self.0.flatten_all();
        std::borrow::Cow::Owned(match self.0.dtype() {
            candle_core::DType::F64 => flat
                .and_then(|t| t.to_vec1::<f64>())
                .unwrap_or_default()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            _ => flat
                .and_then(|t| t.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>())
                .unwrap_or_default()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        })
    }
    fn data_len(&self) -> usize {
        self.0.elem_count()
            * if self.0.dtype() == candle_core::DType::F64 {
                8
            } else {
                4
            }
    }
}
