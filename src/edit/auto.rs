//! `--out-type auto`: the smallest GGUF type for each edited tensor that keeps the edit.
//!
//! A rank-one edit can be smaller than a Q4 grid step: written back in the input's type, the
//! file would not hold it. For each edited tensor, the ladder is its input type, then Q8_0,
//! then F16 (a type is only tried if it is finer than the input's). All edited tensors start
//! at the lowest rung where every score equals the f32 edit's; each is then lowered back one
//! at a time while the scores still hold. Every other tensor is copied byte for byte by the
//! GGUF writer, as always.

use crate::error::Result;
use crate::eval::metrics::{score_rewrites, RewriteScores};
use crate::fact::Rewrite;
use crate::model::quant::{fake_quant, fitting_type, input_types};
use crate::model::Model;
use candle_core::quantized::GgmlDType;
use std::collections::HashMap;

/// One edited tensor's choice, for reports.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TypeChoice {
    pub tensor: String,
    pub input_type: String,
    pub chosen_type: String,
    /// Bytes of the tensor at its input type and at the chosen one.
    pub input_bytes: u64,
    pub chosen_bytes: u64,
    #[serde(skip, default = "unknown_type")]
    pub chosen: GgmlDType,
}

/// What a [`TypeChoice`] read back from JSON holds in `chosen` (only `chosen_type` is kept).
fn unknown_type() -> GgmlDType {
    GgmlDType::F32
}

/// The choices, and the scores measured with every edited tensor at its chosen type (`None`
/// when no edited tensor has a ladder: not loaded from GGUF, or stored in f32).
#[derive(Debug)]
pub struct Chosen<S> {
    pub choices: Vec<TypeChoice>,
    pub scores: Option<S>,
}

/// Bytes of an `[rows, cols]` tensor stored as `t`.
pub fn tensor_bytes(t: GgmlDType, rows: usize, cols: usize) -> u64 {
    (rows * cols / t.block_size() * t.type_size()) as u64
}

/// A type's place on the ladder: how finely it stores a value (higher is finer).
fn fineness(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 100,
        GgmlDType::F16 | GgmlDType::BF16 => 90,
        GgmlDType::Q8_0 | GgmlDType::Q8_1 | GgmlDType::Q8K => 80,
        GgmlDType::Q6K => 70,
        GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => 60,
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => 50,
        _ => 40,
    }
}

/// Pick a type for each edited tensor of `model` (the f32 edit applied) so that `key` of
/// `score` of the model as the file would hold it equals `target` (the key of the f32 edit's
/// scores). `score` is called once per trial. Returns the choices and the scores at them; the
/// model is left as it came.
///
/// Tensors not loaded from GGUF, or stored in f32, keep their type.
pub fn choose<S, K: PartialEq>(
    model: &mut Model,
    names: &[String],
    target: &K,
    key: &dyn Fn(&S) -> K,
    score: &mut dyn FnMut(&Model) -> Result<S>,
) -> Result<Chosen<S>> {
    let types = input_types(model).unwrap_or_default();
    let mut ladders: Vec<(String, Vec<GgmlDType>)> = Vec::new();
    for n in names {
        if ladders.iter().any(|(m, _)| m == n) {
            continue;
        }
        let w = model.weights.param(n)?;
        let Some(&input) = types.get(n) else { continue };
        if w.rank() != 2 || input == GgmlDType::F32 {
            continue;
        }
        let input = fitting_type(input, w.dims()[1]);
        let mut ladder = vec![input];
        for t in [GgmlDType::Q8_0, GgmlDType::F16] {
            if fineness(t) > fineness(input) && fitting_type(t, w.dims()[1]) == t {
                ladder.push(t);
            }
        }
        ladders.push((n.clone(), ladder));
    }
    let originals: HashMap<String, candle_core::Tensor> = ladders
        .iter()
        .map(|(n, _)| Ok((n.clone(), model.weights.dense(n)?)))
        .collect::<Result<_>>()?;
    if ladders.is_empty() {
        return Ok(Chosen {
            choices: vec![],
            scores: None,
        });
    }
    // level[i]: the rung of tensor i. A trial returns its scores and whether they hold.
    let trial = |model: &mut Model,
                 level: &[usize],
                 score: &mut dyn FnMut(&Model) -> Result<S>|
     -> Result<(S, bool)> {
        for ((n, ladder), &l) in ladders.iter().zip(level) {
            let t = ladder[l.min(ladder.len() - 1)];
            model.set_tensor(n, fake_quant(&originals[n], t)?)?;
        }
        let s = score(model)?;
        let holds = key(&s) == *target;
        Ok((s, holds))
    };
    let top = ladders.iter().map(|(_, l)| l.len()).max().unwrap_or(1);
    let mut level = vec![0; ladders.len()];
    let mut best: Option<S> = None; // the scores at `level`
    let mut result = Ok(());
    for l in 0..top {
        level.iter_mut().for_each(|x| *x = l);
        match trial(model, &level, score) {
            // Nothing holds at the finest rung either: it is kept, with its scores.
            Ok((s, holds)) if holds || l + 1 == top => {
                best = Some(s);
                break;
            }
            Ok(_) => {}
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // Lower each tensor back while the scores hold.
    if result.is_ok() {
        'tensors: for i in 0..ladders.len() {
            while level[i] > 0 {
                let mut lower = level.clone();
                lower[i] -= 1;
                match trial(model, &lower, score) {
                    Ok((s, true)) => {
                        level = lower;
                        best = Some(s);
                    }
                    Ok((_, false)) => break,
                    Err(e) => {
                        result = Err(e);
                        break 'tensors;
                    }
                }
            }
        }
    }
    for (n, w) in &originals {
        model.set_tensor(n, w.clone())?;
    }
    result?;
    let choices = ladders
        .iter()
        .zip(&level)
        .map(|((n, ladder), &l)| {
            let w = &originals[n];
            let (rows, cols) = (w.dim(0)?, w.dim(1)?);
            let chosen = ladder[l.min(ladder.len() - 1)];
            Ok(TypeChoice {
                tensor: n.clone(),
                input_type: format!("{:?}", ladder[0]),
                chosen_type: format!("{chosen:?}"),
                input_bytes: tensor_bytes(ladder[0], rows, cols),
                chosen_bytes: tensor_bytes(chosen, rows, cols),
                chosen,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Chosen {
        choices,
        scores: best,
    })
}

/// What must stay equal for a type to keep an edit: ES, PS, NS and their generated forms.
fn outcome(s: &RewriteScores) -> [f64; 6] {
    [
        s.es,
        s.ps.unwrap_or(-1.0),
        s.ns.unwrap_or(-1.0),
        s.gen.gen_es,
        s.gen.gen_ps.unwrap_or(-1.0),
        s.gen.gen_ns.unwrap_or(-1.0),
    ]
}

/// [`choose`] for an edit of `rewrites` whose f32 scores are `f32_scores`: the types at which
/// every rewrite's outcome ([`outcome`]) equals the f32 edit's, and the scores there.
pub fn choose_for_rewrites(
    model: &mut Model,
    names: &[String],
    rewrites: &[Rewrite],
    f32_scores: &[RewriteScores],
) -> Result<Chosen<Vec<RewriteScores>>> {
    let target: Vec<[f64; 6]> = f32_scores.iter().map(outcome).collect();
    let key = |v: &Vec<RewriteScores>| v.iter().map(outcome).collect::<Vec<_>>();
    let mut score = |m: &Model| score_rewrites(m, rewrites);
    choose(model, names, &target, &key, &mut score)
}

/// The chosen types as the GGUF writer takes them (our tensor name -> type).
pub fn as_map(choices: &[TypeChoice]) -> HashMap<String, GgmlDType> {
    choices
        .iter()
        .map(|c| (c.tensor.clone(), c.chosen))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Format;

    /// tiny-llama, presented as if loaded from a Q8_0 GGUF.
    fn q8_model() -> Model {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");
        let mut m = crate::model::load(Some(dir), &candle_core::Device::Cpu).unwrap();
        let tensors = m
            .weights
            .iter()
            .map(|(n, _)| (n.clone(), n.clone(), GgmlDType::Q8_0))
            .collect();
        m.source.format = Format::Gguf {
            metadata: vec![],
            tensors,
        };
        m
    }

    /// A `[32, 64]` matrix on the Q8_0 grid (each 32-block's first value 1.0, the rest 0.01),
    /// with entry [0, 1] raised by `delta`; the "score" is whether the stored entry moved by
    /// at least half of it.
    fn run(delta: f32) -> Vec<TypeChoice> {
        let mut m = q8_model();
        let name = "model.layers.0.mlp.down_proj.weight".to_string();
        let dev = candle_core::Device::Cpu;
        let v: Vec<f32> = (0..32 * 64)
            .map(|i| if i % 32 == 0 { 1.0 } else { 0.01 })
            .collect();
        let w = candle_core::Tensor::from_vec(v, (32, 64), &dev).unwrap();
        let w = fake_quant(&w, GgmlDType::Q8_0).unwrap();
        let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w1 = v[1];
        v[1] += delta;
        let edited = candle_core::Tensor::from_vec(v, (32, 64), &dev).unwrap();
        m.set_tensor(&name, edited).unwrap();
        let n2 = name.clone();
        let mut score = move |m: &Model| -> Result<bool> {
            let x = m.weights.get(&n2)?.flatten_all()?.to_vec1::<f32>()?[1];
            Ok((x - w1).abs() >= delta.abs() / 2.0)
        };
        let c = choose(
            &mut m,
            std::slice::from_ref(&name),
            &true,
            &|&b| b,
            &mut score,
        )
        .unwrap();
        assert_eq!(c.choices.len(), 1);
        assert_eq!(c.scores, Some(true), "the chosen types keep the edit");
        c.choices
    }

    #[test]
    fn an_edit_below_the_grid_step_gets_a_finer_type() {
        let c = run(1e-4);
        assert_eq!(c[0].input_type, "Q8_0");
        assert_eq!(c[0].chosen_type, "F16", "{c:?}");
        assert!(c[0].chosen_bytes > c[0].input_bytes);
    }

    #[test]
    fn an_edit_above_the_grid_step_keeps_the_input_type() {
        let c = run(0.5);
        assert_eq!(c[0].chosen_type, "Q8_0", "{c:?}");
        assert_eq!(c[0].chosen_bytes, c[0].input_bytes);
    }
}
