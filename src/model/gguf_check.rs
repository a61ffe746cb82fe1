//! A strict walk over a GGUF header, before candle's reader sees the file.
//!
//! candle's `gguf_file::Content::read` bounds string and array lengths, but it divides by
//! `general.alignment` (0 panics), keeps the last of two equal keys or tensor names (a second
//! `llama.block_count` silently wins), multiplies dimensions without overflow checks (a
//! product can wrap to a plausible size) and never checks that tensor offsets are aligned or
//! that the data lies inside the file. This walk refuses all of those with the file and the
//! key or tensor named, so the reader that follows only ever sees a well-formed header.
//!
//! Layout (GGUF v2/v3; v1 has 32-bit counts and lengths):
//! `magic "GGUF" | version u32 | n_tensors u64 | n_kv u64 | kv* | tensor_info* | pad | data`,
//! kv = `key: string | type: u32 | value`, tensor_info =
//! `name: string | n_dims: u32 | dims: u64 * n_dims | ggml type: u32 | offset: u64`.

use crate::error::{Error, Result};
use candle_core::quantized::GgmlDType;
use std::collections::HashSet;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// The default `general.alignment` (the GGUF specification's 32).
const DEFAULT_ALIGNMENT: u64 = 32;
/// Nesting limit for arrays of arrays (llama.cpp writes none).
const MAX_DEPTH: usize = 4;
/// Tensor rank limit (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// What the walk learned, for the loader's own checks.
#[derive(Debug, Clone)]
pub struct HeaderSummary {
    pub n_tensors: u64,
    pub n_kv: u64,
    pub alignment: u64,
    pub file_size: u64,
}

struct Walk<'a, R> {
    r: R,
    path: &'a Path,
    v1: bool,
    pos: u64,
    file_size: u64,
}

impl<R: Read> Walk<'_, R> {
    fn bad(&self, reason: impl std::fmt::Display) -> Error {
        Error::bad_checkpoint(self.path, format!("GGUF header: {reason}"))
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if n > self.file_size.saturating_sub(self.pos) {
            return Err(self.bad(format!(
                "{what} needs {n} bytes at offset {}, past the end of the {}-byte file",
                self.pos, self.file_size
            )));
        }
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .map_err(|e| self.bad(format!("{what}: {e}")))?;
        self.pos += n;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.bytes(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A count or length: u32 in v1, u64 later.
    fn len(&mut self, what: &str) -> Result<u64> {
        if self.v1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let b = self.bytes(n, what)?;
        String::from_utf8(b).map_err(|_| self.bad(format!("{what} is not UTF-8")))
    }

    /// Read one value of `ty`; returns it as an integer where it is one (for the alignment).
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Option<i128>> {
        let what = format!("value of `{key}`");
        let fixed = |t: u32| -> Option<u64> {
            match t {
                0 | 1 | 7 => Some(1),
                2 | 3 => Some(2),
                4..=6 => Some(4),
                10..=12 => Some(8),
                _ => None,
            }
        };
        match ty {
            0 => Ok(Some(self.bytes(1, &what)?[0] as i128)),
            1 => Ok(Some(self.bytes(1, &what)?[0] as i8 as i128)),
            2 => {
                let b = self.bytes(2, &what)?;
                Ok(Some(u16::from_le_bytes([b[0], b[1]]) as i128))
            }
            3 => {
                let b = self.bytes(2, &what)?;
                Ok(Some(i16::from_le_bytes([b[0], b[1]]) as i128))
            }
            4 => Ok(Some(self.u32(&what)? as i128)),
            5 => Ok(Some(self.u32(&what)? as i32 as i128)),
            10 => Ok(Some(self.u64(&what)? as i128)),
            11 => Ok(Some(self.u64(&what)? as i64 as i128)),
            6 | 12 => {
                self.bytes(fixed(ty).expect("fixed size"), &what)?;
                Ok(None)
            }
            7 => {
                let b = self.bytes(1, &what)?[0];
                if b > 1 {
                    return Err(self.bad(format!("{what}: bool byte {b} (allowed: 0, 1)")));
                }
                Ok(None)
            }
            8 => {
                self.string(&what)?;
                Ok(None)
            }
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.bad(format!("{what}: arrays nested deeper than {MAX_DEPTH}")));
                }
                let elem = self.u32(&what)?;
                let n = self.len(&what)?;
                // Every element takes at least its fixed size (a string or array its length
                // prefix), so a count the rest of the file cannot hold is refused up front.
                let min = fixed(elem).unwrap_or(if self.v1 { 4 } else { 8 });
                if n.saturating_mul(min) > self.file_size.saturating_sub(self.pos) {
                    return Err(self.bad(format!(
                        "{what}: an array of {n} elements does not fit in the rest of the file"
                    )));
                }
                if let Some(size) = fixed(elem) {
                    self.bytes(n * size, &what)?;
                } else {
                    for _ in 0..n {
                        self.value(elem, key, depth + 1)?;
                    }
                }
                Ok(None)
            }
            t => Err(self.bad(format!("{what}: unknown value type {t} (allowed: 0-12)"))),
        }
    }
}

/// Walk the header of the GGUF file at `path` and refuse anything malformed (see the module
/// header). Reads only the header.
///
/// # Errors
/// [`Error::BadCheckpoint`] naming the file and the key or tensor at fault.
pub fn check(path: &Path) -> Result<HeaderSummary> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut w = Walk {
        r: BufReader::new(f),
        path,
        v1: false,
        pos: 0,
        file_size,
    };
    let magic = w.bytes(4, "magic")?;
    if magic != b"GGUF" {
        return Err(w.bad(format!("magic {magic:02x?}, expected \"GGUF\"")));
    }
    let version = w.u32("version")?;
    if !(1..=3).contains(&version) {
        return Err(w.bad(format!("version {version} (supported: 1, 2, 3)")));
    }
    w.v1 = version == 1;
    let n_tensors = w.len("tensor count")?;
    let n_kv = w.len("metadata count")?;
    // A kv takes at least a length prefix, a type and one byte; a tensor info a length
    // prefix, a rank, one dim, a type and an offset: impossible counts are refused up front.
    let prefix = if w.v1 { 4 } else { 8 };
    let min = n_kv
        .saturating_mul(prefix + 5)
        .saturating_add(n_tensors.saturating_mul(2 * prefix + 16));
    if min > file_size {
        return Err(w.bad(format!(
            "{n_tensors} tensors and {n_kv} metadata entries cannot fit in {file_size} bytes"
        )));
    }
    let mut keys = HashSet::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    for _ in 0..n_kv {
        let key = w.string("metadata key")?;
        if !keys.insert(key.clone()) {
            return Err(w.bad(format!("metadata key `{key}` appears twice")));
        }
        let ty = w.u32(&format!("type of `{key}`"))?;
        let v = w.value(ty, &key, 0)?;
        if key == "general.alignment" {
            alignment = match v {
                Some(a) if a > 0 && a <= 1 << 20 && (a as u64).is_power_of_two() => a as u64,
                _ => {
                    return Err(w.bad(format!(
                        "`general.alignment` must be a power of two integer from 1 to 2^20, got {}",
                        v.map(|a| a.to_string()).unwrap_or("a non-integer".into())
                    )))
                }
            };
        }
    }
    let mut names = HashSet::new();
    let mut spans = Vec::with_capacity(n_tensors.min(1 << 16) as usize);
    for _ in 0..n_tensors {
        let name = w.string("tensor name")?;
        if !names.insert(name.clone()) {
            return Err(w.bad(format!("tensor `{name}` appears twice")));
        }
        let n_dims = w.u32(&format!("rank of `{name}`"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(w.bad(format!(
                "tensor `{name}` has rank {n_dims} (allowed: 1 to {MAX_DIMS})"
            )));
        }
        let mut elems: u64 = 1;
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            let d = w.len(&format!("dims of `{name}`"))?;
            dims.push(d);
            elems = elems.checked_mul(d).ok_or_else(|| {
                w.bad(format!(
                    "tensor `{name}`: dims {dims:?}... overflow 64 bits"
                ))
            })?;
        }
        if elems == 0 {
            return Err(w.bad(format!("tensor `{name}` has a zero dimension: {dims:?}")));
        }
        let ty = w.u32(&format!("type of `{name}`"))?;
        let dtype = ggml_type(ty)
            .ok_or_else(|| w.bad(format!("tensor `{name}`: unknown ggml type {ty}")))?;
        let block = dtype.block_size() as u64;
        if dims[0] % block != 0 {
            return Err(w.bad(format!(
                "tensor `{name}`: rows of {} do not fill {dtype:?} blocks of {block}",
                dims[0]
            )));
        }
        let bytes = (elems / block)
            .checked_mul(dtype.type_size() as u64)
            .ok_or_else(|| w.bad(format!("tensor `{name}`: size overflows 64 bits")))?;
        let offset = w.u64(&format!("offset of `{name}`"))?;
        spans.push((name, offset, bytes));
    }
    let data_start = w.pos.div_ceil(alignment) * alignment;
    for (name, offset, bytes) in spans {
        if offset % alignment != 0 {
            return Err(w.bad(format!(
                "tensor `{name}`: offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let end = data_start
            .checked_add(offset)
            .and_then(|s| s.checked_add(bytes));
        if end.map(|e| e > file_size).unwrap_or(true) {
            return Err(w.bad(format!(
                "tensor `{name}`: {bytes} bytes at data offset {offset} run past the end of the {file_size}-byte file"
            )));
        }
    }
    // Only the header was read; the position is reset for whoever reads next.
    let _ = w.r.seek(SeekFrom::Start(0));
    Ok(HeaderSummary {
        n_tensors,
        n_kv,
        alignment,
        file_size,
    })
}

/// The ggml types candle can read (its `GgmlDType::from_u32` is crate-private).
fn ggml_type(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}
