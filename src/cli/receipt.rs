//! `engram receipt verify RECEIPT --model OUT [--json FILE]`: recompute a removal receipt's
//! hashes and rerun its audit. Exit 0 only when everything matches; 2 when the receipt was
//! modified, is for another model, or its request or reference changed; 3 when the rerun
//! audit differs from the receipt.

use anyhow::Result;
use comfy_table::Table;
use engram::unlearn::receipt::verify;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Check a receipt against the model it names.
    Verify {
        receipt: PathBuf,
        /// The unlearned model the receipt describes.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

pub fn run(a: Args) -> Result<ExitCode> {
    let Cmd::Verify {
        receipt,
        model,
        json,
    } = a.cmd;
    super::check_outputs(&[("--json", json.as_deref())], &[&receipt])?;
    let v = verify(&receipt, &model, &super::device()?)?;
    let mut t = Table::new();
    t.set_header(vec!["check", "result"]);
    for (name, ok) in &v.checks {
        t.add_row(vec![
            name.clone(),
            if *ok { "ok" } else { "MISMATCH" }.to_string(),
        ]);
    }
    println!("{t}");
    println!(
        "{}",
        if v.ok {
            "receipt verified: hashes match and the audit reproduces"
        } else {
            "receipt NOT verified"
        }
    );
    if let Some(j) = &json {
        // Only the checks: the rerun audit may hold the secrets' values.
        super::write_json(j, &v.checks)?;
    }
    Ok(if v.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::audit::LEAKS)
    })
}
