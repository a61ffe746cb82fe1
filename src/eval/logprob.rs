//! The mean token log-probability of a target continuation, as the ROME paper compares
//! targets (Meng et al. 2022, appendix: "we compare mean token log-probabilities", not
//! teacher-forced accuracy).

use crate::error::Result;
use crate::model::{Batch, Model, PadSide, Trace};
use candle_core::{DType, IndexOp, D};

/// How likely a model finds `target` after `prompt`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetScore {
    pub prompt_tokens: Vec<u32>,
    pub target_tokens: Vec<u32>,
    /// log P(target token i | prompt, target tokens < i), natural log.
    pub token_logprobs: Vec<f64>,
    /// Mean of `token_logprobs`.
    pub mean_logprob: f64,
}

/// Score many (prompt, target) pairs in one right-padded batch.
///
/// The target is tokenized as a continuation of the prompt ([`crate::model::Tok::continuation`]).
///
/// # Errors
/// Empty targets, a model without tokenizer, tensor errors.
pub fn target_logprobs(model: &Model, pairs: &[(&str, &str)]) -> Result<Vec<TargetScore>> {
    let tok = model.tok()?;
    let split: Vec<(Vec<u32>, Vec<u32>)> = pairs
        .iter()
        .map(|(p, t)| tok.continuation(p, t))
        .collect::<Result<_>>()?;
    let rows: Vec<Vec<u32>> = split
        .iter()
        .map(|(p, t)| {
            let mut r = p.clone();
            // The last target token is never an input.
            r.extend_from_slice(&t[..t.len() - 1]);
            r
        })
        .collect();
    let batch = Batch::padded(&rows, PadSide::Right, 0);
    let logits = model.forward(&batch, &mut Trace::new())?; // (b, t, vocab)
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let mut out = Vec::with_capacity(pairs.len());
    for (r, (p, t)) in split.into_iter().enumerate() {
        let mut lps = Vec::with_capacity(t.len());
        for (i, &id) in t.iter().enumerate() {
            // Position (prompt_len - 1 + i) predicts target token i.
            let pos = p.len() + i - 1;
            let v: f32 = logp.i((r, pos, id as usize))?.to_scalar()?;
            lps.push(v as f64);
        }
        let mean = lps.iter().sum::<f64>() / lps.len() as f64;
        out.push(TargetScore {
            prompt_tokens: p,
            target_tokens: t,
            token_logprobs: lps,
            mean_logprob: mean,
        });
    }
    Ok(out)
}
