//! The vocabulary of a reconcile: what observe found ([`Observed`]), the settings and the clock
//! a decision takes, and the [`Plan`] it returns (status, ordered [`Write`]s, [`Requeue`], what to
//! remember and count).

use std::time::{Duration, Instant};

use finetune_api::{FineTuneJobSpec, FineTuneJobStatus, TrainerProgress};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::build::{BuildSettings, Children};
use crate::context::JobMemory;

/// What the observe step found, the input of [`super::decide::decide`] besides the job itself.
#[derive(Clone, Debug)]
pub struct Observed {
    /// The spec accepted when the job started (recorded in its ConfigMap); `None` before.
    pub accepted: Option<FineTuneJobSpec>,
    /// The job's trainer pods, every attempt.
    pub pods: Vec<Pod>,
    /// Whether the node of the current attempt's running pod is gone.
    pub node_lost: bool,
    /// The running trainer's progress, when it answered.
    pub progress: Option<TrainerProgress>,
    /// Children of an earlier job with this name that are still going (`pod/NAME`,
    /// `persistentvolumeclaim/NAME (being deleted)`): no pod is created until they are gone.
    pub leftovers: Vec<String>,
    /// Why the kubelet cannot set up the current attempt's pending pod's volumes (a ConfigMap,
    /// or a key of one, that a volume needs is missing), in its words; empty when nothing is.
    pub unmountable: Vec<String>,
    /// What is remembered of the job between reconciles.
    pub memory: JobMemory,
}

/// The lifecycle settings the rules use (operator flags) and the builders' settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Settings of the pure builders.
    pub build: BuildSettings,
    /// First wait after a counted failure.
    pub base_backoff: Duration,
    /// Longest wait after a counted failure.
    pub max_backoff: Duration,
    /// A step not advancing for this long sets `Stalled`.
    pub stall_timeout: Duration,
    /// How often a running trainer's progress is read.
    pub progress_interval: Duration,
    /// Disruptions a job survives.
    pub max_disruptions: u32,
}

impl Settings {
    /// The settings of the operator's flags.
    pub fn from_args(args: &crate::Args) -> Self {
        Settings {
            build: BuildSettings::from(args),
            base_backoff: args.base_backoff,
            max_backoff: args.max_backoff,
            stall_timeout: args.stall_timeout,
            progress_interval: args.progress_interval,
            max_disruptions: args.max_disruptions,
        }
    }
}

/// The time of a reconcile: wall clock for the status, monotonic for durations.
#[derive(Clone, Debug)]
pub struct Clock {
    /// Wall-clock time.
    pub wall: Time,
    /// Monotonic time.
    pub mono: Instant,
}

impl Clock {
    /// Now.
    pub fn now() -> Self {
        Clock {
            wall: Time(k8s_openapi::jiff::Timestamp::now()),
            mono: Instant::now(),
        }
    }
}

/// One write of a plan, executed in order by the apply step.
#[derive(Clone, Debug)]
pub enum Write {
    /// Server-side apply of the children (ConfigMap recording the accepted spec, checkpoint
    /// claim when absent, metrics Service, NetworkPolicy, then the pod).
    ApplyChildren(Box<Children>),
    /// Delete these pods, with this grace period (`None`: the pod's own).
    DeletePods {
        /// Pod names.
        names: Vec<String>,
        /// Grace period in seconds.
        grace: Option<u32>,
    },
    /// Write the plan's status (skipped when unchanged).
    Status,
    /// TTL: delete the trainer ConfigMap, the metrics Service, the trainer NetworkPolicy and the
    /// PodGroup of a gang-scheduled job.
    DeleteFinishedChildren,
}

impl Write {
    /// A pod deletion with no pods to delete (left out of plans).
    pub fn is_empty_delete(&self) -> bool {
        matches!(self, Write::DeletePods { names, .. } if names.is_empty())
    }

    /// A short description, for logs and fixture tests: `apply children (pod NAME)`,
    /// `delete pods A,B (grace 0)`, `status`, `delete configmap, service and network policy`.
    pub fn describe(&self) -> String {
        match self {
            Write::ApplyChildren(c) => {
                let pods: Vec<String> = c.pods.iter().map(|p| p.name_any()).collect();
                format!("apply children (pod {})", pods.join(", "))
            }
            Write::DeletePods { names, grace } => match grace {
                Some(g) => format!("delete pods {} (grace {g})", names.join(",")),
                None => format!("delete pods {}", names.join(",")),
            },
            Write::Status => "status".into(),
            Write::DeleteFinishedChildren => "delete configmap, service and network policy".into(),
        }
    }
}

/// When to look at the job again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// Only when the job or a child changes.
    AwaitChange,
    /// After this long (or sooner, on a change).
    After(Duration),
}

/// Everything a reconcile does, decided before anything is done.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The status to write.
    pub status: FineTuneJobStatus,
    /// The writes, in order (exactly one is [`Write::Status`]).
    pub writes: Vec<Write>,
    /// When to reconcile again.
    pub requeue: Requeue,
    /// What to remember of the job.
    pub memory: JobMemory,
    /// Forget the job (it finished for good).
    pub forget: bool,
    /// A restart to count in `finetune_operator_pod_restarts_total` (`failure`, `oom`,
    /// `disruption`).
    pub restart: Option<&'static str>,
    /// An Unschedulable episode ended after this long.
    pub unschedulable_for: Option<Duration>,
}
