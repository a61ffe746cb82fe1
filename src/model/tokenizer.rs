//! Tokenization: a Hugging Face `tokenizer.json`, or a byte-level BPE tokenizer rebuilt from
//! GGUF metadata (`tokenizer.ggml.tokens`, `.merges`, `.token_type`, `.pre`).
//!
//! All metrics score a target as a continuation of a prompt, so [`Tok::continuation`] is the
//! one place that decides how a target is split into tokens.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

/// A tokenizer that never adds special tokens on its own.
#[derive(Clone)]
pub struct Tok {
    inner: Tokenizer,
    /// The id that separates documents (`<|endoftext|>`), used to start generation from
    /// "no text"; falls back to BOS.
    pub doc_start: Option<u32>,
    /// End-of-sequence id, if known.
    pub eos: Option<u32>,
}

impl std::fmt::Debug for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tok(vocab={})", self.inner.get_vocab_size(true))
    }
}

impl Tok {
    /// Token span `[start, end)` of `subject` inside `prompt`'s tokens `ids`, for its first
    /// occurrence at or after byte `from` (a prompt behind a context prefix: `from` is the
    /// prefix's length).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `subject` when it does not occur in the prompt.
    pub fn subject_span(
        &self,
        prompt: &str,
        subject: &str,
        ids: &[u32],
        from: usize,
    ) -> Result<(usize, usize)> {
        let not_found = || {
            Error::invalid(
                "subject",
                format!("`{subject}` does not occur in the prompt `{prompt}`"),
            )
        };
        if subject.trim().is_empty() {
            return Err(Error::invalid("subject", "must not be empty"));
        }
        let start = prompt
            .get(from..)
            .and_then(|p| p.find(subject))
            .ok_or_else(not_found)?
            + from;
        let end = start + subject.len();
        // Byte offset where each token ends, from the decoded prefixes.
        let mut ends = Vec::with_capacity(ids.len());
        for k in 1..=ids.len() {
            ends.push(self.decode(&ids[..k])?.len());
        }
        let first = ends.iter().position(|&e| e > start).ok_or_else(not_found)?;
        let last = ends.iter().position(|&e| e >= end).ok_or_else(not_found)?;
        Ok((first, last + 1))
    }

    /// Load a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Tok> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let doc_start = inner.token_to_id("<|endoftext|>");
        let eos = doc_start;
        Ok(Tok {
            inner,
            doc_start,
            eos,
        })
    }

    /// Rebuild the tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.model = gpt2`,
    /// byte-level BPE).
    ///
    /// `tokenizer.ggml.pre` picks the pre-tokenizer. `smollm` splits every digit on its own
    /// before the GPT-2 byte-level regex, as SmolLM's `tokenizer.json` does; other values get
    /// the plain GPT-2 byte-level split. No prefix space is added (`add_space_prefix = false`).
    pub fn from_gguf(path: &Path, ct: &Content) -> Result<Tok> {
        let err = |m: String| Error::Tokenizer(format!("{}: {m}", path.display()));
        let get = |k: &str| ct.metadata.get(k);
        let model = get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| err("no tokenizer.ggml.model".into()))?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer.ggml.model `{model}` is not supported (supported: gpt2)"
            )));
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            let v = get(k)
                .and_then(|v| v.to_vec().ok())
                .ok_or_else(|| err(format!("missing array `{k}`")))?;
            v.iter()
                .map(|x| {
                    x.to_string()
                        .cloned()
                        .map_err(|_| err(format!("`{k}` holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => Err(err(format!("bad merge `{m}`"))),
            })
            .collect::<Result<_>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let mut inner = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre = get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("gpt2");
        let pt: PreTokenizerWrapper = match pre {
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            _ => byte_level.into(),
        };
        inner.with_pre_tokenizer(Some(pt));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control tokens (type 3) are special: they match as whole strings and never merge.
        if let Some(Value::Array(types)) = get("tokenizer.ggml.token_type") {
            let specials: Vec<AddedToken> = types
                .iter()
                .enumerate()
                .filter(|(_, t)| t.to_i32().map(|t| t == 3).unwrap_or(false))
                .filter_map(|(i, _)| tokens.get(i))
                .map(|t| AddedToken::from(t.clone(), true))
                .collect();
            inner.add_special_tokens(specials).map_err(|e| {
                Error::Tokenizer(format!("{}: special tokens: {e}", path.display()))
            })?;
        }
        let id = |k: &str| get(k).and_then(|v| v.to_u32().ok());
        let doc_start = inner
            .token_to_id("<|endoftext|>")
            .or_else(|| id("tokenizer.ggml.bos_token_id"));
        Ok(Tok {
            inner,
            doc_start,
            eos: id("tokenizer.ggml.eos_token_id"),
        })
    }

    /// Token ids of `text`, with no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The string of one token id, as stored in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token given as it is stored in the vocabulary (e.g. `<|im_start|>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary size, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Split `prompt + target` into the prompt's tokens and the target's tokens.
    ///
    /// The target is tokenized as a continuation of the prompt: we encode the joint string and
    /// take the tokens after the prompt's own tokens. Where the joint encoding merges across
    /// the boundary (the prompt's tokens are not a prefix of it), we fall back to encoding the
    /// target on its own, as the ROME reference does (`tok(prompt) + tok(target)`). Leading
    /// spaces in `target` are kept: " Paris" is one token, "Paris" another.
    ///
    /// # Errors
    /// An empty target, or a target with no tokens.
    pub fn continuation(&self, prompt: &str, target: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        if target.is_empty() {
            return Err(Error::invalid("target", "must not be empty"));
        }
        let p = self.encode(prompt)?;
        if p.is_empty() {
            return Err(Error::invalid("prompt", "must contain at least one token"));
        }
        let joint = self.encode(&format!("{prompt}{target}"))?;
        let t = if joint.len() > p.len() && joint[..p.len()] == p[..] {
            joint[p.len()..].to_vec()
        } else {
            self.encode(target)?
        };
        if t.is_empty() {
            return Err(Error::invalid(
                "target",
                format!("`{target}` has no tokens"),
            ));
        }
        Ok((p, t))
    }
}
