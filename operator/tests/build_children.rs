//! The pure builders, from the sample YAML: what a trainer pod and its companions look like.
//!
//! Over 500 lines on purpose: one short test per property of the built children (pod, volumes,
//! Services, policy), all reading the same sample fixtures; splitting it would repeat the fixtures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use finetune_api::{FineTuneJob, TrainerConfig};
use finetune_operator::build::{BuildSettings, children};
use k8s_openapi::api::core::v1::Pod;

fn job(sample: &str) -> FineTuneJob {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/samples")
        .join(sample);
    let mut job: FineTuneJob =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    job.metadata.namespace = Some("team-a".into());
    job.metadata.uid = Some("0b5a6c1e-0000-4000-8000-000000000001".into());
    job
}

fn trainer(pod: &Pod) -> &k8s_openapi::api::core::v1::Container {
    &pod.spec.as_ref().unwrap().containers[0]
}

/// The pod's init container (download step) of that name.
fn init_container<'a>(pod: &'a Pod, name: &str) -> &'a k8s_openapi::api::core::v1::Container {
    pod.spec
        .as_ref()
        .unwrap()
        .init_containers
        .iter()
        .flatten()
        .find(|i| i.name == name)
        .unwrap_or_else(|| panic!("no init container {name}"))
}

/// The trainer configuration the ConfigMap carries.
fn trainer_config(c: &finetune_operator::build::Children) -> TrainerConfig {
    serde_json::from_str(&c.config_map.data.as_ref().unwrap()["trainer.json"]).unwrap()
}

#[test]
fn trainer_pod_meets_the_restricted_profile() {
    for sample in ["tiny-sentiment-cpu.yaml", "llama-2-7b-lora-sentiment.yaml"] {
        let c = children(&job(sample), &BuildSettings::default(), 0).unwrap();
        let spec = c.pods[0].spec.as_ref().unwrap();
        assert_eq!(
            spec.automount_service_account_token,
            Some(false),
            "{sample}"
        );
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert!(
            spec.termination_grace_period_seconds.unwrap() >= 60,
            "grace covers a checkpoint"
        );
        let psc = spec.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.fs_group_change_policy.as_deref(),
            Some("OnRootMismatch"),
            "no recursive chown of large checkpoint claims on every mount"
        );
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        for container in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            let sc = container.security_context.as_ref().unwrap();
            assert_eq!(
                sc.allow_privilege_escalation,
                Some(false),
                "{}",
                container.name
            );
            assert_eq!(
                sc.read_only_root_filesystem,
                Some(true),
                "{}",
                container.name
            );
            assert_eq!(
                sc.capabilities.as_ref().unwrap().drop.as_deref(),
                Some(&["ALL".to_string()][..])
            );
            assert!(sc.privileged.is_none());
        }
        let volumes = spec.volumes.as_ref().unwrap();
        assert!(
            volumes.iter().all(|v| v.host_path.is_none()),
            "no hostPath volumes"
        );
        assert!(
            volumes
                .iter()
                .any(|v| v.name == "scratch" && v.empty_dir.is_some())
        );
        let port = &trainer(&c.pods[0]).ports.as_ref().unwrap()[0];
        assert_eq!(port.name.as_deref(), Some("metrics"));
    }
}

#[test]
fn gpu_requests_come_from_the_spec_or_the_preset() {
    let seven = children(
        &job("llama-2-7b-lora-sentiment.yaml"),
        &BuildSettings::default(),
        0,
    )
    .unwrap();
    let res = trainer(&seven.pods[0]).resources.as_ref().unwrap();
    assert_eq!(res.limits.as_ref().unwrap()["nvidia.com/gpu"].0, "1");
    assert_eq!(
        trainer(&seven.pods[0]).image.as_deref(),
        Some(finetune_operator::build::DEFAULT_TRAINER_CUDA_IMAGE)
    );

    let mut seventy = job("llama-2-70b-lora-four-gpus.yaml");
    seventy.spec.resources.gpus = None; // the preset's default
    let c = children(&seventy, &BuildSettings::default(), 0).unwrap();
    let res = trainer(&c.pods[0]).resources.as_ref().unwrap();
    assert_eq!(res.limits.as_ref().unwrap()["nvidia.com/gpu"].0, "4");
    // The layers split over the pod's four GPUs: one trainer process drives them all.
    let layer_gpus = trainer_config(&c).layer_gpus;
    assert_eq!(layer_gpus.len(), 80);
    assert_eq!((layer_gpus[0], layer_gpus[79]), (0, 3));
    assert_eq!(
        env_value(&c.pods[0], "PET_NPROC_PER_NODE"),
        None,
        "one pod, one process"
    );
    assert!(
        trainer_config(&seven).layer_gpus.is_empty(),
        "7B fits one GPU"
    );

    let tiny = children(
        &job("tiny-sentiment-cpu.yaml"),
        &BuildSettings::default(),
        0,
    )
    .unwrap();
    let res = trainer(&tiny.pods[0]).resources.as_ref().unwrap();
    assert!(!res.limits.as_ref().unwrap().contains_key("nvidia.com/gpu"));
    assert_eq!(
        trainer(&tiny.pods[0]).image.as_deref(),
        Some(finetune_operator::build::DEFAULT_TRAINER_IMAGE)
    );
}

#[test]
fn a_cpu_job_splits_its_micro_batches_between_the_cores_of_its_cpu_limit() {
    let pod =
        |job: &FineTuneJob| children(job, &BuildSettings::default(), 0).unwrap().pods[0].clone();
    let mut tiny = job("tiny-sentiment-cpu.yaml");
    tiny.spec.resources.cpu = Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
        "1500m".into(),
    ));
    assert_eq!(
        env_value(&pod(&tiny), "FINETUNE_CPU_WORKERS").as_deref(),
        Some("2")
    );
    assert_eq!(
        env_value(&pod(&tiny), "CANDLE_NUM_THREADS").as_deref(),
        Some("1")
    );
    tiny.spec.resources.cpu = None;
    assert_eq!(
        env_value(&pod(&tiny), "FINETUNE_CPU_WORKERS"),
        None,
        "no limit: the trainer uses the node's cores"
    );
    let seven = job("llama-2-7b-lora-sentiment.yaml");
    assert!(seven.spec.resources.cpu.is_some());
    assert_eq!(
        env_value(&pod(&seven), "FINETUNE_CPU_WORKERS"),
        None,
        "a GPU job computes on its GPU"
    );
}

fn env_value(pod: &Pod, name: &str) -> Option<String> {
    trainer(pod)
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

#[test]
fn a_gang_is_one_pod_per_node_rank_meeting_at_rank_zero_through_the_headless_service() {
    let mut gang = job("llama-2-7b-lora-sentiment.yaml");
    gang.spec.resources.nodes = Some(2);
    gang.spec.resources.gpus = Some(4);
    let c = children(&gang, &BuildSettings::default(), 1).unwrap();
    let svc = c.metrics_service.metadata.name.clone().unwrap();
    let service = c.metrics_service.spec.as_ref().unwrap();
    assert_eq!(service.cluster_ip.as_deref(), Some("None"));
    assert_eq!(service.publish_not_ready_addresses, Some(true));
    let names: Vec<String> = c
        .pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "llama-2-7b-sentiment-trainer-1-0",
            "llama-2-7b-sentiment-trainer-1-1"
        ]
    );
    for (rank, pod) in c.pods.iter().enumerate() {
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.hostname.as_deref(), Some(names[rank].as_str()));
        assert_eq!(spec.subdomain.as_deref(), Some(svc.as_str()));
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["finetune.dev/rank"], rank.to_string());
        assert_eq!(labels["finetune.dev/attempt"], "1");
        let got: Vec<Option<String>> = [
            "PET_NNODES",
            "PET_NPROC_PER_NODE",
            "PET_NODE_RANK",
            "PET_MASTER_ADDR",
        ]
        .iter()
        .map(|n| env_value(pod, n))
        .collect();
        let master = format!("{}.{svc}", names[0]);
        let want = ["2", "4", &rank.to_string(), &master];
        assert_eq!(got, want.map(|v| Some(v.to_string())), "rank {rank}");
        // /dev/shm for the pod's four ranks, memory-backed.
        let shm = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "dshm")
            .unwrap();
        let dir = shm.empty_dir.as_ref().unwrap();
        assert_eq!(dir.medium.as_deref(), Some("Memory"));
        assert_eq!(
            dir.size_limit.as_ref().map(|q| q.0.as_str()),
            Some("4294967296")
        );
        let mount = trainer(pod)
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "dshm");
        assert_eq!(mount.map(|m| m.mount_path.as_str()), Some("/dev/shm"));
        // Kueue admits the attempt's pods as one group (the sample is queued).
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(labels["kueue.x-k8s.io/pod-group-name"], names[0]);
        assert_eq!(annotations["kueue.x-k8s.io/pod-group-total-count"], "2");
        assert_eq!(annotations["kueue.x-k8s.io/retriable-in-group"], "false");
    }
    // Every rank mounts the checkpoints, on its own node.
    let claim = c.checkpoint_claim.as_ref().unwrap().spec.as_ref().unwrap();
    assert_eq!(
        claim.access_modes.as_deref(),
        Some(&["ReadWriteMany".to_string()][..])
    );
    // The ranks may reach each other on any port, and nothing else more than before.
    let policy = c.network_policy.spec.as_ref().unwrap();
    let peers = |rules: Vec<Option<&Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer>>>| {
        rules
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|p| p.pod_selector.clone())
            .count()
    };
    let ingress = policy
        .ingress
        .iter()
        .flatten()
        .map(|r| r.from.as_ref())
        .collect();
    let egress = policy
        .egress
        .iter()
        .flatten()
        .map(|r| r.to.as_ref())
        .collect();
    assert_eq!((peers(ingress), peers(egress)), (1, 1));

    // One pod: no rank, no host name, a ReadWriteOnce claim, no pod group, no /dev/shm on CPU.
    let one = children(
        &job("tiny-sentiment-cpu.yaml"),
        &BuildSettings::default(),
        0,
    )
    .unwrap();
    let pod = &one.pods[0];
    assert_eq!(one.pods.len(), 1);
    assert_eq!(
        pod.metadata.name.as_deref(),
        Some("tiny-sentiment-trainer-0")
    );
    assert!(
        !pod.metadata
            .labels
            .as_ref()
            .unwrap()
            .contains_key("finetune.dev/rank")
    );
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(
        (spec.hostname.as_ref(), spec.subdomain.as_ref()),
        (None, None)
    );
    assert!(spec.volumes.iter().flatten().all(|v| v.name != "dshm"));
    let claim = one
        .checkpoint_claim
        .as_ref()
        .unwrap()
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(
        claim.access_modes.as_deref(),
        Some(&["ReadWriteOnce".to_string()][..])
    );
    let policy = one.network_policy.spec.as_ref().unwrap();
    assert!(policy.ingress.iter().flatten().all(|r| r.from.is_none()));
}

#[test]
fn a_pod_with_several_gpus_runs_one_rank_per_gpu_and_one_gpu_runs_alone() {
    let mut four = job("llama-2-7b-lora-sentiment.yaml");
    four.spec.resources.gpus = Some(4);
    let pod = children(&four, &BuildSettings::default(), 3)
        .unwrap()
        .pods
        .remove(0);
    let got: Vec<Option<String>> = [
        "PET_NNODES",
        "PET_NPROC_PER_NODE",
        "PET_NODE_RANK",
        "PET_MASTER_ADDR",
        "PET_MASTER_PORT",
        finetune_api::gang::ATTEMPT_ENV,
    ]
    .iter()
    .map(|n| env_value(&pod, n))
    .collect();
    let want = ["1", "4", "0", "127.0.0.1", "29500", "3"];
    assert_eq!(got, want.map(|v| Some(v.to_string())));

    for sample in ["llama-2-7b-lora-sentiment.yaml", "tiny-sentiment-cpu.yaml"] {
        let pod = children(&job(sample), &BuildSettings::default(), 0)
            .unwrap()
            .pods
            .remove(0);
        let names: Vec<&str> = trainer(&pod)
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with("PET_")),
            "{sample}: {names:?}"
        );
    }
}

#[test]
fn a_queued_jobs_pod_carries_its_kueue_labels() {
    let mut j = job("llama-2-7b-lora-sentiment.yaml");
    j.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(finetune_api::KUEUE_PRIORITY_LABEL.into(), "research".into());
    let labels = children(&j, &BuildSettings::default(), 0)
        .unwrap()
        .pods
        .remove(0)
        .metadata
        .labels
        .unwrap();
    assert_eq!(
        labels
            .get(finetune_api::KUEUE_QUEUE_LABEL)
            .map(String::as_str),
        Some("gpu-queue"),
        "the sample's queue"
    );
    assert_eq!(
        labels
            .get(finetune_api::KUEUE_PRIORITY_LABEL)
            .map(String::as_str),
        Some("research")
    );
    // A job without them gives its pod none.
    let tiny = children(
        &job("tiny-sentiment-cpu.yaml"),
        &BuildSettings::default(),
        0,
    )
    .unwrap()
    .pods
    .remove(0);
    let labels = tiny.metadata.labels.unwrap();
    assert!(labels.keys().all(|k| !k.starts_with("kueue.x-k8s.io/")));
}

#[test]
fn later_attempts_download_the_commit_the_first_resolved() {
    let revision_of = |j: &finetune_api::FineTuneJob| {
        let c = children(j, &BuildSettings::default(), 1).unwrap();
        let args = init_container(&c.pods[0], "fetch-model")
            .args
            .clone()
            .unwrap();
        let at = args.iter().position(|a| a == "--revision").unwrap();
        args[at + 1].clone()
    };
    let mut j = job("llama-2-7b-lora-sentiment.yaml");
    assert_eq!(revision_of(&j), "main", "the sample names no revision");
    let commit = "4b2a0c9e1d7f3a5b6c8d0e2f4a6b8c0d1e3f5a7b";
    j.status = Some(finetune_api::FineTuneJobStatus {
        model_commit: Some(commit.into()),
        ..Default::default()
    });
    assert_eq!(revision_of(&j), commit);
}

#[test]
fn dataset_credentials_reach_only_the_download_step_by_secret_reference() {
    let mut j = job("tiny-sentiment-cpu.yaml");
    j.spec.dataset.source = "https://data.example.com/reviews.csv".into();
    j.spec.dataset.credentials_secret_ref = Some(finetune_api::SecretKeyRef {
        name: "bucket-token".into(),
        key: "token".into(),
    });
    assert!(finetune_api::validate(&j.spec).is_ok(), "a valid spec");
    let c = children(&j, &BuildSettings::default(), 0).unwrap();
    let fetch = init_container(&c.pods[0], "fetch-dataset");
    let env = fetch.env.clone().unwrap_or_default();
    let token = env
        .iter()
        .find(|e| e.name == finetune_operator::build::FETCH_TOKEN_ENV)
        .expect("the token variable");
    assert!(token.value.is_none(), "never a value in the pod spec");
    let sel = token
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .unwrap();
    assert_eq!(
        (sel.name.as_str(), sel.key.as_str()),
        ("bucket-token", "token")
    );
    let trainer_env = trainer(&c.pods[0]).env.clone().unwrap_or_default();
    assert!(
        trainer_env
            .iter()
            .all(|e| e.name != finetune_operator::build::FETCH_TOKEN_ENV)
    );
    // Without a reference the step has no token variable.
    j.spec.dataset.credentials_secret_ref = None;
    let c = children(&j, &BuildSettings::default(), 0).unwrap();
    let env = init_container(&c.pods[0], "fetch-dataset")
        .env
        .clone()
        .unwrap_or_default();
    assert!(
        env.iter()
            .all(|e| e.name != finetune_operator::build::FETCH_TOKEN_ENV)
    );
}

#[test]
fn a_ca_bundle_reaches_every_download_step_and_only_them() {
    use finetune_operator::build::CaBundle;
    assert_eq!(CaBundle::parse(""), None);
    let settings = BuildSettings {
        ca_bundle: CaBundle::parse("corp-ca/bundle.pem"),
        ..BuildSettings::default()
    };
    assert_eq!(
        CaBundle::parse("corp-ca").map(|c| c.key),
        Some("ca.crt".into())
    );
    let mut j = job("llama-2-7b-lora-sentiment.yaml");
    j.spec.dataset.source = "https://data.example.com/reviews.csv".into();
    let pod = children(&j, &settings, 0).unwrap().pods.remove(0);
    let spec = pod.spec.as_ref().unwrap();
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "ca-bundle")
        .expect("the bundle's volume");
    assert_eq!(volume.config_map.as_ref().unwrap().name, "corp-ca");
    let steps = spec.init_containers.clone().unwrap_or_default();
    assert!(steps.len() >= 2, "model and dataset downloads");
    for step in &steps {
        let mounted = step.volume_mounts.iter().flatten().any(|m| {
            m.name == "ca-bundle" && m.mount_path == "/etc/finetune/ca" && m.read_only == Some(true)
        });
        assert!(mounted, "{} lacks the bundle", step.name);
        let env = step.env.clone().unwrap_or_default();
        assert!(
            env.iter().any(|e| e.name == "FETCH_CA_BUNDLE"
                && e.value.as_deref() == Some("/etc/finetune/ca/bundle.pem")),
            "{}: {env:?}",
            step.name
        );
    }
    // The model step keeps its token next to the bundle.
    let model = init_container(&pod, "fetch-model");
    assert!(model.env.iter().flatten().any(|e| e.name == "HF_TOKEN"));
    assert!(
        trainer(&pod)
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name != "ca-bundle")
    );
    // A job that downloads nothing gets no bundle volume.
    let tiny = children(&job("tiny-sentiment-cpu.yaml"), &settings, 0)
        .unwrap()
        .pods
        .remove(0);
    assert!(
        tiny.spec
            .unwrap()
            .volumes
            .iter()
            .flatten()
            .all(|v| v.name != "ca-bundle")
    );
}

#[test]
fn hub_token_is_passed_only_by_secret_reference() {
    let c = children(
        &job("llama-2-7b-lora-sentiment.yaml"),
        &BuildSettings::default(),
        0,
    )
    .unwrap();
    let fetch = init_container(&c.pods[0], "fetch-model");
    let token = fetch
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "HF_TOKEN")
        .unwrap();
    assert!(token.value.is_none());
    let sel = token
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!((sel.name.as_str(), sel.key.as_str()), ("hf-token", "token"));
    assert!(
        fetch
            .args
            .as_ref()
            .unwrap()
            .contains(&"meta-llama/Llama-2-7b-hf".to_string())
    );
    // The trainer itself never sees the token.
    assert!(
        trainer(&c.pods[0])
            .env
            .iter()
            .flatten()
            .all(|e| e.name != "HF_TOKEN")
    );
}

#[test]
fn a_bundled_preset_trains_the_weights_the_trainer_image_ships() {
    // `tiny` and `stories-15m` need no source: each reads its own directory of the image, with
    // the image's Llama 2 tokenizer, and mounts no model volume.
    let settings = BuildSettings {
        tiny_model_dir: "/image/tiny".into(),
        stories_model_dir: "/image/stories".into(),
        tiny_tokenizer_file: "/image/tokenizer.json".into(),
        ..BuildSettings::default()
    };
    for (sample, dir) in [
        ("tiny-sentiment-cpu.yaml", "/image/tiny"),
        ("stories-sentiment-lora-cpu.yaml", "/image/stories"),
    ] {
        let c = children(&job(sample), &settings, 0).unwrap();
        let cfg = trainer_config(&c);
        assert_eq!(cfg.paths.model_dir, dir, "{sample}");
        assert_eq!(
            cfg.paths.tokenizer_file, "/image/tokenizer.json",
            "{sample}"
        );
        assert!(!cfg.use_gpu, "{sample}");
        let volumes = c.pods[0].spec.as_ref().unwrap().volumes.as_ref().unwrap();
        assert!(volumes.iter().all(|v| v.name != "model"), "{sample}");
    }
}

#[test]
fn config_map_carries_the_trainer_configuration() {
    let c = children(
        &job("tiny-sentiment-cpu.yaml"),
        &BuildSettings::default(),
        0,
    )
    .unwrap();
    let cfg = trainer_config(&c);
    assert_eq!(cfg.job, "team-a/tiny-sentiment");
    assert!(!cfg.use_gpu);
    assert_eq!(
        cfg.paths.dataset_file,
        "/var/lib/finetune/dataset/reviews.csv"
    );
    assert_eq!(
        cfg.paths.retention_file.as_deref(),
        Some("/var/lib/finetune/retention/general.txt")
    );
    // One checkpoint directory per job UID, and the UID in the configuration.
    let uid = job("tiny-sentiment-cpu.yaml").metadata.uid.unwrap();
    assert_eq!(
        cfg.paths.checkpoint_dir,
        format!("/var/lib/finetune/checkpoints/checkpoints/{uid}")
    );
    assert_eq!(cfg.job_uid, uid);
    // The quantized base cache sits beside the jobs' checkpoint folders (kept across attempts).
    assert_eq!(
        cfg.paths.quantized_cache_dir.as_deref(),
        Some("/var/lib/finetune/checkpoints/quantized-base")
    );
    assert_eq!(cfg.paths.output_dir, "/var/lib/finetune/checkpoints/output");
    assert_eq!(
        (cfg.hyperparameters.epochs, cfg.hyperparameters.max_steps),
        (2, None)
    );
    let pvc = c.checkpoint_claim.unwrap();
    assert_eq!(
        pvc.metadata.name.as_deref(),
        Some("tiny-sentiment-checkpoints")
    );
    let size = &pvc.spec.unwrap().resources.unwrap().requests.unwrap()["storage"];
    assert_eq!(size.0, "1Gi");
}

#[test]
fn https_datasets_get_a_download_step_with_checksum() {
    let c = children(&job("llama-2-13b-lora.yaml"), &BuildSettings::default(), 0).unwrap();
    let fetch = init_container(&c.pods[0], "fetch-dataset");
    let args = fetch.args.clone().unwrap();
    assert!(args.contains(&"--sha256".to_string()));
    assert!(args.contains(&"/var/lib/finetune/dataset/data.jsonl".to_string()));
}

#[test]
fn trainer_pod_settings_reach_the_pod_and_the_operator_keys_stay() {
    let mut j = job("tiny-sentiment-cpu.yaml");
    j.spec.trainer_pod = serde_json::from_value(serde_json::json!({
        "labels": {"sidecar.istio.io/inject": "false", "team": "ml"},
        "annotations": {"karpenter.sh/do-not-disrupt": "true"},
        "serviceAccountName": "trainer-s3-reader",
        "imagePullSecrets": [{"name": "mirror"}],
        "runtimeClassName": "nvidia",
        "schedulerName": "volcano"
    }))
    .unwrap();
    assert!(finetune_api::validate(&j.spec).is_ok());
    let c = children(&j, &BuildSettings::default(), 0).unwrap();
    let meta = &c.pods[0].metadata;
    let labels = meta.labels.as_ref().unwrap();
    assert_eq!(labels["sidecar.istio.io/inject"], "false");
    assert_eq!(labels["team"], "ml");
    assert_eq!(labels["finetune.dev/job"], "tiny-sentiment");
    let annotations = meta.annotations.as_ref().unwrap();
    assert_eq!(annotations["karpenter.sh/do-not-disrupt"], "true");
    assert!(annotations.contains_key("prometheus.io/port"));
    let spec = c.pods[0].spec.as_ref().unwrap();
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some("trainer-s3-reader")
    );
    assert_eq!(
        spec.automount_service_account_token,
        Some(false),
        "a named ServiceAccount still mounts no API token"
    );
    assert_eq!(spec.image_pull_secrets.as_ref().unwrap()[0].name, "mirror");
    assert_eq!(spec.runtime_class_name.as_deref(), Some("nvidia"));
    assert_eq!(spec.scheduler_name.as_deref(), Some("volcano"));
    // Without trainerPod nothing of it appears.
    let plain = children(
        &job("tiny-sentiment-cpu.yaml"),
        &BuildSettings::default(),
        0,
    )
    .unwrap();
    let spec = plain.pods[0].spec.as_ref().unwrap();
    assert!(spec.service_account_name.is_none() && spec.scheduler_name.is_none());
    assert!(spec.image_pull_secrets.is_none() && spec.runtime_class_name.is_none());
}

#[test]
fn children_are_owned_and_labelled() {
    let j = job("tiny-sentiment-cpu.yaml");
    let c = children(&j, &BuildSettings::default(), 3).unwrap();
    assert_eq!(
        c.pods[0].metadata.name.as_deref(),
        Some("tiny-sentiment-trainer-3")
    );
    for meta in [
        &c.pods[0].metadata,
        &c.config_map.metadata,
        &c.metrics_service.metadata,
    ] {
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "FineTuneJob");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(owner.block_owner_deletion, Some(true));
        assert_eq!(
            meta.labels.as_ref().unwrap()["finetune.dev/job"],
            "tiny-sentiment"
        );
        assert_eq!(
            meta.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"],
            "finetune-operator"
        );
    }
    let mut retained = j.clone();
    retained.spec.checkpoints.storage.retain = true;
    let c = children(&retained, &BuildSettings::default(), 0).unwrap();
    assert!(
        c.checkpoint_claim
            .unwrap()
            .metadata
            .owner_references
            .is_none(),
        "retained claims outlive the job"
    );
}

/// TCP ports a NetworkPolicy's egress rules allow, with their protocol.
fn egress_ports(c: &finetune_operator::build::Children) -> Vec<(String, i32)> {
    let spec = c.network_policy.spec.as_ref().unwrap();
    spec.egress
        .iter()
        .flatten()
        .flat_map(|r| r.ports.iter().flatten())
        .map(|p| {
            let port = match p.port.as_ref().unwrap() {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => *n,
                other => panic!("named port {other:?}"),
            };
            (p.protocol.clone().unwrap(), port)
        })
        .collect()
}

#[test]
fn trainer_network_policy_allows_metrics_in_and_only_dns_and_downloads_out() {
    let dns = vec![("UDP".to_string(), 53), ("TCP".to_string(), 53)];
    // Volumes only (ConfigMap dataset, tiny model in the image): DNS and nothing else.
    let tiny = children(
        &job("tiny-sentiment-cpu.yaml"),
        &BuildSettings::default(),
        0,
    )
    .unwrap();
    let spec = tiny.network_policy.spec.as_ref().unwrap();
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_string(), "Egress".to_string()][..])
    );
    assert_eq!(egress_ports(&tiny), dns);
    let ingress = spec.ingress.as_ref().unwrap();
    assert_eq!(ingress.len(), 1);
    let only = &ingress[0].ports.as_ref().unwrap()[0];
    assert_eq!(
        only.port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9090))
    );
    // The policy selects exactly the trainer pods of this job.
    let selector = spec
        .pod_selector
        .as_ref()
        .unwrap()
        .match_labels
        .as_ref()
        .unwrap();
    let pod_labels = tiny.pods[0].metadata.labels.as_ref().unwrap();
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    assert_eq!(selector["finetune.dev/job"], "tiny-sentiment");
    let owner = &tiny
        .network_policy
        .metadata
        .owner_references
        .as_ref()
        .unwrap()[0];
    assert_eq!(owner.controller, Some(true));

    // An hf:// model: the hub endpoint's port (443, or a mirror's own port).
    let seven = children(
        &job("llama-2-7b-lora-sentiment.yaml"),
        &BuildSettings::default(),
        0,
    )
    .unwrap();
    assert_eq!(egress_ports(&seven)[2..], [("TCP".to_string(), 443)]);
    let mirror = BuildSettings {
        hf_endpoint: "http://hub-mirror.internal:8080".into(),
        ..BuildSettings::default()
    };
    let mirrored = children(&job("llama-2-7b-lora-sentiment.yaml"), &mirror, 0).unwrap();
    assert_eq!(egress_ports(&mirrored)[2..], [("TCP".to_string(), 8080)]);
    // An https:// dataset.
    let thirteen = children(&job("llama-2-13b-lora.yaml"), &BuildSettings::default(), 0).unwrap();
    assert_eq!(egress_ports(&thirteen)[2..], [("TCP".to_string(), 443)]);
}

#[test]
fn a_test_set_is_mounted_or_downloaded_like_the_dataset() {
    let mut j = job("tiny-sentiment-cpu.yaml");
    j.spec.evaluation.test_set = Some(finetune_api::v1alpha1::TestSetSpec {
        source: "configmap://held-out/test.csv".into(),
        sha256: None,
        max_rows: 200,
    });
    let c = children(&j, &BuildSettings::default(), 0).unwrap();
    let cfg = trainer_config(&c);
    assert_eq!(
        cfg.paths.test_set_file.as_deref(),
        Some("/var/lib/finetune/test-set/test.csv")
    );
    assert_eq!(cfg.evaluation.test_set.as_ref().unwrap().max_rows, 200);
    let spec = c.pods[0].spec.as_ref().unwrap();
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.config_map.as_ref().is_some_and(|m| m.name == "held-out"))
        .expect("the ConfigMap is a volume");
    let mount = trainer(&c.pods[0])
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume.name)
        .expect("and mounted in the trainer");
    assert!(mount.read_only.unwrap_or(false));
    // Over https it is fetched by an init step, checked against its digest.
    j.spec.evaluation.test_set = Some(finetune_api::v1alpha1::TestSetSpec {
        source: "https://data.example.com/test.csv".into(),
        sha256: Some("ab".repeat(32)),
        max_rows: 200,
    });
    let c = children(&j, &BuildSettings::default(), 0).unwrap();
    let fetch = init_container(&c.pods[0], "fetch-test-set");
    assert!(fetch.args.clone().unwrap().contains(&"ab".repeat(32)));
}

#[test]
fn a_downloaded_model_gets_bounded_disk_that_the_scheduler_sees() {
    let c = children(
        &job("llama-2-7b-lora-sentiment.yaml"),
        &BuildSettings::default(),
        0,
    )
    .unwrap();
    let spec = c.pods[0].spec.as_ref().unwrap();
    let model = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "model")
        .unwrap();
    let limit = model
        .empty_dir
        .as_ref()
        .unwrap()
        .size_limit
        .clone()
        .unwrap();
    let bytes: u64 = limit.0.parse().unwrap();
    // 6.74 B parameters in 16-bit safetensors are 13.5 GB; the limit leaves room, but not 2x.
    assert!((14_000_000_000..20_000_000_000).contains(&bytes), "{bytes}");
    let requests = trainer(&c.pods[0])
        .resources
        .as_ref()
        .unwrap()
        .requests
        .clone()
        .unwrap();
    assert_eq!(requests["ephemeral-storage"], limit);
    // The tiny preset downloads nothing and asks for no disk.
    let tiny = children(
        &job("tiny-sentiment-cpu.yaml"),
        &BuildSettings::default(),
        0,
    )
    .unwrap();
    let tiny_requests = trainer(&tiny.pods[0])
        .resources
        .clone()
        .unwrap()
        .requests
        .unwrap();
    assert!(!tiny_requests.contains_key("ephemeral-storage"));
}
