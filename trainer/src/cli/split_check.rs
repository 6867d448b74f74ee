//! `split-check`: one LoRA batch's loss and gradients with the decoder layers split over two
//! devices against the same model on one device, the cross-device check of
//! `scripts/gpu-check.sh`. With `--gpu` the first half of the layers (and the embeddings) are on
//! `cuda:0` and the rest (with the LM head) on the CPU, so one GPU exercises the hidden state's
//! transfer and its gradient's way back; without it both halves are on the CPU.

use std::path::Path;
use std::process::ExitCode;

use candle_core::{DType, Device, Tensor};

use crate::model::linear::FwdCtx;
use crate::model::weights::Weights;
use crate::model::{LayerDevices, Llama, LlamaConfig, LoraSettings, LossAndGrads, TrainableSpec};
use crate::rng::Rng;
use crate::train::device::select_device;
use crate::{Result, TrainerError};

/// The largest gradient difference, relative to the gradient's largest element, that passes.
const TOLERANCE: f32 = 1e-4;

/// Runs the check on the model in `model_dir` with the sequence `ids`; prints one JSON line and
/// exits 1 when a gradient or the loss differs by more than [`TOLERANCE`].
pub fn split_check(model_dir: &Path, ids: Vec<u32>, gpu: bool) -> Result<ExitCode> {
    if ids.len() < 2 {
        return Err(TrainerError::Config(
            "--ids: give at least two token ids (the loss predicts each next one)".into(),
        ));
    }
    let cfg = LlamaConfig::from_file(&model_dir.join("config.json"))?;
    let layers = cfg.num_hidden_layers;
    if layers < 2 {
        return Err(TrainerError::Config(format!(
            "{}: a split needs at least 2 decoder layers, the model has {layers}",
            model_dir.display()
        )));
    }
    let first = select_device(gpu, 0)?;
    let placement = LayerDevices::new(
        vec![first.clone(), Device::Cpu],
        (0..layers).map(|i| usize::from(i >= layers / 2)).collect(),
    )?;
    let lora = finetune_api::LoraSpec {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: finetune_api::TargetModule::ALL.to_vec(),
        ..Default::default()
    };
    let spec = TrainableSpec::Lora(LoraSettings::from_spec(&lora, None));
    let single = Llama::from_weights(
        &cfg,
        Weights::from_dir(model_dir, DType::F32, &first)?,
        &spec,
        1,
        &first,
    )?;
    let split = Llama::from_weights_placed(
        &cfg,
        Weights::from_dir(model_dir, DType::F32, &Device::Cpu)?,
        &spec,
        1,
        &placement,
    )?;
    // LoRA B starts at zero (A would get no gradient): the same small values in both models.
    let mut rng = Rng::derive(11, 0x5B17);
    for ((name, a), (_, b)) in single.trainable().iter().zip(split.trainable()) {
        if name.contains("lora_B") {
            let values: Vec<f32> = (0..a.elem_count())
                .map(|_| (rng.next_f32() - 0.5) * 0.2)
                .collect();
            a.set(&Tensor::from_vec(values.clone(), a.shape(), a.device())?)?;
            b.set(&Tensor::from_vec(values, b.shape(), b.device())?)?;
        }
    }
    let mut worst = 0f32;
    let mut loss_gap = 0f32;
    let mut tensors = 0;
    for recompute in [false, true] {
        let reference = loss_and_grads(&single, &ids, recompute)?;
        let got = loss_and_grads(&split, &ids, recompute)?;
        loss_gap = loss_gap.max((reference.loss - got.loss).abs() / reference.loss.abs().max(1.0));
        for (name, _) in single.trainable() {
            let (Some(r), Some(g)) = (reference.grads.get(name), got.grads.get(name)) else {
                return Err(TrainerError::Config(format!("{name}: no gradient")));
            };
            let scale = r.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-12);
            let diff = (r - g.to_device(r.device())?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            worst = worst.max(diff / scale);
            tensors += 1;
        }
    }
    let ok = worst <= TOLERANCE && loss_gap <= TOLERANCE;
    let devices = if first.is_cuda() {
        "cuda:0+cpu"
    } else {
        "cpu+cpu"
    };
    println!(
        "{}",
        serde_json::json!({
            "check": "layer-split",
            "devices": devices,
            "layers": layers,
            "gradients_compared": tensors,
            "max_relative_gradient_difference": worst,
            "relative_loss_difference": loss_gap,
            "ok": ok,
        })
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The loss of predicting each next token of `ids` and its gradients.
fn loss_and_grads(model: &Llama, ids: &[u32], recompute: bool) -> Result<LossAndGrads> {
    let n = ids.len();
    let device = model.device();
    let input = Tensor::from_vec(ids.to_vec(), (1, n), device)?;
    let rows = Tensor::from_vec((0..n as u32 - 1).collect::<Vec<_>>(), n - 1, device)?;
    let targets = Tensor::from_vec(ids[1..].to_vec(), n - 1, device)?;
    let mut ctx = FwdCtx::train(None);
    model.loss_and_grads(&input, None, &rows, &mut ctx, recompute, |h| {
        h.cross_entropy(&targets)
    })
}
