//! Pure construction of the objects a FineTuneJob owns: the trainer ConfigMap, the checkpoint
//! PersistentVolumeClaim, the metrics Service, the trainer NetworkPolicy and the trainer Pod. No I/O: every function here
//! takes the job and settings and returns objects, and is tested from YAML fixtures.

mod objects;
mod pod;
mod pod_group;
mod volumes;

pub use objects::{checkpoint_claim, config_map, metrics_service, trainer_network_policy};
pub use pod::{
    KUEUE_POD_GROUP_COUNT_ANNOTATION, KUEUE_POD_GROUP_LABEL, KUEUE_RETRIABLE_ANNOTATION,
    trainer_pod,
};
pub use pod_group::{
    COSCHEDULING_POD_GROUP_LABEL, VOLCANO_POD_GROUP_ANNOTATION, VOLCANO_SCHEDULER_NAME, pod_group,
    pod_group_api,
};
pub use volumes::{
    DataPlan, FETCH_CA_BUNDLE_ENV, FETCH_TOKEN_ENV, MOUNT_ROOT, plan_volumes, url_port,
};

use finetune_api::fit::effective_nodes;
use finetune_api::{FineTuneJob, ModelPreset};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use kube::api::DynamicObject;

use crate::{Error, Result};

/// Default trainer image (CPU build).
pub const DEFAULT_TRAINER_IMAGE: &str = "ghcr.io/finetune-operator/trainer:0.1.0";
/// Default trainer image for GPU jobs (CUDA build).
pub const DEFAULT_TRAINER_CUDA_IMAGE: &str = "ghcr.io/finetune-operator/trainer:0.1.0-cuda";
/// Default image of the download init steps (entrypoint `finetune-fetch`).
pub const DEFAULT_FETCH_IMAGE: &str = "ghcr.io/finetune-operator/fetch:0.1.0";
/// Default image of the operator itself (used by the chart and the kustomize base).
pub const DEFAULT_OPERATOR_IMAGE: &str = "ghcr.io/finetune-operator/operator:0.1.0";

/// Operator-wide settings the builders need.
#[derive(Clone, Debug)]
pub struct BuildSettings {
    /// Trainer image for CPU jobs.
    pub trainer_image: String,
    /// Trainer image for GPU jobs.
    pub trainer_cuda_image: String,
    /// Image with `finetune-fetch`.
    pub fetch_image: String,
    /// Hugging Face endpoint for model downloads.
    pub hf_endpoint: String,
    /// Pretrained tiny base inside the trainer image.
    pub tiny_model_dir: String,
    /// The `stories-15m` base inside the trainer image.
    pub stories_model_dir: String,
    /// Llama 2 tokenizer inside the trainer image.
    pub tiny_tokenizer_file: String,
    /// Grace period of trainer pods.
    pub trainer_grace_seconds: i64,
    /// The ConfigMap key with the CAs the download steps trust, when not the public roots.
    pub ca_bundle: Option<CaBundle>,
}

/// A key of a ConfigMap in the job's namespace holding PEM certificates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaBundle {
    /// The ConfigMap.
    pub config_map: String,
    /// Its key.
    pub key: String,
}

impl CaBundle {
    /// From the operator flag: `name` or `name/key` (key `ca.crt` by default); `None` when empty.
    pub fn parse(flag: &str) -> Option<Self> {
        let flag = flag.trim();
        if flag.is_empty() {
            return None;
        }
        let (config_map, key) = flag.split_once('/').unwrap_or((flag, "ca.crt"));
        Some(CaBundle {
            config_map: config_map.into(),
            key: key.into(),
        })
    }
}

impl BuildSettings {
    /// The directory inside the trainer image with the weights of a preset the image ships
    /// (`tiny`, `stories-15m`; validation requires a source for every other preset, which then
    /// falls back to the tiny base here).
    pub fn bundled_model_dir(&self, preset: ModelPreset) -> &str {
        match preset {
            ModelPreset::Stories15m => &self.stories_model_dir,
            _ => &self.tiny_model_dir,
        }
    }
}

impl Default for BuildSettings {
    fn default() -> Self {
        BuildSettings {
            trainer_image: DEFAULT_TRAINER_IMAGE.into(),
            trainer_cuda_image: DEFAULT_TRAINER_CUDA_IMAGE.into(),
            fetch_image: DEFAULT_FETCH_IMAGE.into(),
            hf_endpoint: "https://huggingface.co".into(),
            tiny_model_dir: "/opt/finetune/tiny-base".into(),
            stories_model_dir: "/opt/finetune/stories-15m".into(),
            tiny_tokenizer_file: "/opt/finetune/tokenizer/tokenizer.json".into(),
            trainer_grace_seconds: 120,
            ca_bundle: None,
        }
    }
}

impl From<&crate::Args> for BuildSettings {
    fn from(a: &crate::Args) -> Self {
        BuildSettings {
            trainer_image: a.trainer_image.clone(),
            trainer_cuda_image: a.trainer_cuda_image.clone(),
            fetch_image: a.fetch_image.clone(),
            hf_endpoint: a.hf_endpoint.clone(),
            tiny_model_dir: a.tiny_model_dir.clone(),
            stories_model_dir: a.stories_model_dir.clone(),
            tiny_tokenizer_file: a.tiny_tokenizer_file.clone(),
            trainer_grace_seconds: a.trainer_grace_seconds,
            ca_bundle: CaBundle::parse(&a.ca_bundle_config_map),
        }
    }
}

/// Every child of a job, as it should be.
#[derive(Clone, Debug)]
pub struct Children {
    /// The rendered trainer configuration.
    pub config_map: ConfigMap,
    /// The checkpoint claim, when the operator creates it.
    pub checkpoint_claim: Option<PersistentVolumeClaim>,
    /// The metrics Service.
    pub metrics_service: Service,
    /// The NetworkPolicy of the trainer pods.
    pub network_policy: NetworkPolicy,
    /// The scheduler's PodGroup of a gang-scheduled job (`resources.gangScheduling`), applied
    /// before the pods.
    pub pod_group: Option<DynamicObject>,
    /// The trainer pods of the current attempt: one, or a gang of one per node rank (rank
    /// order).
    pub pods: Vec<Pod>,
}

/// Builds every child of `job` for the given attempt.
pub fn children(job: &FineTuneJob, settings: &BuildSettings, attempt: u32) -> Result<Children> {
    let plan = plan_volumes(job, settings)?;
    let pods: Vec<Pod> = (0..effective_nodes(&job.spec))
        .map(|rank| trainer_pod(job, settings, &plan, attempt, rank))
        .collect::<Result<_>>()?;
    Ok(Children {
        config_map: config_map(job, &plan)?,
        checkpoint_claim: checkpoint_claim(job)?,
        metrics_service: metrics_service(job)?,
        network_policy: trainer_network_policy(job, &plan)?,
        pod_group: pod_group(job, &pods)?,
        pods,
    })
}

/// The owner reference that makes a child garbage-collected with its job. It blocks the owner's
/// deletion (a foreground delete of the job waits for its pod), which is why the operator's
/// ClusterRole holds `finetunejobs/finalizers update` (OwnerReferencesPermissionEnforcement).
pub fn owner_reference(job: &FineTuneJob) -> Result<OwnerReference> {
    let mut owner = job
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    owner.block_owner_deletion = Some(true);
    Ok(owner)
}

/// The job's `metadata.uid`, which the API server always sets.
pub fn job_uid(job: &FineTuneJob) -> Result<&str> {
    job.metadata
        .uid
        .as_deref()
        .ok_or(Error::MissingField("metadata.uid"))
}

/// Name and namespace of a job.
pub fn name_and_namespace(job: &FineTuneJob) -> Result<(String, String)> {
    let name = job
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingField("metadata.name"))?;
    let ns = job
        .meta()
        .namespace
        .clone()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    Ok((name, ns))
}
