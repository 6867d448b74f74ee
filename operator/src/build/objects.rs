//! The trainer ConfigMap, the checkpoint claim, the metrics Service (a gang's DNS domain too)
//! and the trainer NetworkPolicy.

use std::collections::BTreeMap;

use finetune_api::fit::effective_nodes;
use finetune_api::progress::TRAINER_METRICS_PORT;
use finetune_api::{FineTuneJob, TrainerConfig};
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, PersistentVolumeClaimSpec, Service, ServicePort, ServiceSpec,
    VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::volumes::{CONFIG_FILE, DataPlan};
use super::{name_and_namespace, owner_reference};
use crate::Result;
use crate::names::{self, SPEC_HASH_ANNOTATION};

/// Default size of a checkpoint claim the operator creates.
pub const DEFAULT_CHECKPOINT_SIZE: &str = "10Gi";

fn meta(job: &FineTuneJob, name: String) -> Result<ObjectMeta> {
    let (job_name, namespace) = name_and_namespace(job)?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(namespace),
        labels: Some(names::common_labels(&job_name)),
        owner_references: Some(vec![owner_reference(job)?]),
        ..ObjectMeta::default()
    })
}

/// The trainer configuration, rendered from the spec and the planned paths. Its annotation
/// records the hash of the spec's immutable parts (see `finetune_api::mutability`).
pub fn config_map(job: &FineTuneJob, plan: &DataPlan) -> Result<ConfigMap> {
    let (name, namespace) = name_and_namespace(job)?;
    let config = TrainerConfig::from_spec(
        format!("{namespace}/{name}"),
        super::job_uid(job)?.to_string(),
        &job.spec,
        plan.paths.clone(),
        format!("0.0.0.0:{TRAINER_METRICS_PORT}"),
    );
    let mut m = meta(job, names::config_map(&name))?;
    m.annotations = Some(BTreeMap::from([(
        SPEC_HASH_ANNOTATION.to_string(),
        names::short_hash(
            finetune_api::mutability::immutable_part(&job.spec)
                .to_string()
                .as_bytes(),
        ),
    )]));
    Ok(ConfigMap {
        metadata: m,
        data: Some(BTreeMap::from([(
            CONFIG_FILE.to_string(),
            serde_json::to_string_pretty(&config)?,
        )])),
        ..ConfigMap::default()
    })
}

/// The checkpoint claim, unless the job names an existing one. With `retain: true` it carries no
/// owner reference, so it outlives the job.
pub fn checkpoint_claim(job: &FineTuneJob) -> Result<Option<PersistentVolumeClaim>> {
    let storage = &job.spec.checkpoints.storage;
    if storage.existing_claim.is_some() {
        return Ok(None);
    }
    let (name, _) = name_and_namespace(job)?;
    let mut m = meta(job, names::checkpoint_claim(&name))?;
    if storage.retain {
        m.owner_references = None;
    }
    let size = storage
        .size
        .clone()
        .unwrap_or_else(|| Quantity(DEFAULT_CHECKPOINT_SIZE.into()));
    Ok(Some(PersistentVolumeClaim {
        metadata: m,
        spec: Some(PersistentVolumeClaimSpec {
            // A gang's pods, on several nodes, all mount it (rank 0 writes, every rank resumes).
            access_modes: Some(vec![if effective_nodes(&job.spec) > 1 {
                "ReadWriteMany".into()
            } else {
                "ReadWriteOnce".into()
            }]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), size)])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }))
}

/// A headless Service selecting the trainer pods, with the `metrics` port (for ServiceMonitors).
/// It is also a gang's DNS domain (each pod's `subdomain`): it publishes not-ready addresses, so
/// rank 0's name resolves while the ranks meet, before any is ready.
pub fn metrics_service(job: &FineTuneJob) -> Result<Service> {
    let (name, _) = name_and_namespace(job)?;
    Ok(Service {
        metadata: meta(job, names::metrics_service(&name))?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(names::trainer_selector(&name)),
            ports: Some(vec![ServicePort {
                name: Some("metrics".into()),
                port: i32::from(TRAINER_METRICS_PORT),
                target_port: Some(IntOrString::String("metrics".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// The trainer pod's NetworkPolicy: ingress only to the `metrics` port (the operator reads
/// `/progress` there, Prometheus scrapes `/metrics`); egress only to DNS and, when the job has
/// download steps, to the ports of the URLs they fetch. A trainer that only reads volumes can
/// reach nothing else (enforced where the cluster's network plugin supports NetworkPolicy).
pub fn trainer_network_policy(job: &FineTuneJob, plan: &DataPlan) -> Result<NetworkPolicy> {
    let (name, _) = name_and_namespace(job)?;
    let port = |protocol: &str, port: i32| NetworkPolicyPort {
        protocol: Some(protocol.into()),
        port: Some(IntOrString::Int(port)),
        ..NetworkPolicyPort::default()
    };
    let mut egress = vec![NetworkPolicyEgressRule {
        ports: Some(vec![port("UDP", 53), port("TCP", 53)]),
        to: None,
    }];
    if !plan.egress_ports.is_empty() {
        egress.push(NetworkPolicyEgressRule {
            ports: Some(
                plan.egress_ports
                    .iter()
                    .map(|p| port("TCP", i32::from(*p)))
                    .collect(),
            ),
            to: None,
        });
    }
    let mut ingress = vec![NetworkPolicyIngressRule {
        ports: Some(vec![port("TCP", i32::from(TRAINER_METRICS_PORT))]),
        from: None,
    }];
    if effective_nodes(&job.spec) > 1 {
        // A gang's ranks talk to each other on any port (the rendezvous, NCCL's sockets).
        let gang = NetworkPolicyPeer {
            pod_selector: Some(LabelSelector {
                match_labels: Some(names::trainer_selector(&name)),
                ..LabelSelector::default()
            }),
            ..NetworkPolicyPeer::default()
        };
        ingress.push(NetworkPolicyIngressRule {
            ports: None,
            from: Some(vec![gang.clone()]),
        });
        egress.push(NetworkPolicyEgressRule {
            ports: None,
            to: Some(vec![gang]),
        });
    }
    Ok(NetworkPolicy {
        metadata: meta(job, names::network_policy(&name))?,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(names::trainer_selector(&name)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(ingress),
            egress: Some(egress),
        }),
    })
}
