//! `engram model fetch NAME`, `engram model list`.

use anyhow::Result;
use clap::Subcommand;
use engram::model::fetch;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: ModelCmd,
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Download an aliased model into the cache and check its SHA-256.
    Fetch {
        /// The alias (see `engram model list`).
        name: String,
        /// Fetch again even if cached.
        #[arg(long)]
        force: bool,
    },
    /// List known aliases and whether they are cached.
    List,
    /// Write a GGUF with random weights and the block shapes of a real model, for measuring
    /// memory and time at scale (never quality). It carries the default model's tokenizer.
    Synth {
        /// The shape: llama-3.2-1b, qwen2.5-3b or llama-3.1-8b.
        #[arg(long)]
        like: String,
        /// The file type, as llama.cpp's quantizer names it.
        #[arg(long = "type", value_enum)]
        ty: engram::model::synth::SynthType,
        /// Output GGUF file.
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write what was written (parameters, size, types) as JSON.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
}

pub fn run(a: Args) -> Result<()> {
    match a.cmd {
        ModelCmd::Fetch { name, force } => {
            let al = fetch::alias(&name).ok_or_else(|| engram::Error::UnknownModel {
                name: name.clone(),
                known: fetch::ALIASES
                    .iter()
                    .map(|a| a.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
            let path = if force {
                fetch::fetch(al)?
            } else {
                fetch::ensure(al)?
            };
            let sha = fetch::sha256_file(&path)?;
            println!("{name}: {} (sha256 {sha})", path.display());
        }
        ModelCmd::Synth {
            like,
            ty,
            out,
            seed,
            json,
        } => {
            let shape = engram::model::synth::shape(&like)?;
            if out.is_dir() {
                return Err(engram::Error::invalid(
                    "--out",
                    format!("{} is a directory; give a file name", out.display()),
                )
                .into());
            }
            let tok = fetch::ensure(fetch::alias(fetch::DEFAULT_MODEL).expect("default alias"))?;
            let w = engram::model::synth::write(&shape, ty, seed, &tok, &out)?;
            println!(
                "{}: {} ({}), {:.3}B parameters ({:.3}B with the real vocabulary of {}), {:.2} GB",
                out.display(),
                w.like,
                w.file_type,
                w.n_params as f64 / 1e9,
                w.real_params as f64 / 1e9,
                shape.real_vocab,
                w.file_bytes as f64 / 1e9
            );
            let types: Vec<String> = w.types.iter().map(|(t, n)| format!("{t} x{n}")).collect();
            println!("tensor types: {}", types.join(", "));
            if let Some(j) = json {
                super::write_json(&j, &w)?;
            }
        }
        ModelCmd::List => {
            for al in fetch::ALIASES {
                let p = fetch::cached_path(al);
                let state = if p.exists() { "cached" } else { "not fetched" };
                println!("{}\t{}\t{state}\t{}", al.name, al.description, p.display());
            }
        }
    }
    Ok(())
}
