//! `engram audit REQUEST --model M [--reference R] [--types q8_0,q4_1] [--json F]
//! [--show-secrets]`: the leakage probes of a removal request, no training. Exit code 0 when
//! no secret leaks from the model at any listed type, 3 when one does, 2 for bad input.

use anyhow::{Context, Result};
use comfy_table::Table;
use engram::model::quant::{parse_types, DeployType};
use engram::unlearn::audit::{audit_model, AuditParams, AuditReport};
use engram::unlearn::leakage::redact;
use engram::unlearn::request::Request;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code when some secret leaks.
pub const LEAKS: u8 = 3;

#[derive(clap::Args)]
pub struct Args {
    /// The removal request (YAML, see forget-sets/).
    request: PathBuf,
    /// The model to audit (default: the request's model, else smollm2-135m).
    #[arg(long)]
    model: Option<String>,
    /// A model that never learned the data; overrides the request's `reference`. Without
    /// either, or with `none`, a calibrated baseline is used.
    #[arg(long)]
    reference: Option<String>,
    /// Also audit the model re-quantized to these types (comma-separated; `none` for no
    /// re-quantized rows).
    #[arg(long, default_value = "q8_0,q4_1,q4_0")]
    types: String,
    /// Print private strings instead of `[REDACTED:label]`.
    #[arg(long)]
    show_secrets: bool,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The verdict table: a row per (model, secret).
pub fn table(r: &AuditReport) -> Table {
    let mut t = Table::new();
    t.set_header(vec![
        "model",
        "secret",
        "greedy leaks",
        "sampled hits",
        "partial (run vs baseline)",
        "log-prob (baseline)",
        "diff ±95%",
        "calibrated rank (level)",
        "raw rank",
        "entropy (baseline)",
        "verdict",
    ]);
    for row in &r.rows {
        for s in &row.secrets {
            t.add_row(vec![
                match &row.same_as {
                    Some(o) => format!("{} (= {o}, same weights)", row.name),
                    None => row.name.clone(),
                },
                s.label.clone(),
                format!("{}/{}", s.greedy_leaks, s.probes.len()),
                format!("{}/{}", s.sampled_hits, s.samples),
                format!(
                    "{} vs {}{}",
                    s.longest_run,
                    s.baseline_longest_run,
                    if s.partial_leaks > 0 {
                        format!(" ({} answers)", s.partial_leaks)
                    } else {
                        String::new()
                    }
                ),
                format!("{:.2} ({:.2})", s.logprob, s.baseline_logprob),
                format!("{:+.2} ±{:.2}", s.logprob_diff, s.logprob_diff_ci95),
                format!(
                    "{:.0} of {} ({:.3})",
                    s.rank,
                    s.candidates + 1,
                    s.rank_level
                ),
                s.raw_rank.to_string(),
                format!("{:.2} ({:.2})", s.entropy, s.baseline_entropy),
                if row.name == "reference" {
                    "(baseline)".to_string()
                } else if !engram::unlearn::audit::is_verdict_row(&row.name) {
                    format!("({})", if s.leaks { "leaks" } else { "passes" })
                } else if s.leaks {
                    "LEAKS".to_string()
                } else {
                    "passes".to_string()
                },
            ]);
        }
    }
    t
}

/// The report as text: the baseline, the table, and why each leak leaks.
pub fn render(r: &AuditReport) -> String {
    let mut out = format!(
        "audit for {:?} against {} ({} candidates, {} samples per prompt, seed {})\n",
        r.subject, r.baseline, r.params.candidates, r.params.samples, r.params.seed
    );
    out.push_str(&format!("{}\n", table(r)));
    for row in &r.rows {
        if row.name == "reference" {
            continue;
        }
        // Context rows (before, relearned) say why too, after the verdict rows.
        for s in &row.secrets {
            for why in &s.reasons {
                out.push_str(&format!("{}: {}: {why}\n", row.name, s.label));
            }
        }
    }
    out.push_str(&format!(
        "{} ({:.1} s)\n",
        if r.leaks {
            "LEAKS: some secret can still be got out"
        } else {
            "no secret leaks at any audited type"
        },
        r.seconds
    ));
    out
}

/// The request's reference, overridden by the flag.
/// `--reference none` asks for the calibrated baseline.
pub fn reference_spec<'a>(flag: Option<&'a str>, req: &'a Request) -> Option<&'a str> {
    match flag {
        Some("none") => None,
        Some(f) => Some(f),
        None => req.reference.as_deref(),
    }
}

/// Load the reference model, naming where it was asked for in the error.
pub fn load_reference(
    spec: &str,
    from_flag: bool,
    request: &std::path::Path,
) -> Result<engram::model::Model> {
    super::load_model(Some(spec)).with_context(|| {
        if from_flag {
            format!("--reference {spec}")
        } else {
            format!("{}: reference: {spec}", request.display())
        }
    })
}

/// Parse `--types` (`none` for no re-quantized rows).
pub fn types(s: &str) -> Result<Vec<DeployType>> {
    if s.trim() == "none" {
        return Ok(vec![]);
    }
    Ok(parse_types(s, "--types")?)
}

pub fn run(a: Args) -> Result<ExitCode> {
    // Everything the user gave is checked before any model is loaded.
    let req = Request::load(&a.request)?;
    let types = types(&a.types)?;
    super::check_outputs(&[("--json", a.json.as_deref())], &[&a.request])?;
    let rspec = reference_spec(a.reference.as_deref(), &req).map(str::to_string);
    let m = super::load_model(a.model.as_deref().or(req.model.as_deref()))?;
    req.check_model(&a.request, &m)?;
    if types.contains(&DeployType::Input) && engram::model::quant::input_types(&m).is_none() {
        return Err(engram::Error::invalid(
            "--types",
            "`input` needs a GGUF model (a safetensors directory has no quantization types)",
        )
        .into());
    }
    let r = match &rspec {
        Some(s) => Some(load_reference(s, a.reference.is_some(), &a.request)?),
        None => None,
    };
    let p = AuditParams::new(req.exposure_candidates, req.samples, req.seed);
    let report = audit_model(&m, r.as_ref().zip(rspec.as_deref()), &req, &types, &[], &p)?;
    let hide = |s: String| {
        if a.show_secrets {
            s
        } else {
            redact(&s, &req.secrets)
        }
    };
    print!("{}", hide(render(&report)));
    if let Some(j) = &a.json {
        super::write_text(j, &hide(serde_json::to_string_pretty(&report)?))?;
    }
    Ok(if report.leaks {
        ExitCode::from(LEAKS)
    } else {
        ExitCode::SUCCESS
    })
}
