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
    /// Also list one layer's tensors with their shapes and norms.
    #[arg(long)]
    layer: Option<usize>,
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
    /// With `--layer`: that layer's tensors (name, shape, Frobenius norm).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    layer_tensors: Vec<(String, Vec<usize>, f64)>,
}

pub fn run(a: Args) -> Result<()> {
    super::check_outputs(&[("--json", a.json.as_deref())], &[])?;
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
    let mut layer_tensors = Vec::new();
    if let Some(l) = a.layer {
        c.check_layer(l)?;
        let prefix = format!("{}.", c.arch.layer_prefix(l));
        for (name, t) in m.weights.iter().filter(|(n, _)| n.starts_with(&prefix)) {
            let norm = t.dense()?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
            layer_tensors.push((name.clone(), t.dims().to_vec(), norm));
        }
    }
    let r = Report {
        model: m.source.spec.clone(),
        path: m.source.path.display().to_string(),
        format: m.source.format.name(),
        config: c.clone(),
        parameters: m.weights.n_params(),
        tensors: m.weights.len(),
        tensor_types: types,
        layer_tensors,
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
    if !r.layer_tensors.is_empty() {
        let mut lt = Table::new();
        lt.set_header(vec!["tensor", "shape", "norm"]);
        for (n, s, norm) in &r.layer_tensors {
            lt.add_row(vec![n.clone(), format!("{s:?}"), format!("{norm:.4}")]);
        }
        println!("{lt}");
    }
    if let Some(p) = a.json {
        super::write_json(&p, &r)?;
    }
    Ok(())
}
