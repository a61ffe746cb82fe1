//! The CounterFact benchmark runner (Meng et al. 2022, section 4.2): every record is edited
//! starting from the unedited model, and efficacy, paraphrase and neighbourhood success are
//! measured before and after, as probability comparisons.
//!
//! Input: EasyEdit's flattened form (prompt, subject, target_new, ground_truth,
//! rephrase_prompt, locality_prompt, locality_ground_truth), or ROME's original
//! `counterfact.json` (requested_rewrite, paraphrase_prompts, neighborhood_prompts).

use crate::edit::auto::{choose_for_rewrites, TypeChoice};
use crate::edit::nas::NormAnchor;
use crate::edit::resume::{self, RunKey};
use crate::edit::run::{Editor, RetentionPoint};
use crate::edit::spec::Method;
use crate::error::{Error, Result};
use crate::eval::generation::GenScores;
use crate::eval::metrics::{
    efficacy, fluency, harmonic_mean, locality, mean_ci95, run_suite, score_rewrites, Locality,
    RewriteScores, Suite,
};
use crate::fact::{Neighbor, Rewrite};
use crate::model::delta::{apply, revert, Applied};
use crate::model::Model;
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// One CounterFact case as a rewrite.
#[derive(Debug, Clone)]
pub struct Case {
    pub case_id: i64,
    pub rewrite: Rewrite,
}

/// Parse one record in either form.
pub fn parse_record(v: &Value, line: usize, path: &Path) -> Result<Case> {
    let bad = |field: &str| Error::Spec {
        path: path.into(),
        message: format!("line {line}: missing or bad field `{field}`"),
    };
    let s = |v: &Value, f: &str| {
        v.get(f)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| bad(f))
    };
    let case_id = v
        .get("case_id")
        .and_then(Value::as_i64)
        .unwrap_or(line as i64);
    if let Some(rr) = v.get("requested_rewrite") {
        let subject = s(rr, "subject")?;
        let prompt = s(rr, "prompt")?.replace("{}", &subject);
        let tn = rr
            .get("target_new")
            .ok_or_else(|| bad("requested_rewrite.target_new"))?;
        let tt = rr
            .get("target_true")
            .ok_or_else(|| bad("requested_rewrite.target_true"))?;
        let list = |f: &str| -> Vec<String> {
            v.get(f)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        return Ok(Case {
            case_id,
            rewrite: Rewrite {
                prompt,
                subject,
                target_new: s(tn, "str")?,
                target_true: Some(s(tt, "str")?),
                paraphrases: list("paraphrase_prompts"),
                neighborhood: list("neighborhood_prompts")
                    .into_iter()
                    .map(|p| Neighbor {
                        prompt: p,
                        answer: None,
                    })
                    .collect(),
            },
        });
    }
    Ok(Case {
        case_id,
        rewrite: Rewrite {
            prompt: s(v, "prompt")?,
            subject: s(v, "subject")?,
            target_new: s(v, "target_new")?,
            target_true: Some(s(v, "ground_truth")?),
            paraphrases: vec![s(v, "rephrase_prompt")?],
            neighborhood: vec![Neighbor {
                prompt: s(v, "locality_prompt")?,
                answer: Some(s(v, "locality_ground_truth")?),
            }],
        },
    })
}

/// Read `n` cases from `offset` (JSONL, or a JSON array).
pub fn load(path: &Path, offset: usize, n: usize) -> Result<Vec<Case>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let values: Vec<(usize, Value)> = crate::data::from_json_records(path, &text)?;
    if n == 0 {
        return Err(Error::invalid("n", "must be at least 1"));
    }
    if values.is_empty() {
        return Err(Error::Spec {
            path: path.into(),
            message: "holds no records".into(),
        });
    }
    if offset >= values.len() {
        return Err(Error::invalid(
            "offset",
            format!(
                "{offset}: {} holds only {} records (allowed: 0 to {})",
                path.display(),
                values.len(),
                values.len() - 1
            ),
        ));
    }
    values
        .into_iter()
        .skip(offset)
        .take(n)
        .map(|(line, v)| {
            let case = parse_record(&v, line, path)?;
            case.rewrite
                .check(&format!("line {line}"))
                .map_err(|b| Error::Spec {
                    path: path.into(),
                    message: b.to_string(),
                })?;
            Ok(case)
        })
        .collect()
}

/// Per-case result (one JSONL row).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CaseRow {
    pub case_id: i64,
    pub pre: Scores,
    pub post: Scores,
    pub edit_seconds: f64,
    pub eval_seconds: f64,
    /// `eval_seconds` split: scoring before the edit, after it (the f32 edit, with `--wild`
    /// its free answers), and re-quantized (with `--out-type auto`, every trial of the choice).
    #[serde(default)]
    pub eval_split: EvalSplit,
    #[serde(default)]
    pub error: Option<String>,
    /// For GGUF input: the post-edit scores with the edited tensors re-quantized to the types
    /// they are written in ([`crate::model::quant::requantize_edited`], or the types [`RunOptions::auto_types`]
    /// chose).
    #[serde(default)]
    pub requant: Option<Scores>,
    /// With [`RunOptions::auto_types`]: the type chosen for each edited tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_types: Option<Vec<TypeChoice>>,
}

/// Seconds of evaluation per case, by phase.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct EvalSplit {
    pub before: f64,
    pub after: f64,
    pub requant: f64,
}

/// What the runner measures beyond ES/PS/NS and their generated forms.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Also score free generation (`wild.rs`) before and after each edit, with the f32 edit.
    pub wild: bool,
    /// For GGUF input, choose each edited tensor's type as `edit --out-type auto` does
    /// ([`crate::edit::auto`]) and take the re-quantized scores at the chosen types; without
    /// it, at the input types.
    pub auto_types: bool,
}

/// ES / PS / NS of one case as plain numbers (for JSONL).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Scores {
    pub es: f64,
    pub ps: f64,
    pub ns: f64,
    pub es_margin: f64,
    pub ps_margin: f64,
    pub ns_margin: f64,
    /// Generation-based scores and the generated texts (absent in rows of older runs).
    #[serde(flatten, default)]
    pub gen: GenScores,
    /// With [`RunOptions::wild`]: the same scores read from free answers to questions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wild: Option<GenScores>,
}

impl From<&RewriteScores> for Scores {
    fn from(s: &RewriteScores) -> Self {
        Scores {
            es: s.es,
            ps: s.ps.unwrap_or(0.0),
            ns: s.ns.unwrap_or(0.0),
            es_margin: s.es_margin,
            ps_margin: s.ps_margin.unwrap_or(0.0),
            ns_margin: s.ns_margin.unwrap_or(0.0),
            gen: s.gen.clone(),
            wild: None,
        }
    }
}

/// Aggregates over cases.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub n: usize,
    pub method: String,
    pub es: f64,
    pub ps: f64,
    pub ns: f64,
    pub score: f64,
    pub es_ci95: f64,
    pub ps_ci95: f64,
    pub ns_ci95: f64,
    pub es_pre: f64,
    pub ps_pre: f64,
    pub ns_pre: f64,
    pub score_pre: f64,
    pub es_margin: f64,
    pub ps_margin: f64,
    pub ns_margin: f64,
    /// Generation-based scores after and before the edit (generation.rs).
    pub gen_es: f64,
    pub gen_ps: f64,
    pub gen_ns: f64,
    pub gen_es_pre: f64,
    pub gen_ps_pre: f64,
    pub gen_ns_pre: f64,
    /// For GGUF input, after re-quantizing the edited tensors (`None` otherwise).
    pub requant_es: Option<f64>,
    pub requant_ps: Option<f64>,
    pub requant_ns: Option<f64>,
    pub requant_gen_es: Option<f64>,
    /// With `--wild`: free-generation scores after and before the edit (`wild.rs`).
    pub wild_es: Option<f64>,
    pub wild_ps: Option<f64>,
    pub wild_ns: Option<f64>,
    pub wild_es_pre: Option<f64>,
    pub wild_ps_pre: Option<f64>,
    pub wild_ns_pre: Option<f64>,
    /// With `--out-type auto`: how many edited tensors got each type, over all cases (or
    /// batches), and the mean file-size cost of a case's choice in bytes.
    pub out_types: Option<std::collections::BTreeMap<String, usize>>,
    pub out_type_extra_bytes_mean: Option<f64>,
    pub edit_seconds_mean: f64,
    pub edit_seconds_median: f64,
    pub eval_seconds_mean: f64,
    /// The mean of each row's [`EvalSplit`].
    pub eval_split_mean: EvalSplit,
    pub failed: usize,
}

/// Summarise rows.
pub fn summarise(rows: &[CaseRow], method: &str) -> Summary {
    let ok: Vec<&CaseRow> = rows.iter().filter(|r| r.error.is_none()).collect();
    let col = |f: &dyn Fn(&CaseRow) -> f64| ok.iter().map(|r| f(r)).collect::<Vec<f64>>();
    let (es, es_ci) = mean_ci95(&col(&|r| r.post.es));
    let (ps, ps_ci) = mean_ci95(&col(&|r| r.post.ps));
    let (ns, ns_ci) = mean_ci95(&col(&|r| r.post.ns));
    let mean = |v: Vec<f64>| mean_ci95(&v).0;
    let (es_pre, ps_pre, ns_pre) = (
        mean(col(&|r| r.pre.es)),
        mean(col(&|r| r.pre.ps)),
        mean(col(&|r| r.pre.ns)),
    );
    let requant: Vec<&Scores> = ok.iter().filter_map(|r| r.requant.as_ref()).collect();
    let rq = |f: &dyn Fn(&Scores) -> f64| {
        (!requant.is_empty()).then(|| mean(requant.iter().map(|q| f(q)).collect()))
    };
    // The mean of `g` over the rows' free-generation scores after (or before) the edit.
    let wild = |after: bool, g: &dyn Fn(&GenScores) -> f64| {
        let v: Vec<f64> = ok
            .iter()
            .filter_map(|r| if after { &r.post } else { &r.pre }.wild.as_ref().map(g))
            .collect();
        (!v.is_empty()).then(|| mean(v))
    };
    let choices: Vec<&Vec<TypeChoice>> = ok.iter().filter_map(|r| r.out_types.as_ref()).collect();
    let out_types = (!choices.is_empty()).then(|| {
        let mut m = std::collections::BTreeMap::new();
        for c in choices.iter().flat_map(|v| v.iter()) {
            *m.entry(c.chosen_type.clone()).or_insert(0) += 1;
        }
        m
    });
    let extra = (!choices.is_empty()).then(|| {
        mean(
            choices
                .iter()
                .map(|v| {
                    v.iter()
                        .map(|c| c.chosen_bytes as f64 - c.input_bytes as f64)
                        .sum()
                })
                .collect(),
        )
    });
    let mut times = col(&|r| r.edit_seconds);
    times.sort_by(f64::total_cmp);
    Summary {
        n: ok.len(),
        method: method.into(),
        es,
        ps,
        ns,
        score: harmonic_mean(&[es, ps, ns]),
        es_ci95: es_ci,
        ps_ci95: ps_ci,
        ns_ci95: ns_ci,
        es_pre,
        ps_pre,
        ns_pre,
        score_pre: harmonic_mean(&[es_pre, ps_pre, ns_pre]),
        es_margin: mean(col(&|r| r.post.es_margin)),
        ps_margin: mean(col(&|r| r.post.ps_margin)),
        ns_margin: mean(col(&|r| r.post.ns_margin)),
        gen_es: mean(col(&|r| r.post.gen.gen_es)),
        gen_ps: mean(col(&|r| r.post.gen.gen_ps.unwrap_or(0.0))),
        gen_ns: mean(col(&|r| r.post.gen.gen_ns.unwrap_or(0.0))),
        gen_es_pre: mean(col(&|r| r.pre.gen.gen_es)),
        gen_ps_pre: mean(col(&|r| r.pre.gen.gen_ps.unwrap_or(0.0))),
        gen_ns_pre: mean(col(&|r| r.pre.gen.gen_ns.unwrap_or(0.0))),
        requant_es: rq(&|q| q.es),
        requant_ps: rq(&|q| q.ps),
        requant_ns: rq(&|q| q.ns),
        requant_gen_es: rq(&|q| q.gen.gen_es),
        wild_es: wild(true, &|g| g.gen_es),
        wild_ps: wild(true, &|g| g.gen_ps.unwrap_or(0.0)),
        wild_ns: wild(true, &|g| g.gen_ns.unwrap_or(0.0)),
        wild_es_pre: wild(false, &|g| g.gen_es),
        wild_ps_pre: wild(false, &|g| g.gen_ps.unwrap_or(0.0)),
        wild_ns_pre: wild(false, &|g| g.gen_ns.unwrap_or(0.0)),
        out_types,
        out_type_extra_bytes_mean: extra,
        edit_seconds_mean: mean(times.clone()),
        edit_seconds_median: times.get(times.len() / 2).copied().unwrap_or(0.0),
        eval_seconds_mean: mean(col(&|r| r.eval_seconds)),
        eval_split_mean: EvalSplit {
            before: mean(col(&|r| r.eval_split.before)),
            after: mean(col(&|r| r.eval_split.after)),
            requant: mean(col(&|r| r.eval_split.requant)),
        },
        failed: rows.len() - ok.len(),
    }
}

/// Run the benchmark, every case (or batch of `batch_size` cases, for MEMIT and AlphaEdit)
/// edited from the unedited model. Rows already in `resume` (by case id) are kept and
/// skipped; new rows are appended to it as they finish. `progress` is called after each case.
pub fn run(
    model: &mut Model,
    method: Method,
    cases: &[Case],
    batch_size: usize,
    opts: RunOptions,
    resume: Option<&Path>,
    progress: &mut dyn FnMut(&CaseRow),
) -> Result<Vec<CaseRow>> {
    let mut rows: Vec<CaseRow> = Vec::new();
    if let Some(p) = resume.filter(|p| p.exists()) {
        let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
        rows = crate::data::from_jsonl(p, &text)?;
    }
    let done: std::collections::HashSet<i64> = rows.iter().map(|r| r.case_id).collect();
    let mut out = match resume {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Error::io(p, e))?,
        ),
        None => None,
    };
    let mut editor = Editor::new(model, method)?;
    editor.prepare(model, &mut |_, _| {})?;
    let todo: Vec<&Case> = cases
        .iter()
        .filter(|c| !done.contains(&c.case_id))
        .collect();
    // The unedited model's scores are taken for 16 cases at a time (their generations decode
    // together), then each case or batch is edited and scored.
    let step = editor.step_size(batch_size);
    let group = step.max(16).div_ceil(step) * step;
    for cases in todo.chunks(group) {
        let t0 = Instant::now();
        let rs: Vec<Rewrite> = cases.iter().map(|c| c.rewrite.clone()).collect();
        let mut pre = score_cases(model, &rs, opts)?.into_iter();
        let pre_s = t0.elapsed().as_secs_f64() / cases.len() as f64;
        for chunk in cases.chunks(step) {
            let chunk_pre: Vec<Scores> = pre.by_ref().take(chunk.len()).collect();
            for row in edit_and_score(model, &mut editor, chunk, chunk_pre, pre_s, opts)? {
                if let Some(f) = out.as_mut() {
                    let line = serde_json::to_string(&row)
                        .map_err(|e| Error::invalid("resume", e.to_string()))?;
                    writeln!(f, "{line}")
                        .map_err(|e| Error::io(resume.unwrap_or(Path::new("-")), e))?;
                }
                progress(&row);
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// The scores of `rs` on `model`, with the free-generation ones when `opts.wild`.
fn score_cases(model: &Model, rs: &[Rewrite], opts: RunOptions) -> Result<Vec<Scores>> {
    with_wild(model, rs, &score_rewrites(model, rs)?, opts)
}

/// `scores` (of `rs` on `model`) as rows, with the free-generation scores when `opts.wild`.
fn with_wild(
    model: &Model,
    rs: &[Rewrite],
    scores: &[RewriteScores],
    opts: RunOptions,
) -> Result<Vec<Scores>> {
    let mut rows: Vec<Scores> = scores.iter().map(Scores::from).collect();
    if opts.wild {
        for (s, w) in rows
            .iter_mut()
            .zip(crate::eval::wild::score_many(model, rs)?)
        {
            s.wild = Some(w);
        }
    }
    Ok(rows)
}

/// Edit one case (ROME, FT-L) or one batch (MEMIT, AlphaEdit) from the current model, score
/// the cases, and revert.
///
/// `pre` holds the cases' scores on the unedited model, taken in `pre_s` seconds per case.
fn edit_and_score(
    model: &mut Model,
    editor: &mut Editor,
    chunk: &[&Case],
    pre: Vec<Scores>,
    pre_s: f64,
    opts: RunOptions,
) -> Result<Vec<CaseRow>> {
    let rs: Vec<Rewrite> = chunk.iter().map(|c| c.rewrite.clone()).collect();
    let t1 = Instant::now();
    let deltas = match editor.compute_step(model, &rs).map(|s| s.deltas) {
        Ok(d) => d,
        Err(e) if e.is_bad_input() => {
            return Ok(chunk
                .iter()
                .zip(pre)
                .map(|(c, p)| CaseRow {
                    case_id: c.case_id,
                    pre: p,
                    post: Scores::default(),
                    edit_seconds: 0.0,
                    eval_seconds: pre_s,
                    eval_split: EvalSplit {
                        before: pre_s,
                        ..Default::default()
                    },
                    error: Some(e.to_string()),
                    requant: None,
                    out_types: None,
                })
                .collect())
        }
        Err(e) => return Err(e),
    };
    let edit_s = t1.elapsed().as_secs_f64() / chunk.len() as f64;
    let mut applied: Vec<Applied> = Vec::new();
    for d in &deltas {
        applied.push(apply(model, d)?);
    }
    let names: Vec<String> = deltas.iter().map(|d| d.name.clone()).collect();
    let scored = score_edited(model, &names, &rs, opts);
    revert(model, &applied)?; // every case (batch) starts from the unedited model
    let e = scored?;
    let per = |s: f64| s / chunk.len() as f64;
    let split = EvalSplit {
        before: pre_s,
        after: per(e.post_s),
        requant: per(e.requant_s),
    };
    Ok(chunk
        .iter()
        .zip(pre)
        .zip(e.post)
        .enumerate()
        .map(|(i, ((c, p), q))| CaseRow {
            case_id: c.case_id,
            pre: p,
            post: q,
            edit_seconds: edit_s,
            eval_seconds: split.before + split.after + split.requant,
            eval_split: split,
            error: None,
            requant: e.requant.as_ref().map(|r| r[i].clone()),
            out_types: e.out_types.clone(),
        })
        .collect())
}

/// What [`score_edited`] measured.
struct Edited {
    post: Vec<Scores>,
    requant: Option<Vec<Scores>>,
    out_types: Option<Vec<TypeChoice>>,
    /// Seconds for `post` and for `requant` (with the type choice).
    post_s: f64,
    requant_s: f64,
}

/// The f32 edit's scores of `rs`, and for GGUF input the scores with the edited tensors
/// `names` as the file would store them: at their input types, or with `opts.auto_types` at
/// the types [`choose_for_rewrites`] picks (returned too). The model is left with the f32 edit.
fn score_edited(
    model: &mut Model,
    names: &[String],
    rs: &[Rewrite],
    opts: RunOptions,
) -> Result<Edited> {
    let t0 = Instant::now();
    let f32_scores = score_rewrites(model, rs)?;
    let post = with_wild(model, rs, &f32_scores, opts)?;
    let post_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let as_scores = |v: Vec<RewriteScores>| v.iter().map(Scores::from).collect::<Vec<_>>();
    let (requant, out_types) =
        if opts.auto_types && crate::model::quant::input_types(model).is_some() {
            let chosen = choose_for_rewrites(model, names, rs, &f32_scores)?;
            // No ladder (every edited tensor stored in f32): the file holds the f32 edit.
            let requant = chosen.scores.unwrap_or(f32_scores);
            (Some(as_scores(requant)), Some(chosen.choices))
        } else {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            (score_requantized(model, &names, rs)?.map(as_scores), None)
        };
    Ok(Edited {
        post,
        requant,
        out_types,
        post_s,
        requant_s: t1.elapsed().as_secs_f64(),
    })
}

/// Score `rewrites` with the edited tensors re-quantized ([`crate::model::quant::requantize_edited`]), then
/// restore the f32 edit. `None` for a model not loaded from GGUF.
fn score_requantized(
    model: &mut Model,
    names: &[&str],
    rewrites: &[Rewrite],
) -> Result<Option<Vec<RewriteScores>>> {
    let Some(saved) = crate::model::quant::requantize_edited(model, names)? else {
        return Ok(None);
    };
    let scores = score_rewrites(model, rewrites);
    revert(model, &saved)?;
    Ok(Some(scores?))
}

/// A sequential run's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SequentialRun {
    /// Per case: before any edit, and on the final model after all batches.
    pub rows: Vec<CaseRow>,
    /// ES of all edits so far, of the earlier batches, of the first 1,000 and of the first
    /// batch, every [`SeqOptions::retention_every`] edits and after the last batch.
    pub retention: Vec<RetentionPoint>,
    /// ES of the first batch after every later batch.
    pub first_batch: Vec<FirstBatchPoint>,
    /// Edits applied when the first batch's ES first fell below 60% (`None`: it never did).
    pub collapse_point: Option<usize>,
    /// ROME's weighted n-gram entropy of greedy generations from the first 20 case prompts,
    /// before and after all edits.
    pub fluency_before: f64,
    pub fluency_after: f64,
    /// KL, top-1 agreement and perplexity on the unrelated-prompt suite against the unedited
    /// model ([`SeqOptions::suite`]).
    pub locality: Option<Locality>,
    /// NAS's reference norm and the rewrites it left out (`alphaedit-nas`).
    pub norm_anchor: Option<NormAnchor>,
    /// Wall time over every invocation of the run (scoring included).
    pub seconds_total: f64,
    /// Wall time of each batch's edit computation.
    pub batch_seconds: Vec<f64>,
    /// After each batch: the Frobenius norm of every edited tensor (in `edited_tensors`
    /// order), the quantity whose growth NAS's paper ties to collapse.
    pub weight_norms: Vec<Vec<f64>>,
    pub edited_tensors: Vec<String>,
    /// The unedited norms of the method's matrices, by name.
    pub base_weight_norms: Vec<(String, f64)>,
    /// Batches already done when this invocation started (from the state file).
    pub resumed_at_batch: usize,
}

/// ES of the first batch after a later batch.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FirstBatchPoint {
    pub edits: usize,
    pub es: f64,
}

/// The first-batch ES below which a sequential run counts as collapsed.
pub const COLLAPSE_ES: f64 = 0.6;

/// A sequential run's options beyond [`RunOptions`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SeqOptions<'a> {
    /// The state file (`resume.rs`): written atomically after each batch; a run that finds
    /// one resumes from it.
    pub state: Option<&'a Path>,
    /// Stop after this many batches in this invocation (the state is saved: run again with
    /// the same state file to go on).
    pub max_batches: Option<usize>,
    /// Measure the ES of all edits so far every this many edits (0: after every batch) and
    /// after the last batch; the first batch's ES is measured after every batch.
    pub retention_every: usize,
    /// The unrelated-prompt suite for the final locality against the unedited model.
    pub suite: Option<&'a Suite>,
}

/// What a sequential run saves in its state file besides the tensors.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct SeqProgress {
    pre: Vec<Scores>,
    pre_seconds: f64,
    fluency_before: f64,
    retention: Vec<RetentionPoint>,
    first_batch: Vec<FirstBatchPoint>,
    batch_seconds: Vec<f64>,
    #[serde(default)]
    weight_norms: Vec<Vec<f64>>,
    /// Wall time of every invocation up to the save.
    seconds: f64,
}

/// What a sequential run reports as it goes.
#[derive(Debug)]
pub enum SeqEvent<'a> {
    /// Scoring every case before any edit (`after: false`) or after the last (`after: true`).
    Scoring { cases: usize, after: bool },
    /// Resuming from a state file after `batches` batches (`edits` edits).
    Resumed { batches: usize, edits: usize },
    /// A batch is applied: `done` of `total` edits so far, the batch's edit seconds, the ES of
    /// the first batch, and the retention when it was measured after this batch.
    Batch {
        done: usize,
        total: usize,
        seconds: f64,
        first_batch_es: Option<f64>,
        retention: Option<&'a RetentionPoint>,
    },
    /// `max_batches` reached: the state is saved after `batches` batches.
    Stopped { batches: usize, edits: usize },
}

/// Sequential editing: batches of `batch_size` cases applied one after another to the same
/// model (ROME and FT-L: one case at a time, retention still measured per batch). The model
/// is left edited. `progress` hears of each phase and each batch. With a state file the run
/// is resumable (`seq.state`); `None` when it stopped at `seq.max_batches` before the end.
///
/// # Errors
/// As the methods; a bad case (e.g. subject not in prompt) fails the run, since later
/// batches depend on it; a state file from a different run.
pub fn run_sequential(
    model: &mut Model,
    method: Method,
    cases: &[Case],
    batch_size: usize,
    opts: RunOptions,
    seq: SeqOptions<'_>,
    progress: &mut dyn FnMut(SeqEvent<'_>),
) -> Result<Option<SequentialRun>> {
    let t_all = Instant::now();
    let bs = batch_size.max(1);
    let mut editor = Editor::new(model, method)?;
    // Everything taken from the unedited model comes before a state is applied.
    editor.prepare(model, &mut |_, _| {})?;
    let base_suite = seq.suite.map(|s| run_suite(model, s)).transpose()?;
    let frobenius = |model: &Model, n: &str| -> Result<f64> {
        let w = model.weights.dense(n)?;
        Ok(w.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64)
    };
    let base_norms = editor
        .method
        .layers()
        .iter()
        .map(|&l| {
            let n = model.weight_name(l, crate::model::Site::MlpOut)?;
            Ok((n.clone(), frobenius(model, &n)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let rewrites: Vec<Rewrite> = cases.iter().map(|c| c.rewrite.clone()).collect();
    let flu_prompts: Vec<String> = rewrites.iter().take(20).map(|r| r.prompt.clone()).collect();
    let key = RunKey::new(
        &editor,
        serde_json::json!({
            "case_ids": cases.iter().map(|c| c.case_id).collect::<Vec<_>>(),
            "batch_size": bs,
            "wild": opts.wild,
        }),
    )?;
    let resumed = match seq.state {
        Some(p) => resume::load::<SeqProgress>(p, model, &mut editor, &key)?,
        None => None,
    };
    let fresh = resumed.is_none();
    let (mut prog, mut edited, start) = match resumed {
        Some(r) => {
            progress(SeqEvent::Resumed {
                batches: r.batches_done,
                edits: (r.batches_done * bs).min(cases.len()),
            });
            (r.progress, r.edited, r.batches_done)
        }
        None => {
            let fluency_before = fluency(model, &flu_prompts)?;
            progress(SeqEvent::Scoring {
                cases: cases.len(),
                after: false,
            });
            let t_pre = Instant::now();
            let pre = score_cases(model, &rewrites, opts)?;
            let prog = SeqProgress {
                pre,
                pre_seconds: t_pre.elapsed().as_secs_f64(),
                fluency_before,
                ..Default::default()
            };
            (prog, Vec::new(), 0)
        }
    };
    // Saved with each state: the wall time of every invocation so far.
    let seconds_before = prog.seconds;
    if fresh {
        if let Some(p) = seq.state {
            prog.seconds = seconds_before + t_all.elapsed().as_secs_f64();
            resume::save(p, model, &editor, &key, 0, &[], &prog)?;
        }
    }
    let n_batches = rewrites.len().div_ceil(bs);
    for (b, chunk) in rewrites.chunks(bs).enumerate().skip(start) {
        if seq.max_batches.is_some_and(|m| b - start >= m) {
            progress(SeqEvent::Stopped {
                batches: b,
                edits: b * bs,
            });
            return Ok(None);
        }
        let t0 = Instant::now();
        // ROME and FT-L take the batch's rewrites one step at a time.
        for step in chunk.chunks(editor.step_size(chunk.len())) {
            for d in &editor.compute_step(model, step)?.deltas {
                apply(model, d)?;
                if !edited.contains(&d.name) {
                    edited.push(d.name.clone());
                }
            }
        }
        crate::release_memory();
        let secs = t0.elapsed().as_secs_f64();
        prog.batch_seconds.push(secs);
        prog.weight_norms.push(
            edited
                .iter()
                .map(|n| frobenius(model, n))
                .collect::<Result<Vec<_>>>()?,
        );
        let done = b * bs + chunk.len();
        let every = seq.retention_every;
        let measure =
            every == 0 || done / every > (done - chunk.len()) / every || b + 1 == n_batches;
        let point = if measure {
            Some(RetentionPoint::measure(
                model,
                &rewrites[..done],
                b * bs,
                bs,
            )?)
        } else {
            None
        };
        let first_es = match &point {
            Some(p) => p.es_first_batch,
            None if b > 0 => {
                let es = efficacy(model, &rewrites[..bs])?;
                Some(es.iter().sum::<f64>() / es.len() as f64)
            }
            None => None,
        };
        if let Some(es) = first_es {
            prog.first_batch.push(FirstBatchPoint { edits: done, es });
        }
        progress(SeqEvent::Batch {
            done,
            total: rewrites.len(),
            seconds: secs,
            first_batch_es: first_es,
            retention: point.as_ref(),
        });
        prog.retention.extend(point);
        if let Some(p) = seq.state {
            prog.seconds = seconds_before + t_all.elapsed().as_secs_f64();
            resume::save(p, model, &editor, &key, b + 1, &edited, &prog)?;
        }
    }
    progress(SeqEvent::Scoring {
        cases: cases.len(),
        after: true,
    });
    let e = score_edited(model, &edited, &rewrites, opts)?;
    let per = |s: f64| s / cases.len().max(1) as f64;
    let split = EvalSplit {
        before: per(prog.pre_seconds),
        after: per(e.post_s),
        requant: per(e.requant_s),
    };
    let fluency_after = fluency(model, &flu_prompts)?;
    let locality = match (seq.suite, &base_suite) {
        (Some(s), Some(b)) => Some(locality(b, &run_suite(model, s)?)?),
        _ => None,
    };
    // Each case's share of its batch's time.
    let edit_s: Vec<f64> = rewrites
        .chunks(bs)
        .zip(&prog.batch_seconds)
        .flat_map(|(c, s)| std::iter::repeat_n(s / c.len() as f64, c.len()))
        .collect();
    let rows = cases
        .iter()
        .zip(prog.pre.iter().zip(&e.post))
        .zip(edit_s)
        .enumerate()
        .map(|(i, ((c, (p, q)), secs))| CaseRow {
            case_id: c.case_id,
            pre: p.clone(),
            post: q.clone(),
            edit_seconds: secs,
            eval_seconds: split.before + split.after + split.requant,
            eval_split: split,
            error: None,
            requant: e.requant.as_ref().map(|r| r[i].clone()),
            out_types: e.out_types.clone(),
        })
        .collect();
    let collapse_point = prog
        .first_batch
        .iter()
        .find(|p| p.es < COLLAPSE_ES)
        .map(|p| p.edits);
    Ok(Some(SequentialRun {
        rows,
        retention: prog.retention,
        first_batch: prog.first_batch,
        collapse_point,
        fluency_before: prog.fluency_before,
        fluency_after,
        locality,
        norm_anchor: editor.norm_anchor().cloned(),
        seconds_total: seconds_before + t_all.elapsed().as_secs_f64(),
        batch_seconds: prog.batch_seconds,
        weight_norms: prog.weight_norms,
        edited_tensors: edited,
        base_weight_norms: base_norms,
        resumed_at_batch: start,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_record_forms() {
        let flat: Value = serde_json::from_str(r#"{"case_id": 7, "prompt": "The mother tongue of X is", "subject": "X", "target_new": "English", "ground_truth": "French", "rephrase_prompt": "X speaks", "locality_prompt": "Y speaks", "locality_ground_truth": "French"}"#).unwrap();
        let c = parse_record(&flat, 1, Path::new("f.jsonl")).unwrap();
        assert_eq!(
            (c.case_id, c.rewrite.target_true.as_deref()),
            (7, Some("French"))
        );
        assert_eq!(c.rewrite.neighborhood[0].answer.as_deref(), Some("French"));
        let rome: Value = serde_json::from_str(r#"{"case_id": 3, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "X", "target_new": {"str": "English"}, "target_true": {"str": "French"}}, "paraphrase_prompts": ["a", "b"], "neighborhood_prompts": ["c"]}"#).unwrap();
        let c = parse_record(&rome, 1, Path::new("f.json")).unwrap();
        assert_eq!(c.rewrite.prompt, "The mother tongue of X is");
        assert_eq!(c.rewrite.paraphrases.len(), 2);
        assert!(c.rewrite.neighborhood[0].answer.is_none());
        let bad: Value = serde_json::from_str(r#"{"prompt": "p"}"#).unwrap();
        assert!(parse_record(&bad, 4, Path::new("f.jsonl"))
            .unwrap_err()
            .to_string()
            .contains("line 4"));
    }
}
