//! Where each input and output of a job lives inside the trainer pod, and which volumes and
//! download init steps put it there.

use finetune_api::fit::{processes_per_pod, world_size};
use finetune_api::source::{Source, SourceKind};
use finetune_api::{DatasetFormat, FineTuneJob, TrainerPaths};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, KeyToPath,
    PersistentVolumeClaimVolumeSource, ResourceRequirements, SecretKeySelector, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::BuildSettings;
use super::pod::restricted_container_security;
use crate::names;
use crate::{Error, Result};

/// Every path the trainer sees is under this directory.
pub const MOUNT_ROOT: &str = "/var/lib/finetune";
/// Mount path of the trainer configuration.
pub const CONFIG_DIR: &str = "/etc/finetune";
/// File name of the trainer configuration in its ConfigMap.
pub const CONFIG_FILE: &str = "trainer.json";

/// Volumes, mounts and init steps of a job, and the resulting paths.
#[derive(Clone, Debug, Default)]
pub struct DataPlan {
    /// Pod volumes.
    pub volumes: Vec<Volume>,
    /// Mounts of the trainer container.
    pub mounts: Vec<VolumeMount>,
    /// Download steps, run before the trainer.
    pub init_containers: Vec<Container>,
    /// The paths written into the trainer configuration.
    pub paths: TrainerPaths,
    /// Claim holding the output.
    pub output_claim: String,
    /// Bytes of node-local disk the downloaded model needs (its emptyDir's `sizeLimit`); the
    /// trainer requests this much `ephemeral-storage`, so the scheduler picks a node with room
    /// and a model larger than planned is stopped by the kubelet instead of filling the disk.
    pub model_download_bytes: u64,
    /// TCP ports the download steps connect to (443 for https unless the URL names a port); the
    /// job's NetworkPolicy allows egress to exactly these, plus DNS.
    pub egress_ports: std::collections::BTreeSet<u16>,
}

/// The TCP port a URL connects to: the one it names, else 443 for https and 80 for http.
pub fn url_port(url: &str) -> u16 {
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    // `[v6]:port` or `host:port`; a bare IPv6 literal has no port after its `]`.
    let port = match host_port.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => port.parse().ok(),
        _ => None,
    };
    port.unwrap_or(if scheme.eq_ignore_ascii_case("http") {
        80
    } else {
        443
    })
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

fn claim_volume(name: &str, claim: &str, read_only: bool) -> Volume {
    Volume {
        name: name.into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.into(),
            read_only: Some(read_only),
        }),
        ..Volume::default()
    }
}

/// Disk for a downloaded Hub model of `parameters`: its 16-bit safetensors (2 bytes a
/// parameter, how Llama 2 checkpoints are published), 10 % for the other files and partial
/// downloads, and 1 GiB for the tokenizer and config.
pub fn model_download_bytes(parameters: u64) -> u64 {
    parameters * 2 * 11 / 10 + (1 << 30)
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }
}

fn config_map_volume(name: &str, cm: &str, key: &str) -> Volume {
    Volume {
        name: name.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: cm.into(),
            items: Some(vec![KeyToPath {
                key: key.into(),
                path: key.into(),
                mode: None,
            }]),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// An environment variable with a plain value.
pub(super) fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// Requests and limits of a download step: it streams to disk, so a little memory suffices
/// (bounded, so that a broken download cannot take the node's memory; checkov CKV_K8S_10-13).
fn fetch_resources() -> ResourceRequirements {
    let q = |cpu: &str, memory: &str| {
        Some(
            [
                ("cpu".to_string(), Quantity(cpu.into())),
                ("memory".to_string(), Quantity(memory.into())),
            ]
            .into(),
        )
    };
    ResourceRequirements {
        requests: q("100m", "64Mi"),
        limits: q("1", "512Mi"),
        ..ResourceRequirements::default()
    }
}

/// Where the CA bundle is mounted in the download steps.
const CA_BUNDLE_DIR: &str = "/etc/finetune/ca";
/// The bundle's volume (its file is the ConfigMap key, in [`CA_BUNDLE_DIR`]).
const CA_BUNDLE_VOLUME: &str = "ca-bundle";

fn fetch_container(
    name: &str,
    settings: &BuildSettings,
    args: Vec<String>,
    mut mounts: Vec<VolumeMount>,
) -> Container {
    let mut envs = Vec::new();
    if let Some(ca) = &settings.ca_bundle {
        mounts.push(mount(CA_BUNDLE_VOLUME, CA_BUNDLE_DIR, true));
        envs.push(env(
            FETCH_CA_BUNDLE_ENV,
            &format!("{CA_BUNDLE_DIR}/{}", ca.key),
        ));
    }
    Container {
        name: name.into(),
        image: Some(settings.fetch_image.clone()),
        args: Some(args),
        env: Some(envs).filter(|e| !e.is_empty()),
        volume_mounts: Some(mounts),
        security_context: Some(restricted_container_security()),
        resources: Some(fetch_resources()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    }
}

/// The environment variable `name` from a Secret key: a credential reaches the download step
/// only this way, never as a value in the pod spec.
fn secret_env(name: &str, secret: &finetune_api::SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.name.clone(),
                key: secret.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// The environment variable of `finetune-fetch url` that holds a bearer token for the URL.
pub const FETCH_TOKEN_ENV: &str = "FETCH_TOKEN";
/// The environment variable of `finetune-fetch` naming the PEM bundle of the CAs it trusts.
pub const FETCH_CA_BUNDLE_ENV: &str = "FETCH_CA_BUNDLE";

/// One input file of a job: the dataset, the retention text or the test set.
struct FileInput<'a> {
    /// Volume (and mount directory) name.
    volume: &'a str,
    /// Its source URI.
    uri: &'a str,
    /// Expected SHA-256, when known.
    sha256: Option<&'a str>,
    /// The Secret key of a bearer token for an https source.
    credentials: Option<&'a finetune_api::SecretKeyRef>,
    /// File name of a download.
    file_name: String,
}

/// An input file's volume, mount, optional download step and resulting path.
fn plan_file_input(
    plan: &mut DataPlan,
    input: &FileInput<'_>,
    settings: &BuildSettings,
) -> Result<String> {
    let FileInput {
        volume,
        uri,
        sha256,
        credentials,
        ..
    } = *input;
    let file_name = input.file_name.as_str();
    let dir = format!("{MOUNT_ROOT}/{volume}");
    let source =
        Source::parse(uri, SourceKind::Dataset).map_err(|e| Error::Render(e.to_string()))?;
    let path = match source {
        Source::Pvc { claim, path } => {
            plan.volumes.push(claim_volume(volume, &claim, true));
            plan.mounts.push(mount(volume, &dir, true));
            format!("{dir}/{path}")
        }
        Source::ConfigMap { name, key } => {
            plan.volumes.push(config_map_volume(volume, &name, &key));
            plan.mounts.push(mount(volume, &dir, true));
            format!("{dir}/{key}")
        }
        Source::Https { url } => {
            plan.egress_ports.insert(url_port(&url));
            plan.volumes.push(empty_dir(volume));
            plan.mounts.push(mount(volume, &dir, true));
            let dest = format!("{dir}/{file_name}");
            let mut args = vec![
                "url".into(),
                "--url".into(),
                url,
                "--dest".into(),
                dest.clone(),
            ];
            if let Some(sum) = sha256 {
                args.extend(["--sha256".into(), sum.into()]);
            }
            let mut step = fetch_container(
                &format!("fetch-{volume}"),
                settings,
                args,
                vec![mount(volume, &dir, false)],
            );
            if let Some(secret) = credentials {
                step.env
                    .get_or_insert_with(Vec::new)
                    .push(secret_env(FETCH_TOKEN_ENV, secret));
            }
            plan.init_containers.push(step);
            dest
        }
        Source::HuggingFace { .. } => {
            return Err(Error::Render(format!("{uri}: hf:// is only for models")));
        }
    };
    Ok(path)
}

/// The revision the model download fetches: the commit an earlier attempt resolved (recorded
/// in `status.modelCommit`), else the source's revision, else `main`. Pinning it keeps every
/// attempt of a job, and the checkpoints it resumes, on the same weights.
fn pinned_revision(job: &FineTuneJob, revision: Option<String>) -> String {
    job.status
        .as_ref()
        .and_then(|s| s.model_commit.clone())
        .or(revision)
        .unwrap_or_else(|| "main".into())
}

/// `/dev/shm` per trainer process of a pod that trains on several processes.
pub const SHM_BYTES_PER_PROCESS: u64 = 1 << 30;

/// Plans volumes, mounts, download steps and paths for a job.
pub fn plan_volumes(job: &FineTuneJob, settings: &BuildSettings) -> Result<DataPlan> {
    let (name, _) = super::name_and_namespace(job)?;
    let spec = &job.spec;
    let mut plan = DataPlan::default();

    // Trainer configuration and scratch space (the root file system is read-only).
    plan.volumes.push(config_map_volume(
        "config",
        &names::config_map(&name),
        CONFIG_FILE,
    ));
    plan.mounts.push(mount("config", CONFIG_DIR, true));
    plan.volumes.push(empty_dir("scratch"));
    plan.mounts.push(mount("scratch", "/tmp", false));
    // Several processes: NCCL's shared-memory transport between a pod's ranks needs a /dev/shm
    // larger than a container runtime's 64 MiB default (memory-backed: it counts against the
    // pod's memory).
    if world_size(spec) > 1 {
        let ranks = u64::from(processes_per_pod(spec));
        plan.volumes.push(Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity((ranks * SHM_BYTES_PER_PROCESS).to_string())),
            }),
            ..Volume::default()
        });
        plan.mounts.push(mount("dshm", "/dev/shm", false));
    }

    // Checkpoints (and by default the output).
    let ckpt_claim = spec
        .checkpoints
        .storage
        .existing_claim
        .clone()
        .unwrap_or_else(|| names::checkpoint_claim(&name));
    let ckpt_dir = format!("{MOUNT_ROOT}/checkpoints");
    plan.volumes
        .push(claim_volume("checkpoints", &ckpt_claim, false));
    plan.mounts.push(mount("checkpoints", &ckpt_dir, false));
    let output_dir = match &spec.output.claim_name {
        Some(claim) => {
            plan.volumes.push(claim_volume("output", claim, false));
            plan.mounts
                .push(mount("output", &format!("{MOUNT_ROOT}/output"), false));
            plan.output_claim = claim.clone();
            format!("{MOUNT_ROOT}/output/{}", spec.output.path)
        }
        None => {
            plan.output_claim = ckpt_claim;
            format!("{ckpt_dir}/{}", spec.output.path)
        }
    };

    // The model.
    let (model_dir, tokenizer_file) = match spec.model.source.as_deref() {
        None => (
            settings.bundled_model_dir(spec.model.preset).to_string(),
            settings.tiny_tokenizer_file.clone(),
        ),
        Some(uri) => {
            let dir = format!("{MOUNT_ROOT}/model");
            match Source::parse(uri, SourceKind::Model).map_err(|e| Error::Render(e.to_string()))? {
                Source::Pvc { claim, path } => {
                    plan.volumes.push(claim_volume("model", &claim, true));
                    plan.mounts.push(mount("model", &dir, true));
                    let d = format!("{dir}/{path}");
                    (d.clone(), format!("{d}/tokenizer.json"))
                }
                Source::HuggingFace {
                    org,
                    name: repo,
                    revision,
                } => {
                    let bytes = model_download_bytes(spec.model.preset.architecture().parameters);
                    let mut volume = empty_dir("model");
                    if let Some(e) = volume.empty_dir.as_mut() {
                        e.size_limit = Some(Quantity(bytes.to_string()));
                    }
                    plan.volumes.push(volume);
                    plan.model_download_bytes = bytes;
                    plan.mounts.push(mount("model", &dir, true));
                    let mut c = fetch_container(
                        "fetch-model",
                        settings,
                        vec![
                            "hf".into(),
                            "--repo".into(),
                            format!("{org}/{repo}"),
                            "--revision".into(),
                            pinned_revision(job, revision),
                            "--dest".into(),
                            dir.clone(),
                        ],
                        vec![mount("model", &dir, false)],
                    );
                    plan.egress_ports.insert(url_port(&settings.hf_endpoint));
                    let mut envs = vec![env("HF_ENDPOINT", &settings.hf_endpoint)];
                    if let Some(secret) = &spec.model.token_secret_ref {
                        envs.push(secret_env("HF_TOKEN", secret));
                    }
                    c.env.get_or_insert_with(Vec::new).extend(envs);
                    plan.init_containers.push(c);
                    (dir.clone(), format!("{dir}/tokenizer.json"))
                }
                other => return Err(Error::Render(format!("{other} is not a model source"))),
            }
        }
    };

    let ext = match spec.dataset.format {
        DatasetFormat::Csv => "csv",
        DatasetFormat::Jsonl => "jsonl",
    };
    let dataset_file = plan_file_input(
        &mut plan,
        &FileInput {
            volume: "dataset",
            uri: &spec.dataset.source,
            sha256: spec.dataset.sha256.as_deref(),
            credentials: spec.dataset.credentials_secret_ref.as_ref(),
            file_name: format!("data.{ext}"),
        },
        settings,
    )?;
    let retention_file = match &spec.evaluation.retention {
        Some(r) => Some(plan_file_input(
            &mut plan,
            &FileInput {
                volume: "retention",
                uri: &r.source,
                sha256: None,
                credentials: None,
                file_name: "retention.txt".into(),
            },
            settings,
        )?),
        None => None,
    };
    let test_set_file = match &spec.evaluation.test_set {
        Some(t) => Some(plan_file_input(
            &mut plan,
            &FileInput {
                volume: "test-set",
                uri: &t.source,
                sha256: t.sha256.as_deref(),
                credentials: None,
                file_name: format!("test.{ext}"),
            },
            settings,
        )?),
        None => None,
    };

    if let (Some(ca), false) = (&settings.ca_bundle, plan.init_containers.is_empty()) {
        plan.volumes
            .push(config_map_volume(CA_BUNDLE_VOLUME, &ca.config_map, &ca.key));
    }

    plan.paths = TrainerPaths {
        model_dir,
        tokenizer_file,
        dataset_file,
        retention_file,
        test_set_file,
        // One directory per job UID: a job re-created with the same name on a retained or
        // shared claim starts afresh beside the old job's checkpoints instead of resuming them.
        checkpoint_dir: format!("{ckpt_dir}/checkpoints/{}", super::job_uid(job)?),
        // Beside the jobs' checkpoint folders: kept across attempts (the model volume is
        // read-only), keyed by the model revision and format, so one claim keeps one cache.
        quantized_cache_dir: Some(format!("{ckpt_dir}/quantized-base")),
        output_dir,
        termination_message_file: "/dev/termination-log".into(),
    };
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::url_port;

    #[test]
    fn url_ports_come_from_the_url_or_its_scheme() {
        assert_eq!(url_port("https://example.com/data.csv"), 443);
        assert_eq!(url_port("https://example.com:8443/data.csv"), 8443);
        assert_eq!(url_port("http://127.0.0.1:9000"), 9000);
        assert_eq!(url_port("http://mirror.internal/hub"), 80);
        assert_eq!(url_port("https://user@example.com:444/x?y=1"), 444);
        assert_eq!(url_port("https://[2001:db8::1]/x"), 443);
        assert_eq!(url_port("https://[2001:db8::1]:8443/x"), 8443);
    }
}
