//! `engram logprob [--model M] --prompt P --target T [--json FILE]`.

use anyhow::Result;
use comfy_table::Table;
use engram::eval::target_logprobs;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    prompt: String,
    /// The continuation to score, leading space included (" Paris").
    #[arg(long)]
    target: String,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct Report {
    prompt: String,
    target: String,
    mean_logprob: f64,
    /// exp(mean log-prob): the geometric-mean token probability.
    mean_token_prob: f64,
    tokens: Vec<TokenRow>,
}

#[derive(serde::Serialize)]
struct TokenRow {
    id: u32,
    token: String,
    logprob: f64,
}

pub fn run(a: Args) -> Result<()> {
    super::check_outputs(&[("--json", a.json.as_deref())], &[])?;
    let m = super::load_model(a.model.as_deref())?;
    let s = target_logprobs(&m, &[(a.prompt.as_str(), a.target.as_str())])?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no score"))?;
    let tok = m.tok()?;
    let rows: Vec<TokenRow> = s
        .target_tokens
        .iter()
        .zip(&s.token_logprobs)
        .map(|(&id, &lp)| TokenRow {
            id,
            token: tok.decode(&[id]).unwrap_or_default(),
            logprob: lp,
        })
        .collect();
    let mut t = Table::new();
    t.set_header(vec!["token", "id", "log-prob", "prob"]);
    for r in &rows {
        t.add_row(vec![
            format!("{:?}", r.token),
            r.id.to_string(),
            format!("{:.4}", r.logprob),
            format!("{:.4}", r.logprob.exp()),
        ]);
    }
    println!("{t}");
    println!(
        "mean log-prob {:.4} (geometric-mean token prob {:.4}) over {} target tokens",
        s.mean_logprob,
        s.mean_logprob.exp(),
        rows.len()
    );
    if let Some(p) = a.json {
        super::write_json(
            &p,
            &Report {
                prompt: a.prompt,
                target: a.target,
                mean_logprob: s.mean_logprob,
                mean_token_prob: s.mean_logprob.exp(),
                tokens: rows,
            },
        )?;
    }
    Ok(())
}
