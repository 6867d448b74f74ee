//! `finetune-trainer evaluate` and `compare`: a model (a base, or a base + the PEFT adapter a
//! LoRA run exported) scored on a labelled held-out file, and two models side by side.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::de::DeserializeOwned;

use candle_core::Device;
use finetune_trainer::data::clean::CleaningOptions;
use finetune_trainer::data::jsonl::ColumnMapping;
use finetune_trainer::data::{Encoder, PromptTemplate};
use finetune_trainer::eval::classify::ClassificationSet;
use finetune_trainer::eval::heldout::{
    Comparison, Evaluation, HeldOutOptions, HeldOutSet, compare, evaluate_model,
};
use finetune_trainer::model::TrainableSpec;
use finetune_trainer::model::load::{ModelRef, load_for_inference};
use finetune_trainer::run::run_job;

const BIN: &str = env!("CARGO_BIN_EXE_finetune-trainer");

fn options() -> HeldOutOptions {
    HeldOutOptions {
        format: None,
        cleaning: CleaningOptions {
            columns: ColumnMapping {
                text: "ReviewText".into(),
                label: "SentimentLabel".into(),
                ..Default::default()
            },
            ..Default::default()
        },
        template: PromptTemplate::default(),
        max_seq_len: 48,
        max_rows: None,
        batch_size: 8,
    }
}

fn tokenizer() -> PathBuf {
    common::fixtures().join("tokenizer-wordlevel.json")
}

fn held_out() -> PathBuf {
    common::fixtures().join("reviews-small.csv")
}

/// A base model and the adapter of a short LoRA run on it.
fn base_and_adapter(name: &str) -> (PathBuf, ModelRef, ModelRef) {
    let (work, model) = common::setup(name);
    let p = common::params(
        &work,
        &model,
        "lora",
        TrainableSpec::Lora(common::lora_all(4)),
    );
    let out = p.output_dir.clone();
    run_job(p, false, None).unwrap();
    let base = ModelRef {
        model: model.clone(),
        adapter: None,
    };
    let tuned = ModelRef {
        model,
        adapter: Some(out.join("adapter")),
    };
    (work, base, tuned)
}

fn evaluation(model: &ModelRef, set: &HeldOutSet) -> Evaluation {
    evaluate_model(model, &tokenizer(), set, &options(), &Device::Cpu).unwrap()
}

#[test]
fn evaluate_scores_every_row_as_validation_does_and_compare_lists_each_difference() {
    let (work, base, tuned) = base_and_adapter("evaluate");
    let set = HeldOutSet::read(&held_out(), None, &options().cleaning, None).unwrap();
    assert_eq!(set.labels, ["Negative", "Positive"]);
    let a = evaluation(&base, &set);
    let b = evaluation(&tuned, &set);
    for e in [&a, &b] {
        assert_eq!(e.predictions.len(), set.examples.len());
        assert_eq!(e.metrics.n, set.examples.len());
        let right = e
            .predictions
            .iter()
            .filter(|p| p.truth == p.predicted)
            .count();
        assert!((e.metrics.accuracy - right as f64 / e.predictions.len() as f64).abs() < 1e-12);
        let lines: Vec<usize> = set.examples.iter().map(|x| x.line).collect();
        let got: Vec<usize> = e.predictions.iter().map(|p| p.line).collect();
        assert_eq!(got, lines);
    }
    // The same metrics as the training loop's validation scoring of those rows.
    let (model, _) = load_for_inference(&tuned, &Device::Cpu).unwrap();
    let enc = Encoder::from_file(&tokenizer(), PromptTemplate::default(), 48).unwrap();
    let classes =
        ClassificationSet::new(&enc, &set.examples, &set.labels, &set.majority_class).unwrap();
    assert_eq!(
        classes.evaluate(&model, 8, &Device::Cpu).unwrap(),
        b.metrics
    );
    // The adapter changed the model: the two disagree somewhere, and compare lists exactly those
    // rows with both answers.
    let c = compare(a.clone(), b.clone()).unwrap();
    let differ: Vec<usize> = a
        .predictions
        .iter()
        .zip(&b.predictions)
        .filter(|(x, y)| x.predicted != y.predicted)
        .map(|(x, _)| x.line)
        .collect();
    assert!(
        !differ.is_empty(),
        "base and tuned model answer alike on every row"
    );
    assert_eq!(
        c.disagreements.iter().map(|d| d.line).collect::<Vec<_>>(),
        differ
    );
    for d in &c.disagreements {
        let (x, y) = (
            a.predictions.iter().find(|p| p.line == d.line).unwrap(),
            b.predictions.iter().find(|p| p.line == d.line).unwrap(),
        );
        assert_eq!(
            (&d.a, &d.b, &d.truth),
            (&x.predicted, &y.predicted, &x.truth)
        );
    }
    let n = a.predictions.len();
    assert!((c.agreement - (n - differ.len()) as f64 / n as f64).abs() < 1e-12);
    // Fixed minus broken is the change in correct answers.
    let correct = |e: &Evaluation| {
        e.predictions
            .iter()
            .filter(|p| p.truth == p.predicted)
            .count()
    };
    assert_eq!(
        c.fixed_by_b as i64 - c.broken_by_b as i64,
        correct(&b) as i64 - correct(&a) as i64
    );
    let md = c.markdown();
    assert!(md.contains(&format!("{} differ", differ.len())), "{md}");
    // Different rows are refused, not compared.
    let fewer = HeldOutSet::read(&held_out(), None, &options().cleaning, Some(10)).unwrap();
    let err = compare(a, evaluation(&tuned, &fewer))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not evaluated on the same rows"), "{err}");
    let _ = std::fs::remove_dir_all(work);
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// `finetune-trainer COMMAND MODELS… --data DATA` with the fixture's columns, sequence length and
/// tokenizer, `--out OUT`, then `extra`.
fn cli(command: &str, models: &[String], data: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .arg(command)
        .args(models)
        .arg("--data")
        .arg(data)
        .args([
            "--text-column",
            "ReviewText",
            "--label-column",
            "SentimentLabel",
        ])
        .args(["--max-seq-len", "48"])
        .arg("--tokenizer")
        .arg(tokenizer())
        .arg("--out")
        .arg(out)
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn read_json<T: DeserializeOwned>(file: &Path) -> T {
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

#[test]
fn the_commands_write_json_and_markdown_and_name_the_bad_line() {
    let (work, base, tuned) = base_and_adapter("evaluate-cli");
    let adapter = path(tuned.adapter.as_ref().unwrap());
    let out = work.join("eval");
    let models = [
        "--model".into(),
        path(&tuned.model),
        "--adapter".into(),
        adapter.clone(),
    ];
    let o = cli("evaluate", &models, &held_out(), &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let written: Evaluation = read_json(&out.join("evaluation.json"));
    let set = HeldOutSet::read(&held_out(), None, &options().cleaning, None).unwrap();
    assert_eq!(written.predictions, evaluation(&tuned, &set).predictions);
    let md = std::fs::read_to_string(out.join("evaluation.md")).unwrap();
    assert!(
        md.contains("| class | precision | recall | F1 | support |"),
        "{md}"
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("accuracy"));

    let out = work.join("compare");
    let models = [
        "--model-a".into(),
        path(&base.model),
        "--model-b".into(),
        path(&tuned.model),
        "--adapter-b".into(),
        adapter,
    ];
    let o = cli("compare", &models, &held_out(), &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c: Comparison = read_json(&out.join("comparison.json"));
    assert_eq!(c.b.predictions, written.predictions);
    assert!(out.join("comparison.md").exists());

    // A row with another label and an unlabelled one are skipped and counted, as in training;
    // with --fail-on-invalid the error names the file and the line, and nothing is written.
    let bad = work.join("mislabelled.csv");
    std::fs::write(
        &bad,
        "ReviewText,SentimentLabel\ngood blender,Positive\nawful blender,Neutral\nbad,Negative\nmeh,\n",
    )
    .unwrap();
    let base_model = ["--model".into(), path(&base.model)];
    let labels = ["--labels", "Negative,Positive"];
    let out = work.join("skipped");
    let o = cli("evaluate", &base_model, &bad, &out, &labels);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let skipped: Evaluation = read_json(&out.join("evaluation.json"));
    assert_eq!(
        (skipped.cleaning.rows_read, skipped.cleaning.rows_kept),
        (4, 2)
    );
    assert_eq!(
        skipped.cleaning.dropped["invalid"], 2,
        "{:?}",
        skipped.cleaning
    );
    assert_eq!(skipped.predictions.len(), 2);
    let out = work.join("bad");
    let o = cli(
        "evaluate",
        &base_model,
        &bad,
        &out,
        &[labels[0], labels[1], "--fail-on-invalid"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("mislabelled.csv") && err.contains(":3:"),
        "{err}"
    );
    assert!(!out.join("evaluation.json").exists());
    let _ = std::fs::remove_dir_all(work);
}

#[test]
fn a_file_with_one_class_is_refused_by_name() {
    let work = std::env::temp_dir().join(format!("ft-one-class-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let f = work.join("one.csv");
    std::fs::write(
        &f,
        "ReviewText,SentimentLabel\ngood,Positive\nfine,Positive\n",
    )
    .unwrap();
    let err = HeldOutSet::read(&f, None, &options().cleaning, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("one.csv") && err.contains("at least two"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(work);
}

/// `evaluation.testSet`: the held-out file is classified by the base model before training and
/// by the tuned model after, with the same scoring as `evaluate`, into the report.
#[test]
fn a_jobs_test_set_is_scored_before_and_after_training() {
    let (work, model) = common::setup("test-set");
    let mut p = common::params(
        &work,
        &model,
        "lora",
        TrainableSpec::Lora(common::lora_all(4)),
    );
    p.eval.test_set_file = Some(held_out());
    p.eval.test_set_max_rows = 40;
    let out = p.output_dir.clone();
    let report = run_job(p, false, None).unwrap();
    let scores = report.test_set.as_ref().expect("test set in the report");
    assert_eq!((scores.before.n, scores.after.n), (40, 40));
    assert_eq!(report.before.test_set.as_ref(), Some(&scores.before));
    // The same numbers as scoring the exported adapter and the base with `evaluate`.
    let set = HeldOutSet::read(&held_out(), None, &options().cleaning, Some(40)).unwrap();
    let base = ModelRef {
        model: model.clone(),
        adapter: None,
    };
    let tuned = ModelRef {
        model,
        adapter: Some(out.join("adapter")),
    };
    assert_eq!(evaluation(&base, &set).metrics, scores.before);
    assert_eq!(evaluation(&tuned, &set).metrics, scores.after);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Held-out test set"), "{md}");
    let _ = std::fs::remove_dir_all(work);
}

#[test]
fn the_validation_loss_taken_from_the_classification_scores_is_the_rows_own_mean_nll() {
    // Evaluation scores every validation row with each label; the true label's candidate is
    // the row itself, so its scores give the validation loss without a second forward. Equal to
    // the path it replaces (mean_nll over the rows), and that path is taken when the rows are
    // not the candidates.
    let (_work, _base, tuned) = base_and_adapter("validation-loss");
    let set = HeldOutSet::read(&held_out(), None, &options().cleaning, None).unwrap();
    let (model, _) = load_for_inference(&tuned, &Device::Cpu).unwrap();
    let enc = Encoder::from_file(&tokenizer(), PromptTemplate::default(), 48).unwrap();
    let classes =
        ClassificationSet::new(&enc, &set.examples, &set.labels, &set.majority_class).unwrap();
    let rows: Vec<_> = set
        .examples
        .iter()
        .map(|x| enc.encode(x).unwrap())
        .collect();
    let direct = finetune_trainer::eval::mean_nll(&model, &rows, 32, &Device::Cpu).unwrap();
    let scores = classes.scores(&model, 32, &Device::Cpu).unwrap();
    let shared = classes
        .true_label_loss(&scores, &rows)
        .expect("rows are the true candidates");
    assert!(direct.is_finite() && direct > 0.0, "{direct}");
    assert!(
        (shared - direct).abs() < 1e-5 * direct,
        "{shared} vs {direct}"
    );
    let (loss, report) =
        finetune_trainer::eval::validation_scores(&model, &rows, Some(&classes), &Device::Cpu)
            .unwrap();
    assert_eq!(loss, shared);
    assert_eq!(report.unwrap(), classes.report(&scores));
    // Rows that are not the candidates (one answer changed, or one row fewer): no shortcut.
    let mut other = rows.clone();
    let last = other[0].ids.len() - 2;
    other[0].ids[last] = (other[0].ids[last] + 1) % enc.vocab_size() as u32;
    assert_eq!(classes.true_label_loss(&scores, &other), None);
    assert_eq!(classes.true_label_loss(&scores, &rows[1..]), None);
    let (fallback, _) =
        finetune_trainer::eval::validation_scores(&model, &other, Some(&classes), &Device::Cpu)
            .unwrap();
    let expected = finetune_trainer::eval::mean_nll(&model, &other, 32, &Device::Cpu).unwrap();
    assert_eq!(fallback, expected);
}
