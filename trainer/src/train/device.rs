//! Which device a job trains on.

use candle_core::Device;

use crate::model::LayerDevices;
use crate::{Result, TrainerError};

/// The device to use: the CPU, or GPU `ordinal` of those the process sees (`CUDA_VISIBLE_DEVICES`,
/// which the device plugin sets to the GPUs granted by `resources.gpus`, decides which they are;
/// a data-parallel rank takes its `LOCAL_RANK`). A GPU job never falls back to the CPU: a binary
/// built without CUDA, or a node whose GPU cannot be opened, is an error that says so.
pub fn select_device(use_gpu: bool, ordinal: usize) -> Result<Device> {
    if !use_gpu {
        return Ok(Device::Cpu);
    }
    if !candle_core::utils::cuda_is_available() {
        return Err(TrainerError::Config(
            "useGpu is set (the job asks for GPUs) but this finetune-trainer was built without \
             CUDA: use the -cuda trainer image (make cuda-build), or set resources.gpus: 0 to \
             train on the CPU"
                .into(),
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into());
        TrainerError::Config(format!(
            "cannot open GPU {ordinal} (CUDA_VISIBLE_DEVICES={visible}): {e}"
        ))
    })
}

/// The device of every decoder layer: all of them on [`select_device`]`(use_gpu, ordinal)`,
/// or with `layer_gpus` (one entry per layer) layer `i` on GPU `layer_gpus[i]`. A CPU run with
/// `layer_gpus` puts every part on the CPU: the same split code path, as a stand-in for tests.
pub fn layer_devices(
    use_gpu: bool,
    ordinal: usize,
    layer_gpus: &[usize],
    layers: usize,
) -> Result<LayerDevices> {
    if layer_gpus.is_empty() {
        return Ok(LayerDevices::single(
            &select_device(use_gpu, ordinal)?,
            layers,
        ));
    }
    if layer_gpus.len() != layers {
        return Err(TrainerError::Config(format!(
            "layerGpus names a GPU for {} layers; the model has {layers}",
            layer_gpus.len()
        )));
    }
    let used = layer_gpus.iter().max().map_or(1, |g| g + 1);
    let devices = (0..used)
        .map(|g| select_device(use_gpu, g))
        .collect::<Result<Vec<_>>>()?;
    LayerDevices::new(devices, layer_gpus.to_vec())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_split_names_one_gpu_per_layer_and_runs_on_the_cpu_as_a_stand_in() {
        let p = layer_devices(false, 0, &[0, 0, 1, 1], 4).unwrap();
        assert!(p.is_split() && p.devices().iter().all(Device::is_cpu));
        let err = layer_devices(false, 0, &[0, 1], 4).unwrap_err().to_string();
        assert!(
            err.contains("layerGpus") && err.contains("2 layers"),
            "{err}"
        );
        assert!(!layer_devices(false, 0, &[], 4).unwrap().is_split());
    }

    #[test]
    fn a_cpu_job_gets_the_cpu() {
        assert!(matches!(select_device(false, 0).unwrap(), Device::Cpu));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_job_on_a_binary_without_cuda_fails_instead_of_training_on_the_cpu() {
        let err = select_device(true, 0).unwrap_err().to_string();
        assert!(err.contains("built without CUDA"), "{err}");
        assert!(err.contains("resources.gpus: 0"), "{err}");
    }
}
