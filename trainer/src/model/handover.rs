//! A value computed outside the autograd graph, handed to the custom op that records it.
//!
//! Several ops compute their product with candle's own tensor ops on detached inputs (any device,
//! any dtype) and then record one graph node whose backward is written by hand: the node's
//! forward only hands the precomputed value over. This keeps the graph to one node and one edge
//! per input where the primitive ops would record one per intermediate (each edge costs the
//! backward a zero-filled buffer and an addition).

use std::sync::{Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, Shape, Storage, Tensor};

/// The value, handed over once by the recording op's forward.
pub(crate) struct Handover(Mutex<Option<Tensor>>);

impl Handover {
    /// Holds `value`, a fresh op output that owns its storage (a storage is cloned whole), made
    /// contiguous from offset 0 where it is not.
    pub(crate) fn new(value: Tensor) -> candle_core::Result<Self> {
        let value = value.contiguous()?;
        let value = if value.layout().start_offset() == 0 {
            value
        } else {
            value.copy()?
        };
        Ok(Self(Mutex::new(Some(value))))
    }

    /// The value, once; `op` names the recording op in the error.
    fn take(&self, op: &str) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: forward run twice")))
    }

    /// The value's CPU storage and shape, for a `cpu_fwd`.
    pub(crate) fn cpu(&self, op: &str) -> candle_core::Result<(CpuStorage, Shape)> {
        let value = self.take(op)?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{op}: the value is not on the CPU"),
        }
    }

    /// The value's CUDA storage and shape, for a `cuda_fwd`.
    pub(crate) fn cuda(&self, op: &str) -> candle_core::Result<(CudaStorage, Shape)> {
        let value = self.take(op)?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{op}: the value is not on the GPU"),
        }
    }
}
