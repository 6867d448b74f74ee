//! The `train` command's place in a data-parallel gang: the world from the rendezvous
//! environment, the gang's name and the timeouts, the collective they connect, and the local
//! ranks a node's entry process starts.

use std::time::Duration;

use crate::Result;
use crate::distributed::rendezvous::local_ranks_to_start;
use crate::distributed::tcp::{TcpCollective, Timeouts};
use crate::distributed::{Collective, RankEnv, SingleProcess, World};
use crate::{TrainerError, checkpoint::RunIdentity};

pub use finetune_api::gang::ATTEMPT_ENV;
/// Seconds each collective read or write may wait (default: [`Timeouts::default`]).
pub const COLLECTIVE_TIMEOUT_ENV: &str = "FINETUNE_COLLECTIVE_TIMEOUT_SECONDS";
/// Seconds the ranks may take to meet (default: [`Timeouts::default`]).
pub const RENDEZVOUS_TIMEOUT_ENV: &str = "FINETUNE_RENDEZVOUS_TIMEOUT_SECONDS";

/// This process's world, from the rendezvous environment (a single process without one).
pub fn world_from_env() -> Result<World> {
    World::from_env(|k| std::env::var(k).ok(), visible_gpus())
}

/// The collective of `world`: [`SingleProcess`] for one rank, else the CPU backend connected to
/// the other ranks of the gang named by the job's UID and [`ATTEMPT_ENV`]; for GPU ranks (`gpu`)
/// in a build with NCCL, the NCCL communicator those ranks then join through it.
pub fn connect(world: &World, run: &RunIdentity, gpu: bool) -> Result<Box<dyn Collective>> {
    if world.world_size == 1 {
        return Ok(Box::new(SingleProcess));
    }
    let attempt = std::env::var(ATTEMPT_ENV).unwrap_or_else(|_| "0".into());
    let job = if run.job_uid.is_empty() {
        "local"
    } else {
        run.job_uid.as_str()
    };
    let gang = format!("{job}/{attempt}");
    let defaults = Timeouts::default();
    let timeouts = Timeouts {
        rendezvous: seconds(RENDEZVOUS_TIMEOUT_ENV)?.unwrap_or(defaults.rendezvous),
        collective: seconds(COLLECTIVE_TIMEOUT_ENV)?.unwrap_or(defaults.collective),
    };
    tracing::info!(
        rank = world.rank,
        world = world.world_size,
        master = %format!("{}:{}", world.master_addr, world.master_port),
        %gang,
        "joining the gang"
    );
    let tcp = TcpCollective::connect(world, &gang, timeouts)?;
    if gpu {
        return gpu_collective(tcp, world.local_rank, timeouts.collective);
    }
    Ok(Box::new(tcp))
}

/// GPU ranks' collective: NCCL, met through `tcp`.
#[cfg(feature = "nccl")]
fn gpu_collective(
    mut tcp: TcpCollective,
    ordinal: usize,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    let nccl = crate::distributed::nccl::NcclCollective::over(&mut tcp, ordinal, timeout)?;
    Ok(Box::new(nccl))
}

/// GPU ranks' collective in a build without NCCL: the CPU backend (gradients through host
/// memory), said once.
#[cfg(not(feature = "nccl"))]
fn gpu_collective(
    tcp: TcpCollective,
    _ordinal: usize,
    _timeout: Duration,
) -> Result<Box<dyn Collective>> {
    tracing::warn!("this trainer was built without NCCL: GPU ranks reduce through the CPU backend");
    Ok(Box::new(tcp))
}

/// The ranks this process must start, when it is a node's entry process with several processes
/// per node (see [`local_ranks_to_start`]).
pub fn local_ranks() -> Result<Option<Vec<RankEnv>>> {
    local_ranks_to_start(|k| std::env::var(k).ok(), visible_gpus())
}

/// The GPUs `CUDA_VISIBLE_DEVICES` lists (0 when unset: `PET_NPROC_PER_NODE=auto` is then one
/// process per node).
fn visible_gpus() -> usize {
    std::env::var("CUDA_VISIBLE_DEVICES")
        .map(|v| v.split(',').filter(|d| !d.trim().is_empty()).count())
        .unwrap_or(0)
}

fn seconds(name: &str) -> Result<Option<Duration>> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(s) if s > 0 => Ok(Some(Duration::from_secs(s))),
            _ => Err(TrainerError::Config(format!(
                "{name}={v:?} is not a whole number of seconds above 0"
            ))),
        },
    }
}
