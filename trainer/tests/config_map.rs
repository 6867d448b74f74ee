//! The operator's TrainerConfig (finetune_api) maps onto the trainer's parameters.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use finetune_api::LrScheduler;
use finetune_trainer::data::PromptTemplate;
use finetune_trainer::model::{TrainableSpec, tiny};

#[test]
fn demo_config_maps_onto_params() {
    let work = std::env::temp_dir().join(format!("ft-config-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let cfg = common::small_config(64, 2);
    tiny::write_hf_model(
        &work.join("tiny-base"),
        &cfg,
        &common::random_weights(&cfg, 1),
    )
    .unwrap();
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/demo-tiny.yaml"
    ))
    .unwrap()
    .replace("@ASSETS@", "/assets")
    .replace("@WORK@", &work.display().to_string());
    let path = work.join("c.yaml");
    std::fs::write(&path, yaml).unwrap();
    let c = finetune_trainer::config::read_config(&path).unwrap();
    let p = finetune_trainer::config::to_params(&c).unwrap();
    assert_eq!(p.job, "demo/tiny-amazon");
    assert_eq!(p.cleaning.columns.text, "ReviewText");
    assert_eq!(p.cleaning.columns.label, "SentimentLabel");
    assert!(p.cleaning.labels_are_classes);
    assert_eq!(
        p.template,
        PromptTemplate::Llama2Chat {
            system: None,
            instruction: None
        }
    );
    assert_eq!(
        p.method,
        TrainableSpec::Full {
            layers: None,
            embeddings_and_head: true
        }
    );
    assert_eq!((p.epochs, p.batch_size, p.max_seq_len), (2, 16, 96));
    assert_eq!(p.schedule, LrScheduler::Cosine);
    assert_eq!(p.eval.early_stopping_patience, Some(3));
    assert_eq!(
        p.eval.retention_file.as_deref(),
        Some(std::path::Path::new("/assets/nyt_general.txt"))
    );
    assert_eq!(p.eval.sample_prompts.len(), 2);
    assert_eq!(
        (p.checkpoint_interval, p.keep_last, p.keep_best),
        (100, 2, true)
    );
    // No quantized base cache unless the paths name one (the demo's file has none).
    assert_eq!(p.quantized_cache_dir, None);
    let mut cached = c.clone();
    cached.paths.quantized_cache_dir = Some("/ckpt/quantized-base".into());
    let yaml = serde_yaml::to_string(&cached).unwrap();
    assert!(
        yaml.contains("quantizedCacheDir: /ckpt/quantized-base"),
        "{yaml}"
    );
    let reread: finetune_api::TrainerConfig = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(
        finetune_trainer::config::to_params(&reread)
            .unwrap()
            .quantized_cache_dir
            .as_deref(),
        Some(std::path::Path::new("/ckpt/quantized-base"))
    );
    // LoRA on the last layer only, with PEFT module names.
    let mut c2 = c.clone();
    c2.method.method_type = finetune_api::MethodType::Lora;
    c2.method.trainable_layers = Some(finetune_api::TrainableLayers {
        last: Some(1),
        indices: None,
    });
    match finetune_trainer::config::to_params(&c2).unwrap().method {
        TrainableSpec::Lora(l) => {
            assert_eq!(l.layers, Some(vec![1]));
            assert_eq!(l.target_modules, vec!["q_proj", "v_proj"]);
            assert_eq!((l.rank, l.alpha), (8, 16.0));
        }
        other => panic!("{other:?}"),
    }
    // No KL-to-base penalty unless `method.lora.klToBase` names one.
    assert_eq!(
        finetune_trainer::config::to_params(&c2).unwrap().base_kl,
        None
    );
    let mut c3 = c2.clone();
    c3.method.lora = Some(finetune_api::LoraSpec {
        kl_to_base: Some(finetune_api::KlToBase {
            weight: 0.5,
            position_stride: 8,
        }),
        ..Default::default()
    });
    assert_eq!(
        finetune_trainer::config::to_params(&c3).unwrap().base_kl,
        Some(finetune_trainer::train::base_kl::BaseKl {
            weight: 0.5,
            stride: 8
        })
    );
    // The run's identity: the job UID and fingerprint from the configuration, and the hub
    // commit the download step recorded beside the weights.
    assert_eq!(p.run.training_fingerprint, c.training_fingerprint());
    assert_eq!(p.run.model_commit, "", "no download record");
    let source = finetune_api::ModelSource {
        repo: "org/tiny".into(),
        revision: "main".into(),
        commit: "4b2a0c9e1d7f3a5b6c8d0e2f4a6b8c0d1e3f5a7b".into(),
    };
    let record = work.join("tiny-base").join(finetune_api::ModelSource::FILE);
    std::fs::write(&record, serde_json::to_string(&source).unwrap()).unwrap();
    let p = finetune_trainer::config::to_params(&c).unwrap();
    assert_eq!(p.run.model_commit, source.commit);
    std::fs::write(&record, "{not json").unwrap();
    let err = finetune_trainer::config::to_params(&c)
        .unwrap_err()
        .to_string();
    assert!(err.contains(finetune_api::ModelSource::FILE), "{err}");
    let _ = std::fs::remove_dir_all(&work);
}
