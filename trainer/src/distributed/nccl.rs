//! The GPU backend of [`Collective`]: an NCCL communicator (through cudarc, candle's CUDA
//! layer) over every rank of the gang, one GPU each.
//!
//! The ranks meet first through the CPU backend ([`crate::distributed::tcp`]), which checks the
//! gang's name (the job's UID and attempt, so a restarted gang never meets a stale rank) and the
//! world; rank 0 then draws the NCCL unique id and broadcasts it over that connection, and every
//! rank joins the communicator with it. The communicator lives on a thread of its own (cudarc's
//! `Comm` may not move between threads); each collective sends it the host values, which it
//! copies to this rank's GPU, reduces there and sends back ([`super::worker::Worker`]). When
//! joining or a collective does not answer within the collective timeout, the process exits with
//! [`crate::distributed::COLLECTIVE_EXIT_CODE`] ([`super::worker::exit_gang`]): safe code cannot
//! cancel a collective that waits for a dead rank. NCCL adds in its own order (rings and
//! trees), so unlike the CPU backend the sums equal rank order's only up to rounding.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

use candle_core::Device;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream};
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};

use super::Collective;
use super::unique_id::{UNIQUE_ID_BYTES, decode, encode};
use super::worker::{Worker, exit_gang};
use crate::{Result, TrainerError};

/// A collective for the communicator's thread.
enum Request {
    AllReduceSum(Vec<f32>),
    Broadcast(Vec<f32>),
}

/// What the communicator's thread answers: the values after the collective (none for joining),
/// or what failed.
type Reply = std::result::Result<Vec<f32>, String>;

/// An NCCL communicator over the gang's ranks, driven through its own thread.
pub struct NcclCollective {
    worker: Worker<Request, Reply>,
    rank: usize,
    world_size: usize,
}

impl NcclCollective {
    /// Joins the NCCL communicator of the ranks `bootstrap` connects (the CPU backend, or
    /// [`super::SingleProcess`] for one rank), on GPU `ordinal`. Joining and every collective
    /// must answer within `timeout`, or the process exits ([`exit_gang`]).
    pub fn over(bootstrap: &mut dyn Collective, ordinal: usize, timeout: Duration) -> Result<Self> {
        let (rank, world_size) = (bootstrap.rank(), bootstrap.world_size());
        let fail = |reason: String| TrainerError::Collective { rank, reason };
        let mut values = vec![0f32; UNIQUE_ID_BYTES];
        if rank == 0 {
            let id = Id::new().map_err(|e| fail(format!("ncclGetUniqueId: {e:?}")))?;
            values = encode(id.internal());
        }
        bootstrap.broadcast(&mut values)?;
        let id = decode(&values)?;
        let worker = Worker::start(
            &format!("nccl-rank-{rank}"),
            timeout,
            exit_gang,
            move |jobs, answers| serve(ordinal, rank, world_size, id, &jobs, &answers),
        )
        .map_err(|e| fail(format!("cannot start the NCCL thread: {e}")))?;
        let this = Self {
            worker,
            rank,
            world_size,
        };
        this.reply(
            "NCCL initialisation",
            this.worker.next_reply("NCCL initialisation"),
        )?;
        tracing::info!(
            rank,
            world_size,
            gpu = ordinal,
            "joined the NCCL communicator"
        );
        Ok(this)
    }

    /// The values of a reply, or the failure as a collective error.
    fn reply(&self, what: &str, reply: std::result::Result<Reply, String>) -> Result<Vec<f32>> {
        reply
            .and_then(|r| r)
            .map_err(|reason| TrainerError::Collective {
                rank: self.rank,
                reason: format!("{what}: {reason}"),
            })
    }

    /// Runs the collective `request` builds on a copy of `values` and copies the result back.
    fn call(
        &mut self,
        what: &str,
        values: &mut [f32],
        request: fn(Vec<f32>) -> Request,
    ) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let out = self.reply(what, self.worker.call(what, request(values.to_vec())))?;
        if out.len() != values.len() {
            return Err(TrainerError::Collective {
                rank: self.rank,
                reason: format!("{what}: {} values back, {} sent", out.len(), values.len()),
            });
        }
        values.copy_from_slice(&out);
        Ok(())
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
        self.call("NCCL all-reduce", values, Request::AllReduceSum)
    }

    fn broadcast(&mut self, values: &mut [f32]) -> Result<()> {
        self.call("NCCL broadcast", values, Request::Broadcast)
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }
}

/// The communicator's thread: joins the communicator (answering once), then runs each request
/// until the collective is dropped.
fn serve(
    ordinal: usize,
    rank: usize,
    world_size: usize,
    id: [std::ffi::c_char; UNIQUE_ID_BYTES],
    jobs: &Receiver<Request>,
    answers: &Sender<Reply>,
) {
    let joined = join(ordinal, rank, world_size, id);
    let (comm, stream) = match joined {
        Ok(joined) => {
            let _ = answers.send(Ok(Vec::new()));
            joined
        }
        Err(reason) => {
            let _ = answers.send(Err(reason));
            return;
        }
    };
    for request in jobs {
        let reply = match request {
            Request::AllReduceSum(values) => on_gpu(&stream, values, |buffer| {
                comm.all_reduce_in_place(buffer, &ReduceOp::Sum)
                    .map(|_| ())
                    .map_err(|e| format!("ncclAllReduce: {e:?}"))
            }),
            Request::Broadcast(values) => on_gpu(&stream, values, |buffer| {
                comm.broadcast_in_place(buffer, 0)
                    .map(|_| ())
                    .map_err(|e| format!("ncclBroadcast: {e:?}"))
            }),
        };
        if answers.send(reply).is_err() {
            return;
        }
    }
}

/// Opens GPU `ordinal` and joins the communicator there.
fn join(
    ordinal: usize,
    rank: usize,
    world_size: usize,
    id: [std::ffi::c_char; UNIQUE_ID_BYTES],
) -> std::result::Result<(Comm, Arc<CudaStream>), String> {
    let stream = match Device::new_cuda(ordinal) {
        Ok(Device::Cuda(gpu)) => gpu.cuda_stream(),
        Ok(_) => return Err(format!("GPU {ordinal} is not a CUDA device")),
        Err(e) => return Err(format!("cannot open GPU {ordinal}: {e}")),
    };
    let comm = Comm::from_rank(stream.clone(), rank, world_size, Id::uninit(id))
        .map_err(|e| format!("ncclCommInitRank (rank {rank} of {world_size}): {e:?}"))?;
    Ok((comm, stream))
}

/// Copies `values` to the GPU, runs `op` on them there, and copies them back.
fn on_gpu(
    stream: &Arc<CudaStream>,
    mut values: Vec<f32>,
    op: impl FnOnce(&mut CudaSlice<f32>) -> std::result::Result<(), String>,
) -> Reply {
    let mut buffer = stream
        .clone_htod(&values)
        .map_err(|e| format!("copy to the GPU: {e:?}"))?;
    op(&mut buffer)?;
    stream
        .memcpy_dtoh(&buffer, &mut values)
        .map_err(|e| format!("copy from the GPU: {e:?}"))?;
    stream
        .synchronize()
        .map_err(|e| format!("stream synchronisation: {e:?}"))?;
    Ok(values)
}

/// `nccl-check`: a communicator of world size 1 on GPU 0 and an all-reduce and a broadcast of
/// known values, which must come back unchanged: what `scripts/gpu-check.sh` runs.
pub fn self_check(timeout: Duration) -> Result<serde_json::Value> {
    let mut one = super::SingleProcess;
    let mut nccl = NcclCollective::over(&mut one, 0, timeout)?;
    let sent: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
    let mut values = sent.clone();
    nccl.all_reduce_sum(&mut values)?;
    let mut root = vec![3.0f32; 16];
    nccl.broadcast(&mut root)?;
    let exact = values == sent;
    Ok(serde_json::json!({
        "check": "nccl",
        "world_size": nccl.world_size(),
        "values": sent.len(),
        "all_reduce_exact": exact,
        "ok": exact && root.iter().all(|v| *v == 3.0),
    }))
}
