//! Evaluation and monitoring: a planted overfit is flagged and stopped early with the best
//! checkpoint kept; full fine-tuning at a high learning rate raises retention perplexity more
//! than LoRA; the report carries before/after samples and the forgetting ratio.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use finetune_trainer::data::jsonl::ColumnMapping;
use finetune_trainer::model::{TrainableSpec, tiny};
use finetune_trainer::rng::Rng;
use finetune_trainer::run::run_job;
use finetune_trainer::train::TrainParams;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `n` rows of the fixture reviews with random labels (nothing to learn but memorisation), and
/// the same texts as a retention file.
fn planted(work: &Path, n: usize) -> (PathBuf, PathBuf) {
    let text = std::fs::read_to_string(fixtures().join("reviews-small.csv")).unwrap();
    let mut rng = Rng::new(5);
    let mut csv = String::from("ReviewText,SentimentLabel\n");
    let mut retention = String::new();
    for line in text.lines().skip(1).take(n) {
        let (t, _) = line.rsplit_once(',').unwrap();
        let label = if rng.below(2) == 0 {
            "Positive"
        } else {
            "Negative"
        };
        csv.push_str(&format!("{t},{label}\n"));
        retention.push_str(t.trim_matches('"'));
        retention.push('\n');
    }
    std::fs::create_dir_all(work).unwrap();
    let d = work.join("planted.csv");
    let r = work.join("retention.txt");
    std::fs::write(&d, csv).unwrap();
    std::fs::write(&r, retention).unwrap();
    (d, r)
}

fn params(work: &Path, run: &str, spec: TrainableSpec, lr: f64, epochs: usize) -> TrainParams {
    let (data, retention) = planted(work, 40);
    let model = work.join("model");
    if !model.join("config.json").exists() {
        let cfg = common::small_config(64, 2);
        tiny::write_hf_model(&model, &cfg, &common::random_weights(&cfg, 4)).unwrap();
    }
    let mut p = TrainParams::with_defaults(
        &model,
        fixtures().join("tokenizer-wordlevel.json"),
        data,
        work.join(run),
    );
    p.cleaning.columns = ColumnMapping {
        text: "ReviewText".into(),
        label: "SentimentLabel".into(),
        ..Default::default()
    };
    p.validation_split = 0.25;
    p.method = spec;
    p.learning_rate = lr;
    p.epochs = epochs;
    p.batch_size = 8;
    p.max_seq_len = 48;
    p.warmup_steps = 0;
    p.eval.interval = 0;
    p.eval.retention_file = Some(retention);
    p.eval.sample_prompts = vec!["the lamp is sturdy".into()];
    p.eval.sample_max_new_tokens = 4;
    p.keep_last = 1;
    p
}

#[test]
fn planted_overfit_is_flagged_and_stopped_early_keeping_the_best() {
    let work = std::env::temp_dir().join(format!("ft-overfit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let full = TrainableSpec::Full {
        layers: None,
        embeddings_and_head: true,
    };
    let mut p = params(&work, "o", full, 1e-2, 60);
    p.schedule = finetune_api::LrScheduler::Constant;
    p.eval.early_stopping_patience = Some(3);
    p.eval.max_gap = 0.5;
    p.eval.rising_evaluations = 2;
    let report = run_job(p.clone(), false, None).unwrap();
    assert_eq!(report.status, "early-stopped", "{}", report.stop_reason);
    assert!(
        report.overfitting.is_some(),
        "not flagged: {:?}",
        report.evaluations
    );
    assert!(report.steps < report.total_steps);
    let (best_loss, best_step) = report.best.unwrap();
    let best_dir = p.checkpoint_dir.join(format!("checkpoint-{best_step:08}"));
    assert!(
        best_dir.join("manifest.json").exists(),
        "best checkpoint not kept"
    );
    assert!(
        report
            .evaluations
            .iter()
            .all(|e| e.point.val_loss >= best_loss)
    );
    // The outputs are the best weights: the final report on disk says so and has the samples.
    let md = std::fs::read_to_string(p.output_dir.join("report.md")).unwrap();
    assert!(
        md.contains("early stopping") && md.contains("Before / after samples"),
        "{md}"
    );
    assert_eq!(report.samples.len(), 1);
    // The curves beside the report: one point per evaluation on each loss line, and the
    // validation accuracy against the majority baseline (the fixture is a classification set).
    assert!(
        md.contains("![loss](loss.svg)") && md.contains("![accuracy](accuracy.svg)"),
        "{md}"
    );
    let loss = std::fs::read_to_string(p.output_dir.join("loss.svg")).unwrap();
    assert_eq!(
        loss.matches("<polyline").count(),
        2,
        "training and validation loss"
    );
    let first_line = &loss[loss.find("points=\"").unwrap()..];
    let points = first_line[8..first_line[8..].find('"').unwrap() + 8]
        .split(' ')
        .count();
    assert_eq!(points, report.evaluations.len());
    let accuracy = std::fs::read_to_string(p.output_dir.join("accuracy.svg")).unwrap();
    assert!(accuracy.contains("majority class"), "{accuracy}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn full_high_lr_forgets_more_than_lora() {
    let work = std::env::temp_dir().join(format!("ft-forget-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let full = TrainableSpec::Full {
        layers: None,
        embeddings_and_head: true,
    };
    let mut lora = common::lora_all(4);
    lora.target_modules = vec!["q_proj".into(), "v_proj".into()];
    let rf = run_job(params(&work, "full", full, 2e-2, 6), false, None).unwrap();
    let rl = run_job(
        params(&work, "lora", TrainableSpec::Lora(lora), 1e-3, 6),
        false,
        None,
    )
    .unwrap();
    let ff = rf.forgetting.unwrap();
    let fl = rl.forgetting.unwrap();
    eprintln!(
        "retention perplexity ratio: full {:.3} ({:.2} -> {:.2}), lora {:.3} ({:.2} -> {:.2})",
        ff.ratio, ff.before, ff.after, fl.ratio, fl.before, fl.after
    );
    assert!((ff.before - fl.before).abs() < 1e-9, "same base model");
    assert!(ff.ratio > fl.ratio, "full {ff:?} vs lora {fl:?}");
    assert!(ff.ratio > 1.0);
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn the_kl_to_base_penalty_forgets_less_than_lora_without_it() {
    let work = std::env::temp_dir().join(format!("ft-kl-forget-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let lora = || TrainableSpec::Lora(common::lora_all(4));
    let plain = run_job(params(&work, "plain", lora(), 1e-2, 6), false, None).unwrap();
    let mut p = params(&work, "kl", lora(), 1e-2, 6);
    p.base_kl = Some(finetune_trainer::train::base_kl::BaseKl {
        weight: 2.0,
        stride: 1,
    });
    let penalised = run_job(p.clone(), false, None).unwrap();
    let (fp, fk) = (plain.forgetting.unwrap(), penalised.forgetting.unwrap());
    eprintln!(
        "retention perplexity ratio: plain lora {:.3}, with klToBase {:.3}",
        fp.ratio, fk.ratio
    );
    assert!((fp.before - fk.before).abs() < 1e-9, "same base model");
    assert!(fp.ratio > 1.0, "the plain run forgets: {fp:?}");
    assert!(
        fk.ratio - 1.0 < 0.5 * (fp.ratio - 1.0),
        "the penalty halves the rise at least: plain {fp:?} vs penalised {fk:?}"
    );
    let md = std::fs::read_to_string(p.output_dir.join("report.md")).unwrap();
    assert!(md.contains("KL to the base weighted 2"), "{md}");
    let _ = std::fs::remove_dir_all(&work);
}
