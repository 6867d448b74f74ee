//! Tests on the real Amazon review snippets and the real Llama 2 tokenizer (fetched by
//! scripts/fetch-assets.sh into ~/.cache/finetune-operator/assets, or FINETUNE_ASSETS_DIR).
//! They are skipped when the assets cannot be fetched, unless FINETUNE_REQUIRE_ASSETS=1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use finetune_trainer::data::clean::read_dataset_file;
use finetune_trainer::data::jsonl::ColumnMapping;
use finetune_trainer::data::{CleaningOptions, Encoder, PromptTemplate};
use finetune_trainer::model::{TrainableSpec, tiny};
use finetune_trainer::train::{TrainParams, Trainer};

fn assets() -> Option<std::path::PathBuf> {
    let a = common::assets_dir();
    if a.is_none() && common::require_assets() {
        panic!("real assets required but not available");
    }
    a
}

fn amazon_opts() -> CleaningOptions {
    CleaningOptions {
        columns: ColumnMapping {
            text: "ReviewText".into(),
            label: "SentimentLabel".into(),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn amazon_csv_cleans_and_tokenizes_with_response_mask() {
    let Some(dir) = assets() else { return };
    let (rows, report) =
        read_dataset_file(&dir.join("amazon_reviews.csv"), None, &amazon_opts()).unwrap();
    assert_eq!(report.rows_read, 2943);
    assert_eq!(report.labels_before["Positive"], 1725);
    assert_eq!(report.labels_before["Negative"], 1218);
    assert!(
        report.rows_kept > 2800 && report.rows_kept <= 2943,
        "{report:?}"
    );
    let enc =
        Encoder::from_file(&dir.join("tokenizer.json"), PromptTemplate::default(), 64).unwrap();
    assert_eq!(enc.vocab_size(), 32000);
    assert_eq!((enc.bos, enc.eos), (1, 2));
    let e = enc.encode(&rows[0]).unwrap();
    assert_eq!(e.ids[0], 1);
    assert_eq!(*e.ids.last().unwrap(), 2);
    let resp: Vec<u32> = e
        .ids
        .iter()
        .zip(&e.target)
        .filter(|(_, m)| **m == 1)
        .map(|(i, _)| *i)
        .collect();
    let text = enc.decode(&resp).unwrap();
    assert_eq!(text.trim(), rows[0].response);
    let prompt = enc.decode(&e.ids[..e.prompt_len]).unwrap();
    assert!(
        prompt.starts_with("[INST]") && prompt.ends_with("[/INST]"),
        "{prompt}"
    );
    // trainLabelTokens' rows are exactly the supervised answer tokens: every one of them, `</s>`
    // included (a base that never ends a text with it pays its whole loss there), each once.
    let labels = ["Negative".to_string(), "Positive".to_string()];
    let rows_trained = enc.label_token_ids(&labels).unwrap();
    let mut supervised: Vec<u32> = Vec::new();
    for label in &labels {
        let mut ex = rows[0].clone();
        ex.response = label.clone();
        let e = enc.encode(&ex).unwrap();
        for (id, m) in e.ids.iter().zip(&e.target) {
            if *m == 1 && !supervised.contains(id) {
                supervised.push(*id);
            }
        }
    }
    assert_eq!(rows_trained.last(), Some(&enc.eos));
    let (mut trained, mut wanted) = (rows_trained.clone(), supervised);
    trained.sort_unstable();
    wanted.sort_unstable();
    assert_eq!(trained, wanted, "each supervised token once");
}

#[test]
fn loss_falls_on_amazon_reviews() {
    let Some(dir) = assets() else { return };
    let work = std::env::temp_dir().join(format!("ft-amazon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let mut cfg = tiny::tiny_config(32000);
    cfg.hidden_size = 64;
    cfg.intermediate_size = 128;
    cfg.num_hidden_layers = 2;
    let w = tiny::init_weights(&cfg, 1, &candle_core::Device::Cpu).unwrap();
    tiny::write_hf_model(&work.join("model"), &cfg, &w).unwrap();
    let mut p = TrainParams::with_defaults(
        work.join("model"),
        dir.join("tokenizer.json"),
        dir.join("amazon_reviews.csv"),
        &work,
    );
    p.cleaning = amazon_opts();
    p.method = TrainableSpec::Full {
        layers: None,
        embeddings_and_head: true,
    };
    p.learning_rate = 3e-3;
    p.max_steps = Some(30);
    p.batch_size = 8;
    p.max_seq_len = 64;
    p.eval.interval = 0;
    p.validation_split = 0.05;
    let mut t = Trainer::new(p, false, None).unwrap();
    t.run(None).unwrap();
    let l: Vec<f32> = t.history.iter().map(|r| r.loss).collect();
    let first = l[..5].iter().sum::<f32>() / 5.0;
    let last = l[l.len() - 5..].iter().sum::<f32>() / 5.0;
    assert!(
        last < first - 1.0,
        "loss did not fall: {first} -> {last} ({l:?})"
    );
    // Validation loss measured (forward only) is finite and below the untrained ~ln(32000).
    let ev = t.evals.last().unwrap();
    assert!(
        ev.point.val_loss.is_finite() && ev.point.val_loss < 8.0,
        "{:?}",
        ev.point
    );
    assert!(ev.classification.is_some());
    // A sane run is not flagged as overfitting.
    assert!(!t.monitor.ever_overfit, "{:?}", t.evals);
    let _ = std::fs::remove_dir_all(&work);
}

/// The fetched tokenizer is Llama 2's own (not Mistral-7B's, which has the same size and
/// specials): reference ids from Meta's tokenizer as transformers loads it for Llama-2-7b-hf.
#[test]
fn the_tokenizer_is_the_genuine_llama2_one() {
    let Some(dir) = assets() else { return };
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let ids = |text: &str| tok.encode(text, true).unwrap().get_ids().to_vec();
    assert_eq!(
        ids("[INST]"),
        [1, 518, 25580, 29962],
        "Mistral gives 1 733 16289 28793"
    );
    assert_eq!(ids("Hello world"), [1, 15043, 3186]);
    assert_eq!(ids("<<SYS>>"), [1, 3532, 14816, 29903, 6778]);
    assert_eq!(ids("</s>"), [1, 2]);
    assert_eq!(tok.token_to_id("▁the"), Some(278));
    assert_eq!(tok.token_to_id("▁Hello"), Some(15043));
    assert_eq!(tok.token_to_id("<unk>"), Some(0));
    assert_eq!(tok.token_to_id("<0x00>"), Some(3));
    assert_eq!(tok.token_to_id("<0xFF>"), Some(258));
    assert_eq!(tok.get_vocab_size(false), 32000);
    // Byte fallback: a character outside the vocabulary becomes its UTF-8 bytes (3 + byte value),
    // and decoding gives the text back.
    let emoji = ids("🦙");
    let bytes: Vec<u32> = "🦙".bytes().map(|b| 3 + u32::from(b)).collect();
    assert!(emoji.ends_with(&bytes), "{emoji:?}");
    let text = "Works exactly as described, I would buy it again. 🦙";
    let round = tok.decode(&ids(text), true).unwrap();
    assert_eq!(round, text);
}
