//! `/metrics` exposes every `finetune_*` metric with help text (and passes `promtool check
//! metrics` when promtool is installed); `/progress` serves the shared TrainerProgress JSON.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use finetune_trainer::metrics::{Metrics, Phase, server};
use std::io::{Read, Write};

fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[test]
fn metrics_and_progress_endpoints() {
    let m = Metrics::new().unwrap();
    m.train_loss.set(0.5);
    m.validation_loss.set(0.7);
    m.retention_perplexity
        .with_label_values(&["before"])
        .set(12.0);
    m.retention_perplexity
        .with_label_values(&["after"])
        .set(13.0);
    m.data_rows.with_label_values(&["kept"]).inc_by(10);
    m.checkpoint_duration.observe(0.2);
    m.update_progress(|p| {
        p.phase = Phase::Training;
        p.step = 7;
        p.total_steps = 10;
    });
    let addr = server::serve("127.0.0.1:0", m.clone()).unwrap();
    let body = get(addr, "/metrics");
    for name in [
        "finetune_train_loss",
        "finetune_validation_loss",
        "finetune_generalization_gap",
        "finetune_best_validation_loss",
        "finetune_validation_accuracy",
        "finetune_overfitting",
        "finetune_early_stopped",
        "finetune_retention_perplexity{phase=\"before\"}",
        "finetune_learning_rate",
        "finetune_grad_norm",
        "finetune_base_kl",
        "finetune_step",
        "finetune_total_steps",
        "finetune_epoch",
        "finetune_tokens_total",
        "finetune_tokens_per_second",
        "finetune_checkpoint_duration_seconds_bucket",
        "finetune_checkpoints_total",
        "finetune_data_rows_total{outcome=\"kept\"}",
        "finetune_process_resident_memory_bytes",
    ] {
        assert!(body.contains(name), "missing {name} in\n{body}");
    }
    assert_eq!(body.matches("# HELP finetune_").count(), 20, "{body}");
    if let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let progress: finetune_api::TrainerProgress =
        serde_json::from_str(&get(addr, "/progress")).unwrap();
    assert_eq!(
        (progress.phase, progress.step, progress.total_steps),
        (Phase::Training, 7, 10)
    );
}
