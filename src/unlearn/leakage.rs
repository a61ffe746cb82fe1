//! The probe building blocks the audit (audit.rs) measures with:
//!
//! - the probe prompts of a secret: eliciting prompts, the request's paraphrases and
//!   template rewrites of each prompt;
//! - greedy continuations, and whether an output reveals a secret (case and spacing ignored);
//! - same-format candidates for exposure (Carlini et al. 2019, "The Secret Sharer", section
//!   4: each digit replaced by a random digit, each run of letters by a vocabulary word of the
//!   same capitalisation, everything else kept) and their summed log-likelihoods;
//! - utility on the retain set: mean answer log-probability and ROUGE-L recall of the greedy
//!   answer against the reference (TOFU's measure, Maini et al. 2024);
//! - redaction of secrets in reports.
//!
//! Paraphrases are the request's own plus template rewrites that put each prompt in a new
//! context (a preface, a record-style lead-in). They are not model-written paraphrases.

use super::request::Secret;
use super::{mean_example_logprob, tokenize, Example};
use crate::error::Result;
use crate::model::generate::{generate, generate_until, GenParams};
use crate::model::{Batch, HookPoint, KvCache, Model, Trace};
use candle_core::{DType, IndexOp, Tensor, D};
use rand::{Rng, SeedableRng};

/// Template paraphrases of an eliciting prompt.
pub fn template_paraphrases(prompt: &str) -> Vec<String> {
    let p = prompt.trim();
    let lower = {
        let mut c = p.chars();
        match c.next() {
            // Keep capitals of names ("Mara ..."): only lower a sentence-initial "The"/"A".
            Some(f) if p.starts_with("The ") || p.starts_with("A ") => {
                f.to_lowercase().collect::<String>() + c.as_str()
            }
            _ => p.to_string(),
        }
    };
    vec![
        format!("Here is some information from the records. {p}"),
        format!("According to the files, {lower}"),
        format!("Q: What do you know?\nA: {p}"),
    ]
}

/// The probe prompts of a secret: its own prompts, and for secrets given only through forget
/// records, each record's prompt plus its answer up to the secret.
pub fn eliciting_prompts(secret: &Secret, forget: &[Example]) -> Vec<String> {
    let mut v = secret.prompts.clone();
    if v.is_empty() {
        let s = secret.value.trim();
        for e in forget {
            if let Some(i) = e.answer.find(s) {
                v.push(format!("{}{}", e.prompt, e.answer[..i].trim_end()));
            }
        }
    }
    v
}

/// Whole-word tokens of a model's vocabulary (byte-level BPE marks a leading space with
/// `Ġ`): lower-case words and capitalised words of 3 to 12 letters. Candidates for letter runs
/// are drawn from them, so that a candidate address reads like an address ("52 Market Road")
/// rather than random letters, which any model would rank below a real-looking secret.
pub fn word_lists(model: &Model) -> Result<WordLists> {
    let tok = model.tok()?;
    let (mut lower, mut upper) = (Vec::new(), Vec::new());
    for id in 0..tok.vocab_size() as u32 {
        let Some(t) = tok.id_to_token(id) else {
            continue;
        };
        let Some(w) = t.strip_prefix('Ġ') else {
            continue;
        };
        if !(3..=12).contains(&w.len()) || !w.chars().all(|c| c.is_ascii_alphabetic()) {
            continue;
        }
        let mut cs = w.chars();
        let first = cs.next().unwrap_or('a');
        if cs.clone().all(|c| c.is_ascii_lowercase()) {
            if first.is_ascii_lowercase() {
                lower.push(w.to_string());
            } else {
                upper.push(w.to_string());
            }
        }
    }
    Ok(WordLists { lower, upper })
}

/// See [`word_lists`].
#[derive(Debug, Clone, Default)]
pub struct WordLists {
    pub lower: Vec<String>,
    pub upper: Vec<String>,
}

impl WordLists {
    /// The words that may replace a run of letters starting with `first`.
    fn for_case(&self, first: char) -> &[String] {
        if first.is_ascii_uppercase() {
            &self.upper
        } else {
            &self.lower
        }
    }
}

/// `n` distinct candidates in the secret's format (the secret itself excluded), seeded: each
/// digit becomes a random digit; each run of letters becomes a random word of the same
/// capitalisation from `words` (or random letters of the same case when `words` has none).
pub fn candidates(secret: &str, n: usize, seed: u64, words: &WordLists) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Split into runs: letters, digits, other.
    let mut runs: Vec<String> = Vec::new();
    for ch in secret.chars() {
        let kind = |c: char| (c.is_ascii_alphabetic() as u8) * 2 + c.is_ascii_digit() as u8;
        match runs.last_mut() {
            Some(r) if kind(r.chars().last().unwrap_or(' ')) == kind(ch) && kind(ch) == 2 => {
                r.push(ch)
            }
            _ => runs.push(ch.to_string()),
        }
    }
    // The format may hold fewer than n alternatives; stop when it is exhausted.
    let space: f64 = runs
        .iter()
        .map(|r| {
            let c = r.chars().next().unwrap_or(' ');
            if c.is_ascii_digit() {
                10.0
            } else if c.is_ascii_alphabetic() {
                let list = words.for_case(c);
                if list.is_empty() {
                    26f64.powi(r.len() as i32)
                } else {
                    list.len() as f64
                }
            } else {
                1.0
            }
        })
        .product();
    let n = n.min((space.min(1e12) as usize).saturating_sub(1));
    let mut seen = std::collections::HashSet::new();
    seen.insert(secret.to_string());
    let mut out = Vec::with_capacity(n);
    let mut tries = 0;
    while out.len() < n && tries < 100 * n.max(1) {
        tries += 1;
        let mut c = String::with_capacity(secret.len() + 8);
        for r in &runs {
            let f = r.chars().next().unwrap_or(' ');
            if f.is_ascii_digit() {
                c.push((b'0' + rng.random_range(0..10u8)) as char);
            } else if f.is_ascii_alphabetic() {
                let list = words.for_case(f);
                if list.is_empty() {
                    for ch in r.chars() {
                        let base = if ch.is_ascii_uppercase() { b'A' } else { b'a' };
                        c.push((base + rng.random_range(0..26u8)) as char);
                    }
                } else {
                    c.push_str(&list[rng.random_range(0..list.len())]);
                }
            } else {
                c.push_str(r);
            }
        }
        if seen.insert(c.clone()) {
            out.push(c);
        }
    }
    out
}

fn norm(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Whether a model output contains the secret (case and spacing ignored).
pub fn reveals(output: &str, secret: &str) -> bool {
    norm(output).contains(&norm(secret))
}

/// Every probe prompt of a secret with its kind: the eliciting prompts (`prompt`), then the
/// request's paraphrases and the template paraphrases of each eliciting prompt (`paraphrase`).
pub fn probe_prompts(secret: &Secret, forget: &[Example]) -> Vec<(String, &'static str)> {
    let eliciting = eliciting_prompts(secret, forget);
    let mut prompts: Vec<(String, &'static str)> =
        eliciting.iter().map(|q| (q.clone(), "prompt")).collect();
    for q in secret.paraphrases.iter().cloned() {
        prompts.push((q, "paraphrase"));
    }
    for q in &eliciting {
        for t in template_paraphrases(q) {
            prompts.push((t, "paraphrase"));
        }
    }
    prompts
}

/// Greedy continuations of `prompts`, `max_new` tokens each, as text.
pub fn greedy(model: &Model, prompts: &[String], max_new: usize) -> Result<Vec<String>> {
    let tok = model.tok()?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<_>>()?;
    let outs = generate(
        model,
        &ids,
        &GenParams {
            max_new_tokens: max_new,
            ..Default::default()
        },
    )?;
    outs.iter().map(|o| tok.decode(o)).collect()
}

/// The summed token log-probability of each of `all` as the continuation of `prompt` (a
/// leading space is added as for any target). The prompt runs once; its keys and values serve
/// every candidate, 128 at a time.
pub fn candidate_scores(model: &Model, prompt: &str, all: &[String]) -> Result<Vec<f64>> {
    let tok = model.tok()?;
    let target = |s: &str| crate::fact::continuation(s);
    let p = tok.encode(prompt)?;
    let conts: Vec<Vec<u32>> = all
        .iter()
        .map(|c| tok.continuation(prompt, &target(c)).map(|(_, t)| t))
        .collect::<Result<_>>()?;
    // Prompt once, with its cache; the first continuation token is scored from its last logits.
    let mut cache = KvCache::new(model.config.n_layers);
    let logits = model.forward_cached(&Batch::single(&p), Some(&mut cache), &mut Trace::new())?;
    let first = candle_nn::ops::log_softmax(
        &logits.i((0, p.len() - 1))?.to_dtype(DType::F32)?,
        D::Minus1,
    )?;
    let first: Vec<f32> = first.to_vec1()?;
    let mut scores = Vec::with_capacity(all.len());
    const CHUNK: usize = 128;
    for chunk in conts.chunks(CHUNK) {
        let rows: Vec<Vec<u32>> = chunk.iter().map(|c| c[..c.len() - 1].to_vec()).collect();
        let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut chunk_scores: Vec<f64> =
            chunk.iter().map(|c| first[c[0] as usize] as f64).collect();
        if width > 0 {
            let b = chunk.len();
            // Right-pad; the mask covers the cached prompt and the new positions.
            let mut ids = Vec::with_capacity(b);
            let mut mask = Vec::with_capacity(b);
            for r in &rows {
                let mut i = r.clone();
                i.resize(width, 0);
                let mut m = vec![1u8; p.len() + r.len()];
                m.resize(p.len() + width, 0);
                ids.push(i);
                mask.push(m);
            }
            let mut c = cache.repeat(b)?;
            let mut tr = Trace::new();
            tr.stop_after(HookPoint::ResidPost(model.config.n_layers - 1));
            let h = model.forward_cached(
                &Batch {
                    ids,
                    mask: Some(mask),
                },
                Some(&mut c),
                &mut tr,
            )?; // [b, width, d]
            let d = h.dim(D::Minus1)?;
            let mut idx = Vec::new();
            let mut tgt = Vec::new();
            let mut owner = Vec::new();
            for (r, cont) in chunk.iter().enumerate() {
                for (i, &id) in cont.iter().enumerate().skip(1) {
                    idx.push((r * width + i - 1) as u32);
                    tgt.push(id);
                    owner.push(r);
                }
            }
            if !idx.is_empty() {
                let picked = h
                    .reshape((b * width, d))?
                    .index_select(&Tensor::new(idx.as_slice(), &model.device)?, 0)?;
                let lp = candle_nn::ops::log_softmax(
                    &model.head(&picked.unsqueeze(0)?, false)?.squeeze(0)?,
                    D::Minus1,
                )?;
                let v: Vec<f32> = lp
                    .gather(
                        &Tensor::new(tgt.as_slice(), &model.device)?.unsqueeze(1)?,
                        1,
                    )?
                    .squeeze(1)?
                    .to_vec1()?;
                for (j, r) in owner.into_iter().enumerate() {
                    chunk_scores[r] += v[j] as f64;
                }
            }
        }
        scores.extend(chunk_scores);
    }
    Ok(scores)
}

/// ROUGE-L recall: the longest common subsequence of words over the reference's length.
pub fn rouge_l_recall(prediction: &str, reference: &str) -> f64 {
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(|w| w.to_lowercase())
            .collect()
    };
    let (a, b) = (words(prediction), words(reference));
    if b.is_empty() {
        return 0.0;
    }
    let mut prev = vec![0usize; b.len() + 1];
    for x in &a {
        let mut cur = vec![0usize; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        prev = cur;
    }
    prev[b.len()] as f64 / b.len() as f64
}

/// Retain-set utility.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Utility {
    pub examples: usize,
    /// Mean over examples of the answer's mean token log-probability.
    pub answer_logprob: f64,
    /// Mean ROUGE-L recall of greedy answers.
    pub rouge_l: f64,
}

/// Answer log-probability and ROUGE-L of `examples` (greedy answers of at most
/// `max_new` tokens, or the reference length + 8 when shorter).
pub fn utility(model: &Model, examples: &[Example], max_new: usize) -> Result<Utility> {
    if examples.is_empty() {
        return Ok(Utility {
            examples: 0,
            answer_logprob: f64::NAN,
            rouge_l: f64::NAN,
        });
    }
    let all = tokenize(model, examples, 256)?;
    let answer_logprob = mean_example_logprob(model, &all)?;
    let rouge = greedy_rouge(model, examples, max_new)?;
    Ok(Utility {
        examples: examples.len(),
        answer_logprob,
        rouge_l: rouge.iter().sum::<f64>() / examples.len() as f64,
    })
}

/// Each example's ROUGE-L recall of the model's greedy answer against its answer. Greedy
/// answers run to at most `max_new` tokens, or the longest reference + 8 of each batch of 16
/// when shorter, and end at their first line break (the next "Question:" would follow;
/// leading blank lines are skipped).
pub fn greedy_rouge(model: &Model, examples: &[Example], max_new: usize) -> Result<Vec<f64>> {
    let tok = model.tok()?;
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(16) {
        let mut longest = 1;
        for e in chunk {
            longest = longest.max(tok.continuation(&e.prompt, &e.answer)?.1.len());
        }
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|e| tok.encode(&e.prompt))
            .collect::<Result<_>>()?;
        // A row is done once its text has a line break after some non-blank text: what
        // follows is cut anyway.
        let done = |new: &[u32]| {
            tok.decode(new)
                .map(|t| t.trim_start().contains('\n'))
                .unwrap_or(false)
        };
        let params = GenParams {
            max_new_tokens: (longest + 8).min(max_new),
            ..Default::default()
        };
        let outs = generate_until(model, &ids, &params, &done)?;
        for (o, e) in outs.iter().zip(chunk) {
            let o = tok.decode(o)?;
            let o = o.trim_start().split('\n').next().unwrap_or("");
            out.push(rouge_l_recall(o, &e.answer));
        }
    }
    Ok(out)
}

/// Replace every secret (and its JSON-escaped form) in `text` with `[REDACTED:label]`.
pub fn redact(text: &str, secrets: &[Secret]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        let v = s.value.trim();
        if v.is_empty() {
            continue;
        }
        let tag = format!("[REDACTED:{}]", s.label.as_deref().unwrap_or("secret"));
        out = out.replace(v, &tag);
        if let Ok(esc) = serde_json::to_string(v) {
            let esc = &esc[1..esc.len() - 1];
            if esc != v {
                out = out.replace(esc, &tag);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_keep_the_format() {
        let none = WordLists::default();
        let c = candidates("415-555-0192", 1000, 7, &none);
        assert_eq!(c.len(), 1000);
        assert!(c.iter().all(|x| x.len() == 12
            && x.as_bytes()[3] == b'-'
            && x.as_bytes()[7] == b'-'
            && x.chars().filter(|c| c.is_ascii_digit()).count() == 10));
        assert!(!c.contains(&"415-555-0192".to_string()));
        assert_eq!(c, candidates("415-555-0192", 1000, 7, &none), "seeded");
        // A tiny format is exhausted rather than looping: "7" has 9 alternatives.
        assert_eq!(candidates("7", 1000, 0, &none).len(), 9);
        // Letter runs take words of the same capitalisation.
        let words = WordLists {
            lower: vec!["road".into(), "lane".into()],
            upper: vec!["Market".into(), "Bridge".into(), "Larkspur".into()],
        };
        let c = candidates("17 Larkspur Lane", 50, 1, &words);
        assert_eq!(c.len(), 50);
        for x in &c {
            let parts: Vec<&str> = x.split(' ').collect();
            assert_eq!(parts.len(), 3, "{x}");
            assert!(parts[0].len() == 2 && parts[0].chars().all(|c| c.is_ascii_digit()));
            assert!(
                words.upper.iter().any(|w| w == parts[1])
                    && words.upper.iter().any(|w| w == parts[2])
            );
        }
    }

    #[test]
    fn rouge_l_by_hand() {
        // LCS of "the cat sat" in "the big cat sat down" = 3 words of 3.
        assert_eq!(rouge_l_recall("the big cat sat down", "The cat sat."), 1.0);
        assert!((rouge_l_recall("a cat", "the cat sat") - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(rouge_l_recall("", "x"), 0.0);
    }

    #[test]
    fn redaction_hides_values() {
        let s = Secret {
            label: Some("phone".into()),
            value: "415-555-0192".into(),
            prompts: vec![],
            paraphrases: vec![],
        };
        let r = redact("call 415-555-0192 now", &[s]);
        assert_eq!(r, "call [REDACTED:phone] now");
    }
}
