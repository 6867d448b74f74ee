//! Atomic file writes: temporary file, fsync, rename, fsync of the directory.

use candle_core::Tensor;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Result, TrainerError};

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Flushes a directory's entries to disk.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(|e| TrainerError::io(dir, e))?;
    f.sync_all().map_err(|e| TrainerError::io(dir, e))
}

fn fsync_file(path: &Path) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .open(path)
        .map_err(|e| TrainerError::io(path, e))?;
    f.sync_all().map_err(|e| TrainerError::io(path, e))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| TrainerError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| TrainerError::io(&tmp, e))?;
        f.sync_all().map_err(|e| TrainerError::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| TrainerError::io(path, e))?;
    fsync_dir(parent(path))
}

/// Saves tensors as safetensors atomically.
pub fn save_safetensors_atomic(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let tmp = tmp_path(path);
    // candle's error does not name the file: add it (a full volume reads
    // "<path>: No space left on device (os error 28)").
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| match e {
        candle_core::Error::Io(io) => TrainerError::io(&tmp, io),
        other => TrainerError::Checkpoint {
            path: tmp.clone(),
            reason: other.to_string(),
        },
    })?;
    fsync_file(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| TrainerError::io(path, e))?;
    fsync_dir(parent(path))
}

/// SHA-256 of a file, hex encoded.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| TrainerError::io(path, e))?;
    let digest = Sha256::digest(&bytes);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}
