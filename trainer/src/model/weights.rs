//! Loading HF safetensors weights (single file or sharded with an index) as plain tensors.
//!
//! The files are read into memory with safe code and converted to the requested dtype; tensors are
//! never created implicitly: a missing or misshapen weight is an error naming the tensor.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{Result, TrainerError};

/// A set of named tensors taken from safetensors files.
#[derive(Debug, Default)]
pub struct Weights {
    map: HashMap<String, Tensor>,
}

/// Loads a safetensors file after validating its header (offsets, dtypes, shapes, sizes), so that
/// candle's loader never sees an inconsistent file.
pub fn load_checked(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| TrainerError::io(path, e))?;
    finetune_formats::safetensors::validate(
        &path.display().to_string(),
        &bytes,
        bytes.len() as u64,
    )?;
    Ok(candle_core::safetensors::load_buffer(&bytes, device)?)
}

/// The safetensors files of a model directory: the shards named in `model.safetensors.index.json`,
/// or `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| TrainerError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| TrainerError::Config(format!("{}: no weight_map", index.display())))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        // Shards are plain file names beside the index: `../../etc/passwd` is refused.
        if let Some(bad) = files
            .iter()
            .find(|f| !finetune_formats::manifest::is_plain_file_name(f))
        {
            return Err(TrainerError::Config(format!(
                "{}: shard {bad:?} is not a plain file name in the model directory",
                index.display()
            )));
        }
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(TrainerError::Config(format!(
        "{}: neither model.safetensors nor model.safetensors.index.json",
        dir.display()
    )))
}

impl Weights {
    /// Loads every tensor of the given files, converted to `dtype` on `device`.
    pub fn load(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut map = HashMap::new();
        for f in files {
            let bytes = std::fs::read(f).map_err(|e| TrainerError::io(f, e))?;
            finetune_formats::safetensors::validate(
                &f.display().to_string(),
                &bytes,
                bytes.len() as u64,
            )?;
            let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
            drop(bytes);
            for (name, t) in tensors {
                let t = if t.dtype() == dtype {
                    t
                } else {
                    t.to_dtype(dtype)?
                };
                map.insert(name, t);
            }
        }
        Ok(Self { map })
    }

    /// Loads the weights of a model directory.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load(&weight_files(dir)?, dtype, device)
    }

    /// Wraps an existing map.
    pub fn from_map(map: HashMap<String, Tensor>) -> Self {
        Self { map }
    }

    /// Takes a tensor by name, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.map.remove(name).ok_or_else(|| TrainerError::Weight {
            name: name.to_string(),
            reason: "missing".to_string(),
        })?;
        if t.dims() != shape {
            return Err(TrainerError::Weight {
                name: name.to_string(),
                reason: format!("shape {:?}, expected {:?}", t.dims(), shape),
            });
        }
        Ok(t)
    }

    /// Whether a tensor is present.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Names not consumed yet.
    pub fn remaining(&self) -> Vec<String> {
        let mut v: Vec<String> = self.map.keys().cloned().collect();
        v.sort();
        v
    }
}
