//! Validation of safetensors files before any tensor loader sees them: a bounded header length,
//! a JSON header of known dtypes, and data offsets that lie in the file, match each tensor's
//! dtype and shape, and cover the data area exactly (no overlap, no gap).

use serde_json::Value;
use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// Largest header accepted (the safetensors reference implementation uses the same bound).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Most dimensions a tensor may have.
pub const MAX_RANK: usize = 16;

/// One tensor as described by the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Dtype name as written (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range in the data area.
    pub data_offsets: (usize, usize),
}

/// A validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Length of the JSON header in bytes.
    pub header_len: usize,
    /// Tensors sorted by data offset.
    pub tensors: Vec<TensorInfo>,
}

/// Size in bytes of one element of a dtype, `None` when unknown or sub-byte.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

fn bad(path: &str, reason: impl Into<String>) -> Error {
    Error::Safetensors {
        path: path.into(),
        reason: reason.into(),
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}

fn tensor_info(path: &str, name: &str, v: &Value) -> Result<TensorInfo> {
    let obj = v
        .as_object()
        .ok_or_else(|| bad(path, format!("tensor {name:?}: not an object")))?;
    for key in obj.keys() {
        if !matches!(key.as_str(), "dtype" | "shape" | "data_offsets") {
            return Err(bad(path, format!("tensor {name:?}: unknown key {key:?}")));
        }
    }
    let dtype = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(path, format!("tensor {name:?}: no dtype")))?;
    let size = dtype_size(dtype).ok_or_else(|| {
        bad(
            path,
            format!("tensor {name:?}: unsupported dtype {dtype:?}"),
        )
    })?;
    let shape_v = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(path, format!("tensor {name:?}: no shape")))?;
    if shape_v.len() > MAX_RANK {
        return Err(bad(
            path,
            format!("tensor {name:?}: rank {} > {MAX_RANK}", shape_v.len()),
        ));
    }
    let shape = shape_v
        .iter()
        .map(as_usize)
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| {
            bad(
                path,
                format!("tensor {name:?}: shape is not a list of sizes"),
            )
        })?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .and_then(|a| match a.as_slice() {
            [b, e] => Some((as_usize(b)?, as_usize(e)?)),
            _ => None,
        })
        .ok_or_else(|| {
            bad(
                path,
                format!("tensor {name:?}: data_offsets is not [begin, end]"),
            )
        })?;
    let bytes = shape
        .iter()
        .try_fold(size, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            bad(
                path,
                format!("tensor {name:?}: size of shape {shape:?} overflows"),
            )
        })?;
    if offsets.1 < offsets.0 || offsets.1 - offsets.0 != bytes {
        return Err(bad(
            path,
            format!(
                "tensor {name:?}: data_offsets {offsets:?} hold {} bytes, but {dtype} {shape:?} needs {bytes}",
                offsets.1.saturating_sub(offsets.0)
            ),
        ));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype: dtype.to_string(),
        shape,
        data_offsets: offsets,
    })
}

/// Validates a header given the file's first bytes (at least 8 plus the header length) and the
/// whole file's length. `path` only names the file in errors.
pub fn validate(path: &str, prefix: &[u8], file_len: u64) -> Result<Header> {
    let n_bytes: [u8; 8] = prefix
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            bad(
                path,
                format!("{file_len} bytes, shorter than the 8-byte header length"),
            )
        })?;
    let n = u64::from_le_bytes(n_bytes);
    if n > MAX_HEADER_BYTES {
        return Err(bad(
            path,
            format!("header length {n} exceeds {MAX_HEADER_BYTES}"),
        ));
    }
    if n.saturating_add(8) > file_len {
        return Err(bad(
            path,
            format!("header length {n} runs past the end of the {file_len}-byte file"),
        ));
    }
    let header_len = n as usize;
    let header = prefix
        .get(8..8 + header_len)
        .ok_or_else(|| bad(path, "header truncated"))?;
    let text = std::str::from_utf8(header).map_err(|e| bad(path, format!("header: {e}")))?;
    if !text.starts_with('{') {
        return Err(bad(path, "header does not start with '{'"));
    }
    let v: Value = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|e| bad(path, format!("header: {e}")))?;
    let map = v
        .as_object()
        .ok_or_else(|| bad(path, "header is not a JSON object"))?;
    let mut tensors = Vec::with_capacity(map.len());
    for (name, entry) in map {
        if name == "__metadata__" {
            let ok = entry
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string));
            if !ok {
                return Err(bad(path, "__metadata__ is not a map of strings"));
            }
            continue;
        }
        tensors.push(tensor_info(path, name, entry)?);
    }
    tensors.sort_by_key(|t| t.data_offsets);
    let data_len = file_len - 8 - n;
    let mut expected = 0usize;
    for t in &tensors {
        if t.data_offsets.0 != expected {
            return Err(bad(
                path,
                format!(
                    "tensor {:?} starts at {} but the previous data ends at {expected} (overlap or gap)",
                    t.name, t.data_offsets.0
                ),
            ));
        }
        expected = t.data_offsets.1;
    }
    if expected as u64 != data_len {
        return Err(bad(
            path,
            format!("tensors cover {expected} bytes but the data area has {data_len}"),
        ));
    }
    Ok(Header {
        header_len,
        tensors,
    })
}

/// Validates a whole in-memory safetensors buffer.
pub fn validate_buffer(bytes: &[u8]) -> Result<Header> {
    validate("<buffer>", bytes, bytes.len() as u64)
}

/// Validates a safetensors file, reading only its header.
pub fn validate_file(path: &Path) -> Result<Header> {
    let name = path.display().to_string();
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = f.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(bad(&name, "not a regular file"));
    }
    let len = meta.len();
    let mut n = [0u8; 8];
    if len < 8 {
        return Err(bad(
            &name,
            format!("{len} bytes, shorter than the 8-byte header length"),
        ));
    }
    f.read_exact(&mut n).map_err(|e| Error::io(path, e))?;
    let h = u64::from_le_bytes(n);
    if h > MAX_HEADER_BYTES || h.saturating_add(8) > len {
        return validate(&name, &n, len);
    }
    let mut prefix = Vec::with_capacity(8 + h as usize);
    prefix.extend_from_slice(&n);
    (&mut f)
        .take(h)
        .read_to_end(&mut prefix)
        .map_err(|e| Error::io(path, e))?;
    validate(&name, &prefix, len)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data));
        v
    }

    #[test]
    fn accepts_consistent_and_refuses_inconsistent_files() {
        let ok = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}}"#;
        let h = validate_buffer(&file(ok, 16)).unwrap();
        assert_eq!(h.tensors[0].name, "a");
        assert_eq!(h.tensors[1].shape, vec![2]);
        for (bytes, why) in [
            (file(ok, 15), "data area has 15"),
            (file(ok, 17), "data area has 17"),
            (vec![1, 2, 3], "shorter than the 8-byte"),
            (
                {
                    let mut v = u64::MAX.to_le_bytes().to_vec();
                    v.push(b'{');
                    v
                },
                "exceeds",
            ),
            (
                {
                    let mut v = 1000u64.to_le_bytes().to_vec();
                    v.extend_from_slice(b"{}");
                    v
                },
                "runs past the end",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                    8,
                ),
                "needs 12",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                    12,
                ),
                "overlap or gap",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}}"#,
                    8,
                ),
                "overflows",
            ),
            (
                file(
                    r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#,
                    8,
                ),
                "unsupported dtype",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
                    8,
                ),
                "hold 0 bytes",
            ),
            (file(r#"[1]"#, 0), "does not start"),
        ] {
            let e = validate_buffer(&bytes).unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
    }
}
