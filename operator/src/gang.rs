//! A gang: the trainer pods of one attempt of a job of several pods (one per node rank), seen as
//! one outcome. Any rank failing or disrupted is the gang's outcome (the whole gang restarts);
//! rank 0's success is the gang's; a rank waiting is the gang waiting. Pure, and tested here from
//! pod fixtures.

use finetune_api::GangStatus;
use finetune_api::gang::COLLECTIVE_EXIT_CODE;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::lifecycle::{Failure, PodOutcome, Waiting, classify};
use crate::names::RANK_LABEL;

/// The node rank of a gang's pod (0 for the pod of a job of one pod, which has no rank label).
pub fn pod_rank(pod: &Pod) -> u32 {
    pod.labels()
        .get(RANK_LABEL)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// The current attempt's pods of a job of `ranks` pods, judged together.
#[derive(Clone, Debug, PartialEq)]
pub struct Gang<'a> {
    /// The pod the outcome is about (the failed, disrupted or waiting rank; rank 0 otherwise)
    /// and the outcome; `None` when a pod has to be created.
    pub outcome: Option<(&'a Pod, PodOutcome)>,
    /// Counts by state, for a gang (`None` for a job of one pod).
    pub status: Option<GangStatus>,
    /// Whether a rank waits for a node while another rank holds one: a partial gang.
    pub partially_placed: bool,
}

/// Judges the pods of one attempt of a job of `ranks` pods.
pub fn judge<'a>(pods: &[&'a Pod], ranks: u32) -> Gang<'a> {
    if ranks <= 1 {
        return Gang {
            outcome: pods.first().map(|p| (*p, classify(p))),
            status: None,
            partially_placed: false,
        };
    }
    let mut judged: Vec<(u32, &Pod, PodOutcome)> = pods
        .iter()
        .map(|p| (pod_rank(p), *p, classify(p)))
        .collect();
    judged.sort_by_key(|(rank, _, _)| *rank);
    let missing = (0..ranks)
        .filter(|r| !judged.iter().any(|(rank, _, _)| rank == r))
        .collect::<Vec<_>>();
    let mut status = GangStatus {
        pods: ranks,
        pending: missing.len() as u32,
        ..GangStatus::default()
    };
    for (_, _, outcome) in &judged {
        match outcome {
            PodOutcome::Pending(_) => status.pending += 1,
            PodOutcome::Running => status.running += 1,
            PodOutcome::Succeeded(_) => status.succeeded += 1,
            PodOutcome::Failed(_) | PodOutcome::Disrupted(_) => status.failed += 1,
        }
    }
    let scheduled = judged.iter().any(|(_, p, _)| is_scheduled(p));
    let unschedulable = judged.iter().any(|(_, _, o)| {
        matches!(o, PodOutcome::Pending(Waiting::Unschedulable(m)) if !waits_for_claim(m))
    });
    Gang {
        outcome: gang_outcome(&judged, &missing),
        status: Some(status),
        partially_placed: scheduled && unschedulable,
    }
}

/// Whether the scheduler only waits for a claim to be bound (a fresh checkpoint volume): the
/// claim is bound within seconds and the scheduler retries by itself, so the gang is not
/// released for it (the message would say it "cannot be placed whole", which is not known yet).
fn waits_for_claim(message: &str) -> bool {
    message.contains("unbound immediate PersistentVolumeClaims")
}

fn is_scheduled(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| s.node_name.is_some())
}

/// The one outcome of a gang's ranks (sorted by rank), by precedence: a disruption, a failure of
/// the rank's own (a rank whose collective failed only followed another), any failure, rank 0's
/// success, a rank gone while others started, a waiting rank (the most telling wait), running.
fn gang_outcome<'a>(
    judged: &[(u32, &'a Pod, PodOutcome)],
    missing: &[u32],
) -> Option<(&'a Pod, PodOutcome)> {
    let of_rank =
        |rank: u32, pod: &Pod, what: &str| format!("rank {rank} ({}): {what}", pod.name_any());
    if let Some((rank, pod, PodOutcome::Disrupted(m))) = judged
        .iter()
        .find(|(_, _, o)| matches!(o, PodOutcome::Disrupted(_)))
    {
        return Some((pod, PodOutcome::Disrupted(of_rank(*rank, pod, m))));
    }
    let failed = |own: bool| {
        judged
            .iter()
            .find(|(_, p, o)| matches!(o, PodOutcome::Failed(_)) && (!own || !collective_failed(p)))
    };
    if let Some((rank, pod, PodOutcome::Failed(f))) = failed(true).or_else(|| failed(false)) {
        let what = if collective_failed(pod) {
            format!(
                "{} (its collective failed: another rank left, hung or was refused)",
                f.message
            )
        } else {
            f.message.clone()
        };
        return Some((
            pod,
            PodOutcome::Failed(Failure {
                reason: f.reason.clone(),
                message: of_rank(*rank, pod, &what),
            }),
        ));
    }
    if let Some((_, pod, outcome @ PodOutcome::Succeeded(_))) =
        judged.iter().find(|(rank, _, _)| *rank == 0)
    {
        return Some((pod, outcome.clone()));
    }
    let started = judged
        .iter()
        .find(|(_, _, o)| !matches!(o, PodOutcome::Pending(_)));
    if let (Some(rank), Some((_, pod, _))) = (missing.first(), started) {
        return Some((
            pod,
            PodOutcome::Disrupted(format!("the pod of rank {rank} is gone")),
        ));
    }
    if !missing.is_empty() {
        // Ranks missing before any started: the cache has not seen them all yet, or a create
        // failed; the children are applied again.
        return None;
    }
    let waiting = |wanted: fn(&Waiting) -> bool| {
        judged.iter().find_map(|(rank, pod, o)| match o {
            PodOutcome::Pending(w) if wanted(w) => Some((*rank, *pod, w.clone())),
            _ => None,
        })
    };
    let telling = waiting(|w| matches!(w, Waiting::Unschedulable(_)))
        .or_else(|| waiting(|w| matches!(w, Waiting::Blocked { .. })))
        .or_else(|| waiting(|w| matches!(w, Waiting::Gated(_))))
        .or_else(|| waiting(|_| true));
    if let Some((rank, pod, w)) = telling {
        let w = match w {
            Waiting::Unschedulable(m) => Waiting::Unschedulable(of_rank(rank, pod, &m)),
            Waiting::Blocked { reason, message } => Waiting::Blocked {
                reason,
                message: of_rank(rank, pod, &message),
            },
            other => other,
        };
        return Some((pod, PodOutcome::Pending(w)));
    }
    judged
        .iter()
        .find(|(rank, _, _)| *rank == 0)
        .map(|(_, pod, _)| (*pod, PodOutcome::Running))
}

/// Whether a pod's trainer exited with the code of a failed collective.
fn collective_failed(pod: &Pod) -> bool {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref());
    statuses.into_iter().flatten().any(|c| {
        c.state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .is_some_and(|t| t.exit_code == i32::from(COLLECTIVE_EXIT_CODE))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(file: &str, rank: u32) -> Pod {
        let text = match file {
            "running" => include_str!("../tests/fixtures/pod-running.yaml"),
            "error" => include_str!("../tests/fixtures/pod-error.yaml"),
            "evicted" => include_str!("../tests/fixtures/pod-evicted.yaml"),
            "succeeded" => include_str!("../tests/fixtures/pod-succeeded.yaml"),
            "unschedulable" => include_str!("../tests/fixtures/pod-unschedulable.yaml"),
            other => panic!("{other}"),
        };
        let mut p: Pod = serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        p.metadata.name = Some(format!("demo-trainer-0-{rank}"));
        p.labels_mut().insert(RANK_LABEL.into(), rank.to_string());
        p
    }

    fn collective(rank: u32) -> Pod {
        let mut p = pod("error", rank);
        let statuses = p
            .status
            .as_mut()
            .and_then(|s| s.container_statuses.as_mut());
        for c in statuses.into_iter().flatten() {
            if let Some(t) = c.state.as_mut().and_then(|s| s.terminated.as_mut()) {
                t.exit_code = i32::from(COLLECTIVE_EXIT_CODE);
            }
        }
        p
    }

    fn outcome(pods: &[Pod]) -> (u32, PodOutcome) {
        let refs: Vec<&Pod> = pods.iter().collect();
        let gang = judge(&refs, 3);
        let (p, o) = gang.outcome.unwrap_or_else(|| panic!("no outcome"));
        (pod_rank(p), o)
    }

    #[test]
    fn the_rank_that_failed_first_is_named_not_those_whose_collective_followed() {
        let pods = [collective(0), pod("error", 1), collective(2)];
        match outcome(&pods) {
            (1, PodOutcome::Failed(f)) => {
                assert!(
                    f.message.starts_with("rank 1 (demo-trainer-0-1)"),
                    "{}",
                    f.message
                )
            }
            other => panic!("{other:?}"),
        }
        // Only collective failures (a hang): one of them, saying so.
        let pods = [collective(0), collective(1), pod("running", 2)];
        match outcome(&pods) {
            (0, PodOutcome::Failed(f)) => {
                assert!(f.message.contains("collective failed"), "{}", f.message)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_disruption_of_any_rank_is_the_gangs_and_not_counted_as_a_failure() {
        let pods = [collective(0), pod("evicted", 1), pod("running", 2)];
        assert!(matches!(outcome(&pods), (1, PodOutcome::Disrupted(m)) if m.starts_with("rank 1")));
    }

    #[test]
    fn rank_zero_decides_success_and_running() {
        let pods = [pod("succeeded", 0), pod("running", 1), pod("succeeded", 2)];
        assert!(matches!(outcome(&pods), (0, PodOutcome::Succeeded(_))));
        let pods = [pod("running", 0), pod("running", 1), pod("succeeded", 2)];
        assert_eq!(outcome(&pods), (0, PodOutcome::Running));
        let refs: Vec<&Pod> = pods.iter().collect();
        let status = judge(&refs, 3).status.unwrap_or_default();
        assert_eq!((status.pods, status.running, status.succeeded), (3, 2, 1));
    }

    #[test]
    fn a_waiting_rank_makes_the_gang_wait_and_a_partial_placement_is_seen() {
        let pods = [
            pod("running", 0),
            pod("unschedulable", 1),
            pod("running", 2),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let gang = judge(&refs, 3);
        match &gang.outcome {
            Some((_, PodOutcome::Pending(Waiting::Unschedulable(m)))) => {
                assert!(
                    m.starts_with("rank 1") && m.contains("nvidia.com/gpu"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(gang.partially_placed, "ranks 0 and 2 hold nodes");
        // No rank placed: nothing is held.
        let pods = [
            pod("unschedulable", 0),
            pod("unschedulable", 1),
            pod("unschedulable", 2),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        assert!(!judge(&refs, 3).partially_placed);
        // A rank waiting only for its checkpoint claim to be bound: the gang waits, unreleased.
        let mut claim = pod("unschedulable", 1);
        for c in claim
            .status
            .iter_mut()
            .flat_map(|s| s.conditions.iter_mut().flatten())
        {
            c.message = Some(
                "0/1 nodes are available: 1 pod has unbound immediate PersistentVolumeClaims."
                    .into(),
            );
        }
        let pods = [pod("running", 0), claim, pod("running", 2)];
        let refs: Vec<&Pod> = pods.iter().collect();
        let gang = judge(&refs, 3);
        assert!(
            matches!(&gang.outcome, Some((_, PodOutcome::Pending(Waiting::Unschedulable(m)))) if m.contains("PersistentVolumeClaims")),
            "{:?}",
            gang.outcome
        );
        assert!(
            !gang.partially_placed,
            "waiting for a claim is not a failed placement"
        );
    }

    #[test]
    fn missing_ranks_are_created_before_the_gang_starts_and_a_disruption_after() {
        let mut waiting = pod("running", 0);
        if let Some(s) = waiting.status.as_mut() {
            s.phase = Some("Pending".into());
            s.container_statuses = None;
        }
        let refs = [&waiting];
        let gang = judge(&refs, 3);
        assert_eq!(gang.outcome, None, "apply the children again");
        assert_eq!(gang.status.map(|s| s.pending), Some(3));
        let running = pod("running", 0);
        let refs = [&running];
        assert!(matches!(
            judge(&refs, 3).outcome,
            Some((_, PodOutcome::Disrupted(m))) if m.contains("rank 1 is gone")
        ));
    }

    #[test]
    fn a_job_of_one_pod_is_judged_as_before() {
        let p = pod("error", 0);
        let gang = judge(&[&p], 1);
        assert_eq!(gang.status, None);
        assert_eq!(gang.outcome.map(|(_, o)| o), Some(classify(&p)));
    }
}
