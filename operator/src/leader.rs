//! Leader election on a coordination.k8s.io Lease (kube-lease-manager). Only the leader runs
//! the controller; a follower takes over within the lease duration after the leader stops.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

use crate::{Error, Result};

/// Joins the election; returns a channel that is `true` while this replica leads.
pub async fn elect(
    client: Client,
    lease: &str,
    namespace: &str,
    identity: &str,
    duration: Duration,
) -> Result<watch::Receiver<bool>> {
    let secs = duration.as_secs().max(2);
    let manager = LeaseManagerBuilder::new(client, lease)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(secs)
        .with_grace((secs / 3).max(1))
        .build()
        .await
        .map_err(|e| Error::Leader(e.to_string()))?;
    let (rx, _task) = manager.watch().await;
    Ok(rx)
}
