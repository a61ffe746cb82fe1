//! `engram patch show|apply|revert PATCH [--model M] --out PATH`.

use anyhow::Result;
use clap::Subcommand;
use comfy_table::Table;
use engram::edit::patch;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: PatchCmd,
}

#[derive(Subcommand)]
enum PatchCmd {
    /// Print a patch's metadata and deltas.
    Show { patch: PathBuf },
    /// Apply a patch to its base model and save the result.
    Apply {
        patch: PathBuf,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Undo a patch on its edited model (f32 weights), restoring the base bit for bit.
    Revert {
        patch: PathBuf,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(a: Args) -> Result<()> {
    match a.cmd {
        PatchCmd::Show { patch: p } => {
            let pt = patch::read(&p)?;
            println!(
                "method {} | base {}… | edited {}…",
                pt.meta.method,
                patch::short(&pt.meta.base_fingerprint),
                patch::short(&pt.meta.edited_fingerprint)
            );
            let mut t = Table::new();
            t.set_header(vec!["#", "tensor", "layer", "kind", "norm"]);
            for (i, d) in pt.deltas.iter().enumerate() {
                let kind = if matches!(d.kind, engram::edit::DeltaKind::RankOne { .. }) {
                    "rank one"
                } else {
                    "dense"
                };
                t.add_row(vec![
                    i.to_string(),
                    d.name.clone(),
                    d.layer.to_string(),
                    kind.into(),
                    format!("{:.4}", d.norm()?),
                ]);
            }
            println!("{t}");
            println!("spec:\n{}", pt.meta.spec);
        }
        PatchCmd::Apply {
            patch: p,
            model,
            out,
        } => change(&p, model, &out, true)?,
        PatchCmd::Revert {
            patch: p,
            model,
            out,
        } => change(&p, model, &out, false)?,
    }
    Ok(())
}

/// Apply (or revert) a patch on a loaded model and save it in the input's format.
fn change(
    p: &std::path::Path,
    model: Option<String>,
    out: &std::path::Path,
    apply: bool,
) -> Result<()> {
    let pt = patch::read(p)?;
    let model_path = engram::model::load::resolve(model.as_deref())?;
    let mut outs = engram::output::Outputs::new(&[p, &model_path]);
    let out_tmp = outs.model("--out", out, model_path.is_dir())?;
    let mut m = super::load_model(model.as_deref())?;
    if apply {
        patch::apply(&mut m, &pt, p)?;
    } else {
        patch::revert(&mut m, &pt, p)?;
    }
    engram::model::save::save_like_input(&m, &out_tmp)?;
    outs.commit()?;
    let verb = if apply { "applied" } else { "reverted" };
    println!("{verb} {} delta(s) -> {}", pt.deltas.len(), out.display());
    Ok(())
}
