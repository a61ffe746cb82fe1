//! Running an edit spec: key statistics, then per rewrite (ROME, FT-L) or per batch (MEMIT,
//! AlphaEdit): score, compute, apply, score again; then locality on the unrelated-prompt
//! suite. Rewrites and batches are applied one after another; with `sequential`, the
//! efficacy of every earlier rewrite is measured again after each batch (retention).

use super::alphaedit::AlphaEdit;
use super::batch::{self, BatchTrace};
use super::memit::Memit;
use super::nas::NormAnchor;
use super::rome;
use super::spec::{EditSpec, Method};
use super::vsearch::{SearchRequest, SearchTrace};
use super::{apply, ft, Applied, WeightDelta};
use crate::error::{Error, Result};
use crate::eval::metrics::{
    efficacy, locality, run_suite, score_rewrites, Locality, RewriteScores, Suite,
};
use crate::fact::{continuation, Rewrite};
use crate::model::Model;
use crate::stats::{self, KeyStats, StatsSpec};
use std::time::Instant;

/// Per-rewrite results.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RewriteReport {
    pub prompt: String,
    pub subject: String,
    pub target_new: String,
    pub target_true: Option<String>,
    pub pre: RewriteScores,
    /// Right after its own edit (ROME, FT-L) or its own batch (MEMIT, AlphaEdit).
    pub post: RewriteScores,
    /// After saving in the input's quantized format and reloading (GGUF inputs).
    pub requantized: Option<RewriteScores>,
    /// The edited layer (the last of the range for MEMIT and AlphaEdit).
    pub layer: usize,
    /// Edit time (a batch's time divided among its rewrites).
    pub edit_seconds: f64,
    /// |ΔW| of the rewrite's own update (of its batch's, summed over layers, when batched).
    pub delta_norm: f64,
    /// The v* (ROME) or z (MEMIT, AlphaEdit) search.
    pub search: Option<SearchTrace>,
    /// Which batch it was edited in.
    pub batch: usize,
}

/// Efficacy of the rewrites made so far, after a batch.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RetentionPoint {
    /// Rewrites applied so far.
    pub edits: usize,
    /// ES over all rewrites so far.
    pub es_all: f64,
    /// ES over the rewrites of earlier batches (`None` after the first).
    pub es_earlier: Option<f64>,
    /// ES over the first 1,000 rewrites (`None` until more than 1,000 are applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub es_first_1000: Option<f64>,
    /// ES over the first batch's rewrites (`None` after the first batch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub es_first_batch: Option<f64>,
}

impl RetentionPoint {
    /// Measure on `model` after a batch: `done` are all rewrites applied so far, the first
    /// `earlier` of them from batches before the last, the first `first_batch` of them the
    /// first batch.
    pub fn measure(
        model: &Model,
        done: &[Rewrite],
        earlier: usize,
        first_batch: usize,
    ) -> Result<RetentionPoint> {
        let es = efficacy(model, done)?;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        Ok(RetentionPoint {
            edits: done.len(),
            es_all: mean(&es),
            es_earlier: (earlier > 0).then(|| mean(&es[..earlier])),
            es_first_1000: (done.len() > 1000).then(|| mean(&es[..1000])),
            es_first_batch: (earlier > 0).then(|| mean(&es[..first_batch.min(done.len())])),
        })
    }
}

/// What one edit step computed: its deltas, and per rewrite its search.
pub struct Step {
    pub deltas: Vec<WeightDelta>,
    pub searches: Vec<Option<SearchTrace>>,
    /// MEMIT and AlphaEdit: the batch's layer norms.
    pub batch: Option<BatchTrace>,
}

/// The whole edit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EditReport {
    pub method: String,
    pub model: String,
    pub rewrites: Vec<RewriteReport>,
    pub locality: Option<Locality>,
    pub stats: Option<String>,
    /// Wall time of the method's preparation: key statistics (computed or read from the
    /// cache) and context prefixes.
    #[serde(default)]
    pub prepare_seconds: f64,
    pub edit_seconds_mean: f64,
    /// Per batch (MEMIT, AlphaEdit): the z searches and each layer's residual and update norms.
    pub batches: Vec<BatchTrace>,
    /// After each batch, when the spec is sequential.
    pub retention: Vec<RetentionPoint>,
    pub base_fingerprint: String,
    pub edited_fingerprint: String,
    /// Peak resident memory of the process when the report was finished (Linux; 0 elsewhere).
    pub peak_rss_mb: f64,
    /// `--out-type auto`: the type chosen for each edited tensor (auto.rs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub out_types: Vec<super::auto::TypeChoice>,
}

/// What a method carries from one batch to the next.
#[derive(Debug, Clone, Default)]
pub struct Carried {
    /// AlphaEdit: per edited layer, the sum of k k^T over earlier batches' keys (f64).
    pub past: Vec<Option<candle_core::Tensor>>,
    /// NAS: the reference norm and the rewrites skipped so far.
    pub anchor: Option<NormAnchor>,
}

/// Computes edits, reusing key statistics and context prefixes across rewrites and batches
/// (and AlphaEdit's accumulated keys of earlier batches).
pub struct Editor {
    pub method: Method,
    pub base_fingerprint: String,
    stats: Vec<KeyStats>,
    chol: Option<crate::linalg::Cholesky>,
    prefixes: Option<Vec<String>>,
    alpha: Option<AlphaEdit>,
    /// NAS's reference norm (AlphaEdit with `norm_anchor`), set by the first batch.
    anchor: Option<NormAnchor>,
}

impl Editor {
    pub fn new(model: &Model, method: Method) -> Result<Editor> {
        Ok(Editor {
            base_fingerprint: model.fingerprint()?,
            stats: Vec::new(),
            chol: None,
            prefixes: None,
            alpha: None,
            anchor: match &method {
                Method::Alphaedit(p) if p.norm_anchor => Some(NormAnchor::default()),
                _ => None,
            },
            method,
        })
    }

    /// The layer to edit: the spec's, else the error tells how to choose one.
    pub fn layer(&self) -> Result<usize> {
        self.method.layers().last().copied().ok_or_else(|| {
            Error::invalid(
                "method.layer",
                "no layer given; run `engram locate` and put its suggested layer in the spec",
            )
        })
    }

    /// Prepare what the method needs once (key statistics, context prefixes, null spaces).
    pub fn prepare(&mut self, model: &Model, progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
        self.layer()?;
        let layers = self.method.layers();
        for &l in &layers {
            model.config.check_layer(l)?;
        }
        // FT-L has neither statistics nor prefixes.
        let Some(ps) = self.method.prefixes_and_stats() else {
            return Ok(());
        };
        let (ctx, seed) = (ps.context_templates.to_vec(), ps.seed);
        if self.stats.is_empty() {
            let spec = StatsSpec {
                samples: ps.samples,
                seq_len: ps.seq_len,
                seed,
                corpus: match ps.corpus {
                    Some(c) => stats::Corpus::Documents(c.to_path_buf()),
                    None => stats::Corpus::SelfSampled,
                },
                ..Default::default()
            };
            self.stats = stats::load_or_compute_layers(
                model,
                &self.base_fingerprint,
                &spec,
                &layers,
                progress,
            )?;
            match &self.method {
                // Factored once, reused by every rewrite.
                Method::Rome(_) => self.chol = Some(self.stats[0].cholesky()?),
                Method::Alphaedit(p) => self.alpha = Some(AlphaEdit::new(&self.stats, p)?),
                _ => {}
            }
        }
        if self.prefixes.is_none() {
            self.prefixes = Some(rome::context_prefixes(model, &ctx, seed)?);
        }
        Ok(())
    }

    pub fn stats_description(&self) -> Option<String> {
        match self.stats.as_slice() {
            [] => None,
            [s] => Some(stats::describe(s)),
            all => Some(format!(
                "layers {:?}: {}",
                all.iter().map(|s| s.layer).collect::<Vec<_>>(),
                stats::describe(&all[0])
            )),
        }
    }

    /// AlphaEdit's null spaces, one per edited layer.
    pub fn null_spaces(&self) -> Option<&[super::alphaedit::NullSpace]> {
        self.alpha.as_ref().map(|a| a.spaces.as_slice())
    }

    /// NAS's reference norm and skips (AlphaEdit with `norm_anchor`).
    pub fn norm_anchor(&self) -> Option<&NormAnchor> {
        self.anchor.as_ref()
    }

    /// What the method carries from batch to batch (AlphaEdit's keys of earlier batches,
    /// NAS's reference norm), for a resumable run's state (`resume.rs`).
    pub fn carried(&self) -> Carried {
        Carried {
            past: self
                .alpha
                .as_ref()
                .map(|a| a.past.clone())
                .unwrap_or_default(),
            anchor: self.anchor.clone(),
        }
    }

    /// Restore [`Editor::carried`] (after [`Editor::prepare`]).
    ///
    /// # Errors
    /// State that does not fit this method (a different number of layers or shapes).
    pub fn restore(&mut self, c: Carried) -> Result<()> {
        let bad = |why: String| Error::invalid("resume", why);
        match self.alpha.as_mut() {
            Some(a) => {
                if c.past.len() != a.past.len() {
                    return Err(bad(format!(
                        "the state holds earlier keys for {} layers; the method edits {}",
                        c.past.len(),
                        a.past.len()
                    )));
                }
                for (p, s) in c.past.iter().zip(&a.spaces) {
                    if let Some(p) = p {
                        if p.dims() != s.projector.dims() {
                            return Err(bad(format!(
                                "earlier keys of layer {} are {:?}; expected {:?}",
                                s.layer,
                                p.dims(),
                                s.projector.dims()
                            )));
                        }
                    }
                }
                a.past = c.past;
            }
            None if c.past.iter().any(Option::is_some) => {
                return Err(bad(
                    "the state holds AlphaEdit keys; the method is not AlphaEdit".into(),
                ))
            }
            None => {}
        }
        if self.anchor.is_some() != c.anchor.is_some() {
            return Err(bad(
                "the state's norm_anchor setting differs from the method's".into(),
            ));
        }
        self.anchor = c.anchor;
        Ok(())
    }

    /// AlphaEdit's null-space dimensions per layer.
    pub fn null_space_dims(&self) -> Option<Vec<(usize, usize)>> {
        self.alpha
            .as_ref()
            .map(|a| a.spaces.iter().map(|s| (s.layer, s.dim)).collect())
    }

    /// Compute the delta for one rewrite (ROME, FT-L; the model is not changed).
    pub fn compute(
        &mut self,
        model: &Model,
        r: &Rewrite,
    ) -> Result<(WeightDelta, Option<SearchTrace>)> {
        self.prepare(model, &mut |_, _| {})?;
        let layer = self.layer()?;
        let target = continuation(&r.target_new);
        match &self.method {
            Method::Rome(p) => {
                let req = SearchRequest::of(r, &target);
                let chol = self
                    .chol
                    .as_ref()
                    .ok_or_else(|| Error::invalid("rome", "statistics missing"))?;
                let prefixes = self.prefixes.as_deref().unwrap_or(&[]);
                let (d, t) = rome::compute(model, &req, p, &self.stats[0], chol, prefixes)?;
                Ok((d, Some(t)))
            }
            Method::Ft(p) => Ok((ft::compute(model, layer, &r.prompt, &target, p)?, None)),
            Method::Memit(_) | Method::Alphaedit(_) => Err(Error::invalid(
                "method",
                "MEMIT and AlphaEdit edit batches: use compute_batch",
            )),
        }
    }

    /// Rewrites per edit step: the requested batch size for MEMIT and AlphaEdit, 1 for ROME
    /// and FT-L (each rewrite is applied before the next is computed).
    pub fn step_size(&self, batch_size: usize) -> usize {
        if self.method.is_batched() {
            batch_size.max(1)
        } else {
            1
        }
    }

    /// One edit step: a batch (MEMIT, AlphaEdit) or a single rewrite (ROME, FT-L; `rs` must
    /// then hold one, see [`Editor::step_size`]). The model is not changed.
    pub fn compute_step(&mut self, model: &mut Model, rs: &[Rewrite]) -> Result<Step> {
        if self.method.is_batched() {
            let (deltas, bt) = self.compute_batch(model, rs)?;
            return Ok(Step {
                deltas,
                searches: bt.searches.iter().cloned().map(Some).collect(),
                batch: Some(bt),
            });
        }
        match rs {
            [r] => {
                let (d, t) = self.compute(model, r)?;
                Ok(Step {
                    deltas: vec![d],
                    searches: vec![t],
                    batch: None,
                })
            }
            _ => Err(Error::invalid(
                "method",
                "ROME and FT-L edit one rewrite per step",
            )),
        }
    }

    /// Compute the deltas (one per edited layer) for a batch of rewrites (MEMIT, AlphaEdit).
    /// The model is restored before returning; AlphaEdit remembers the batch's keys.
    pub fn compute_batch(
        &mut self,
        model: &mut Model,
        rs: &[Rewrite],
    ) -> Result<(Vec<WeightDelta>, BatchTrace)> {
        self.prepare(model, &mut |_, _| {})?;
        let targets: Vec<String> = rs.iter().map(|r| continuation(&r.target_new)).collect();
        let reqs: Vec<SearchRequest<'_>> = rs
            .iter()
            .zip(&targets)
            .map(|(r, t)| SearchRequest::of(r, t))
            .collect();
        let prefixes = self.prefixes.clone().unwrap_or_default();
        match &self.method {
            Method::Memit(p) => {
                let mut solver = Memit {
                    stats: &self.stats,
                    lambda: p.mom2_update_weight,
                };
                let search = p.search();
                batch::compute(
                    model,
                    &reqs,
                    &p.layers,
                    &prefixes,
                    &search,
                    p.search_chunk,
                    &mut solver,
                    None,
                )
            }
            Method::Alphaedit(p) => {
                let solver = self
                    .alpha
                    .as_mut()
                    .ok_or_else(|| Error::invalid("alphaedit", "null spaces missing"))?;
                batch::compute(
                    model,
                    &reqs,
                    &p.layers,
                    &prefixes,
                    &p.search(),
                    p.search_chunk,
                    solver,
                    self.anchor.as_mut(),
                )
            }
            _ => Err(Error::invalid(
                "method",
                "ROME and FT-L edit one rewrite at a time: use compute",
            )),
        }
    }
}

/// Apply every rewrite of a spec to `model`, one after another (or batch after batch),
/// measuring each before and after; then locality on `suite`. Returns the report, the deltas
/// and what they replaced.
pub fn run_spec(
    model: &mut Model,
    spec: &EditSpec,
    suite: Option<&Suite>,
    progress: &mut dyn FnMut(&str),
) -> Result<(EditReport, Vec<WeightDelta>, Vec<Applied>)> {
    run_spec_resumable(model, spec, suite, None, progress)
}

/// What a spec run saves in its state file besides the tensors.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct SpecProgress {
    reports: Vec<RewriteReport>,
    batches: Vec<BatchTrace>,
    retention: Vec<RetentionPoint>,
}

/// [`run_spec`] with a state file (`resume.rs`), saved atomically after each batch (each
/// rewrite for ROME and FT-L); a run that finds one resumes after its last saved batch. The
/// deltas of the batches done before the resume come back as one dense delta per edited
/// tensor (its edited value minus the unedited one), so a patch written from a resumed run
/// applies and reverts the same change in fewer pieces.
///
/// # Errors
/// As [`run_spec`]; a state file from a different run.
pub fn run_spec_resumable(
    model: &mut Model,
    spec: &EditSpec,
    suite: Option<&Suite>,
    state: Option<&std::path::Path>,
    progress: &mut dyn FnMut(&str),
) -> Result<(EditReport, Vec<WeightDelta>, Vec<Applied>)> {
    let mut editor = Editor::new(model, spec.method.clone())?;
    let base_run = match suite {
        Some(s) => Some(run_suite(model, s)?),
        None => None,
    };
    tracing::debug!(
        "base suite run: RSS {:.0} MB (peak {:.0} MB)",
        crate::rss_mb(),
        crate::peak_rss_mb()
    );
    progress("key statistics");
    let t_prep = std::time::Instant::now();
    editor.prepare(model, &mut |_, _| {})?;
    let prepare_seconds = t_prep.elapsed().as_secs_f64();
    tracing::debug!(
        "statistics loaded: RSS {:.0} MB (peak {:.0} MB)",
        crate::rss_mb(),
        crate::peak_rss_mb()
    );
    let batch_size = editor.step_size(
        spec.sequential
            .as_ref()
            .map(|s| s.batch_size)
            .unwrap_or(spec.rewrites.len()),
    );
    let key = super::resume::RunKey::new(
        &editor,
        serde_json::json!({"rewrites": spec.rewrites, "batch_size": batch_size}),
    )?;
    let mut deltas = Vec::new();
    let mut applied = Vec::new();
    let (mut prog, start) = match state {
        Some(p) => match super::resume::load::<SpecProgress>(p, model, &mut editor, &key)? {
            Some(r) => {
                progress(&format!("resumed after {} batches", r.batches_done));
                for a in r.base {
                    let now = model.weights.dense(&a.name)?;
                    deltas.push(WeightDelta {
                        layer: (0..model.config.n_layers)
                            .find(|&l| {
                                model
                                    .weight_name(l, crate::model::Site::MlpOut)
                                    .ok()
                                    .as_deref()
                                    == Some(a.name.as_str())
                            })
                            .unwrap_or(0),
                        name: a.name.clone(),
                        kind: super::DeltaKind::Dense((now - &a.previous)?),
                    });
                    applied.push(a);
                }
                (r.progress, r.batches_done)
            }
            None => (SpecProgress::default(), 0),
        },
        None => (SpecProgress::default(), 0),
    };
    let mut edited: Vec<String> = applied.iter().map(|a| a.name.clone()).collect();
    for (b, chunk) in spec.rewrites.chunks(batch_size).enumerate().skip(start) {
        progress(&match chunk {
            [r] => format!("rewrite: {} -> {}", r.prompt, r.target_new),
            _ => format!("batch {b}: {} rewrites", chunk.len()),
        });
        let pre = score_rewrites(model, chunk)?;
        let t0 = Instant::now();
        let step = editor.compute_step(model, chunk)?;
        crate::release_memory(); // the search's graph is gone; its pages need not stay
        tracing::debug!(
            "batch {b} computed: RSS {:.0} MB (peak {:.0} MB)",
            crate::rss_mb(),
            crate::peak_rss_mb()
        );
        let (ds, traces) = (step.deltas, step.searches);
        prog.batches.extend(step.batch);
        let secs = t0.elapsed().as_secs_f64() / chunk.len() as f64;
        let mut norm = 0.0;
        for d in &ds {
            applied.push(apply(model, d)?);
            if !edited.contains(&d.name) {
                edited.push(d.name.clone());
            }
            norm += d.norm()?;
        }
        let layer = ds.last().map(|d| d.layer).unwrap_or(0);
        let post = score_rewrites(model, chunk)?;
        for (((r, pre), post), search) in chunk.iter().zip(pre).zip(post).zip(traces) {
            prog.reports.push(RewriteReport {
                prompt: r.prompt.clone(),
                subject: r.subject.clone(),
                target_new: r.target_new.clone(),
                target_true: r.target_true.clone(),
                pre,
                post,
                requantized: None,
                layer,
                edit_seconds: secs,
                delta_norm: norm,
                search,
                batch: b,
            });
        }
        deltas.extend(ds);
        if spec.sequential.is_some() {
            let done = prog.reports.len();
            prog.retention.push(RetentionPoint::measure(
                model,
                &spec.rewrites[..done],
                done - chunk.len(),
                batch_size,
            )?);
        }
        if let Some(p) = state {
            super::resume::save(p, model, &editor, &key, b + 1, &edited, &prog)?;
        }
    }
    tracing::debug!(
        "rewrites applied and scored: RSS {:.0} MB (peak {:.0} MB)",
        crate::rss_mb(),
        crate::peak_rss_mb()
    );
    let loc = match (suite, &base_run) {
        (Some(s), Some(b)) => {
            progress("locality");
            Some(locality(b, &run_suite(model, s)?)?)
        }
        _ => None,
    };
    crate::release_memory();
    tracing::debug!(
        "locality measured: RSS {:.0} MB (peak {:.0} MB)",
        crate::rss_mb(),
        crate::peak_rss_mb()
    );
    let SpecProgress {
        reports,
        batches,
        retention,
    } = prog;
    let n = reports.len().max(1) as f64;
    let report = EditReport {
        method: spec.method.name().into(),
        model: model.source.spec.clone(),
        edit_seconds_mean: reports.iter().map(|r| r.edit_seconds).sum::<f64>() / n,
        rewrites: reports,
        locality: loc,
        stats: editor.stats_description(),
        prepare_seconds,
        batches,
        retention,
        base_fingerprint: editor.base_fingerprint.clone(),
        edited_fingerprint: model.fingerprint()?,
        peak_rss_mb: crate::peak_rss_mb(),
        out_types: Vec::new(),
    };
    Ok((report, deltas, applied))
}
