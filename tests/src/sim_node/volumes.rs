//! A pod's volumes on the host: PersistentVolumeClaim → the directory of its bound
//! PersistentVolume, hostPath → the host path, emptyDir → an empty directory, and ConfigMap,
//! Secret, projected and downwardAPI volumes → files written under the pod's directory. The
//! ConfigMap and Secret reader ([`key_files`]) also serves `envFrom` and `valueFrom` (see
//! [`env`](super::env)).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, PersistentVolume, PersistentVolumeClaim, Secret,
    Volume,
};
use kube::{Api, Client};

use super::env::field_value;
use super::pods::PodCtx;

/// A volume's host location.
#[derive(Debug, Clone)]
pub(super) struct HostVolume {
    /// The host directory (or file) that appears at the volume's mount paths.
    pub(super) path: PathBuf,
}

/// Makes every volume of the pod exist on the host, by volume name. An error (a claim not bound
/// yet, a ConfigMap not there yet) is the message of a kubelet's `FailedMount` event; the caller
/// retries.
pub(super) async fn prepare_volumes(
    ctx: &PodCtx,
    volumes: &[Volume],
) -> Result<HashMap<String, HostVolume>, String> {
    let mut out = HashMap::new();
    for v in volumes {
        let path = set_up(ctx, v)
            .await
            .map_err(|e| format!("MountVolume.SetUp failed for volume \"{}\" : {e}", v.name))?;
        out.insert(v.name.clone(), HostVolume { path });
    }
    Ok(out)
}

/// Sets one volume up on the host: the path that appears at its mount paths.
async fn set_up(ctx: &PodCtx, v: &Volume) -> Result<PathBuf, String> {
    let client = ctx.shared.client.clone();
    let dir = ctx.dir.join("volumes").join(&v.name);
    let path = if let Some(pvc) = &v.persistent_volume_claim {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ctx.ns);
        let claim = claims
            .get(&pvc.claim_name)
            .await
            .map_err(|e| format!("claim {}: {e}", pvc.claim_name))?;
        let pv_name = claim
            .spec
            .and_then(|s| s.volume_name)
            .ok_or_else(|| format!("claim {} is not bound", pvc.claim_name))?;
        let pv = Api::<PersistentVolume>::all(client.clone())
            .get(&pv_name)
            .await
            .map_err(|e| format!("volume {pv_name}: {e}"))?;
        let host = pv
            .spec
            .and_then(|s| s.host_path)
            .map(|h| PathBuf::from(h.path))
            .ok_or_else(|| format!("volume {pv_name} has no hostPath"))?;
        std::fs::create_dir_all(&host).map_err(|e| format!("{}: {e}", host.display()))?;
        host
    } else if let Some(hp) = &v.host_path {
        let p = PathBuf::from(&hp.path);
        if hp.type_.as_deref() == Some("DirectoryOrCreate") {
            std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        p
    } else if v.empty_dir.is_some() {
        mkdir(&dir)?;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
        dir
    } else if let Some(cm) = &v.config_map {
        let files = key_files(
            ctx,
            KeySource::ConfigMap,
            &cm.name,
            cm.items.as_deref(),
            cm.optional,
        )
        .await?;
        write_files(&dir, &files, cm.default_mode)?;
        dir
    } else if let Some(sec) = &v.secret {
        let name = sec.secret_name.clone().unwrap_or_default();
        let files = key_files(
            ctx,
            KeySource::Secret,
            &name,
            sec.items.as_deref(),
            sec.optional,
        )
        .await?;
        write_files(&dir, &files, sec.default_mode.or(Some(0o644)))?;
        dir
    } else if let Some(proj) = &v.projected {
        let mut files = Vec::new();
        for src in proj.sources.as_deref().unwrap_or_default() {
            let config_map = src.config_map.as_ref();
            let secret = src.secret.as_ref();
            let keyed = [
                config_map.map(|c| (KeySource::ConfigMap, &c.name, &c.items, c.optional)),
                secret.map(|s| (KeySource::Secret, &s.name, &s.items, s.optional)),
            ];
            for (source, name, items, optional) in keyed.into_iter().flatten() {
                files.extend(key_files(ctx, source, name, items.as_deref(), optional).await?);
            }
            if let Some(d) = &src.downward_api {
                files.extend(downward_files(ctx, d.items.as_deref().unwrap_or_default()));
            }
        }
        write_files(&dir, &files, proj.default_mode)?;
        dir
    } else if let Some(d) = &v.downward_api {
        write_files(
            &dir,
            &downward_files(ctx, d.items.as_deref().unwrap_or_default()),
            d.default_mode,
        )?;
        dir
    } else {
        return Err(format!(
            "volume {}: type not supported by the simulated node",
            v.name
        ));
    };
    Ok(path)
}

/// `mkdir -p`, with the path in the error.
pub(super) fn mkdir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Files to write into a volume: path relative to the volume, contents, mode (`None`: the
/// volume's default mode).
pub(super) type Files = Vec<(String, Vec<u8>, Option<i32>)>;

fn select_items(
    all: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    what: &str,
) -> Result<Files, String> {
    match items {
        None => Ok(all.into_iter().map(|(k, v)| (k, v, None)).collect()),
        Some(items) => items
            .iter()
            .map(|i| {
                all.get(&i.key)
                    .map(|v| (i.path.clone(), v.clone(), i.mode))
                    .ok_or_else(|| format!("{what}: key {} not found", i.key))
            })
            .collect(),
    }
}

/// The kind of object a ConfigMap/Secret volume, projection, `envFrom` or `valueFrom` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeySource {
    /// A ConfigMap: its `data`, then its `binaryData`.
    ConfigMap,
    /// A Secret: its `data`, then its `stringData`.
    Secret,
}

impl KeySource {
    /// The kind as Kubernetes spells it (`ConfigMap`, `Secret`).
    pub(super) fn kind(self) -> &'static str {
        match self {
            Self::ConfigMap => "ConfigMap",
            Self::Secret => "Secret",
        }
    }

    /// The keys and values of object `ns/name` (a later field wins over an earlier one for the
    /// same key), or `None` when it does not exist.
    async fn read(
        self,
        client: &Client,
        ns: &str,
        name: &str,
    ) -> kube::Result<Option<BTreeMap<String, Vec<u8>>>> {
        Ok(match self {
            Self::ConfigMap => Api::<ConfigMap>::namespaced(client.clone(), ns)
                .get_opt(name)
                .await?
                .map(|cm| {
                    let data = cm.data.unwrap_or_default().into_iter();
                    let binary = cm.binary_data.unwrap_or_default().into_iter();
                    data.map(|(k, v)| (k, v.into_bytes()))
                        .chain(binary.map(|(k, v)| (k, v.0)))
                        .collect()
                }),
            Self::Secret => Api::<Secret>::namespaced(client.clone(), ns)
                .get_opt(name)
                .await?
                .map(|s| {
                    let data = s.data.unwrap_or_default().into_iter();
                    let strings = s.string_data.unwrap_or_default().into_iter();
                    data.map(|(k, v)| (k, v.0))
                        .chain(strings.map(|(k, v)| (k, v.into_bytes())))
                        .collect()
                }),
        })
    }
}

/// The files of the pod's ConfigMap or Secret `name`: one per key, or the `items` asked for (a missing
/// key is an error). A missing object is an error unless `optional`, then it has no files.
pub(super) async fn key_files(
    ctx: &PodCtx,
    source: KeySource,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
) -> Result<Files, String> {
    let what = source.kind().to_lowercase();
    match source.read(&ctx.shared.client, &ctx.ns, name).await {
        Ok(Some(all)) => select_items(all, items, &format!("{what} {name}")),
        Ok(None) if optional == Some(true) => Ok(Vec::new()),
        Ok(None) => Err(format!("{what} \"{name}\" not found")),
        Err(e) => Err(format!("{what} {name}: {e}")),
    }
}

fn downward_files(ctx: &PodCtx, items: &[DownwardAPIVolumeFile]) -> Files {
    items
        .iter()
        .filter_map(|i| {
            let value = i
                .field_ref
                .as_ref()
                .map(|f| field_value(ctx, &f.field_path))?;
            Some((i.path.clone(), value.into_bytes(), i.mode))
        })
        .collect()
}

fn write_files(dir: &Path, files: &Files, default_mode: Option<i32>) -> Result<(), String> {
    mkdir(dir)?;
    for (rel, data, mode) in files {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            mkdir(parent)?;
        }
        std::fs::write(&p, data).map_err(|e| format!("{}: {e}", p.display()))?;
        let mode = mode.or(default_mode).unwrap_or(0o644);
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode.unsigned_abs()));
    }
    Ok(())
}
