//! One integration-test binary, tests filed by purpose.
//!
//! Tiny models (fixtures written by `scripts/make_fixtures.py` with Hugging Face transformers)
//! check mechanics and parity; the real smollm2-135m checks the claims.

mod cli_errors;
mod common;
mod edit;
mod eval;
mod floors;
mod fuzz;
mod grid_descent;
mod hostile;
mod lifelong;
mod locate;
mod mass_edit;
mod model_core;
mod parity;
mod real_model;
mod stored;
mod tofu;
mod unlearn;
