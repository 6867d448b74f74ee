//! Trainer faults with the real `finetune-trainer` binary (issue #7):
//! - SIGKILL at every phase of a checkpoint write (and at pseudo-random times): only complete
//!   checkpoints are ever visible, and a rerun resumes from the newest valid one, losing at most
//!   one checkpoint interval;
//! - a full checkpoint volume (a tiny tmpfs in a private mount namespace): the write fails with
//!   an error naming the path and ENOSPC, older checkpoints stay valid, and after space is freed a
//!   rerun resumes from the newest;
//! - SIGTERM: a checkpoint is saved and the process exits well within the pod's grace period.
//!
//! Over 500 lines on purpose: each fault needs its own setup of the binary, and they share one
//! set of helpers that a split would have to export.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use finetune_api::FineTuneJob;
use finetune_trainer::checkpoint::CheckpointStore;
use finetune_trainer::model::tiny;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_finetune-trainer");
/// The operator's default `terminationGracePeriodSeconds` of trainer pods
/// (`operator/src/args.rs`, `--trainer-grace-seconds`); checked against the source below.
const GRACE_SECONDS: f64 = 120.0;

const SPEC: &str = r#"
apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: faults
spec:
  model:
    preset: tiny
  dataset:
    source: configmap://reviews/reviews.csv
    format: csv
    columns:
      text: ReviewText
      label: SentimentLabel
    validationSplit: 0.1
    seed: 7
  method:
    type: lora
    lora:
      rank: 4
      alpha: 8
      targetModules: [q_proj, v_proj]
  hyperparameters:
    learningRate: 0.005
    scheduler: constant
    warmupSteps: 0
    epochs: 100
    maxSteps: 10
    batchSize: 4
    maxSequenceLength: 48
    seed: 7
  evaluation:
    intervalSteps: 1000
  checkpoints:
    intervalSteps: 2
    keepLast: 2
    keepBest: false
  output:
    path: output
"#;

struct Job {
    work: PathBuf,
    config: PathBuf,
    ckpt: PathBuf,
    interval: usize,
}

/// A job directory with a small model, the review fixture and a trainer configuration.
fn job(name: &str, max_steps: u32, interval: u32) -> Job {
    let work = std::env::temp_dir().join(format!("ft-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let model = work.join("model");
    let cfg = common::small_config(64, 2);
    tiny::write_hf_model(&model, &cfg, &common::random_weights(&cfg, 4)).unwrap();
    let mut j: FineTuneJob = serde_yaml::from_str(SPEC).unwrap();
    j.spec.hyperparameters.max_steps = Some(u64::from(max_steps));
    j.spec.checkpoints.interval_steps = interval;
    let ckpt = work.join("checkpoints");
    let config = common::trainer_config_file(&work, &model, name, &j.spec);
    Job {
        work,
        config,
        ckpt,
        interval: interval as usize,
    }
}

impl Job {
    fn command(&self) -> Command {
        let mut c = Command::new(BIN);
        c.args(["train", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env("FINETUNE_METRICS_ADDRESS", "")
            .env_remove(finetune_trainer::checkpoint::store::PAUSE_ENV)
            .stdin(Stdio::null());
        c
    }

    /// Runs to completion (resume auto), returning the step it resumed from.
    fn rerun(&self) -> Option<usize> {
        let out = self.command().output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "rerun failed: {err}");
        resumed_step(&err)
    }

    /// Steps of the `checkpoint-*` folders, newest first; every one must verify. (Read directly:
    /// `CheckpointStore::new` would clean up what the killed writer left.)
    fn verified_checkpoints(&self) -> Vec<usize> {
        let mut steps: Vec<usize> = std::fs::read_dir(&self.ckpt)
            .map(|rd| rd.flatten().collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
                CheckpointStore::verify(&e.path())
                    .unwrap_or_else(|err| panic!("a visible checkpoint is invalid: {err}"));
                Some(step)
            })
            .collect();
        steps.sort_by(|a, b| b.cmp(a));
        steps
    }
}

/// The `fields` of each JSON log line.
fn log_fields(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["fields"].clone())
        .collect()
}

fn resumed_step(stderr: &str) -> Option<usize> {
    log_fields(stderr)
        .iter()
        .find(|f| f["message"] == "resumed")
        .and_then(|f| f["step"].as_u64())
        .map(|s| s as usize)
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads the child's stderr until `pred` matches a line (or the child ends); returns the line,
/// and a thread that drains (and returns) the rest.
fn wait_for_line(
    child: &mut Child,
    pred: impl Fn(&str) -> bool,
) -> (Option<String>, std::thread::JoinHandle<String>) {
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut found = None;
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        if pred(&line) {
            found = Some(line);
            break;
        }
    }
    let rest = std::thread::spawn(move || {
        let mut all = String::new();
        for l in lines.map_while(Result::ok) {
            all.push_str(&l);
            all.push('\n');
        }
        all
    });
    (found, rest)
}

const PHASES: [&str; 7] = [
    "tmp-dir",
    "weights",
    "optimizer",
    "state",
    "manifest",
    "renamed",
    "pruned",
];

#[test]
fn sigkill_at_every_phase_of_a_checkpoint_write_resumes_from_the_newest_valid() {
    let mut worst_lost = 0;
    for phase in PHASES {
        let j = job(&format!("kill-{phase}"), 8, 2);
        let kill_step = 4; // the second checkpoint: an older one exists
        let mut child = j
            .command()
            .env(finetune_trainer::checkpoint::store::PAUSE_ENV, "300")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let marker = format!("checkpoint-phase step={kill_step} phase={phase}");
        let (seen, _rest) = wait_for_line(&mut child, |l| l.contains(&marker));
        assert!(seen.is_some(), "{phase}: the writer never reached {marker}");
        child.kill().unwrap(); // SIGKILL, while the writer sleeps after this phase
        let status = child.wait().unwrap();
        assert!(!status.success());
        let visible = j.verified_checkpoints();
        let expect = if matches!(phase, "renamed" | "pruned") {
            kill_step
        } else {
            kill_step - j.interval
        };
        assert_eq!(visible.first(), Some(&expect), "{phase}: {visible:?}");
        let resumed = j.rerun();
        assert_eq!(resumed, Some(expect), "{phase}");
        let lost = kill_step - expect;
        assert!(lost <= j.interval, "{phase}: lost {lost} steps");
        worst_lost = worst_lost.max(lost);
        assert!(
            leftovers(&j.ckpt).is_empty(),
            "{phase}: leftovers {:?}",
            leftovers(&j.ckpt)
        );
        assert_eq!(j.verified_checkpoints().first(), Some(&8), "{phase}");
        eprintln!("FIGURE sigkill phase={phase} resumed_from={expect} steps_lost={lost}");
        let _ = std::fs::remove_dir_all(&j.work);
    }
    eprintln!(
        "FIGURE sigkill phases={} worst_steps_lost={worst_lost} interval=2",
        PHASES.len()
    );
}

#[test]
fn sigkill_at_pseudo_random_times_never_exposes_a_partial_checkpoint() {
    // Without pauses: kills land anywhere, including inside a file write.
    let j = job("kill-random", 40, 2);
    // Duration of a whole run, to spread the kills over it.
    let t0 = Instant::now();
    let full = j.command().output().unwrap();
    assert!(full.status.success());
    let run = t0.elapsed();
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut kills = 0;
    let mut resumes = 0;
    for i in 0..8 {
        let _ = std::fs::remove_dir_all(&j.ckpt);
        let _ = std::fs::remove_dir_all(j.work.join("output"));
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let frac = 0.3 + 0.7 * (seed % 1000) as f64 / 1000.0;
        let delay = run.mul_f64(frac);
        let mut child = j
            .command()
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        let visible = j.verified_checkpoints();
        let resumed = j.rerun();
        assert_eq!(resumed, visible.first().copied(), "kill {i}: {visible:?}");
        if resumed.is_some() {
            resumes += 1;
        }
        assert!(leftovers(&j.ckpt).is_empty());
        assert_eq!(j.verified_checkpoints().first(), Some(&40));
    }
    eprintln!(
        "FIGURE random-kill runs=8 killed={kills} resumed={resumes} run_seconds={:.1}",
        run.as_secs_f64()
    );
    assert!(kills >= 4, "only {kills} of 8 kills landed while running");
    let _ = std::fs::remove_dir_all(&j.work);
}

fn du_blocks(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += m.blocks() * 512;
        if m.is_dir() {
            total += du_blocks(&e.path());
        }
    }
    total
}

#[test]
fn full_checkpoint_volume_fails_clearly_keeps_older_checkpoints_and_resumes() {
    let j = job("enospc", 10, 2);
    // Size of one checkpoint, from a normal run.
    let probe = job("enospc-probe", 2, 2);
    assert!(probe.command().output().unwrap().status.success());
    let one = du_blocks(&probe.ckpt.join("checkpoint-00000002")) + 4096;
    let _ = std::fs::remove_dir_all(&probe.work);
    // Room for two checkpoints (keepLast) and half of a third: the write at step 6 fails.
    let size_kib = ((one * 5 / 2) / 1024).max(16);
    std::fs::create_dir_all(&j.ckpt).unwrap();
    let script = j.work.join("enospc.sh");
    let w = j.work.display();
    let c = j.ckpt.display();
    std::fs::write(
        &script,
        format!(
            r#"set -u
mount -t tmpfs -o size={size_kib}k,mode=0755 finetune-ckpt {c} || exit 77
RUST_LOG=info FINETUNE_METRICS_ADDRESS= {BIN} train --config {cfg} >{w}/run1.out 2>{w}/run1.err
echo $? >{w}/run1.rc
df -k {c} | tail -1 >{w}/df1.txt
cp -a {c} {w}/after-enospc
mount -o remount,size=65536k {c} || exit 78
RUST_LOG=info FINETUNE_METRICS_ADDRESS= {BIN} train --config {cfg} >{w}/run2.out 2>{w}/run2.err
echo $? >{w}/run2.rc
cp -a {c} {w}/after-resume
"#,
            cfg = j.config.display()
        ),
    )
    .unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh"])
        .arg(&script)
        .output();
    let skip = |why: String| {
        eprintln!(
            "SKIPPED full-volume test: cannot mount a small tmpfs here ({why}); needs root and unshare(1)"
        );
    };
    let out = match out {
        Ok(o) => o,
        Err(e) => return skip(format!("unshare: {e}")),
    };
    if matches!(out.status.code(), Some(77)) || !j.work.join("run1.rc").exists() {
        return skip(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let rc1: i32 = std::fs::read_to_string(j.work.join("run1.rc"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let err1 = std::fs::read_to_string(j.work.join("run1.err")).unwrap();
    assert_ne!(rc1, 0, "the run on a full volume must fail");
    assert!(
        err1.contains("No space left on device") && err1.contains(".tmp-checkpoint-00000006"),
        "the error must name the path and ENOSPC:\n{err1}"
    );
    let error: Vec<&str> = err1
        .lines()
        .skip_while(|l| !l.starts_with("Error:"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    eprintln!("FIGURE enospc error: {}", error.join(" "));
    // Older checkpoints intact, nothing partial left on the volume.
    let after = j.work.join("after-enospc");
    let mut kept: Vec<usize> = Vec::new();
    for e in std::fs::read_dir(&after).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        assert!(!name.starts_with('.'), "leftover {name} on the full volume");
        CheckpointStore::verify(&e.path()).unwrap();
        kept.push(name.trim_start_matches("checkpoint-").parse().unwrap());
    }
    kept.sort();
    assert_eq!(kept, vec![2, 4]);
    // After the volume grows, the rerun resumes from the newest valid checkpoint and completes.
    let rc2 = std::fs::read_to_string(j.work.join("run2.rc")).unwrap();
    let err2 = std::fs::read_to_string(j.work.join("run2.err")).unwrap();
    assert_eq!(rc2.trim(), "0", "{err2}");
    let resumed = resumed_step(&err2).unwrap();
    assert_eq!(resumed, 4);
    let lost = 6 - resumed;
    assert!(lost <= j.interval);
    eprintln!(
        "FIGURE enospc tmpfs={size_kib}KiB checkpoint={}B failed_at=6 kept={kept:?} resumed_from={resumed} steps_lost={lost}",
        one
    );
    let _ = std::fs::remove_dir_all(&j.work);
}

#[test]
fn sigterm_saves_a_checkpoint_within_the_grace_period() {
    // The grace period this test holds the trainer to is the operator's default.
    let args = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../operator/src/args.rs"),
    )
    .unwrap();
    assert!(
        args.contains("TRAINER_GRACE_SECONDS\", default_value_t = 120)"),
        "the operator's default grace period changed: update GRACE_SECONDS"
    );
    let j = job("sigterm", 100_000, 100_000);
    let mut child = j
        .command()
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until training runs (the first step is logged).
    let (seen, rest) = wait_for_line(&mut child, |l| l.contains("\"message\":\"train\""));
    assert!(seen.is_some(), "training never started");
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    let to_exit = t0.elapsed().as_secs_f64();
    assert_eq!(
        status.code(),
        Some(143),
        "interrupted runs exit 143 so the Job retries"
    );
    let log = rest.join().unwrap();
    let save_s = log_fields(&log)
        .iter()
        .find(|f| f["message"] == "checkpoint saved")
        .and_then(|f| f["seconds"].as_f64())
        .expect("a checkpoint saved on SIGTERM");
    assert!(save_s <= to_exit);
    let visible = j.verified_checkpoints();
    assert_eq!(visible.len(), 1, "{visible:?}");
    let step = visible[0];
    assert!(step >= 1);
    assert!(
        to_exit < GRACE_SECONDS,
        "SIGTERM to exit took {to_exit:.1} s, grace period {GRACE_SECONDS} s"
    );
    let resumed = j_rerun_until(&j, step);
    assert_eq!(resumed, Some(step));
    eprintln!(
        "FIGURE sigterm step={step} checkpoint_save_s={save_s:.3} sigterm_to_exit_s={to_exit:.2} grace_s={GRACE_SECONDS} ratio={:.4}",
        to_exit / GRACE_SECONDS
    );
    let _ = std::fs::remove_dir_all(&j.work);
}

/// Resumes (a short run: the job has 100 000 steps, so stop it again right after resuming).
fn j_rerun_until(j: &Job, _step: usize) -> Option<usize> {
    let mut child = j
        .command()
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (line, _rest) = wait_for_line(&mut child, |l| l.contains("\"message\":\"resumed\""));
    let _ = child.kill();
    let _ = child.wait();
    line.and_then(|l| resumed_step(&l))
}

#[test]
fn a_llama_2_7b_lora_checkpoint_saves_well_within_the_grace_period() {
    // What SIGTERM writes for Llama-2-7B with LoRA r=16 on all seven projections of its 32
    // layers: 40.0 M trainable parameters plus two AdamW moments (480 MB in f32), through the
    // same atomic, checksummed store.
    use candle_core::{DType, Device, Tensor};
    use std::collections::HashMap;
    let (hidden, inter, rank, layers) = (4096usize, 11008usize, 16usize, 32usize);
    let mut weights = HashMap::new();
    let mut moments = HashMap::new();
    let mut params = 0usize;
    for l in 0..layers {
        for (m, inp, out) in [
            ("q_proj", hidden, hidden),
            ("k_proj", hidden, hidden),
            ("v_proj", hidden, hidden),
            ("o_proj", hidden, hidden),
            ("gate_proj", hidden, inter),
            ("up_proj", hidden, inter),
            ("down_proj", inter, hidden),
        ] {
            for (ab, shape) in [("lora_A", (rank, inp)), ("lora_B", (out, rank))] {
                let name = format!("model.layers.{l}.{m}.{ab}.weight");
                let t = Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap();
                params += shape.0 * shape.1;
                moments.insert(format!("{name}.m"), t.clone());
                moments.insert(format!("{name}.v"), t.clone());
                weights.insert(name, t);
            }
        }
    }
    assert_eq!(params, 39_976_960);
    let dir = std::env::temp_dir().join(format!("ft-faults-7b-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = CheckpointStore::new(&dir, 1, false).unwrap();
    let state = finetune_trainer::checkpoint::CheckpointState {
        step: 100,
        epoch: 0,
        batch_in_epoch: 100,
        rng: finetune_trainer::rng::Rng::new(1),
        optimizer_step: 100,
        val_loss: None,
        best: None,
        extra: serde_json::Value::Null,
        run: None,
    };
    let t0 = Instant::now();
    let saved = store.save(&state, &weights, &moments).unwrap();
    let save_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    CheckpointStore::verify(&saved).unwrap();
    let verify_s = t1.elapsed().as_secs_f64();
    let bytes = du_blocks(&saved);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "FIGURE sigterm-7b-lora params={params} bytes={bytes} save_s={save_s:.2} verify_s={verify_s:.2} grace_s={GRACE_SECONDS} ratio={:.3}",
        save_s / GRACE_SECONDS
    );
    assert!(
        save_s < GRACE_SECONDS / 2.0,
        "saving a 7B LoRA checkpoint took {save_s:.1} s: more than half the grace period"
    );
}
