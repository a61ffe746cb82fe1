//! Shared helpers: fixture paths, the real model (loaded once per test binary).

use candle_core::{Device, Tensor};
use engram::model::Model;
use std::path::PathBuf;
use std::sync::OnceLock;

/// CounterFact's dev split in the developers' data, beside the repository.
pub const CF_DEV: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/counterfact/dev-2000.jsonl"
);

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// Where the tests cache key statistics (never the user's `~/.cache/engram`): shared by
/// every test of a run and kept between runs under `target/`.
pub const TEST_STATS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-stats");

/// Point this process (and the commands it starts) at [`TEST_STATS`]. Called by every helper
/// that yields a model, before any key statistics can be computed in-process.
pub fn isolate_stats() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("ENGRAM_STATS_DIR", TEST_STATS));
}

/// The engram binary as a command, caching key statistics in [`TEST_STATS`].
pub fn engram() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_engram"));
    c.env("ENGRAM_STATS_DIR", TEST_STATS);
    c
}

pub fn tiny(name: &str) -> Model {
    isolate_stats();
    engram::model::load(Some(fixture(name).to_str().unwrap()), &Device::Cpu).unwrap()
}

/// smollm2-135m, dequantized to f32, shared by every test in this binary.
pub fn real() -> &'static Model {
    isolate_stats();
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| engram::model::load(None, &Device::Cpu).expect("load smollm2-135m"))
}

/// The largest absolute value of a tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

pub fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A `[b, t, d]` tensor from nested JSON arrays.
pub fn tensor3(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<Vec<f32>>> = serde_json::from_value(v.clone()).unwrap();
    let (b, t, d) = (rows.len(), rows[0].len(), rows[0][0].len());
    let flat: Vec<f32> = rows.into_iter().flatten().flatten().collect();
    Tensor::from_vec(flat, (b, t, d), &Device::Cpu).unwrap()
}

/// A ROME editor for smollm2-135m at layer 5 with the default (cached) key statistics,
/// prepared once per test binary.
pub fn rome_editor() -> &'static std::sync::Mutex<engram::edit::run::Editor> {
    static E: OnceLock<std::sync::Mutex<engram::edit::run::Editor>> = OnceLock::new();
    E.get_or_init(|| {
        let params = engram::edit::rome::RomeParams {
            layer: Some(5),
            ..Default::default()
        };
        let mut e =
            engram::edit::run::Editor::new(real(), engram::edit::spec::Method::Rome(params))
                .unwrap();
        e.prepare(real(), &mut |_, _| {}).unwrap();
        std::sync::Mutex::new(e)
    })
}

/// Greedy continuation text.
pub fn greedy(m: &Model, prompt: &str, n: usize) -> String {
    let tok = m.tok().unwrap();
    let ids = tok.encode(prompt).unwrap();
    let p = engram::model::generate::GenParams {
        max_new_tokens: n,
        ..Default::default()
    };
    tok.decode(&engram::model::generate::generate(m, &[ids], &p).unwrap()[0])
        .unwrap()
}
