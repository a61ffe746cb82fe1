//! Edit: rewrite facts with closed-form weight updates.
//!
//! Compute, then apply: each method's `compute` returns [`WeightDelta`]s and leaves the model
//! untouched; [`apply`] changes the weights and returns what [`revert`] needs to restore them
//! bit for bit.

pub mod alphaedit;
pub mod auto;
pub mod batch;
pub mod ft;
pub mod memit;
pub mod nas;
pub mod patch;
pub mod resume;
pub mod rome;
pub mod run;
pub mod spec;
pub mod vsearch;

pub use crate::model::delta::{apply, revert, Applied, DeltaKind, WeightDelta};
