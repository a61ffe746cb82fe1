//! The import floors of issue 20 (README "Layout"): each floor imports only those below it.
//! The source is read as text, as the greps read it.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn src(rel: &str) -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let p = root.join(rel);
    let mut files = Vec::new();
    if p.is_dir() {
        sources(&p, &mut files);
    } else {
        files.push(p);
    }
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            (f, text)
        })
        .collect()
}

/// `crate::{name}` paths used in `files`, for each forbidden name.
fn uses(files: &[(PathBuf, String)], forbidden: &[&str]) -> Vec<String> {
    let mut bad = Vec::new();
    for (f, text) in files {
        for (i, line) in text.lines().enumerate() {
            for name in forbidden {
                if line.contains(&format!("crate::{name}")) {
                    bad.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
                }
            }
        }
    }
    bad
}

#[test]
fn each_floor_imports_only_those_below_it() {
    let rules: [(&str, &[&str]); 9] = [
        (
            "model",
            &[
                "edit", "unlearn", "locate", "eval", "bench", "cli", "fact", "data", "stats",
            ],
        ),
        (
            "fact.rs",
            &["edit", "unlearn", "locate", "eval", "bench", "cli"],
        ),
        (
            "data.rs",
            &["edit", "unlearn", "locate", "eval", "bench", "cli"],
        ),
        (
            "stats.rs",
            &["edit", "unlearn", "locate", "eval", "bench", "cli"],
        ),
        (
            "linalg.rs",
            &["edit", "unlearn", "locate", "eval", "bench", "cli"],
        ),
        ("eval", &["edit", "unlearn", "locate", "bench", "cli"]),
        ("edit", &["locate", "unlearn", "bench", "cli"]),
        ("unlearn", &["edit", "locate", "bench", "cli"]),
        ("locate", &["edit", "unlearn", "bench", "cli"]),
    ];
    let mut bad = Vec::new();
    for (dir, forbidden) in rules {
        bad.extend(uses(&src(dir), forbidden));
    }
    assert!(bad.is_empty(), "imports across floors:\n{}", bad.join("\n"));
}

/// Library errors name fields; only the CLI knows flags (`cli::with_flag_names`). The one
/// exception is pip's own arguments in `model::fetch`.
#[test]
fn no_flag_names_below_the_cli() {
    let mut bad = Vec::new();
    for (f, text) in src("") {
        let rel = f.to_string_lossy().replace('\\', "/");
        if rel.contains("/src/cli/") || rel.ends_with("/src/main.rs") {
            continue;
        }
        for (i, line) in text.lines().enumerate() {
            let pip = rel.ends_with("/model/fetch.rs")
                && (line.contains("\"--no-deps\"") || line.contains("\"--quiet\""));
            let flag = line.match_indices("\"--").any(|(k, _)| {
                line[k + 3..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_lowercase())
            });
            if flag && !pip {
                bad.push(format!("{rel}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "flag names in the library:\n{}",
        bad.join("\n")
    );
}
