//! `engram inspect [--model M] [--json FILE]`.

use anyhow::Result;
use comfy_table::Table;
use engram::model::Format;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Alias, .gguf file or Hugging Face directory (default: smollm2-135m).
    #[arg(long)]
    model: Option<String>,
    /// Also write the numbers as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct Report {
    model: String,
    path: String,
    format: &'static str,
    config: engram::model::Config,
    parameters: usize,
    tensors: usize,
    /// Count of tensors per stored type (GGUF quantization or safetensors dtype).
    tensor_types: BTreeMap<String, usize>,
}

pub fn run(a: Args) -> Result<()> {
    let m = super::load_model(a.model.as_deref())?;
    let mut types = BTreeMap::new();
    match &m.source.format {
        Format::Gguf { tensors, .. } => {
            for (_, _, t) in tensors {
                *types.entry(format!("{t:?}")).or_insert(0) += 1;
            }
        }
        Format::HfDir { dtypes, .. } => {
            for d in dtypes.values() {
                *types.entry(format!("{d:?}")).or_insert(0) += 1;
            }
        }
    }
    let c = &m.config;
    let r = Report {
        model: m.source.spec.clone(),
        path: m.source.path.display().to_string(),
        format: m.source.format.name(),
        config: c.clone(),
        parameters: m.weights.n_params(),
        tensors: m.weights.len(),
        tensor_types: types,
    };
    let mut t = Table::new();
    t.set_header(vec!["property", "value"]);
    let types = r
        .tensor_types
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    for (k, v) in [
        ("model", r.model.clone()),
        ("path", r.path.clone()),
        ("format", r.format.to_string()),
        ("architecture", c.arch.name().to_string()),
        ("layers", c.n_layers.to_string()),
        ("d_model", c.d_model.to_string()),
        ("d_mlp", c.d_mlp.to_string()),
        (
            "heads (q / kv)",
            format!("{} / {}", c.n_heads, c.n_kv_heads),
        ),
        ("head_dim", c.head_dim.to_string()),
        ("vocab", c.vocab_size.to_string()),
        ("context", c.max_positions.to_string()),
        ("tied embeddings", c.tie_embeddings.to_string()),
        ("parameters", r.parameters.to_string()),
        ("tensors", r.tensors.to_string()),
        ("tensor types", types),
    ] {
        t.add_row(vec![k.to_string(), v]);
    }
    println!("{t}");
    if let Some(p) = a.json {
        super::write_json(&p, &r)?;
    }
    Ok(())
}
