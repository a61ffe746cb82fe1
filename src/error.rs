//! One typed error for the whole library.
//!
//! Variants carry what a caller can act on (the file, the field, the allowed range). The CLI
//! maps [`Error::is_bad_input`] to exit code 2 and everything else to exit code 1.

use std::path::PathBuf;

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in engram.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file that should exist does not, or cannot be read.
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },

    /// A checkpoint file is malformed (truncated, bad header, impossible counts, ...).
    #[error("{path}: not a valid checkpoint: {reason}")]
    BadCheckpoint { path: PathBuf, reason: String },

    /// config.json (or GGUF metadata) lacks a field or holds an impossible value.
    #[error("{path}: field `{field}`: {reason}")]
    BadConfig {
        path: PathBuf,
        field: String,
        reason: String,
    },

    /// The checkpoint's architecture is not one engram can run.
    #[error("{path}: unknown architecture `{found}` (supported: {supported})")]
    UnknownArchitecture {
        path: PathBuf,
        found: String,
        supported: String,
    },

    /// A tensor the architecture needs is absent from the checkpoint.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },

    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },

    /// A layer index outside `0..n_layers`.
    #[error("layer {layer} is out of range: the model has {n_layers} layers (0..={max})", max = n_layers.saturating_sub(1))]
    LayerOutOfRange { layer: usize, n_layers: usize },

    /// A token position outside the sequence.
    #[error("position {position} is out of range for a sequence of {seq_len} tokens")]
    PositionOutOfRange { position: usize, seq_len: usize },

    /// A model alias that engram does not know.
    #[error("unknown model `{name}` (known aliases: {known}; or give a .gguf file or a Hugging Face directory)")]
    UnknownModel { name: String, known: String },

    /// Fetching a model failed (pip missing, checksum mismatch, ...).
    #[error("fetching `{name}`: {reason}")]
    Fetch { name: String, reason: String },

    /// An edit spec or removal request that does not parse or check.
    #[error("{path}: {message}")]
    Spec { path: PathBuf, message: String },

    /// A patch file that does not fit the model it is applied to.
    #[error("{path}: {reason}")]
    Patch { path: PathBuf, reason: String },

    /// A bad value for a user-facing option.
    #[error("{option}: {reason}")]
    InvalidArgument { option: String, reason: String },

    /// The tokenizer failed or is missing.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A computed result holds NaN or Inf and was refused.
    #[error("refusing a result with non-finite values in `{name}`")]
    NonFinite { name: String },

    /// An error from candle (tensor maths).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// True when the error is the user's input (files, flags, specs): exit code 2.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, Error::Candle(_) | Error::Fetch { .. })
    }

    /// A [`Error::BadConfig`] with its field renamed (our name -> the file's); others as is.
    pub fn rename_field(self, rename: impl Fn(&str) -> String) -> Self {
        match self {
            Error::BadConfig {
                path,
                field,
                reason,
            } => Error::BadConfig {
                path,
                field: rename(&field),
                reason,
            },
            e => e,
        }
    }

    /// Shorthand for an [`Error::Io`] from a `std::io::Error`.
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            reason: err.to_string(),
        }
    }

    /// Shorthand for an [`Error::BadCheckpoint`].
    pub fn bad_checkpoint(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Error::BadCheckpoint {
            path: path.into(),
            reason: reason.to_string(),
        }
    }

    /// Shorthand for an [`Error::InvalidArgument`].
    pub fn invalid(option: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            option: option.into(),
            reason: reason.into(),
        }
    }
}
