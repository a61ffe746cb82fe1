//! Evaluation: the probability of a target continuation (the quantity every metric is built
//! on), and the metrics and reports built from it.

pub mod generation;
pub mod logprob;
pub mod metrics;
pub mod svg;
pub mod wild;

pub use logprob::{target_logprobs, TargetScore};
