//! The fit check: the job's memory plan ([`crate::memory`]) against one GPU's memory, and the
//! settings the plan resolves from a spec (precision, checkpointing, GPUs and their memory, how
//! the model is spread over them, the trainer processes of the gang).

use crate::memory::{GIB, MemoryPlan, PlanInput, PlannedMethod, plan};
use crate::placement::{LayerSplit, split_layers};
use crate::v1alpha1::{
    BaseQuantization, FineTuneJobSpec, MethodType, Precision, Spread, TargetModule,
};

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

/// The environment variable that sets how many CPU workers the trainer splits a micro-batch
/// between (`1` turns the split off); the operator sets it to [`cpu_limit_workers`].
pub const CPU_WORKERS_ENV: &str = "FINETUNE_CPU_WORKERS";

/// CPU workers a CPU job's trainer is told to use ([`CPU_WORKERS_ENV`], set by the operator):
/// the cores its CPU limit (`resources.cpu`) allows, rounded up; `None` without a limit (the
/// trainer then uses every core of its node).
pub fn cpu_limit_workers(spec: &FineTuneJobSpec) -> Option<u64> {
    spec.resources
        .cpu
        .as_ref()
        .and_then(|q| crate::quantity::parse_quantity_bytes(&q.0))
        .map(|cores| cores.ceil().max(1.0) as u64)
}

/// CPU workers that split each micro-batch of a CPU job, each holding its part's gradients: its
/// [`cpu_limit_workers`], never more than a micro-batch has rows (the trainer gives each worker
/// at least one); without a limit the rows of a micro-batch, the most a node of any size uses.
pub fn effective_cpu_workers(spec: &FineTuneJobSpec) -> u64 {
    let rows = u64::from(spec.hyperparameters.batch_size).max(1);
    cpu_limit_workers(spec).map_or(rows, |workers| workers.min(rows))
}

/// Trainer pods of the job (`resources.nodes`, default 1).
pub fn effective_nodes(spec: &FineTuneJobSpec) -> u32 {
    spec.resources.nodes.unwrap_or(1).max(1)
}

/// How the model is spread over a pod's GPUs: the spec's `data` or `layers`, or for `auto`
/// `layers` when the pod has several GPUs and the whole model does not fit one by the memory
/// plan, else `data`.
pub fn effective_spread(spec: &FineTuneJobSpec) -> Spread {
    match spec.resources.spread {
        Spread::Auto if effective_gpus(spec) >= 2 && !plan(&PlanInput::from_spec(spec)).fits => {
            Spread::Layers
        }
        Spread::Auto => Spread::Data,
        chosen => chosen,
    }
}

/// The GPUs the decoder layers are split over: the pod's when the spread is `layers`.
fn split_gpus(spec: &FineTuneJobSpec) -> Option<u32> {
    (effective_spread(spec) == Spread::Layers).then(|| effective_gpus(spec))
}

/// The decoder layers' split over the pod's GPUs when the spread is `layers` (`None` otherwise,
/// or when the GPUs cannot each take a layer).
pub fn layer_split(spec: &FineTuneJobSpec) -> Option<LayerSplit> {
    split_layers(&PlanInput::from_spec(spec), split_gpus(spec)?)
}

/// The plan of `input`: the busiest GPU's with the layers split over `split_over` GPUs, else (or
/// when they cannot each take a layer) one device's holding the whole model.
fn plan_split_over(input: &PlanInput, split_over: Option<u32>) -> MemoryPlan {
    split_over
        .and_then(|gpus| split_layers(input, gpus))
        .and_then(|split| split.busiest())
        .unwrap_or_else(|| plan(input))
}

/// The plan the fit check applies: the busiest GPU's under a layer split, else one device's.
pub fn plan_for(spec: &FineTuneJobSpec) -> MemoryPlan {
    plan_split_over(&PlanInput::from_spec(spec), split_gpus(spec))
}

/// Trainer processes in each pod: one per GPU under data parallelism (each holds the whole
/// model), one for a layer split (it drives all the pod's GPUs), one on CPU.
pub fn processes_per_pod(spec: &FineTuneJobSpec) -> u32 {
    match effective_spread(spec) {
        Spread::Layers => 1,
        _ => effective_gpus(spec).max(1),
    }
}

/// Trainer processes of the whole job (the gang's world size).
pub fn world_size(spec: &FineTuneJobSpec) -> u32 {
    effective_nodes(spec) * processes_per_pod(spec)
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

/// Checks the job's memory plan against one GPU's memory: under data parallelism every GPU
/// holds the whole model and one micro-batch, so more GPUs do not lower it; under a layer split
/// ([`layer_split`]) the busiest GPU's share is checked.
/// Returns the plan, or a message with the estimate, the budget and what would make it fit (each
/// alternative planned too). CPU jobs (no GPUs) are not checked.
pub fn check(spec: &FineTuneJobSpec) -> Result<MemoryPlan, String> {
    let input = PlanInput::from_spec(spec);
    let gpus = effective_gpus(spec);
    let split_over = split_gpus(spec);
    let split = split_over.is_some();
    let p = plan_split_over(&input, split_over);
    if p.fits {
        return Ok(p);
    }
    let gib = |b: u64| b as f64 / GIB as f64;
    let parts: Vec<String> = p
        .components
        .iter()
        .filter(|c| c.bytes >= GIB / 10)
        .map(|c| format!("{} {:.1}", c.name, gib(c.bytes)))
        .collect();
    let mut options = Vec::new();
    let mut try_option = |what: String, changed: PlanInput| {
        let q = plan_split_over(&changed, split_over);
        options.push(format!(
            "{what} ({:.1} GiB{})",
            gib(q.per_gpu_bytes),
            if q.fits { ", fits" } else { "" }
        ));
    };
    if !input.checkpointing {
        try_option(
            "hyperparameters.gradientCheckpointing: true".into(),
            PlanInput {
                checkpointing: true,
                ..input.clone()
            },
        );
    }
    if input.batch > 1 {
        try_option(
            format!(
                "batchSize 1 with gradientAccumulationSteps × {} (the same effective batch)",
                input.batch
            ),
            PlanInput {
                batch: 1,
                loss_rows: input.sequence,
                ..input.clone()
            },
        );
    }
    if input.sequence > 256 {
        let half = input.sequence / 2;
        try_option(
            format!("maxSequenceLength {half}"),
            PlanInput {
                sequence: half,
                loss_rows: input.batch * half,
                ..input.clone()
            },
        );
    }
    if !input.checkpointing && input.batch > 1 {
        try_option(
            "both of the above".into(),
            PlanInput {
                checkpointing: true,
                batch: 1,
                loss_rows: input.sequence,
                ..input.clone()
            },
        );
    }
    if matches!(input.method, PlannedMethod::Full { .. }) {
        try_option(
            "method.type: lora".into(),
            PlanInput {
                method: PlannedMethod::Lora {
                    rank: 8,
                    targets: vec![TargetModule::QProj, TargetModule::VProj],
                    dropout: true,
                    base: BaseQuantization::None,
                },
                ..input.clone()
            },
        );
    }
    if let PlannedMethod::Lora {
        rank,
        targets,
        dropout,
        base,
    } = &input.method
    {
        for q in base.smaller() {
            try_option(
                format!("method.lora.baseQuantization: {}", q.name()),
                PlanInput {
                    method: PlannedMethod::Lora {
                        rank: *rank,
                        targets: targets.clone(),
                        dropout: *dropout,
                        base: *q,
                    },
                    ..input.clone()
                },
            );
        }
    }
    // More GPUs help only by splitting the layers: the fewest (up to 8) whose split fits.
    let splits_that_fit = (gpus.max(2)..=8).find_map(|g| {
        let q = split_layers(&input, g)?.busiest()?;
        q.fits.then_some((g, q))
    });
    if let Some((g, q)) = splits_that_fit
        && (!split || g > gpus)
    {
        let what = if g == gpus {
            "resources.spread: layers".to_string()
        } else {
            format!("resources.gpus: {g} with resources.spread: layers")
        };
        options.push(format!(
            "{what} ({:.1} GiB on the busiest GPU, fits)",
            gib(q.per_gpu_bytes)
        ));
    }
    let weights = p.component("weights");
    if weights > input.budget_bytes {
        // Only formats smaller than the base's current one (full fine-tuning keeps it dense).
        let base = match &input.method {
            PlannedMethod::Lora { base, .. } => *base,
            PlannedMethod::Full { .. } => BaseQuantization::None,
        };
        let smaller: Vec<String> = base
            .smaller()
            .iter()
            .map(|q| format!("method.lora.baseQuantization: {}", q.name()))
            .collect();
        let quantize = if smaller.is_empty() {
            String::new()
        } else {
            format!(", or LoRA over a smaller base ({})", smaller.join(" or "))
        };
        options.push(format!(
            "the base weights alone are {:.1} GiB: a GPU with more memory (gpuMemoryGiB), the \
             layers split over more GPUs{quantize}",
            gib(weights)
        ));
    }
    let (place, why) = if split {
        let busiest = p
            .devices
            .iter()
            .max_by_key(|d| d.bytes)
            .map(|d| {
                format!(
                    "GPU {}, layers {}-{}",
                    d.gpu,
                    d.first_layer,
                    d.end_layer.saturating_sub(1)
                )
            })
            .unwrap_or_default();
        (
            format!(
                "on the busiest of the pod's {gpus} GPUs the layers are split over ({busiest}: {})",
                parts.join(", ")
            ),
            String::new(),
        )
    } else {
        (
            format!("on each GPU ({})", parts.join(", ")),
            " Every GPU holds the whole model (data parallel), so more GPUs alone do not lower \
             it."
            .to_string(),
        )
    };
    Err(format!(
        "{} {} fine-tuning in {:?} with batch {} × {} tokens needs an estimated {:.1} GiB {place} \
         but a GPU has {} GiB: short by {:.1} GiB.{why} To fit: {}.",
        spec.model.preset,
        match spec.method.method_type {
            MethodType::Lora => "LoRA",
            MethodType::Full => "full",
        },
        effective_precision(spec),
        input.batch,
        input.sequence,
        gib(p.per_gpu_bytes),
        effective_gpu_memory_gib(spec),
        gib(p.per_gpu_bytes) - gib(input.budget_bytes),
        options.join("; ")
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::presets::ModelPreset;
    use crate::v1alpha1::{Hyperparameters, MethodSpec, TrainableLayers};

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

    fn gib(spec: &FineTuneJobSpec) -> f64 {
        plan(&PlanInput::from_spec(spec)).per_gpu_bytes as f64 / GIB as f64
    }

    #[test]
    fn a_cpu_jobs_workers_are_its_cpu_limit_rounded_up_and_hold_their_gradients() {
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let mut s = spec(ModelPreset::Stories15m, MethodType::Full, 0);
        s.hyperparameters.batch_size = 6;
        assert_eq!(cpu_limit_workers(&s), None);
        assert_eq!(
            effective_cpu_workers(&s),
            6,
            "no limit: a worker per row at most"
        );
        let gradients = |s: &FineTuneJobSpec| {
            let p = plan(&PlanInput::from_spec(s));
            p.components
                .iter()
                .find(|c| c.name == "gradients")
                .map(|c| c.bytes)
        };
        s.resources.cpu = Some(Quantity("500m".into()));
        let one = gradients(&s).unwrap_or(0);
        assert!(one > 0);
        for (cpu, told, workers) in [("4", 4, 4), ("1500m", 2, 2), ("500m", 1, 1), ("16", 16, 6)] {
            s.resources.cpu = Some(Quantity(cpu.into()));
            assert_eq!(cpu_limit_workers(&s), Some(told), "{cpu}");
            assert_eq!(effective_cpu_workers(&s), workers, "{cpu}");
            assert_eq!(gradients(&s), Some(one * workers), "{cpu}");
        }
        // On a GPU there is one worker whatever the CPU limit.
        s.resources.gpus = Some(1);
        assert_eq!(PlanInput::from_spec(&s).cpu_workers, 1);
    }

    #[test]
    fn seven_b_lora_fits_one_gpu_and_full_fine_tuning_does_not() {
        let lora = spec(ModelPreset::Llama2_7b, MethodType::Lora, 1);
        let p = check(&lora).unwrap();
        // Default LoRA (rank 8 on q,v) trains about 4 M parameters on 7B.
        assert!(
            (3_000_000..6_000_000).contains(&p.trainable_parameters),
            "{p:?}"
        );
        assert!(
            (14.0..40.0).contains(&gib(&lora)),
            "7B LoRA: {}",
            gib(&lora)
        );
        let full = spec(ModelPreset::Llama2_7b, MethodType::Full, 1);
        // bf16 weights, f32 gradients (two copies) and moments: 2 + 8 + 8 bytes a parameter.
        assert!(gib(&full) > 18.0 * 6.7 / 1.074, "7B full: {}", gib(&full));
        let msg = check(&full).unwrap_err();
        assert!(
            msg.contains("short by") && msg.contains("method.type: lora"),
            "{msg}"
        );
    }

    #[test]
    fn seventy_b_on_one_gpu_is_refused_naming_the_split_that_fits_and_four_gpus_split_it() {
        let msg = check(&spec(ModelPreset::Llama2_70b, MethodType::Lora, 1)).unwrap_err();
        assert!(msg.contains("more GPUs alone do not lower it"), "{msg}");
        assert!(msg.contains("with resources.spread: layers"), "{msg}");
        assert!(msg.contains("the base weights alone are"), "{msg}");
        let four = spec(ModelPreset::Llama2_70b, MethodType::Lora, 4);
        assert_eq!(effective_spread(&four), Spread::Layers);
        assert_eq!((processes_per_pod(&four), world_size(&four)), (1, 1));
        let p = check(&four).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.devices.len(), 4);
        assert_eq!(layer_split(&four).map(|s| s.layer_gpus.len()), Some(80));
        // Asked to keep the whole model on every GPU, the refusal offers the split.
        let mut data = four.clone();
        data.resources.spread = Spread::Data;
        let msg = check(&data).unwrap_err();
        assert!(msg.contains("resources.spread: layers ("), "{msg}");
        assert!(layer_split(&data).is_none());
    }

    #[test]
    fn a_split_that_does_not_fit_names_its_busiest_gpu() {
        let mut two = spec(ModelPreset::Llama2_70b, MethodType::Lora, 2);
        two.resources.spread = Spread::Layers;
        two.resources.gpu_memory_gib = Some(72);
        let msg = check(&two).unwrap_err();
        assert!(msg.contains("the busiest of the pod's 2 GPUs"), "{msg}");
        assert!(
            msg.contains("resources.gpus: 3 with resources.spread: layers")
                || msg.contains("resources.gpus: 4 with resources.spread: layers"),
            "{msg}"
        );
    }

    fn quantized(mut s: FineTuneJobSpec, q: BaseQuantization, gpu_gib: u32) -> FineTuneJobSpec {
        s.method.lora = Some(crate::v1alpha1::LoraSpec {
            base_quantization: q,
            ..Default::default()
        });
        s.resources.gpu_memory_gib = Some(gpu_gib);
        s
    }

    #[test]
    fn a_four_bit_base_fits_70b_on_one_large_gpu_and_7b_on_a_24_gb_gpu() {
        let seventy = spec(ModelPreset::Llama2_70b, MethodType::Lora, 1);
        let seventy = quantized(seventy, BaseQuantization::Int4, 141);
        let p = check(&seventy).unwrap_or_else(|e| panic!("{e}"));
        // 68.5 G projection weights at 18 bytes per 32, the rest in bf16: about 37 GiB.
        let weights = p.component("weights") as f64 / GIB as f64;
        assert!(
            (34.0..40.0).contains(&weights),
            "70B int4 weights: {weights}"
        );
        assert!(p.component("dequantized") > 0);
        let seven = spec(ModelPreset::Llama2_7b, MethodType::Lora, 1);
        let mut seven = quantized(seven, BaseQuantization::Int4, 24);
        seven.hyperparameters.batch_size = 1;
        assert!(check(&seven).is_ok(), "{:?}", check(&seven));
        // The same 7B job over a bf16 base does not fit 24 GB: the refusal offers the formats.
        let mut bf16 = seven.clone();
        bf16.hyperparameters.batch_size = 16;
        if let Some(l) = bf16.method.lora.as_mut() {
            l.base_quantization = BaseQuantization::None;
        }
        let msg = check(&bf16).unwrap_err();
        assert!(
            msg.contains("method.lora.baseQuantization: int8")
                && msg.contains("method.lora.baseQuantization: int4"),
            "{msg}"
        );
        // 8 bits sit between: more than 4 bits, less than bf16.
        let int8 = quantized(
            spec(ModelPreset::Llama2_13b, MethodType::Lora, 1),
            BaseQuantization::Int8,
            80,
        );
        let int4 = quantized(int8.clone(), BaseQuantization::Int4, 80);
        let dense = quantized(int8.clone(), BaseQuantization::None, 80);
        assert!(gib(&int4) < gib(&int8) && gib(&int8) < gib(&dense));
    }

    #[test]
    fn a_refusal_offers_only_base_formats_smaller_than_the_current_one() {
        // 70B: its weights alone exceed a 24 GB GPU in every format.
        let offered = |q: BaseQuantization| {
            let s = quantized(spec(ModelPreset::Llama2_70b, MethodType::Lora, 1), q, 24);
            let msg = check(&s).unwrap_err();
            assert!(msg.contains("the base weights alone are"), "{msg}");
            ["int8", "int4"]
                .into_iter()
                .filter(|f| msg.contains(&format!("method.lora.baseQuantization: {f}")))
                .collect::<Vec<_>>()
        };
        assert_eq!(offered(BaseQuantization::None), ["int8", "int4"]);
        assert_eq!(offered(BaseQuantization::Int8), ["int4"]);
        assert!(offered(BaseQuantization::Int4).is_empty());
        // Full fine-tuning is offered LoRA over a smaller base.
        let full = check(&spec(ModelPreset::Llama2_70b, MethodType::Full, 1)).unwrap_err();
        assert!(full.contains("baseQuantization: int4"), "{full}");
        assert_eq!(
            BaseQuantization::None.smaller(),
            [BaseQuantization::Int8, BaseQuantization::Int4]
        );
    }

    #[test]
    fn four_gpus_of_a_pod_are_four_data_parallel_ranks_each_planned_as_one_gpu() {
        let one = spec(ModelPreset::Llama2_7b, MethodType::Lora, 1);
        let mut four = one.clone();
        four.resources.gpus = Some(4);
        assert_eq!(
            effective_spread(&four),
            Spread::Data,
            "auto: the model fits one GPU"
        );
        assert_eq!((processes_per_pod(&four), world_size(&four)), (4, 4));
        assert_eq!(gib(&four), gib(&one), "each GPU holds the whole model");
        assert!(check(&four).is_ok());
        let cpu = spec(ModelPreset::Tiny, MethodType::Lora, 0);
        assert_eq!((processes_per_pod(&cpu), world_size(&cpu)), (1, 1));
    }

    #[test]
    fn a_refusal_names_the_changes_that_fit_and_plans_them() {
        let mut s = spec(ModelPreset::Llama2_7b, MethodType::Lora, 1);
        s.hyperparameters.batch_size = 16;
        s.hyperparameters.max_sequence_length = 1024;
        s.hyperparameters.gradient_checkpointing = Some(false);
        let msg = check(&s).unwrap_err();
        assert!(
            msg.contains("hyperparameters.gradientCheckpointing: true")
                && msg.contains("batchSize 1 with gradientAccumulationSteps × 16")
                && msg.contains("maxSequenceLength 512"),
            "{msg}"
        );
        assert!(
            msg.contains(", fits"),
            "at least one alternative fits: {msg}"
        );
        s.hyperparameters.gradient_checkpointing = None;
        assert!(gib(&s) < 80.0 || check(&s).is_err());
    }

    #[test]
    fn checkpointing_defaults_on_with_gpus_and_lowers_the_plan() {
        let mut s = spec(ModelPreset::Llama2_13b, MethodType::Lora, 1);
        assert!(effective_gradient_checkpointing(&s));
        let on = gib(&s);
        s.hyperparameters.gradient_checkpointing = Some(false);
        assert!(gib(&s) > on + 5.0, "off {} vs on {on}", gib(&s));
        s.resources.gpus = Some(0);
        s.hyperparameters.gradient_checkpointing = None;
        assert!(!effective_gradient_checkpointing(&s));
    }

    #[test]
    fn fewer_trainable_layers_need_less_memory() {
        let all = spec(ModelPreset::Llama2_13b, MethodType::Full, 2);
        let mut last4 = all.clone();
        last4.method.trainable_layers = Some(TrainableLayers {
            last: Some(4),
            indices: None,
        });
        assert!(gib(&last4) < gib(&all) / 2.0);
    }
}
