//! Where a rank stands in its gang, read from the environment in the contract Kubeflow Trainer
//! and torchrun set (`PET_NNODES`, `PET_NPROC_PER_NODE`, `PET_NODE_RANK`, `PET_MASTER_ADDR`,
//! `PET_MASTER_PORT`; `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), so the
//! same image runs under this operator, a Kubeflow ClusterTrainingRuntime or Volcano.

use crate::{Result, TrainerError};

pub use finetune_api::gang::DEFAULT_MASTER_PORT;

/// One rank's place in a data-parallel gang.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    /// Global rank, `node_rank × procs_per_node + local_rank`.
    pub rank: usize,
    /// Rank within the node (the GPU index on a GPU node).
    pub local_rank: usize,
    /// How many ranks take part.
    pub world_size: usize,
    /// Where rank 0 listens (host name or address).
    pub master_addr: String,
    /// The port rank 0 listens on.
    pub master_port: u16,
}

impl World {
    /// A single process: rank 0 of 1.
    pub fn single() -> Self {
        Self {
            rank: 0,
            local_rank: 0,
            world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_MASTER_PORT,
        }
    }

    /// The world the environment describes (`var` looks a variable up; `visible_gpus` answers
    /// `PET_NPROC_PER_NODE=auto`). The process-level variables (`WORLD_SIZE`, `RANK`), set by
    /// torchrun for each worker it starts, win over the node-level `PET_*` ones; when both are
    /// given they must agree. No variable at all is a single process. Errors name the variable.
    pub fn from_env(var: impl Fn(&str) -> Option<String>, visible_gpus: usize) -> Result<Self> {
        let get = |name: &str| lookup(&var, name);
        let node_level = match get("PET_NNODES") {
            Some(nodes) => {
                let nodes = parse_count("PET_NNODES", &nodes)?;
                let per_node = procs_per_node(get, visible_gpus)?;
                let node_rank = get("PET_NODE_RANK")
                    .map(|v| parse_index("PET_NODE_RANK", &v))
                    .transpose()?
                    .unwrap_or(0);
                if node_rank >= nodes {
                    return Err(config(format!(
                        "PET_NODE_RANK={node_rank} is not below PET_NNODES={nodes}"
                    )));
                }
                Some((nodes * per_node, node_rank * per_node))
            }
            None => None,
        };
        let local_rank = get("LOCAL_RANK")
            .map(|v| parse_index("LOCAL_RANK", &v))
            .transpose()?
            .unwrap_or(0);
        let process_level = match (get("WORLD_SIZE"), get("RANK")) {
            (Some(w), r) => Some((
                parse_count("WORLD_SIZE", &w)?,
                r.map(|r| parse_index("RANK", &r)).transpose()?.unwrap_or(0),
            )),
            (None, Some(_)) => return Err(config("RANK is set without WORLD_SIZE".into())),
            (None, None) => None,
        };
        let (world_size, rank) = match (process_level, node_level) {
            (Some((w, r)), Some((node_world, _))) if w != node_world => {
                return Err(config(format!(
                    "WORLD_SIZE={w} disagrees with PET_NNODES × PET_NPROC_PER_NODE = {node_world} (rank {r})"
                )));
            }
            (Some((w, r)), _) => (w, r),
            (None, Some((w, first_rank_of_node))) => (w, first_rank_of_node + local_rank),
            (None, None) => return Ok(Self::single()),
        };
        if rank >= world_size {
            return Err(config(format!(
                "rank {rank} (RANK, or PET_NODE_RANK × PET_NPROC_PER_NODE + LOCAL_RANK) is not below the world size {world_size}"
            )));
        }
        let master_addr = get("PET_MASTER_ADDR")
            .or_else(|| get("MASTER_ADDR"))
            .unwrap_or_else(|| "127.0.0.1".into());
        if world_size > 1 && master_addr.contains(char::is_whitespace) {
            return Err(config(format!(
                "MASTER_ADDR={master_addr:?} is not a host name"
            )));
        }
        let master_port = match get("PET_MASTER_PORT").or_else(|| get("MASTER_PORT")) {
            None => DEFAULT_MASTER_PORT,
            Some(p) => p.parse().map_err(|_| {
                config(format!(
                    "MASTER_PORT / PET_MASTER_PORT={p:?} is not a port (1-65535)"
                ))
            })?,
        };
        Ok(Self {
            rank,
            local_rank,
            world_size,
            master_addr,
            master_port,
        })
    }
}

/// The variables (name, value) a node's entry process sets for one rank it starts.
pub type RankEnv = Vec<(String, String)>;

/// The environment of each rank a node's entry process starts, as torchrun does: when
/// `PET_NPROC_PER_NODE` (or `auto` with several visible GPUs) asks for more than one process per
/// node and the process was not itself started as a rank (no `RANK`, `LOCAL_RANK`), one entry
/// per local rank with `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and
/// `MASTER_PORT`. `None`: this process is a rank itself.
pub fn local_ranks_to_start(
    var: impl Fn(&str) -> Option<String>,
    visible_gpus: usize,
) -> Result<Option<Vec<RankEnv>>> {
    let get = |name: &str| lookup(&var, name);
    if get("RANK").is_some() || get("LOCAL_RANK").is_some() || get("PET_NNODES").is_none() {
        return Ok(None);
    }
    let per_node = procs_per_node(get, visible_gpus)?;
    if per_node == 1 {
        return Ok(None);
    }
    let first = World::from_env(&var, visible_gpus)?;
    Ok(Some(
        (0..per_node)
            .map(|local| {
                vec![
                    ("WORLD_SIZE".into(), first.world_size.to_string()),
                    ("RANK".into(), (first.rank + local).to_string()),
                    ("LOCAL_RANK".into(), local.to_string()),
                    ("LOCAL_WORLD_SIZE".into(), per_node.to_string()),
                    ("MASTER_ADDR".into(), first.master_addr.clone()),
                    ("MASTER_PORT".into(), first.master_port.to_string()),
                ]
            })
            .collect(),
    ))
}

/// The trimmed value of `name`; empty counts as unset.
fn lookup(var: impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    var(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Processes per node: `PET_NPROC_PER_NODE`, `auto` being the visible GPUs (one without any).
fn procs_per_node(get: impl Fn(&str) -> Option<String>, visible_gpus: usize) -> Result<usize> {
    match get("PET_NPROC_PER_NODE").as_deref() {
        None => Ok(1),
        Some("auto") => Ok(visible_gpus.max(1)),
        Some(n) => parse_count("PET_NPROC_PER_NODE", n),
    }
}

fn config(reason: String) -> TrainerError {
    TrainerError::Config(reason)
}

/// A count of at least 1.
fn parse_count(name: &str, v: &str) -> Result<usize> {
    match v.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(config(format!(
            "{name}={v:?} is not a whole number of at least 1"
        ))),
    }
}

/// An index from 0.
fn parse_index(name: &str, v: &str) -> Result<usize> {
    v.parse::<usize>()
        .map_err(|_| config(format!("{name}={v:?} is not a whole number")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)], gpus: usize) -> Result<World> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_env(|k| map.get(k).cloned(), gpus)
    }

    #[test]
    fn no_variable_is_a_single_process() {
        assert_eq!(world(&[], 0).unwrap(), World::single());
    }

    #[test]
    fn kubeflow_node_variables_give_the_global_rank() {
        let w = world(
            &[
                ("PET_NNODES", "2"),
                ("PET_NPROC_PER_NODE", "4"),
                ("PET_NODE_RANK", "1"),
                ("LOCAL_RANK", "3"),
                ("PET_MASTER_ADDR", "job-0.job"),
                ("PET_MASTER_PORT", "23456"),
            ],
            0,
        )
        .unwrap();
        assert_eq!((w.rank, w.local_rank, w.world_size), (7, 3, 8));
        assert_eq!(
            (w.master_addr.as_str(), w.master_port),
            ("job-0.job", 23456)
        );
    }

    #[test]
    fn auto_processes_per_node_counts_the_visible_gpus() {
        let w = world(&[("PET_NNODES", "3"), ("PET_NPROC_PER_NODE", "auto")], 8).unwrap();
        assert_eq!(w.world_size, 24);
        let cpu = world(&[("PET_NNODES", "3"), ("PET_NPROC_PER_NODE", "auto")], 0).unwrap();
        assert_eq!(cpu.world_size, 3, "no GPU: one process per node");
    }

    #[test]
    fn torchrun_process_variables_win_and_must_agree() {
        let w = world(
            &[
                ("WORLD_SIZE", "4"),
                ("RANK", "2"),
                ("MASTER_ADDR", "10.0.0.5"),
            ],
            0,
        )
        .unwrap();
        assert_eq!(
            (w.rank, w.world_size, w.master_port),
            (2, 4, DEFAULT_MASTER_PORT)
        );
        let both = world(
            &[("PET_NNODES", "2"), ("WORLD_SIZE", "2"), ("RANK", "1")],
            0,
        )
        .unwrap();
        assert_eq!(both.rank, 1);
        let e = world(&[("PET_NNODES", "2"), ("WORLD_SIZE", "3")], 0).unwrap_err();
        assert!(e.to_string().contains("WORLD_SIZE=3 disagrees"), "{e}");
    }

    /// The ranks a node's entry process with `vars` starts: each one's world and environment.
    fn started_ranks(vars: &HashMap<String, String>) -> Vec<(World, HashMap<String, String>)> {
        local_ranks_to_start(|k| vars.get(k).cloned(), 0)
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|env| {
                let child: HashMap<String, String> = env.into_iter().collect();
                (
                    World::from_env(|k| child.get(k).cloned(), 0).unwrap(),
                    child,
                )
            })
            .collect()
    }

    #[test]
    fn a_node_entry_starts_one_rank_per_process_and_a_rank_starts_none() {
        let vars = [
            ("PET_NNODES", "2"),
            ("PET_NPROC_PER_NODE", "2"),
            ("PET_NODE_RANK", "1"),
            ("PET_MASTER_ADDR", "job-0.job"),
        ];
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let started = started_ranks(&map);
        assert_eq!(started.len(), 2);
        for (local, (w, child)) in started.iter().enumerate() {
            assert_eq!((w.rank, w.local_rank, w.world_size), (2 + local, local, 4));
            assert_eq!(w.master_addr, "job-0.job");
            assert!(
                local_ranks_to_start(|k| child.get(k).cloned(), 0)
                    .unwrap()
                    .is_none(),
                "a started rank starts nothing"
            );
        }
        let one: HashMap<String, String> = [("PET_NNODES".to_string(), "2".to_string())].into();
        assert!(
            local_ranks_to_start(|k| one.get(k).cloned(), 0)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_operators_environment_for_a_pod_with_four_gpus_starts_four_ranks() {
        let mut spec = finetune_api::v1alpha1::FineTuneJobSpec::default();
        spec.resources.gpus = Some(4);
        let map: HashMap<String, String> =
            finetune_api::gang::rendezvous_env(&spec, 0, "127.0.0.1", 2)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        assert_eq!(map[finetune_api::gang::ATTEMPT_ENV], "2");
        let started = started_ranks(&map);
        assert_eq!(started.len(), 4);
        for (local, (w, _)) in started.iter().enumerate() {
            assert_eq!((w.rank, w.local_rank, w.world_size), (local, local, 4));
            assert_eq!(
                (w.master_addr.as_str(), w.master_port),
                ("127.0.0.1", 29500)
            );
        }
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (vars, what) in [
            (vec![("WORLD_SIZE", "0")], "WORLD_SIZE=\"0\""),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2")], "rank 2"),
            (vec![("RANK", "1")], "RANK is set without WORLD_SIZE"),
            (vec![("PET_NNODES", "x")], "PET_NNODES=\"x\""),
            (
                vec![("PET_NNODES", "2"), ("PET_NODE_RANK", "2")],
                "PET_NODE_RANK=2",
            ),
            (
                vec![("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")],
                "MASTER_PORT",
            ),
        ] {
            let e = world(&vars, 0).unwrap_err().to_string();
            assert!(e.contains(what), "{vars:?}: {e}");
        }
    }
}
