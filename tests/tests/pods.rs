//! Pods on the simulated GPU node, run by the real scheduler and garbage collector.
//!
//! All tests share one cluster (started on first use, each test in its own namespace). The
//! cluster lives in a static; its processes are stopped by the cluster's reaper when this test
//! process exits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::LazyLock;
use std::time::Duration;

use common::*;
use finetune_e2e::{Cluster, ClusterOptions, NodeSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Event, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service,
};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
});
static CLUSTER: tokio::sync::OnceCell<Cluster> = tokio::sync::OnceCell::const_new();

async fn cluster() -> &'static Cluster {
    CLUSTER
        .get_or_init(|| async {
            Cluster::start(ClusterOptions {
                nodes: vec![NodeSpec::gpu("sim-gpu-0", 2)],
                ..ClusterOptions::default()
            })
            .await
            .expect("cluster starts")
        })
        .await
}

async fn setup(ns: &str) -> (&'static Cluster, Client, Api<Pod>) {
    let c = cluster().await;
    let client = c.client();
    c.create_namespace(ns).await.expect("namespace");
    (c, client.clone(), Api::namespaced(client, ns))
}

#[test]
fn failing_pod_reports_exit_code_log_and_termination_message() {
    RT.block_on(async {
        let (c, _, pods) = setup("exit-code").await;
        let p = shell_pod("fail", "echo hi; echo oops > /dev/termination-log; exit 3");
        pods.create(&PostParams::default(), &p).await.unwrap();
        let pod = wait_phase(&pods, "fail", &["Failed", "Succeeded"]).await;
        assert_eq!(
            pod.status.as_ref().unwrap().phase.as_deref(),
            Some("Failed")
        );
        let st = main_status(&pod);
        let term = st.state.unwrap().terminated.expect("terminated");
        assert_eq!(term.exit_code, 3);
        assert_eq!(term.reason.as_deref(), Some("Error"));
        assert_eq!(term.message.as_deref().map(str::trim), Some("oops"));
        assert_eq!(st.restart_count, 0);
        let log = c.pod_log("exit-code", "fail", "main").unwrap();
        assert!(log.contains("hi"), "log: {log:?}");
        let ip = pod.status.unwrap().pod_ip.unwrap();
        assert!(ip.starts_with("127."), "pod IP {ip}");

        // Exit 0 → Succeeded/Completed.
        pods.create(&PostParams::default(), &shell_pod("ok", "exit 0"))
            .await
            .unwrap();
        let pod = wait_phase(&pods, "ok", &["Failed", "Succeeded"]).await;
        assert_eq!(
            pod.status.as_ref().unwrap().phase.as_deref(),
            Some("Succeeded")
        );
        let term = main_status(&pod).state.unwrap().terminated.unwrap();
        assert_eq!(
            (term.exit_code, term.reason.as_deref()),
            (0, Some("Completed"))
        );
    });
}

#[test]
fn gpu_requests_are_scheduled_by_the_real_scheduler() {
    RT.block_on(async {
        let (_, client, pods) = setup("gpus").await;
        let gpu_pod = |name: &str, gpus: u32| {
            pod(json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                "spec": {"restartPolicy": "Never", "containers": [{
                    "name": "main", "image": "busybox", "command": ["/bin/sh", "-c", "echo gpu; sleep 1"],
                    "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}
                }]}
            }))
        };
        pods.create(&PostParams::default(), &gpu_pod("too-big", 4)).await.unwrap();
        pods.create(&PostParams::default(), &gpu_pod("fits", 1)).await.unwrap();
        let fits = wait_phase(&pods, "fits", &["Succeeded"]).await;
        assert_eq!(fits.spec.unwrap().node_name.as_deref(), Some("sim-gpu-0"));

        let events: Api<Event> = Api::namespaced(client, "gpus");
        let ev = wait_for(LONG, "FailedScheduling event", || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some("FailedScheduling")
                    && e.involved_object.name.as_deref() == Some("too-big")
            })
        })
        .await;
        assert!(ev.message.unwrap_or_default().contains("nvidia.com/gpu"));
        let big = pods.get("too-big").await.unwrap();
        assert_eq!(big.status.as_ref().unwrap().phase.as_deref(), Some("Pending"));
        assert!(big.spec.unwrap().node_name.is_none());
    });
}

const SERVER: &str = r#"
import os, socket, sys, threading, time
ip = os.environ["POD_IP"]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((ip, 8080)); srv.listen(8)
def serve():
    while True:
        c, _ = srv.accept(); c.sendall(os.environ["POD_NAME"].encode()); c.close()
threading.Thread(target=serve, daemon=True).start()
print("listening on", ip, flush=True)
peer_file = "/shared/peer-of-" + os.environ["POD_NAME"]
deadline = time.time() + 100
while not os.path.exists(peer_file) and time.time() < deadline: time.sleep(0.2)
peer = open(peer_file).read().strip()
s = socket.create_connection((peer, 8080), timeout=10)
print("peer says", s.recv(100).decode(), flush=True)
time.sleep(3)
"#;

#[test]
fn two_pods_listen_on_the_same_port_and_answer_each_other() {
    RT.block_on(async {
        let (c, _, pods) = setup("net").await;
        let shared = c.dir().join("net-shared");
        std::fs::create_dir_all(&shared).unwrap();
        for name in ["alpha", "beta"] {
            let p = pod(json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                "spec": {"restartPolicy": "Never", "containers": [{
                    "name": "main", "image": "python:3.11", "command": ["python3", "-c", SERVER],
                    "env": [
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
                    ],
                    "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]
                }],
                "volumes": [{"name": "shared", "hostPath": {"path": shared.display().to_string()}}]}
            }));
            pods.create(&PostParams::default(), &p).await.unwrap();
        }
        let mut ips = Vec::new();
        for name in ["alpha", "beta"] {
            let pod = wait_phase(&pods, name, &["Running", "Failed", "Succeeded"]).await;
            ips.push(pod.status.unwrap().pod_ip.unwrap());
        }
        assert_ne!(ips[0], ips[1]);
        // Both listen on port 8080 of their own IP: the host can reach each.
        for (ip, name) in ips.iter().zip(["alpha", "beta"]) {
            let got = wait_for(LONG, &format!("{name} answers on {ip}:8080"), || async {
                use tokio::io::AsyncReadExt;
                let mut s = tokio::net::TcpStream::connect((ip.as_str(), 8080)).await.ok()?;
                let mut buf = String::new();
                s.read_to_string(&mut buf).await.ok()?;
                Some(buf)
            })
            .await;
            assert_eq!(got, name);
        }
        std::fs::write(shared.join("peer-of-alpha"), &ips[1]).unwrap();
        std::fs::write(shared.join("peer-of-beta"), &ips[0]).unwrap();
        for (name, peer) in [("alpha", "beta"), ("beta", "alpha")] {
            let pod = wait_phase(&pods, name, &["Succeeded", "Failed"]).await;
            let log = c.pod_log("net", name, "main").unwrap();
            assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Succeeded"), "log: {log}");
            assert!(log.contains(&format!("peer says {peer}")), "log of {name}: {log}");
        }
    });
}

#[test]
fn deleting_the_owner_deletes_owned_pods_through_the_garbage_collector() {
    RT.block_on(async {
        let (c, client, pods) = setup("gc").await;
        let cms: Api<ConfigMap> = Api::namespaced(client, "gc");
        let owner: ConfigMap = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}, "data": {}
        }))
        .unwrap();
        let owner = cms.create(&PostParams::default(), &owner).await.unwrap();
        let mut p = shell_pod("owned", "echo pid $$$$; exec sleep 600");
        p.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: "owner".into(),
                uid: owner.metadata.uid.clone().unwrap(),
                ..Default::default()
            },
        ]);
        pods.create(&PostParams::default(), &p).await.unwrap();
        wait_phase(&pods, "owned", &["Running"]).await;
        let pid: i32 = wait_for(LONG, "pid in log", || async {
            let log = c.pod_log("gc", "owned", "main").ok()?;
            log.lines()
                .find_map(|l| l.strip_prefix("pid ")?.trim().parse().ok())
        })
        .await;
        assert!(pid_alive(pid));
        cms.delete("owner", &DeleteParams::background())
            .await
            .unwrap();
        wait_gone(&pods, "owned").await;
        wait_for(LONG, "pod process gone", || async {
            (!pid_alive(pid)).then_some(())
        })
        .await;
    });
}

#[test]
fn env_sources_volumes_and_working_dir_reach_the_process() {
    RT.block_on(async {
        let (c, client, pods) = setup("env").await;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), "env");
        let s: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf"},
            "stringData": {"token": "s3cret"}
        }))
        .unwrap();
        secrets.create(&PostParams::default(), &s).await.unwrap();
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "env");
        let cm: ConfigMap = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
            "data": {"lr": "0.001", "config.yaml": "epochs: 2\n"}
        }))
        .unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "env");
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ckpt"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
        }))
        .unwrap();
        claims.create(&PostParams::default(), &pvc).await.unwrap();
        let script = "echo name=$POD_NAME ns=$POD_NS ip=$POD_IP token=$TOKEN lr=$LR expanded=$EXPANDED; \
                      pwd; cat /sim-e2e/config/config.yaml; echo saved > /sim-e2e/ckpt/step-1; \
                      ls /sim-e2e/scratch && echo scratch-ok; cat $ARGFILE";
        let p = pod(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "envpod", "labels": {"app": "x"}},
            "spec": {"restartPolicy": "Never",
                "initContainers": [{"name": "init", "image": "busybox", "command": ["/bin/sh", "-c", "echo from-init > /sim-e2e/scratch/init.txt"],
                    "volumeMounts": [{"name": "scratch", "mountPath": "/sim-e2e/scratch"}]}],
                "containers": [{
                "name": "main", "image": "busybox", "command": ["/bin/sh", "-c", script],
                "workingDir": "/sim-e2e/ckpt",
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                    {"name": "LR", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "lr"}}},
                    {"name": "EXPANDED", "value": "lr-$(LR)"},
                    {"name": "ARGFILE", "value": "/sim-e2e/scratch/init.txt"}
                ],
                "volumeMounts": [
                    {"name": "config", "mountPath": "/sim-e2e/config", "readOnly": true},
                    {"name": "ckpt", "mountPath": "/sim-e2e/ckpt"},
                    {"name": "scratch", "mountPath": "/sim-e2e/scratch"}
                ]}],
                "volumes": [
                    {"name": "config", "configMap": {"name": "cfg"}},
                    {"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt"}},
                    {"name": "scratch", "emptyDir": {}}
                ]}
        }));
        pods.create(&PostParams::default(), &p).await.unwrap();
        let pod = wait_phase(&pods, "envpod", &["Succeeded", "Failed"]).await;
        let log = c.pod_log("env", "envpod", "main").unwrap();
        assert_eq!(pod.status.as_ref().unwrap().phase.as_deref(), Some("Succeeded"), "log: {log}");
        let ip = pod.status.as_ref().unwrap().pod_ip.clone().unwrap();
        assert!(
            log.contains(&format!("name=envpod ns=env ip={ip} token=s3cret lr=0.001 expanded=lr-0.001")),
            "log: {log}"
        );
        assert!(log.contains("/sim-e2e/ckpt\n"), "workingDir: {log}");
        assert!(log.contains("epochs: 2"), "configMap volume: {log}");
        assert!(log.contains("scratch-ok") && log.contains("from-init"), "emptyDir shared with init: {log}");
        let init = &pod.status.as_ref().unwrap().init_container_statuses.as_ref().unwrap()[0];
        assert_eq!(init.state.as_ref().unwrap().terminated.as_ref().unwrap().reason.as_deref(), Some("Completed"));
        // The claim was bound to a provisioned volume whose host directory holds what the pod wrote.
        let claim = claims.get("ckpt").await.unwrap();
        let pv_name = claim.spec.unwrap().volume_name.unwrap();
        let pv = Api::<PersistentVolume>::all(client).get(&pv_name).await.unwrap();
        let host = pv.spec.unwrap().host_path.unwrap().path;
        let saved = std::fs::read_to_string(std::path::Path::new(&host).join("step-1")).unwrap();
        assert_eq!(saved.trim(), "saved");
        // The mount was private to the pod: nothing was written to the host's /sim-e2e/ckpt.
        assert!(!std::path::Path::new("/sim-e2e/ckpt/step-1").exists());
    });
}

#[test]
fn oom_kill_restarts_and_missing_images_are_reported() {
    RT.block_on(async {
        let (c, _, pods) = setup("faults").await;
        // OnFailure: first run fails (no marker yet in the emptyDir), second succeeds.
        let p = pod(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "flaky"},
            "spec": {"restartPolicy": "OnFailure", "containers": [{
                "name": "main", "image": "busybox", "command": ["/bin/sh", "-c",
                    "if [ -e /work/marker ]; then echo second; exit 0; fi; touch /work/marker; echo first; exit 1"],
                "volumeMounts": [{"name": "w", "mountPath": "/work"}]}],
                "volumes": [{"name": "w", "emptyDir": {}}]}
        }));
        pods.create(&PostParams::default(), &p).await.unwrap();
        let flaky = wait_phase(&pods, "flaky", &["Succeeded", "Failed"]).await;
        let st = main_status(&flaky);
        assert_eq!(flaky.status.unwrap().phase.as_deref(), Some("Succeeded"));
        assert_eq!(st.restart_count, 1);
        assert_eq!(st.last_state.unwrap().terminated.unwrap().exit_code, 1);

        // Fault hook: the "OOM killer" ends a running container with 137.
        pods.create(&PostParams::default(), &shell_pod("hog", "exec sleep 600")).await.unwrap();
        wait_phase(&pods, "hog", &["Running"]).await;
        c.fail_container("faults", "hog", "main", 137).unwrap();
        let hog = wait_phase(&pods, "hog", &["Failed"]).await;
        let term = main_status(&hog).state.unwrap().terminated.unwrap();
        assert_eq!((term.exit_code, term.reason.as_deref()), (137, Some("OOMKilled")));

        // Fault hook: a signal.
        pods.create(&PostParams::default(), &shell_pod("sig", "exec sleep 600")).await.unwrap();
        wait_phase(&pods, "sig", &["Running"]).await;
        c.kill_container("faults", "sig", "main", finetune_e2e::Signal::SIGINT).unwrap();
        let sig = wait_phase(&pods, "sig", &["Failed"]).await;
        assert_eq!(main_status(&sig).state.unwrap().terminated.unwrap().exit_code, 130);

        // An image missing from the image map: ErrImagePull, pod stays Pending.
        let p = pod(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "noimage"},
            "spec": {"containers": [{"name": "main", "image": "example.com/nope:1"}]}
        }));
        pods.create(&PostParams::default(), &p).await.unwrap();
        let reason = wait_for(LONG, "ErrImagePull", || async {
            let pod = pods.get("noimage").await.ok()?;
            let w = try_main_status(&pod)?.state?.waiting?;
            w.reason.filter(|r| r == "ErrImagePull" || r == "ImagePullBackOff")
        })
        .await;
        assert!(!reason.is_empty());
        let events: Api<Event> = Api::namespaced(c.client(), "faults");
        wait_for(LONG, "Failed event from the sim-kubelet", || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .into_iter()
                .find(|e| {
                    e.involved_object.name.as_deref() == Some("noimage")
                        && e.reason.as_deref() == Some("Failed")
                        && e.source.as_ref().and_then(|s| s.component.as_deref()) == Some("sim-kubelet")
                })
                .map(|_| ())
        })
        .await;
        assert_eq!(pods.get("noimage").await.unwrap().status.unwrap().phase.as_deref(), Some("Pending"));
    });
}

#[test]
fn deletion_honours_the_grace_period() {
    RT.block_on(async {
        let (c, _, pods) = setup("grace").await;
        // Handles SIGTERM: exits promptly after logging it.
        let p = shell_pod(
            "polite",
            "trap 'echo got-term; exit 0' TERM; echo up; while true; do sleep 0.2; done",
        );
        pods.create(&PostParams::default(), &p).await.unwrap();
        wait_phase(&pods, "polite", &["Running"]).await;
        wait_for(LONG, "polite up", || async {
            c.pod_log("grace", "polite", "main")
                .ok()?
                .contains("up")
                .then_some(())
        })
        .await;
        pods.delete("polite", &DeleteParams::default())
            .await
            .unwrap();
        wait_gone(&pods, "polite").await;
        let log = c.pod_log("grace", "polite", "main").unwrap();
        assert!(log.contains("got-term"), "log: {log}");

        // Ignores SIGTERM: killed once its 3 s grace period is over, not before.
        let mut p = shell_pod(
            "stubborn",
            "trap '' TERM; echo pid $$$$; while true; do sleep 0.2; done",
        );
        p.spec.as_mut().unwrap().termination_grace_period_seconds = Some(3);
        pods.create(&PostParams::default(), &p).await.unwrap();
        wait_phase(&pods, "stubborn", &["Running"]).await;
        let pid: i32 = wait_for(LONG, "pid in log", || async {
            let log = c.pod_log("grace", "stubborn", "main").ok()?;
            log.lines()
                .find_map(|l| l.strip_prefix("pid ")?.trim().parse().ok())
        })
        .await;
        let t0 = std::time::Instant::now();
        pods.delete("stubborn", &DeleteParams::default())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(pid_alive(pid), "killed before the grace period ended");
        wait_gone(&pods, "stubborn").await;
        assert!(t0.elapsed() >= Duration::from_secs(3));
        wait_for(LONG, "process gone", || async {
            (!pid_alive(pid)).then_some(())
        })
        .await;
    });
}

#[test]
fn env_from_projected_and_secret_volumes_and_missing_sources_behave_like_a_kubelet() {
    RT.block_on(async {
        let (c, client, pods) = setup("env-from").await;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), "env-from");
        let s: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
            "stringData": {"token": "s3cret", "shared": "from-secret"}
        }))
        .unwrap();
        secrets.create(&PostParams::default(), &s).await.unwrap();
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "env-from");
        for (name, data) in [
            ("settings", json!({"lr": "0.01", "shared": "from-cm"})),
            ("files", json!({"config.yaml": "epochs: 3\n", "other": "not projected"})),
        ] {
            let cm: ConfigMap = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data
            }))
            .unwrap();
            cms.create(&PostParams::default(), &cm).await.unwrap();
        }
        // envFrom (a later source wins, prefixes, an optional missing source), optional missing
        // keys, a projected volume (ConfigMap items, Secret items, downward API, an optional
        // missing ConfigMap) and a Secret volume.
        let script = "echo lr=$lr cm_lr=$CM_lr shared=$shared token=$token nope=${NOPE-unset} absent=${ABSENT-unset}; \
                      cat /sim-e2e/proj/conf/epochs.yaml; echo; ls /sim-e2e/proj; \
                      echo proj-token=$(cat /sim-e2e/proj/token) proj-name=$(cat /sim-e2e/proj/name); \
                      echo secret-token=$(cat /sim-e2e/secret/token)";
        let p = pod(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "fromenv"},
            "spec": {"restartPolicy": "Never", "containers": [{
                "name": "main", "image": "busybox", "command": ["/bin/sh", "-c", script],
                "envFrom": [
                    {"configMapRef": {"name": "settings"}},
                    {"configMapRef": {"name": "settings"}, "prefix": "CM_"},
                    {"secretRef": {"name": "creds"}},
                    {"configMapRef": {"name": "absent", "optional": true}}
                ],
                "env": [
                    {"name": "NOPE", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nope", "optional": true}}},
                    {"name": "ABSENT", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "x", "optional": true}}}
                ],
                "volumeMounts": [
                    {"name": "proj", "mountPath": "/sim-e2e/proj", "readOnly": true},
                    {"name": "secret", "mountPath": "/sim-e2e/secret", "readOnly": true}
                ]}],
                "volumes": [
                    {"name": "proj", "projected": {"sources": [
                        {"configMap": {"name": "files", "items": [{"key": "config.yaml", "path": "conf/epochs.yaml"}]}},
                        {"secret": {"name": "creds", "items": [{"key": "token", "path": "token"}]}},
                        {"downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}},
                        {"configMap": {"name": "absent", "optional": true}}
                    ]}},
                    {"name": "secret", "secret": {"secretName": "creds"}}
                ]}
        }));
        pods.create(&PostParams::default(), &p).await.unwrap();
        let fromenv = wait_phase(&pods, "fromenv", &["Succeeded", "Failed"]).await;
        let log = c.pod_log("env-from", "fromenv", "main").unwrap();
        assert_eq!(fromenv.status.as_ref().unwrap().phase.as_deref(), Some("Succeeded"), "log: {log}");
        assert!(
            log.contains("lr=0.01 cm_lr=0.01 shared=from-secret token=s3cret nope=unset absent=unset"),
            "envFrom and optional keys: {log}"
        );
        assert!(log.contains("epochs: 3\n"), "projected ConfigMap item: {log}");
        assert!(log.contains("conf\nname\ntoken\n"), "projected items only: {log}");
        assert!(log.contains("proj-token=s3cret proj-name=fromenv"), "projected Secret and downward API: {log}");
        assert!(log.contains("secret-token=s3cret"), "Secret volume: {log}");

        // A missing key that is not optional: CreateContainerConfigError naming it.
        let p = pod(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nokey"},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [{
                "name": "main", "image": "busybox", "command": ["/bin/sh", "-c", "true"],
                "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nope"}}}]}]}
        }));
        pods.create(&PostParams::default(), &p).await.unwrap();
        let w = wait_for(LONG, "CreateContainerConfigError", || async {
            let pod = pods.get("nokey").await.ok()?;
            try_main_status(&pod)?.state?.waiting.filter(|w| w.reason.as_deref() == Some("CreateContainerConfigError"))
        })
        .await;
        assert_eq!(w.message.as_deref(), Some("couldn't find key nope in Secret env-from/creds"));

        // A missing ConfigMap volume that is not optional: the pod waits in ContainerCreating
        // with no message, and the cause is a FailedMount warning event.
        let p = pod(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nocm"},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [{
                "name": "main", "image": "busybox", "command": ["/bin/sh", "-c", "true"],
                "volumeMounts": [{"name": "cfg", "mountPath": "/sim-e2e/cfg"}]}],
                "volumes": [{"name": "cfg", "configMap": {"name": "absent"}}]}
        }));
        pods.create(&PostParams::default(), &p).await.unwrap();
        let events: Api<Event> = Api::namespaced(client.clone(), "env-from");
        let event = wait_for(LONG, "a FailedMount event", || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find(|e| {
                e.involved_object.name.as_deref() == Some("nocm") && e.reason.as_deref() == Some("FailedMount")
            })
        })
        .await;
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(
            event.message.as_deref(),
            Some("MountVolume.SetUp failed for volume \"cfg\" : configmap \"absent\" not found")
        );
        let w = try_main_status(&pods.get("nocm").await.unwrap()).unwrap().state.unwrap().waiting.unwrap();
        assert_eq!((w.reason.as_deref(), w.message.as_deref()), (Some("ContainerCreating"), None));
        assert_eq!(pods.get("nocm").await.unwrap().status.unwrap().phase.as_deref(), Some("Pending"));
        for name in ["nokey", "nocm"] {
            pods.delete(name, &DeleteParams::default()).await.unwrap();
            wait_gone(&pods, name).await;
        }
    });
}

#[test]
fn pods_of_a_headless_service_resolve_by_hostname_through_the_cluster_dns() {
    RT.block_on(async {
        let (c, client, pods) = setup("dns").await;
        let services: Api<Service> = Api::namespaced(client.clone(), "dns");
        let svc: Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "gang"},
            "spec": {"clusterIP": "None", "selector": {"app": "dns-test"},
                     "publishNotReadyAddresses": true, "ports": [{"port": 80}]}
        }))
        .unwrap();
        services.create(&PostParams::default(), &svc).await.unwrap();
        // The server pod is named by its hostname under the Service (its subdomain).
        let mut server = shell_pod("server", "sleep 60");
        let spec = server.spec.as_mut().unwrap();
        spec.hostname = Some("rank-0".into());
        spec.subdomain = Some("gang".into());
        server.metadata.labels = Some([("app".to_string(), "dns-test".to_string())].into());
        pods.create(&PostParams::default(), &server).await.unwrap();
        let ip = wait_phase(&pods, "server", &["Running"])
            .await
            .status
            .unwrap()
            .pod_ip
            .unwrap();
        // A client resolves the short name through the search path, as in a real cluster;
        // a name behind no Service, or whose pod is not behind it, does not resolve.
        let client_pod = shell_pod(
            "client",
            "getent hosts rank-0.gang; getent hosts rank-0.gang.dns.svc.cluster.local; \
             getent hosts rank-0.nothing || echo no-nothing; \
             getent hosts other.gang || echo no-other; cat /etc/resolv.conf",
        );
        pods.create(&PostParams::default(), &client_pod)
            .await
            .unwrap();
        wait_phase(&pods, "client", &["Succeeded", "Failed"]).await;
        let log = c.pod_log("dns", "client", "main").unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert!(lines[0].starts_with(&format!("{ip} ")), "{log}");
        assert!(lines[1].starts_with(&format!("{ip} ")), "{log}");
        assert!(
            log.contains("no-nothing") && log.contains("no-other"),
            "{log}"
        );
        assert!(
            log.contains("search dns.svc.cluster.local svc.cluster.local cluster.local"),
            "{log}"
        );
        for name in ["server", "client"] {
            pods.delete(name, &DeleteParams::default()).await.unwrap();
            wait_gone(&pods, name).await;
        }
    });
}
