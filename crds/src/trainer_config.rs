//! The trainer's configuration file: what the operator renders into a ConfigMap and the trainer
//! reads with `finetune-trainer train --config FILE`. The spec sections are the user's, verbatim;
//! the paths are where the pod mounts them.

use serde::{Deserialize, Serialize};

use crate::v1alpha1::{
    CheckpointSpec, DatasetSpec, EvaluationSpec, FineTuneJobSpec, Hyperparameters, MethodSpec,
    ModelSpec, OutputSpec, Precision,
};

/// The record a hub model download leaves beside the weights (in [`ModelSource::FILE`] of the
/// model directory): which repository and revision, and the commit the revision resolved to.
/// Written by the download step, read by the trainer (which reports the commit and makes it part
/// of its checkpoints' identity).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct ModelSource {
    /// `org/name` on the hub.
    pub repo: String,
    /// The revision asked for (a branch, tag or commit).
    pub revision: String,
    /// The commit it resolved to.
    pub commit: String,
}

impl ModelSource {
    /// File name of the record in the model directory.
    pub const FILE: &str = ".finetune-source.json";
}

/// Everything the trainer needs to run one job.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerConfig {
    /// `namespace/name` of the FineTuneJob, for logs and the report.
    pub job: String,
    /// `metadata.uid` of the FineTuneJob: its checkpoints are kept apart from those of any
    /// other job (the checkpoint directory carries it) and carry it, and a resume refuses a
    /// checkpoint of another job. Empty outside a cluster.
    #[serde(default)]
    pub job_uid: String,
    /// The base model.
    pub model: ModelSpec,
    /// The dataset and its cleaning.
    pub dataset: DatasetSpec,
    /// LoRA or full fine-tuning.
    pub method: MethodSpec,
    /// Optimiser settings.
    pub hyperparameters: Hyperparameters,
    /// Evaluation settings.
    pub evaluation: EvaluationSpec,
    /// Checkpoint interval and retention.
    pub checkpoints: CheckpointSpec,
    /// Output settings.
    pub output: OutputSpec,
    /// Precision resolved from the spec and the GPU count.
    pub precision: Precision,
    /// Activation checkpointing resolved from the spec and the GPU count.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Whether the trainer should use a GPU.
    pub use_gpu: bool,
    /// With the decoder layers split over the pod's GPUs (`resources.spread: layers`): the GPU
    /// (`cuda:N`) of each layer, in layer order ([`crate::placement`]); the embeddings go with
    /// the first layer, the final norm and LM head with the last. Empty: one device holds the
    /// whole model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_gpus: Vec<u32>,
    /// Local paths inside the trainer pod.
    pub paths: TrainerPaths,
    /// Address the metrics and progress server binds to (`0.0.0.0:9090`, or the pod IP).
    pub metrics_address: String,
}

/// Local paths inside the trainer pod.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerPaths {
    /// Directory with `config.json` and `*.safetensors` (Hugging Face layout). For `tiny`
    /// without a source, the trainer initialises it here when empty.
    pub model_dir: String,
    /// `tokenizer.json` (Hugging Face tokenizers format).
    pub tokenizer_file: String,
    /// The dataset file.
    pub dataset_file: String,
    /// The retention text file, when `evaluation.retention` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_file: Option<String>,
    /// The held-out test file, when `evaluation.testSet` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_set_file: Option<String>,
    /// Checkpoint directory (on the checkpoint volume).
    pub checkpoint_dir: String,
    /// Directory of the quantized base cache (LoRA over a quantized base), on the checkpoint
    /// volume and shared by the job's attempts, so a restarted pod does not quantize the base
    /// again; absent: no cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantized_cache_dir: Option<String>,
    /// Output directory (adapter, merged weights, report).
    pub output_dir: String,
    /// File whose contents become the container's termination message (a summary < 4 KiB).
    pub termination_message_file: String,
}

impl TrainerConfig {
    /// Builds the trainer configuration of a job from its spec and the pod's paths.
    pub fn from_spec(
        job: String,
        job_uid: String,
        spec: &FineTuneJobSpec,
        paths: TrainerPaths,
        metrics_address: String,
    ) -> Self {
        TrainerConfig {
            job,
            job_uid,
            model: spec.model.clone(),
            dataset: spec.dataset.clone(),
            method: spec.method.clone(),
            hyperparameters: spec.hyperparameters.clone(),
            evaluation: spec.evaluation.clone(),
            checkpoints: spec.checkpoints.clone(),
            output: spec.output.clone(),
            precision: crate::fit::effective_precision(spec),
            gradient_checkpointing: crate::fit::effective_gradient_checkpointing(spec),
            use_gpu: crate::fit::effective_gpus(spec) > 0,
            layer_gpus: crate::fit::layer_split(spec)
                .map(|s| s.layer_gpus)
                .unwrap_or_default(),
            paths,
            metrics_address,
        }
    }

    /// A digest of what a checkpoint's weights depend on: the model, the dataset, the method,
    /// the hyperparameters and the precision. Every checkpoint records it, and a resume refuses
    /// a checkpoint whose digest differs (its weights came from another training). Evaluation,
    /// output, resources and lifecycle settings are left out: they do not change the weights.
    pub fn training_fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let basis = serde_json::json!({
            "model": self.model,
            "dataset": self.dataset,
            "method": self.method,
            "hyperparameters": self.hyperparameters,
            "precision": self.precision,
        });
        let digest = Sha256::digest(basis.to_string().as_bytes());
        digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::FineTuneJob;

    fn config(edit: impl FnOnce(&mut FineTuneJobSpec)) -> TrainerConfig {
        let sample = include_str!("../../manifests/samples/tiny-sentiment-cpu.yaml");
        let mut job: FineTuneJob = serde_yaml::from_str(sample).unwrap();
        edit(&mut job.spec);
        TrainerConfig::from_spec(
            "ml/x".into(),
            "uid-1".into(),
            &job.spec,
            TrainerPaths::default(),
            String::new(),
        )
    }

    #[test]
    fn the_fingerprint_follows_what_the_weights_depend_on() {
        let base = config(|_| {}).training_fingerprint();
        assert_eq!(base.len(), 32);
        assert_eq!(base, config(|_| {}).training_fingerprint(), "stable");
        let changed = [
            config(|s| s.hyperparameters.learning_rate *= 2.0),
            config(|s| s.dataset.seed += 1),
            config(|s| s.hyperparameters.max_steps = Some(7)),
        ];
        for c in &changed {
            assert_ne!(c.training_fingerprint(), base);
        }
        let unchanged = [
            config(|s| s.evaluation.interval_steps += 1),
            config(|s| s.suspend = true),
            config(|s| s.checkpoints.interval_steps += 1),
        ];
        for c in &unchanged {
            assert_eq!(c.training_fingerprint(), base);
        }
    }
}
