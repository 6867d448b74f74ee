//! The quantized base cached on the checkpoint volume (LoRA over a quantized base), so that a
//! restarted pod reads the quantized projections back instead of quantizing a 70B base again.
//!
//! The cache is `{dir}/base.gguf` (a GGUF file of the quantized projections) and `{dir}/base.json`
//! (its manifest: the [`CacheKey`], the GGUF's size and SHA-256). The key is the cache layout's
//! version, the GGML format, the model revision (the hub commit recorded by the download, when
//! there is one) and a fingerprint of the weight files (each shard's name and size and its
//! header's tensor names, dtypes, shapes and offsets); the GGUF carries the key's digest and the
//! format in its metadata too. A cache is used only when the manifest's key equals the job's and
//! the GGUF parses, holds exactly the planned projections with their shapes and format, and
//! hashes to the manifest's digest; anything else is a [`CacheProblem`]: the files are removed
//! and the base is quantized again. The names are fixed, so only the current cache is kept.
//!
//! Both files are written atomically (a temporary file, fsync, rename, fsync of the directory),
//! the manifest after the GGUF: a pod killed mid-write leaves no manifest (the GGUF is not
//! trusted) or a temporary file, which the next writer removes once it is stale.
//!
//! Without a commit, a weight file rewritten in place with the same names, shapes and size is not
//! noticed: hashing every weight would cost about what the cache saves. Downloads from the hub
//! always record the commit.

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QStorage, QTensor, ggml_file, gguf_file};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::shard::Shard;
use super::weights::is_projection_weight;
use crate::model::placement::LayerDevices;
use crate::{Result, TrainerError};

/// File name of the cached GGUF in the cache directory.
pub const GGUF_FILE: &str = "base.gguf";
/// File name of the manifest (key, size and SHA-256 of the GGUF), written after the GGUF.
pub const MANIFEST_FILE: &str = "base.json";
/// Version of the cache's layout and of the quantization it holds: bump it when either changes,
/// so that older caches are rebuilt.
const LAYOUT_VERSION: u32 = 1;
/// GGUF metadata key holding the cache key's digest.
const METADATA_KEY: &str = "finetune.quantized_base.key";
/// GGUF metadata key holding the GGML format's name.
const METADATA_FORMAT: &str = "finetune.quantized_base.format";
/// Alignment of the GGUF's data area and of each tensor in it (GGUF's default).
const ALIGNMENT: u64 = gguf_file::DEFAULT_ALIGNMENT;
/// A temporary file older than this is a killed writer's, and is removed.
const STALE_TEMPORARY_AGE: Duration = Duration::from_secs(600);

/// Where the quantized base is cached, and the model revision it is cached for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizedCache {
    /// The cache directory (on the checkpoint volume, shared by the job's attempts).
    pub dir: PathBuf,
    /// The hub commit of the model (`finetune_api::ModelSource`), empty when unknown.
    pub model_commit: String,
}

/// What the cache is keyed by: a cache whose key differs is stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    /// [`LAYOUT_VERSION`] of the trainer that wrote it.
    pub layout: u32,
    /// The GGML format of the projections (`Q8_0`, `Q4_0`).
    pub format: String,
    /// The model's hub commit, empty when unknown.
    pub model_commit: String,
    /// SHA-256 of the weight files' names, sizes and headers.
    pub weights_fingerprint: String,
}

/// Why a cache that was there could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheProblem {
    /// Built for another layout, format, model revision or other weight files.
    Stale(String),
    /// Incomplete, unreadable or failing verification (checksum, GGUF structure, tensors).
    Corrupt(String),
}

impl std::fmt::Display for CacheProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheProblem::Stale(why) => write!(f, "stale: {why}"),
            CacheProblem::Corrupt(why) => write!(f, "corrupt: {why}"),
        }
    }
}

/// What a load did with the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// The projections came from the cache: nothing was quantized.
    Hit,
    /// There was no cache: the base was quantized, and the cache written unless that failed.
    Miss {
        /// Whether the new cache was written.
        written: bool,
    },
    /// The cache could not be used: it was removed, the base quantized, and the cache written
    /// again unless that failed.
    Rebuilt {
        /// Why the old cache was not used.
        problem: CacheProblem,
        /// Whether the new cache was written.
        written: bool,
    },
}

impl std::fmt::Display for CacheOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let written = |w: &bool| if *w { "written" } else { "not written" };
        match self {
            CacheOutcome::Hit => write!(f, "hit"),
            CacheOutcome::Miss { written: w } => write!(f, "miss, cache {}", written(w)),
            CacheOutcome::Rebuilt {
                problem,
                written: w,
            } => {
                write!(f, "rebuilt ({problem}), cache {}", written(w))
            }
        }
    }
}

/// A projection the cache holds, in the order the shards are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedTensor {
    /// The HF tensor name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// The projections of the shards ([`is_projection_weight`]), in reading order: shard by shard,
/// each in file order.
pub fn planned_projections(shards: &[Shard]) -> Vec<CachedTensor> {
    shards
        .iter()
        .flat_map(|s| s.header.tensors.iter())
        .filter(|t| is_projection_weight(&t.name))
        .map(|t| CachedTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of what identifies the weight files without reading their data: each shard's file
/// name and size, and its header's tensor names, dtypes, shapes and offsets.
pub fn weights_fingerprint(shards: &[Shard]) -> String {
    let mut hasher = Sha256::new();
    for shard in shards {
        let name = shard.path.file_name().unwrap_or_default().to_string_lossy();
        hasher.update(format!("file {name} {}\n", shard.file_len));
        for t in &shard.header.tensors {
            hasher.update(format!(
                "tensor {} {} {:?} {:?}\n",
                t.name, t.dtype, t.shape, t.data_offsets
            ));
        }
    }
    hex(&hasher.finalize())
}

impl CacheKey {
    /// The key of `format` for a model at `model_commit` (empty when unknown) made of `shards`.
    pub fn new(format: GgmlDType, model_commit: &str, shards: &[Shard]) -> Self {
        Self {
            layout: LAYOUT_VERSION,
            format: format!("{format:?}"),
            model_commit: model_commit.to_string(),
            weights_fingerprint: weights_fingerprint(shards),
        }
    }

    /// SHA-256 of the key's fields, stored in the GGUF's metadata.
    pub fn digest(&self) -> String {
        let basis = format!(
            "{}\n{}\n{}\n{}",
            self.layout, self.format, self.model_commit, self.weights_fingerprint
        );
        hex(&Sha256::digest(basis.as_bytes()))
    }

    /// What differs between a cache's key (`self`) and the job's (`wanted`), for the warning.
    fn difference(&self, wanted: &CacheKey) -> String {
        let mut what = Vec::new();
        if self.layout != wanted.layout {
            what.push(format!("layout {} (now {})", self.layout, wanted.layout));
        }
        if self.format != wanted.format {
            what.push(format!("format {} (now {})", self.format, wanted.format));
        }
        if self.model_commit != wanted.model_commit {
            what.push(format!(
                "model commit {:?} (now {:?})",
                self.model_commit, wanted.model_commit
            ));
        }
        if self.weights_fingerprint != wanted.weights_fingerprint {
            what.push("weight files differ (names, sizes or headers)".to_string());
        }
        format!("built for {}", what.join(", "))
    }
}

/// The manifest written beside the GGUF once it is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    /// The key the GGUF was built for.
    key: CacheKey,
    /// The GGUF's size in bytes.
    gguf_bytes: u64,
    /// The GGUF's SHA-256, hex encoded.
    gguf_sha256: String,
}

/// Bytes of one tensor of `shape` in `format`, `None` when the shape does not divide in blocks.
fn tensor_bytes(format: GgmlDType, shape: &[usize]) -> Option<u64> {
    let elements: usize = shape.iter().product();
    let block = format.block_size();
    elements
        .is_multiple_of(block)
        .then(|| (elements / block * format.type_size()) as u64)
}

/// Zero bytes that pad `len` to [`ALIGNMENT`].
fn padding(len: u64) -> u64 {
    len.next_multiple_of(ALIGNMENT) - len
}

/// GGML's number for a format (`ggml.h`), what a GGUF tensor entry records.
fn ggml_type_id(format: GgmlDType) -> u32 {
    match format {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// A reader or writer that hashes every byte through it.
struct Hashing<T> {
    inner: T,
    hasher: Sha256,
    bytes: u64,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    fn digest(&self) -> String {
        hex(&self.hasher.clone().finalize())
    }
}

impl<T: Read> Read for Hashing<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<T: Write> Write for Hashing<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// What [`QuantizedCache::lookup`] found.
pub(crate) enum Lookup {
    /// A verified cache: the projections, on the device.
    Hit(HashMap<String, Arc<QTensor>>),
    /// No cache.
    Absent,
    /// A cache that cannot be used.
    Unusable(CacheProblem),
}

impl QuantizedCache {
    fn gguf_path(&self) -> PathBuf {
        self.dir.join(GGUF_FILE)
    }

    fn manifest_path(&self) -> PathBuf {
        self.dir.join(MANIFEST_FILE)
    }

    /// Looks the cache up for `key`, which must hold the `planned` projections in `format`, and
    /// reads each onto its device of `placement` if it verifies. Never fails: what goes wrong is
    /// a problem.
    pub(crate) fn lookup(
        &self,
        key: &CacheKey,
        planned: &[CachedTensor],
        format: GgmlDType,
        placement: &LayerDevices,
    ) -> Lookup {
        let manifest = match read_manifest(&self.manifest_path()) {
            Ok(Some(manifest)) => manifest,
            Ok(None) if self.gguf_path().exists() => {
                return Lookup::Unusable(CacheProblem::Corrupt(format!(
                    "{} has no {MANIFEST_FILE}: its write did not finish",
                    self.gguf_path().display()
                )));
            }
            Ok(None) => return Lookup::Absent,
            Err(problem) => return Lookup::Unusable(problem),
        };
        if manifest.key != *key {
            return Lookup::Unusable(CacheProblem::Stale(manifest.key.difference(key)));
        }
        let verified = VerifiedRead {
            path: &self.gguf_path(),
            manifest: &manifest,
            planned,
            format,
        };
        match verified.read(placement) {
            Ok(tensors) => Lookup::Hit(tensors),
            Err(problem) => Lookup::Unusable(problem),
        }
    }

    /// Removes the cache's files (a failure is a warning: the rebuild overwrites them).
    pub(crate) fn remove(&self) {
        for path in [self.manifest_path(), self.gguf_path()] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove the quantized base cache")
                }
            }
        }
    }

    /// Starts writing the cache of `key`: the GGUF header of the `planned` projections in
    /// `format` goes to a temporary file, then each projection as it is quantized
    /// ([`CacheWriter::append`]); stale temporary files of killed writers are removed first.
    pub(crate) fn writer(
        &self,
        key: &CacheKey,
        planned: &[CachedTensor],
        format: GgmlDType,
    ) -> Result<CacheWriter> {
        std::fs::create_dir_all(&self.dir).map_err(|e| TrainerError::io(&self.dir, e))?;
        self.remove_stale_temporaries();
        CacheWriter::create(self, key, planned, format)
    }

    /// Removes the temporary files of writers killed mid-write (older than
    /// [`STALE_TEMPORARY_AGE`]; a live writer's file is newer, it writes as it goes).
    fn remove_stale_temporaries(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let temporary = [GGUF_FILE, MANIFEST_FILE]
                .iter()
                .any(|f| name.starts_with(&format!("{f}.tmp-")));
            let age = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok());
            if temporary && age.is_some_and(|a| a > STALE_TEMPORARY_AGE) {
                tracing::info!(file = %entry.path().display(), "removing a stale temporary file of the quantized base cache");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Reads the manifest: `None` when there is none.
fn read_manifest(path: &Path) -> std::result::Result<Option<Manifest>, CacheProblem> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None);
        }
        Err(e) => {
            return Err(CacheProblem::Corrupt(format!("{}: {e}", path.display())));
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| CacheProblem::Corrupt(format!("{}: {e}", path.display())))
}

/// The verification and read of a cached GGUF against its manifest and the planned projections.
struct VerifiedRead<'a> {
    path: &'a Path,
    manifest: &'a Manifest,
    planned: &'a [CachedTensor],
    format: GgmlDType,
}

impl VerifiedRead<'_> {
    fn corrupt(&self, what: impl std::fmt::Display) -> CacheProblem {
        CacheProblem::Corrupt(format!("{}: {what}", self.path.display()))
    }

    /// Checks the size, the GGUF structure, the metadata and the tensors' names, shapes and
    /// format, then reads every byte once, hashing it, and builds each projection on its device
    /// of `placement`; the projections are returned only when the hash equals the manifest's.
    fn read(
        &self,
        placement: &LayerDevices,
    ) -> std::result::Result<HashMap<String, Arc<QTensor>>, CacheProblem> {
        let mut file = File::open(self.path).map_err(|e| self.corrupt(e))?;
        let len = file.metadata().map_err(|e| self.corrupt(e))?.len();
        if len != self.manifest.gguf_bytes {
            return Err(self.corrupt(format!(
                "{len} bytes where the manifest says {}",
                self.manifest.gguf_bytes
            )));
        }
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| self.corrupt(format!("not a readable GGUF: {e}")))?;
        self.check_metadata(&content)?;
        self.check_tensors(&content)?;
        file.seek(SeekFrom::Start(0)).map_err(|e| self.corrupt(e))?;
        let mut reader = Hashing::new(file);
        let tensors = self.read_tensors(&mut reader, &content, placement)?;
        let digest = reader.digest();
        if digest != self.manifest.gguf_sha256 {
            return Err(self.corrupt(format!(
                "SHA-256 {digest} differs from the manifest's {}",
                self.manifest.gguf_sha256
            )));
        }
        Ok(tensors)
    }

    fn check_metadata(
        &self,
        content: &gguf_file::Content,
    ) -> std::result::Result<(), CacheProblem> {
        let string = |key: &str| {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_string().ok())
                .cloned()
                .unwrap_or_default()
        };
        let digest = self.manifest.key.digest();
        if string(METADATA_KEY) != digest {
            return Err(self.corrupt(format!(
                "metadata key {:?} differs from the manifest's {digest}",
                string(METADATA_KEY)
            )));
        }
        if string(METADATA_FORMAT) != self.manifest.key.format {
            return Err(self.corrupt(format!(
                "metadata format {:?} differs from the manifest's {}",
                string(METADATA_FORMAT),
                self.manifest.key.format
            )));
        }
        Ok(())
    }

    /// The GGUF holds exactly the planned projections, each with its shape, in the format.
    fn check_tensors(&self, content: &gguf_file::Content) -> std::result::Result<(), CacheProblem> {
        if content.tensor_infos.len() != self.planned.len() {
            return Err(self.corrupt(format!(
                "{} tensors where the model has {} projections",
                content.tensor_infos.len(),
                self.planned.len()
            )));
        }
        for planned in self.planned {
            let info = content
                .tensor_infos
                .get(&planned.name)
                .ok_or_else(|| self.corrupt(format!("no tensor {}", planned.name)))?;
            if info.shape.dims() != planned.shape.as_slice() || info.ggml_dtype != self.format {
                return Err(self.corrupt(format!(
                    "tensor {} is {:?} {:?}, expected {:?} {:?}",
                    planned.name,
                    info.ggml_dtype,
                    info.shape.dims(),
                    self.format,
                    planned.shape
                )));
            }
        }
        Ok(())
    }

    /// Reads the whole file through `reader` in order: the header, then each tensor (building it
    /// on its device of `placement`), the padding between them and after the last.
    fn read_tensors(
        &self,
        reader: &mut Hashing<File>,
        content: &gguf_file::Content,
        placement: &LayerDevices,
    ) -> std::result::Result<HashMap<String, Arc<QTensor>>, CacheProblem> {
        let mut by_offset: Vec<_> = content.tensor_infos.iter().collect();
        by_offset.sort_by_key(|(_, info)| info.offset);
        let skip = |reader: &mut Hashing<File>, n: u64| {
            std::io::copy(&mut reader.take(n), &mut std::io::sink())
                .map_err(|e| self.corrupt(e))
                .and_then(|copied| {
                    (copied == n)
                        .then_some(())
                        .ok_or_else(|| self.corrupt("ends early"))
                })
        };
        skip(reader, content.tensor_data_offset)?;
        let mut tensors = HashMap::with_capacity(by_offset.len());
        let mut raw = Vec::new();
        for (name, info) in by_offset {
            let start = content.tensor_data_offset.saturating_add(info.offset);
            let gap = start
                .checked_sub(reader.bytes)
                .ok_or_else(|| self.corrupt(format!("tensor {name} overlaps the one before")))?;
            skip(reader, gap)?;
            let size = tensor_bytes(info.ggml_dtype, info.shape.dims())
                .ok_or_else(|| self.corrupt(format!("tensor {name} does not divide in blocks")))?;
            raw.resize(size as usize, 0);
            reader
                .read_exact(&mut raw)
                .map_err(|e| self.corrupt(format!("tensor {name}: {e}")))?;
            let q = ggml_file::qtensor_from_ggml(
                info.ggml_dtype,
                &raw,
                info.shape.dims().to_vec(),
                placement.of_weight(name),
            )
            .map_err(|e| self.corrupt(format!("tensor {name}: {e}")))?;
            tensors.insert(name.clone(), Arc::new(q));
        }
        std::io::copy(reader, &mut std::io::sink()).map_err(|e| self.corrupt(e))?;
        Ok(tensors)
    }
}

/// Writes the cache while the base is quantized: the GGUF header first (the projections' names,
/// shapes and offsets are known from the shards' headers), then each quantized projection as it
/// is made. Writing needs a projection's quantized bytes on the host (4.5 or 8.5 bits a weight),
/// but only one projection's at a time: the host never holds the whole quantized base.
/// Dropped before [`CacheWriter::finish`], it removes its temporary file.
pub(crate) struct CacheWriter {
    out: Hashing<BufWriter<File>>,
    temporary: PathBuf,
    gguf: PathBuf,
    manifest: PathBuf,
    key: CacheKey,
    planned: Vec<CachedTensor>,
    format: GgmlDType,
    appended: usize,
    finished: bool,
}

impl CacheWriter {
    fn create(
        cache: &QuantizedCache,
        key: &CacheKey,
        planned: &[CachedTensor],
        format: GgmlDType,
    ) -> Result<Self> {
        let gguf = cache.gguf_path();
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        // Unique across the ranks of a pod and the pods sharing the volume.
        let temporary = cache
            .dir
            .join(format!("{GGUF_FILE}.tmp-{}-{nanos}", std::process::id()));
        let file = File::create(&temporary).map_err(|e| TrainerError::io(&temporary, e))?;
        let mut writer = Self {
            out: Hashing::new(BufWriter::with_capacity(1 << 20, file)),
            temporary,
            gguf,
            manifest: cache.manifest_path(),
            key: key.clone(),
            planned: planned.to_vec(),
            format,
            appended: 0,
            finished: false,
        };
        writer.write_header()?;
        Ok(writer)
    }

    fn io(&self, e: std::io::Error) -> TrainerError {
        TrainerError::io(&self.temporary, e)
    }

    /// Writes a GGUF (version 3) header: the key's digest and the format as metadata, the
    /// planned tensors with their offsets, and the padding up to the data area.
    fn write_header(&mut self) -> Result<()> {
        let mut header = Vec::new();
        header.extend_from_slice(b"GGUF");
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.planned.len() as u64).to_le_bytes());
        let metadata = [
            (METADATA_KEY, self.key.digest()),
            (METADATA_FORMAT, self.key.format.clone()),
        ];
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        const GGUF_STRING: u32 = 8;
        for (key, value) in &metadata {
            push_string(&mut header, key);
            header.extend_from_slice(&GGUF_STRING.to_le_bytes());
            push_string(&mut header, value);
        }
        let mut offset = 0u64;
        for t in &self.planned {
            let size = tensor_bytes(self.format, &t.shape).ok_or_else(|| TrainerError::Weight {
                name: t.name.clone(),
                reason: format!(
                    "shape {:?} does not divide in {:?} blocks",
                    t.shape, self.format
                ),
            })?;
            push_string(&mut header, &t.name);
            header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &dim in t.shape.iter().rev() {
                header.extend_from_slice(&(dim as u64).to_le_bytes());
            }
            header.extend_from_slice(&ggml_type_id(self.format).to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset += size + padding(size);
        }
        let pad = padding(header.len() as u64) as usize;
        header.resize(header.len() + pad, 0);
        self.out.write_all(&header).map_err(|e| self.io(e))
    }

    /// Appends the next planned projection, quantized (on the host).
    pub(crate) fn append(&mut self, name: &str, q: &QTensor) -> Result<()> {
        let planned = self
            .planned
            .get(self.appended)
            .ok_or_else(|| TrainerError::Weight {
                name: name.to_string(),
                reason: "not a planned projection of the cache".into(),
            })?;
        if planned.name != name
            || q.shape().dims() != planned.shape.as_slice()
            || q.dtype() != self.format
        {
            return Err(TrainerError::Weight {
                name: name.to_string(),
                reason: format!(
                    "{:?} {:?} where the cache plans {} {:?} {:?}",
                    q.dtype(),
                    q.shape().dims(),
                    planned.name,
                    self.format,
                    planned.shape
                ),
            });
        }
        let data = q.data()?;
        let pad = vec![0u8; padding(data.len() as u64) as usize];
        self.out.write_all(&data).map_err(|e| self.io(e))?;
        self.out.write_all(&pad).map_err(|e| self.io(e))?;
        self.appended += 1;
        Ok(())
    }

    /// Completes the cache once every planned projection is appended: flushes and syncs the
    /// GGUF, renames it into place, then writes the manifest (atomically).
    pub(crate) fn finish(mut self) -> Result<()> {
        if self.appended != self.planned.len() {
            return Err(TrainerError::Config(format!(
                "quantized base cache: {} of {} projections written",
                self.appended,
                self.planned.len()
            )));
        }
        self.out.flush().map_err(|e| self.io(e))?;
        self.out
            .inner
            .get_ref()
            .sync_all()
            .map_err(|e| self.io(e))?;
        let manifest = Manifest {
            key: self.key.clone(),
            gguf_bytes: self.out.bytes,
            gguf_sha256: self.out.digest(),
        };
        std::fs::rename(&self.temporary, &self.gguf)
            .map_err(|e| TrainerError::io(&self.gguf, e))?;
        self.finished = true;
        let dir = self.gguf.parent().unwrap_or(Path::new("."));
        crate::atomic_file::fsync_dir(dir)?;
        crate::atomic_file::write_atomic(&self.manifest, &serde_json::to_vec_pretty(&manifest)?)
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

fn push_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Moves a projection quantized on the host to `device` (the same bytes; nothing is copied on
/// the CPU).
pub(crate) fn onto_device(q: QTensor, device: &Device) -> Result<QTensor> {
    if device.is_cpu() {
        return Ok(q);
    }
    let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
    Ok(QTensor::new(storage, q.shape().clone())?)
}
