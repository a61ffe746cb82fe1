//! Reading the files users write and the data files we read: YAML (specs, removal requests)
//! and JSON lines (CounterFact, TOFU, request data), with errors that name the file and the
//! line (and column) at fault.

use crate::error::{Error, Result};
use std::path::Path;

/// serde_yaml's message, with a line and column added where it has none: errors inside the
/// tagged `method` map come from buffered content that has lost its position, so we point
/// at the first occurrence of the offending name instead.
pub fn with_location(e: &serde_yaml::Error, text: &str) -> String {
    let msg = e.to_string();
    if msg.contains(" line ") {
        return msg;
    }
    let name = msg.split('`').nth(1).unwrap_or("");
    if name.is_empty() {
        return msg;
    }
    for (i, line) in text.lines().enumerate() {
        if let Some(col) = line.find(name) {
            return format!("line {} column {}: {msg}", i + 1, col + 1);
        }
    }
    msg
}

/// Deserialize a YAML file's `text`; errors are [`Error::Spec`] with the file and a location
/// ([`with_location`]).
pub fn from_yaml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    serde_yaml::from_str(text).map_err(|e| Error::Spec {
        path: path.into(),
        message: with_location(&e, text),
    })
}

/// Deserialize JSON lines (blank lines skipped); errors are [`Error::Spec`] with the file and
/// the line.
pub fn from_jsonl<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<Vec<T>> {
    Ok(from_jsonl_numbered(path, text)?
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

/// [`from_jsonl`], each record with its 1-based line number.
pub fn from_jsonl_numbered<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<Vec<(usize, T)>> {
    let mut v = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r = serde_json::from_str(line).map_err(|e| Error::Spec {
            path: path.into(),
            message: format!("line {}: {e}", i + 1),
        })?;
        v.push((i + 1, r));
    }
    Ok(v)
}

/// A JSON array or JSON lines (the two ways CounterFact and TOFU are published), each record
/// with its position: the line for JSON lines, the 1-based index in an array.
pub fn from_json_records<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<Vec<(usize, T)>> {
    if !text.trim_start().starts_with('[') {
        return from_jsonl_numbered(path, text);
    }
    let arr: Vec<T> = serde_json::from_str(text).map_err(|e| Error::Spec {
        path: path.into(),
        message: format!("JSON array: {e}"),
    })?;
    Ok(arr
        .into_iter()
        .enumerate()
        .map(|(i, r)| (i + 1, r))
        .collect())
}
