//! Loading HF safetensors weights (single file or sharded with an index) as plain tensors.
//!
//! The files are read into memory with safe code and converted to the requested dtype; tensors are
//! never created implicitly: a missing or misshapen weight is an error naming the tensor.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{Result, TrainerError};

/// A set of named tensors taken from safetensors files.
#[derive(Debug, Default)]
pub struct Weights {
    map: HashMap<String, Tensor>,
    /// Projection weights quantized while loading (LoRA over a quantized base).
    quantized: HashMap<String, Arc<QTensor>>,
}

/// Whether `name` is the weight of a decoder layer's projection (`model.layers.N.*_proj.weight`),
/// what a quantized base quantizes.
pub fn is_projection_weight(name: &str) -> bool {
    name.strip_prefix("model.layers.")
        .and_then(|rest| rest.strip_suffix(".weight"))
        .and_then(|rest| rest.rsplit('.').next())
        .is_some_and(|module| super::lora::ALL_TARGETS.contains(&module))
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
        Self::load_quantizing(files, dtype, device, None)
    }

    /// Loads every tensor of the given files, converted to `dtype` on `device`; with `quantize`,
    /// the projection weights ([`is_projection_weight`]) are quantized to that format instead,
    /// one tensor at a time on the host, so neither the host (one shard at a time) nor the device
    /// ever holds the dense projections.
    pub fn load_quantizing(
        files: &[PathBuf],
        dtype: DType,
        device: &Device,
        quantize: Option<GgmlDType>,
    ) -> Result<Self> {
        let mut map = HashMap::new();
        let mut quantized = HashMap::new();
        for f in files {
            let bytes = std::fs::read(f).map_err(|e| TrainerError::io(f, e))?;
            finetune_formats::safetensors::validate(
                &f.display().to_string(),
                &bytes,
                bytes.len() as u64,
            )?;
            let load_on = if quantize.is_some() {
                &Device::Cpu
            } else {
                device
            };
            let tensors = candle_core::safetensors::load_buffer(&bytes, load_on)?;
            drop(bytes);
            for (name, t) in tensors {
                if let Some(format) = quantize.filter(|_| is_projection_weight(&name)) {
                    let q = QTensor::quantize_onto(&t, format, device).map_err(|e| {
                        TrainerError::Weight {
                            name: name.clone(),
                            reason: format!("cannot be quantized to {format:?}: {e}"),
                        }
                    })?;
                    quantized.insert(name, Arc::new(q));
                    continue;
                }
                let t = if t.dtype() == dtype {
                    t
                } else {
                    t.to_dtype(dtype)?
                };
                map.insert(name, t.to_device(device)?);
            }
        }
        Ok(Self { map, quantized })
    }

    /// Loads the weights of a model directory.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load(&weight_files(dir)?, dtype, device)
    }

    /// Wraps an existing map.
    pub fn from_map(map: HashMap<String, Tensor>) -> Self {
        Self {
            map,
            quantized: HashMap::new(),
        }
    }

    /// Takes a weight quantized while loading, by name, checking its shape (`None` when it was
    /// not quantized).
    pub fn take_quantized(&mut self, name: &str, shape: &[usize]) -> Result<Option<Arc<QTensor>>> {
        let Some(q) = self.quantized.remove(name) else {
            return Ok(None);
        };
        if q.shape().dims() != shape {
            return Err(TrainerError::Weight {
                name: name.to_string(),
                reason: format!("shape {:?}, expected {:?}", q.shape().dims(), shape),
            });
        }
        Ok(Some(q))
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
        self.map.contains_key(name) || self.quantized.contains_key(name)
    }

    /// Names not consumed yet.
    pub fn remaining(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .map
            .keys()
            .chain(self.quantized.keys())
            .cloned()
            .collect();
        v.sort();
        v
    }
}
