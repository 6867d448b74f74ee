//! One safetensors shard read tensor by tensor: its header is validated first (offsets, dtypes,
//! shapes, sizes; see `finetune_formats::safetensors`), then each tensor's bytes are read, or
//! skipped, in file order, so the host holds one tensor at a time, never the whole shard.

use candle_core::{DType, Device, Tensor};
use finetune_formats::safetensors::{Header, TensorInfo};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::{Result, TrainerError};

/// A safetensors file whose header has been validated.
#[derive(Debug, Clone)]
pub struct Shard {
    /// The file.
    pub path: PathBuf,
    /// Its length in bytes.
    pub file_len: u64,
    /// Its validated header (tensors sorted by data offset).
    pub header: Header,
}

/// The candle dtype of a safetensors dtype name, `None` for one candle cannot hold.
fn candle_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I16" => DType::I16,
        "I32" => DType::I32,
        "I64" => DType::I64,
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F32" => DType::F32,
        "F64" => DType::F64,
        "F8_E4M3" => DType::F8E4M3,
        _ => return None,
    })
}

impl Shard {
    /// Reads and validates the header of the safetensors file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let header = finetune_formats::safetensors::validate_file(path)?;
        let file_len = std::fs::metadata(path)
            .map_err(|e| TrainerError::io(path, e))?
            .len();
        Ok(Self {
            path: path.to_path_buf(),
            file_len,
            header,
        })
    }

    /// Offset of the data area in the file.
    fn data_start(&self) -> u64 {
        8 + self.header.header_len as u64
    }

    /// Reads the tensors that `wanted` selects, in file order, each onto `device`, and hands each
    /// to `each` before the next is read; the others are skipped without being read.
    pub fn for_each_tensor(
        &self,
        device: &Device,
        mut wanted: impl FnMut(&TensorInfo) -> bool,
        mut each: impl FnMut(&TensorInfo, Tensor) -> Result<()>,
    ) -> Result<()> {
        let io = |e| TrainerError::io(&self.path, e);
        let mut reader = File::open(&self.path).map_err(io)?;
        let mut bytes = Vec::new();
        for info in &self.header.tensors {
            if !wanted(info) {
                continue;
            }
            let (begin, end) = info.data_offsets;
            reader
                .seek(SeekFrom::Start(self.data_start() + begin as u64))
                .map_err(io)?;
            bytes.resize(end - begin, 0);
            reader.read_exact(&mut bytes).map_err(io)?;
            let dtype = candle_dtype(&info.dtype).ok_or_else(|| TrainerError::Weight {
                name: info.name.clone(),
                reason: format!("dtype {} is not supported", info.dtype),
            })?;
            let tensor = Tensor::from_raw_buffer(&bytes, dtype, &info.shape, device)?;
            each(info, tensor)?;
        }
        Ok(())
    }
}
