//! Loading HF safetensors weights (single file or sharded with an index) as plain tensors.
//!
//! Each file's header is validated, then its tensors are read one at a time with safe code and
//! converted to the requested dtype; tensors are never created implicitly: a missing or
//! misshapen weight is an error naming the tensor. With a quantized base, the projections are
//! quantized while loading, or read from the quantized base cache ([`super::quantized_cache`]).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::quantized_cache::{
    CacheKey, CacheOutcome, CacheWriter, Lookup, QuantizedCache, onto_device, planned_projections,
};
use super::shard::Shard;
use crate::model::placement::LayerDevices;
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
        Self::load_quantizing(files, dtype, &LayerDevices::single(device, 0), None)
    }

    /// Loads every tensor of the given files, converted to `dtype` onto its device of
    /// `placement` ([`LayerDevices::of_weight`]; a split model's tensors go through the host
    /// one at a time); with `quantize`, the projection weights ([`is_projection_weight`]) are
    /// quantized to that format instead, on the host as they are read: the host holds one
    /// tensor at a time, and no device ever holds a dense projection.
    pub fn load_quantizing(
        files: &[PathBuf],
        dtype: DType,
        placement: &LayerDevices,
        quantize: Option<GgmlDType>,
    ) -> Result<Self> {
        let shards = open_shards(files)?;
        let projections = match quantize {
            Some(format) => Projections::Quantize {
                format,
                cache: &mut None,
            },
            None => Projections::Dense,
        };
        Self::load_shards(&shards, dtype, placement, projections)
    }

    /// [`Self::load_quantizing`] to `format` through the quantized base cache: on a hit the
    /// projections come from the cache and only the other tensors are read from the shards (the
    /// projections' bytes are not read, nothing is quantized); otherwise the base is quantized
    /// while loading and the cache written as it goes, one quantized projection on the host at a
    /// time (a failed write is a warning). A cache that is stale or does not verify is a
    /// warning too: it is removed and rebuilt.
    pub fn load_quantizing_cached(
        files: &[PathBuf],
        dtype: DType,
        placement: &LayerDevices,
        format: GgmlDType,
        cache: &QuantizedCache,
    ) -> Result<(Self, CacheOutcome)> {
        let shards = open_shards(files)?;
        let planned = planned_projections(&shards);
        let key = CacheKey::new(format, &cache.model_commit, &shards);
        let problem = match cache.lookup(&key, &planned, format, placement) {
            Lookup::Hit(quantized) => {
                let mut weights = Self::load_shards(&shards, dtype, placement, Projections::Skip)?;
                weights.quantized = quantized;
                return Ok((weights, CacheOutcome::Hit));
            }
            Lookup::Absent => None,
            Lookup::Unusable(problem) => {
                tracing::warn!(
                    dir = %cache.dir.display(),
                    %problem,
                    "the quantized base cache cannot be used: removing it and quantizing again"
                );
                cache.remove();
                Some(problem)
            }
        };
        let mut writer = cache
            .writer(&key, &planned, format)
            .map_err(|e| warn_cache_write(cache, &e))
            .ok();
        let weights = Self::load_shards(
            &shards,
            dtype,
            placement,
            Projections::Quantize {
                format,
                cache: &mut writer,
            },
        )?;
        let written =
            writer.is_some_and(|w| w.finish().map_err(|e| warn_cache_write(cache, &e)).is_ok());
        let outcome = match problem {
            None => CacheOutcome::Miss { written },
            Some(problem) => CacheOutcome::Rebuilt { problem, written },
        };
        Ok((weights, outcome))
    }

    /// Reads the shards tensor by tensor: the projections as `projections` says, every other
    /// tensor converted to `dtype` on its device of `placement`.
    fn load_shards(
        shards: &[Shard],
        dtype: DType,
        placement: &LayerDevices,
        mut projections: Projections<'_>,
    ) -> Result<Self> {
        // With a quantized base every tensor goes through the host, on a hit as on a miss, so
        // both convert the dense tensors alike; so does every tensor of a split model.
        let load_on = match projections {
            Projections::Quantize { .. } | Projections::Skip => &Device::Cpu,
            Projections::Dense if placement.is_split() => &Device::Cpu,
            Projections::Dense => placement.input(),
        };
        let skip_projections = matches!(projections, Projections::Skip);
        let mut map = HashMap::new();
        let mut quantized = HashMap::new();
        for shard in shards {
            shard.for_each_tensor(
                load_on,
                |info| !(skip_projections && is_projection_weight(&info.name)),
                |info, t| {
                    let device = placement.of_weight(&info.name);
                    if let Projections::Quantize { format, cache } = &mut projections
                        && is_projection_weight(&info.name)
                    {
                        let q = quantize_projection(&info.name, &t, *format, device, cache)?;
                        quantized.insert(info.name.clone(), Arc::new(q));
                        return Ok(());
                    }
                    let t = if t.dtype() == dtype {
                        t
                    } else {
                        t.to_dtype(dtype)?
                    };
                    map.insert(info.name.clone(), t.to_device(device)?);
                    Ok(())
                },
            )?;
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

/// What [`Weights::load_shards`] does with the projection weights.
enum Projections<'a> {
    /// Loads them like every other tensor.
    Dense,
    /// Quantizes them to `format`, appending each to the cache being written, if any.
    Quantize {
        /// The GGML format.
        format: GgmlDType,
        /// The cache being written (`None` when there is none or its write failed).
        cache: &'a mut Option<CacheWriter>,
    },
    /// Does not read them (they come from the cache).
    Skip,
}

fn open_shards(files: &[PathBuf]) -> Result<Vec<Shard>> {
    files.iter().map(|f| Shard::open(f)).collect()
}

/// Quantizes one projection on the host, appends it to the cache being written (a failed write
/// is a warning, and the cache is abandoned), and moves it to `device`.
fn quantize_projection(
    name: &str,
    t: &Tensor,
    format: GgmlDType,
    device: &Device,
    cache: &mut Option<CacheWriter>,
) -> Result<QTensor> {
    let q = QTensor::quantize(t, format).map_err(|e| TrainerError::Weight {
        name: name.to_string(),
        reason: format!("cannot be quantized to {format:?}: {e}"),
    })?;
    if let Some(writer) = cache.as_mut()
        && let Err(e) = writer.append(name, &q)
    {
        tracing::warn!(error = %e, "cannot write the quantized base cache: training goes on without it");
        *cache = None;
    }
    onto_device(q, device)
}

/// Logs a failed cache write (training goes on without the cache).
fn warn_cache_write(cache: &QuantizedCache, e: &TrainerError) {
    tracing::warn!(
        dir = %cache.dir.display(),
        error = %e,
        "cannot write the quantized base cache: training goes on without it"
    );
}
