//! The GPU backend of [`Collective`]: an NCCL communicator (through cudarc, candle's CUDA
//! layer) over every rank of the gang, one GPU each.
//!
//! The ranks meet first through the CPU backend ([`crate::distributed::tcp`]), which checks the
//! gang's name (the job's UID and attempt, so a restarted gang never meets a stale rank) and the
//! world; rank 0 then draws the NCCL unique id and broadcasts it over that connection, and every
//! rank joins the communicator with it. Each collective copies the host values to this rank's
//! GPU, reduces there and copies the result back; a collective (or the communicator's
//! initialisation) that does not finish within the collective timeout makes the process exit
//! with [`crate::distributed::COLLECTIVE_EXIT_CODE`] ([`super::watchdog`]). NCCL adds in its own
//! order (rings and trees), so unlike the CPU backend the sums equal rank order's only up to
//! rounding.

use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};

use super::Collective;
use super::unique_id::{decode, encode};
use super::watchdog::{exit_gang, within};
use crate::{Result, TrainerError};

/// An NCCL communicator over the gang's ranks.
pub struct NcclCollective {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
    timeout: Duration,
}

impl NcclCollective {
    /// Joins the NCCL communicator of the ranks `bootstrap` connects (the CPU backend, or
    /// [`super::SingleProcess`] for one rank), on GPU `ordinal`. Initialisation and every
    /// collective must finish within `timeout`.
    pub fn over(bootstrap: &mut dyn Collective, ordinal: usize, timeout: Duration) -> Result<Self> {
        let (rank, world_size) = (bootstrap.rank(), bootstrap.world_size());
        let fail = |reason: String| TrainerError::Collective { rank, reason };
        let stream = match Device::new_cuda(ordinal)? {
            Device::Cuda(gpu) => gpu.cuda_stream(),
            _ => return Err(fail(format!("GPU {ordinal} is not a CUDA device"))),
        };
        let mut values = vec![0f32; super::unique_id::UNIQUE_ID_BYTES];
        let drawn = if rank == 0 {
            let id = Id::new().map_err(|e| fail(format!("ncclGetUniqueId: {e:?}")))?;
            values = encode(id.internal());
            Some(id)
        } else {
            None
        };
        bootstrap.broadcast(&mut values)?;
        let id = match drawn {
            Some(id) => id,
            None => Id::uninit(decode(&values)?),
        };
        let comm = within(timeout, "NCCL initialisation", exit_gang, || {
            Comm::from_rank(stream.clone(), rank, world_size, id)
        })
        .map_err(|e| fail(format!("ncclCommInitRank (world {world_size}): {e:?}")))?;
        tracing::info!(
            rank,
            world_size,
            gpu = ordinal,
            "joined the NCCL communicator"
        );
        Ok(Self {
            comm,
            stream,
            rank,
            world_size,
            timeout,
        })
    }

    fn fail(&self, what: &str, e: impl std::fmt::Debug) -> TrainerError {
        TrainerError::Collective {
            rank: self.rank,
            reason: format!("{what}: {e:?}"),
        }
    }

    /// Copies `values` to the GPU, runs `op` on them there, and copies them back.
    fn on_gpu(
        &mut self,
        what: &str,
        values: &mut [f32],
        op: impl FnOnce(
            &Comm,
            &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
        ) -> std::result::Result<(), String>,
    ) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let (stream, comm) = (self.stream.clone(), &self.comm);
        let outcome = within(self.timeout, what, exit_gang, || {
            let mut buffer = stream
                .clone_htod(&*values)
                .map_err(|e| format!("copy to the GPU: {e:?}"))?;
            op(comm, &mut buffer)?;
            stream
                .memcpy_dtoh(&buffer, &mut *values)
                .map_err(|e| format!("copy from the GPU: {e:?}"))?;
            stream
                .synchronize()
                .map_err(|e| format!("stream synchronisation: {e:?}"))
        });
        outcome.map_err(|e| self.fail(what, e))
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, values: &mut [f32]) -> Result<()> {
        self.on_gpu("NCCL all-reduce", values, |comm, buffer| {
            comm.all_reduce_in_place(buffer, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| format!("ncclAllReduce: {e:?}"))
        })
    }

    fn broadcast(&mut self, values: &mut [f32]) -> Result<()> {
        self.on_gpu("NCCL broadcast", values, |comm, buffer| {
            comm.broadcast_in_place(buffer, 0)
                .map(|_| ())
                .map_err(|e| format!("ncclBroadcast: {e:?}"))
        })
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }
}

/// `nccl-check`: a communicator of world size 1 on GPU 0 and an all-reduce of known values,
/// which must come back unchanged (the sum over one rank): what `scripts/gpu-check.sh` runs.
pub fn self_check(timeout: Duration) -> Result<serde_json::Value> {
    let mut one = super::SingleProcess;
    let mut nccl = NcclCollective::over(&mut one, 0, timeout)?;
    let sent: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
    let mut values = sent.clone();
    nccl.all_reduce_sum(&mut values)?;
    let mut root = vec![3.0f32; 16];
    nccl.broadcast(&mut root)?;
    let ok = values == sent && root.iter().all(|v| *v == 3.0);
    Ok(serde_json::json!({
        "check": "nccl",
        "world_size": nccl.world_size(),
        "values": sent.len(),
        "all_reduce_exact": values == sent,
        "ok": ok,
    }))
}
