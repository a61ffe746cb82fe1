//! Edit specs (`edits/*.yaml`): which model, which method with its hyper-parameters, and the
//! requested rewrites. Unknown keys are errors; every error names the file and the line and
//! column (parse errors) or the field path (`rewrites[0].subject`).

use super::ft::FtParams;
use super::rome::RomeParams;
use crate::error::{Error, Result};
use std::path::Path;

/// The editing method and its hyper-parameters (`method: rome` or `method: ft`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Method {
    /// Rank-one model editing (Meng et al. 2022).
    Rome(RomeParams),
    /// Fine-tuning of the same matrix under an L-infinity constraint (FT-L, ROME paper 4.2).
    Ft(FtParams),
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Rome(_) => "rome",
            Method::Ft(_) => "ft",
        }
    }

    pub fn layer(&self) -> Option<usize> {
        match self {
            Method::Rome(p) => p.layer,
            Method::Ft(p) => p.layer,
        }
    }
}

/// A neighbourhood prompt: about another subject, whose answer must not move.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Neighbor {
    pub prompt: String,
    /// The expected answer; defaults to the rewrite's `target_true`.
    #[serde(default)]
    pub answer: Option<String>,
}

/// One requested rewrite.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// The prompt, containing the subject.
    pub prompt: String,
    pub subject: String,
    /// The new object (no leading space needed: " " is added, as in CounterFact).
    pub target_new: String,
    /// The true object, for efficacy comparisons.
    #[serde(default)]
    pub target_true: Option<String>,
    #[serde(default)]
    pub paraphrases: Vec<String>,
    #[serde(default)]
    pub neighborhood: Vec<Neighbor>,
}

/// An edit spec.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EditSpec {
    /// Model alias or path; `--model` overrides.
    #[serde(default)]
    pub model: Option<String>,
    pub method: Method,
    pub rewrites: Vec<Rewrite>,
}

/// A target as a continuation: a leading space unless it already starts with whitespace.
pub fn continuation(target: &str) -> String {
    if target.starts_with(char::is_whitespace) {
        target.to_string()
    } else {
        format!(" {target}")
    }
}

/// serde_yaml's message, with a line and column added where it has none: errors inside the
/// tagged `method` map come from buffered content that has lost its position, so we point
/// at the first occurrence of the offending name instead.
pub fn with_location(e: &serde_yaml::Error, text: &str) -> String {
    let msg = e.to_string();
    if msg.contains(" line ") {
        return msg;
    }
    let name = msg.split('`').nth(1).unwrap_or("");
    if name.is_empty() {
        return msg;
    }
    for (i, line) in text.lines().enumerate() {
        if let Some(col) = line.find(name) {
            return format!("line {} column {}: {msg}", i + 1, col + 1);
        }
    }
    msg
}

/// Deserialize a YAML file's `text`; errors are [`Error::Spec`] with the file and a location
/// ([`with_location`]).
pub fn from_yaml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    serde_yaml::from_str(text).map_err(|e| Error::Spec {
        path: path.into(),
        message: with_location(&e, text),
    })
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
        if self.rewrites.is_empty() {
            return Err(bad(
                "rewrites".into(),
                "at least one rewrite is needed".into(),
            ));
        }
        for (i, r) in self.rewrites.iter().enumerate() {
            if r.prompt.trim().is_empty() {
                return Err(bad(
                    format!("rewrites[{i}].prompt"),
                    "must not be empty".into(),
                ));
            }
            if r.subject.trim().is_empty() || !r.prompt.contains(&r.subject) {
                return Err(bad(
                    format!("rewrites[{i}].subject"),
                    format!(
                        "`{}` does not occur in the prompt `{}`",
                        r.subject, r.prompt
                    ),
                ));
            }
            if r.target_new.trim().is_empty() {
                return Err(bad(
                    format!("rewrites[{i}].target_new"),
                    "must not be empty".into(),
                ));
            }
            if r.target_true
                .as_deref()
                .map(|t| t.trim().is_empty())
                .unwrap_or(false)
            {
                return Err(bad(
                    format!("rewrites[{i}].target_true"),
                    "must not be empty".into(),
                ));
            }
            if !r.neighborhood.is_empty()
                && r.target_true.is_none()
                && r.neighborhood.iter().any(|n| n.answer.is_none())
            {
                return Err(bad(
                    format!("rewrites[{i}].neighborhood"),
                    "needs an `answer` or the rewrite's `target_true`".into(),
                ));
            }
        }
        Ok(())
    }

    /// Check against a model: the layer in range.
    pub fn check_model(&self, path: &Path, n_layers: usize) -> Result<()> {
        if let Some(l) = self.method.layer() {
            if l >= n_layers {
                return Err(Error::Spec {
                    path: path.into(),
                    message: format!("method.layer: {l} is out of range: the model has {n_layers} layers (0..={})", n_layers - 1),
                });
            }
        }
        Ok(())
    }
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
