//! Data-parallel training's collectives: the [`Collective`] interface the optimizer step
//! all-reduces gradients through, the rendezvous contract read from the environment
//! ([`rendezvous::World`]), and the backends: [`SingleProcess`] (world size 1), the CPU backend
//! [`tcp::TcpCollective`] (in the role gloo has for PyTorch) and, in builds with the `nccl`
//! feature, the GPU backend `nccl::NcclCollective` (NCCL through cudarc), which GPU ranks use.
//!
//! Every backend reduces in rank order, so a data-parallel step over `W` ranks of `k`
//! micro-batches each sums the same gradients in the same order as one rank accumulating `W × k`
//! micro-batches (up to the grouping of the additions).

#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
pub mod tcp;
pub mod unique_id;
pub mod worker;

pub use rendezvous::{RankEnv, World};

use crate::Result;

pub use finetune_api::gang::COLLECTIVE_EXIT_CODE;

/// The collectives of data-parallel training, over the ranks `0..world_size()`.
///
/// Every rank calls the same collectives in the same order with buffers of the same length; a
/// rank that calls something else, leaves, or does not answer within the backend's timeout makes
/// the call fail on every other rank with [`crate::TrainerError::Collective`].
pub trait Collective: Send {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// How many ranks take part.
    fn world_size(&self) -> usize;
    /// Replaces `values` on every rank with the element-wise sum over all ranks, added in rank
    /// order (rank 0's values first).
    fn all_reduce_sum(&mut self, values: &mut [f32]) -> Result<()>;
    /// Replaces `values` on every rank with rank 0's.
    fn broadcast(&mut self, values: &mut [f32]) -> Result<()>;
    /// The backend's name, for logs and the report.
    fn backend(&self) -> &'static str;
}

/// The collective of a run with one rank: every operation leaves the values as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _values: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn broadcast(&mut self, _values: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "single-process"
    }
}
