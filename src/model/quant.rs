//! Deployment types: what a model's matrices become when it is written as a GGUF file of a
//! given type, and the fake-quantization grid that quantization-aware training runs through.
//!
//! - [`DeployType`]: the types `audit --types` and removal requests name (f16, Q8_0, Q4_0,
//!   Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, or `input`: each tensor in the type it was loaded
//!   from).
//! - [`requantize`]: every matrix quantized to a type and back, as llama.cpp would load that
//!   file. Rows that do not fit a K-quant's 256-wide blocks (smollm2's 576 columns) fall back
//!   the way llama.cpp's quantizer does (`llama_tensor_get_type`): Q4_K -> Q5_0,
//!   Q5_K -> Q5_1, Q6_K -> Q8_0. 1-D tensors (norms, biases) stay f32, as in every GGUF type.
//! - [`fake_quant`]: one tensor through its grid, for the straight-through estimator
//!   (Bengio et al. 2013; Jacob et al. 2018, "Quantization and Training of Neural Networks
//!   for Efficient Integer-Arithmetic-Only Inference"): the forward pass sees the quantized
//!   weight, the gradient reaches the latent f32 weight unchanged.

use super::load::Format;
use super::Model;
use crate::error::{Error, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use std::collections::HashMap;

/// A type a model can be deployed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeployType {
    /// Every tensor in the type it was loaded from (GGUF input only).
    Input,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4K,
    Q5K,
    Q6K,
}

/// The names `--types` accepts, in order.
pub const TYPE_NAMES: &str = "input, f16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k";

impl DeployType {
    pub fn parse(s: &str) -> Option<DeployType> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "input" => DeployType::Input,
            "f16" => DeployType::F16,
            "q8_0" => DeployType::Q8_0,
            "q4_0" => DeployType::Q4_0,
            "q4_1" => DeployType::Q4_1,
            "q5_0" => DeployType::Q5_0,
            "q5_1" => DeployType::Q5_1,
            "q4_k" | "q4_k_m" => DeployType::Q4K,
            "q5_k" | "q5_k_m" => DeployType::Q5K,
            "q6_k" => DeployType::Q6K,
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            DeployType::Input => "input",
            DeployType::F16 => "f16",
            DeployType::Q8_0 => "q8_0",
            DeployType::Q4_0 => "q4_0",
            DeployType::Q4_1 => "q4_1",
            DeployType::Q5_0 => "q5_0",
            DeployType::Q5_1 => "q5_1",
            DeployType::Q4K => "q4_k",
            DeployType::Q5K => "q5_k",
            DeployType::Q6K => "q6_k",
        }
    }

    /// The GGML type (`None` for [`DeployType::Input`], which is per tensor).
    pub fn ggml(&self) -> Option<GgmlDType> {
        Some(match self {
            DeployType::Input => return None,
            DeployType::F16 => GgmlDType::F16,
            DeployType::Q8_0 => GgmlDType::Q8_0,
            DeployType::Q4_0 => GgmlDType::Q4_0,
            DeployType::Q4_1 => GgmlDType::Q4_1,
            DeployType::Q5_0 => GgmlDType::Q5_0,
            DeployType::Q5_1 => GgmlDType::Q5_1,
            DeployType::Q4K => GgmlDType::Q4K,
            DeployType::Q5K => GgmlDType::Q5K,
            DeployType::Q6K => GgmlDType::Q6K,
        })
    }
}

/// Parse a comma-separated type list (`q8_0,q4_1`), naming `option` in the error.
///
/// # Errors
/// [`Error::InvalidArgument`] for an unknown or empty type, listing the allowed ones.
pub fn parse_types(s: &str, option: &str) -> Result<Vec<DeployType>> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let t = DeployType::parse(part).ok_or_else(|| {
            Error::invalid(
                option,
                format!("unknown type `{}` (allowed: {TYPE_NAMES})", part.trim()),
            )
        })?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

/// The type llama.cpp writes for a matrix whose rows have `cols` values when `want` was
/// asked for: K-quants need rows that are a multiple of 256 and fall back otherwise.
pub fn fitting_type(want: GgmlDType, cols: usize) -> GgmlDType {
    if cols.is_multiple_of(want.block_size()) {
        return want;
    }
    let fallback = match want {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        _ => GgmlDType::Q8_0,
    };
    if cols.is_multiple_of(fallback.block_size()) {
        fallback
    } else {
        GgmlDType::F16
    }
}

/// Each tensor's type in the file the model was loaded from, by our tensor name (GGUF input
/// only; `None` otherwise).
pub fn input_types(model: &Model) -> Option<HashMap<String, GgmlDType>> {
    match &model.source.format {
        Format::Gguf { tensors, .. } => Some(
            tensors
                .iter()
                .map(|(_, ours, t)| (ours.clone(), *t))
                .collect(),
        ),
        Format::HfDir { .. } => None,
    }
}

/// The grid each 2-D tensor of `model` is stored on when written as `ty`: a type per tensor
/// name (tensors absent from the map stay f32).
///
/// # Errors
/// [`Error::InvalidArgument`] for `input` on a model that was not loaded from GGUF.
pub fn grid(model: &Model, ty: DeployType) -> Result<HashMap<String, GgmlDType>> {
    let mut out = HashMap::new();
    let input = input_types(model);
    if ty == DeployType::Input && input.is_none() {
        return Err(Error::invalid(
            "type",
            "`input` needs a GGUF model (a safetensors directory has no quantization types)",
        ));
    }
    for (name, t) in model.weights.iter() {
        if t.rank() != 2 {
            continue;
        }
        let cols = t.dims()[1];
        let want = match ty.ggml() {
            Some(g) => g,
            None => match input.as_ref().and_then(|m| m.get(name)) {
                Some(g) => *g,
                None => continue,
            },
        };
        if matches!(want, GgmlDType::F32 | GgmlDType::BF16) {
            continue;
        }
        out.insert(name.clone(), fitting_type(want, cols));
    }
    Ok(out)
}

/// `t` quantized to `dtype` and back: the values a GGUF file of that type holds.
///
/// # Shapes
/// `t` `[rows, cols]`; returns the same shape, f32.
pub fn fake_quant(t: &Tensor, dtype: GgmlDType) -> Result<Tensor> {
    if dtype == GgmlDType::F32 {
        return Ok(t.clone());
    }
    let q = QTensor::quantize(&t.detach(), dtype)?;
    Ok(q.dequantize(t.device())?)
}

/// Every matrix of `model` as a GGUF file of type `ty` would hold it (see [`grid`]).
///
/// # Errors
/// As [`grid`].
pub fn requantize(model: &Model, ty: DeployType) -> Result<Model> {
    Ok(requantize_changed(model, ty)?.0)
}

/// [`requantize`], and whether any weight changed: `false` when every matrix already lies on
/// `ty`'s grid (a model trained through that grid, as grid descent leaves it), so the
/// re-quantized model computes exactly what `model` does.
pub fn requantize_changed(model: &Model, ty: DeployType) -> Result<(Model, bool)> {
    let g = grid(model, ty)?;
    let mut m = model.clone();
    // A matrix still in its stored blocks, at the type it is written in, is what the file
    // holds already (saving copies it byte for byte): it is kept, not re-quantized.
    let names: Vec<String> = g
        .keys()
        .filter(|n| model.weights.param(n).ok().and_then(|p| p.stored_type()) != Some(g[*n]))
        .cloned()
        .collect();
    // Matrices are independent: quantize them on both cores.
    use rayon::prelude::*;
    let done: Vec<(String, Tensor, bool)> = names
        .par_iter()
        .map(|n| -> Result<(String, Tensor, bool)> {
            let t = model.weights.dense(n)?;
            let q = fake_quant(&t, g[n])?;
            let moved = (&q - &t)?.abs()?.max_all()?.to_scalar::<f32>()? != 0.0;
            Ok((n.clone(), q, moved))
        })
        .collect::<Result<_>>()?;
    let mut changed = false;
    for (n, t, moved) in done {
        changed |= moved;
        m.weights.insert(n, t);
    }
    Ok((m, changed))
}

/// The edited tensors `names` as the GGUF file stores them: each re-quantized to its input
/// type (the type `save_gguf` writes a changed tensor in; a K-quant that does not fit the
/// rows falls back as llama.cpp does). Returns what restores the f32 edit, or `None` for a
/// model that was not loaded from GGUF.
pub fn requantize_edited(
    model: &mut Model,
    names: &[&str],
) -> Result<Option<Vec<super::delta::Applied>>> {
    let Some(types) = input_types(model) else {
        return Ok(None);
    };
    let mut saved: Vec<super::delta::Applied> = Vec::new();
    for &n in names {
        if saved.iter().any(|a| a.name == n) {
            continue;
        }
        let w = model.weights.dense(n)?;
        let ty = match types.get(n) {
            Some(&t) if w.rank() == 2 => fitting_type(t, w.dim(1)?),
            _ => continue,
        };
        model.set_tensor(n, fake_quant(&w, ty)?)?;
        saved.push(super::delta::Applied {
            name: n.to_string(),
            previous: w,
        });
    }
    Ok(Some(saved))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_parse_and_errors_list_the_allowed() {
        assert_eq!(
            parse_types("q8_0, Q4_1,q8_0", "types").unwrap(),
            vec![DeployType::Q8_0, DeployType::Q4_1]
        );
        let e = parse_types("q8_0,q3", "types").unwrap_err().to_string();
        assert!(
            e.contains("types") && e.contains("q3") && e.contains("q4_k"),
            "{e}"
        );
    }

    #[test]
    fn k_quants_fall_back_as_llama_cpp_does() {
        assert_eq!(fitting_type(GgmlDType::Q4K, 1536), GgmlDType::Q4K);
        assert_eq!(fitting_type(GgmlDType::Q4K, 576), GgmlDType::Q5_0);
        assert_eq!(fitting_type(GgmlDType::Q5K, 576), GgmlDType::Q5_1);
        assert_eq!(fitting_type(GgmlDType::Q6K, 576), GgmlDType::Q8_0);
        assert_eq!(fitting_type(GgmlDType::Q4_1, 576), GgmlDType::Q4_1);
    }

    #[test]
    fn fake_quant_is_idempotent_on_its_grid() {
        // Values already on a Q4_1 grid come back unchanged: training through the grid and
        // writing the file give the same weights.
        let dev = candle_core::Device::Cpu;
        let t = Tensor::randn(0f32, 0.05, (8, 64), &dev).unwrap();
        let q1 = fake_quant(&t, GgmlDType::Q4_1).unwrap();
        let q2 = fake_quant(&q1, GgmlDType::Q4_1).unwrap();
        let d = (q1 - q2).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
