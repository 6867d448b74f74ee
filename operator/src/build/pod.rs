//! The trainer pods: one per attempt, or a gang of one per node rank, each meeting the "restricted" Pod Security profile, with no
//! service-account token, a read-only root file system and a grace period that covers a
//! checkpoint save.

use std::collections::BTreeMap;

use finetune_api::FineTuneJob;
use finetune_api::fit::{CPU_WORKERS_ENV, cpu_limit_workers, effective_gpus, effective_nodes};
use finetune_api::gang::rendezvous_env;
use finetune_api::progress::TRAINER_METRICS_PORT;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, LocalObjectReference,
    ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile,
    SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::volumes::{CONFIG_DIR, CONFIG_FILE, DataPlan, env};
use super::{BuildSettings, name_and_namespace, owner_reference};
use crate::Result;
use crate::names::{self, ATTEMPT_LABEL, RANK_LABEL, TRAINER_CONTAINER};

/// Kueue's label naming a plain-Pod group (one Workload for all its pods).
pub const KUEUE_POD_GROUP_LABEL: &str = "kueue.x-k8s.io/pod-group-name";
/// Kueue's annotation with the number of pods of a plain-Pod group.
pub const KUEUE_POD_GROUP_COUNT_ANNOTATION: &str = "kueue.x-k8s.io/pod-group-total-count";
/// Kueue's annotation that makes a failed pod end its group instead of waiting for a
/// replacement in the same group.
pub const KUEUE_RETRIABLE_ANNOTATION: &str = "kueue.x-k8s.io/retriable-in-group";

/// User and group the trainer runs as (non-root).
pub const TRAINER_UID: i64 = 65532;

/// Container security context of the "restricted" profile.
pub fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(TRAINER_UID),
        run_as_group: Some(TRAINER_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn resources(job: &FineTuneJob, plan: &DataPlan) -> ResourceRequirements {
    let r = &job.spec.resources;
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(cpu) = &r.cpu {
        requests.insert("cpu".to_string(), cpu.clone());
        limits.insert("cpu".to_string(), cpu.clone());
    }
    if let Some(mem) = &r.memory {
        requests.insert("memory".to_string(), mem.clone());
        limits.insert("memory".to_string(), mem.clone());
    }
    let gpus = effective_gpus(&job.spec);
    if gpus > 0 {
        // Extended resources are set as limits (requests default to them and must be equal).
        limits.insert(r.gpu_resource_name.clone(), Quantity(gpus.to_string()));
        requests.insert(r.gpu_resource_name.clone(), Quantity(gpus.to_string()));
    }
    if plan.model_download_bytes > 0 {
        requests.insert(
            "ephemeral-storage".to_string(),
            Quantity(plan.model_download_bytes.to_string()),
        );
    }
    ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    }
}

/// Builds the trainer pod of node rank `rank` (0 for a job of one pod) of one attempt.
pub fn trainer_pod(
    job: &FineTuneJob,
    settings: &BuildSettings,
    plan: &DataPlan,
    attempt: u32,
    rank: u32,
) -> Result<Pod> {
    let (name, namespace) = name_and_namespace(job)?;
    let spec = &job.spec;
    let gang = effective_nodes(spec) > 1;
    let gpus = effective_gpus(spec);
    let image = spec.resources.image.clone().unwrap_or_else(|| {
        if gpus > 0 {
            settings.trainer_cuda_image.clone()
        } else {
            settings.trainer_image.clone()
        }
    });
    let mut labels = names::common_labels(&name);
    labels.extend(names::trainer_selector(&name));
    labels.insert(ATTEMPT_LABEL.into(), attempt.to_string());
    if gang {
        labels.insert(RANK_LABEL.into(), rank.to_string());
    }
    let mut vars = vec![
        field_env("POD_IP", "status.podIP"),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        // Keep freed memory instead of returning it to the kernel between steps: the
        // trainer allocates the same large tensors every step (about 2x throughput on CPU).
        env("MIMALLOC_PURGE_DELAY", "-1"),
        // On the CPU the trainer splits each micro-batch between single-threaded workers, one
        // per core; candle's own element-wise thread pool would only compete with them (the
        // trainer restarts itself with this setting when it is missing).
        env("CANDLE_NUM_THREADS", "1"),
        // The metrics and progress server binds the pod's own address.
        env(
            "FINETUNE_METRICS_ADDRESS",
            &format!("$(POD_IP):{TRAINER_METRICS_PORT}"),
        ),
    ];
    // A CPU job's trainer splits each micro-batch between as many workers as its CPU limit
    // allows (rounded up), the count its memory plan was checked with.
    if let (0, Some(workers)) = (gpus, cpu_limit_workers(spec)) {
        vars.push(env(CPU_WORKERS_ENV, &workers.to_string()));
    }
    // Several GPUs: the trainer's entry process starts one rank per GPU. They meet on the pod's
    // loopback, or, in a gang, at rank 0's pod under its stable DNS name (the metrics Service
    // is headless and publishes not-ready addresses, so the name resolves before readiness).
    let service = names::metrics_service(&name);
    let master = if gang {
        format!("{}.{service}", names::gang_hostname(&name, attempt, 0))
    } else {
        "127.0.0.1".to_string()
    };
    for (name, value) in rendezvous_env(spec, rank, &master, attempt) {
        vars.push(env(name, &value));
    }
    let trainer = Container {
        name: TRAINER_CONTAINER.into(),
        image: Some(image),
        args: Some(vec![
            "train".into(),
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_FILE}"),
            "--resume".into(),
            "auto".into(),
        ]),
        env: Some(vars),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: i32::from(TRAINER_METRICS_PORT),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(resources(job, plan)),
        volume_mounts: Some(plan.mounts.clone()),
        security_context: Some(restricted_container_security()),
        termination_message_path: Some(plan.paths.termination_message_file.clone()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    };
    let r = &spec.resources;
    // The job's own labels and annotations first, so the operator's keys win (validation
    // refuses the reserved prefixes anyway).
    let pod = &spec.trainer_pod;
    let mut labels_with_job = pod.labels.clone();
    labels_with_job.extend(kueue_labels(job));
    labels_with_job.extend(labels);
    let mut labels = labels_with_job;
    let mut annotations = pod.annotations.clone();
    if gang && labels.contains_key(finetune_api::KUEUE_QUEUE_LABEL) {
        // Kueue's plain-Pod groups: the attempt's pods are one Workload, admitted whole; a
        // failed pod ends the group (the operator starts the next attempt as a new group).
        labels.insert(
            KUEUE_POD_GROUP_LABEL.into(),
            names::gang_hostname(&name, attempt, 0),
        );
        annotations.insert(
            KUEUE_POD_GROUP_COUNT_ANNOTATION.into(),
            effective_nodes(spec).to_string(),
        );
        annotations.insert(KUEUE_RETRIABLE_ANNOTATION.into(), "false".into());
    }
    // A gang-scheduled job's pods join its PodGroup.
    let group = super::pod_group::membership(job, &name);
    labels.extend(group.labels);
    annotations.extend(group.annotations);
    annotations.insert(
        "prometheus.io/port".to_string(),
        TRAINER_METRICS_PORT.to_string(),
    );
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(if gang {
                names::gang_pod(&name, attempt, rank)
            } else {
                names::trainer_pod(&name, attempt)
            }),
            namespace: Some(namespace),
            labels: Some(labels),
            owner_references: Some(vec![owner_reference(job)?]),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(settings.trainer_grace_seconds),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(TRAINER_UID),
                run_as_group: Some(TRAINER_UID),
                fs_group: Some(TRAINER_UID),
                // Without it the kubelet chowns every file of the checkpoint claim on each
                // mount (minutes for a 70B run's checkpoints); with it, only when the volume
                // root's owner differs.
                fs_group_change_policy: Some("OnRootMismatch".into()),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..PodSecurityContext::default()
            }),
            init_containers: (!plan.init_containers.is_empty())
                .then(|| plan.init_containers.clone()),
            containers: vec![trainer],
            hostname: gang.then(|| names::gang_hostname(&name, attempt, rank)),
            subdomain: gang.then_some(service),
            volumes: Some(plan.volumes.clone()),
            node_selector: (!r.node_selector.is_empty()).then(|| r.node_selector.clone()),
            tolerations: (!r.tolerations.is_empty()).then(|| r.tolerations.clone()),
            affinity: r.affinity.clone(),
            priority_class_name: r.priority_class_name.clone(),
            service_account_name: pod.service_account_name.clone(),
            image_pull_secrets: (!pod.image_pull_secrets.is_empty()).then(|| {
                pod.image_pull_secrets
                    .iter()
                    .map(|s| LocalObjectReference {
                        name: s.name.clone(),
                    })
                    .collect()
            }),
            runtime_class_name: pod.runtime_class_name.clone(),
            scheduler_name: pod.scheduler_name.clone().or(group.default_scheduler),
            ..PodSpec::default()
        }),
        status: None,
    })
}

/// The job's Kueue labels (queue and priority), which Kueue's plain-Pod integration reads from
/// the pod itself.
fn kueue_labels(job: &FineTuneJob) -> BTreeMap<String, String> {
    let labels = job.metadata.labels.as_ref();
    [
        finetune_api::KUEUE_QUEUE_LABEL,
        finetune_api::KUEUE_PRIORITY_LABEL,
    ]
    .into_iter()
    .filter_map(|key| Some((key.to_string(), labels?.get(key)?.clone())))
    .collect()
}
