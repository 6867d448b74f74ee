//! Maps `finetune_api::TrainerConfig` (the file the operator renders into a ConfigMap) onto the
//! trainer's own [`TrainParams`]; the API crate is the single source of truth for the fields.

use finetune_api::{
    DatasetFormat, MethodType, OnInvalidRow, Precision, PromptStyle, TrainableLayers, TrainerConfig,
};
use std::path::{Path, PathBuf};

use crate::data::clean::{CleaningOptions, Format, InvalidRowPolicy};
use crate::data::jsonl::ColumnMapping;
use crate::data::template::PromptTemplate;
use crate::model::{LlamaConfig, LoraSettings, TrainableSpec};
use crate::train::base_kl::BaseKl;
use crate::train::params::{EvalParams, TrainParams};
use crate::{Result, TrainerError};

/// Environment variable that overrides the configuration's metrics address.
pub const METRICS_ADDRESS_ENV: &str = "FINETUNE_METRICS_ADDRESS";

/// Reads a trainer configuration file (YAML or JSON).
pub fn read_config(path: &Path) -> Result<TrainerConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
    serde_yaml::from_str(&text)
        .map_err(|e| TrainerError::Config(format!("{}: {e}", path.display())))
}

/// The hub commit recorded beside the weights by the download step; empty when the model came
/// from elsewhere (a volume, the tiny base). A record that is there but unreadable is an error.
fn model_commit(model_dir: &Path) -> Result<String> {
    let path = model_dir.join(finetune_api::ModelSource::FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(TrainerError::io(&path, e)),
    };
    let source: finetune_api::ModelSource = serde_json::from_str(&text)
        .map_err(|e| TrainerError::Config(format!("{}: {e}", path.display())))?;
    Ok(source.commit)
}

/// Resolves the configuration into the trainer's parameters. The model's `config.json` is read
/// to resolve layer selections, so the model directory must exist (see `init-tiny`).
/// Every input beneath the mount root (see `finetune_formats::paths`) is resolved inside its
/// volume: a symlink leading out of it (`data.csv -> /etc/passwd`, `model -> ../..`) is refused.
pub fn to_params(c: &TrainerConfig) -> Result<TrainParams> {
    let root = finetune_formats::paths::mount_root();
    let confine =
        |p: &Path| -> Result<PathBuf> { Ok(finetune_formats::paths::confine_input(p, &root)?) };
    let configured_model_dir = Path::new(&c.paths.model_dir);
    let model_dir = confine(configured_model_dir)?;
    let config_file = confine(&configured_model_dir.join("config.json"))?;
    for f in crate::model::weights::weight_files(configured_model_dir)? {
        confine(&f)?;
    }
    let tokenizer = confine(Path::new(&c.paths.tokenizer_file))?;
    let dataset = confine(Path::new(&c.paths.dataset_file))?;
    let retention_file = match &c.paths.retention_file {
        Some(r) => Some(confine(Path::new(r))?),
        None => None,
    };
    let test_set_file = match &c.paths.test_set_file {
        Some(t) => Some(confine(Path::new(t))?),
        None => None,
    };
    let cfg = LlamaConfig::from_file(&config_file)?;
    let layers_sel = TrainableLayers::resolve(
        c.method.trainable_layers.as_ref(),
        cfg.num_hidden_layers as u32,
    );
    let layers: Vec<usize> = layers_sel.iter().map(|&i| i as usize).collect();
    let all_layers = c.method.trainable_layers.is_none();
    let method = match c.method.method_type {
        MethodType::Lora => TrainableSpec::Lora(LoraSettings::from_spec(
            &c.method.lora_or_default().unwrap_or_default(),
            if all_layers { None } else { Some(layers) },
        )),
        MethodType::Full => TrainableSpec::Full {
            layers: if all_layers { None } else { Some(layers) },
            embeddings_and_head: all_layers,
        },
    };
    let d = &c.dataset;
    let task = d.columns.task();
    let classification = matches!(task, Some(finetune_api::DatasetTask::Classification) | None);
    let defaults = ColumnMapping::default();
    let (text_col, label_col) = match (
        &d.columns.text,
        &d.columns.label,
        &d.columns.prompt,
        &d.columns.completion,
    ) {
        (Some(t), Some(l), _, _) => (t.clone(), l.clone()),
        (_, _, Some(p), Some(q)) if d.format == DatasetFormat::Csv => (p.clone(), q.clone()),
        _ => (defaults.text.clone(), defaults.label.clone()),
    };
    let columns = ColumnMapping {
        text: text_col,
        label: label_col,
        prompt: d.columns.prompt.clone().unwrap_or(defaults.prompt),
        completion: d.columns.completion.clone().unwrap_or(defaults.completion),
        messages: d.columns.messages.clone().unwrap_or(defaults.messages),
    };
    let cleaning = CleaningOptions {
        dedupe: d.cleaning.dedupe,
        drop_empty: d.cleaning.drop_empty,
        min_length: Some(d.cleaning.min_chars as usize),
        max_length: Some(d.cleaning.max_chars as usize),
        on_invalid_row: match d.cleaning.on_invalid_row {
            OnInvalidRow::Skip => InvalidRowPolicy::Skip,
            OnInvalidRow::Fail => InvalidRowPolicy::Fail,
        },
        columns,
        labels_are_classes: classification,
        normalize_labels: d.cleaning.normalize_labels,
        allowed_labels: d.cleaning.allowed_labels.clone(),
        max_invalid_fraction: d.cleaning.max_invalid_fraction,
    };
    let template = match d.prompt_template.style {
        PromptStyle::Llama2Chat => PromptTemplate::Llama2Chat {
            system: d.prompt_template.system.clone(),
            instruction: d.prompt_template.instruction.clone(),
        },
        PromptStyle::Plain => PromptTemplate::Plain {
            instruction: d.prompt_template.instruction.clone(),
        },
    };
    let h = &c.hyperparameters;
    let eval = EvalParams::from_spec(&c.evaluation, retention_file, test_set_file);
    Ok(TrainParams {
        job: c.job.clone(),
        run: crate::checkpoint::RunIdentity {
            job_uid: c.job_uid.clone(),
            training_fingerprint: c.training_fingerprint(),
            model_commit: model_commit(&model_dir)?,
        },
        model_dir,
        tokenizer,
        dataset,
        format: Some(match d.format {
            DatasetFormat::Csv => Format::Csv,
            DatasetFormat::Jsonl => Format::Jsonl,
        }),
        cleaning,
        template,
        validation_split: d.validation_split,
        data_seed: d.seed,
        method,
        activation: c.method.activation.as_ref().map(|a| a.hf_name()),
        base_kl: c
            .method
            .lora_or_default()
            .and_then(|l| l.kl_to_base)
            .map(|k| BaseKl {
                weight: k.weight,
                stride: k.position_stride as usize,
            }),
        bf16: c.precision == Precision::Bf16,
        gradient_checkpointing: c.gradient_checkpointing,
        use_gpu: c.use_gpu,
        gpu_ordinal: 0,
        layer_gpus: c.layer_gpus.iter().map(|g| *g as usize).collect(),
        eval,
        checkpoint_dir: PathBuf::from(&c.paths.checkpoint_dir),
        quantized_cache_dir: c.paths.quantized_cache_dir.as_ref().map(PathBuf::from),
        checkpoint_interval: c.checkpoints.interval_steps as usize,
        keep_last: c.checkpoints.keep_last as usize,
        keep_best: c.checkpoints.keep_best,
        output_dir: PathBuf::from(&c.paths.output_dir),
        merge_weights: c.output.merge_weights,
        // The pod sets FINETUNE_METRICS_ADDRESS to `$(POD_IP):9090`, so the server binds the
        // pod's own address (several trainers on one host never collide); the file's address is
        // the fallback.
        metrics_address: std::env::var(METRICS_ADDRESS_ENV)
            .ok()
            .filter(|a| !a.is_empty())
            .or_else(|| Some(c.metrics_address.clone()).filter(|a| !a.is_empty())),
        termination_message_file: Some(PathBuf::from(&c.paths.termination_message_file))
            .filter(|p| !p.as_os_str().is_empty()),
        ..TrainParams::from_hyperparameters(h)
    })
}
