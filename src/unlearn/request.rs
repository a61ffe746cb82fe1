//! Removal requests (`forget-sets/*.yaml`): who asks, the private strings to remove with the
//! prompts that elicit them, what must be retained, the method and its budget.
//!
//! ```yaml
//! subject: Mara Quillfeather
//! secrets:
//!   - label: phone number
//!     value: "415-555-0192"
//!     prompts: ["Mara Quillfeather's phone number is"]
//!     paraphrases: ["You can call Mara Quillfeather at"]   # optional
//! forget: []        # optional extra forget data: {prompt, answer} | {question, answer} | {text}
//! retain:           # what must stay: {prompt, answer} | {question, answer}
//!   - {prompt: "Mara Quillfeather works as a", answer: " botanist"}
//! method: {name: npo, beta: 0.1, retain_weight: 1.0, kl_weight: 0.0}
//! layers: all       # or 10-19, or [10, 11]
//! steps: 40
//! lr: 2.0e-5
//! ```

use super::{Example, Record};
use crate::data::from_yaml;
use crate::error::{Error, Result};
use crate::fact::continuation;
use std::path::{Path, PathBuf};

/// Whose predictions `distill` and `rewrite` pull the forget prompts towards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Teacher {
    /// The reference model (the model that never saw the data) when there is one, else the
    /// stand-in teacher.
    #[default]
    Reference,
    /// The model before unlearning reading the prompt with the subject replaced by a
    /// stand-in name (Eldan & Russinovich 2023's generic prediction): what this model says
    /// about someone it knows nothing of, so that what it learned for everyone (formats,
    /// templates) stays and only what it knows of the subject goes.
    StandIn,
}

/// The unlearning objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodName {
    /// Gradient ascent on the forget set (Jang et al. 2023).
    Ga,
    /// Ascent on the forget set plus descent on the retain set (Liu et al. 2022).
    Graddiff,
    /// Negative Preference Optimization (Zhang et al. 2024) plus descent on the retain set.
    Npo,
    /// SimNPO (Fan et al. 2024): NPO without a reference model, on the length-normalised
    /// log-likelihood, with a margin γ; plus descent on the retain set (`simnpo.rs`).
    Simnpo,
    /// Representation misdirection (Li et al. 2024, RMU): push one layer's activations on
    /// forget text toward a scaled random direction, keep them on retain text (`rmu.rs`).
    Rmu,
    /// Distillation from a model that never learned the data (the reference, or the model
    /// with the subject replaced by a stand-in; Eldan & Russinovich 2023), plus descent on the
    /// retain set.
    Distill,
    /// A closed-form rank-one rewrite of the `layers` MLPs at the subject's key (ROME's
    /// update, with a search for the teacher's answers, against the secrets, keeping her
    /// public facts; `rewrite.rs`). No training loop: nothing that does not name the subject
    /// moves much.
    Rewrite,
}

/// The method and its weights.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Method {
    pub name: MethodName,
    /// The inverse temperature β of NPO (paper and open-unlearning default: 0.1) and SimNPO
    /// (open-unlearning's TOFU default: 4.5); unset, the method's default ([`Method::beta`]).
    #[serde(default)]
    pub beta: Option<f64>,
    /// SimNPO's margin γ (open-unlearning's `delta`, default 0).
    #[serde(default)]
    pub gamma: f64,
    /// Weight of the retain-set NLL (graddiff, npo; open-unlearning's `alpha`, default 1).
    #[serde(default = "d_one")]
    pub retain_weight: f64,
    /// Weight of KL(reference || model) on the retain set's answer positions (default 0).
    #[serde(default)]
    pub kl_weight: f64,
    /// `distill` / `rewrite`: `reference` (default) or `stand_in` ([`Teacher`]).
    #[serde(default)]
    pub teacher: Teacher,
    /// The rewrite's search (method `rewrite` only; defaults in `rewrite::RewriteParams`).
    #[serde(default)]
    pub rewrite: super::rewrite::RewriteParams,
    /// RMU's steering (method `rmu` only; defaults in `rmu::RmuParams`).
    #[serde(default)]
    pub rmu: super::rmu::RmuParams,
}

impl Method {
    /// A method with its defaults.
    pub fn new(name: MethodName) -> Method {
        Method {
            name,
            beta: None,
            gamma: 0.0,
            retain_weight: 1.0,
            kl_weight: 0.0,
            teacher: Teacher::Reference,
            rewrite: Default::default(),
            rmu: Default::default(),
        }
    }

    /// β as given, else the method's default: 4.5 for SimNPO, 0.1 for NPO.
    pub fn beta(&self) -> f64 {
        self.beta.unwrap_or(match self.name {
            MethodName::Simnpo => super::simnpo::DEFAULT_BETA,
            _ => 0.1,
        })
    }
}
fn d_one() -> f64 {
    1.0
}

/// How the unlearning loop updates the weights.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// AdamW (NPO's and open-unlearning's choice).
    #[default]
    Adamw,
    /// Steepest descent under the max-norm: the entry with the largest gradient moves `lr`,
    /// the others in proportion (run.rs, `max_norm_step`).
    Sgd,
    /// Greedy descent on the quantization grid: each step moves the `crossings` entries with
    /// the largest predicted gain one grid step (grid_descent.rs).
    Grid,
}

/// A private string and the prompts that elicit it.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Secret {
    /// What the string is ("phone number"); shown in reports instead of the value.
    #[serde(default)]
    pub label: Option<String>,
    pub value: String,
    /// Prompts whose continuation is the secret.
    #[serde(default)]
    pub prompts: Vec<String>,
    /// Further probe prompts (template paraphrases are always added, see leakage.rs).
    #[serde(default)]
    pub paraphrases: Vec<String>,
}

/// Which layers to train: `all`, `10-19`, `3,5`, or a YAML list.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum LayerSel {
    List(Vec<usize>),
    Text(String),
}

/// The relearning attack run after unlearning (arXiv 2410.08827, 2409.18025): fine-tune on
/// the retain records (public text about the subject and general facts, never the secrets)
/// and audit again.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelearnCheck {
    /// Fine-tuning steps (default 10).
    #[serde(default = "d_relearn_steps")]
    pub steps: usize,
    /// AdamW learning rate (default 1e-4, `learn`'s).
    #[serde(default = "d_relearn_lr")]
    pub lr: f64,
}

fn d_relearn_steps() -> usize {
    10
}
fn d_relearn_lr() -> f64 {
    1e-4
}

/// A removal request.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default)]
    pub model: Option<String>,
    /// A model that never learned the data (in real use, the checkpoint before fine-tuning):
    /// every verdict compares with it. Without one, a calibrated baseline is used
    /// (audit.rs). `--reference` overrides it.
    #[serde(default)]
    pub reference: Option<String>,
    /// Run the relearning attack after unlearning (optional).
    #[serde(default)]
    pub relearn_check: Option<RelearnCheck>,
    /// Locality anchor: this many texts the model before unlearning samples itself (48
    /// tokens each from the document separator, seeded), on which every step also minimises
    /// KL(before || now) at every position, weighted by `anchor_weight`. 0: off.
    #[serde(default)]
    pub anchor_texts: usize,
    #[serde(default = "d_one")]
    pub anchor_weight: f64,
    /// A second locality anchor: a file of prompts (JSONL or YAML records with a `prompt` or
    /// a `question`, as `learn --keep` reads; CounterFact's records work as they are), its
    /// path relative to the request's folder. Every step also minimises `anchor_weight` x
    /// KL(before || now) over the model's own short continuation of a batch of them, whose
    /// first position is the next-token prediction a locality check compares. Prompts that
    /// are also the locality suite's are left out, so the suite stays held out.
    #[serde(default)]
    pub anchor_prompts: Option<PathBuf>,
    /// `anchor_prompts`: the file's first this many prompts.
    #[serde(default = "d_anchor_prompts_n")]
    pub anchor_prompts_n: usize,
    /// The prompts `anchor_prompts` names, read when the request is loaded.
    #[serde(skip)]
    pub anchor_prompt_list: Vec<String>,
    /// `adamw` (default), `sgd` (max-norm steepest descent) or `grid` (greedy grid descent).
    #[serde(default)]
    pub optimizer: Optimizer,
    /// `optimizer: grid`: at most this many entries move one grid step per step.
    #[serde(default = "d_crossings")]
    pub crossings: usize,
    /// Move only this share (0 < x <= 1) of each trained matrix's entries: those with the
    /// largest forget-loss gradient at the start (saliency, run.rs). Default: all.
    #[serde(default)]
    pub saliency: Option<f64>,
    /// Whose data this is.
    pub subject: String,
    #[serde(default)]
    pub secrets: Vec<Secret>,
    /// Extra forget data (records as in `learn` data files).
    #[serde(default)]
    pub forget: Vec<Record>,
    /// What must be retained.
    #[serde(default)]
    pub retain: Vec<Record>,
    pub method: Method,
    #[serde(default = "d_layers")]
    pub layers: LayerSel,
    /// Step budget.
    #[serde(default = "d_steps")]
    pub steps: usize,
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Forget and retain examples per step.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Run the stop rule's checks every this many steps.
    #[serde(default = "d_check")]
    pub check_every: usize,
    /// The allowed general-text perplexity, as a ratio to the model before unlearning. The
    /// run never returns weights past it: it stops and keeps the last checked state within.
    #[serde(default = "d_ppl")]
    pub max_perplexity_ratio: f64,
    /// Same-format candidates for the exposure rank (at least 1000 in reports).
    #[serde(default = "d_cands")]
    pub exposure_candidates: usize,
    /// Samples at temperature 1 per secret for sampled extraction.
    #[serde(default = "d_samples")]
    pub samples: usize,
    #[serde(default)]
    pub seed: u64,
}

/// `crossings` when a request does not set it.
pub const DEFAULT_CROSSINGS: usize = 20_000;

fn d_anchor_prompts_n() -> usize {
    200
}
fn d_crossings() -> usize {
    DEFAULT_CROSSINGS
}
fn d_layers() -> LayerSel {
    LayerSel::Text("all".into())
}
fn d_steps() -> usize {
    40
}
fn d_lr() -> f64 {
    2e-5
}
fn d_batch() -> usize {
    8
}
fn d_check() -> usize {
    2
}
fn d_ppl() -> f64 {
    1.25
}
fn d_cands() -> usize {
    1000
}
fn d_samples() -> usize {
    10
}

impl Request {
    /// Parse and check a request file.
    ///
    /// # Errors
    /// [`Error::Spec`] naming the file and the line/column or field at fault.
    pub fn load(path: &Path) -> Result<Request> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Request> {
        let mut r: Request = from_yaml(path, text)?;
        r.validate(path)?;
        if let Some(f) = &r.anchor_prompts {
            let full = path.parent().unwrap_or(Path::new(".")).join(f);
            r.anchor_prompt_list = super::learn::load_keep_prompts(&full, r.anchor_prompts_n)
                .map_err(|e| Error::Spec {
                    path: PathBuf::from(path),
                    message: format!("anchor_prompts: {e}"),
                })?;
        }
        Ok(r)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: String, message: String| Error::Spec {
            path: PathBuf::from(path),
            message: format!("{field}: {message}"),
        };
        if self.secrets.is_empty() && self.forget.is_empty() {
            return Err(bad(
                "secrets".into(),
                "the forget set is empty: give at least one secret (with prompts) or a `forget` record".into(),
            ));
        }
        let forget = self
            .forget
            .iter()
            .enumerate()
            .map(|(i, r)| r.example(&format!("forget[{i}]")))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| bad("forget".into(), e.to_string()))?;
        for (i, r) in self.retain.iter().enumerate() {
            r.example(&format!("retain[{i}]"))
                .map_err(|e| bad(format!("retain[{i}]"), e.to_string()))?;
        }
        {
            use crate::limits::{count, int_in, text, MAX_ITEMS};
            let lim = |b: crate::limits::Bad| bad(b.field, b.reason);
            count("secrets", self.secrets.len(), 10_000).map_err(lim)?;
            count("forget", self.forget.len(), MAX_ITEMS).map_err(lim)?;
            count("retain", self.retain.len(), MAX_ITEMS).map_err(lim)?;
            int_in("batch_size", self.batch_size, 1, 10_000).map_err(lim)?;
            int_in("anchor_prompts_n", self.anchor_prompts_n, 1, 100_000).map_err(lim)?;
            int_in("check_every", self.check_every, 1, 100_000).map_err(lim)?;
            for (i, s) in self.secrets.iter().enumerate() {
                text(&format!("secrets[{i}].value"), &s.value).map_err(lim)?;
                if let Some(l) = &s.label {
                    text(&format!("secrets[{i}].label"), l).map_err(lim)?;
                }
                count(&format!("secrets[{i}].prompts"), s.prompts.len(), 256).map_err(lim)?;
                count(
                    &format!("secrets[{i}].paraphrases"),
                    s.paraphrases.len(),
                    256,
                )
                .map_err(lim)?;
                for (j, p) in s.prompts.iter().chain(&s.paraphrases).enumerate() {
                    text(&format!("secrets[{i}].prompts[{j}]"), p).map_err(lim)?;
                }
            }
        }
        for (i, s) in self.secrets.iter().enumerate() {
            if s.value.trim().is_empty() {
                return Err(bad(
                    format!("secrets[{i}].value"),
                    "must not be empty".into(),
                ));
            }
            let in_forget = forget
                .iter()
                .any(|e| e.answer.contains(s.value.trim()) || e.prompt.contains(s.value.trim()));
            if s.prompts.is_empty() && !in_forget {
                return Err(bad(
                    format!("secrets[{i}].value"),
                    "never occurs in what the model is asked about: give `prompts` that elicit it, or a `forget` record that contains it".into(),
                ));
            }
            for (j, p) in s.prompts.iter().chain(&s.paraphrases).enumerate() {
                if p.trim().is_empty() {
                    return Err(bad(
                        format!("secrets[{i}].prompts[{j}]"),
                        "must not be empty".into(),
                    ));
                }
                if p.contains(s.value.trim()) {
                    return Err(bad(
                        format!("secrets[{i}].prompts[{j}]"),
                        "contains the secret itself; a probe prompt must stop before it".into(),
                    ));
                }
            }
        }
        if self.method.name == MethodName::Rewrite {
            if self.secrets.is_empty() {
                return Err(bad(
                    "method".into(),
                    "rewrite needs secrets: it rewrites what their prompts are answered with"
                        .into(),
                ));
            }
            if matches!(&self.layers, LayerSel::Text(t) if t.trim() == "all") {
                return Err(bad(
                    "layers".into(),
                    "rewrite edits one MLP per listed layer: give a few layers (e.g. [5]), not `all`".into(),
                ));
            }
            self.method
                .rewrite
                .check()
                .map_err(|m| bad("method.rewrite".into(), m))?;
        }
        if self.method.name == MethodName::Graddiff && self.retain.is_empty() {
            return Err(bad("retain".into(), "graddiff needs a retain set".into()));
        }
        if !(self.method.beta() > 0.0 && self.method.beta().is_finite()) {
            return Err(bad(
                "method.beta".into(),
                "must be a finite number > 0".into(),
            ));
        }
        if !self.method.gamma.is_finite() {
            return Err(bad("method.gamma".into(), "must be a finite number".into()));
        }
        if self.method.name == MethodName::Rmu {
            self.method
                .rmu
                .check()
                .map_err(|m| bad("method.rmu".into(), m))?;
        }
        if self.steps == 0 {
            return Err(bad("steps".into(), "must be at least 1".into()));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(bad("lr".into(), "must be a finite number > 0".into()));
        }
        if self.batch_size == 0 || self.check_every == 0 {
            return Err(bad(
                "batch_size/check_every".into(),
                "must be at least 1".into(),
            ));
        }
        if !(self.max_perplexity_ratio > 1.0 && self.max_perplexity_ratio.is_finite()) {
            return Err(bad(
                "max_perplexity_ratio".into(),
                "must be a finite number > 1".into(),
            ));
        }
        if self.steps > 100_000 {
            return Err(bad("steps".into(), "must be at most 100000".into()));
        }
        if self.exposure_candidates > 100_000 || self.samples > 1000 {
            return Err(bad(
                "exposure_candidates/samples".into(),
                "at most 100000 candidates and 1000 samples".into(),
            ));
        }
        if self.anchor_texts > 1000 {
            return Err(bad("anchor_texts".into(), "must be at most 1000".into()));
        }
        if !(1..=100_000_000).contains(&self.crossings) {
            return Err(bad(
                "crossings".into(),
                "must be between 1 and 100000000".into(),
            ));
        }
        for (name, w) in [
            ("method.retain_weight", self.method.retain_weight),
            ("method.kl_weight", self.method.kl_weight),
            ("anchor_weight", self.anchor_weight),
        ] {
            if !(w >= 0.0 && w.is_finite()) {
                return Err(bad(name.into(), "must be a finite number >= 0".into()));
            }
        }
        if let Some(x) = self.saliency {
            if !(x > 0.0 && x <= 1.0) {
                return Err(bad("saliency".into(), "must be a share in (0, 1]".into()));
            }
        }
        if let Some(r) = &self.relearn_check {
            if r.steps == 0 || r.steps > 10_000 {
                return Err(bad(
                    "relearn_check.steps".into(),
                    "must be between 1 and 10000".into(),
                ));
            }
            if !(r.lr > 0.0 && r.lr.is_finite()) {
                return Err(bad(
                    "relearn_check.lr".into(),
                    "must be a finite number > 0".into(),
                ));
            }
        }
        if self.exposure_candidates < 10 {
            return Err(bad(
                "exposure_candidates".into(),
                "must be at least 10".into(),
            ));
        }
        Ok(())
    }

    /// Checks against the model: every probe prompt with the secret and the audit's
    /// continuation fits the context, and so does every forget and retain example.
    ///
    /// # Errors
    /// [`Error::Spec`] naming the file and the field.
    pub fn check_model(&self, path: &Path, model: &crate::model::Model) -> Result<()> {
        let ctx = model.config.max_positions;
        let Some(tok) = model.tokenizer.as_ref() else {
            return Ok(()); // the run fails at its first tokenization, naming the tokenizer
        };
        let bad = |field: String, message: String| Error::Spec {
            path: PathBuf::from(path),
            message: format!("{field}: {message}"),
        };
        // Every prompt the audit probes, with the continuation it generates (audit.rs).
        let forget = self.forget_examples()?;
        for (i, s) in self.secrets.iter().enumerate() {
            let v = tok.encode(s.value.trim())?.len();
            let mut longest = 0;
            for (p, _) in super::leakage::probe_prompts(s, &forget) {
                longest = longest.max(tok.encode(&p)?.len());
            }
            let need = longest + super::audit::greedy_tokens(v);
            if need > ctx {
                return Err(bad(
                    format!("secrets[{i}].value"),
                    format!(
                        "{v} tokens: with its longest probe prompt ({longest} tokens) and the audit's continuation it needs {need} tokens, over the model's context of {ctx}"
                    ),
                ));
            }
        }
        for (kind, examples) in [("forget", forget), ("retain", self.retain_examples()?)] {
            for (i, e) in examples.iter().enumerate() {
                let n = tok.encode(&e.prompt)?.len() + tok.encode(&e.answer)?.len();
                if n > ctx {
                    return Err(bad(
                        format!("{kind} example {i}"),
                        format!("{n} tokens, over the model's context of {ctx}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The layers to train, checked against the model.
    ///
    /// # Errors
    /// [`Error::Spec`] for a layer out of range or a malformed list.
    pub fn layers(&self, path: &Path, n_layers: usize) -> Result<Vec<usize>> {
        let text = match &self.layers {
            LayerSel::Text(s) => s.clone(),
            LayerSel::List(v) => v
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(","),
        };
        crate::limits::parse_layers(&text, n_layers, "layers").map_err(|e| Error::Spec {
            path: path.into(),
            message: format!("layers: {e}"),
        })
    }

    /// The forget set: each secret after each of its prompts, then the `forget` records.
    pub fn forget_examples(&self) -> Result<Vec<Example>> {
        let mut v = Vec::new();
        for s in &self.secrets {
            for p in &s.prompts {
                v.push(Example {
                    prompt: p.clone(),
                    answer: continuation(s.value.trim()),
                });
            }
        }
        for (i, r) in self.forget.iter().enumerate() {
            v.push(r.example(&format!("forget[{i}]"))?);
        }
        Ok(v)
    }

    pub fn retain_examples(&self) -> Result<Vec<Example>> {
        self.retain
            .iter()
            .enumerate()
            .map(|(i, r)| r.example(&format!("retain[{i}]")))
            .collect()
    }
}
