//! Malformed datasets and hostile input paths, through the real `finetune-trainer` binary with a
//! timeout (issue #7): every case ends with a clear error or a cleaning report naming the file and
//! line, never a panic (exit 101) and never a hang; and no input path escapes its volume.
//!
//! Over 500 lines on purpose: it is a corpus of cases, each a few lines, run by one harness.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use finetune_api::{FineTuneJob, TrainerConfig, TrainerPaths};
use finetune_trainer::model::tiny;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_finetune-trainer");
/// No case may take longer (a hang is a failure, not a stuck test).
const TIMEOUT: Duration = Duration::from_secs(60);

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    seconds: f64,
}

/// Runs the binary with a deadline; kills it and fails the test on a hang.
fn run(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let to = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let te = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("HANG: finetune-trainer {args:?} ran over {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let o = Outcome {
        code: status.code(),
        stdout: to.join().unwrap(),
        stderr: te.join().unwrap(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    assert_ne!(o.code, Some(101), "PANIC on {args:?}:\n{}", o.stderr);
    assert!(
        o.code.is_some(),
        "killed by a signal on {args:?}:\n{}",
        o.stderr
    );
    o
}

fn work(name: &str) -> PathBuf {
    let w = std::env::temp_dir().join(format!("ft-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&w);
    std::fs::create_dir_all(&w).unwrap();
    w
}

/// `prepare-data` on a file: Ok(report) or Err(error text).
fn prepare(path: &Path, fail_on_invalid: bool) -> (Result<serde_json::Value, String>, f64) {
    let p = path.display().to_string();
    let mut args = vec![
        "prepare-data",
        "--dataset",
        p.as_str(),
        "--text-column",
        "text",
        "--label-column",
        "label",
    ];
    if fail_on_invalid {
        args.push("--fail-on-invalid");
    }
    let o = run(&args, &[]);
    let r = if o.code == Some(0) {
        Ok(serde_json::from_str(&o.stdout).unwrap())
    } else {
        Err(o.stderr)
    };
    (r, o.seconds)
}

#[test]
fn malformed_datasets_give_clear_errors_or_reports_never_panics_or_hangs() {
    let w = work("data");
    let mut cases = 0;
    let mut slowest: f64 = 0.0;
    let mut check =
        |name: &str,
         bytes: &[u8],
         fail: bool,
         expect: &dyn Fn(&Result<serde_json::Value, String>, &str)| {
            let path = w.join(name);
            std::fs::write(&path, bytes).unwrap();
            let (r, secs) = prepare(&path, fail);
            expect(&r, &path.display().to_string());
            cases += 1;
            slowest = slowest.max(secs);
            eprintln!(
                "case {name}: {:.2} s: {}",
                secs,
                match &r {
                    Ok(rep) => format!("report {}", rep["invalid_examples"]),
                    Err(e) => e.lines().last().unwrap_or_default().to_string(),
                }
            );
        };
    let err_with = |needles: &'static [&'static str]| {
        move |r: &Result<serde_json::Value, String>, file: &str| {
            let e = r.as_ref().expect_err("expected an error");
            assert!(e.contains(file), "error must name the file {file}: {e}");
            for n in needles {
                assert!(e.contains(n), "error must contain {n:?}: {e}");
            }
        }
    };
    // Binary data (an ELF header with NUL bytes).
    let mut elf = b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x03\x00>\x00".to_vec();
    elf.extend((0..4096u32).map(|i| (i * 7 % 251) as u8));
    check(
        "binary.csv",
        &elf,
        false,
        &err_with(&[":1: binary data (NUL byte at column 8)"]),
    );
    check("binary.jsonl", &elf, false, &err_with(&[":1: binary data"]));
    // UTF-16 with a byte-order mark, and without one.
    let utf16: Vec<u8> = "text,label\nnice,Positive\n"
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    let mut bom = vec![0xff, 0xfe];
    bom.extend(&utf16);
    check(
        "utf16-bom.csv",
        &bom,
        false,
        &err_with(&[":1: UTF-16 encoded"]),
    );
    check(
        "utf16-nobom.jsonl",
        &utf16,
        false,
        &err_with(&[":1: binary data", "UTF-16"]),
    );
    // Latin-1: the offending rows are reported by line; the others are kept.
    check(
        "latin1.csv",
        b"text,label\nthe caf\xe9 was great,Positive\nworks fine,Positive\nbroken na\xefve design,Negative\nawful,Negative\n",
        false,
        &|r, _| {
            let rep = r.as_ref().unwrap();
            assert_eq!(rep["rows_kept"], 2);
            let inv = rep["invalid_examples"].to_string();
            assert!(inv.contains("2: not valid UTF-8 (byte 0xe9 at column 8)"), "{inv}");
            assert!(inv.contains("4: not valid UTF-8"), "{inv}");
        },
    );
    check(
        "latin1-fail.csv",
        b"text,label\nthe caf\xe9 was great,Positive\nworks fine,Positive\n",
        true,
        &err_with(&[":2: invalid row: not valid UTF-8"]),
    );
    // A 1 MB single field: read (no hang, no quadratic time), kept or dropped by length.
    let big = "x".repeat(1 << 20);
    check(
        "one-mb-field.csv",
        format!("text,label\n\"{big}\",Positive\nshort,Negative\n").as_bytes(),
        false,
        &|r, _| assert_eq!(r.as_ref().unwrap()["rows_kept"], 2),
    );
    check(
        "one-mb-field.jsonl",
        format!("{{\"text\":\"{big}\",\"label\":\"Positive\"}}\n").as_bytes(),
        false,
        &|r, _| assert_eq!(r.as_ref().unwrap()["rows_kept"], 1),
    );
    // An unterminated quote followed by a million short lines: linear, then a clear error.
    let mut open = b"text,label\nok,Positive\n\"never closed,".to_vec();
    open.extend(std::iter::repeat_n(b"a\n".as_slice(), 1_000_000).flatten());
    check("unterminated.csv", &open, false, &|r, _| {
        let rep = r.as_ref().unwrap();
        assert!(
            rep["invalid_examples"]
                .to_string()
                .contains("3: unterminated quoted field")
        );
    });
    // No line break at all for 20 MiB: refused by the line bound.
    check(
        "no-newlines.csv",
        &vec![b'a'; 20 << 20],
        false,
        &err_with(&[":1: line longer than 16 MiB"]),
    );
    // Zero rows.
    check("empty.csv", b"", false, &err_with(&["empty file"]));
    check(
        "header-only.csv",
        b"text,label\n",
        false,
        &err_with(&["no usable rows"]),
    );
    check(
        "blank.jsonl",
        b"\n\n  \n",
        false,
        &err_with(&["no usable rows"]),
    );
    // One class only: a report with a warning.
    check(
        "one-class.csv",
        b"text,label\ngood,Positive\nfine,Positive\ngreat,positive\n",
        false,
        &|r, _| {
            let rep = r.as_ref().unwrap();
            assert!(
                rep["warnings"].to_string().contains("one class only"),
                "{rep}"
            );
        },
    );
    // Ragged CSV rows: reported by line, or fatal with --fail-on-invalid.
    let ragged = b"text,label\ngood,Positive\ntoo,many,fields\nalone\nbad,Negative\n";
    check("ragged.csv", ragged, false, &|r, _| {
        let inv = r.as_ref().unwrap()["invalid_examples"].to_string();
        assert!(inv.contains("3: 3 fields, header has 2"), "{inv}");
        assert!(inv.contains("4: 1 fields, header has 2"), "{inv}");
    });
    check(
        "ragged-fail.csv",
        ragged,
        true,
        &err_with(&[":3: invalid row: 3 fields, header has 2"]),
    );
    // JSONL with bad lines.
    let jsonl = b"{\"text\":\"good\",\"label\":\"Positive\"}\n{not json\n[1,2,3]\n{\"text\":\"no label\"}\n{\"text\":\"bad\",\"label\":\"Negative\"}\n";
    check("bad-lines.jsonl", jsonl, false, &|r, _| {
        let rep = r.as_ref().unwrap();
        assert_eq!(rep["rows_kept"], 2);
        let inv = rep["invalid_examples"].to_string();
        for n in [
            "2: invalid JSON",
            "3: not a JSON object",
            "4: missing field",
        ] {
            assert!(inv.contains(n), "{n}: {inv}");
        }
    });
    check(
        "bad-lines-fail.jsonl",
        jsonl,
        true,
        &err_with(&[":2: invalid row: invalid JSON"]),
    );
    // Deeply nested JSON (stack) and a huge number.
    let deep = format!("{}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    check(
        "deep.jsonl",
        deep.as_bytes(),
        false,
        &err_with(&["no usable rows"]),
    );
    // A FIFO would block forever on open: refused as not a regular file.
    let fifo = w.join("fifo.csv");
    let st = Command::new("mkfifo").arg(&fifo).status();
    if st.is_ok_and(|s| s.success()) {
        let (r, secs) = prepare(&fifo, false);
        assert!(r.unwrap_err().contains("not a regular file"));
        cases += 1;
        slowest = slowest.max(secs);
    }
    eprintln!("FIGURE malformed-datasets cases={cases} panics=0 hangs=0 slowest_s={slowest:.2}");
    let _ = std::fs::remove_dir_all(&w);
}

/// A FineTuneJob laid out as the operator does: every input beneath a mount root, one folder per
/// volume.
fn job_config(root: &Path, dataset: &Path, model: &Path, tokenizer: &Path) -> PathBuf {
    let spec: FineTuneJob = serde_yaml::from_str(
        r#"
apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: paths}
spec:
  model: {preset: tiny}
  dataset:
    source: configmap://reviews/reviews.csv
    format: csv
    columns: {text: text, label: label}
  method: {type: lora}
"#,
    )
    .unwrap();
    let paths = TrainerPaths {
        model_dir: model.display().to_string(),
        tokenizer_file: tokenizer.display().to_string(),
        dataset_file: dataset.display().to_string(),
        retention_file: None,
        test_set_file: None,
        checkpoint_dir: root.join("checkpoints/c").display().to_string(),
        quantized_cache_dir: None,
        output_dir: root.join("checkpoints/out").display().to_string(),
        termination_message_file: root.join("termination-log").display().to_string(),
    };
    let c = TrainerConfig::from_spec(
        "paths".into(),
        String::new(),
        &spec.spec,
        paths,
        String::new(),
    );
    // One case at a time: the file is rewritten for each.
    let f = root.join("trainer.yaml");
    std::fs::write(&f, serde_yaml::to_string(&c).unwrap()).unwrap();
    f
}

#[test]
fn symlinks_out_of_a_volume_are_refused_zero_escapes() {
    let w = work("paths");
    let root = w.join("mnt");
    let ds = root.join("dataset");
    let model = root.join("model");
    std::fs::create_dir_all(&ds).unwrap();
    std::fs::create_dir_all(root.join("checkpoints")).unwrap();
    let cfg = common::small_config(64, 2);
    tiny::write_hf_model(&model, &cfg, &common::random_weights(&cfg, 1)).unwrap();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    std::fs::copy(
        fixtures.join("tokenizer-wordlevel.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        ds.join("data.csv"),
        "text,label\ngood,Positive\nbad,Negative\n",
    )
    .unwrap();
    std::fs::write(
        root.join("checkpoints/secret.csv"),
        "text,label\nSECRET-TOKEN,Positive\nx,Negative\n",
    )
    .unwrap();
    let tok = model.join("tokenizer.json");
    let root_s = root.display().to_string();
    let env = [("FINETUNE_MOUNT_ROOT", root_s.as_str())];
    let prepare_cfg = |c: &Path| {
        let cs = c.display().to_string();
        run(&["prepare-data", "--config", &cs], &env)
    };
    // The honest layout works (a symlink inside the volume is fine).
    symlink("data.csv", ds.join("inside.csv")).unwrap();
    let ok = prepare_cfg(&job_config(&w, &ds.join("inside.csv"), &model, &tok));
    assert_eq!(ok.code, Some(0), "{}", ok.stderr);
    // Escapes: each must be refused with a message naming the link.
    symlink("/etc/passwd", ds.join("passwd.csv")).unwrap();
    symlink("../checkpoints/secret.csv", ds.join("sideways.csv")).unwrap();
    symlink("../../../../../../../../etc/passwd", ds.join("dotdot.csv")).unwrap();
    symlink("/etc", ds.join("etc")).unwrap();
    symlink(root.join("checkpoints"), ds.join("abs-sibling")).unwrap();
    let evil_model = root.join("evil-model");
    std::fs::create_dir_all(&evil_model).unwrap();
    symlink("/etc/passwd", evil_model.join("config.json")).unwrap();
    std::fs::copy(
        model.join("model.safetensors"),
        evil_model.join("model.safetensors"),
    )
    .unwrap();
    let shard_model = root.join("shard-model");
    std::fs::create_dir_all(&shard_model).unwrap();
    std::fs::copy(model.join("config.json"), shard_model.join("config.json")).unwrap();
    std::fs::write(
        shard_model.join("model.safetensors.index.json"),
        r#"{"weight_map":{"model.embed_tokens.weight":"../../../../etc/passwd"}}"#,
    )
    .unwrap();
    let linked_model = root.join("linked-model");
    symlink(w.join("outside-model"), &linked_model).unwrap();
    std::fs::create_dir_all(w.join("outside-model")).unwrap();
    std::fs::copy(
        model.join("config.json"),
        w.join("outside-model/config.json"),
    )
    .unwrap();
    std::fs::copy(
        model.join("model.safetensors"),
        w.join("outside-model/model.safetensors"),
    )
    .unwrap();
    let cases: Vec<(PathBuf, PathBuf, PathBuf, &str)> = vec![
        (
            ds.join("passwd.csv"),
            model.clone(),
            tok.clone(),
            "symlink to /etc/passwd",
        ),
        (
            ds.join("sideways.csv"),
            model.clone(),
            tok.clone(),
            "symlink to ../checkpoints/secret.csv",
        ),
        (
            ds.join("dotdot.csv"),
            model.clone(),
            tok.clone(),
            "outside its volume",
        ),
        (
            ds.join("etc/passwd"),
            model.clone(),
            tok.clone(),
            "symlink to /etc",
        ),
        (
            ds.join("abs-sibling/secret.csv"),
            model.clone(),
            tok.clone(),
            "outside its volume",
        ),
        (
            ds.join("../checkpoints/secret.csv"),
            model.clone(),
            tok.clone(),
            "contains '..'",
        ),
        (
            ds.join("data.csv"),
            evil_model.clone(),
            tok.clone(),
            "symlink to /etc/passwd",
        ),
        (
            ds.join("data.csv"),
            shard_model.clone(),
            tok.clone(),
            "not a plain file name",
        ),
        (
            ds.join("data.csv"),
            linked_model.clone(),
            tok.clone(),
            "outside its volume",
        ),
        (
            ds.join("data.csv"),
            model.clone(),
            ds.join("passwd.csv"),
            "symlink to /etc/passwd",
        ),
    ];
    let mut refused = 0;
    for (d, m, t, why) in &cases {
        let o = prepare_cfg(&job_config(&w, d, m, t));
        assert_ne!(
            o.code,
            Some(0),
            "ESCAPE: {} / {} was accepted:\n{}",
            d.display(),
            m.display(),
            o.stdout
        );
        assert!(
            o.stderr.contains(why),
            "{} / {}: expected {why:?} in:\n{}",
            d.display(),
            m.display(),
            o.stderr
        );
        assert!(
            !o.stderr.contains("SECRET-TOKEN") && !o.stderr.contains("root:x:0"),
            "{}",
            o.stderr
        );
        refused += 1;
    }
    eprintln!(
        "FIGURE path-escapes attempts={} refused={refused} escapes=0",
        cases.len()
    );
    let _ = std::fs::remove_dir_all(&w);
}
