//! Removal receipts: what was done for a removal request, and the evidence, in a file that
//! can be checked later against the model it describes.
//!
//! A receipt holds the SHA-256 of the request, the input model, the reference and the output
//! model; the method, hyper-parameters and seeds; every probe of the audit with its result
//! (secrets appear only by label and salted hash); the per-type and relearning verdicts; the
//! engram version; and the SHA-256 of all of that (`receipt_sha256`), so that an edited
//! receipt is detected. [`verify`] recomputes every hash and reruns the audit.

use super::audit::{audit_model, is_verdict_row, AuditParams, AuditReport};
use super::leakage::redact;
use super::request::Request;
use super::run::{Relearn, UnlearnReport};
use crate::error::{Error, Result};
use crate::model::quant::{parse_types, DeployType};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// A file and its SHA-256 (a directory: over its files' names and bytes, in name order).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHash {
    /// As given (an alias, or a path).
    pub spec: String,
    pub path: PathBuf,
    pub sha256: String,
}

/// SHA-256 of a file, or of a directory's files (name, length, bytes; sorted by name).
///
/// # Errors
/// [`Error::Io`] naming the path.
pub fn hash_path(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return crate::model::fetch::sha256_file(path);
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let mut h = Sha256::new();
    for p in names {
        let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        h.update(p.file_name().unwrap_or_default().as_encoded_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(format!("{:x}", h.finalize()))
}

impl FileHash {
    /// Hash the model or file `spec` names (aliases resolved to their cached file).
    ///
    /// # Errors
    /// [`Error::Io`] for a missing file.
    pub fn of(spec: &str) -> Result<FileHash> {
        let path = crate::model::load::resolve(Some(spec))?;
        Ok(FileHash {
            spec: spec.to_string(),
            sha256: hash_path(&path)?,
            path,
        })
    }
}

/// One probe of the receipt: the prompt, the kind, and what happened (no output text: it
/// may hold the secret).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeLine {
    pub prompt: String,
    pub kind: String,
    pub revealed: bool,
    pub partial: bool,
    pub run: usize,
}

/// One secret's verdict on one audited row.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretLine {
    pub label: String,
    pub leaks: bool,
    pub reasons: Vec<String>,
    pub greedy_leaks: usize,
    pub partial_leaks: usize,
    pub sampled_hits: usize,
    pub samples: usize,
    pub logprob: f64,
    pub baseline_logprob: f64,
    pub rank: f64,
    pub candidates: usize,
    pub probes: Vec<ProbeLine>,
}

/// One audited row (`model`, `model @ q4_1`, `relearned`, ...).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowLine {
    pub name: String,
    pub leaks: bool,
    pub secrets: Vec<SecretLine>,
}

/// A secret as the receipt shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretId {
    pub label: String,
    /// SHA-256 of the salt followed by the secret's value.
    pub salted_sha256: String,
}

/// The hyper-parameters of the run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunParams {
    pub method: serde_json::Value,
    pub layers: Vec<usize>,
    pub steps_budget: usize,
    pub steps_run: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub check_every: usize,
    pub max_perplexity_ratio: f64,
    pub grid: Option<String>,
    pub seed: u64,
    pub stop_reason: String,
}

/// A removal receipt (see the module header).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    pub engram_version: String,
    pub subject: String,
    pub request: FileHash,
    pub input_model: FileHash,
    pub reference: Option<FileHash>,
    pub output_model: FileHash,
    pub params: RunParams,
    pub audit_params: serde_json::Value,
    /// The baseline the verdicts used.
    pub baseline: String,
    pub types: Vec<String>,
    pub salt: String,
    pub secrets: Vec<SecretId>,
    pub rows: Vec<RowLine>,
    pub relearn: Option<serde_json::Value>,
    /// True when the output model leaks at no audited type.
    pub clean: bool,
    /// SHA-256 of this receipt's JSON with this field empty.
    pub receipt_sha256: String,
}

fn salted(salt: &str, value: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update(value.as_bytes());
    format!("{:x}", h.finalize())
}

/// The audit's rows as receipt lines (redacted: no output text, values replaced).
pub fn rows(a: &AuditReport, req: &Request) -> Vec<RowLine> {
    a.rows
        .iter()
        .filter(|r| r.name != "reference")
        .map(|r| RowLine {
            name: r.name.clone(),
            leaks: r.leaks,
            secrets: r
                .secrets
                .iter()
                .map(|s| SecretLine {
                    label: s.label.clone(),
                    leaks: s.leaks,
                    reasons: s.reasons.iter().map(|x| redact(x, &req.secrets)).collect(),
                    greedy_leaks: s.greedy_leaks,
                    partial_leaks: s.partial_leaks,
                    sampled_hits: s.sampled_hits,
                    samples: s.samples,
                    logprob: s.logprob,
                    baseline_logprob: s.baseline_logprob,
                    rank: s.rank,
                    candidates: s.candidates,
                    probes: s
                        .probes
                        .iter()
                        .map(|p| ProbeLine {
                            prompt: redact(&p.prompt, &req.secrets),
                            kind: p.kind.to_string(),
                            revealed: p.revealed,
                            partial: p.partial,
                            run: p.run,
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect()
}

impl Receipt {
    /// The receipt of an unlearning run whose model goes to `output` and was written (staged)
    /// at `written`.
    ///
    /// # Errors
    /// A file that cannot be read for hashing.
    pub fn new(
        req: &Request,
        req_path: &Path,
        input: &str,
        reference: Option<&str>,
        (output, written): (&Path, &Path),
        report: &UnlearnReport,
    ) -> Result<Receipt> {
        let salt: [u8; 16] = rand::random();
        let salt: String = salt.iter().map(|b| format!("{b:02x}")).collect();
        let mut r = Receipt {
            engram_version: env!("CARGO_PKG_VERSION").to_string(),
            subject: req.subject.clone(),
            request: FileHash {
                spec: req_path.display().to_string(),
                path: req_path.to_path_buf(),
                sha256: hash_path(req_path)?,
            },
            input_model: FileHash::of(input)?,
            reference: reference.map(FileHash::of).transpose()?,
            output_model: FileHash {
                spec: output.display().to_string(),
                path: output.to_path_buf(),
                sha256: hash_path(written)?,
            },
            params: RunParams {
                method: serde_json::to_value(&report.method).unwrap_or_default(),
                layers: report.layers.clone(),
                steps_budget: req.steps,
                steps_run: report.steps,
                lr: req.lr,
                batch_size: req.batch_size,
                check_every: req.check_every,
                max_perplexity_ratio: req.max_perplexity_ratio,
                grid: report.grid.clone(),
                seed: req.seed,
                stop_reason: report.stop_reason.to_string(),
            },
            audit_params: serde_json::to_value(report.audit.params).unwrap_or_default(),
            baseline: report.audit.baseline.clone(),
            types: report.audit.types.clone(),
            secrets: req
                .secrets
                .iter()
                .map(|s| SecretId {
                    label: s.label.clone().unwrap_or_else(|| "secret".into()),
                    salted_sha256: salted(&salt, s.value.trim()),
                })
                .collect(),
            salt,
            rows: rows(&report.audit, req),
            relearn: report
                .relearn
                .as_ref()
                .map(|r: &Relearn| serde_json::to_value(r).unwrap_or_default()),
            clean: !report.audit.leaks,
            receipt_sha256: String::new(),
        };
        r.receipt_sha256 = r.self_hash();
        Ok(r)
    }

    /// SHA-256 of the receipt's JSON with `receipt_sha256` empty.
    pub fn self_hash(&self) -> String {
        let mut c = self.clone();
        c.receipt_sha256 = String::new();
        let text = serde_json::to_string(&c).unwrap_or_default();
        format!("{:x}", Sha256::digest(text.as_bytes()))
    }

    /// Read a receipt.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Spec`] for a file that is not a receipt.
    pub fn load(path: &Path) -> Result<Receipt> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Spec {
            path: path.into(),
            message: format!("not a removal receipt: {e}"),
        })
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verification {
    /// Every check, with whether it held.
    pub checks: Vec<(String, bool)>,
    /// The audit rerun on the model (its `model` and `model @ TYPE` rows).
    pub audit: AuditReport,
    pub ok: bool,
}

/// Check a receipt against a model file: the receipt's own hash, the model's, the request's
/// and the reference's, then rerun the audit and compare every verdict and count with the
/// receipt's (log-probs within 1e-3).
///
/// # Errors
/// [`Error::Patch`]-like bad input (exit 2) when the receipt was modified, is for another
/// model, or its request or reference changed; tensor errors.
pub fn verify(
    receipt_path: &Path,
    model_path: &Path,
    device: &candle_core::Device,
) -> Result<Verification> {
    let r = Receipt::load(receipt_path)?;
    let bad = |reason: String| Error::Spec {
        path: receipt_path.into(),
        message: reason,
    };
    if r.self_hash() != r.receipt_sha256 {
        return Err(bad(
            "the receipt was modified: its contents no longer match its receipt_sha256".into(),
        ));
    }
    let got = hash_path(model_path)?;
    if got != r.output_model.sha256 {
        return Err(bad(format!(
            "the receipt is for another model: {} has SHA-256 {got}, the receipt names {} ({})",
            model_path.display(),
            r.output_model.sha256,
            r.output_model.path.display()
        )));
    }
    let req_hash = hash_path(&r.request.path)?;
    if req_hash != r.request.sha256 {
        return Err(bad(format!(
            "the request {} changed since the receipt was written",
            r.request.path.display()
        )));
    }
    let req = Request::load(&r.request.path)?;
    for (id, s) in r.secrets.iter().zip(&req.secrets) {
        if salted(&r.salt, s.value.trim()) != id.salted_sha256 {
            return Err(bad(format!(
                "secret {:?} does not match its salted hash",
                id.label
            )));
        }
    }
    let reference = match &r.reference {
        Some(f) => {
            let h = FileHash::of(&f.spec)?;
            if h.sha256 != f.sha256 {
                return Err(bad(format!(
                    "the reference {} changed since the receipt was written",
                    f.spec
                )));
            }
            Some((crate::model::load(Some(&f.spec), device)?, f.spec.clone()))
        }
        None => None,
    };
    let types: Vec<DeployType> = if r.types.is_empty() {
        vec![]
    } else {
        parse_types(&r.types.join(","), "types")?
    };
    let params: AuditParams = serde_json::from_value(r.audit_params.clone())
        .map_err(|e| bad(format!("audit_params: {e}")))?;
    let model = crate::model::load(Some(&model_path.to_string_lossy()), device)?;
    let audit = audit_model(
        &model,
        reference.as_ref().map(|(m, n)| (m, n.as_str())),
        &req,
        &types,
        &[],
        &params,
    )?;
    let mut checks = vec![
        ("receipt hash".to_string(), true),
        ("output model hash".to_string(), true),
        ("request hash".to_string(), true),
        ("salted secret hashes".to_string(), true),
    ];
    if r.reference.is_some() {
        checks.push(("reference hash".to_string(), true));
    }
    let now = rows(&audit, &req);
    for old in r.rows.iter().filter(|x| is_verdict_row(&x.name)) {
        let same = now.iter().find(|x| x.name == old.name).is_some_and(|x| {
            x.leaks == old.leaks
                && x.secrets.len() == old.secrets.len()
                && x.secrets.iter().zip(&old.secrets).all(|(a, b)| {
                    a.leaks == b.leaks
                        && a.greedy_leaks == b.greedy_leaks
                        && a.partial_leaks == b.partial_leaks
                        && a.sampled_hits == b.sampled_hits
                        && (a.logprob - b.logprob).abs() < 1e-3
                        && a.probes == b.probes
                })
        });
        checks.push((format!("audit row `{}` reproduces", old.name), same));
    }
    let ok = checks.iter().all(|(_, c)| *c);
    Ok(Verification { checks, audit, ok })
}
