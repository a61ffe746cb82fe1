//! The metrics of edits and their locality, each implemented once.
//!
//! Efficacy, paraphrase and neighbourhood success compare mean token log-probabilities of two
//! continuations, as the ROME paper does (section 4.2, "Efficacy Score", "Paraphrase Score",
//! "Neighborhood Score"); magnitudes are differences of the probabilities
//! `exp(mean token log-prob)`. Locality compares next-token distributions of unrelated prompts
//! (KL and top-1 agreement) and perplexity on general text.

use super::logprob::target_logprobs;
use crate::error::{Error, Result};
use crate::fact::{continuation, Rewrite};
use crate::model::{Batch, Model, PadSide, Trace};
use candle_core::{DType, IndexOp, Tensor, D};

/// ES, PS and NS of one rewrite, with magnitudes.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RewriteScores {
    /// 1 if P(new) > P(true) on the edit prompt.
    pub es: f64,
    /// Fraction of paraphrases with P(new) > P(true) (None without paraphrases).
    pub ps: Option<f64>,
    /// Fraction of neighbourhood prompts with P(true) > P(new) (None without any).
    pub ns: Option<f64>,
    /// P(new) - P(true) on the edit prompt.
    pub es_margin: f64,
    pub ps_margin: Option<f64>,
    /// Mean P(true) - P(new) over neighbourhood prompts.
    pub ns_margin: Option<f64>,
    pub p_new: f64,
    pub p_true: Option<f64>,
    /// What the model says: `gen_es`, `gen_ps`, `gen_ns` and the texts (generation.rs).
    #[serde(flatten)]
    pub gen: super::generation::GenScores,
}

/// Score a rewrite: by probabilities and by generation ([`super::generation`]). Without
/// `target_true`, ES compares nothing and is 1 when P(new) > 0.5.
pub fn score_rewrite(model: &Model, r: &Rewrite) -> Result<RewriteScores> {
    Ok(score_rewrites(model, std::slice::from_ref(r))?.remove(0))
}

/// [`score_rewrite`] for many rewrites, the generations decoded together
/// ([`super::generation::score_many`]).
pub fn score_rewrites(model: &Model, rs: &[Rewrite]) -> Result<Vec<RewriteScores>> {
    let gens = super::generation::score_many(model, rs)?;
    rs.iter()
        .zip(gens)
        .map(|(r, g)| {
            let mut s = score_probabilities(model, r)?;
            s.gen = g;
            Ok(s)
        })
        .collect()
}

/// The probability comparisons of [`score_rewrite`] (ES/PS/NS and margins).
fn score_probabilities(model: &Model, r: &Rewrite) -> Result<RewriteScores> {
    let new = continuation(&r.target_new);
    let truth = r.target_true.as_deref().map(continuation);
    let mut pairs: Vec<(String, String)> = vec![(r.prompt.clone(), new.clone())];
    if let Some(t) = &truth {
        pairs.push((r.prompt.clone(), t.clone()));
        for p in &r.paraphrases {
            pairs.push((p.clone(), new.clone()));
            pairs.push((p.clone(), t.clone()));
        }
    }
    for n in &r.neighborhood {
        let ans = n
            .answer
            .as_deref()
            .map(continuation)
            .or_else(|| truth.clone())
            .unwrap_or_default();
        pairs.push((n.prompt.clone(), ans));
        pairs.push((n.prompt.clone(), new.clone()));
    }
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let lp: Vec<f64> = target_logprobs(model, &refs)?
        .iter()
        .map(|s| s.mean_logprob)
        .collect();
    let mut s = RewriteScores {
        p_new: lp[0].exp(),
        ..Default::default()
    };
    let mut i = 1;
    if truth.is_some() {
        s.p_true = Some(lp[1].exp());
        s.es = (lp[0] > lp[1]) as u8 as f64;
        s.es_margin = lp[0].exp() - lp[1].exp();
        i = 2;
        if !r.paraphrases.is_empty() {
            let (hit, margin) = pairwise(&lp[i..i + 2 * r.paraphrases.len()]);
            (s.ps, s.ps_margin) = (Some(hit), Some(margin));
            i += 2 * r.paraphrases.len();
        }
    } else {
        s.es = (lp[0].exp() > 0.5) as u8 as f64;
        s.es_margin = lp[0].exp() - 0.5;
    }
    if !r.neighborhood.is_empty() {
        let (hit, margin) = pairwise(&lp[i..i + 2 * r.neighborhood.len()]);
        (s.ns, s.ns_margin) = (Some(hit), Some(margin));
    }
    Ok(s)
}

/// For consecutive pairs (a, b) of mean log-probs: the fraction with a > b, and the mean of
/// exp(a) - exp(b).
/// Efficacy success of many rewrites at once (1 where P(new) > P(true) on the edit prompt,
/// as [`score_rewrite`]'s `es`; 0 without a true target), scored 64 prompts per forward pass.
pub fn efficacy(model: &Model, rs: &[Rewrite]) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(rs.len());
    for chunk in rs.chunks(32) {
        let pairs: Vec<(String, String, String)> = chunk
            .iter()
            .map(|r| {
                (
                    r.prompt.clone(),
                    continuation(&r.target_new),
                    r.target_true
                        .as_deref()
                        .map(continuation)
                        .unwrap_or_default(),
                )
            })
            .collect();
        let with_truth: Vec<&(String, String, String)> =
            pairs.iter().filter(|p| !p.2.is_empty()).collect();
        let mut refs: Vec<(&str, &str)> = Vec::new();
        for (p, n, t) in &with_truth {
            refs.push((p, n));
            refs.push((p, t));
        }
        let lp = target_logprobs(model, &refs)?;
        let mut k = 0;
        for p in &pairs {
            if p.2.is_empty() {
                out.push(0.0);
            } else {
                out.push((lp[k].mean_logprob > lp[k + 1].mean_logprob) as u8 as f64);
                k += 2;
            }
        }
    }
    Ok(out)
}

/// Fluency as ROME measures it: the mean weighted n-gram entropy ([`ngram_entropy`]) of
/// 40-token greedy generations from `prompts`.
pub fn fluency(model: &Model, prompts: &[String]) -> Result<f64> {
    let tok = model.tok()?;
    let ids = prompts
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<Vec<_>>>()?;
    let gp = crate::model::generate::GenParams {
        max_new_tokens: 40,
        stop_at_eos: false,
        ..Default::default()
    };
    let outs = crate::model::generate::generate(model, &ids, &gp)?;
    let mut tot = 0.0;
    for o in &outs {
        tot += ngram_entropy(&tok.decode(o)?);
    }
    Ok(tot / outs.len().max(1) as f64)
}

fn pairwise(lp: &[f64]) -> (f64, f64) {
    let k = (lp.len() / 2).max(1) as f64;
    let hit = lp.chunks(2).filter(|p| p[0] > p[1]).count() as f64;
    let margin: f64 = lp.chunks(2).map(|p| p[0].exp() - p[1].exp()).sum();
    (hit / k, margin / k)
}

/// KL(p || q) of two distributions given as log-probabilities (natural log).
pub fn kl_from_logprobs(lp: &[f32], lq: &[f32]) -> f64 {
    lp.iter()
        .zip(lq)
        .map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64))
        .sum()
}

/// Harmonic mean (0 if any value is 0).
pub fn harmonic_mean(v: &[f64]) -> f64 {
    if v.is_empty() || v.iter().any(|&x| x <= 0.0) {
        return 0.0;
    }
    v.len() as f64 / v.iter().map(|x| 1.0 / x).sum::<f64>()
}

/// Mean and 95% confidence half-width (normal approximation, sample std / sqrt(n) * 1.96).
pub fn mean_ci95(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let m = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, 1.96 * (var / n).sqrt())
}

/// ROME's fluency measure: the weighted average of bi- and tri-gram entropies of a text's
/// tokens, weights 2/3 and 4/3 (reference `n_gram_entropy`, `ns=[2, 3]`, `weights=[2/3, 4/3]`),
/// entropies in bits. The tokens here are whitespace-separated words, as the reference's NLTK
/// `word_tokenize` roughly gives.
pub fn ngram_entropy(text: &str) -> f64 {
    let words: Vec<&str> = text.split_whitespace().collect();
    let ent = |n: usize| -> f64 {
        if words.len() < n {
            return 0.0;
        }
        let mut counts = std::collections::HashMap::new();
        for w in words.windows(n) {
            *counts.entry(w).or_insert(0usize) += 1;
        }
        let total: usize = counts.values().sum();
        counts
            .values()
            .map(|&c| {
                let p = c as f64 / total as f64;
                -p * p.log2()
            })
            .sum()
    };
    (2.0 / 3.0 * ent(2) + 4.0 / 3.0 * ent(3)) / 2.0
}

/// The unrelated-prompt and general-text suite used by locality reports (`eval/*.yaml`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    pub prompts: Vec<SuitePrompt>,
    #[serde(default)]
    pub texts: Vec<String>,
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SuitePrompt {
    pub prompt: String,
    pub answer: String,
    #[serde(default)]
    pub topic: Option<String>,
}

impl Suite {
    pub fn load(path: &std::path::Path) -> Result<Suite> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let s: Suite = serde_yaml::from_str(&text).map_err(|e| Error::Spec {
            path: path.into(),
            message: e.to_string(),
        })?;
        if s.prompts.is_empty() {
            return Err(Error::Spec {
                path: path.into(),
                message: "prompts: at least one is needed".into(),
            });
        }
        Ok(s)
    }
}

/// A model's next-token log-probabilities on the suite prompts, and its NLL on the texts.
#[derive(Debug, Clone)]
pub struct SuiteRun {
    /// `[prompts, vocab]` log-probabilities at each prompt's last token.
    pub logprobs: Tensor,
    /// Per text: mean token NLL (natural log).
    pub text_nll: Vec<f64>,
}

/// Run the suite on a model.
pub fn run_suite(model: &Model, suite: &Suite) -> Result<SuiteRun> {
    let tok = model.tok()?;
    let mut rows = Vec::new();
    for chunk in suite.prompts.chunks(32) {
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|p| tok.encode(&p.prompt))
            .collect::<Result<_>>()?;
        let batch = Batch::padded(&ids, PadSide::Right, 0);
        let logits = model.forward(&batch, &mut Trace::new())?;
        let last: Vec<Tensor> = ids
            .iter()
            .enumerate()
            .map(|(r, row)| logits.i((r, row.len() - 1)))
            .collect::<candle_core::Result<_>>()?;
        // Stacking copies: views would keep every chunk's full logits alive (hundreds of MB).
        rows.push(Tensor::stack(&last, 0)?);
    }
    let logprobs =
        candle_nn::ops::log_softmax(&Tensor::cat(&rows, 0)?.to_dtype(DType::F32)?, D::Minus1)?;
    Ok(SuiteRun {
        logprobs,
        text_nll: text_nll(model, &suite.texts)?,
    })
}

/// Per text: mean token NLL (natural log); texts of fewer than 2 tokens are skipped.
pub fn text_nll(model: &Model, texts: &[String]) -> Result<Vec<f64>> {
    let tok = model.tok()?;
    let mut out = Vec::with_capacity(texts.len());
    for t in texts {
        let ids = tok.encode(t)?;
        if ids.len() < 2 {
            continue;
        }
        let logits = model
            .forward(&Batch::single(&ids), &mut Trace::new())?
            .squeeze(0)?;
        let lp = candle_nn::ops::log_softmax(&logits.narrow(0, 0, ids.len() - 1)?, D::Minus1)?;
        let next = Tensor::new(&ids[1..], &model.device)?.unsqueeze(1)?;
        let nll = lp.gather(&next, 1)?.mean_all()?.to_scalar::<f32>()? as f64;
        out.push(-nll);
    }
    Ok(out)
}

/// Locality of an edited model against its base.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Locality {
    /// KL(base || edited) per prompt, natural log.
    pub kl: Vec<f64>,
    pub kl_mean: f64,
    /// Fraction of prompts whose top-1 next token is unchanged.
    pub top1_agreement: f64,
    /// exp(mean text NLL), before and after.
    pub perplexity_base: f64,
    pub perplexity_edited: f64,
}

/// Compare two suite runs.
pub fn locality(base: &SuiteRun, edited: &SuiteRun) -> Result<Locality> {
    let a: Vec<Vec<f32>> = base.logprobs.to_vec2()?;
    let b: Vec<Vec<f32>> = edited.logprobs.to_vec2()?;
    let kl: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(p, q)| kl_from_logprobs(p, q).max(0.0))
        .collect();
    let argmax = |v: &Vec<f32>| {
        v.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |m, (i, &x)| if x > m.1 { (i, x) } else { m },
            )
            .0
    };
    let agree = a
        .iter()
        .zip(&b)
        .filter(|(p, q)| argmax(p) == argmax(q))
        .count() as f64
        / a.len().max(1) as f64;
    let ppl = |v: &[f64]| (v.iter().sum::<f64>() / v.len().max(1) as f64).exp();
    Ok(Locality {
        kl_mean: kl.iter().sum::<f64>() / kl.len().max(1) as f64,
        kl,
        top1_agreement: agree,
        perplexity_base: ppl(&base.text_nll),
        perplexity_edited: ppl(&edited.text_nll),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_of_known_distributions() {
        // p = (1/2, 1/2), q = (1/4, 3/4): KL = 0.5 ln 2 + 0.5 ln(2/3)
        let lp = [0.5f32.ln(), 0.5f32.ln()];
        let lq = [0.25f32.ln(), 0.75f32.ln()];
        let want = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((kl_from_logprobs(&lp, &lq) - want).abs() < 1e-6);
        assert!(kl_from_logprobs(&lp, &lp).abs() < 1e-12);
    }

    #[test]
    fn harmonic_mean_and_ci() {
        assert!((harmonic_mean(&[1.0, 0.5]) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(harmonic_mean(&[1.0, 0.0]), 0.0);
        let (m, h) = mean_ci95(&[0.0, 1.0, 0.0, 1.0]);
        // std (n-1) = sqrt(1/3); half-width = 1.96 * sqrt(1/3) / 2
        assert!((m - 0.5).abs() < 1e-12 && (h - 1.96 * (1.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
    }

    #[test]
    fn entropy_of_a_known_string() {
        // "a b a b": bigrams ab, ba, ab -> H2 = -(2/3 log2 2/3 + 1/3 log2 1/3);
        // trigrams aba, bab -> H3 = 1 bit.
        let h2 = -(2.0 / 3.0 * (2.0f64 / 3.0).log2() + 1.0 / 3.0 * (1.0f64 / 3.0).log2());
        let want = (2.0 / 3.0 * h2 + 4.0 / 3.0 * 1.0) / 2.0;
        assert!((ngram_entropy("a b a b") - want).abs() < 1e-12);
        assert_eq!(ngram_entropy("a"), 0.0);
    }
}
