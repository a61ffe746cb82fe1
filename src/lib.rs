//! engram: locate, edit and unlearn facts in transformer language models, and prove with a
//! report that nothing unrelated moved.
//!
//! The library knows nothing of the command line; `src/main.rs` and `src/cli/` are a thin
//! layer over it. Start with [`model::load`], [`model::Model::forward`] and
//! [`model::Trace`].

pub mod bench;
pub mod edit;
pub mod error;
pub mod eval;
pub mod locate;
pub mod model;
pub mod unlearn;

pub use error::{Error, Result};
