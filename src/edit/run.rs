//! Running an edit spec: key statistics, then per rewrite: score, compute, apply, score again;
//! then locality on the unrelated-prompt suite. Rewrites are applied one after another.

use super::rome::{self, RomeTrace};
use super::spec::{continuation, EditSpec, Method, Rewrite};
use super::stats::{self, KeyStats, StatsSpec};
use super::{apply, ft, Applied, WeightDelta};
use crate::error::{Error, Result};
use crate::eval::metrics::{locality, run_suite, score_rewrite, Locality, RewriteScores, Suite};
use crate::model::Model;
use std::time::Instant;

/// Per-rewrite results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RewriteReport {
    pub prompt: String,
    pub subject: String,
    pub target_new: String,
    pub target_true: Option<String>,
    pub pre: RewriteScores,
    pub post: RewriteScores,
    /// After saving in the input's quantized format and reloading (GGUF inputs).
    pub requantized: Option<RewriteScores>,
    pub layer: usize,
    pub edit_seconds: f64,
    pub delta_norm: f64,
    pub rome: Option<RomeTrace>,
}

/// The whole edit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EditReport {
    pub method: String,
    pub model: String,
    pub rewrites: Vec<RewriteReport>,
    pub locality: Option<Locality>,
    pub stats: Option<String>,
    pub edit_seconds_mean: f64,
    pub base_fingerprint: String,
    pub edited_fingerprint: String,
}

/// Computes edits, reusing key statistics and context prefixes across rewrites.
pub struct Editor {
    pub method: Method,
    pub base_fingerprint: String,
    stats: Option<KeyStats>,
    chol: Option<super::linalg::Cholesky>,
    prefixes: Option<Vec<String>>,
}

impl Editor {
    pub fn new(model: &Model, method: Method) -> Result<Editor> {
        Ok(Editor {
            method,
            base_fingerprint: model.fingerprint()?,
            stats: None,
            chol: None,
            prefixes: None,
        })
    }

    /// The layer to edit: the spec's, else the error tells how to choose one.
    pub fn layer(&self) -> Result<usize> {
        self.method.layer().ok_or_else(|| {
            Error::invalid(
                "method.layer",
                "no layer given; run `engram locate` and put its suggested layer in the spec",
            )
        })
    }

    /// Prepare what the method needs once (key statistics, context prefixes).
    pub fn prepare(&mut self, model: &Model, progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
        let layer = self.layer()?;
        model.config.check_layer(layer)?;
        if let Method::Rome(p) = &self.method {
            if self.stats.is_none() {
                let spec = StatsSpec {
                    layer,
                    samples: p.stats_samples,
                    seq_len: p.stats_seq_len,
                    seed: p.seed,
                    ..Default::default()
                };
                let s = stats::load_or_compute(model, &self.base_fingerprint, &spec, progress)?;
                self.chol = Some(s.cholesky()?); // factored once, reused by every rewrite
                self.stats = Some(s);
            }
            if self.prefixes.is_none() {
                self.prefixes = Some(rome::context_prefixes(model, &p.context_templates, p.seed)?);
            }
        }
        Ok(())
    }

    pub fn stats_description(&self) -> Option<String> {
        self.stats.as_ref().map(stats::describe)
    }

    /// Compute the delta for one rewrite (the model is not changed).
    pub fn compute(
        &mut self,
        model: &Model,
        r: &Rewrite,
    ) -> Result<(WeightDelta, Option<RomeTrace>)> {
        self.prepare(model, &mut |_, _| {})?;
        let layer = self.layer()?;
        let target = continuation(&r.target_new);
        match &self.method {
            Method::Rome(p) => {
                let req = rome::Request {
                    prompt: &r.prompt,
                    subject: &r.subject,
                    target: &target,
                };
                let stats = self
                    .stats
                    .as_ref()
                    .ok_or_else(|| Error::invalid("rome", "statistics missing"))?;
                let chol = self
                    .chol
                    .as_ref()
                    .ok_or_else(|| Error::invalid("rome", "statistics missing"))?;
                let prefixes = self.prefixes.as_deref().unwrap_or(&[]);
                let (d, t) = rome::compute(model, &req, p, stats, chol, prefixes)?;
                Ok((d, Some(t)))
            }
            Method::Ft(p) => Ok((ft::compute(model, layer, &r.prompt, &target, p)?, None)),
        }
    }
}

/// Apply every rewrite of a spec to `model`, one after another, measuring each before and
/// after; then locality on `suite`. Returns the report, the deltas and what they replaced.
pub fn run_spec(
    model: &mut Model,
    spec: &EditSpec,
    suite: Option<&Suite>,
    progress: &mut dyn FnMut(&str),
) -> Result<(EditReport, Vec<WeightDelta>, Vec<Applied>)> {
    let mut editor = Editor::new(model, spec.method.clone())?;
    let base_run = match suite {
        Some(s) => Some(run_suite(model, s)?),
        None => None,
    };
    progress("key statistics");
    editor.prepare(model, &mut |done, total| {
        let _ = (done, total);
    })?;
    let mut reports = Vec::new();
    let mut deltas = Vec::new();
    let mut applied = Vec::new();
    for r in &spec.rewrites {
        progress(&format!("rewrite: {} -> {}", r.prompt, r.target_new));
        let pre = score_rewrite(model, r)?;
        let t0 = Instant::now();
        let (d, trace) = editor.compute(model, r)?;
        let secs = t0.elapsed().as_secs_f64();
        applied.push(apply(model, &d)?);
        let post = score_rewrite(model, r)?;
        reports.push(RewriteReport {
            prompt: r.prompt.clone(),
            subject: r.subject.clone(),
            target_new: r.target_new.clone(),
            target_true: r.target_true.clone(),
            pre,
            post,
            requantized: None,
            layer: d.layer,
            edit_seconds: secs,
            delta_norm: d.norm()?,
            rome: trace,
        });
        deltas.push(d);
    }
    let loc = match (suite, &base_run) {
        (Some(s), Some(b)) => {
            progress("locality");
            Some(locality(b, &run_suite(model, s)?)?)
        }
        _ => None,
    };
    let n = reports.len().max(1) as f64;
    let report = EditReport {
        method: spec.method.name().into(),
        model: model.source.spec.clone(),
        edit_seconds_mean: reports.iter().map(|r| r.edit_seconds).sum::<f64>() / n,
        rewrites: reports,
        locality: loc,
        stats: editor.stats_description(),
        base_fingerprint: editor.base_fingerprint.clone(),
        edited_fingerprint: model.fingerprint()?,
    };
    Ok((report, deltas, applied))
}
