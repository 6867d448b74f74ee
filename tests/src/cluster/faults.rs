//! The fault hooks of [`Cluster`]: signals to containers (an OOM kill, say), a node that stops
//! posting status or dies, and a kube-apiserver that stops, freezes or restarts.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::DeleteParams;
use nix::sys::signal::Signal;

use super::{Cluster, tail};
use crate::error::is_status;
use crate::process::ManagedProcess;
use crate::sim_node::NodeHandle;
use crate::{Error, Result};

impl Cluster {
    /// Fault hook: sends `signal` to a running container's process group. The container ends
    /// with exit code 128 + signal number (137 → reason `OOMKilled`).
    pub fn kill_container(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        signal: Signal,
    ) -> Result<()> {
        self.shared
            .signal_container(namespace, pod, container, signal, None)
    }

    /// Fault hook: kills a running container (SIGKILL) and reports it as exited with `exit_code`
    /// (e.g. 137 to simulate the OOM killer).
    pub fn fail_container(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        exit_code: i32,
    ) -> Result<()> {
        self.shared
            .signal_container(namespace, pod, container, Signal::SIGKILL, Some(exit_code))
    }

    /// Fault hook: makes a node NotReady (`ready == false`: heartbeats stop, condition Ready becomes
    /// `Unknown`, the `node.kubernetes.io/unreachable` taints are added; its processes keep
    /// running, as in a network partition) or Ready again.
    pub async fn set_node_ready(&self, node: &str, ready: bool) -> Result<()> {
        let handle = self
            .lock_nodes()
            .iter()
            .find(|h| h.name() == node)
            .map(NodeHandle::clone_control)
            .ok_or_else(|| Error::NotFound(format!("node {node}")))?;
        handle.set_ready(ready).await
    }

    /// Fault hook: the node's agent dies with its pods' processes and the Node object is deleted
    /// (the pod garbage collector then deletes its pods).
    pub async fn delete_node(&self, node: &str) -> Result<()> {
        let handle = {
            let mut nodes = self.lock_nodes();
            let pos = nodes
                .iter()
                .position(|h| h.name() == node)
                .ok_or_else(|| Error::NotFound(format!("node {node}")))?;
            nodes.remove(pos)
        };
        handle.stop();
        match Api::<Node>::all(self.client.clone())
            .delete(node, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Fault hook: stops kube-apiserver (SIGTERM, then SIGKILL after 10 s; a frozen one is
    /// thawed first so that it can exit).
    pub fn stop_apiserver(&self) {
        let proc = self.lock_apiserver().take();
        if let Some(mut p) = proc {
            let _ = p.signal(Signal::SIGCONT);
            p.stop(Duration::from_secs(10));
        }
    }

    /// Fault hook: freezes kube-apiserver with SIGSTOP. Its port still accepts connections (the
    /// kernel completes the handshakes) but nothing is answered: clients hang, as behind a dead
    /// load balancer, until [`Cluster::thaw_apiserver`].
    pub fn freeze_apiserver(&self) -> Result<()> {
        self.lock_apiserver()
            .as_ref()
            .ok_or_else(|| Error::ControlPlane("kube-apiserver is not running".into()))?
            .signal(Signal::SIGSTOP)
    }

    /// `Some(status)` when the kube-apiserver the harness started has exited by itself (e.g. a
    /// fatal PostStartHook), with its log's path and tail.
    pub fn apiserver_exited(&self) -> Option<String> {
        let mut guard = self.lock_apiserver();
        let status = guard.as_mut().and_then(ManagedProcess::exited)?;
        let (path, log) = guard
            .as_ref()
            .map(|p| (p.log().display().to_string(), tail(p.log(), 20)))
            .unwrap_or_default();
        Some(format!("{status}; log: {path}\n{log}"))
    }

    /// Fault hook: resumes a frozen kube-apiserver (SIGCONT).
    pub fn thaw_apiserver(&self) -> Result<()> {
        self.lock_apiserver()
            .as_ref()
            .ok_or_else(|| Error::ControlPlane("kube-apiserver is not running".into()))?
            .signal(Signal::SIGCONT)
    }

    /// Fault hook: starts kube-apiserver again (same port, same etcd, same extra flags) and waits
    /// until it serves.
    pub async fn start_apiserver(&self) -> Result<()> {
        if self.lock_apiserver().is_none() {
            self.spawn_apiserver()?;
        }
        self.wait_apiserver_ready(Instant::now() + Duration::from_secs(120))
            .await
    }

    /// Fault hook: [`Cluster::stop_apiserver`] then [`Cluster::start_apiserver`].
    pub async fn restart_apiserver(&self) -> Result<()> {
        self.stop_apiserver();
        self.start_apiserver().await
    }
}
