//! The checkpoint directory: `checkpoint-00000042/` folders, each with trainable weights,
//! optimizer moments, a `state.json`, and a `manifest.json` (written last) holding SHA-256
//! checksums of the other files. A folder is assembled under a temporary name and renamed into
//! place, so a crash never leaves a checkpoint that looks complete.

use candle_core::{Device, Tensor};
use finetune_formats::manifest::Manifest;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::atomic_file::{fsync_dir, save_safetensors_atomic, sha256_file, write_atomic};
use crate::rng::Rng;
use crate::{Result, TrainerError};

const WEIGHTS: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
const MANIFEST: &str = "manifest.json";
const PREFIX: &str = "checkpoint-";

/// Training position and bookkeeping saved with each checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps done.
    pub step: usize,
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Micro-batches of the current epoch already consumed.
    pub batch_in_epoch: usize,
    /// Dropout random stream.
    pub rng: Rng,
    /// Optimizer step counter.
    pub optimizer_step: usize,
    /// Validation loss at this checkpoint, when evaluated.
    pub val_loss: Option<f64>,
    /// Best validation loss so far and the step it was reached.
    pub best: Option<(f64, usize)>,
    /// Evaluation history and other state the trainer wants back (opaque here).
    #[serde(default)]
    pub extra: serde_json::Value,
    /// The run that wrote it; `None` in checkpoints written before runs were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunIdentity>,
}

/// Which run a checkpoint belongs to: the job and what its weights depend on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// `metadata.uid` of the FineTuneJob (empty outside a cluster: not compared).
    pub job_uid: String,
    /// `finetune_api::TrainerConfig::training_fingerprint` (empty: not compared).
    pub training_fingerprint: String,
    /// The base model's hub commit (`finetune_api::ModelSource`; empty for other sources and
    /// not compared).
    #[serde(default)]
    pub model_commit: String,
}

impl RunIdentity {
    /// Why this run may not resume from a checkpoint that `found` wrote, if it may not: another
    /// job's checkpoint, or one whose weights come from another training (a different model,
    /// dataset, method, hyperparameters or precision). A checkpoint that records no run is
    /// accepted (it predates the record).
    pub fn refusal(&self, found: Option<&RunIdentity>) -> Option<String> {
        let found = found?;
        let differs = |a: &str, b: &str| !a.is_empty() && !b.is_empty() && a != b;
        if differs(&self.job_uid, &found.job_uid) {
            return Some(format!(
                "it was written by another job (uid {}), not this one (uid {}); a job never \
                 resumes another job's weights: delete that checkpoint directory or give this \
                 job its own claim",
                found.job_uid, self.job_uid
            ));
        }
        if differs(&self.model_commit, &found.model_commit) {
            return Some(format!(
                "it was trained on commit {} of the base model, and this attempt has commit {}",
                found.model_commit, self.model_commit
            ));
        }
        if differs(&self.training_fingerprint, &found.training_fingerprint) {
            return Some(format!(
                "its weights come from another training (fingerprint {}, this spec's is {}: the \
                 model, dataset, method, hyperparameters or precision differ); delete it to start \
                 afresh",
                found.training_fingerprint, self.training_fingerprint
            ));
        }
        None
    }
}

/// Test-only knob: when set to a number of milliseconds, [`CheckpointStore::save`] prints
/// `checkpoint-phase step=N phase=NAME` on stderr after each phase of a write and sleeps that
/// long, so that fault tests can SIGKILL the real binary at every point of a write.
pub const PAUSE_ENV: &str = "FINETUNE_TEST_CHECKPOINT_PAUSE_MS";

fn phase_pause() -> Option<std::time::Duration> {
    std::env::var(PAUSE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(std::time::Duration::from_millis)
}

fn phase(pause: Option<std::time::Duration>, step: usize, name: &str) {
    if let Some(d) = pause {
        eprintln!("checkpoint-phase step={step} phase={name}");
        std::thread::sleep(d);
    }
}

const TMP_PREFIX: &str = ".tmp-checkpoint-";
const OLD_PREFIX: &str = ".old-checkpoint-";

/// A verified checkpoint, loaded.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Saved state.
    pub state: CheckpointState,
    /// Trainable tensors by name.
    pub weights: HashMap<String, Tensor>,
    /// Optimizer moments.
    pub optimizer: HashMap<String, Tensor>,
}

/// Manages the checkpoints under one directory.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    root: PathBuf,
    keep_last: usize,
    keep_best: bool,
}

impl CheckpointStore {
    /// A store under `root` keeping the last `keep_last` checkpoints (and the best when `keep_best`).
    pub fn new(root: impl Into<PathBuf>, keep_last: usize, keep_best: bool) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| TrainerError::io(&root, e))?;
        let store = Self {
            root,
            keep_last: keep_last.max(1),
            keep_best,
        };
        store.remove_stale_temporaries()?;
        Ok(store)
    }

    /// Removes what a killed writer left behind (`.tmp-checkpoint-*`, `.old-checkpoint-*`): never
    /// a checkpoint, but space on a volume that may be nearly full. One trainer owns the directory.
    fn remove_stale_temporaries(&self) -> Result<()> {
        let rd = std::fs::read_dir(&self.root).map_err(|e| TrainerError::io(&self.root, e))?;
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with(TMP_PREFIX) || name.starts_with(OLD_PREFIX) {
                let p = entry.path();
                tracing::info!(path = %p.display(), "removing the leftover of an interrupted checkpoint write");
                std::fs::remove_dir_all(&p).map_err(|e| TrainerError::io(&p, e))?;
            }
        }
        Ok(())
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir_for(&self, step: usize) -> PathBuf {
        self.root.join(format!("{PREFIX}{step:08}"))
    }

    /// Writes a checkpoint atomically and applies retention. Returns its directory.
    pub fn save(
        &self,
        state: &CheckpointState,
        weights: &HashMap<String, Tensor>,
        optimizer: &HashMap<String, Tensor>,
    ) -> Result<PathBuf> {
        let tmp = self.root.join(format!(
            "{TMP_PREFIX}{:08}-{}",
            state.step,
            std::process::id()
        ));
        let written = self.write_tmp(&tmp, state, weights, optimizer);
        if let Err(e) = written {
            // A failed write (e.g. ENOSPC) leaves no partial folder to fill the volume further;
            // older checkpoints are untouched.
            let _ = std::fs::remove_dir_all(&tmp);
            tracing::error!(error = %e, "checkpoint write failed; older checkpoints are kept");
            return Err(e);
        }
        let pause = phase_pause();
        let final_dir = self.dir_for(state.step);
        // An existing folder of the same step is moved aside, not deleted, until the new one is in
        // place: a crash in between leaves it recoverable, never neither.
        let old = self.root.join(format!(
            "{OLD_PREFIX}{:08}-{}",
            state.step,
            std::process::id()
        ));
        let replaced = final_dir.exists();
        if replaced {
            std::fs::rename(&final_dir, &old).map_err(|e| TrainerError::io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| TrainerError::io(&final_dir, e))?;
        fsync_dir(&self.root)?;
        phase(pause, state.step, "renamed");
        if replaced {
            std::fs::remove_dir_all(&old).map_err(|e| TrainerError::io(&old, e))?;
        }
        self.prune(state.best.map(|b| b.1))?;
        phase(pause, state.step, "pruned");
        Ok(final_dir)
    }

    fn write_tmp(
        &self,
        tmp: &Path,
        state: &CheckpointState,
        weights: &HashMap<String, Tensor>,
        optimizer: &HashMap<String, Tensor>,
    ) -> Result<()> {
        let pause = phase_pause();
        if tmp.exists() {
            std::fs::remove_dir_all(tmp).map_err(|e| TrainerError::io(tmp, e))?;
        }
        std::fs::create_dir_all(tmp).map_err(|e| TrainerError::io(tmp, e))?;
        phase(pause, state.step, "tmp-dir");
        save_safetensors_atomic(&tmp.join(WEIGHTS), weights)?;
        phase(pause, state.step, "weights");
        if optimizer.is_empty() {
            write_atomic(&tmp.join(OPTIMIZER), b"")?;
        } else {
            save_safetensors_atomic(&tmp.join(OPTIMIZER), optimizer)?;
        }
        phase(pause, state.step, "optimizer");
        write_atomic(
            &tmp.join(STATE),
            serde_json::to_string_pretty(state)?.as_bytes(),
        )?;
        phase(pause, state.step, "state");
        let mut files = BTreeMap::new();
        for f in [WEIGHTS, OPTIMIZER, STATE] {
            files.insert(f.to_string(), sha256_file(&tmp.join(f))?);
        }
        let manifest = Manifest {
            format: finetune_formats::manifest::FORMAT,
            step: state.step,
            files,
        };
        write_atomic(&tmp.join(MANIFEST), manifest.to_json()?.as_bytes())?;
        phase(pause, state.step, "manifest");
        Ok(())
    }

    /// Checkpoint directories with their steps, newest first.
    pub fn list(&self) -> Result<Vec<(usize, PathBuf)>> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.root).map_err(|e| TrainerError::io(&self.root, e))?;
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(n) = name.strip_prefix(PREFIX)
                && let Ok(step) = n.parse::<usize>()
            {
                out.push((step, entry.path()));
            }
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.0));
        Ok(out)
    }

    fn prune(&self, best_step: Option<usize>) -> Result<()> {
        let all = self.list()?;
        for (i, (step, dir)) in all.iter().enumerate() {
            let keep = i < self.keep_last || (self.keep_best && Some(*step) == best_step);
            if !keep {
                // Renamed out of sight first: a writer killed while deleting must not leave a
                // visible `checkpoint-*` with half its files (the leftover is removed at the
                // next start, like the other `.old-checkpoint-*` folders).
                let doomed = self.root.join(format!(
                    "{OLD_PREFIX}{step:08}-{}-pruned",
                    std::process::id()
                ));
                std::fs::rename(dir, &doomed).map_err(|e| TrainerError::io(dir, e))?;
                std::fs::remove_dir_all(&doomed).map_err(|e| TrainerError::io(&doomed, e))?;
            }
        }
        Ok(())
    }

    /// Verifies the manifest checksums of one checkpoint directory.
    pub fn verify(dir: &Path) -> Result<()> {
        let bad = |reason: String| TrainerError::Checkpoint {
            path: dir.to_path_buf(),
            reason,
        };
        let mpath = dir.join(MANIFEST);
        let bytes = std::fs::read(&mpath).map_err(|e| bad(format!("manifest: {e}")))?;
        let manifest = Manifest::parse(&bytes).map_err(|e| bad(e.to_string()))?;
        for f in [WEIGHTS, OPTIMIZER, STATE] {
            let want = manifest.digest(f).map_err(|e| bad(e.to_string()))?;
            let got = sha256_file(&dir.join(f)).map_err(|e| bad(e.to_string()))?;
            if got != want {
                return Err(bad(format!("checksum mismatch for {f}")));
            }
        }
        for f in [WEIGHTS, OPTIMIZER] {
            let p = dir.join(f);
            let empty = std::fs::metadata(&p).map(|m| m.len() == 0).unwrap_or(false);
            if !empty {
                finetune_formats::safetensors::validate_file(&p).map_err(|e| bad(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Loads a checkpoint directory after verifying it.
    pub fn load(dir: &Path, device: &Device) -> Result<LoadedCheckpoint> {
        Self::verify(dir)?;
        let state_path = dir.join(STATE);
        let text =
            std::fs::read_to_string(&state_path).map_err(|e| TrainerError::io(&state_path, e))?;
        let state: CheckpointState = serde_json::from_str(&text)?;
        let weights = crate::model::weights::load_checked(&dir.join(WEIGHTS), device)?;
        let opt_path = dir.join(OPTIMIZER);
        let opt_len = std::fs::metadata(&opt_path)
            .map_err(|e| TrainerError::io(&opt_path, e))?
            .len();
        let optimizer = if opt_len == 0 {
            HashMap::new()
        } else {
            crate::model::weights::load_checked(&opt_path, device)?
        };
        Ok(LoadedCheckpoint {
            dir: dir.to_path_buf(),
            state,
            weights,
            optimizer,
        })
    }

    /// The newest checkpoint that verifies; corrupt or partial ones are reported (returned in
    /// the second element) and skipped.
    pub fn latest_valid(&self, device: &Device) -> Result<(Option<LoadedCheckpoint>, Vec<String>)> {
        let mut skipped = Vec::new();
        for (_, dir) in self.list()? {
            match Self::load(&dir, device) {
                Ok(c) => return Ok((Some(c), skipped)),
                Err(e) => {
                    tracing::warn!(checkpoint = %dir.display(), error = %e, "skipping invalid checkpoint");
                    skipped.push(e.to_string());
                }
            }
        }
        Ok((None, skipped))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn state(step: usize) -> CheckpointState {
        CheckpointState {
            step,
            epoch: 0,
            batch_in_epoch: step,
            rng: Rng::new(1),
            optimizer_step: step,
            val_loss: None,
            best: None,
            extra: serde_json::Value::Null,
            run: None,
        }
    }

    #[test]
    fn a_run_refuses_another_jobs_or_another_trainings_checkpoint() {
        let ours = RunIdentity {
            job_uid: "uid-new".into(),
            training_fingerprint: "f1".into(),
            model_commit: "c1".into(),
        };
        assert_eq!(ours.refusal(Some(&ours)), None);
        assert_eq!(ours.refusal(None), None, "legacy checkpoints resume");
        let other_job = RunIdentity {
            job_uid: "uid-old".into(),
            ..ours.clone()
        };
        let why = ours.refusal(Some(&other_job)).unwrap();
        assert!(why.contains("uid-old") && why.contains("uid-new"), "{why}");
        let other_training = RunIdentity {
            training_fingerprint: "f2".into(),
            ..ours.clone()
        };
        let why = ours.refusal(Some(&other_training)).unwrap();
        assert!(why.contains("f2") && why.contains("f1"), "{why}");
        let other_weights = RunIdentity {
            model_commit: "c2".into(),
            ..ours.clone()
        };
        let why = ours.refusal(Some(&other_weights)).unwrap();
        assert!(why.contains("c2") && why.contains("c1"), "{why}");
        let outside_a_cluster = RunIdentity {
            job_uid: String::new(),
            ..ours.clone()
        };
        assert_eq!(outside_a_cluster.refusal(Some(&other_job)), None);
    }

    #[test]
    fn save_verify_retain_and_skip_corrupt() {
        let dir = std::env::temp_dir().join(format!("ckpt-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = CheckpointStore::new(&dir, 2, false).unwrap();
        let dev = Device::Cpu;
        for step in [1, 2, 3] {
            let w = HashMap::from([(
                "a".to_string(),
                Tensor::new(&[step as f32, 2.0], &dev).unwrap(),
            )]);
            store.save(&state(step), &w, &HashMap::new()).unwrap();
        }
        let steps: Vec<usize> = store.list().unwrap().iter().map(|x| x.0).collect();
        assert_eq!(steps, vec![3, 2]);
        // Corrupt the newest: flip a byte of its weights.
        let newest = store.list().unwrap()[0].1.join(WEIGHTS);
        let mut bytes = std::fs::read(&newest).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&newest, bytes).unwrap();
        let (c, skipped) = store.latest_valid(&dev).unwrap();
        let c = c.unwrap();
        assert_eq!(c.state.step, 2);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].contains("checksum"), "{skipped:?}");
        assert_eq!(c.weights["a"].to_vec1::<f32>().unwrap(), vec![2.0, 2.0]);
        // A partial checkpoint without manifest is skipped too.
        std::fs::remove_file(store.list().unwrap()[1].1.join(MANIFEST)).unwrap();
        let (c, skipped) = store.latest_valid(&dev).unwrap();
        assert!(c.is_none());
        assert_eq!(skipped.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
