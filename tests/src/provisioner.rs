//! A small volume provisioner for the simulated nodes: for every unbound PersistentVolumeClaim it
//! creates a host directory and a PersistentVolume pre-bound to the claim (`hostPath` pointing at
//! the directory); the real PV controller in kube-controller-manager then binds the pair. Released
//! volumes it made are deleted with their directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};

use crate::error::is_status;

/// Provisioner name recorded on the StorageClass and on the volumes it creates.
pub const PROVISIONER: &str = "finetune-e2e.sim/hostdir";

/// Runs until aborted, polling every second (robust across API-server restarts).
pub(crate) async fn run(client: Client, root: PathBuf) {
    loop {
        if let Err(e) = pass(&client, &root).await {
            tracing::debug!("provisioner pass failed: {e}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn pass(client: &Client, root: &Path) -> Result<(), kube::Error> {
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let pvs = volumes.list(&ListParams::default()).await?;
    for pvc in claims.list(&ListParams::default()).await? {
        let (Some(ns), Some(name), Some(uid)) = (
            pvc.metadata.namespace.clone(),
            pvc.metadata.name.clone(),
            pvc.metadata.uid.clone(),
        ) else {
            continue;
        };
        let spec = pvc.spec.clone().unwrap_or_default();
        if pvc.metadata.deletion_timestamp.is_some() || spec.volume_name.is_some() {
            continue;
        }
        let pv_name = format!("pvc-{uid}");
        if pvs
            .items
            .iter()
            .any(|pv| pv.metadata.name.as_deref() == Some(&pv_name))
        {
            continue;
        }
        let dir = root.join(&pv_name);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!("provisioner: mkdir {}: {e}", dir.display());
            continue;
        }
        let _ = std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777));
        let storage = spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage").cloned())
            .unwrap_or_else(|| Quantity("1Gi".into()));
        let pv: PersistentVolume = match serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": pv_name,
                "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
                "labels": {"finetune-e2e/sim-volume": "true"}
            },
            "spec": {
                "capacity": {"storage": storage},
                "accessModes": spec.access_modes.clone().unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": spec.storage_class_name.clone().unwrap_or_default(),
                "volumeMode": spec.volume_mode.clone().unwrap_or_else(|| "Filesystem".into()),
                "hostPath": {"path": dir.display().to_string(), "type": "Directory"},
                "claimRef": {
                    "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "namespace": ns, "name": name, "uid": uid
                }
            }
        })) {
            Ok(pv) => pv,
            Err(e) => {
                tracing::warn!("provisioner: bad volume: {e}");
                continue;
            }
        };
        match volumes.create(&PostParams::default(), &pv).await {
            Ok(_) => tracing::debug!("provisioned {pv_name} for {ns}/{name}"),
            Err(e) if is_status(&e, 409) => {}
            Err(e) => return Err(e),
        }
    }
    for pv in pvs {
        let ours = pv
            .metadata
            .annotations
            .as_ref()
            .and_then(|a: &BTreeMap<String, String>| a.get("pv.kubernetes.io/provisioned-by"))
            .is_some_and(|p| p == PROVISIONER);
        let released = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
        if let (true, true, Some(name)) = (ours, released, pv.metadata.name.as_deref()) {
            match volumes.delete(name, &DeleteParams::default()).await {
                Ok(_) => {
                    let _ = std::fs::remove_dir_all(root.join(name));
                }
                Err(e) if is_status(&e, 404) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
