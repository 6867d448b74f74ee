//! End-to-end tests of a gang (a job of several trainer pods, `resources.nodes`) on the local
//! control plane with two simulated GPU nodes: the real operator, the real `finetune-trainer`
//! ranks meeting through the cluster DNS stand-in and training data-parallel over the CPU
//! backend, a rank killed mid-run, a gang that cannot be placed whole, and a gang scheduler's
//! PodGroup (scheduler-plugins' CRD installed, Volcano's missing).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::job::{
    NS, TRAIN, active, apply_ok, checkpoint_step, condition, env_with, job, job_pods, phase,
    resumed_from, tiny_job_with, wait_job,
};
use finetune_api::{JOB_LABEL, JobPhase};
use finetune_e2e::operator::OperatorProcess;
use finetune_e2e::{NodeSpec, Signal};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, WatchEvent, WatchParams,
};

/// Tests here run real trainers; one at a time keeps the 2-core machine responsive.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The test job with `nodes` trainer pods.
fn gang_job(name: &str, nodes: u32, max_steps: u32, checkpoint_every: u32) -> String {
    let mut doc: serde_yaml::Value =
        serde_yaml::from_str(&tiny_job_with(name, max_steps, checkpoint_every, max_steps)).unwrap();
    doc["spec"]["resources"]["nodes"] = nodes.into();
    serde_yaml::to_string(&doc).unwrap()
}

#[tokio::test]
async fn a_two_pod_gang_trains_and_restarts_whole_when_a_rank_is_killed() {
    let _serial = SERIAL.lock().await;
    let e = env_with(
        vec![NodeSpec::gpu("sim-gpu-0", 2), NodeSpec::gpu("sim-gpu-1", 2)],
        Vec::new(),
    )
    .await;
    let _op =
        OperatorProcess::start(&e.cluster, &e.ws, &e.tiny, &e.assets, "operator", &[]).unwrap();
    apply_ok(&e.cluster, &gang_job("gang", 2, 30, 10)).await;

    // Both ranks run and meet: a checkpoint from rank 0 past step 10.
    let j = wait_job(
        &e.cluster,
        "gang",
        TRAIN,
        "a checkpoint at step >= 10",
        |j| checkpoint_step(j) >= 10,
    )
    .await;
    assert_eq!(phase(&j), Some(JobPhase::Running));
    let gang = j.status.as_ref().unwrap().gang.clone().unwrap();
    assert_eq!((gang.pods, gang.running), (2, 2), "{gang:?}");
    let checkpointed = checkpoint_step(&j);
    for rank in 0..2 {
        let log = e
            .cluster
            .pod_log(NS, &format!("gang-trainer-0-{rank}"), "trainer")
            .unwrap();
        assert!(
            log.contains("joined the data-parallel gang") && log.contains(r#""world":2"#),
            "rank {rank}: {log}"
        );
    }

    // Kill rank 1's trainer: a counted failure of the whole gang, a new gang that resumes.
    e.cluster
        .kill_container(NS, "gang-trainer-0-1", "trainer", Signal::SIGKILL)
        .unwrap();
    let j = wait_job(&e.cluster, "gang", TRAIN, "a resumed gang", |j| {
        j.status.as_ref().is_some_and(|s| s.restarts == 1) && resumed_from(j) > 0
    })
    .await;
    let resumed = resumed_from(&j);
    assert!(
        (checkpointed..30).contains(&resumed),
        "resumed at {resumed}, checkpoint was {checkpointed}"
    );
    let pods = job_pods(&e.cluster, "gang").await;
    let mut running = active(&pods);
    running.sort();
    assert_eq!(
        running,
        ["gang-trainer-1-0", "gang-trainer-1-1"],
        "no survivor of attempt 0"
    );

    let j = wait_job(&e.cluster, "gang", TRAIN, "Succeeded", |j| {
        phase(j).is_some_and(JobPhase::is_finished)
    })
    .await;
    let s = j.status.clone().unwrap();
    assert_eq!(s.phase, Some(JobPhase::Succeeded), "{s:#?}");
    assert_eq!(s.progress.as_ref().unwrap().step, 30);
    assert_eq!(s.restarts, 1);
    e.cluster.shutdown().await;
}

#[tokio::test]
async fn a_gang_that_cannot_be_placed_whole_holds_no_node() {
    let _serial = SERIAL.lock().await;
    let e = env_with(vec![NodeSpec::gpu("sim-gpu-0", 2)], Vec::new()).await;
    let op =
        OperatorProcess::start(&e.cluster, &e.ws, &e.tiny, &e.assets, "operator", &[]).unwrap();
    // Two pods of 2 GPUs each on one node with 2: rank 0 fits, rank 1 cannot.
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&gang_job("wide", 2, 30, 10)).unwrap();
    doc["spec"]["resources"]["gpus"] = 2.into();
    apply_ok(&e.cluster, &serde_yaml::to_string(&doc).unwrap()).await;
    let j = wait_job(
        &e.cluster,
        "wide",
        Duration::from_secs(180),
        "Unschedulable, released",
        // The release says "cannot be placed whole (<the scheduler's reason>)", and the wait that
        // follows at once (the deleted pods trigger the next reconcile) "could not all be
        // placed"; a busy machine may only ever show the second. The Unschedulable condition
        // keeps the scheduler's words.
        |j| {
            let released = condition(j, "Ready").is_some_and(|c| {
                c.message.contains("cannot be placed whole")
                    || c.message.contains("could not all be placed")
            });
            released && condition(j, "Unschedulable").is_some_and(|c| c.status == "True")
        },
    )
    .await;
    // The scheduler's reason: no GPU left for rank 1. (A rank that waited only for the
    // checkpoint claim to be bound, when the gang was created before it was, released nothing.)
    let c = condition(&j, "Unschedulable").unwrap();
    assert!(
        c.message.contains("nodes are available") && c.message.contains("nvidia.com/gpu"),
        "{}",
        c.message
    );
    assert_eq!(phase(&j), Some(JobPhase::Pending));
    // Every pod that exists now was created before the release was seen; the list's version is
    // where the watch below starts, so no pod created later can be missed. (A re-created gang is
    // released again within a fraction of a second, too fast for polling to see.)
    let pods = Api::<Pod>::namespaced(e.cluster.client(), NS);
    let of_job = format!("{JOB_LABEL}=wide");
    let listed = pods
        .list(&ListParams::default().labels(&of_job))
        .await
        .unwrap();
    let released: Vec<String> = listed
        .items
        .iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    let version = listed.metadata.resource_version.unwrap();
    // The placed rank was released: within the retry wait no pod of the gang is left.
    common::wait_for(
        Duration::from_secs(20),
        "the released gang's pods gone",
        || async {
            active(&job_pods(&e.cluster, "wide").await)
                .is_empty()
                .then_some(())
        },
    )
    .await;
    // After the retry wait (30 s) the gang is created again (a pod none of the above), and, still
    // unable to fit, released again: the pod is deleted.
    let watch = WatchParams::default().labels(&of_job).timeout(120);
    let mut events = pods.watch(&watch, &version).await.unwrap().boxed();
    let mut created: Option<String> = None;
    let mut seen = Vec::new();
    let fresh = |p: &Pod| p.metadata.uid.clone().filter(|u| !released.contains(u));
    let outcome = tokio::time::timeout(Duration::from_secs(100), async {
        while let Some(event) = events.next().await {
            match event.unwrap() {
                WatchEvent::Added(p) => {
                    seen.push(format!("added {}", p.name_any()));
                    created = created.take().or_else(|| fresh(&p));
                }
                WatchEvent::Deleted(p) => {
                    seen.push(format!("deleted {}", p.name_any()));
                    if created.is_some() && fresh(&p) == created {
                        return true;
                    }
                }
                WatchEvent::Modified(_) | WatchEvent::Bookmark(_) => {}
                WatchEvent::Error(err) => panic!("pod watch failed: {err:?}"),
            }
        }
        false
    })
    .await;
    if outcome != Ok(true) {
        let status = job(&e.cluster, "wide").await.status;
        let log = op.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "the gang was not created again after the retry wait and released again (created: \
             {created:?}); pod events: {seen:?}\nstatus: {}\noperator log (newest first):\n{}",
            serde_json::to_string_pretty(&status).unwrap_or_default(),
            tail.join("\n")
        );
    }
    e.cluster.shutdown().await;
}

/// The PodGroup of a coscheduled gang, read back from the API server.
async fn pod_group(e: &common::job::Env, name: &str) -> Option<DynamicObject> {
    let gvk = GroupVersionKind::gvk("scheduling.x-k8s.io", "v1alpha1", "PodGroup");
    let api: Api<DynamicObject> = Api::namespaced_with(
        e.cluster.client(),
        NS,
        &ApiResource::from_gvk_with_plural(&gvk, "podgroups"),
    );
    api.get_opt(name).await.unwrap()
}

#[tokio::test]
async fn a_coscheduled_gang_joins_its_pod_group_and_a_missing_scheduler_api_is_named() {
    let _serial = SERIAL.lock().await;
    let e = env_with(
        vec![NodeSpec::gpu("sim-gpu-0", 2), NodeSpec::gpu("sim-gpu-1", 2)],
        Vec::new(),
    )
    .await;
    // scheduler-plugins' PodGroup CRD (a stand-in for installing the plugin; see the fixture).
    let crd =
        e.ws.root
            .join("tests/fixtures/coscheduling-podgroup-crd.yaml");
    apply_ok(&e.cluster, &std::fs::read_to_string(crd).unwrap()).await;
    let out = e
        .cluster
        .kubectl()
        .args([
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/podgroups.scheduling.x-k8s.io",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let _op =
        OperatorProcess::start(&e.cluster, &e.ws, &e.tiny, &e.assets, "operator", &[]).unwrap();
    let with_gang = |name: &str, gang: &str| {
        let mut doc: serde_yaml::Value = serde_yaml::from_str(&gang_job(name, 2, 6, 6)).unwrap();
        doc["spec"]["resources"]["gangScheduling"] = serde_yaml::from_str(gang).unwrap();
        serde_yaml::to_string(&doc).unwrap()
    };

    // Volcano is not installed: the job says so and no pod is created without its group.
    apply_ok(
        &e.cluster,
        &with_gang("volcano", "{volcano: {queue: research}}"),
    )
    .await;
    let j = wait_job(
        &e.cluster,
        "volcano",
        Duration::from_secs(60),
        "the missing PodGroup API named",
        |j| {
            condition(j, "Ready").is_some_and(|c| {
                c.message
                    .contains("the cluster has no scheduling.volcano.sh/v1beta1 PodGroup API")
            })
        },
    )
    .await;
    assert_eq!(
        condition(&j, "Ready").unwrap().reason,
        "ApplyFailed",
        "{:?}",
        j.status
    );
    assert!(job_pods(&e.cluster, "volcano").await.is_empty());

    // Coscheduling: the group first, with the whole gang as minMember, then both labelled pods.
    apply_ok(
        &e.cluster,
        &with_gang("cosched", "{coscheduling: {scheduleTimeoutSeconds: 30}}"),
    )
    .await;
    wait_job(&e.cluster, "cosched", TRAIN, "two trainer pods", |j| {
        j.status
            .as_ref()
            .and_then(|s| s.gang.as_ref())
            .is_some_and(|g| g.pods == 2)
    })
    .await;
    let group = pod_group(&e, "cosched-gang").await.expect("the PodGroup");
    assert_eq!(group.data["spec"]["minMember"], 2, "{group:?}");
    assert_eq!(group.data["spec"]["scheduleTimeoutSeconds"], 30);
    assert!(
        group.data["spec"]["minResources"]["cpu"].is_string(),
        "{group:?}"
    );
    let pods = job_pods(&e.cluster, "cosched").await;
    assert_eq!(pods.len(), 2);
    for pod in &pods {
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(
            labels
                .get("scheduling.x-k8s.io/pod-group")
                .map(String::as_str),
            Some("cosched-gang")
        );
        assert!(
            group.metadata.creation_timestamp <= pod.metadata.creation_timestamp,
            "the group exists before its pods"
        );
    }
    let j = wait_job(&e.cluster, "cosched", TRAIN, "Succeeded", |j| {
        phase(j).is_some_and(JobPhase::is_finished)
    })
    .await;
    assert_eq!(phase(&j), Some(JobPhase::Succeeded), "{:?}", j.status);
    e.cluster.shutdown().await;
}
