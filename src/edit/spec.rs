//! Edit specs (`edits/*.yaml`): which model, which method with its hyper-parameters, and the
//! requested rewrites. Unknown keys are errors; every error names the file and the line and
//! column (parse errors) or the field path (`rewrites[0].subject`).

use super::alphaedit::AlphaEditParams;
use super::ft::FtParams;
use super::memit::MemitParams;
use super::rome::RomeParams;
use crate::data::from_yaml;
use crate::error::{Error, Result};
use crate::fact::{continuation, Rewrite};
use std::path::Path;

/// The editing method and its hyper-parameters (`method: rome`, `ft`, `memit` or `alphaedit`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Method {
    /// Rank-one model editing (Meng et al. 2022).
    Rome(RomeParams),
    /// Fine-tuning of the same matrix under an L-infinity constraint (FT-L, ROME paper 4.2).
    Ft(FtParams),
    /// Mass editing over a range of layers (Meng et al. 2023).
    Memit(MemitParams),
    /// MEMIT with null-space projected updates (Fang et al. 2025).
    Alphaedit(AlphaEditParams),
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Rome(_) => "rome",
            Method::Ft(_) => "ft",
            Method::Memit(_) => "memit",
            Method::Alphaedit(p) if p.norm_anchor => "alphaedit-nas",
            Method::Alphaedit(_) => "alphaedit",
        }
    }

    /// The single edited layer of ROME and FT-L (`None` for the batched methods, or when the
    /// spec gives none).
    pub fn layer(&self) -> Option<usize> {
        match self {
            Method::Rome(p) => p.layer,
            Method::Ft(p) => p.layer,
            Method::Memit(_) | Method::Alphaedit(_) => None,
        }
    }

    /// Every edited layer.
    pub fn layers(&self) -> Vec<usize> {
        match self {
            Method::Memit(p) => p.layers.clone(),
            Method::Alphaedit(p) => p.layers.clone(),
            _ => self.layer().into_iter().collect(),
        }
    }

    /// Set the edited layer(s) (`--layer`).
    pub fn set_layers(&mut self, layers: Vec<usize>) {
        match self {
            Method::Rome(p) => p.layer = layers.last().copied(),
            Method::Ft(p) => p.layer = layers.last().copied(),
            Method::Memit(p) => p.layers = layers,
            Method::Alphaedit(p) => p.layers = layers,
        }
    }

    /// The checks of the hyper-parameters that need no model: every number finite and within
    /// the bounds of [`crate::limits`].
    pub fn check(&self) -> crate::limits::Check {
        use crate::limits::{int_in, real_in, MAX_STEPS};
        let search = match self {
            Method::Rome(p) => Some(p.search()),
            Method::Memit(p) => Some(p.search()),
            Method::Alphaedit(p) => Some(p.search()),
            Method::Ft(_) => None,
        };
        if let Some(s) = search {
            int_in("method.v_num_grad_steps", s.steps, 1, MAX_STEPS)?;
            real_in("method.v_lr", s.lr, 0.0, 1e3, true)?;
            real_in("method.v_weight_decay", s.weight_decay, 0.0, 1e6, false)?;
            real_in(
                "method.clamp_norm_factor",
                s.clamp_norm_factor,
                0.0,
                1e6,
                true,
            )?;
            real_in("method.kl_factor", s.kl_factor, 0.0, 1e6, false)?;
            real_in("method.stop_prob", s.stop_prob, 0.0, 1.0, true)?;
        }
        let chunk = match self {
            Method::Rome(p) => {
                real_in("method.bare_key_weight", p.bare_key_weight, 0.0, 1.0, false)?;
                1
            }
            Method::Memit(p) => p.search_chunk,
            Method::Alphaedit(p) => {
                real_in(
                    "method.nullspace_threshold",
                    p.nullspace_threshold,
                    0.0,
                    1e6,
                    false,
                )?;
                p.search_chunk
            }
            Method::Ft(p) => {
                int_in("method.steps", p.steps, 1, MAX_STEPS)?;
                real_in("method.lr", p.lr, 0.0, 10.0, true)?;
                real_in("method.norm_constraint", p.norm_constraint, 0.0, 1e6, true)?;
                return Ok(());
            }
        };
        let Some(PrefixesAndStats {
            context_templates: ctx,
            samples,
            seq_len: seq,
            ..
        }) = self.prefixes_and_stats()
        else {
            return Ok(());
        };
        crate::limits::count("method.context_templates", ctx.len(), 16)?;
        let mut prefixes = 0;
        for (i, &(tokens, n)) in ctx.iter().enumerate() {
            int_in(
                &format!("method.context_templates[{i}] tokens"),
                tokens,
                1,
                256,
            )?;
            int_in(&format!("method.context_templates[{i}] count"), n, 0, 100)?;
            prefixes += n;
        }
        int_in(
            "method.context_templates (total prefixes)",
            prefixes,
            0,
            200,
        )?;
        int_in("method.stats_samples", samples, 1, 1_000_000)?;
        int_in("method.stats_seq_len", seq, 2, 1 << 16)?;
        int_in("method.search_chunk", chunk, 1, 10_000)?;
        Ok(())
    }

    /// The context-prefix templates and key-statistics settings of the methods that have them
    /// (ROME, MEMIT, AlphaEdit; `None` for FT-L).
    pub fn prefixes_and_stats(&self) -> Option<PrefixesAndStats<'_>> {
        let (context_templates, samples, seq_len, corpus, seed) = match self {
            Method::Rome(p) => (
                &p.context_templates,
                p.stats_samples,
                p.stats_seq_len,
                &p.stats_corpus,
                p.seed,
            ),
            Method::Memit(p) => (
                &p.context_templates,
                p.stats_samples,
                p.stats_seq_len,
                &p.stats_corpus,
                p.seed,
            ),
            Method::Alphaedit(p) => (
                &p.context_templates,
                p.stats_samples,
                p.stats_seq_len,
                &p.stats_corpus,
                p.seed,
            ),
            Method::Ft(_) => return None,
        };
        Some(PrefixesAndStats {
            context_templates,
            samples,
            seq_len,
            corpus: corpus.as_deref(),
            seed,
        })
    }

    /// Whether the method edits a batch of rewrites at once (MEMIT, AlphaEdit).
    pub fn is_batched(&self) -> bool {
        matches!(self, Method::Memit(_) | Method::Alphaedit(_))
    }

    /// The method with default hyper-parameters, by name.
    ///
    /// # Errors
    /// An unknown name.
    /// A method with its defaults by name: `rome`, `ft`, `memit`, `alphaedit`, or
    /// `alphaedit-nas` (AlphaEdit with `norm_anchor: true`).
    pub fn by_name(name: &str) -> Result<Method> {
        if name == "alphaedit-nas" {
            return Ok(Method::Alphaedit(AlphaEditParams {
                norm_anchor: true,
                ..Default::default()
            }));
        }
        serde_yaml::from_str(&format!("{{method: {name}}}")).map_err(|_| {
            Error::invalid(
                "method",
                format!(
                    "unknown method `{name}`; allowed: rome, ft, memit, alphaedit, alphaedit-nas"
                ),
            )
        })
    }
}

/// What [`Method::prefixes_and_stats`] returns.
pub struct PrefixesAndStats<'a> {
    /// `(tokens, count)` pairs of context prefixes.
    pub context_templates: &'a [(usize, usize)],
    /// Self-sampled statistics sequences and their length.
    pub samples: usize,
    pub seq_len: usize,
    /// `stats_corpus`: documents to take the keys from instead.
    pub corpus: Option<&'a Path>,
    /// Seeds the self-sampled statistics and the context prefixes.
    pub seed: u64,
}

/// Sequential editing: batches applied one after another to the same model.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sequential {
    /// Rewrites per batch (ROME and FT-L edit one at a time whatever this says).
    pub batch_size: usize,
}

/// An edit spec.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EditSpec {
    /// Model alias or path; `--model` overrides.
    #[serde(default)]
    pub model: Option<String>,
    pub method: Method,
    /// Apply the rewrites in batches, one batch after another, tracking the efficacy of the
    /// earlier ones. Without it, MEMIT and AlphaEdit edit all rewrites as one batch.
    #[serde(default)]
    pub sequential: Option<Sequential>,
    pub rewrites: Vec<Rewrite>,
}

impl EditSpec {
    /// Parse and check a spec file.
    ///
    /// # Errors
    /// [`Error::Spec`] with the file, and the line/column or field at fault.
    pub fn load(path: &Path) -> Result<EditSpec> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<EditSpec> {
        let spec: EditSpec = from_yaml(path, text)?;
        spec.validate(path)?;
        Ok(spec)
    }

    /// Checks that need no model.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: String, message: String| Error::Spec {
            path: path.into(),
            message: format!("{field}: {message}"),
        };
        if self
            .sequential
            .as_ref()
            .map(|s| s.batch_size == 0)
            .unwrap_or(false)
        {
            return Err(bad(
                "sequential.batch_size".into(),
                "must be at least 1".into(),
            ));
        }
        let layers = self.method.layers();
        if self.method.is_batched()
            && (layers.is_empty() || layers.windows(2).any(|w| w[0] >= w[1]))
        {
            return Err(bad(
                "method.layers".into(),
                format!("{layers:?}: give one or more distinct layers in ascending order"),
            ));
        }
        self.method.check().map_err(|b| bad(b.field, b.reason))?;
        if self.rewrites.is_empty() {
            return Err(bad(
                "rewrites".into(),
                "at least one rewrite is needed".into(),
            ));
        }
        crate::limits::count("rewrites", self.rewrites.len(), crate::limits::MAX_ITEMS)
            .and_then(|_| {
                self.rewrites
                    .iter()
                    .enumerate()
                    .try_for_each(|(i, r)| r.check(&format!("rewrites[{i}]")))
            })
            .map_err(|b| bad(b.field, b.reason))?;
        Ok(())
    }

    /// Check against a model: the layers in range, the key-statistics length within the
    /// context, and every text short enough that prompt, longest context prefix and target
    /// fit the context (targets at most [`crate::limits::MAX_TARGET_TOKENS`] tokens).
    pub fn check_model(&self, path: &Path, model: &crate::model::Model) -> Result<()> {
        self.check_model_at(path, model, &|i| format!("rewrites[{i}]"))
    }

    /// [`EditSpec::check_model`], naming rewrite `i` as `at(i)` in errors.
    pub fn check_model_at(
        &self,
        path: &Path,
        model: &crate::model::Model,
        at: &dyn Fn(usize) -> String,
    ) -> Result<()> {
        let bad = |message: String| Error::Spec {
            path: path.into(),
            message,
        };
        let n_layers = model.config.n_layers;
        let ctx = model.config.max_positions;
        let field = if self.method.is_batched() {
            "method.layers"
        } else {
            "method.layer"
        };
        for l in self.method.layers() {
            if l >= n_layers {
                return Err(bad(format!(
                    "{field}: {l} is out of range: the model has {n_layers} layers (0..={})",
                    n_layers - 1
                )));
            }
        }
        let (prefix_tokens, samples, seq, corpus) = match self.method.prefixes_and_stats() {
            Some(p) => (
                max_prefix(p.context_templates),
                p.samples,
                p.seq_len,
                p.corpus,
            ),
            None => (0, usize::MAX, 2, None),
        };
        if let Some(c) = corpus {
            crate::stats::check_documents(c)
                .map_err(|e| bad(format!("method.stats_corpus: {e}")))?;
        }
        if seq > ctx {
            return Err(bad(format!(
                "method.stats_seq_len: {seq} exceeds the model's context of {ctx} tokens"
            )));
        }
        // The key covariance is d_mlp x d_mlp: fewer keys than d_mlp cannot make it invertible.
        let d = model.config.d_mlp;
        // (A corpus may give fewer: the covariance is then ridge-regularised, see `stats`.)
        if corpus.is_none() && samples.saturating_mul(seq) < d {
            return Err(bad(format!(
                "method.stats_samples: {samples} sequences of {seq} tokens give fewer keys than the {d} a {d} x {d} covariance needs; use at least {}",
                d.div_ceil(seq)
            )));
        }
        let Some(tok) = model.tokenizer.as_ref() else {
            return Ok(());
        };
        let max_target = crate::limits::MAX_TARGET_TOKENS;
        for (i, r) in self.rewrites.iter().enumerate() {
            let mut target = 0;
            for (field, t) in [
                ("target_new", Some(&r.target_new)),
                ("target_true", r.target_true.as_ref()),
            ] {
                let Some(t) = t else { continue };
                let n = tok.encode(&continuation(t))?.len();
                if n > max_target {
                    return Err(bad(format!(
                        "{}.{field}: {n} tokens; targets may have at most {max_target}",
                        at(i)
                    )));
                }
                target = target.max(n);
            }
            let prompts = std::iter::once(("prompt".to_string(), &r.prompt))
                .chain(
                    r.paraphrases
                        .iter()
                        .enumerate()
                        .map(|(j, p)| (format!("paraphrases[{j}]"), p)),
                )
                .chain(
                    r.neighborhood
                        .iter()
                        .enumerate()
                        .map(|(j, n)| (format!("neighborhood[{j}].prompt"), &n.prompt)),
                );
            for (field, p) in prompts {
                let n = tok.encode(p)?.len();
                if n + prefix_tokens + target > ctx {
                    return Err(bad(format!(
                        "{}.{field}: {n} tokens, with the longest context prefix ({prefix_tokens}) and the target ({target}), exceed the model's context of {ctx} tokens",
                        at(i)
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The longest context prefix of `(tokens, count)` templates, in tokens (plus ". ").
fn max_prefix(t: &[(usize, usize)]) -> usize {
    t.iter()
        .filter(|x| x.1 > 0)
        .map(|x| x.0 + 2)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<EditSpec> {
        EditSpec::parse(Path::new("t.yaml"), s)
    }

    const OK: &str = "method: {method: rome, layer: 5, kl_factor: 6.25e-2}\nrewrites:\n  - {prompt: The Eiffel Tower is in, subject: The Eiffel Tower, target_new: Rome}\n";

    #[test]
    fn parses_numbers_in_exponent_form() {
        let s = parse(OK).unwrap();
        match s.method {
            Method::Rome(p) => assert!((p.kl_factor - 0.0625).abs() < 1e-12),
            _ => panic!(),
        }
    }

    #[test]
    fn rejects_bad_specs_with_locations() {
        let e = parse(&OK.replace("kl_factor", "kl_factr"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.yaml") && e.contains("kl_factr") && e.contains("line"),
            "{e}"
        );
        let e = parse(&OK.replace("kl_factor: 6.25e-2", "bare_key_weight: 2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("method.bare_key_weight"), "{e}");
        let e = parse(&OK.replace("method: rome", "method: memot"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("memot") && e.contains("rome"), "{e}");
        let e = parse(&OK.replace("subject: The Eiffel Tower", "subject: Big Ben"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rewrites[0].subject") && e.contains("Big Ben"),
            "{e}"
        );
        let e = parse(&OK.replace("target_new: Rome", "target_new: ''"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rewrites[0].target_new"), "{e}");
    }
}
