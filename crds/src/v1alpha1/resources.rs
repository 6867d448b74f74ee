use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Compute resources and scheduling of the trainer pod. Unset GPU fields take the preset's
/// defaults.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourcesSpec {
    /// GPUs for the trainer pod, i.e. per node (0 trains on CPU). With `spread: data` the pod
    /// runs one trainer process per GPU, each holding the whole model and training on its own
    /// share of every optimizer step (the effective batch is batchSize ×
    /// gradientAccumulationSteps × GPUs × nodes); with `spread: layers` one process holds the
    /// model split over them (the effective batch is batchSize × gradientAccumulationSteps ×
    /// nodes). Default: 1 for 7B and 13B, 4 for 70B, 0 for
    /// tiny and stories-15m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 64))]
    pub gpus: Option<u32>,
    /// Trainer pods of the job, one per node, together one data-parallel gang (`resources.gpus`
    /// ranks each). Default 1. A gang's pods are created together, meet at rank 0's pod through
    /// the job's headless Service, and restart together from the latest checkpoint when any
    /// fails. With several pods the checkpoint claim the operator creates is ReadWriteMany; an
    /// `existingClaim` and a `pvc://` dataset must be mountable on several nodes too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub nodes: Option<u32>,
    /// How the model is spread over the GPUs: `data` (every GPU holds the whole model and
    /// trains on its share of each step), `layers` (one trainer process per pod splits the
    /// decoder layers over the pod's GPUs, for a model that does not fit one: the embeddings
    /// with the first layers, the LM head with the last, the split chosen by the memory plan;
    /// with several nodes the pods train data-parallel) or `auto` (`layers` when the pod has
    /// several GPUs and the model does not fit one by the memory plan, else `data`). Default
    /// `auto`.
    #[serde(default, skip_serializing_if = "Spread::is_auto")]
    pub spread: Spread,
    /// Gang scheduling by a batch scheduler: the operator creates the scheduler's PodGroup
    /// (one per job, `minMember` = the trainer pods of an attempt, `minResources` = their
    /// requests) and puts the trainer pods in it, so the scheduler places all of a gang's pods
    /// or none. Needs that scheduler and its PodGroup CRD in the cluster (see
    /// docs/distributed.md); without it the operator places a gang itself (pods created
    /// together, a partly placed gang released). Kueue needs no setting here: a job with the
    /// `kueue.x-k8s.io/queue-name` label is queued as one plain-Pod group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang_scheduling: Option<GangScheduling>,
    /// Extended resource name of a GPU.
    #[serde(default = "default_gpu_resource")]
    #[schemars(
        length(min = 3, max = 253),
        regex(
            pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
        )
    )]
    pub gpu_resource_name: String,
    /// Memory of one GPU in GiB, used by the fit check. Default 80 (A100/H100 80 GB).
    #[serde(
        default,
        rename = "gpuMemoryGiB",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 1024))]
    pub gpu_memory_gib: Option<u32>,
    /// CPU request (and limit) of the trainer container. A CPU job splits each micro-batch's
    /// rows between this many single-threaded workers (rounded up, at most one per row), each
    /// holding its part's gradients; without it, between the node's cores, and the memory plan
    /// assumes one worker per row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory request (and limit) of the trainer container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Node labels the trainer pod must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 63}))]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the trainer pod (e.g. for tainted GPU nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
    /// Affinity of the trainer pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the trainer pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// Trainer image override (default: the operator's trainer image, CUDA variant with GPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^[^\s]+$"))]
    pub image: Option<String>,
}

impl Default for ResourcesSpec {
    fn default() -> Self {
        ResourcesSpec {
            gpus: None,
            nodes: None,
            spread: Spread::Auto,
            gang_scheduling: None,
            gpu_resource_name: default_gpu_resource(),
            gpu_memory_gib: None,
            cpu: None,
            memory: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            priority_class_name: None,
            image: None,
        }
    }
}

fn default_gpu_resource() -> String {
    "nvidia.com/gpu".into()
}

/// How a job's model is spread over its GPUs (`resources.spread`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Spread {
    /// `data` when the model fits one GPU, else `layers`.
    #[default]
    Auto,
    /// Data parallel: one trainer process per GPU, each with the whole model.
    Data,
    /// The decoder layers split over the pod's GPUs, driven by one trainer process per pod.
    Layers,
}

impl Spread {
    /// Whether this is the default, `auto`.
    pub fn is_auto(&self) -> bool {
        *self == Spread::Auto
    }
}

/// The batch scheduler that places a job's trainer pods as one gang (`resources.gangScheduling`):
/// exactly one of its fields.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct GangScheduling {
    /// The coscheduling plugin of kubernetes-sigs/scheduler-plugins: a
    /// `scheduling.x-k8s.io/v1alpha1` PodGroup and the `scheduling.x-k8s.io/pod-group` pod
    /// label. Set `trainerPod.schedulerName` to the scheduler that runs the plugin (e.g.
    /// `scheduler-plugins-scheduler`) unless it replaces the default scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coscheduling: Option<CoschedulingGang>,
    /// Volcano: a `scheduling.volcano.sh/v1beta1` PodGroup in a Volcano queue, the
    /// `scheduling.k8s.io/group-name` pod annotation, and `schedulerName: volcano` unless
    /// `trainerPod.schedulerName` says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volcano: Option<VolcanoGang>,
}

/// Settings of a scheduler-plugins coscheduling PodGroup.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CoschedulingGang {
    /// How long the plugin waits for the whole gang to fit before it gives up the pods it
    /// reserved and tries again (the PodGroup's `scheduleTimeoutSeconds`). Default: the
    /// plugin's own (60 s in Kubeflow Trainer's runtimes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub schedule_timeout_seconds: Option<u32>,
}

/// Settings of a Volcano PodGroup.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolcanoGang {
    /// The Volcano queue whose share the gang uses. Default: Volcano's `default` queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub queue: Option<String>,
}
