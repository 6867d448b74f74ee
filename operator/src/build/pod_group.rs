//! The PodGroup of a gang-scheduled job (`resources.gangScheduling`): the batch scheduler's own
//! object for "place all of these pods or none", as Kubeflow Trainer's coscheduling and Volcano
//! plugins create it: one per job, `minMember` = the pods of an attempt, `minResources` = the
//! sum of their requests. The pods join it by the scheduler's label or annotation
//! ([`membership`]).

use std::collections::BTreeMap;

use finetune_api::fit::effective_nodes;
use finetune_api::quantity::parse_quantity_bytes;
use finetune_api::{FineTuneJob, GangScheduling};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::{Value, json};

use super::{name_and_namespace, owner_reference};
use crate::names;
use crate::{Error, Result};

/// The pod label that puts a pod in a scheduler-plugins coscheduling PodGroup.
pub const COSCHEDULING_POD_GROUP_LABEL: &str = "scheduling.x-k8s.io/pod-group";
/// The pod annotation that puts a pod in a Volcano PodGroup.
pub const VOLCANO_POD_GROUP_ANNOTATION: &str = "scheduling.k8s.io/group-name";
/// Volcano's scheduler name, set on the pods unless `trainerPod.schedulerName` says otherwise.
pub const VOLCANO_SCHEDULER_NAME: &str = "volcano";

/// The PodGroup API of the chosen scheduler.
pub fn pod_group_api(g: &GangScheduling) -> ApiResource {
    let gvk = if g.volcano.is_some() {
        GroupVersionKind::gvk("scheduling.volcano.sh", "v1beta1", "PodGroup")
    } else {
        GroupVersionKind::gvk("scheduling.x-k8s.io", "v1alpha1", "PodGroup")
    };
    ApiResource::from_gvk_with_plural(&gvk, "podgroups")
}

/// How a pod joins the job's PodGroup: labels and annotations to add, and the scheduler name
/// to set when the job names none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    /// Labels to add.
    pub labels: BTreeMap<String, String>,
    /// Annotations to add.
    pub annotations: BTreeMap<String, String>,
    /// The scheduler, when the job's `trainerPod.schedulerName` is unset.
    pub default_scheduler: Option<String>,
}

/// How the trainer pods of `job` join its PodGroup (empty without `gangScheduling`).
pub fn membership(job: &FineTuneJob, job_name: &str) -> Membership {
    let Some(g) = &job.spec.resources.gang_scheduling else {
        return Membership::default();
    };
    let group = names::pod_group(job_name);
    if g.volcano.is_some() {
        Membership {
            annotations: BTreeMap::from([(VOLCANO_POD_GROUP_ANNOTATION.into(), group)]),
            default_scheduler: Some(VOLCANO_SCHEDULER_NAME.into()),
            ..Membership::default()
        }
    } else {
        Membership {
            labels: BTreeMap::from([(COSCHEDULING_POD_GROUP_LABEL.into(), group)]),
            ..Membership::default()
        }
    }
}

/// The PodGroup of `job`, whose attempt's trainer pods are `pods`; `None` without
/// `gangScheduling`.
pub fn pod_group(job: &FineTuneJob, pods: &[Pod]) -> Result<Option<DynamicObject>> {
    let Some(g) = &job.spec.resources.gang_scheduling else {
        return Ok(None);
    };
    let (name, namespace) = name_and_namespace(job)?;
    let mut spec = json!({
        "minMember": effective_nodes(&job.spec),
        "minResources": min_resources(pods)?,
    });
    if let Some(timeout) = g
        .coscheduling
        .as_ref()
        .and_then(|c| c.schedule_timeout_seconds)
    {
        spec["scheduleTimeoutSeconds"] = timeout.into();
    }
    if let Some(v) = &g.volcano {
        if let Some(queue) = &v.queue {
            spec["queue"] = queue.clone().into();
        }
        if let Some(class) = &job.spec.resources.priority_class_name {
            spec["priorityClassName"] = class.clone().into();
        }
    }
    let mut group = DynamicObject::new(&names::pod_group(&name), &pod_group_api(g))
        .within(&namespace)
        .data(json!({ "spec": spec }));
    group.metadata.labels = Some(names::common_labels(&name));
    group.metadata.owner_references = Some(vec![owner_reference(job)?]);
    Ok(Some(group))
}

/// The sum of the pods' container requests, resource by resource, as quantities (CPU in
/// millicores, everything else as a whole number).
fn min_resources(pods: &[Pod]) -> Result<Value> {
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let requests = pods
        .iter()
        .filter_map(|p| p.spec.as_ref())
        .flat_map(|s| s.containers.iter())
        .filter_map(|c| c.resources.as_ref()?.requests.as_ref());
    for r in requests {
        for (resource, q) in r {
            let value = parse_quantity_bytes(&q.0).ok_or_else(|| {
                Error::Render(format!("the PodGroup's minResources: {resource} {:?}", q.0))
            })?;
            *sums.entry(resource.clone()).or_default() += value;
        }
    }
    Ok(sums
        .into_iter()
        .map(|(resource, v)| {
            let q = if resource == "cpu" {
                format!("{}m", (v * 1000.0).round() as u64)
            } else {
                format!("{}", v.round() as u64)
            };
            (resource, Value::String(q))
        })
        .collect::<serde_json::Map<_, _>>()
        .into())
}
