//! The fit check: an estimate of the GPU memory a job needs, compared with what it asks for.
//!
//! The estimate follows the usual accounting for mixed-precision AdamW training:
//! - frozen weights: parameters × bytes of the precision;
//! - trainable parameters: an f32 master copy, an f32 gradient and two f32 AdamW moments
//!   (16 bytes each); for LoRA they are the adapters, for full fine-tuning the selected layers;
//! - activations kept for backward: per layer `seq × batch × hidden × 34 + 5 × heads × seq² ×
//!   batch` elements (Korthikanti et al., "Reducing Activation Recomputation"), scaled by the
//!   precision; with LoRA only the trained layers and those above them keep activations;
//! - logits: `batch × seq × vocab` in f32, twice (values and gradient);
//! - 10 % fragmentation overhead and 1.5 GiB of CUDA context per GPU.
//!
//! Parameters are assumed to be sharded evenly over the pod's GPUs. For a 7B model this gives
//! about 125 GB for full fine-tuning and 20-30 GB for LoRA at the defaults, in line with
//! published figures (LLaMA-Factory: 120 GB and 16 GB).

use crate::presets::ModelArchitecture;
use crate::v1alpha1::{FineTuneJobSpec, MethodType, Precision, TargetModule, TrainableLayers};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
const CUDA_CONTEXT_GIB: f64 = 1.5;
const FRAGMENTATION: f64 = 1.10;

/// An estimate of the memory a job needs, in GiB.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryEstimate {
    /// Frozen and trainable weights.
    pub weights_gib: f64,
    /// Gradients, master weights and optimizer moments of the trainable parameters.
    pub optimizer_gib: f64,
    /// Activations and logits kept for backward.
    pub activations_gib: f64,
    /// Everything, with overheads.
    pub total_gib: f64,
    /// Trainable parameter count.
    pub trainable_parameters: u64,
}

/// Precision the job trains in: the spec's, or bf16 with GPUs and f32 without.
pub fn effective_precision(spec: &FineTuneJobSpec) -> Precision {
    spec.hyperparameters
        .precision
        .unwrap_or(if effective_gpus(spec) > 0 {
            Precision::Bf16
        } else {
            Precision::F32
        })
}

/// Whether the trainer recomputes decoder layers in the backward: the spec's choice, or on
/// with GPUs and off without.
pub fn effective_gradient_checkpointing(spec: &FineTuneJobSpec) -> bool {
    spec.hyperparameters
        .gradient_checkpointing
        .unwrap_or(effective_gpus(spec) > 0)
}

/// GPUs the trainer pod gets: the spec's, or the preset's default.
pub fn effective_gpus(spec: &FineTuneJobSpec) -> u32 {
    spec.resources
        .gpus
        .unwrap_or(spec.model.preset.defaults().gpus)
}

/// Memory per GPU in GiB: the spec's, or the preset's default (80 when the preset has none).
pub fn effective_gpu_memory_gib(spec: &FineTuneJobSpec) -> u32 {
    spec.resources
        .gpu_memory_gib
        .unwrap_or(match spec.model.preset.defaults().gpu_memory_gib {
            0 => 80,
            m => m,
        })
}

/// Parameters of one transformer layer.
fn layer_parameters(a: &ModelArchitecture) -> u64 {
    let h = u64::from(a.hidden_size);
    let kv = h * u64::from(a.num_kv_heads) / u64::from(a.num_heads);
    let attn = h * h * 2 + h * kv * 2;
    let mlp = 3 * h * u64::from(a.intermediate_size);
    attn + mlp + 2 * h
}

/// Input and output sizes of a projection.
fn projection_shape(a: &ModelArchitecture, m: TargetModule) -> (u64, u64) {
    let h = u64::from(a.hidden_size);
    let kv = h * u64::from(a.num_kv_heads) / u64::from(a.num_heads);
    let f = u64::from(a.intermediate_size);
    match m {
        TargetModule::QProj | TargetModule::OProj => (h, h),
        TargetModule::KProj | TargetModule::VProj => (h, kv),
        TargetModule::GateProj | TargetModule::UpProj => (h, f),
        TargetModule::DownProj => (f, h),
    }
}

/// Estimates the memory the job needs in total (over all its GPUs).
pub fn estimate(spec: &FineTuneJobSpec) -> MemoryEstimate {
    let a = spec.model.preset.architecture();
    let precision = effective_precision(spec);
    let bytes = precision.bytes() as f64;
    let layers = TrainableLayers::resolve(spec.method.trainable_layers.as_ref(), a.num_layers);
    let trained_layers = layers.len() as u64;
    let lowest_trained = layers.first().copied().unwrap_or(a.num_layers);

    let trainable_parameters = match spec.method.lora_or_default() {
        Some(lora) => {
            let mut modules = lora.target_modules.clone();
            modules.sort_unstable();
            modules.dedup();
            let per_layer: u64 = modules
                .iter()
                .map(|m| {
                    let (i, o) = projection_shape(&a, *m);
                    u64::from(lora.rank) * (i + o)
                })
                .sum();
            per_layer * trained_layers
        }
        None => layer_parameters(&a) * trained_layers,
    };
    let weights = a.parameters as f64 * bytes
        + if spec.method.method_type == MethodType::Lora {
            trainable_parameters as f64 * 4.0
        } else {
            0.0
        };
    // f32 gradient + two f32 moments, plus an f32 master copy when weights are bf16 (full).
    let master = match (spec.method.method_type, precision) {
        (MethodType::Full, Precision::Bf16) => 4.0,
        _ => 0.0,
    };
    let optimizer = trainable_parameters as f64 * (12.0 + master);

    let h = f64::from(a.hidden_size);
    let s = f64::from(spec.hyperparameters.max_sequence_length);
    let b = f64::from(spec.hyperparameters.batch_size);
    let heads = f64::from(a.num_heads);
    let per_layer_elements = s * b * h * 34.0 + 5.0 * heads * s * s * b;
    // Backward needs activations from the lowest trained layer upwards.
    let layers_with_activations = f64::from(a.num_layers - lowest_trained.min(a.num_layers));
    let activations = per_layer_elements * layers_with_activations * bytes / 2.0
        + 2.0 * b * s * f64::from(a.vocab_size) * 4.0;

    let gpus = f64::from(effective_gpus(spec).max(1));
    let total = (weights + optimizer + activations) / GIB * FRAGMENTATION
        + if effective_gpus(spec) > 0 {
            CUDA_CONTEXT_GIB * gpus
        } else {
            0.0
        };
    MemoryEstimate {
        weights_gib: weights / GIB,
        optimizer_gib: optimizer / GIB,
        activations_gib: activations / GIB,
        total_gib: total,
        trainable_parameters,
    }
}

/// Checks the estimate against the GPUs the job asks for. Returns the error message (estimate,
/// available memory and shortfall) when it does not fit. CPU jobs (no GPUs) are not checked.
pub fn check(spec: &FineTuneJobSpec) -> Result<MemoryEstimate, String> {
    let est = estimate(spec);
    let gpus = effective_gpus(spec);
    if gpus == 0 {
        return Ok(est);
    }
    let available = f64::from(gpus) * f64::from(effective_gpu_memory_gib(spec));
    if est.total_gib > available {
        return Err(format!(
            "{} {} fine-tuning in {:?} with batch {} × {} tokens needs an estimated {:.0} GiB \
             (weights {:.0}, optimizer {:.0}, activations {:.0}) but {} GPU(s) × {} GiB = {:.0} GiB \
             are requested: short by {:.0} GiB. Use LoRA, fewer trainable layers, a smaller batch \
             or sequence length, or more GPUs.",
            spec.model.preset,
            match spec.method.method_type {
                MethodType::Lora => "LoRA",
                MethodType::Full => "full",
            },
            effective_precision(spec),
            spec.hyperparameters.batch_size,
            spec.hyperparameters.max_sequence_length,
            est.total_gib,
            est.weights_gib,
            est.optimizer_gib,
            est.activations_gib,
            gpus,
            effective_gpu_memory_gib(spec),
            available,
            est.total_gib - available,
        ));
    }
    Ok(est)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::ModelPreset;
    use crate::v1alpha1::{Hyperparameters, MethodSpec};

    fn spec(preset: ModelPreset, method: MethodType, gpus: u32) -> FineTuneJobSpec {
        let mut s = FineTuneJobSpec::default();
        s.model.preset = preset;
        s.method = MethodSpec {
            method_type: method,
            ..MethodSpec::default()
        };
        s.hyperparameters = Hyperparameters {
            batch_size: 4,
            ..Hyperparameters::default()
        };
        s.resources.gpus = Some(gpus);
        s
    }

    #[test]
    fn seven_b_estimates_agree_with_published_figures() {
        let full = estimate(&spec(ModelPreset::Llama2_7b, MethodType::Full, 1));
        assert!(
            (100.0..160.0).contains(&full.total_gib),
            "7B full: {full:?}"
        );
        let lora = estimate(&spec(ModelPreset::Llama2_7b, MethodType::Lora, 1));
        assert!((14.0..40.0).contains(&lora.total_gib), "7B LoRA: {lora:?}");
        // Default LoRA (rank 8 on q,v) trains about 4 M parameters on 7B.
        assert!(
            (3_000_000..6_000_000).contains(&lora.trainable_parameters),
            "{lora:?}"
        );
    }

    #[test]
    fn seventy_b_full_on_one_gpu_is_refused_and_seven_b_lora_fits() {
        let err = check(&spec(ModelPreset::Llama2_70b, MethodType::Full, 1));
        let msg = err.err().unwrap_or_default();
        assert!(msg.contains("short by"), "{msg}");
        assert!(check(&spec(ModelPreset::Llama2_7b, MethodType::Lora, 1)).is_ok());
        assert!(check(&spec(ModelPreset::Llama2_70b, MethodType::Lora, 4)).is_ok());
        assert!(check(&spec(ModelPreset::Llama2_70b, MethodType::Lora, 1)).is_err());
    }

    #[test]
    fn fewer_trainable_layers_need_less_memory() {
        let all = spec(ModelPreset::Llama2_13b, MethodType::Full, 2);
        let mut last4 = all.clone();
        last4.method.trainable_layers = Some(TrainableLayers {
            last: Some(4),
            indices: None,
        });
        assert!(estimate(&last4).total_gib < estimate(&all).total_gib / 2.0);
    }
}
