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
