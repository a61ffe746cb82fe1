//! Free-generation edit scores in the spirit of the WILD protocol of "The Mirage of Model
//! Editing" (Yang et al. 2025, arXiv 2502.11177, section 3): the edited model is asked a
//! question and answers freely, with no target-length truncation, and the answer is judged as
//! a whole.
//!
//! What we do, per prompt of a rewrite (edit prompt, paraphrases, neighbourhood prompts):
//!
//! 1. The cloze prompt becomes a question ([`question`]): a prompt holding a `?` keeps the
//!    text up to its last `?` ("What is the twin city of Lyon? It is" -> "What is the twin
//!    city of Lyon?"); any other prompt gets " what?" ("The mother tongue of Danielle Darrieux
//!    is" -> "The mother tongue of Danielle Darrieux is what?").
//! 2. The question is put to the model as a user would ([`wild_prompt`]): in the ChatML chat
//!    format when the vocabulary has its `<|im_start|>` and `<|im_end|>` tokens (SmolLM2-Instruct,
//!    Qwen), as one user turn followed by the assistant's turn; otherwise as
//!    `Please answer the question.\nQuestion: {question}\nAnswer:`. The model decodes greedily
//!    until its end-of-sequence token, the end of the answer's first line ([`first_line`]), or
//!    [`WILD_TOKENS`] new tokens. The answer is not cut at a sentence end or at the target's
//!    length.
//! 3. The scores are those of [`super::generation`] read from these answers: `wild_es` (the
//!    answer to the edit question contains the new target), `wild_ps` (the share of paraphrase
//!    answers that do), `wild_ns` (the share of neighbourhood answers that contain the true
//!    answer and not the new target). Matching is [`super::generation::contains_answer`]:
//!    case-insensitive, on word boundaries.
//!
//! Departures from the paper:
//! - CounterFact has no question form. The paper asks the datasets' own questions (QAEdit's
//!   from Natural Questions, TriviaQA, SimpleQA); we build one mechanically from the cloze
//!   prompt, so some questions read awkwardly ("... that was created in what?").
//! - The paper judges each answer with an LLM (GPT-4o-mini) against the target; we look for
//!   the target string in the answer, which counts "English or French" as containing both.
//! - Its stop criterion is the model's natural end of answer; we also stop at 40 tokens, which
//!   bounds the cost (a 135M model rarely ends an answer by itself).
//! - The paper uses each model's own chat template; we know ChatML only (other instruct
//!   formats get the plain prompt). Plain "Question: ...\nAnswer:" made SmolLM2-Instruct end its
//!   turn at once: an empty answer for most questions.

use super::generation::{continuations_cut, prompts, split_scores, GenScores};
use crate::error::Result;
use crate::fact::Rewrite;
use crate::model::Model;

/// Most new tokens in a free answer.
pub const WILD_TOKENS: usize = 40;

/// A cloze prompt as a question (see the module header).
pub fn question(prompt: &str) -> String {
    let p = prompt.trim();
    match p.rfind('?') {
        Some(i) => p[..=i].to_string(),
        None => format!("{p} what?"),
    }
}

/// The text the model answers (see the module header): a ChatML user turn and the start of
/// the assistant's when `chatml`, else a plain question and "Answer:".
pub fn wild_prompt(prompt: &str, chatml: bool) -> String {
    let q = question(prompt);
    if chatml {
        format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
    } else {
        format!("Please answer the question.\nQuestion: {q}\nAnswer:")
    }
}

/// Whether the model's vocabulary holds ChatML's turn tokens.
pub fn uses_chatml(model: &Model) -> Result<bool> {
    let tok = model.tok()?;
    Ok(tok.token_id("<|im_start|>").is_some() && tok.token_id("<|im_end|>").is_some())
}

/// The answer's first line: the text up to the first newline that follows non-blank text.
pub fn first_line(text: &str) -> &str {
    let start = text.len() - text.trim_start().len();
    match text[start..].find('\n') {
        Some(i) => &text[..start + i],
        None => text,
    }
}

/// Score rewrites by free generation (see the module header), every rewrite's questions
/// decoded together. The fields are those of [`GenScores`]: `gen_es` etc. read from the
/// free answers.
pub fn score_many(model: &Model, rs: &[Rewrite]) -> Result<Vec<GenScores>> {
    let chatml = uses_chatml(model)?;
    let questions: Vec<String> = rs
        .iter()
        .flat_map(|r| prompts(r).into_iter().map(|p| wild_prompt(p, chatml)))
        .collect();
    let refs: Vec<&str> = questions.iter().map(String::as_str).collect();
    let texts = continuations_cut(model, &refs, WILD_TOKENS, first_line)?;
    Ok(split_scores(rs, &texts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloze_prompts_become_questions() {
        assert_eq!(
            question("The mother tongue of Danielle Darrieux is"),
            "The mother tongue of Danielle Darrieux is what?"
        );
        assert_eq!(
            question("What is the twin city of Lyon? It is"),
            "What is the twin city of Lyon?"
        );
        assert_eq!(
            wild_prompt("Paris is the capital of ", false),
            "Please answer the question.\nQuestion: Paris is the capital of what?\nAnswer:"
        );
        assert_eq!(
            wild_prompt("Paris is the capital of", true),
            "<|im_start|>user\nParis is the capital of what?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn the_answer_is_its_first_line_and_not_cut_at_a_sentence() {
        assert_eq!(
            first_line(" English. She also spoke French.\nQuestion: x"),
            " English. She also spoke French."
        );
        assert_eq!(first_line("\n\n Rome\nParis"), "\n\n Rome");
        assert_eq!(first_line(" no end"), " no end");
        assert_eq!(first_line("  \n"), "  \n");
    }
}
