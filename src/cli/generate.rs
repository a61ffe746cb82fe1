//! `engram generate [--model M] --prompt P [--max-new-tokens N] [--temperature T] [--top-p P]
//! [--seed S] [--json FILE]`.

use anyhow::Result;
use engram::model::generate::{generate, GenParams};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: Option<String>,
    /// The text to continue.
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 20)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Keep only the k most likely tokens (0: no limit).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct Report {
    prompt: String,
    prompt_tokens: Vec<u32>,
    new_tokens: Vec<u32>,
    completion: String,
    temperature: f64,
    top_p: f64,
    seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    let params = GenParams {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        stop_at_eos: true,
    };
    params.validate()?;
    super::check_outputs(&[("--json", a.json.as_deref())], &[])?;
    let m = super::load_model(a.model.as_deref())?;
    let tok = m.tok()?;
    let ids = tok.encode(&a.prompt)?;
    let out = generate(&m, std::slice::from_ref(&ids), &params)?;
    let new = out.into_iter().next().unwrap_or_default();
    let completion = tok.decode(&new)?;
    println!("{}{}", a.prompt, completion);
    if let Some(p) = a.json {
        super::write_json(
            &p,
            &Report {
                prompt: a.prompt,
                prompt_tokens: ids,
                new_tokens: new,
                completion,
                temperature: a.temperature,
                top_p: a.top_p,
                seed: a.seed,
            },
        )?;
    }
    Ok(())
}
