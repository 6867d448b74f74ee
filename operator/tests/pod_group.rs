//! The PodGroup of a gang-scheduled job (`resources.gangScheduling`), from YAML: what the
//! coscheduling plugin and Volcano are given, and how the pods join it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use finetune_api::FineTuneJob;
use finetune_operator::build::{
    BuildSettings, COSCHEDULING_POD_GROUP_LABEL, Children, VOLCANO_POD_GROUP_ANNOTATION, children,
};
use kube::api::DynamicObject;
use serde_json::json;

/// A two-pod gang of 7B with 4 GPUs, 8 CPUs and 64Gi each, and the given `gangScheduling`.
fn gang_job(gang_scheduling: &str) -> FineTuneJob {
    let yaml = format!(
        r#"
apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: llama-two-nodes
  namespace: team-a
  uid: 0b5a6c1e-0000-4000-8000-000000000002
spec:
  model:
    preset: llama-2-7b
    source: hf://meta-llama/Llama-2-7b-hf
  dataset:
    source: pvc://reviews/reviews.csv
    columns: {{text: ReviewText, label: SentimentLabel}}
  resources:
    gpus: 4
    nodes: 2
    cpu: "8"
    memory: 64Gi
    priorityClassName: research
    gangScheduling:
{gang_scheduling}
"#
    );
    serde_yaml::from_str(&yaml).unwrap()
}

fn built(j: &FineTuneJob) -> Children {
    children(j, &BuildSettings::default(), 1).unwrap()
}

/// The children of `j` and its PodGroup, which must be of `api_version`.
fn built_with_group(j: &FineTuneJob, api_version: &str) -> (Children, DynamicObject) {
    let mut c = built(j);
    let group = c.pod_group.take().expect("a PodGroup");
    let types = group.types.as_ref().unwrap();
    assert_eq!(
        (types.api_version.as_str(), types.kind.as_str()),
        (api_version, "PodGroup")
    );
    (c, group)
}

#[test]
fn coscheduling_gets_one_pod_group_for_the_whole_gang_and_labelled_pods() {
    let j = gang_job("      coscheduling: {scheduleTimeoutSeconds: 120}");
    assert_eq!(finetune_api::validate::validate(&j.spec), Ok(()));
    let (c, group) = built_with_group(&j, "scheduling.x-k8s.io/v1alpha1");
    let name = group.metadata.name.clone().unwrap();
    assert_eq!(name, "llama-two-nodes-gang");
    assert_eq!(group.metadata.namespace.as_deref(), Some("team-a"));
    let owner = &group.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("FineTuneJob", Some(true))
    );
    // minMember is the gang, minResources the sum of both pods' requests.
    assert_eq!(
        group.data["spec"],
        json!({
            "minMember": 2,
            "minResources": {"cpu": "16000m", "memory": (128u64 << 30).to_string(),
                             "nvidia.com/gpu": "8",
                             "ephemeral-storage": group.data["spec"]["minResources"]["ephemeral-storage"]},
            "scheduleTimeoutSeconds": 120,
        })
    );
    let disk: u64 = group.data["spec"]["minResources"]["ephemeral-storage"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let per_pod: u64 = c.pods[0].spec.as_ref().unwrap().containers[0]
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap()["ephemeral-storage"]
        .0
        .parse()
        .unwrap();
    assert_eq!(
        disk,
        2 * per_pod,
        "the model download's disk, for both pods"
    );
    assert_eq!(c.pods.len(), 2);
    for pod in &c.pods {
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels.get(COSCHEDULING_POD_GROUP_LABEL), Some(&name));
        // The plugin runs in the scheduler the job names; none is set for it.
        assert_eq!(pod.spec.as_ref().unwrap().scheduler_name, None);
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        assert!(!annotations.contains_key(VOLCANO_POD_GROUP_ANNOTATION));
    }
}

#[test]
fn volcano_gets_its_pod_group_in_the_queue_and_its_scheduler() {
    let j = gang_job("      volcano: {queue: research}");
    assert_eq!(finetune_api::validate::validate(&j.spec), Ok(()));
    let (c, group) = built_with_group(&j, "scheduling.volcano.sh/v1beta1");
    let spec = &group.data["spec"];
    assert_eq!(spec["minMember"], 2);
    assert_eq!(spec["queue"], "research");
    assert_eq!(spec["priorityClassName"], "research");
    assert_eq!(spec["minResources"]["nvidia.com/gpu"], "8");
    assert!(spec.get("scheduleTimeoutSeconds").is_none());
    for pod in &c.pods {
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(
            annotations
                .get(VOLCANO_POD_GROUP_ANNOTATION)
                .map(String::as_str),
            Some("llama-two-nodes-gang")
        );
        assert!(
            !pod.metadata
                .labels
                .as_ref()
                .unwrap()
                .contains_key(COSCHEDULING_POD_GROUP_LABEL)
        );
        assert_eq!(
            pod.spec.as_ref().unwrap().scheduler_name.as_deref(),
            Some("volcano")
        );
    }
    // The job's own scheduler name wins (a Volcano scheduler under another name).
    let mut named = j.clone();
    named.spec.trainer_pod.scheduler_name = Some("volcano-gpu".into());
    let pod = built(&named).pods.remove(0);
    assert_eq!(
        pod.spec.unwrap().scheduler_name.as_deref(),
        Some("volcano-gpu")
    );
}

#[test]
fn without_gang_scheduling_there_is_no_pod_group_and_no_membership() {
    let mut j = gang_job("      volcano: {}");
    j.spec.resources.gang_scheduling = None;
    let c = built(&j);
    assert!(c.pod_group.is_none());
    for pod in &c.pods {
        assert!(
            pod.metadata
                .labels
                .as_ref()
                .unwrap()
                .keys()
                .chain(pod.metadata.annotations.as_ref().unwrap().keys())
                .all(|k| k != COSCHEDULING_POD_GROUP_LABEL && k != VOLCANO_POD_GROUP_ANNOTATION)
        );
        assert_eq!(pod.spec.as_ref().unwrap().scheduler_name, None);
    }
}

#[test]
fn a_gang_scheduler_is_exactly_one_with_a_valid_queue() {
    for (yaml, field) in [
        ("      {}", "spec.resources.gangScheduling"),
        (
            "      {coscheduling: {}, volcano: {}}",
            "spec.resources.gangScheduling",
        ),
        (
            "      volcano: {queue: Research_Queue}",
            "spec.resources.gangScheduling.volcano.queue",
        ),
    ] {
        let errors = finetune_api::validate::validate(&gang_job(yaml).spec).unwrap_err();
        assert!(errors.iter().any(|e| e.path == field), "{yaml}: {errors:?}");
    }
}
