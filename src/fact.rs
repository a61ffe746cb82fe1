//! What a user asks to change, independent of the method that changes it: a rewrite of one
//! fact ([`Rewrite`]) with its paraphrases and neighbourhood prompts ([`Neighbor`]), and how a
//! target is continued ([`continuation`]). Editing, evaluation and unlearning all read these,
//! so they live below all three.

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

impl Rewrite {
    /// The checks that need no model; `at` names the rewrite in errors (`rewrites[3]`,
    /// `line 12`).
    pub fn check(&self, at: &str) -> crate::limits::Check {
        use crate::limits::{count, text, Bad};
        let r = self;
        for (field, t) in [
            ("prompt", Some(&r.prompt)),
            ("subject", Some(&r.subject)),
            ("target_new", Some(&r.target_new)),
            ("target_true", r.target_true.as_ref()),
        ] {
            if let Some(t) = t {
                text(&format!("{at}.{field}"), t)?;
                if t.trim().is_empty() {
                    return Err(Bad::new(format!("{at}.{field}"), "must not be empty"));
                }
            }
        }
        if !r.prompt.contains(&r.subject) {
            return Err(Bad::new(
                format!("{at}.subject"),
                format!(
                    "`{}` does not occur in the prompt `{}`",
                    r.subject, r.prompt
                ),
            ));
        }
        count(&format!("{at}.paraphrases"), r.paraphrases.len(), 256)?;
        count(&format!("{at}.neighborhood"), r.neighborhood.len(), 256)?;
        for (j, p) in r.paraphrases.iter().enumerate() {
            text(&format!("{at}.paraphrases[{j}]"), p)?;
        }
        for (j, n) in r.neighborhood.iter().enumerate() {
            text(&format!("{at}.neighborhood[{j}].prompt"), &n.prompt)?;
            if let Some(a) = &n.answer {
                text(&format!("{at}.neighborhood[{j}].answer"), a)?;
            }
        }
        if !r.neighborhood.is_empty()
            && r.target_true.is_none()
            && r.neighborhood.iter().any(|n| n.answer.is_none())
        {
            return Err(Bad::new(
                format!("{at}.neighborhood"),
                "needs an `answer` or the rewrite's `target_true`",
            ));
        }
        Ok(())
    }
}

/// A target as a continuation: a leading space unless it already starts with whitespace.
pub fn continuation(target: &str) -> String {
    if target.starts_with(char::is_whitespace) {
        target.to_string()
    } else {
        format!(" {target}")
    }
}
