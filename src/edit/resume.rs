//! A sequential run's state, written atomically after each batch so that a killed run resumes
//! where it stopped and ends with the numbers of an uninterrupted one.
//!
//! One safetensors file (written to a temporary sibling, then renamed):
//! - `weight/{name}`: the current value of every tensor the run has edited (f32);
//! - `past/{i}`: AlphaEdit's sum of k k^T over earlier batches, per edited layer (f64);
//! - metadata `engram_run`: JSON with the run's identity ([`RunKey`]: the base model's
//!   fingerprint, the method with all its hyper-parameters, and the caller's plan, e.g. the
//!   case ids and batch size), the batches done, the edited tensor names, NAS's reference norm
//!   and the caller's own progress (scores before editing, retention, timings).
//!
//! Resuming checks the key before anything is applied: a state from another model, method or
//! plan is refused (exit 2), naming what differs. Everything the run measured on the unedited
//! model is either in the state or recomputed from the unedited model before the state's
//! tensors are applied (key statistics, context prefixes), so nothing depends on when the run
//! was interrupted.

use super::patch::TensorView;
use super::run::{Carried, Editor};
use super::Applied;
use crate::error::{Error, Result};
use crate::model::Model;
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

const META: &str = "engram_run";
const VERSION: u32 = 1;

/// What makes two runs the same run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunKey {
    pub base_fingerprint: String,
    /// The method and every hyper-parameter, as JSON.
    pub method: serde_json::Value,
    /// The caller's plan (which cases, in which batches).
    pub plan: serde_json::Value,
}

impl RunKey {
    /// The key of a run of `editor`'s method on its base model, with the caller's `plan`.
    pub fn new(editor: &Editor, plan: serde_json::Value) -> Result<RunKey> {
        Ok(RunKey {
            base_fingerprint: editor.base_fingerprint.clone(),
            method: serde_json::to_value(&editor.method)
                .map_err(|e| Error::invalid("method", e.to_string()))?,
            plan,
        })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta<P> {
    version: u32,
    key: RunKey,
    batches_done: usize,
    edited: Vec<String>,
    past_layers: usize,
    anchor: Option<super::nas::NormAnchor>,
    progress: P,
}

/// A loaded state, applied to the model and the editor.
pub struct Resumed<P> {
    pub batches_done: usize,
    pub edited: Vec<String>,
    pub progress: P,
    /// The unedited value of each edited tensor (what restores the model).
    pub base: Vec<Applied>,
}

/// Save the run's state after `batches_done` batches.
///
/// # Errors
/// I/O errors (the previous state stays in place).
pub fn save<P: serde::Serialize>(
    path: &Path,
    model: &Model,
    editor: &Editor,
    key: &RunKey,
    batches_done: usize,
    edited: &[String],
    progress: &P,
) -> Result<()> {
    let carried = editor.carried();
    let mut views: Vec<(String, TensorView)> = Vec::new();
    for n in edited {
        views.push((format!("weight/{n}"), TensorView(model.weights.dense(n)?)));
    }
    for (i, p) in carried.past.iter().enumerate() {
        if let Some(p) = p {
            views.push((format!("past/{i}"), TensorView(p.to_dtype(DType::F64)?)));
        }
    }
    let meta = Meta {
        version: VERSION,
        key: key.clone(),
        batches_done,
        edited: edited.to_vec(),
        past_layers: carried.past.len(),
        anchor: carried.anchor,
        progress,
    };
    let json = serde_json::to_string(&meta).map_err(|e| Error::invalid("resume", e.to_string()))?;
    let md = HashMap::from([(META.to_string(), json)]);
    let bytes = safetensors::serialize(views, Some(md))
        .map_err(|e| Error::invalid("resume", e.to_string()))?;
    crate::model::save::write_atomic(path, |w| {
        use std::io::Write;
        w.write_all(&bytes).map_err(|e| Error::io(path, e))
    })
}

/// Load a state saved by [`save`] and apply it: the edited tensors to `model`, the carried
/// method state to `editor` (which must be prepared on the unedited model). `None` when
/// `path` does not exist (a fresh run).
///
/// # Errors
/// A file that is not a run state, or one from a different run (the key differs: the
/// message names the part), or tensors that do not fit the model.
pub fn load<P: serde::de::DeserializeOwned>(
    path: &Path,
    model: &mut Model,
    editor: &mut Editor,
    key: &RunKey,
) -> Result<Option<Resumed<P>>> {
    if !path.exists() {
        return Ok(None);
    }
    let bad = |why: String| {
        Error::invalid(
            "resume",
            format!("{}: {why}; give a new file to start afresh", path.display()),
        )
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a run state ({e})")))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META))
        .ok_or_else(|| bad(format!("not a run state (no `{META}` metadata)")))?;
    let meta: Meta<P> =
        serde_json::from_str(json).map_err(|e| bad(format!("unreadable state ({e})")))?;
    if meta.version != VERSION {
        return Err(bad(format!(
            "state version {} (expected {VERSION})",
            meta.version
        )));
    }
    for (part, a, b) in [
        (
            "the base model",
            serde_json::json!(meta.key.base_fingerprint),
            serde_json::json!(key.base_fingerprint),
        ),
        (
            "the method or its hyper-parameters",
            meta.key.method.clone(),
            key.method.clone(),
        ),
        (
            "the cases or batch size",
            meta.key.plan.clone(),
            key.plan.clone(),
        ),
    ] {
        if a != b {
            return Err(bad(format!(
                "it was saved by a different run ({part} differs: saved {}, now {})",
                short(&a),
                short(&b)
            )));
        }
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &model.device)
        .map_err(|e| bad(e.to_string()))?;
    let get = |n: &str| -> Result<Tensor> {
        tensors
            .get(n)
            .cloned()
            .ok_or_else(|| bad(format!("missing tensor `{n}`")))
    };
    // Check every tensor before changing anything.
    let mut weights = Vec::new();
    for n in &meta.edited {
        let t = get(&format!("weight/{n}"))?;
        let cur = model
            .weights
            .param(n)
            .map_err(|_| bad(format!("the model has no tensor `{n}`")))?;
        if t.dims() != cur.dims() {
            return Err(bad(format!(
                "`{n}` is {:?}; the model's is {:?}",
                t.dims(),
                cur.dims()
            )));
        }
        weights.push((n.clone(), t));
    }
    let past = (0..meta.past_layers)
        .map(|i| {
            let n = format!("past/{i}");
            tensors.contains_key(&n).then(|| get(&n)).transpose()
        })
        .collect::<Result<Vec<_>>>()?;
    editor.restore(Carried {
        past,
        anchor: meta.anchor,
    })?;
    let mut applied: Vec<Applied> = Vec::new();
    for (n, t) in weights {
        let previous = model.weights.dense(&n)?;
        if let Err(e) = model.set_tensor(&n, t) {
            super::revert(model, &applied)?;
            return Err(e);
        }
        applied.push(Applied { name: n, previous });
    }
    Ok(Some(Resumed {
        batches_done: meta.batches_done,
        edited: meta.edited,
        progress: meta.progress,
        base: applied,
    }))
}

fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.len() > 120 {
        format!("{}...", &s[..s.floor_char_boundary(117)])
    } else {
        s
    }
}
