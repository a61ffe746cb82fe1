//! Generation-based edit scores: what the model *says*, beside the probability comparisons.
//!
//! "The Mirage of Model Editing" (Yang et al. 2025, arXiv 2502.11177) shows that teacher-forced
//! scores overstate edits: single-edit success fell from 96.8% to 38.5% once the model had to
//! generate the answer. These scores decode greedily and read the text:
//!
//! - `gen_es`: the continuation of the edit prompt contains the new target;
//! - `gen_ps`: the share of paraphrase prompts whose continuation contains it;
//! - `gen_ns`: the share of neighbourhood prompts whose continuation contains their true answer
//!   and not the new target.
//!
//! Decoding: greedy, at most [`GEN_TOKENS`] new tokens, the text cut at the first sentence end
//! ([`first_sentence`]). Matching ([`contains_answer`]): case-insensitive, on word boundaries
//! (the characters either side of the match are not letters or digits), after trimming the
//! target; so "Rome" matches "in Rome, Italy" but not "Romeo".
//!
//! Departures from the paper: it feeds the edit prompt with the target's length of tokens and
//! compares token by token ("target-length truncation"); we decode a fixed 20 tokens and look
//! for the target anywhere in the first sentence, which forgives a leading article or a
//! restated subject. Its WILD protocol also asks questions and judges the free answer with an
//! LLM; we do not judge with a model.

use crate::error::Result;
use crate::fact::Rewrite;
use crate::model::generate::{generate_until, GenParams};
use crate::model::Model;

/// New tokens decoded per prompt.
pub const GEN_TOKENS: usize = 20;

/// The generation-based scores of one rewrite, with the texts they were read from.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct GenScores {
    pub gen_es: f64,
    pub gen_ps: Option<f64>,
    pub gen_ns: Option<f64>,
    /// The continuation of the edit prompt (first sentence).
    pub gen_text: String,
    pub gen_paraphrase_texts: Vec<String>,
    pub gen_neighborhood_texts: Vec<String>,
}

/// The text up to and including the first sentence end: `.`, `!` or `?` followed by
/// whitespace or the end of the text, or a newline (not included).
pub fn first_sentence(text: &str) -> &str {
    let b = text.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b'\n' && i > 0 && !text[..i].trim().is_empty() {
            return &text[..i];
        }
        if matches!(c, b'.' | b'!' | b'?')
            && b.get(i + 1).is_none_or(|n| n.is_ascii_whitespace())
            && !text[..i].trim().is_empty()
        {
            return &text[..=i];
        }
    }
    text
}

/// Whether `text` contains `answer` case-insensitively on word boundaries.
pub fn contains_answer(text: &str, answer: &str) -> bool {
    let a = answer.trim().to_lowercase();
    if a.is_empty() {
        return false;
    }
    let t = text.to_lowercase();
    let word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    let mut from = 0;
    while let Some(i) = t[from..].find(&a) {
        let s = from + i;
        let e = s + a.len();
        if !word(t[..s].chars().next_back()) && !word(t[e..].chars().next()) {
            return true;
        }
        from = s + t[s..].chars().next().map_or(1, char::len_utf8);
    }
    false
}

/// Greedy continuations of `prompts` ([`GEN_TOKENS`] tokens, first sentence), as text.
pub fn continuations(model: &Model, prompts: &[&str]) -> Result<Vec<String>> {
    continuations_cut(model, prompts, GEN_TOKENS, first_sentence)
}

/// Greedy continuations of `prompts`, at most `max_tokens` new tokens each, as text cut by
/// `cut` (a prefix of its argument). A row stops decoding once `cut` has settled: when the cut
/// ends before the end of what the row has (a stop followed by whitespace, or a newline), no
/// later token can change it, so stopping changes no text, only the time.
pub fn continuations_cut(
    model: &Model,
    prompts: &[&str],
    max_tokens: usize,
    cut: fn(&str) -> &str,
) -> Result<Vec<String>> {
    let tok = model.tok()?;
    let rows = prompts
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<Vec<_>>>()?;
    let p = GenParams {
        max_new_tokens: max_tokens,
        stop_at_eos: true,
        ..Default::default()
    };
    let ended = |ids: &[u32]| {
        tok.decode(ids)
            .map(|t| cut(&t).len() < t.len())
            .unwrap_or(false)
    };
    let mut out = Vec::with_capacity(rows.len());
    // Rows decode as one left-padded batch; 16 at a time bounds the KV cache.
    for chunk in rows.chunks(16) {
        for ids in generate_until(model, chunk, &p, &ended)? {
            out.push(cut(&tok.decode(&ids)?).to_string());
        }
    }
    Ok(out)
}

/// The prompts a rewrite is scored on by generation: the edit prompt, its paraphrases, its
/// neighbourhood prompts.
pub(crate) fn prompts(r: &Rewrite) -> Vec<&str> {
    let mut v: Vec<&str> = vec![&r.prompt];
    v.extend(r.paraphrases.iter().map(String::as_str));
    v.extend(r.neighborhood.iter().map(|n| n.prompt.as_str()));
    v
}

/// Score rewrites by generation (see the module header), their prompts decoded together:
/// decoding reads every weight once per step whatever the batch, so 16 rows cost about what
/// 3 do. Without a true target, a neighbourhood prompt's answer is its own `answer` field.
pub fn score_many(model: &Model, rs: &[Rewrite]) -> Result<Vec<GenScores>> {
    let all: Vec<&str> = rs.iter().flat_map(prompts).collect();
    let texts = continuations(model, &all)?;
    Ok(split_scores(rs, &texts))
}

/// Each rewrite's scores ([`from_texts`]) from its slice of `texts` (the continuations of
/// every rewrite's [`prompts`], in order).
pub(crate) fn split_scores(rs: &[Rewrite], texts: &[String]) -> Vec<GenScores> {
    let mut at = 0;
    rs.iter()
        .map(|r| {
            let n = 1 + r.paraphrases.len() + r.neighborhood.len();
            let g = from_texts(r, &texts[at..at + n]);
            at += n;
            g
        })
        .collect()
}

/// The scores of `r` from the continuations of its [`prompts`].
fn from_texts(r: &Rewrite, texts: &[String]) -> GenScores {
    let new = r.target_new.as_str();
    let share = |hits: Vec<bool>| -> Option<f64> {
        (!hits.is_empty()).then(|| hits.iter().filter(|&&h| h).count() as f64 / hits.len() as f64)
    };
    let np = r.paraphrases.len();
    let para = &texts[1..1 + np];
    let neigh = &texts[1 + np..];
    let ns_hits = r
        .neighborhood
        .iter()
        .zip(neigh)
        .map(|(n, t)| {
            let truth = n
                .answer
                .as_deref()
                .or(r.target_true.as_deref())
                .unwrap_or("");
            contains_answer(t, truth) && !contains_answer(t, new)
        })
        .collect();
    GenScores {
        gen_es: contains_answer(&texts[0], new) as u8 as f64,
        gen_ps: share(para.iter().map(|t| contains_answer(t, new)).collect()),
        gen_ns: share(ns_hits),
        gen_text: texts[0].clone(),
        gen_paraphrase_texts: para.to_vec(),
        gen_neighborhood_texts: neigh.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_is_case_insensitive_on_word_boundaries() {
        assert!(contains_answer(" Rome, Italy.", "Rome"));
        assert!(contains_answer(" the city of rome", " Rome"));
        assert!(!contains_answer(" Romeo and Juliet", "Rome"));
        assert!(!contains_answer(" Paris", "Rome"));
        assert!(contains_answer("It is New York City.", "New York"));
        assert!(!contains_answer("anything", "  "));
        assert!(contains_answer("Romeo met Rome", "Rome"));
    }

    #[test]
    fn the_first_sentence_ends_at_a_stop_or_a_newline() {
        assert_eq!(first_sentence(" Rome, Italy. It is big."), " Rome, Italy.");
        assert_eq!(first_sentence(" Rome\nParis"), " Rome");
        assert_eq!(first_sentence("\nRome. x"), "\nRome.");
        assert_eq!(first_sentence(" 3.14 is pi"), " 3.14 is pi");
        assert_eq!(first_sentence(" no end"), " no end");
    }
}
