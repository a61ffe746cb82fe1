//! The files one command writes: checked before any work, written to temporary siblings, and
//! renamed into place together at the end, or removed when the command fails.
//!
//! A command declares every output up front ([`Outputs::file`], [`Outputs::model`]). The
//! checks that can fail run then: an output that is an input, two outputs at one path, a file
//! output that is a directory, a directory that cannot be written. The command writes each
//! output to the staged path it got back; [`Outputs::commit`] renames them all. If the command
//! returns early with an error, dropping the [`Outputs`] removes the staged files and any
//! directory it created, so a failed run leaves nothing behind.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

struct Item {
    flag: String,
    path: PathBuf,
    staged: PathBuf,
}

/// The outputs of one command (see the module header).
pub struct Outputs {
    inputs: Vec<PathBuf>,
    items: Vec<Item>,
    /// Directories created for outputs, deepest last, removed again if empty on failure.
    created: Vec<PathBuf>,
    committed: bool,
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b || a.starts_with(&b) && b.is_dir(),
        _ => false,
    }
}

impl Outputs {
    /// Outputs of a command that reads `inputs` (checkpoints, specs, data): none may be
    /// overwritten.
    pub fn new(inputs: &[&Path]) -> Outputs {
        Outputs {
            inputs: inputs.iter().map(|p| p.to_path_buf()).collect(),
            items: Vec::new(),
            created: Vec::new(),
            committed: false,
        }
    }

    /// Declare a file output given by `flag`; returns the staged path to write it to.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `flag`: the path is an input, another output, a
    /// directory, or in a directory that cannot be written.
    pub fn file(&mut self, flag: &str, path: &Path) -> Result<PathBuf> {
        if path.is_dir() {
            return Err(Error::invalid(
                flag,
                format!("{} is a directory; give a file path", path.display()),
            ));
        }
        self.declare(flag, path)
    }

    /// Declare a model output (a `.gguf` file or a Hugging Face directory), which may replace
    /// an earlier output directory of engram's but never an input.
    pub fn model(&mut self, flag: &str, path: &Path, is_dir: bool) -> Result<PathBuf> {
        if is_dir && path.is_file() {
            return Err(Error::invalid(
                flag,
                format!(
                    "{} is a file; a Hugging Face model is written as a directory",
                    path.display()
                ),
            ));
        }
        if !is_dir && path.is_dir() {
            return Err(Error::invalid(
                flag,
                format!(
                    "{} is a directory; a GGUF model is written as a file",
                    path.display()
                ),
            ));
        }
        self.declare(flag, path)
    }

    fn declare(&mut self, flag: &str, path: &Path) -> Result<PathBuf> {
        if path.as_os_str().is_empty() || path.file_name().is_none() {
            return Err(Error::invalid(
                flag,
                format!("`{}` names no file", path.display()),
            ));
        }
        for i in &self.inputs {
            if same_file(path, i) {
                return Err(Error::invalid(
                    flag,
                    format!(
                        "{} is an input of this command ({}); engram never overwrites its inputs",
                        path.display(),
                        i.display()
                    ),
                ));
            }
        }
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        if let Some(other) = self.items.iter().find(|o| abs(&o.path) == abs(path)) {
            return Err(Error::invalid(
                flag,
                format!("{} is also the output of {}", path.display(), other.flag),
            ));
        }
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        self.create_dirs(flag, &parent)?;
        // Writability is tried, not guessed from permission bits.
        tempfile::Builder::new()
            .prefix(".engram-probe-")
            .tempfile_in(&parent)
            .map_err(|e| {
                Error::invalid(flag, format!("cannot write in {}: {e}", parent.display()))
            })?;
        let name = path.file_name().expect("checked").to_string_lossy();
        let staged = parent.join(format!(
            ".engram-tmp-{}-{}-{name}",
            std::process::id(),
            self.items.len()
        ));
        self.items.push(Item {
            flag: flag.to_string(),
            path: path.to_path_buf(),
            staged: staged.clone(),
        });
        Ok(staged)
    }

    fn create_dirs(&mut self, flag: &str, dir: &Path) -> Result<()> {
        let mut missing = Vec::new();
        let mut d = dir.to_path_buf();
        while !d.as_os_str().is_empty() && !d.exists() {
            missing.push(d.clone());
            match d.parent() {
                Some(p) => d = p.to_path_buf(),
                None => break,
            }
        }
        for m in missing.into_iter().rev() {
            std::fs::create_dir(&m)
                .map_err(|e| Error::invalid(flag, format!("cannot create {}: {e}", m.display())))?;
            self.created.push(m);
        }
        Ok(())
    }

    /// Rename every staged output into place. An output that is missing (the command chose
    /// not to write it) is skipped.
    ///
    /// # Errors
    /// [`Error::Io`] if a rename fails; the outputs already moved are moved back.
    pub fn commit(mut self) -> Result<()> {
        let mut done: Vec<(PathBuf, Option<PathBuf>)> = Vec::new();
        for it in &self.items {
            if !it.staged.exists() {
                continue;
            }
            // An existing output directory (an earlier run's) is moved aside first: a
            // directory cannot be renamed over a non-empty one.
            let aside = if it.path.is_dir() {
                let a = it.staged.with_file_name(format!(
                    "{}.old",
                    it.staged.file_name().expect("named").to_string_lossy()
                ));
                std::fs::rename(&it.path, &a).map_err(|e| Error::io(&it.path, e))?;
                Some(a)
            } else {
                None
            };
            match std::fs::rename(&it.staged, &it.path) {
                Ok(()) => done.push((it.path.clone(), aside)),
                Err(e) => {
                    if let Some(a) = &aside {
                        let _ = std::fs::rename(a, &it.path);
                    }
                    for (p, aside) in done.into_iter().rev() {
                        remove(&p);
                        if let Some(a) = aside {
                            let _ = std::fs::rename(a, &p);
                        }
                    }
                    return Err(Error::io(&it.path, e));
                }
            }
        }
        for (_, aside) in done {
            if let Some(a) = aside {
                remove(&a);
            }
        }
        self.committed = true;
        Ok(())
    }
}

fn remove(p: &Path) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for it in &self.items {
            remove(&it.staged);
        }
        for d in self.created.iter().rev() {
            let _ = std::fs::remove_dir(d); // only if empty
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_or_nothing() {
        let d = tempfile::tempdir().unwrap();
        let input = d.path().join("in.gguf");
        std::fs::write(&input, b"x").unwrap();
        let mut o = Outputs::new(&[&input]);
        assert!(o
            .file("out", &input)
            .unwrap_err()
            .to_string()
            .contains("out"));
        assert!(o.file("json", d.path()).is_err());
        let a = o.file("json", &d.path().join("new/sub/a.json")).unwrap();
        assert!(o.file("plot", &d.path().join("new/sub/a.json")).is_err());
        std::fs::write(&a, b"1").unwrap();
        drop(o); // a failure: nothing stays
        assert!(!d.path().join("new").exists());
        let mut o = Outputs::new(&[&input]);
        let a = o.file("json", &d.path().join("a.json")).unwrap();
        let m = o.model("out", &d.path().join("m"), true).unwrap();
        std::fs::write(&a, b"1").unwrap();
        std::fs::create_dir(&m).unwrap();
        std::fs::write(m.join("w"), b"2").unwrap();
        o.commit().unwrap();
        assert_eq!(std::fs::read(d.path().join("a.json")).unwrap(), b"1");
        assert_eq!(std::fs::read(d.path().join("m/w")).unwrap(), b"2");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }
}
