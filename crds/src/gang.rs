//! The rendezvous contract between the operator and the trainer: the environment a trainer pod
//! gets when its job trains on several processes. It is Kubeflow Trainer's and torchrun's
//! (`PET_NNODES`, `PET_NPROC_PER_NODE`, `PET_NODE_RANK`, `PET_MASTER_ADDR`, `PET_MASTER_PORT`),
//! plus the attempt that keeps ranks of a restarted gang apart. The operator writes it from
//! [`rendezvous_env`]; the trainer reads it (`finetune_trainer::distributed::rendezvous`).

use crate::fit::{effective_nodes, processes_per_pod, world_size};
use crate::v1alpha1::FineTuneJobSpec;

/// The port rank 0 listens on when neither `PET_MASTER_PORT` nor `MASTER_PORT` says (torchrun's
/// default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// The attempt of the gang, set by the operator on every rank of a (re)started gang; ranks of
/// different attempts refuse each other.
pub const ATTEMPT_ENV: &str = "FINETUNE_ATTEMPT";

/// The exit code of a trainer whose collective failed (a rank left, hung or was refused):
/// `EX_TEMPFAIL` of sysexits.h, "try again later", so the whole gang is restarted.
pub const COLLECTIVE_EXIT_CODE: u8 = 75;

/// The rendezvous environment of the trainer pod with `node_rank` of `spec`'s job in `attempt`,
/// rank 0 listening at `master_addr`; empty when the job trains in one process.
pub fn rendezvous_env(
    spec: &FineTuneJobSpec,
    node_rank: u32,
    master_addr: &str,
    attempt: u32,
) -> Vec<(&'static str, String)> {
    if world_size(spec) <= 1 {
        return Vec::new();
    }
    vec![
        ("PET_NNODES", effective_nodes(spec).to_string()),
        ("PET_NPROC_PER_NODE", processes_per_pod(spec).to_string()),
        ("PET_NODE_RANK", node_rank.to_string()),
        ("PET_MASTER_ADDR", master_addr.to_string()),
        ("PET_MASTER_PORT", DEFAULT_MASTER_PORT.to_string()),
        (ATTEMPT_ENV, attempt.to_string()),
    ]
}
