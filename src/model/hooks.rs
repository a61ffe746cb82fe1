//! Hook points and interventions: the one way methods look inside or change a forward pass.
//!
//! Names and meanings follow TransformerLens (Nanda et al., "TransformerLens", 2022):
//! `hook_embed`, `blocks.{l}.hook_resid_pre`, `blocks.{l}.hook_attn_out`,
//! `blocks.{l}.ln2.hook_normalized` (our `mlp_in`), `blocks.{l}.mlp.hook_post` (our `mlp_key`,
//! ROME's key k), `blocks.{l}.hook_mlp_out`, `blocks.{l}.hook_resid_post`. Interventions are
//! data (pyvene style): a hook point, the cells it touches and an operation. A [`Trace`] holds
//! them for one forward pass; the model calls [`Trace::hook`] once per site. An empty trace
//! returns its input untouched, so it costs nothing and gives bit-identical logits.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// A named place in the forward pass.
///
/// # Shapes
/// Every point carries `[batch, seq, d_model]`, except `MlpKey`, which is `[batch, seq, d_mlp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    /// Token (plus learned position) embeddings, before block 0.
    Embed,
    /// The residual stream entering block l.
    ResidPre(usize),
    /// The attention sub-layer's output (after its output projection), before the residual add.
    AttnOut(usize),
    /// The normalized input of the MLP.
    MlpIn(usize),
    /// The input of the MLP output projection (`down_proj` / `c_proj`): ROME's key k.
    MlpKey(usize),
    /// The MLP's output, before the residual add.
    MlpOut(usize),
    /// The residual stream leaving block l.
    ResidPost(usize),
}

impl HookPoint {
    /// The layer this point belongs to (`None` for `Embed`).
    pub fn layer(&self) -> Option<usize> {
        match *self {
            HookPoint::Embed => None,
            HookPoint::ResidPre(l)
            | HookPoint::AttnOut(l)
            | HookPoint::MlpIn(l)
            | HookPoint::MlpKey(l)
            | HookPoint::MlpOut(l)
            | HookPoint::ResidPost(l) => Some(l),
        }
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookPoint::Embed => write!(f, "hook_embed"),
            HookPoint::ResidPre(l) => write!(f, "blocks.{l}.hook_resid_pre"),
            HookPoint::AttnOut(l) => write!(f, "blocks.{l}.hook_attn_out"),
            HookPoint::MlpIn(l) => write!(f, "blocks.{l}.ln2.hook_normalized"),
            HookPoint::MlpKey(l) => write!(f, "blocks.{l}.mlp.hook_post"),
            HookPoint::MlpOut(l) => write!(f, "blocks.{l}.hook_mlp_out"),
            HookPoint::ResidPost(l) => write!(f, "blocks.{l}.hook_resid_post"),
        }
    }
}

impl FromStr for HookPoint {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "hook point",
                format!(
                    "`{s}` is not a hook point (hook_embed, blocks.L.hook_resid_pre, \
                     blocks.L.hook_attn_out, blocks.L.ln2.hook_normalized, blocks.L.mlp.hook_post, \
                     blocks.L.hook_mlp_out, blocks.L.hook_resid_post)"
                ),
            )
        };
        if s == "hook_embed" {
            return Ok(HookPoint::Embed);
        }
        let rest = s.strip_prefix("blocks.").ok_or_else(bad)?;
        let (l, name) = rest.split_once('.').ok_or_else(bad)?;
        let l: usize = l.parse().map_err(|_| bad())?;
        Ok(match name {
            "hook_resid_pre" => HookPoint::ResidPre(l),
            "hook_attn_out" => HookPoint::AttnOut(l),
            "ln2.hook_normalized" => HookPoint::MlpIn(l),
            "mlp.hook_post" => HookPoint::MlpKey(l),
            "hook_mlp_out" => HookPoint::MlpOut(l),
            "hook_resid_post" => HookPoint::ResidPost(l),
            _ => return Err(bad()),
        })
    }
}

/// Which cells of a `[batch, seq, ·]` activation an intervention touches.
#[derive(Debug, Clone, PartialEq)]
pub enum Positions {
    /// Every row, every position.
    All,
    /// These positions in every row.
    Tokens(Vec<usize>),
    /// Explicit `(row, position)` cells.
    Cells(Vec<(usize, usize)>),
}

/// What an intervention does at its cells.
#[derive(Debug, Clone)]
pub enum Op {
    /// Store the activation (the whole `[batch, seq, ·]` tensor) under the hook point.
    Capture,
    /// Replace the cells with the same cells of this tensor (`[batch, seq, ·]`, usually a
    /// captured activation of another run).
    Replace(Tensor),
    /// Add this vector (`[dim]`) or tensor (`[batch, seq, dim]`) at the cells. It may be a
    /// `Var`: gradients flow to it.
    Add(Tensor),
    /// Add Gaussian noise N(0, std²) at the cells, drawn from a seeded generator. Each row gets
    /// its own draw (rows are the noise samples of causal tracing).
    Noise { std: f64, seed: u64 },
}

/// One intervention: where, which cells, what.
#[derive(Debug, Clone)]
pub struct Intervention {
    pub point: HookPoint,
    pub at: Positions,
    pub op: Op,
}

/// The interventions and captures of one forward pass.
#[derive(Debug, Default)]
pub struct Trace {
    interventions: Vec<Intervention>,
    captured: HashMap<HookPoint, Tensor>,
    stop_after: Option<HookPoint>,
    differentiable: bool,
}

impl Trace {
    /// An empty trace: the forward pass is a plain forward pass.
    pub fn new() -> Self {
        Self::default()
    }

    /// Use composed (differentiable) forms of softmax and the norms instead of candle's fused
    /// kernels, which have no backward pass. Needed wherever gradients must flow.
    pub fn differentiable(mut self) -> Self {
        self.differentiable = true;
        self
    }

    /// True when the forward pass must use differentiable kernels.
    pub fn is_differentiable(&self) -> bool {
        self.differentiable
    }

    /// Add an intervention; they apply in the order added.
    pub fn push(&mut self, point: HookPoint, at: Positions, op: Op) -> &mut Self {
        self.interventions.push(Intervention { point, at, op });
        self
    }

    /// Capture the full activation at `point`.
    pub fn capture(&mut self, point: HookPoint) -> &mut Self {
        self.push(point, Positions::All, Op::Capture)
    }

    /// Stop the forward pass right after `point`; `forward` then returns that activation.
    pub fn stop_after(&mut self, point: HookPoint) -> &mut Self {
        self.stop_after = Some(point);
        self
    }

    /// The point the forward pass stops after, if any.
    pub fn stop_point(&self) -> Option<HookPoint> {
        self.stop_after
    }

    /// True when the pass does anything at `point`: an intervention, a capture or a stop.
    /// Blocks use it to take shortcuts through activations nobody looks at.
    pub fn touches(&self, point: HookPoint) -> bool {
        self.stop_after == Some(point) || self.interventions.iter().any(|iv| iv.point == point)
    }

    /// A captured activation.
    pub fn get(&self, point: HookPoint) -> Option<&Tensor> {
        self.captured.get(&point)
    }

    /// Take a captured activation out of the trace.
    pub fn take(&mut self, point: HookPoint) -> Option<Tensor> {
        self.captured.remove(&point)
    }

    /// The registered interventions, in order.
    pub fn interventions(&self) -> &[Intervention] {
        &self.interventions
    }

    /// Apply every intervention registered at `point` to `x`, in order.
    ///
    /// # Shapes
    /// `x`: `[batch, seq, dim]`; returns the same shape.
    ///
    /// # Errors
    /// A position outside the sequence, or a replacement of the wrong shape.
    pub fn hook(&mut self, point: HookPoint, x: Tensor) -> Result<Tensor> {
        if self.interventions.is_empty() {
            return Ok(x);
        }
        let mut x = x;
        // Index loop: `Capture` writes into `self.captured` while we read `self.interventions`.
        for i in 0..self.interventions.len() {
            if self.interventions[i].point != point {
                continue;
            }
            let iv = &self.interventions[i];
            x = match &iv.op {
                Op::Capture => {
                    let copy = x.clone();
                    self.captured.insert(point, copy);
                    x
                }
                Op::Replace(src) => {
                    if src.dims() != x.dims() {
                        return Err(Error::ShapeMismatch {
                            name: format!("replacement at {point}"),
                            found: src.dims().to_vec(),
                            expected: x.dims().to_vec(),
                        });
                    }
                    match cell_mask(&iv.at, &x)? {
                        None => src.clone(),
                        Some(m) => {
                            // x * (1 - m) + src * m, gradient-safe and exact where m is 0 or 1.
                            let keep = m.affine(-1.0, 1.0)?;
                            (x.broadcast_mul(&keep)? + src.broadcast_mul(&m)?)?
                        }
                    }
                }
                Op::Add(v) => {
                    let v = v.to_dtype(x.dtype())?;
                    match cell_mask(&iv.at, &x)? {
                        None => x.broadcast_add(&v)?,
                        Some(m) => (x.clone() + m.broadcast_mul(&v)?.broadcast_as(x.shape())?)?,
                    }
                }
                Op::Noise { std, seed } => {
                    let noise = gaussian(x.dims(), *std, *seed, x.device())?;
                    match cell_mask(&iv.at, &x)? {
                        None => (x + noise)?,
                        Some(m) => (x + noise.broadcast_mul(&m)?)?,
                    }
                }
            };
        }
        Ok(x)
    }
}

/// A `[batch, seq, 1]` 0/1 mask of the cells, or `None` for all cells.
fn cell_mask(at: &Positions, x: &Tensor) -> Result<Option<Tensor>> {
    let (b, t, _) = x.dims3()?;
    let mut m = vec![0f32; b * t];
    match at {
        Positions::All => return Ok(None),
        Positions::Tokens(ps) => {
            for &p in ps {
                if p >= t {
                    return Err(Error::PositionOutOfRange {
                        position: p,
                        seq_len: t,
                    });
                }
                for r in 0..b {
                    m[r * t + p] = 1.0;
                }
            }
        }
        Positions::Cells(cells) => {
            for &(r, p) in cells {
                if p >= t || r >= b {
                    return Err(Error::PositionOutOfRange {
                        position: p,
                        seq_len: t,
                    });
                }
                m[r * t + p] = 1.0;
            }
        }
    }
    let m = Tensor::from_vec(m, (b, t, 1), x.device())?.to_dtype(x.dtype())?;
    Ok(Some(m))
}

/// Seeded Gaussian noise of the given shape (Box-Muller on a ChaCha-based `StdRng`).
pub fn gaussian(dims: &[usize], std: f64, seed: u64, device: &Device) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let a = 2.0 * std::f64::consts::PI * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    Ok(Tensor::from_vec(out, dims, device)?.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_names_round_trip() {
        for p in [
            HookPoint::Embed,
            HookPoint::ResidPre(3),
            HookPoint::AttnOut(0),
            HookPoint::MlpIn(7),
            HookPoint::MlpKey(12),
            HookPoint::MlpOut(1),
            HookPoint::ResidPost(29),
        ] {
            assert_eq!(p.to_string().parse::<HookPoint>().unwrap(), p);
        }
        assert!("blocks.x.hook_resid_pre".parse::<HookPoint>().is_err());
    }

    #[test]
    fn add_touches_only_its_cells() {
        let x = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let v = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let mut t = Trace::new();
        t.push(HookPoint::Embed, Positions::Cells(vec![(1, 2)]), Op::Add(v));
        let y = t.hook(HookPoint::Embed, x).unwrap();
        let s: Vec<Vec<f32>> = y.sum(2).unwrap().to_vec2().unwrap();
        assert_eq!(s, vec![vec![0.0, 0.0, 0.0], vec![0.0, 0.0, 4.0]]);
    }

    #[test]
    fn noise_is_seeded() {
        let a = gaussian(&[3, 5], 1.0, 7, &Device::Cpu).unwrap();
        let b = gaussian(&[3, 5], 1.0, 7, &Device::Cpu).unwrap();
        let c = gaussian(&[3, 5], 1.0, 8, &Device::Cpu).unwrap();
        let d = |x: &Tensor, y: &Tensor| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(d(&a, &b), 0.0);
        assert!(d(&a, &c) > 0.0);
    }
}
