//! A weight as the model holds it: an f32 tensor, or a frozen matrix kept in the type the
//! checkpoint stores it in (GGUF quantized blocks or f16), with the linear map over either.
//!
//! Why: loading used to dequantize every tensor to f32, so memory was 4 bytes per parameter
//! whatever the file's size (an 8B-parameter Q4_K_M file of 4.7 GB would need 32 GB). With
//! [`WeightMode::Stored`] only the matrices an edit or a training run writes become f32
//! ([`super::Model::set_tensor`] stores a dense tensor); every other matrix stays in its blocks.
//!
//! How a stored matrix multiplies (`x · Wᵀ`, `x` `[m, k]`, `W` `[n, k]`):
//! - with [`WeightMode::StoredKernel`] only, generation (`model::generate`, see
//!   [`QKernelScope`]), for a product of at most
//!   `QMATMUL_ROWS` rows (a short prompt, each decoding step): candle's quantized kernel, which
//!   quantizes `x` to 8 bits and takes integer dot products with the blocks (llama.cpp's
//!   arithmetic; close to the f32 product, not bit-identical). Dequantizing a whole model per
//!   generated token would cost more than the token.
//! - everything else (prefill, scoring, the value search, training): the matrix is dequantized
//!   `CHUNK_BYTES` of f32 at a time, and each slice multiplied by f32 gemm. The values are the
//!   f32 path's (dequantization is the same function the f32 loader applies), up to f32
//!   rounding where gemm splits the product differently, and memory stays bounded whatever the
//!   matrix's size.
//! - The input's gradient (`g · W`, the value search and unlearning through frozen layers) is
//!   taken the same chunked way. A stored matrix never has a gradient of its own: a matrix that
//!   trains is made dense first.

use crate::error::{Error, Result};
use candle_core::quantized::k_quants::{self as kq, GgmlType};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use std::borrow::Cow;
use std::sync::Arc;

/// How a checkpoint's matrices are held after loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WeightMode {
    /// Every tensor dequantized to f32 (the reference path; every earlier number used it).
    #[default]
    F32,
    /// Frozen matrices stay in their stored GGUF type; only written ones become f32. Every
    /// product dequantizes, so numbers are the f32 path's.
    Stored,
    /// As `Stored`, and generation multiplies small products with llama.cpp's integer kernel
    /// (8-bit activations): much faster decoding, not bit-identical.
    #[value(name = "stored-kernel")]
    StoredKernel,
}

impl WeightMode {
    /// Whether matrices stay in their blocks.
    pub fn keeps_blocks(self) -> bool {
        self != WeightMode::F32
    }
}

/// At most this many rows of `x` use the quantized kernel (in [`WeightMode::StoredKernel`]
/// generation); more use dequantization and f32 gemm.
pub const QMATMUL_ROWS: usize = 8;

/// f32 bytes dequantized at a time by the chunked products (256 MB). A matrix under this
/// size is multiplied whole, by the same gemm call as the f32 path, so its products are
/// bit-identical to it (every matrix of the default model, its 113 MB embedding included); a
/// larger one (an 8B model's 2.1 GB output head) is split into row chunks, which changes the
/// order of the sums in `g · W` and so its rounding.
const CHUNK_BYTES: usize = 256 << 20;

thread_local! {
    static QKERNEL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, small products on this thread may use the quantized kernel (see the module
/// header); dropping it restores the previous setting.
pub(crate) struct QKernelScope(bool);

impl QKernelScope {
    pub(crate) fn enter(on: bool) -> QKernelScope {
        QKernelScope(QKERNEL.with(|q| q.replace(on)))
    }
}

impl Drop for QKernelScope {
    fn drop(&mut self) {
        QKERNEL.with(|q| q.set(self.0));
    }
}

/// Runs `$body` with `$t` bound to the block type of `$dtype` (every GGUF type candle's
/// `k_quants` implements), else `$other`.
macro_rules! with_blocks {
    ($dtype:expr, $t:ident => $body:expr, $other:block) => {
        match $dtype {
            GgmlDType::F32 => {
                type $t = f32;
                $body
            }
            GgmlDType::F16 => {
                type $t = half::f16;
                $body
            }
            GgmlDType::BF16 => {
                type $t = half::bf16;
                $body
            }
            GgmlDType::Q4_0 => {
                type $t = kq::BlockQ4_0;
                $body
            }
            GgmlDType::Q4_1 => {
                type $t = kq::BlockQ4_1;
                $body
            }
            GgmlDType::Q5_0 => {
                type $t = kq::BlockQ5_0;
                $body
            }
            GgmlDType::Q5_1 => {
                type $t = kq::BlockQ5_1;
                $body
            }
            GgmlDType::Q8_0 => {
                type $t = kq::BlockQ8_0;
                $body
            }
            GgmlDType::Q2K => {
                type $t = kq::BlockQ2K;
                $body
            }
            GgmlDType::Q3K => {
                type $t = kq::BlockQ3K;
                $body
            }
            GgmlDType::Q4K => {
                type $t = kq::BlockQ4K;
                $body
            }
            GgmlDType::Q5K => {
                type $t = kq::BlockQ5K;
                $body
            }
            GgmlDType::Q6K => {
                type $t = kq::BlockQ6K;
                $body
            }
            _ => $other,
        }
    };
}

/// The stored bytes as blocks of `T`.
fn as_blocks<T: GgmlType>(data: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    assert!(
        data.len().is_multiple_of(size)
            && (data.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()),
        "stored blocks are whole and aligned"
    );
    // SAFETY: the bytes are a QTensor's own storage, a Vec of `T` blocks, or a whole-row
    // slice of it (checked above for size and alignment); blocks are plain old data.
    unsafe { std::slice::from_raw_parts(data.as_ptr() as *const T, data.len() / size) }
}

/// Dequantize whole rows of `cols` values from `data` into `out`, a few rows per rayon task.
fn to_f32<T: GgmlType>(data: &[u8], out: &mut [f32], cols: usize) {
    use rayon::prelude::*;
    const ROWS_PER_TASK: usize = 32;
    let blocks = as_blocks::<T>(data);
    let per_row = cols / T::BLCK_SIZE;
    out.par_chunks_mut(cols * ROWS_PER_TASK)
        .zip(blocks.par_chunks(per_row * ROWS_PER_TASK))
        .for_each(|(ys, xs)| T::to_float(xs, ys));
}

/// A frozen matrix in its checkpoint type, `[rows, cols]` (`[out, in]` for a linear map).
#[derive(Debug, Clone)]
pub struct Stored {
    q: Arc<QTensor>,
    /// Whether generation may use the integer kernel ([`WeightMode::StoredKernel`]).
    kernel: bool,
}

impl Stored {
    /// Wrap a 2-D quantized tensor.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when it is not 2-D.
    pub fn new(q: QTensor) -> Result<Stored> {
        if q.rank() != 2 {
            return Err(Error::invalid(
                "stored weight",
                format!("a stored matrix must be 2-D, got {:?}", q.shape().dims()),
            ));
        }
        Ok(Stored {
            q: Arc::new(q),
            kernel: false,
        })
    }

    /// Keep a 2-D f16 or bf16 tensor (a safetensors matrix) in its half-precision bytes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for another dtype or rank.
    pub fn from_half(t: &Tensor) -> Result<Stored> {
        let flat = t.flatten_all()?;
        let (ty, bytes): (GgmlDType, Vec<u8>) = match t.dtype() {
            candle_core::DType::F16 => (
                GgmlDType::F16,
                flat.to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            candle_core::DType::BF16 => (
                GgmlDType::BF16,
                flat.to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            other => {
                return Err(Error::invalid(
                    "stored weight",
                    format!("only f16 and bf16 tensors are kept as they are, not {other:?}"),
                ))
            }
        };
        let dev = t.device();
        let s = QStorage::from_data(Cow::Owned(bytes), dev, ty)?;
        Stored::new(QTensor::new(s, t.dims())?)
    }

    /// The same matrix, allowed (or not) to use the integer kernel in generation.
    pub fn with_kernel(mut self, kernel: bool) -> Stored {
        self.kernel = kernel;
        self
    }

    pub fn dtype(&self) -> GgmlDType {
        self.q.dtype()
    }

    pub fn dims(&self) -> &[usize] {
        self.q.shape().dims()
    }

    fn rows_cols(&self) -> (usize, usize) {
        let d = self.dims();
        (d[0], d[1])
    }

    /// Bytes of the stored blocks.
    pub fn size_in_bytes(&self) -> usize {
        self.q.storage_size_in_bytes()
    }

    /// The blocks, as the GGUF file holds them (row-major; each row a whole number of blocks).
    pub fn data(&self) -> Result<Cow<'_, [u8]>> {
        Ok(self.q.data()?)
    }

    /// Bytes per row (every row of a GGUF matrix is a whole number of blocks).
    fn row_bytes(&self) -> usize {
        let (_, cols) = self.rows_cols();
        cols / self.dtype().block_size() * self.dtype().type_size()
    }

    /// The whole matrix in f32 (the values the f32 loader holds).
    pub fn dequantize(&self) -> Result<Tensor> {
        self.dequantize_rows(0, self.rows_cols().0)
    }

    /// Rows `start..start + len` in f32, `[len, cols]`: the block type's own `to_float` (the
    /// function candle's `QTensor::dequantize` calls, so the same values), rows split over
    /// rayon's threads. candle's runs on one thread, and dequantization was most of a value
    /// search step on stored weights (1B shape, Q4_K_M).
    pub fn dequantize_rows(&self, start: usize, len: usize) -> Result<Tensor> {
        let (rows, cols) = self.rows_cols();
        if start + len > rows {
            return Err(Error::invalid(
                "stored weight",
                format!("rows {start}..{} of a matrix of {rows}", start + len),
            ));
        }
        let rb = self.row_bytes();
        let data = self.data()?;
        let slice = &data[start * rb..(start + len) * rb];
        let mut out = vec![0f32; len * cols];
        with_blocks!(self.dtype(), T => to_f32::<T>(slice, &mut out, cols), {
            // Types without a k_quants block (none in a GGUF we load): candle's own path.
            let dev = self.q.device();
            let s = QStorage::from_data(Cow::Borrowed(slice), &dev, self.dtype())?;
            return Ok(QTensor::new(s, (len, cols))?.dequantize(&dev)?);
        });
        Ok(Tensor::from_vec(out, (len, cols), &self.q.device())?)
    }

    /// The same matrix with its rows reordered: row `i` of the result is row `perm[i]`.
    /// Blocks never span rows, so this moves whole byte ranges and is exact.
    pub fn permute_rows(&self, perm: &[usize]) -> Result<Stored> {
        let (rows, cols) = self.rows_cols();
        if perm.len() != rows {
            return Err(Error::invalid(
                "stored weight",
                format!("permutation of {} rows for a matrix of {rows}", perm.len()),
            ));
        }
        let rb = self.row_bytes();
        let data = self.data()?;
        let mut out = Vec::with_capacity(data.len());
        for &r in perm {
            out.extend_from_slice(&data[r * rb..(r + 1) * rb]);
        }
        let dev = self.q.device();
        let s = QStorage::from_data(Cow::Owned(out), &dev, self.dtype())?;
        Ok(Stored::new(QTensor::new(s, (rows, cols))?)?.with_kernel(self.kernel))
    }

    /// Rows per dequantized chunk.
    fn chunk_rows(&self) -> usize {
        let (rows, cols) = self.rows_cols();
        (CHUNK_BYTES / (4 * cols.max(1))).clamp(1, rows.max(1))
    }

    /// Calls `f(start, rows_f32)` on every chunk of rows, in order: once, on the whole matrix,
    /// when it fits in one chunk.
    pub fn for_each_chunk(&self, mut f: impl FnMut(usize, &Tensor) -> Result<()>) -> Result<()> {
        let (rows, _) = self.rows_cols();
        let step = self.chunk_rows();
        if rows <= step {
            return f(0, &self.dequantize()?);
        }
        let mut start = 0;
        while start < rows {
            let len = step.min(rows - start);
            f(start, &self.dequantize_rows(start, len)?)?;
            start += len;
        }
        Ok(())
    }

    /// `x · Wᵀ` by candle's generic quantized kernel (`k_quants::matmul`: `x` quantized to the
    /// block type's 8-bit partner, integer dot products), for the block types it has; `None`
    /// for others.
    ///
    /// Why not `QMatMul` / the `QTensor` custom op: on x86 those first repack Q4_K (and, for
    /// more than one row, Q6_K) matrices into wider tiles and keep the tiles beside the blocks
    /// for the tensor's lifetime, so every matrix a decoding step touches is held twice: an
    /// 8B-shaped Q4_K_M file of 4.5 GB peaked at 8.8 GB in `generate`.
    fn qmatmul(&self, x: &[f32], m: usize, k: usize, n: usize) -> Result<Option<Vec<f32>>> {
        if !self.has_qkernel() {
            return Ok(None);
        }
        let data = self.data()?;
        let mut dst = vec![0f32; m * n];
        with_blocks!(self.dtype(), T => kq::matmul::<T>((m, k, n), x, as_blocks::<T>(&data), &mut dst)?, {
            return Ok(None);
        });
        Ok(Some(dst))
    }

    /// Whether candle's quantized kernel takes this type (f16/bf16/f32 blocks always go
    /// through dequantization).
    fn has_qkernel(&self) -> bool {
        !matches!(
            self.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        )
    }

    /// `x · Wᵀ` over the last dimension.
    ///
    /// # Shapes
    /// `x`: `[m, k]` (contiguous f32) -> `[m, n]`.
    pub fn x_wt(&self, x: &Tensor) -> Result<Tensor> {
        let (m, _) = x.dims2()?;
        let qkernel = QKERNEL.with(|q| q.get());
        if self.kernel && qkernel && m <= QMATMUL_ROWS && x.device().is_cpu() {
            let (n, k) = self.rows_cols();
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            if let Some(y) = self.qmatmul(&xs, m, k, n)? {
                return Ok(Tensor::from_vec(y, (m, n), x.device())?);
            }
        }
        let mut parts = Vec::new();
        self.for_each_chunk(|_, w| {
            parts.push(super::matmul::x_wt_any(x, w)?);
            Ok(())
        })?;
        Ok(match parts.len() {
            1 => parts.pop().expect("one part"),
            _ => Tensor::cat(&parts, 1)?,
        })
    }

    /// `g · W`, the gradient of `x · Wᵀ` with respect to `x`.
    ///
    /// # Shapes
    /// `g`: `[m, n]` -> `[m, k]`.
    pub fn g_w(&self, g: &Tensor) -> Result<Tensor> {
        let (rows, _) = self.rows_cols();
        let mut acc: Option<Tensor> = None;
        self.for_each_chunk(|start, w| {
            let len = w.dim(0)?;
            let part = if len == rows {
                super::matmul::g_w_any(g, w)?
            } else {
                super::matmul::g_w_any(&g.narrow(1, start, len)?.contiguous()?, w)?
            };
            acc = Some(match acc.take() {
                Some(a) => (a + part)?,
                None => part,
            });
            Ok(())
        })?;
        acc.ok_or_else(|| Error::invalid("stored weight", "empty matrix"))
    }

    /// Rows of the matrix by index (an embedding lookup), f32.
    ///
    /// # Shapes
    /// `ids`: `[n]` u32 -> `[n, cols]`.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        if self.has_qkernel() {
            return Ok(self.q.embedding(ids)?);
        }
        // f16 blocks: gather one row at a time (the table itself stays f16).
        let ids: Vec<u32> = ids.to_vec1()?;
        let parts = ids
            .iter()
            .map(|&i| self.dequantize_rows(i as usize, 1))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// One weight of a [`super::Weights`] map.
#[derive(Debug, Clone)]
pub enum Param {
    /// An f32 tensor (norms, biases, every matrix in [`WeightMode::F32`], written matrices).
    Dense(Tensor),
    /// A frozen matrix in its checkpoint type.
    Stored(Stored),
}

impl Param {
    pub fn dims(&self) -> &[usize] {
        match self {
            Param::Dense(t) => t.dims(),
            Param::Stored(s) => s.dims(),
        }
    }

    pub fn rank(&self) -> usize {
        self.dims().len()
    }

    pub fn elem_count(&self) -> usize {
        self.dims().iter().product()
    }

    /// The values in f32: the tensor itself (a cheap clone), or a dequantized copy.
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Param::Dense(t) => Ok(t.clone()),
            Param::Stored(s) => s.dequantize(),
        }
    }

    /// The stored type, for a matrix still in its checkpoint blocks.
    pub fn stored_type(&self) -> Option<GgmlDType> {
        match self {
            Param::Stored(s) => Some(s.dtype()),
            Param::Dense(_) => None,
        }
    }

    /// Bytes this weight takes in memory.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Param::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Param::Stored(s) => s.size_in_bytes(),
        }
    }

    /// `x · Wᵀ` for a matrix outside the autograd graph (dense: [`super::matmul::x_wt_any`]).
    ///
    /// # Shapes
    /// `x`: `[m, k]` -> `[m, n]`.
    pub fn x_wt(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Param::Dense(w) => Ok(super::matmul::x_wt_any(x, w)?),
            Param::Stored(s) => s.x_wt(x),
        }
    }

    /// `g · W`.
    ///
    /// # Shapes
    /// `g`: `[m, n]` -> `[m, k]`.
    pub fn g_w(&self, g: &Tensor) -> Result<Tensor> {
        match self {
            Param::Dense(w) => Ok(super::matmul::g_w_any(g, w)?),
            Param::Stored(s) => s.g_w(g),
        }
    }

    /// A borrowed view for the linear map.
    pub fn mat(&self) -> Mat<'_> {
        match self {
            Param::Dense(t) => Mat::Dense(t),
            Param::Stored(s) => Mat::Stored(s),
        }
    }
}

/// A matrix for [`super::layers::linear`]: dense, or stored.
#[derive(Debug, Clone, Copy)]
pub enum Mat<'a> {
    Dense(&'a Tensor),
    Stored(&'a Stored),
}

impl<'a> From<&'a Tensor> for Mat<'a> {
    fn from(t: &'a Tensor) -> Self {
        Mat::Dense(t)
    }
}

impl<'a> Mat<'a> {
    /// Output size (rows of `[out, in]`).
    pub fn out_dim(&self) -> Result<usize> {
        Ok(match self {
            Mat::Dense(t) => t.dim(0)?,
            Mat::Stored(s) => s.dims()[0],
        })
    }

    /// Rows by index (an embedding lookup), f32.
    ///
    /// # Shapes
    /// `ids`: `[n]` u32 -> `[n, cols]`.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Mat::Dense(t) => Ok(t.embedding(ids)?),
            Mat::Stored(s) => s.rows(ids),
        }
    }

    pub fn as_dense(&self) -> Option<&'a Tensor> {
        match self {
            Mat::Dense(t) => Some(t),
            Mat::Stored(_) => None,
        }
    }

    /// An owned handle (tensors and blocks are reference-counted: no copy).
    pub fn to_param(&self) -> Param {
        match self {
            Mat::Dense(t) => Param::Dense((*t).clone()),
            Mat::Stored(s) => Param::Stored((*s).clone()),
        }
    }
}

/// `x · Wᵀ` for a stored `W` whose backward returns only the input's gradient, `g · W`.
pub(crate) struct StoredLinear(pub Stored);

impl candle_core::CustomOp1 for StoredLinear {
    fn name(&self) -> &'static str {
        "stored-linear"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("stored-linear: input not contiguous".into()))?;
        let x = Tensor::from_slice(&s.as_slice::<f32>()?[start..end], l.shape(), &Device::Cpu)?;
        let y = self.0.x_wt(&x).map_err(candle_core::Error::wrap)?;
        super::layers::cpu_output(y, "stored-linear")
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(self.0.g_w(&g).map_err(candle_core::Error::wrap)?))
    }
}

/// Whether a GGUF tensor of this type and rank is kept stored in [`WeightMode::Stored`].
pub fn keeps_stored(dtype: GgmlDType, rank: usize) -> bool {
    rank == 2 && dtype != GgmlDType::F32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn chunked_products_equal_the_dequantized_f32_products() {
        let dev = Device::Cpu;
        // Wide rows, so that the matrix crosses chunks: 256 MB / (4 * 2^20) = 64 rows each.
        let (n, k) = (150, 1 << 20);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let s = Stored::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
        assert!(s.chunk_rows() < n, "the test must cross chunks");
        let wd = s.dequantize().unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, k), &dev).unwrap();
        let y = s.x_wt(&x).unwrap();
        let want = x.matmul(&wd.t().unwrap()).unwrap();
        assert!(max_diff(&y, &want) < 0.5, "{}", max_diff(&y, &want));
        let g = Tensor::randn(0f32, 1.0, (3, n), &dev).unwrap();
        let dx = s.g_w(&g).unwrap();
        let want = g.matmul(&wd).unwrap();
        assert!(max_diff(&dx, &want) < 1e-3, "{}", max_diff(&dx, &want));
        // Decoding rows go through the quantized kernel: close, not identical.
        let x1 = x.narrow(0, 0, 2).unwrap();
        let _q = QKernelScope::enter(true);
        let s = s.with_kernel(true);
        let y1 = s.x_wt(&x1).unwrap();
        let want1 = x1.matmul(&wd.t().unwrap()).unwrap();
        let scale = want1
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(max_diff(&y1, &want1) < 0.02 * scale);
    }

    #[test]
    fn row_permutation_and_lookup_match_the_dense_matrix() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 64), &dev).unwrap();
        let s = Stored::new(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
        let wd = s.dequantize().unwrap();
        let perm = [5usize, 0, 3, 1, 4, 2];
        let p = s.permute_rows(&perm).unwrap().dequantize().unwrap();
        let idx = Tensor::new(&[5u32, 0, 3, 1, 4, 2], &dev).unwrap();
        assert_eq!(max_diff(&p, &wd.index_select(&idx, 0).unwrap()), 0.0);
        let r = s.rows(&Tensor::new(&[2u32, 2, 0], &dev).unwrap()).unwrap();
        let idx = Tensor::new(&[2u32, 2, 0], &dev).unwrap();
        assert_eq!(max_diff(&r, &wd.index_select(&idx, 0).unwrap()), 0.0);
        let h = Stored::new(QTensor::quantize(&w, GgmlDType::F16).unwrap()).unwrap();
        let r = h.rows(&Tensor::new(&[1u32, 4], &dev).unwrap()).unwrap();
        let hd = h.dequantize().unwrap();
        let idx = Tensor::new(&[1u32, 4], &dev).unwrap();
        assert_eq!(max_diff(&r, &hd.index_select(&idx, 0).unwrap()), 0.0);
    }

    #[test]
    fn parallel_dequantization_equals_candles() {
        let dev = Device::Cpu;
        // 100 rows: several rayon tasks of 32 rows and a short last one.
        let w = Tensor::randn(0f32, 1.0, (100, 512), &dev).unwrap();
        for ty in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::F16,
            GgmlDType::BF16,
        ] {
            let q = QTensor::quantize(&w, ty).unwrap();
            let want = q.dequantize(&dev).unwrap();
            let s = Stored::new(q).unwrap();
            assert_eq!(max_diff(&s.dequantize().unwrap(), &want), 0.0, "{ty:?}");
            let part = s.dequantize_rows(37, 41).unwrap();
            assert_eq!(
                max_diff(&part, &want.narrow(0, 37, 41).unwrap()),
                0.0,
                "{ty:?}"
            );
        }
        let s = Stored::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
        assert!(s.dequantize_rows(90, 11).is_err());
    }
}
