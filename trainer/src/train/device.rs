//! Which device a job trains on.

use candle_core::Device;

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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

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
