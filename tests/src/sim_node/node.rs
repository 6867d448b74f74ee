//! The node itself: registration with capacity and labels, Ready heartbeats, the Lease in
//! `kube-node-lease`, and the not-ready/unreachable taints (the fault hooks of
//! [`Cluster`](crate::Cluster) flip them through [`NodeControl`]).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;

use super::{GPU_RESOURCE, NodeSpec, SIMULATED_LABEL, now};
use crate::error::is_status;
use crate::{Error, Result};

const HEARTBEAT: Duration = Duration::from_secs(10);
const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";

/// Whether a Node has condition Ready=True and no not-ready/unreachable taint.
pub fn node_is_ready(node: &Node) -> bool {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| {
            ts.iter()
                .any(|t| t.key == NOT_READY_TAINT || t.key == UNREACHABLE_TAINT)
        });
    ready && !tainted
}

/// Control over a node's readiness, usable without holding the node list.
#[derive(Clone)]
pub(crate) struct NodeControl {
    /// Node name.
    pub(super) name: String,
    /// Client of the cluster's API server.
    pub(super) client: Client,
    /// Whether the heartbeat loop posts Ready status (`false`: the node looks dead).
    pub(super) ready: Arc<watch::Sender<bool>>,
}

impl NodeControl {
    /// Makes the node Ready again (status and taints), or marks it Unknown and unreachable and
    /// stops its heartbeats, as the node-lifecycle controller would for a node gone silent.
    pub(crate) async fn set_ready(&self, ready: bool) -> Result<()> {
        self.ready.send_replace(ready);
        if ready {
            register_status(&self.client, &self.name, None).await?;
            set_taints(&self.client, &self.name, false).await
        } else {
            let nodes: Api<Node> = Api::all(self.client.clone());
            let t = now();
            let conds: Vec<_> = ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"]
                .iter()
                .map(|c| {
                    json!({"type": c, "status": "Unknown", "reason": "NodeStatusUnknown",
                        "message": "Simulated node agent stopped posting node status (fault hook).",
                        "lastTransitionTime": t, "lastHeartbeatTime": t})
                })
                .collect();
            nodes
                .patch_status(
                    &self.name,
                    &PatchParams::default(),
                    &Patch::Strategic(json!({"status": {"conditions": conds}})),
                )
                .await?;
            set_taints(&self.client, &self.name, true).await
        }
    }
}

/// The InternalIP of node `index`: `127.(index+1).0.1` (see "Pod network" in the module doc).
pub(super) fn node_ip(index: usize) -> String {
    format!("127.{}.0.1", (index % 254) + 1)
}

/// Registers the node, then posts status and renews its Lease every 10 s while `ready` is set.
pub(super) async fn heartbeat_loop(
    client: Client,
    spec: NodeSpec,
    index: usize,
    ready: watch::Receiver<bool>,
) {
    let mut registered = false;
    loop {
        if *ready.borrow() {
            let r = if registered {
                heartbeat(&client, &spec.name).await
            } else {
                register(&client, &spec, index).await
            };
            match r {
                Ok(()) => registered = true,
                Err(e) => tracing::debug!("sim node {}: status update failed: {e}", spec.name),
            }
        }
        let period = if registered {
            HEARTBEAT
        } else {
            Duration::from_secs(1)
        };
        tokio::time::sleep(period).await;
    }
}

async fn register(client: &Client, spec: &NodeSpec, index: usize) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut labels = spec.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), spec.name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), "amd64".into());
    labels.insert(SIMULATED_LABEL.into(), "true".into());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": spec.name, "labels": labels},
        "spec": {}
    }))
    .map_err(|e| Error::ControlPlane(format!("node object: {e}")))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(e) if is_status(&e, 409) => {}
        Err(e) => return Err(e.into()),
    }
    register_status(client, &spec.name, Some((spec, index))).await?;
    set_taints(client, &spec.name, false).await?;
    renew_lease(client, &spec.name).await
}

/// Posts Ready conditions (and, at registration, capacity, addresses and node info).
async fn register_status(
    client: &Client,
    name: &str,
    full: Option<(&NodeSpec, usize)>,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let t = now();
    let cond = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": t, "lastTransitionTime": t})
    };
    let mut status = json!({
        "conditions": [
            cond("Ready", "True", "KubeletReady", "simulated node agent is posting ready status"),
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "simulated"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "simulated"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "simulated"),
        ]
    });
    if let Some((spec, index)) = full {
        let resources = json!({
            "cpu": spec.cpu, "memory": spec.memory, "pods": spec.pods.to_string(),
            "ephemeral-storage": "100Gi", GPU_RESOURCE: spec.gpus.to_string()
        });
        status["capacity"] = resources.clone();
        status["allocatable"] = resources;
        status["addresses"] = json!([
            {"type": "InternalIP", "address": node_ip(index)},
            {"type": "Hostname", "address": spec.name}
        ]);
        status["daemonEndpoints"] = json!({"kubeletEndpoint": {"Port": 0}});
        status["nodeInfo"] = json!({
            "machineID": format!("sim-{}", spec.name), "systemUUID": format!("sim-{}", spec.name),
            "bootID": format!("sim-{}", spec.name), "kernelVersion": "simulated",
            "osImage": "finetune-e2e simulated node", "containerRuntimeVersion": "finetune-sim://0.1.0",
            "kubeletVersion": "v1.20.2-sim", "kubeProxyVersion": "v1.20.2-sim",
            "operatingSystem": "linux", "architecture": "amd64"
        });
    }
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": status})),
        )
        .await?;
    Ok(())
}

async fn heartbeat(client: &Client, name: &str) -> Result<()> {
    register_status(client, name, None).await?;
    renew_lease(client, name).await
}

/// Removes (`unreachable == false`) the not-ready/unreachable taints, or adds the unreachable ones.
async fn set_taints(client: &Client, name: &str, unreachable: bool) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get(name).await?;
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    let mut kept: Vec<_> = taints
        .iter()
        .filter(|t| t.key != NOT_READY_TAINT && t.key != UNREACHABLE_TAINT)
        .map(|t| serde_json::to_value(t).unwrap_or_default())
        .collect();
    if unreachable {
        let t = now();
        kept.push(json!({"key": UNREACHABLE_TAINT, "effect": "NoSchedule"}));
        kept.push(json!({"key": UNREACHABLE_TAINT, "effect": "NoExecute", "timeAdded": t}));
    } else if kept.len() == taints.len() {
        return Ok(());
    }
    nodes
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": kept}})),
        )
        .await?;
    Ok(())
}

async fn renew_lease(client: &Client, name: &str) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let renew = MicroTime(Timestamp::now());
    let patch =
        json!({"spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": renew}});
    match leases
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 404) => {
            let node = Api::<Node>::all(client.clone()).get(name).await?;
            let lease: Lease = serde_json::from_value(json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease", "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": name,
                    "uid": node.metadata.uid.unwrap_or_default()
                }]},
                "spec": patch["spec"]
            }))
            .map_err(|e| Error::ControlPlane(format!("lease object: {e}")))?;
            match leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(()),
                Err(e) if is_status(&e, 409) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}
