//! A reader for GGUF files that treats every byte as untrusted.
//!
//! The file is memory-mapped; metadata is parsed into [`Value`]s and tensor descriptions into
//! [`TensorInfo`]s that point into the mapping. Every count and length is checked against the
//! bytes that remain before anything is allocated, so a truncated or hostile file yields a
//! [`GgufError`] instead of a panic or a huge allocation. Nothing here knows about models.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use memmap2::Mmap;

use super::matmul::SharedBytes;

use super::quant::GgmlType;

/// Upper bounds that no real model reaches; they stop absurd headers early.
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KV: u64 = 1 << 20;
const MAX_DIMS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a GGUF file (magic {0:#x})")]
    BadMagic(u32),
    #[error("unsupported GGUF version {0} (1 is obsolete; 2 and 3 are read)")]
    Version(u32),
    #[error("the file ends early (needed {needed} bytes at offset {offset})")]
    Truncated { offset: usize, needed: u64 },
    #[error("implausible header: {0}")]
    Implausible(String),
    #[error("unknown metadata value type {0}")]
    ValueType(u32),
    #[error("tensor `{name}`: unsupported ggml type {ty}")]
    TensorType { name: String, ty: u32 },
    #[error("tensor `{name}`: {why}")]
    Tensor { name: String, why: String },
    #[error("metadata key `{0}` is missing")]
    MissingKey(String),
    #[error("metadata key `{key}` has the wrong type (expected {expected})")]
    WrongType { key: String, expected: &'static str },
    #[error("tensor `{0}` is missing")]
    MissingTensor(String),
}

/// One metadata value.
#[derive(Debug, Clone)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Where a tensor lives in the file and what it holds.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the length of a row (the fastest-moving index).
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Byte range inside the mapping.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    pub fn row_len(&self) -> usize {
        self.dims[0]
    }

    pub fn n_rows(&self) -> usize {
        self.dims[1..].iter().product()
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    mmap: Arc<Mmap>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; a file changed under us can give wrong numbers but
        // every read below is bounds-checked against the mapping's length.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (metadata, tensors) = parse(&mmap)?;
        Ok(Self {
            path: path.to_owned(),
            metadata,
            tensors,
            mmap: Arc::new(mmap),
        })
    }

    /// The whole mapping, for weights that borrow it.
    pub fn shared_bytes(&self) -> SharedBytes {
        self.mmap.clone()
    }

    /// Lets the OS drop the resident pages of `t` (a copy of it is kept elsewhere). The mapping
    /// stays valid: a later read faults the pages back in from the file.
    pub fn release(&self, t: &TensorInfo) {
        // SAFETY: the mapping is private and read-only, so dropped pages come back unchanged
        // from the file (which, as for any mapping, must not be modified while open).
        let r = unsafe {
            self.mmap
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, t.start, t.len)
        };
        if let Err(e) = r {
            tracing::debug!(tensor = %t.name, error = %e, "madvise failed; pages stay resident");
        }
    }

    /// [`Self::release`] for the whole file, header and all (once nothing reads it but a
    /// slow path, which would fault its pages back).
    pub fn release_all(&self) {
        // SAFETY: as in `release`.
        let r = unsafe {
            self.mmap
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, 0, self.mmap.len())
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "madvise failed; pages stay resident");
        }
    }

    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.start..t.start + t.len]
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors
            .get(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_owned()))
    }

    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_owned()))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)?.as_u64().ok_or(GgufError::WrongType {
            key: key.to_owned(),
            expected: "unsigned integer",
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.get(key)?.as_f64().ok_or(GgufError::WrongType {
            key: key.to_owned(),
            expected: "number",
        })
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)?.as_str().ok_or(GgufError::WrongType {
            key: key.to_owned(),
            expected: "string",
        })
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value], GgufError> {
        match self.get(key)? {
            Value::Array(a) => Ok(a),
            _ => Err(GgufError::WrongType {
                key: key.to_owned(),
                expected: "array",
            }),
        }
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() as u64 {
            return Err(GgufError::Truncated {
                offset: self.pos,
                needed: n,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.u64()?;
        let bytes = self.take(n)?;
        // Real vocabularies hold a few byte tokens that are not valid UTF-8; keep them lossy.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// Checks that `count` items of at least `min_size` bytes each can still follow.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<(), GgufError> {
        match count.checked_mul(min_size) {
            Some(n) if n <= self.remaining() as u64 => Ok(()),
            _ => Err(GgufError::Implausible(format!(
                "{what}: {count} items cannot fit in the {} bytes left",
                self.remaining()
            ))),
        }
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(GgufError::Implausible("arrays nested too deeply".into()));
                }
                let item_ty = self.u32()?;
                let count = self.u64()?;
                self.check_count(count, min_value_size(item_ty)?, "array")?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(GgufError::ValueType(other)),
        })
    }
}

fn min_value_size(ty: u32) -> Result<u64, GgufError> {
    Ok(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10 | 11 | 12 => 8,
        9 => 12,
        other => return Err(GgufError::ValueType(other)),
    })
}

type Parsed = (HashMap<String, Value>, HashMap<String, TensorInfo>);

fn parse(buf: &[u8]) -> Result<Parsed, GgufError> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.u32()?;
    if magic != 0x4655_4747 {
        return Err(GgufError::BadMagic(magic));
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version(version));
    }
    let n_tensors = c.u64()?;
    let n_kv = c.u64()?;
    if n_tensors > MAX_TENSORS || n_kv > MAX_KV {
        return Err(GgufError::Implausible(format!(
            "{n_tensors} tensors and {n_kv} metadata keys"
        )));
    }
    c.check_count(n_kv, 12, "metadata")?;
    let mut metadata = HashMap::with_capacity(n_kv as usize);
    for _ in 0..n_kv {
        let key = c.string()?;
        let ty = c.u32()?;
        let value = c.value(ty, 0)?;
        metadata.insert(key, value);
    }

    c.check_count(n_tensors, 24, "tensor infos")?;
    let mut infos = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = c.string()?;
        let n_dims = c.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::Tensor {
                name,
                why: format!("{n_dims} dimensions"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64()?);
        }
        let ty_raw = c.u32()?;
        let offset = c.u64()?;
        let ty = GgmlType::from_u32(ty_raw).ok_or_else(|| GgufError::TensorType {
            name: name.clone(),
            ty: ty_raw,
        })?;
        infos.push((name, dims, ty, offset));
    }

    let alignment = match metadata.get("general.alignment").and_then(Value::as_u64) {
        Some(a) if a.is_power_of_two() && a <= 1 << 16 => a as usize,
        Some(a) => return Err(GgufError::Implausible(format!("alignment {a}"))),
        None => 32,
    };
    let data_start = c.pos.div_ceil(alignment) * alignment;

    let mut tensors = HashMap::with_capacity(infos.len());
    for (name, dims, ty, offset) in infos {
        let bad = |why: String| GgufError::Tensor {
            name: name.clone(),
            why,
        };
        let n_elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n > 0 && n < 1 << 40)
            .ok_or_else(|| bad(format!("absurd shape {dims:?}")))?;
        let (block, block_bytes) = ty.block();
        if dims[0] % block as u64 != 0 {
            return Err(bad(format!(
                "row length {} is not a multiple of the {:?} block of {block}",
                dims[0], ty
            )));
        }
        let len = n_elems / block as u64 * block_bytes as u64;
        let start = (data_start as u64)
            .checked_add(offset)
            .filter(|s| s % alignment as u64 == 0)
            .ok_or_else(|| bad(format!("misaligned offset {offset}")))?;
        if start
            .checked_add(len)
            .is_none_or(|end| end > buf.len() as u64)
        {
            return Err(bad(format!(
                "data at {start}..{} lies beyond the end of the file ({} bytes)",
                start.saturating_add(len),
                buf.len()
            )));
        }
        let info = TensorInfo {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as usize).collect(),
            ty,
            start: start as usize,
            len: len as usize,
        };
        if tensors.insert(name.clone(), info).is_some() {
            return Err(bad("appears twice".into()));
        }
    }
    Ok((metadata, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&n_tensors.to_le_bytes());
        b.extend_from_slice(&n_kv.to_le_bytes());
        b
    }

    #[test]
    fn rejects_bad_magic_and_truncation() {
        assert!(matches!(parse(b"GGML...."), Err(GgufError::BadMagic(_))));
        assert!(matches!(parse(b"GG"), Err(GgufError::Truncated { .. })));
        let h = header(0, 1);
        assert!(parse(&h).is_err());
    }

    #[test]
    fn rejects_absurd_counts_without_allocating() {
        assert!(matches!(
            parse(&header(u64::MAX, 0)),
            Err(GgufError::Implausible(_))
        ));
        assert!(matches!(
            parse(&header(0, 1 << 19)),
            Err(GgufError::Implausible(_))
        ));
        // An array that claims 2^60 items.
        let mut b = header(0, 1);
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b'k');
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(parse(&b), Err(GgufError::Implausible(_))));
    }

    #[test]
    fn rejects_tensor_beyond_end_and_unknown_type() {
        let mut b = header(1, 0);
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b't');
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&32u64.to_le_bytes());
        b.extend_from_slice(&1000u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // F32
        b.extend_from_slice(&0u64.to_le_bytes());
        assert!(matches!(parse(&b), Err(GgufError::Tensor { .. })));
        let n = b.len();
        b[n - 12..n - 8].copy_from_slice(&77u32.to_le_bytes());
        assert!(matches!(parse(&b), Err(GgufError::TensorType { .. })));
    }
}
