//! `--out-type auto`: the smallest GGUF type for each edited tensor that keeps the edit.
//!
//! A rank-one edit can be smaller than a Q4 grid step: written back in the input's type, the
//! file would not hold it. For each edited tensor, the ladder is its input type, then Q8_0,
//! then F16 (a type is only tried if it is finer than the input's). All edited tensors start
//! at the lowest rung where every score equals the f32 edit's; each is then lowered back one
//! at a time while the scores still hold. Every other tensor is copied byte for byte by the
//! GGUF writer, as always.

use crate::error::Result;
use crate::model::quant::{fake_quant, fitting_type, input_types};
use crate::model::Model;
use candle_core::quantized::GgmlDType;
use std::collections::HashMap;

/// One edited tensor's choice, for reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TypeChoice {
    pub tensor: String,
    pub input_type: String,
    pub chosen_type: String,
    /// Bytes of the tensor at its input type and at the chosen one.
    pub input_bytes: u64,
    pub chosen_bytes: u64,
    #[serde(skip)]
    pub chosen: GgmlDType,
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

/// Pick a type for each edited tensor of `model` (the f32 edit applied) so that `score` of
/// the model as the file would hold it equals `target` (the f32 edit's scores). `score` is
/// called once per trial. Returns the choices; the model is left as it came.
///
/// Tensors not loaded from GGUF, or stored in f32, keep their type.
pub fn choose<S: PartialEq>(
    model: &mut Model,
    names: &[String],
    target: &S,
    score: &mut dyn FnMut(&Model) -> Result<S>,
) -> Result<Vec<TypeChoice>> {
    let types = input_types(model).unwrap_or_default();
    let mut ladders: Vec<(String, Vec<GgmlDType>)> = Vec::new();
    for n in names {
        if ladders.iter().any(|(m, _)| m == n) {
            continue;
        }
        let w = model.weights.get(n)?;
        let Some(&input) = types.get(n) else { continue };
        if w.rank() != 2 || input == GgmlDType::F32 {
            continue;
        }
        let input = fitting_type(input, w.dim(1)?);
        let mut ladder = vec![input];
        for t in [GgmlDType::Q8_0, GgmlDType::F16] {
            if fineness(t) > fineness(input) && fitting_type(t, w.dim(1)?) == t {
                ladder.push(t);
            }
        }
        ladders.push((n.clone(), ladder));
    }
    let originals: HashMap<String, candle_core::Tensor> = ladders
        .iter()
        .map(|(n, _)| Ok((n.clone(), model.weights.get(n)?.clone())))
        .collect::<Result<_>>()?;
    // level[i]: the rung of tensor i.
    let holds = |model: &mut Model,
                 level: &[usize],
                 score: &mut dyn FnMut(&Model) -> Result<S>|
     -> Result<bool> {
        for ((n, ladder), &l) in ladders.iter().zip(level) {
            let t = ladder[l.min(ladder.len() - 1)];
            model.set_tensor(n, fake_quant(&originals[n], t)?)?;
        }
        Ok(score(model)? == *target)
    };
    let top = ladders.iter().map(|(_, l)| l.len()).max().unwrap_or(1);
    let mut level = vec![0; ladders.len()];
    let mut result = Ok(());
    'up: for l in 0..top {
        level.iter_mut().for_each(|x| *x = l);
        match holds(model, &level, score) {
            Ok(true) => break 'up,
            Ok(false) if l + 1 == top => {} // nothing holds: the finest rung is kept
            Ok(false) => {}
            Err(e) => {
                result = Err(e);
                break 'up;
            }
        }
    }
    // Lower each tensor back while the scores hold.
    if result.is_ok() {
        for i in 0..ladders.len() {
            while level[i] > 0 {
                let mut trial = level.clone();
                trial[i] -= 1;
                match holds(model, &trial, score) {
                    Ok(true) => level = trial,
                    Ok(false) => break,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
    }
    for (n, w) in &originals {
        model.set_tensor(n, w.clone())?;
    }
    result?;
    ladders
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
        .collect()
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
        let c = choose(&mut m, std::slice::from_ref(&name), &true, &mut score).unwrap();
        assert_eq!(c.len(), 1);
        c
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
