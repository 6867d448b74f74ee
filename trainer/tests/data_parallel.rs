//! Data-parallel training through the CPU backend of the collective interface (issue #17):
//! - two ranks of `k` micro-batches each train exactly as one rank accumulating `2k` (losses and
//!   weights within 1e-6 after several steps);
//! - a checkpoint does not depend on the world size: a run stopped on two ranks and resumed on
//!   one (accumulating what the two did) ends where the uninterrupted two-rank run ends;
//! - with the real binary, a rank that dies or hangs mid-run makes the other exit within the
//!   collective timeout, with the collective's exit code;
//! - a node's entry process with `PET_NPROC_PER_NODE=2` starts both ranks, which train to the
//!   end (rank 0 writes the report), and when one of them is killed it stops the other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::Tensor;
use common::{lora_all, max_abs_diff, params, setup};
use finetune_trainer::distributed::COLLECTIVE_EXIT_CODE;
use finetune_trainer::distributed::tcp::{TcpCollective, Timeouts};
use finetune_trainer::model::TrainableSpec;
use finetune_trainer::train::{StopReason, TrainParams, Trainer};
use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_finetune-trainer");

fn timeouts() -> Timeouts {
    Timeouts {
        rendezvous: Duration::from_secs(30),
        collective: Duration::from_secs(60),
    }
}

/// What a run left: the loss of every step and the trainable weights.
struct Trained {
    losses: Vec<f32>,
    weights: HashMap<String, Tensor>,
    reason: StopReason,
}

fn train(t: &mut Trainer, stop_at: Option<usize>) -> Trained {
    let reason = t.run(stop_at).unwrap().reason;
    Trained {
        losses: t.history.iter().map(|r| r.loss).collect(),
        weights: t.model.trainable_tensors(),
        reason,
    }
}

/// Runs `p` on two ranks over loopback (rank 0's result first).
fn two_ranks(p: &TrainParams, resume: bool, stop_at: Option<usize>) -> [Trained; 2] {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::scope(|s| {
        let host = s.spawn(|| {
            let c = TcpCollective::host(listener, 2, "test/0", timeouts()).unwrap();
            let mut t = Trainer::new(p.clone(), resume, None).unwrap();
            t.join(Box::new(c)).unwrap();
            train(&mut t, stop_at)
        });
        let other = s.spawn(|| {
            let c = TcpCollective::join(&addr, 1, 2, "test/0", timeouts()).unwrap();
            let mut t = Trainer::new(p.clone(), resume, None).unwrap();
            t.join(Box::new(c)).unwrap();
            assert!(!t.is_primary());
            train(&mut t, stop_at)
        });
        [host.join().unwrap(), other.join().unwrap()]
    })
}

fn one_rank(p: &TrainParams, resume: bool) -> Trained {
    train(&mut Trainer::new(p.clone(), resume, None).unwrap(), None)
}

fn assert_same_run(what: &str, a: &Trained, b: &Trained) {
    assert_eq!(a.losses.len(), b.losses.len(), "{what}: steps");
    for (i, (x, y)) in a.losses.iter().zip(&b.losses).enumerate() {
        assert!(
            (x - y).abs() <= 1e-6,
            "{what}: step {}: loss {x} vs {y}",
            i + 1
        );
    }
    for (name, w) in &a.weights {
        let d = max_abs_diff(w, &b.weights[name]);
        assert!(d <= 1e-6, "{what}: {name} differs by {d}");
    }
}

/// LoRA on every module without dropout (the ranks draw dropout from their own streams).
fn lora() -> TrainableSpec {
    TrainableSpec::Lora(lora_all(4))
}

fn per_rank(work: &Path, model: &Path, run: &str) -> TrainParams {
    let mut p = params(work, model, run, lora());
    p.grad_accum = 1;
    p.eval.interval = 0;
    p
}

#[test]
fn two_ranks_train_as_one_rank_accumulating_both_shares() {
    let (work, model) = setup("dp-equal");
    let alone = one_rank(&params(&work, &model, "alone", lora()), false);
    assert_eq!(alone.losses.len(), 8);
    assert!(
        alone
            .losses
            .iter()
            .any(|l| (l - alone.losses[0]).abs() > 1e-3),
        "the run learns: {:?}",
        alone.losses
    );
    let [r0, r1] = two_ranks(&per_rank(&work, &model, "gang"), false, None);
    assert_same_run("rank 0 vs one rank", &r0, &alone);
    assert_same_run("rank 1 vs one rank", &r1, &alone);
    // Only rank 0 wrote checkpoints, and the report's loss history is the gang's.
    let ckpts = std::fs::read_dir(work.join("gang/checkpoints"))
        .unwrap()
        .count();
    assert!(ckpts > 0);
    let _ = std::fs::remove_dir_all(&work);
}

/// The KL-to-base penalty goes through the gang's all-reduce too: two ranks equal one rank
/// accumulating both shares, losses, weights and the penalty's reported values alike.
#[test]
fn two_ranks_with_the_kl_penalty_train_as_one_rank() {
    let (work, model) = setup("dp-kl");
    let kl = Some(finetune_trainer::train::base_kl::BaseKl {
        weight: 1.0,
        stride: 2,
    });
    let mut p = params(&work, &model, "alone", lora());
    p.base_kl = kl;
    let mut t = Trainer::new(p, false, None).unwrap();
    let alone = train(&mut t, None);
    let alone_kl: Vec<Option<f32>> = t.history.iter().map(|r| r.base_kl).collect();
    assert!(
        alone_kl.iter().skip(1).all(|k| k.is_some_and(|v| v > 0.0)),
        "{alone_kl:?}"
    );
    let mut gang = per_rank(&work, &model, "gang");
    gang.base_kl = kl;
    let [r0, r1] = two_ranks(&gang, false, None);
    assert_same_run("rank 0 vs one rank, with the penalty", &r0, &alone);
    assert_same_run("rank 1 vs one rank, with the penalty", &r1, &alone);
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_two_rank_checkpoint_resumes_exactly_on_one_rank() {
    let (work, model) = setup("dp-resume");
    let [whole, _] = two_ranks(&per_rank(&work, &model, "whole"), false, None);
    let [stopped, _] = two_ranks(&per_rank(&work, &model, "moved"), false, Some(3));
    assert_eq!(stopped.reason, StopReason::Interrupted);
    assert_eq!(stopped.losses.len(), 3);
    // One rank, accumulating the two ranks' micro-batches: the same global batch.
    let mut alone = per_rank(&work, &model, "moved");
    alone.grad_accum = 2;
    let resumed = one_rank(&alone, true);
    assert_eq!(resumed.reason, StopReason::Completed);
    assert_same_run(
        "resumed on one rank vs two ranks throughout",
        &resumed,
        &whole,
    );
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn ranks_that_start_from_different_weights_are_refused() {
    let (work, model) = setup("dp-refuse");
    let p = per_rank(&work, &model, "a");
    let mut q = p.clone();
    q.seed += 1; // another LoRA initialisation
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let errors = std::thread::scope(|s| {
        let host = s.spawn(|| {
            let c = TcpCollective::host(listener, 2, "test/0", timeouts()).unwrap();
            Trainer::new(p.clone(), false, None)
                .unwrap()
                .join(Box::new(c))
        });
        let other = s.spawn(|| {
            let c = TcpCollective::join(&addr, 1, 2, "test/0", timeouts()).unwrap();
            Trainer::new(q.clone(), false, None)
                .unwrap()
                .join(Box::new(c))
        });
        (host.join().unwrap(), other.join().unwrap())
    });
    assert!(errors.0.is_ok(), "rank 0 broadcasts and goes on");
    let e = errors.1.unwrap_err().to_string();
    assert!(e.contains("must resume from the same checkpoint"), "{e}");
    let _ = std::fs::remove_dir_all(&work);
}

/// A trainer configuration for the binary of `max_steps` steps (many: the gang is still
/// training when a rank is stopped).
fn binary_job(work: &Path, model: &Path, max_steps: u64) -> std::path::PathBuf {
    let spec = r#"
model: {preset: tiny}
dataset:
  source: configmap://reviews/reviews.csv
  format: csv
  columns: {text: ReviewText, label: SentimentLabel}
  validationSplit: 0.1
method:
  type: lora
  lora: {rank: 4, alpha: 8, targetModules: [q_proj, v_proj]}
hyperparameters:
  learningRate: 0.005
  epochs: 1000
  maxSteps: 100000
  batchSize: 4
  maxSequenceLength: 48
evaluation: {intervalSteps: 100000}
checkpoints: {intervalSteps: 100000, keepLast: 1, keepBest: false}
output: {path: output}
"#;
    let mut spec: finetune_api::FineTuneJobSpec = serde_yaml::from_str(spec).unwrap();
    spec.hyperparameters.max_steps = Some(max_steps);
    common::trainer_config_file(work, model, "dp", &spec)
}

/// `finetune-trainer train` of `config` with JSON logs, no metrics server and a collective
/// timeout of `timeout_s`, outside any gang until the caller adds a world.
fn trainer_command(config: &Path, timeout_s: u64) -> Command {
    let mut c = Command::new(BIN);
    c.args(["train", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env("FINETUNE_METRICS_ADDRESS", "")
        .env("FINETUNE_COLLECTIVE_TIMEOUT_SECONDS", timeout_s.to_string())
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("LOCAL_RANK")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    c
}

fn rank_process(config: &Path, rank: usize, port: u16, timeout_s: u64) -> std::process::Child {
    trainer_command(config, timeout_s)
        .env("WORLD_SIZE", "2")
        .env("RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Each line of a child's stderr as it comes, and a thread that returns all of them at the end.
fn stream_lines(
    stderr: std::process::ChildStderr,
) -> (
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<String>,
) {
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    (rx, reader)
}

/// Starts a two-process gang, waits until rank 0 trains, then does `to_rank_1` to rank 1; rank
/// 0's exit status, the time from `to_rank_1` to its exit, and its log.
fn gang_losing_rank_1(name: &str, to_rank_1: &str) -> (Option<i32>, Duration, String) {
    let (work, model) = setup(name);
    std::fs::create_dir_all(&work).unwrap();
    let config = binary_job(&work, &model, 100_000);
    let port = free_port();
    let mut r0 = rank_process(&config, 0, port, 5);
    let mut r1 = rank_process(&config, 1, port, 5);
    let stderr = r0.stderr.take().unwrap();
    let (rx, reader) = stream_lines(stderr);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("rank 0 logs");
        if line.contains("\"message\":\"train\"") {
            break;
        }
        assert!(Instant::now() < deadline, "rank 0 never trained");
    }
    let pid = r1.id().to_string();
    let signal = Command::new("kill")
        .args([to_rank_1, &pid])
        .status()
        .unwrap();
    assert!(signal.success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = r0.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = r0.kill();
            break r0.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let waited = t0.elapsed();
    let _ = r1.kill();
    let _ = r1.wait();
    let log = reader.join().unwrap();
    let _ = std::fs::remove_dir_all(&work);
    (status.code(), waited, log)
}

#[test]
fn a_killed_rank_makes_the_other_exit_at_once_with_the_collective_code() {
    let (code, waited, log) = gang_losing_rank_1("dp-kill", "-KILL");
    eprintln!("rank 0 exited {waited:?} after SIGKILL of rank 1");
    assert_eq!(code, Some(i32::from(COLLECTIVE_EXIT_CODE)), "{log}");
    assert!(waited < Duration::from_secs(5), "took {waited:?}");
    assert!(log.contains("rank 1 during AllReduceSum"), "{log}");
}

#[test]
fn a_hung_rank_makes_the_other_exit_within_the_collective_timeout() {
    let (code, waited, log) = gang_losing_rank_1("dp-hang", "-STOP");
    eprintln!("rank 0 exited {waited:?} after SIGSTOP of rank 1 (timeout 5 s)");
    assert_eq!(code, Some(i32::from(COLLECTIVE_EXIT_CODE)), "{log}");
    assert!(waited < Duration::from_secs(5 + 10), "took {waited:?}");
    assert!(log.contains("no answer within the timeout"), "{log}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The node entry process of a one-node gang with two processes per node.
fn node_entry(config: &Path, port: u16) -> Command {
    let mut c = trainer_command(config, 5);
    c.env("PET_NNODES", "1")
        .env("PET_NPROC_PER_NODE", "2")
        .env("PET_MASTER_ADDR", "127.0.0.1")
        .env("PET_MASTER_PORT", port.to_string());
    c
}

#[test]
fn a_node_entry_starts_its_ranks_and_they_train_to_the_end() {
    let (work, model) = setup("dp-entry");
    let config = binary_job(&work, &model, 4);
    let out = node_entry(&config, free_port()).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(log.matches("started rank").count(), 2, "{log}");
    assert_eq!(
        log.matches("joined the data-parallel gang").count(),
        2,
        "{log}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("output/report.json")).unwrap())
            .unwrap();
    assert_eq!(report["status"], "succeeded");
    assert_eq!(report["steps"], 4);
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_rank_killed_under_the_node_entry_stops_its_sibling() {
    let (work, model) = setup("dp-entry-kill");
    let config = binary_job(&work, &model, 100_000);
    let mut entry = node_entry(&config, free_port())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = entry.stderr.take().unwrap();
    let (rx, reader) = stream_lines(stderr);
    let mut pids = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the ranks log");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["fields"]["message"] == "started rank"
        {
            pids.push(v["fields"]["pid"].as_u64().unwrap());
        }
        if line.contains("\"message\":\"train\"") {
            break;
        }
    }
    assert_eq!(pids.len(), 2);
    assert!(
        Command::new("kill")
            .args(["-KILL", &pids[1].to_string()])
            .status()
            .unwrap()
            .success()
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = entry.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the entry process did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = reader.join().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + 9),
        "the killed rank's code: {log}"
    );
    assert!(log.contains("rank failed: stopping the others"), "{log}");
    // No rank is left running.
    let alive = std::path::Path::new(&format!("/proc/{}", pids[0])).exists()
        && !std::fs::read_to_string(format!("/proc/{}/stat", pids[0]))
            .unwrap_or_default()
            .contains(") Z ");
    assert!(!alive, "rank 0 still runs");
    let _ = std::fs::remove_dir_all(&work);
}
