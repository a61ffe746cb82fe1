//! Bad input through the CLI: a clear message naming the file or flag, exit code 2, no panic.

use crate::common::fixture;
use std::path::Path;

/// Run the binary; returns the exit code and stderr (and fails on a panic).
pub fn engram(args: &[&str]) -> (i32, String) {
    let out = crate::common::engram().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

fn inspect(model: &Path) -> (i32, String) {
    engram(&["inspect", "--model", model.to_str().unwrap()])
}

fn llama_dir_with(config: &str, weights: Option<&[u8]>) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), config).unwrap();
    let w = weights
        .map(|w| w.to_vec())
        .unwrap_or_else(|| std::fs::read(fixture("tiny-llama").join("model.safetensors")).unwrap());
    std::fs::write(d.path().join("model.safetensors"), w).unwrap();
    d
}

fn tiny_config() -> String {
    std::fs::read_to_string(fixture("tiny-llama").join("config.json")).unwrap()
}

#[test]
fn missing_file() {
    let (code, err) = inspect(Path::new("/nonexistent/model.gguf"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("/nonexistent/model.gguf") && err.contains("smollm2-135m"),
        "{err}"
    );
}

#[test]
fn truncated_safetensors() {
    let full = std::fs::read(fixture("tiny-llama").join("model.safetensors")).unwrap();
    let d = llama_dir_with(&tiny_config(), Some(&full[..full.len() / 2]));
    let (code, err) = inspect(d.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn safetensors_header_longer_than_file() {
    let mut bytes = (1_000_000u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let d = llama_dir_with(&tiny_config(), Some(&bytes));
    let (code, err) = inspect(d.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn gguf_with_impossible_counts() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.gguf");
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 40).to_le_bytes());
    b.extend_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, b).unwrap();
    let (code, err) = inspect(&p);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("bad.gguf"), "{err}");
}

#[test]
fn unknown_architecture() {
    let d = llama_dir_with(r#"{"model_type": "bert", "hidden_size": 32}"#, None);
    let (code, err) = inspect(d.path());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("config.json") && err.contains("bert") && err.contains("llama"),
        "{err}"
    );
}

#[test]
fn config_missing_fields() {
    let d = llama_dir_with(r#"{"model_type": "llama", "hidden_size": 32}"#, None);
    let (code, err) = inspect(d.path());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("config.json") && err.contains("num_attention_heads"),
        "{err}"
    );
}

#[test]
fn layer_out_of_range() {
    let p = fixture("tiny-llama");
    let (code, err) = engram(&["inspect", "--model", p.to_str().unwrap(), "--layer", "99"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("layer 99") && err.contains("2 layers"),
        "{err}"
    );
}

#[test]
fn bad_flag_value() {
    let p = fixture("tiny-llama");
    let (code, err) = engram(&[
        "generate",
        "--model",
        p.to_str().unwrap(),
        "--prompt",
        "x",
        "--top-p",
        "1.5",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--top-p"), "{err}");
}

#[test]
fn inspect_json_matches_the_model() {
    let d = tempfile::tempdir().unwrap();
    let j = d.path().join("i.json");
    let p = fixture("tiny-gpt2");
    let (code, err) = engram(&[
        "inspect",
        "--model",
        p.to_str().unwrap(),
        "--json",
        j.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(j).unwrap()).unwrap();
    assert_eq!(v["config"]["arch"], "gpt2");
    assert_eq!(v["config"]["n_layers"], 2);
}

#[test]
fn outputs_get_the_umask_mode_not_a_temp_files() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let d = tempfile::tempdir().unwrap();
    let j = d.path().join("i.json");
    let p = fixture("tiny-llama");
    let mut c = crate::common::engram();
    c.args([
        "inspect",
        "--model",
        p.to_str().unwrap(),
        "--json",
        j.to_str().unwrap(),
    ]);
    unsafe {
        c.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    assert!(c.status().unwrap().success());
    let mode = std::fs::metadata(&j).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "{mode:o}");
}

/// An unknown `ENGRAM_WEIGHTS` is refused like an unknown `--weights` (it used to fall back to
/// f32 silently), naming the variable's values.
#[test]
fn unknown_weight_mode_in_the_environment() {
    let inspect_with = |mode: &str| {
        crate::common::engram()
            .env("ENGRAM_WEIGHTS", mode)
            .args([
                "inspect",
                "--model",
                fixture("tiny-llama").to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    let out = inspect_with("q4");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("'q4'") && err.contains("stored-kernel") && err.contains("--weights"),
        "{err}"
    );
    assert_eq!(inspect_with("stored").status.code(), Some(0));
}
