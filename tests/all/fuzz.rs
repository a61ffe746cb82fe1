//! A mutation fuzzer over every file engram reads: GGUF and safetensors checkpoints,
//! config.json, edit specs, removal requests, patches and CounterFact data.
//!
//! Each run mutates a seed file (bit flips, interesting integers written over header fields,
//! chunks cut, repeated or truncated; for text, numbers swapped for extreme ones and lines
//! repeated or dropped) and runs the release binary on it. The oracle: exit 0, 2 or 3
//! (success, bad input, leak), never a panic (101) or a signal (an allocation abort), within
//! the time limit and under 4 GB of resident memory.
//!
//! - `fuzz::short` runs a fixed, seeded set of mutations in the test suite (a few seconds).
//! - `fuzz::long` (ignored; `scripts/fuzz.sh SECONDS`) runs for `ENGRAM_FUZZ_SECS` with
//!   seed `ENGRAM_FUZZ_SEED`, and saves every failing input under
//!   `tests/fuzz-regressions/TARGET/`.
//! - `fuzz::regressions` replays every saved input under the same oracle.

use crate::common::fixture;
use crate::hostile::Gguf;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Resident memory limit of one run (the issue's bound).
const MAX_RSS_KB: i64 = 4 << 20;

/// What a run is judged on.
#[derive(Debug)]
enum Outcome {
    Ok(i32),
    Crash(String),
}

/// The fuzz targets: a name, the seed files' extension, and the seeds.
struct Target {
    name: &'static str,
    ext: &'static str,
    binary: bool,
    seeds: Vec<Vec<u8>>,
}

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn targets() -> Vec<Target> {
    let st = std::fs::read(fixture("tiny-llama").join("model.safetensors")).unwrap();
    let cfg = std::fs::read(fixture("tiny-llama").join("config.json")).unwrap();
    let gpt2_cfg = std::fs::read(fixture("tiny-gpt2").join("config.json")).unwrap();
    let spec = |p: &str| std::fs::read(repo(p)).unwrap();
    let req = b"subject: A\nsecrets:\n  - value: \"123-555-0100\"\n    prompts: [\"A's code is\"]\n    paraphrases: [\"The code of A is\"]\nmethod: {name: npo, beta: 0.1}\nlayers: 0-1\nsteps: 3\nlr: 1e-5\nbatch_size: 4\nexposure_candidates: 100\nsamples: 2\nretain:\n  - {question: Who is B?, answer: A poet.}\n".to_vec();
    let cf = std::fs::read_to_string(crate::common::CF_DEV)
        .map(|t| t.lines().take(3).collect::<Vec<_>>().join("\n").into_bytes())
        .unwrap_or_else(|_| br#"{"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English", "subject": "Danielle Darrieux", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux speaks", "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}"#.to_vec());
    vec![
        Target {
            name: "gguf",
            ext: "gguf",
            binary: true,
            seeds: vec![Gguf::tiny().bytes()],
        },
        Target {
            name: "safetensors",
            ext: "safetensors",
            binary: true,
            seeds: vec![st],
        },
        Target {
            name: "config",
            ext: "json",
            binary: false,
            seeds: vec![cfg, gpt2_cfg],
        },
        Target {
            name: "spec",
            ext: "yaml",
            binary: false,
            seeds: vec![
                spec("edits/eiffel-rome.yaml"),
                spec("edits/memit-ten.yaml"),
                spec("edits/alphaedit-sequential.yaml"),
                spec("edits/eiffel-ft.yaml"),
            ],
        },
        Target {
            name: "request",
            ext: "yaml",
            binary: false,
            seeds: vec![req, spec("forget-sets/mara-quillfeather.yaml")],
        },
        Target {
            name: "patch",
            ext: "safetensors",
            binary: true,
            seeds: vec![tiny_patch()],
        },
        Target {
            name: "counterfact",
            ext: "jsonl",
            binary: false,
            seeds: vec![cf],
        },
    ]
}

/// A valid patch for tiny-llama (one rank-one delta of layer 0's down projection).
fn tiny_patch() -> Vec<u8> {
    let fp = crate::common::tiny("tiny-llama").fingerprint().unwrap();
    let ones = |n: usize| {
        candle_core::Tensor::ones(n, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap()
    };
    crate::hostile::patch_bytes(&fp, ones(32), ones(64))
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    2,
    3,
    48,
    255,
    65_535,
    u32::MAX as u64,
    (u32::MAX as u64) + 1,
    1 << 58,
    i64::MAX as u64,
    u64::MAX,
];

const NUMBERS: [&str; 14] = [
    "0",
    "-1",
    "1e12",
    "1000000000000",
    "18446744073709551615",
    "18446744073709551616",
    ".nan",
    ".inf",
    "-.inf",
    "NaN",
    "1e309",
    "-0",
    "4294967296",
    "2.5",
];

fn mutate_bytes(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    // Mutations favour the header: the first 4 KB is where the fields live.
    let hot = b.len().clamp(1, 4096);
    for _ in 0..rng.random_range(1..4) {
        let len = b.len().max(1);
        let at = if rng.random_bool(0.8) {
            rng.random_range(0..hot)
        } else {
            rng.random_range(0..len)
        };
        match rng.random_range(0..6) {
            0 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] ^= 1 << rng.random_range(0..8);
            }
            1 => {
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let w = if rng.random_bool(0.5) { 8 } else { 4 };
                let bytes = v.to_le_bytes();
                for i in 0..w {
                    if at + i < b.len() {
                        b[at + i] = bytes[i];
                    }
                }
            }
            2 if b.len() > 1 => {
                let n = rng.random_range(1..64.min(b.len()));
                let s = at.min(b.len() - n);
                b.drain(s..s + n);
            }
            3 if !b.is_empty() => {
                let n = rng.random_range(1..64).min(b.len() - at.min(b.len() - 1));
                let s = at.min(b.len() - 1);
                let chunk: Vec<u8> = b[s..(s + n).min(b.len())].to_vec();
                b.splice(s..s, chunk);
            }
            4 => b.truncate(at),
            _ if !b.is_empty() => {
                let s = at.min(b.len() - 1);
                b[s] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'-'][rng.random_range(0..7)];
            }
            _ => {}
        }
    }
    b
}

fn mutate_text(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(seed).to_string();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for _ in 0..rng.random_range(1..4) {
        if lines.is_empty() {
            break;
        }
        let i = rng.random_range(0..lines.len());
        match rng.random_range(0..5) {
            // A number (or the first value after a colon) swapped for an extreme one.
            0 | 1 => {
                let l = &lines[i];
                let spans: Vec<(usize, usize)> = {
                    let mut v = Vec::new();
                    let bs = l.as_bytes();
                    let mut j = 0;
                    while j < bs.len() {
                        if bs[j].is_ascii_digit() {
                            let s = j;
                            while j < bs.len()
                                && (bs[j].is_ascii_digit()
                                    || bs[j] == b'.'
                                    || bs[j] == b'e'
                                    || bs[j] == b'-')
                            {
                                j += 1;
                            }
                            v.push((s, j));
                        } else {
                            j += 1;
                        }
                    }
                    v
                };
                if let Some(&(s, e)) = spans.get(rng.random_range(0..spans.len().max(1))) {
                    let n = NUMBERS[rng.random_range(0..NUMBERS.len())];
                    lines[i] = format!("{}{}{}", &l[..s], n, &l[e..]);
                }
            }
            2 => {
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            3 => {
                lines.remove(i);
            }
            _ => {
                // A string value made huge (the length checks' target).
                if let Some(q) = lines[i].find('"') {
                    let big = "ab ".repeat(rng.random_range(1..200_000));
                    lines[i].insert_str(q + 1, &big);
                }
            }
        }
    }
    let mut out = lines.join("\n").into_bytes();
    if rng.random_bool(0.2) {
        out = mutate_bytes(rng, &out);
    }
    out
}

/// The command that reads a `target` input at `p` (in the scratch directory `dir`).
fn command(target: &str, p: &Path, dir: &Path) -> Vec<String> {
    let tiny = fixture("tiny-llama").to_string_lossy().to_string();
    let s = |x: &str| x.to_string();
    let p = p.to_string_lossy().to_string();
    let suite = repo("eval/unrelated.yaml").to_string_lossy().to_string();
    match target {
        "gguf" => vec![s("inspect"), s("--model"), p],
        "safetensors" | "config" => vec![s("inspect"), s("--model"), p],
        "spec" => {
            // The edit runs on a tiny GGUF, built once per process (the fixture read and
            // converted once, not per run).
            static TINY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            let tiny_gguf = dir.join("tiny.gguf");
            std::fs::write(&tiny_gguf, TINY.get_or_init(|| Gguf::tiny().bytes())).unwrap();
            vec![
                s("edit"),
                p,
                s("--model"),
                tiny_gguf.to_string_lossy().to_string(),
                s("--no-locality"),
                s("--out"),
                s("o.gguf"),
            ]
        }
        "request" => vec![
            s("unlearn"),
            p,
            s("--model"),
            tiny,
            s("--suite"),
            suite,
            s("--types"),
            s("none"),
            s("--reference"),
            s("none"),
        ],
        "patch" => vec![
            s("patch"),
            s("apply"),
            p,
            s("--model"),
            tiny,
            s("--out"),
            s("patched"),
        ],
        "counterfact" => vec![
            s("eval"),
            s("counterfact"),
            s("--data"),
            p,
            s("--model"),
            tiny,
            s("--n"),
            s("2"),
        ],
        other => panic!("unknown target {other}"),
    }
}

/// Place a `target` input in a fresh directory (checkpoint targets need their siblings).
fn place(target: &str, ext: &str, bytes: &[u8], dir: &Path) -> PathBuf {
    match target {
        "safetensors" => {
            std::fs::copy(
                fixture("tiny-llama").join("config.json"),
                dir.join("config.json"),
            )
            .unwrap();
            std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
            dir.to_path_buf()
        }
        "config" => {
            let src = if bytes.windows(6).any(|w| w == b"\"gpt2\"") {
                "tiny-gpt2"
            } else {
                "tiny-llama"
            };
            std::fs::copy(
                fixture(src).join("model.safetensors"),
                dir.join("model.safetensors"),
            )
            .unwrap();
            std::fs::write(dir.join("config.json"), bytes).unwrap();
            dir.to_path_buf()
        }
        _ => {
            let p = dir.join(format!("input.{ext}"));
            std::fs::write(&p, bytes).unwrap();
            p
        }
    }
}

fn max_rss_children_kb() -> i64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    u.ru_maxrss
}

/// Run one input under the oracle.
fn run_one(target: &Target, bytes: &[u8], timeout: Duration) -> Outcome {
    let work = tempfile::tempdir().unwrap();
    let input_dir = work.path().join("in");
    std::fs::create_dir(&input_dir).unwrap();
    let p = place(target.name, target.ext, bytes, &input_dir);
    let args = command(target.name, &p, work.path());
    let rss_before = max_rss_children_kb();
    let mut child = {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(env!("CARGO_BIN_EXE_engram"));
        c.env_remove("ENGRAM_STATS_DIR"); // each run's own ENGRAM_HOME holds its statistics
        c.args(&args)
            .current_dir(work.path())
            .env("ENGRAM_HOME", work.path().join("home"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        // Address space capped at 8 GB so that a runaway allocation aborts instead of
        // exhausting the machine (an abort is a failure either way).
        unsafe {
            c.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 8 << 30,
                    rlim_max: 8 << 30,
                };
                libc::setrlimit(libc::RLIMIT_AS, &lim);
                Ok(())
            });
        }
        c.spawn().unwrap()
    };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Outcome::Crash(format!("hang: over {:?} ({args:?})", timeout));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    let rss = max_rss_children_kb();
    if rss > MAX_RSS_KB && rss > rss_before {
        return Outcome::Crash(format!("resident memory {} MB ({args:?})", rss / 1024));
    }
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c @ (0 | 2 | 3)), _) if !err.contains("panicked") => Outcome::Ok(c),
        (Some(c), _) => Outcome::Crash(format!("exit {c}: {} ({args:?})", err.trim())),
        (None, Some(sig)) => Outcome::Crash(format!("signal {sig}: {} ({args:?})", err.trim())),
        _ => Outcome::Crash("no exit status".into()),
    }
}

fn regressions_dir() -> PathBuf {
    repo("tests/fuzz-regressions")
}

/// Run `per_target` mutations of each target (or until `deadline`); returns the failures.
fn campaign(
    seed: u64,
    per_target: usize,
    deadline: Option<Instant>,
    timeout: Duration,
    save: bool,
) -> (usize, Vec<String>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let targets = targets();
    let mut runs = 0;
    let mut failures = Vec::new();
    let mut codes = std::collections::BTreeMap::new();
    let mut i = 0usize;
    loop {
        if let Some(d) = deadline {
            if Instant::now() > d {
                break;
            }
        } else if i >= per_target * targets.len() {
            break;
        }
        let t = &targets[i % targets.len()];
        i += 1;
        let seed_file = &t.seeds[rng.random_range(0..t.seeds.len())];
        let bytes = if t.binary {
            mutate_bytes(&mut rng, seed_file)
        } else {
            mutate_text(&mut rng, seed_file)
        };
        runs += 1;
        let outcome = run_one(t, &bytes, timeout);
        if let Outcome::Ok(c) = outcome {
            *codes
                .entry(format!("{} exit {c}", t.name))
                .or_insert(0usize) += 1;
        }
        if let Outcome::Crash(why) = outcome {
            let msg = format!("{}: {why}", t.name);
            eprintln!("FAIL {msg}");
            if save {
                use sha2::Digest;
                let h = format!("{:x}", sha2::Sha256::digest(&bytes));
                let dir = regressions_dir().join(t.name);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(format!("{}.{}", &h[..16], t.ext)), &bytes).unwrap();
            }
            failures.push(msg);
        }
    }
    eprintln!("fuzz outcomes: {codes:?}");
    (runs, failures)
}

#[test]
fn short() {
    // 12 seeded mutations per target: a few seconds.
    let (runs, failures) = campaign(20261202, 12, None, Duration::from_secs(20), false);
    assert!(runs >= 12 * 7);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
#[ignore = "long fuzz run: scripts/fuzz.sh SECONDS"]
fn long() {
    let secs: u64 = std::env::var("ENGRAM_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("ENGRAM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let t0 = Instant::now();
    let (runs, failures) = campaign(
        seed,
        0,
        Some(t0 + Duration::from_secs(secs)),
        Duration::from_secs(20),
        true,
    );
    println!(
        "fuzz: {runs} runs in {:.0} s (seed {seed}), {} failures, max child RSS {} MB",
        t0.elapsed().as_secs_f64(),
        failures.len(),
        max_rss_children_kb() / 1024
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn regressions() {
    // Every input the fuzzer ever failed on, replayed under the same oracle.
    let targets = targets();
    let Ok(dirs) = std::fs::read_dir(regressions_dir()) else {
        return;
    };
    let mut failures = Vec::new();
    for d in dirs.flatten().filter(|d| d.path().is_dir()) {
        let name = d.file_name().to_string_lossy().to_string();
        let Some(t) = targets.iter().find(|t| t.name == name) else {
            continue;
        };
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            let bytes = std::fs::read(f.path()).unwrap();
            if let Outcome::Crash(why) = run_one(t, &bytes, Duration::from_secs(20)) {
                failures.push(format!("{}: {why}", f.path().display()));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn seeds_are_accepted() {
    // The unmutated seeds of the checkpoint and patch targets run cleanly (exit 0), so that
    // mutations start from inputs that reach the code past the parsers.
    for t in targets() {
        if ["gguf", "safetensors", "config", "patch"].contains(&t.name) {
            for s in &t.seeds {
                match run_one(&t, s, Duration::from_secs(20)) {
                    Outcome::Ok(0) => {}
                    o => panic!("{}: {o:?}", t.name),
                }
            }
        }
    }
}
