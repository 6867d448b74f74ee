//! Local control-plane harness for end-to-end tests of the finetune operator.
//!
//! [`Cluster::start`] runs a real Kubernetes v1.20.2 control plane on the local machine — etcd,
//! kube-apiserver, kube-controller-manager (garbage collector, service-account, PV binder and pod GC
//! controllers) and kube-scheduler, all as host processes — plus one **simulated** node agent per
//! [`NodeSpec`]. The simulated node agent ([`sim_node`]) is a stand-in for a kubelet: it registers a
//! Node with GPU capacity (`nvidia.com/gpu`), keeps it Ready, and runs the pods the real scheduler
//! binds to it as local processes, mapping container images to host executables through an
//! [`ImageMap`]. Nothing here is a container runtime: there is no image, no cgroup and no network
//! namespace, but each pod gets its own loopback address and (when running as root) its own mount
//! namespace in which its volumes appear at the pod spec's mount paths.
//!
//! The Kubernetes binaries are built once from Debian's source package into
//! `~/.cache/finetune-operator/k8s-v1.20.2/` by `scripts/build-kube.sh` (see [`binaries`]);
//! `KUBE_BIN_DIR` points at other binaries instead.
//!
//! ```no_run
//! # async fn demo() -> Result<(), finetune_e2e::Error> {
//! use finetune_e2e::{Cluster, ClusterOptions, ImageMap, ImageSpec, NodeSpec};
//! let images = ImageMap::default()
//!     .with("ghcr.io/finetune-operator/trainer", ImageSpec::entrypoint(["/path/to/finetune-trainer"]));
//! let cluster = Cluster::start(ClusterOptions {
//!     nodes: vec![NodeSpec::gpu("gpu-node-0", 2)],
//!     images,
//!     ..ClusterOptions::default()
//! })
//! .await?;
//! let client = cluster.client();
//! # let _ = client;
//! cluster.shutdown().await;
//! # Ok(()) }
//! ```

pub mod binaries;
pub mod cluster;
pub mod dns;
pub mod error;
pub mod images;
pub mod operator;
pub mod packaging;
mod process;
mod provisioner;
pub mod proxy;
pub mod sim_node;

pub use cluster::{Cluster, ClusterOptions};
pub use error::Error;
pub use images::{ImageMap, ImageSpec};
pub use nix::sys::signal::Signal;
pub use sim_node::NodeSpec;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
