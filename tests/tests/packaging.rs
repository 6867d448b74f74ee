//! Packaging tests that need no cluster: the Helm chart (lint, render with several value sets,
//! schema), the kustomize base, image names, RBAC and pod security of the rendered objects,
//! Grafana dashboards, Prometheus alerts (`promtool check rules` / `test rules`), the Argo CD
//! health check (Lua 5.1) and kstatus on the status fixtures.
//!
//! Tools are installed on first use: `helm-python-sdk` in a venv under
//! `~/.cache/finetune-operator/venv-helm`, Debian's `prometheus` (promtool) and `lua5.1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use finetune_e2e::packaging::{
    NAMESPACE, RELEASE, argocd_health, chart_dir, checkov, ensure_apt_tool, helm_lint, helm_render,
    helm_validate, kustomize, object_key, of_kind, parse_docs, repo_root, run_ok,
};
use serde_json::json;
use serde_yaml::Value;

fn read(path: impl AsRef<Path>) -> String {
    let path = repo_root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn render(values: serde_json::Value) -> Vec<Value> {
    let text =
        helm_render(Some(&values), RELEASE, NAMESPACE, false).unwrap_or_else(|e| panic!("{e}"));
    parse_docs(&text).unwrap()
}

/// The value sets every render test uses.
fn value_sets() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("defaults", json!({})),
        (
            "monitoring",
            json!({"serviceMonitor": {"enabled": true, "labels": {"release": "kube-prometheus-stack"}},
                   "podMonitor": {"enabled": true},
                   "prometheusRule": {"enabled": true, "labels": {"release": "kube-prometheus-stack"}},
                   "dashboards": {"namespace": "monitoring"}}),
        ),
        (
            "single-namespaced",
            json!({"replicaCount": 1, "leaderElection": {"enabled": false},
                   "operator": {"watchNamespace": "ml-team", "logJson": false},
                   "networkPolicy": {"enabled": false}, "dashboards": {"enabled": false},
                   "rbac": {"podGroupSchedulers": ["coscheduling", "volcano"]}}),
        ),
        (
            "admission-policy",
            json!({"admissionPolicy": {"enabled": true, "maxGpusPerJob": 8, "requireQueueName": true,
                   "allowedModelSources": ["hf://meta-llama/", "pvc://models/"],
                   "validationActions": ["Warn", "Audit"],
                   "namespaceSelector": {"matchLabels": {"team": "ml"}}}}),
        ),
        (
            "renamed-mirror",
            json!({"fullnameOverride": "ft", "serviceAccount": {"name": "ft-operator"},
                   "image": {"repository": "registry.example.com/ft/operator", "tag": "0.1.0", "digest": "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},
                   "images": {"trainer": "registry.example.com/ft/trainer:0.1.0",
                              "trainerCuda": "registry.example.com/ft/trainer:0.1.0-cuda",
                              "fetch": "registry.example.com/ft/fetch:0.1.0"},
                   "imagePullSecrets": [{"name": "mirror"}],
                   "networkPolicy": {"apiServerCIDRs": ["10.0.0.1/32"], "apiServerPorts": [6443]},
                   "prometheusRule": {"enabled": true},
                   "nodeSelector": {"kubernetes.io/os": "linux"},
                   "tolerations": [{"key": "control-plane", "operator": "Exists", "effect": "NoSchedule"}]}),
        ),
    ]
}

#[test]
fn chart_crd_is_the_generated_crd() {
    let generated = read("crds/finetunejob.yaml");
    assert_eq!(
        read("charts/finetune-operator/crds/finetunejob.yaml"),
        generated,
        "charts/finetune-operator/crds/finetunejob.yaml differs from crds/finetunejob.yaml: \
         cp crds/finetunejob.yaml charts/finetune-operator/crds/"
    );
    assert_eq!(
        read("manifests/default/finetunejob-crd.yaml"),
        generated,
        "manifests/default/finetunejob-crd.yaml differs from crds/finetunejob.yaml: \
         cp crds/finetunejob.yaml manifests/default/finetunejob-crd.yaml"
    );
}

#[test]
fn helm_lint_strict_with_every_value_set() {
    for (name, values) in value_sets() {
        let report = helm_lint(Some(&values)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let problems: Vec<_> = report["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["severity"].as_i64().unwrap_or(0) >= 2)
            .collect();
        assert!(
            problems.is_empty(),
            "helm lint --strict ({name}): {problems:#?}"
        );
        assert!(
            report["errors"].as_array().is_none_or(|e| e.is_empty()),
            "helm lint ({name}): {report:#}"
        );
    }
}

#[test]
fn helm_renders_every_value_set() {
    for (name, values) in value_sets() {
        let docs = render(values.clone());
        let keys: Vec<String> = docs.iter().map(object_key).collect();
        let unique: BTreeSet<&String> = keys.iter().collect();
        assert_eq!(
            unique.len(),
            keys.len(),
            "{name}: duplicate objects {keys:?}"
        );
        for d in &docs {
            assert!(
                d["apiVersion"].is_string() && d["kind"].is_string(),
                "{name}: {d:?}"
            );
            let kind = d["kind"].as_str().unwrap();
            let cluster_scoped = [
                "ClusterRole",
                "ClusterRoleBinding",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding",
            ];
            if !cluster_scoped.contains(&kind) {
                assert!(
                    d["metadata"]["namespace"].is_string(),
                    "{name}: {} has no namespace",
                    object_key(d)
                );
            }
        }
        let deploy = of_kind(&docs, "Deployment");
        assert_eq!(deploy.len(), 1, "{name}: one Deployment");
        let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        let on = |path: &str| {
            let mut v = &values;
            for p in path.split('.') {
                v = &v[p];
            }
            v.as_bool()
        };
        assert_eq!(
            kinds.contains("ServiceMonitor"),
            on("serviceMonitor.enabled") == Some(true),
            "{name}"
        );
        assert_eq!(
            kinds.contains("PodMonitor"),
            on("podMonitor.enabled") == Some(true),
            "{name}"
        );
        assert_eq!(
            kinds.contains("PrometheusRule"),
            on("prometheusRule.enabled") == Some(true),
            "{name}"
        );
        assert_eq!(
            kinds.contains("NetworkPolicy"),
            on("networkPolicy.enabled") != Some(false),
            "{name}"
        );
        let replicas = values["replicaCount"].as_i64().unwrap_or(2);
        assert_eq!(
            kinds.contains("PodDisruptionBudget"),
            replicas > 1,
            "{name}: PDB only with 2+ replicas"
        );
        assert_eq!(
            of_kind(&docs, "ConfigMap").len(),
            if on("dashboards.enabled") == Some(false) {
                0
            } else {
                2
            },
            "{name}: dashboards"
        );
        eprintln!("{name}: {} objects: {kinds:?}", docs.len());
    }
}

#[test]
fn values_schema_and_template_guards_reject_bad_values() {
    helm_validate(&json!({})).unwrap();
    for bad in [
        json!({"replicaCount": 0}),
        json!({"replicaCount": "two"}),
        json!({"unknownKey": true}),
        json!({"images": {"trainer": "has spaces:1"}}),
        json!({"operator": {"stallTimeout": "ten minutes"}}),
        json!({"operator": {"watchNamespace": "Not_A_Namespace"}}),
        json!({"metrics": {"port": 80}}),
        json!({"image": {"pullPolicy": "Sometimes"}}),
    ] {
        let err = helm_validate(&bad).expect_err(&format!("schema accepted {bad}"));
        eprintln!(
            "rejected {bad}: {}",
            err.to_string().lines().last().unwrap_or("")
        );
    }
    let err = helm_render(
        Some(&json!({"replicaCount": 2, "leaderElection": {"enabled": false}})),
        RELEASE,
        NAMESPACE,
        false,
    )
    .expect_err("two replicas without leader election must not render");
    assert!(err.to_string().contains("leaderElection"), "{err}");
}

/// Objects keyed by kind/namespace/name, Helm's `# Source` comments dropped.
fn by_key(docs: Vec<Value>) -> BTreeMap<String, Value> {
    docs.into_iter().map(|d| (object_key(&d), d)).collect()
}

#[test]
fn kustomize_base_equals_chart_with_default_values() {
    let chart = helm_render(None, RELEASE, NAMESPACE, true).unwrap();
    let mut chart = by_key(parse_docs(&chart).unwrap());
    let base = kustomize(&repo_root().join("manifests/default")).unwrap();
    let mut base = by_key(parse_docs(&base).unwrap());
    // The base also creates its namespace (the chart installs into an existing one).
    let ns = base
        .remove(&format!("Namespace//{NAMESPACE}"))
        .expect("manifests/default creates its namespace");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str(),
        Some("restricted")
    );
    let only_chart: Vec<_> = chart.keys().filter(|k| !base.contains_key(*k)).collect();
    let only_base: Vec<_> = base.keys().filter(|k| !chart.contains_key(*k)).collect();
    let regenerate = "regenerate: charts/hack/helm.py render charts/finetune-operator --name finetune-operator \
                      --namespace finetune-system (see manifests/default/finetune-operator.yaml's header)";
    assert!(
        only_chart.is_empty() && only_base.is_empty(),
        "chart only: {only_chart:?}; base only: {only_base:?}; {regenerate}"
    );
    for (key, c) in std::mem::take(&mut chart) {
        if let Some(path) = first_difference(&base[&key], &c, String::new()) {
            panic!("{key} differs between the chart and manifests/default at {path}; {regenerate}");
        }
    }
}

/// The path of the first difference between two YAML values (numbers compared as f64, since
/// kustomize writes `1024` where serde reads `1024.0`).
fn first_difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => (x.as_f64() != y.as_f64()).then_some(path),
        (Value::Mapping(x), Value::Mapping(y)) => {
            let keys: BTreeSet<String> = x
                .keys()
                .chain(y.keys())
                .map(|k| serde_yaml::to_string(k).unwrap_or_default())
                .collect();
            if x.len() != y.len() {
                return Some(format!("{path} (keys {keys:?})"));
            }
            x.iter().find_map(|(k, v)| match y.get(k) {
                Some(w) => first_difference(v, w, format!("{path}.{}", k.as_str().unwrap_or("?"))),
                None => Some(format!("{path}.{}", k.as_str().unwrap_or("?"))),
            })
        }
        (Value::Sequence(x), Value::Sequence(y)) => {
            if x.len() != y.len() {
                return Some(format!("{path} (length {} vs {})", x.len(), y.len()));
            }
            x.iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (v, w))| first_difference(v, w, format!("{path}[{i}]")))
        }
        _ => (a != b).then_some(path),
    }
}

fn operator_default(name: &str) -> String {
    let src = read("operator/src/build/mod.rs");
    let line = src
        .lines()
        .find(|l| l.contains(&format!("pub const {name}: &str")))
        .unwrap_or_else(|| panic!("operator/src/build/mod.rs has no {name}"));
    line.split('"').nth(1).unwrap().to_string()
}

fn env_of(container: &Value, name: &str) -> Option<String> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .and_then(|e| e["value"].as_str().map(str::to_string))
}

#[test]
fn image_names_and_tags_agree_everywhere() {
    let defaults = BTreeMap::from([
        ("operator", operator_default("DEFAULT_OPERATOR_IMAGE")),
        ("trainer", operator_default("DEFAULT_TRAINER_IMAGE")),
        (
            "trainerCuda",
            operator_default("DEFAULT_TRAINER_CUDA_IMAGE"),
        ),
        ("fetch", operator_default("DEFAULT_FETCH_IMAGE")),
    ]);
    // Chart values.
    let values: Value =
        serde_yaml::from_str(&read("charts/finetune-operator/values.yaml")).unwrap();
    let chart_image = format!(
        "{}:{}",
        values["image"]["repository"].as_str().unwrap(),
        values["image"]["tag"].as_str().unwrap()
    );
    assert_eq!(
        chart_image, defaults["operator"],
        "values.yaml image vs DEFAULT_OPERATOR_IMAGE"
    );
    for key in ["trainer", "trainerCuda", "fetch"] {
        assert_eq!(
            values["images"][key].as_str(),
            Some(defaults[key].as_str()),
            "values.yaml images.{key}"
        );
    }
    let chart: Value = serde_yaml::from_str(&read("charts/finetune-operator/Chart.yaml")).unwrap();
    let app_version = chart["appVersion"].as_str().unwrap();
    for image in defaults.values() {
        assert!(
            image.ends_with(&format!(":{app_version}"))
                || image.ends_with(&format!(":{app_version}-cuda")),
            "{image} vs appVersion {app_version}"
        );
    }
    // The kustomize base.
    let base = parse_docs(&kustomize(&repo_root().join("manifests/default")).unwrap()).unwrap();
    let deploy = of_kind(&base, "Deployment")[0];
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["image"].as_str(),
        Some(defaults["operator"].as_str()),
        "manifests/default operator image"
    );
    for (env, key) in [
        ("TRAINER_IMAGE", "trainer"),
        ("TRAINER_CUDA_IMAGE", "trainerCuda"),
        ("FETCH_IMAGE", "fetch"),
    ] {
        assert_eq!(
            env_of(container, env).as_deref(),
            Some(defaults[key].as_str()),
            "manifests/default {env}"
        );
    }
    // The test harness's image map uses the operator's constants themselves (no copy to check).
    for (harness, operator) in [
        (
            finetune_e2e::operator::TRAINER_IMAGE,
            defaults["trainer"].as_str(),
        ),
        (
            finetune_e2e::operator::TRAINER_CUDA_IMAGE,
            defaults["trainerCuda"].as_str(),
        ),
        (
            finetune_e2e::operator::FETCH_IMAGE,
            defaults["fetch"].as_str(),
        ),
    ] {
        assert_eq!(harness, operator, "tests/src/operator.rs");
    }
    // Dockerfiles (their usage lines) and `make images`.
    let expected_tags: BTreeSet<&str> = defaults.values().map(String::as_str).collect();
    let tags_in = |text: &str| -> BTreeSet<String> {
        text.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "-t")
            .map(|w| w[1].trim_end_matches(['\\', ';']).to_string())
            .collect()
    };
    let docker: BTreeSet<String> = [
        "docker/operator.Dockerfile",
        "docker/trainer.Dockerfile",
        "docker/trainer-cuda.Dockerfile",
    ]
    .iter()
    .flat_map(|f| tags_in(&read(f)))
    .collect();
    assert_eq!(
        docker.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        expected_tags,
        "tags in docker/*.Dockerfile usage lines"
    );
    // FINETUNE_MAKEFILE: check another Makefile (to try a change before it lands).
    let makefile = match std::env::var("FINETUNE_MAKEFILE") {
        Ok(path) => std::fs::read_to_string(path).unwrap(),
        Err(_) => read("Makefile"),
    };
    let Some(start) = makefile.find("\nimages:") else {
        panic!(
            "the Makefile has no `images` target; add:\n\n{}",
            "OPERATOR_IMAGE ?= ghcr.io/finetune-operator/operator:0.1.0\n\
             FETCH_IMAGE ?= ghcr.io/finetune-operator/fetch:0.1.0\n\
             TRAINER_IMAGE ?= ghcr.io/finetune-operator/trainer:0.1.0\n\
             TRAINER_CUDA_IMAGE ?= ghcr.io/finetune-operator/trainer:0.1.0-cuda\n\n\
             images: ## Build the container images (needs Docker).\n\
             \tdocker build -f docker/operator.Dockerfile --target operator -t $(OPERATOR_IMAGE) .\n\
             \tdocker build -f docker/operator.Dockerfile --target fetch -t $(FETCH_IMAGE) .\n\
             \tdocker build -f docker/trainer.Dockerfile -t $(TRAINER_IMAGE) .\n\
             \tdocker build -f docker/trainer-cuda.Dockerfile -t $(TRAINER_CUDA_IMAGE) ."
        )
    };
    let target: String = makefile[start + 1..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with('\t'))
        .collect::<Vec<_>>()
        .join("\n");
    // Expand simple `NAME ?= value` / `NAME := value` variables.
    let vars: BTreeMap<String, String> = makefile
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once("?=").or_else(|| l.split_once(":="))?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut expanded = target.clone();
    for (k, v) in &vars {
        expanded = expanded.replace(&format!("$({k})"), v);
    }
    let make: BTreeSet<String> = tags_in(&expanded);
    assert_eq!(
        make.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        expected_tags,
        "tags of `make images`:\n{target}"
    );
}

fn rules_of<'a>(docs: &'a [Value], kind: &str) -> Vec<(String, &'a Value)> {
    of_kind(docs, kind)
        .into_iter()
        .flat_map(|role| {
            role["rules"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(move |r| (object_key(role), r))
        })
        .collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

#[test]
fn rbac_is_least_privilege() {
    for (name, values) in value_sets() {
        let docs = render(values.clone());
        let mut rules = rules_of(&docs, "ClusterRole");
        rules.extend(rules_of(&docs, "Role"));
        assert!(!rules.is_empty(), "{name}: no RBAC rules");
        for (role, rule) in &rules {
            let groups = strs(&rule["apiGroups"]);
            let resources = strs(&rule["resources"]);
            let verbs = strs(&rule["verbs"]);
            for v in groups.iter().chain(&resources).chain(&verbs) {
                assert!(!v.contains('*'), "{name}: {role} has a wildcard: {rule:?}");
            }
            for forbidden in ["escalate", "bind", "impersonate", "deletecollection"] {
                assert!(
                    !verbs.iter().any(|v| v == forbidden),
                    "{name}: {role} grants {forbidden}"
                );
            }
            for forbidden in [
                "secrets",
                "pods/exec",
                "pods/attach",
                "pods/portforward",
                "serviceaccounts/token",
                "customresourcedefinitions",
                "clusterroles",
                "rolebindings",
                "clusterrolebindings",
                "roles",
            ] {
                assert!(
                    !resources.iter().any(|r| r == forbidden),
                    "{name}: {role} grants {forbidden}"
                );
            }
            assert!(
                rule["nonResourceURLs"].is_null(),
                "{name}: {role} grants non-resource URLs"
            );
        }
        // Exactly the verbs the operator uses (operator/src/controller.rs, kube-runtime's event
        // Recorder, kube-lease-manager); the cluster test proves they are sufficient.
        let granted = |group: &str, resource: &str| -> BTreeSet<String> {
            rules
                .iter()
                .filter(|(_, r)| {
                    strs(&r["apiGroups"]).iter().any(|g| g == group)
                        && strs(&r["resources"]).iter().any(|x| x == resource)
                })
                .flat_map(|(_, r)| strs(&r["verbs"]))
                .collect()
        };
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            granted("finetune.dev", "finetunejobs"),
            set(&["get", "list", "watch"]),
            "{name}"
        );
        assert_eq!(
            granted("finetune.dev", "finetunejobs/status"),
            set(&["patch"]),
            "{name}"
        );
        assert_eq!(
            granted("finetune.dev", "finetunejobs/finalizers"),
            set(&["update"]),
            "{name}"
        );
        assert_eq!(
            granted("", "pods"),
            set(&["get", "list", "watch", "create", "patch", "delete"]),
            "{name}"
        );
        assert_eq!(
            granted("", "persistentvolumeclaims"),
            set(&["get", "list", "watch", "create", "patch"]),
            "{name}"
        );
        assert_eq!(granted("", "nodes"), set(&["get"]), "{name}");
        assert_eq!(
            granted("networking.k8s.io", "networkpolicies"),
            set(&["get", "create", "patch", "delete"]),
            "{name}"
        );
        // With watchNamespace, the job rules are namespaced: the only cluster-wide rule is the
        // read of nodes (cluster-scoped).
        let watched = values["operator"]["watchNamespace"].as_str().unwrap_or("");
        if !watched.is_empty() {
            for (role, rule) in &rules {
                if role.starts_with("ClusterRole/") {
                    assert_eq!(
                        strs(&rule["resources"]),
                        vec!["nodes".to_string()],
                        "{name}: {role} is cluster-wide with watchNamespace: {rule:?}"
                    );
                }
            }
        }
        assert_eq!(
            granted("events.k8s.io", "events"),
            set(&["create", "patch"]),
            "{name}"
        );
        // PodGroups only for the gang schedulers the values name.
        let schedulers: Vec<&str> = values["rbac"]["podGroupSchedulers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str())
            .collect();
        for (scheduler, group) in [
            ("coscheduling", "scheduling.x-k8s.io"),
            ("volcano", "scheduling.volcano.sh"),
        ] {
            let expected = if schedulers.contains(&scheduler) {
                set(&["get", "create", "patch", "delete"])
            } else {
                BTreeSet::new()
            };
            assert_eq!(granted(group, "podgroups"), expected, "{name}: {group}");
        }
        let lease_rules: Vec<_> = rules
            .iter()
            .filter(|(_, r)| strs(&r["resources"]).iter().any(|x| x == "leases"))
            .collect();
        for (role, r) in &lease_rules {
            assert!(
                role.starts_with("Role/"),
                "{name}: leases only through a namespaced Role, not {role}"
            );
            let verbs = strs(&r["verbs"]);
            if verbs.iter().any(|v| v != "create") {
                assert!(
                    !strs(&r["resourceNames"]).is_empty(),
                    "{name}: lease {verbs:?} must be limited to the operator's Lease"
                );
            }
        }
    }
}

#[test]
fn deployment_is_ha_probed_and_restricted() {
    let docs = render(json!({}));
    let deploy = of_kind(&docs, "Deployment")[0];
    let spec = &deploy["spec"];
    assert_eq!(spec["replicas"].as_i64(), Some(2));
    let pod = &spec["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(env_of(c, "LEADER_ELECTION").as_deref(), Some("true"));
    assert_eq!(
        env_of(c, "LEADER_ELECTION_LEASE").as_deref(),
        Some("finetune-operator-leader")
    );
    for downward in ["POD_NAME", "POD_NAMESPACE"] {
        let e = c["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"].as_str() == Some(downward))
            .unwrap();
        assert!(
            e["valueFrom"]["fieldRef"]["fieldPath"].is_string(),
            "{downward} from the downward API"
        );
    }
    // Every variable set is one the operator reads (a flag's env in operator/src/args.rs).
    let args_rs = read("operator/src/args.rs");
    let known: BTreeSet<&str> = args_rs
        .split("env = \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .chain(["RUST_LOG"])
        .collect();
    for e in c["env"].as_sequence().unwrap() {
        let name = e["name"].as_str().unwrap();
        assert!(
            known.contains(name),
            "the Deployment sets {name}, which the operator does not read ({known:?})"
        );
    }
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    for r in ["requests", "limits"] {
        assert!(
            c["resources"][r]["memory"].is_string() && c["resources"][r]["cpu"].is_string(),
            "resources.{r}"
        );
    }
    // Pod Security Standards "restricted" (plus a read-only root filesystem).
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"].as_bool(), Some(true));
    assert_ne!(psc["runAsUser"].as_i64(), Some(0));
    assert_eq!(
        psc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(strs(&sc["capabilities"]["drop"]), vec!["ALL".to_string()]);
    assert!(sc["capabilities"]["add"].is_null());
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        assert!(
            pod[host].is_null() || pod[host].as_bool() == Some(false),
            "{host}"
        );
    }
    assert!(pod["volumes"].is_null(), "no volumes (no hostPath)");
    // The PDB and the Service select the operator pods.
    let labels = &spec["template"]["metadata"]["labels"];
    for kind in ["PodDisruptionBudget", "NetworkPolicy"] {
        let o = of_kind(&docs, kind)[0];
        let sel = if kind == "NetworkPolicy" {
            &o["spec"]["podSelector"]["matchLabels"]
        } else {
            &o["spec"]["selector"]["matchLabels"]
        };
        for (k, v) in sel.as_mapping().unwrap() {
            assert_eq!(&labels[k], v, "{kind} selector");
        }
    }
    let svc = of_kind(&docs, "Service")[0];
    assert_eq!(
        svc["spec"]["ports"][0]["targetPort"].as_str(),
        Some("metrics")
    );
}

/// Metric names the operator and the trainer register (string literals in their sources).
fn registered_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in ["operator/src/metrics.rs", "trainer/src/metrics/registry.rs"] {
        let src = read(file);
        for part in src.split('"').skip(1).step_by(2) {
            if part.starts_with("finetune_")
                && part.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            {
                names.insert(part.to_string());
            }
        }
    }
    names
}

fn metric_names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        if expr[expr.char_indices().nth(i).map_or(0, |(p, _)| p)..].starts_with("finetune_")
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == '_'))
        {
            let name: String = bytes[i..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                .collect();
            i += name.len();
            // `finetune_job` is the label the PodMonitor adds, not a metric.
            if name != "finetune_job" {
                out.push(name);
            }
        } else {
            i += 1;
        }
    }
    out
}

fn base_metric(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(b) = name.strip_suffix(suffix) {
            return b;
        }
    }
    name
}

/// Every panel query of a dashboard.
pub fn dashboard_queries(dash: &serde_json::Value) -> Vec<(String, String)> {
    dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("").to_string();
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap().to_string()))
        })
        .collect()
}

#[test]
fn dashboards_are_valid_and_query_registered_metrics() {
    let registered = registered_metrics();
    assert!(registered.len() > 20, "found {registered:?}");
    let dir = chart_dir().join("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "a per-job and a fleet dashboard");
    for file in &files {
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        assert!(dash["uid"].is_string() && dash["title"].is_string());
        let vars: Vec<&str> = dash["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert!(vars.contains(&"datasource"));
        let ids: BTreeSet<i64> = dash["panels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_i64().unwrap())
            .collect();
        assert_eq!(
            ids.len(),
            dash["panels"].as_array().unwrap().len(),
            "unique panel ids"
        );
        for (title, expr) in dashboard_queries(&dash) {
            let names = metric_names_in(&expr);
            assert!(
                !names.is_empty() || expr.contains("up{job=\"$operator_job\"}"),
                "{}: panel {title:?} queries no finetune metric: {expr}",
                file.display()
            );
            for n in names {
                assert!(
                    registered.contains(base_metric(&n)),
                    "{}: panel {title:?} uses unknown metric {n}",
                    file.display()
                );
            }
            for v in ["$namespace", "$job", "$operator_job"] {
                if expr.contains(v) {
                    assert!(
                        vars.contains(&&v[1..]),
                        "{}: {title:?} uses undefined {v}",
                        file.display()
                    );
                }
            }
        }
    }
    let job: serde_json::Value = serde_json::from_str(&read(
        "charts/finetune-operator/dashboards/finetune-job.json",
    ))
    .unwrap();
    let titles: Vec<String> = dashboard_queries(&job)
        .into_iter()
        .map(|(t, _)| t.to_lowercase())
        .collect();
    for want in [
        "train vs validation loss",
        "generalization gap",
        "accuracy",
        "learning rate",
        "gradient norm",
        "tokens per second",
        "eta",
        "checkpoints",
        "restarts",
        "memory",
        "retention perplexity",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(want)),
            "per-job dashboard lacks {want:?}"
        );
    }
    // The rendered ConfigMaps carry the sidecar label and the exact JSON.
    let docs = render(json!({}));
    for cm in of_kind(&docs, "ConfigMap") {
        assert_eq!(
            cm["metadata"]["labels"]["grafana_dashboard"].as_str(),
            Some("1")
        );
        let (file, body) = cm["data"].as_mapping().unwrap().iter().next().unwrap();
        let on_disk: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(file.as_str().unwrap())).unwrap(),
        )
        .unwrap();
        let in_cm: serde_json::Value = serde_json::from_str(body.as_str().unwrap()).unwrap();
        assert_eq!(in_cm, on_disk);
    }
}

fn alert_names(rules: &Value) -> Vec<String> {
    rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn promtool_checks_and_unit_tests_every_alert() {
    ensure_apt_tool("promtool", "prometheus").unwrap();
    let files = chart_dir().join("files");
    let alerts_text = std::fs::read_to_string(files.join("alerts.yaml")).unwrap();
    let mut alerts: Value = serde_yaml::from_str(&alerts_text).unwrap();
    let names = alert_names(&alerts);
    for want in [
        "FineTuneJobOverfitting",
        "FineTuneJobLossNotFinite",
        "FineTuneJobLossDiverging",
        "FineTuneJobStalled",
        "FineTuneJobFailed",
        "FineTuneJobFrequentRestarts",
        "FineTuneJobUnschedulable",
        "FineTuneOperatorDown",
        "FineTuneOperatorReconcileErrors",
    ] {
        assert!(names.iter().any(|n| n == want), "alerts.yaml lacks {want}");
    }
    let out = run_ok(
        "promtool check rules",
        Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(files.join("alerts.yaml")),
    )
    .unwrap();
    eprintln!("{out}");
    // Every alert has its runbook text and is tested firing and not firing.
    let tests: Value =
        serde_yaml::from_str(&std::fs::read_to_string(files.join("alerts_test.yaml")).unwrap())
            .unwrap();
    let mut fired = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for t in tests["tests"].as_sequence().unwrap() {
        for a in t["alert_rule_test"].as_sequence().unwrap() {
            let name = a["alertname"].as_str().unwrap().to_string();
            if a["exp_alerts"].as_sequence().is_none_or(|s| s.is_empty()) {
                silent.insert(name);
            } else {
                fired.insert(name);
            }
        }
    }
    for g in alerts["groups"].as_sequence_mut().unwrap() {
        for r in g["rules"].as_sequence_mut().unwrap() {
            let name = r["alert"].as_str().unwrap().to_string();
            for a in ["summary", "description", "runbook"] {
                assert!(
                    r["annotations"][a].as_str().is_some_and(|s| s.len() > 10),
                    "{name} lacks annotation {a}"
                );
            }
            assert!(
                fired.contains(&name),
                "alerts_test.yaml never expects {name} to fire"
            );
            assert!(
                silent.contains(&name),
                "alerts_test.yaml never expects {name} to stay silent"
            );
            r.as_mapping_mut().unwrap().remove("annotations");
        }
    }
    // promtool compares annotations too: run the tests against the rules without them.
    let dir = std::env::temp_dir().join(format!("finetune-promtool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("alerts.yaml"),
        serde_yaml::to_string(&alerts).unwrap(),
    )
    .unwrap();
    std::fs::copy(files.join("alerts_test.yaml"), dir.join("alerts_test.yaml")).unwrap();
    let out = run_ok(
        "promtool test rules",
        Command::new("promtool")
            .arg("test")
            .arg("rules")
            .arg(dir.join("alerts_test.yaml")),
    );
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("{}", out.unwrap());
    // The chart's PrometheusRule carries exactly these groups.
    let docs = render(json!({"prometheusRule": {"enabled": true}}));
    let rule = of_kind(&docs, "PrometheusRule")[0];
    let shipped: Value = serde_yaml::from_str(&alerts_text).unwrap();
    assert_eq!(rule["spec"]["groups"], shipped["groups"]);
    let renamed = render(json!({"prometheusRule": {"enabled": true}, "fullnameOverride": "ft"}));
    let text = serde_yaml::to_string(&of_kind(&renamed, "PrometheusRule")[0]["spec"]).unwrap();
    assert!(
        !text.contains("job=\"finetune-operator\"") && text.contains("job=\"ft\""),
        "rules follow the release's scrape job"
    );
}

fn fixtures() -> Vec<(String, Value)> {
    let dir = chart_dir().join("argocd/fixtures");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            (
                p.file_stem().unwrap().to_string_lossy().into_owned(),
                serde_yaml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 5, "fixtures in {}", dir.display());
    out
}

#[test]
fn argocd_health_check_on_status_fixtures() {
    let mut seen = BTreeSet::new();
    for (name, fx) in fixtures() {
        let (status, message) = argocd_health(&fx["object"]).unwrap();
        let (status, message) = (status.as_str(), message.as_str());
        let want = fx["expect"]["argocd"].as_str().unwrap();
        assert_eq!(status, want, "{name}: Argo CD health ({message})");
        assert!(!message.is_empty(), "{name}: a message");
        eprintln!("{name}: {status}: {message}");
        seen.insert(status.to_string());
    }
    for want in ["Progressing", "Healthy", "Degraded", "Suspended"] {
        assert!(seen.contains(want), "no fixture gives {want}");
    }
    // The docs carry the same script (for argocd-cm's resource.customizations).
    let docs = read("docs/argocd.md");
    for line in read("charts/finetune-operator/argocd/health.lua")
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        assert!(
            docs.contains(line),
            "docs/argocd.md is missing the health.lua line {line:?}"
        );
    }
}

fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_sequence()?
        .iter()
        .find(|c| c["type"].as_str() == Some(type_))
}

/// kstatus (sigs.k8s.io/cli-utils/pkg/kstatus/status) for a custom resource: deletion →
/// Terminating; observedGeneration ≠ generation → InProgress; Reconciling=True → InProgress;
/// Stalled=True → Failed; otherwise Current. `read_ready` is the variant (used by some Flux
/// versions) that then also maps Ready=True → Current and Ready=False → InProgress.
fn kstatus(obj: &Value, read_ready: bool) -> &'static str {
    if obj["metadata"]["deletionTimestamp"].is_string() {
        return "Terminating";
    }
    if let (Some(g), Some(o)) = (
        obj["metadata"]["generation"].as_i64(),
        obj["status"]["observedGeneration"].as_i64(),
    ) && g != o
    {
        return "InProgress";
    }
    let is = |t: &str, s: &str| condition(obj, t).is_some_and(|c| c["status"].as_str() == Some(s));
    if !read_ready {
        if is("Reconciling", "True") {
            return "InProgress";
        }
        if is("Stalled", "True") {
            return "Failed";
        }
        return "Current";
    }
    match condition(obj, "Ready").and_then(|c| c["status"].as_str()) {
        Some("True") => "Current",
        Some(_) => "InProgress",
        None => "Current",
    }
}

#[test]
fn status_fixtures_follow_kstatus_rules() {
    for (name, fx) in fixtures() {
        let obj = &fx["object"];
        assert_eq!(
            kstatus(obj, false),
            fx["expect"]["kstatus"].as_str().unwrap(),
            "{name}: kstatus"
        );
        assert_eq!(
            kstatus(obj, true),
            fx["expect"]["kstatusReady"].as_str().unwrap(),
            "{name}: kstatus (Ready)"
        );
        let Some(status) = obj.get("status") else {
            continue;
        };
        // kstatus needs the Ready condition and observedGeneration on every written status,
        // conditions stamped with the generation they describe, and Ready=True only on success.
        let generation = obj["metadata"]["generation"].as_i64();
        assert!(
            status["observedGeneration"].as_i64().is_some(),
            "{name}: observedGeneration"
        );
        let ready = condition(obj, "Ready").unwrap_or_else(|| panic!("{name}: Ready condition"));
        assert_eq!(
            ready["status"].as_str() == Some("True"),
            status["phase"].as_str() == Some("Succeeded"),
            "{name}: Ready iff Succeeded"
        );
        for c in status["conditions"].as_sequence().unwrap() {
            for field in ["type", "status", "reason", "message", "lastTransitionTime"] {
                assert!(c[field].is_string(), "{name}: condition {field}");
            }
            assert!(matches!(
                c["status"].as_str(),
                Some("True" | "False" | "Unknown")
            ));
            assert!(
                c["observedGeneration"].as_i64() <= generation,
                "{name}: condition generation"
            );
        }
    }
}

/// checkov's Kubernetes policies on the rendered chart (default and monitoring values), except
/// three on purpose: CKV_K8S_43 (image digest: the chart pins tags, `image.digest` is optional),
/// CKV_K8S_38 (the operator needs its ServiceAccount token to talk to the API server) and
/// CKV_K8S_15 (pull policy Always: release tags are immutable, IfNotPresent is the default).
#[test]
fn checkov_finds_nothing_in_the_rendered_chart() {
    let checkov = checkov().unwrap();
    let dir = std::env::temp_dir().join(format!("finetune-checkov-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, values) in value_sets().into_iter().take(2) {
        let text = helm_render(Some(&values), RELEASE, NAMESPACE, false).unwrap();
        std::fs::write(dir.join(format!("{name}.yaml")), text).unwrap();
    }
    let out = Command::new(checkov)
        .arg("-d")
        .arg(&dir)
        .args([
            "--framework",
            "kubernetes",
            "--quiet",
            "--compact",
            "--skip-download",
            "-o",
            "json",
        ])
        .args(["--skip-check", "CKV_K8S_43,CKV_K8S_38,CKV_K8S_15"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "checkov output ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let summary = &report["summary"];
    eprintln!("checkov: {summary}");
    assert!(summary["passed"].as_u64().unwrap_or(0) > 50, "{summary}");
    assert_eq!(
        summary["failed"].as_u64(),
        Some(0),
        "checkov failures:\n{:#}",
        report["results"]["failed_checks"]
    );
}

#[test]
fn dashboards_match_their_generator() {
    let dir = std::env::temp_dir().join(format!("finetune-dashboards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    run_ok(
        "python3 charts/hack/dashboards.py",
        Command::new("python3")
            .arg(repo_root().join("charts/hack/dashboards.py"))
            .arg(&dir),
    )
    .unwrap();
    for name in ["finetune-job.json", "finetune-fleet.json"] {
        let generated = std::fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(
            read(format!("charts/finetune-operator/dashboards/{name}")),
            generated,
            "{name} is not what charts/hack/dashboards.py generates: run python3 charts/hack/dashboards.py"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The CUDA image's build stage has no GPU: none of its `RUN` commands may execute the CUDA
/// build of the trainer (it is only installed); the tiny base comes from a CPU build.
#[test]
fn the_cuda_image_build_never_runs_the_cuda_binary() {
    let text = read("docker/trainer-cuda.Dockerfile").replace("\\\n", " ");
    let cuda_binaries = ["/out/finetune-trainer", "target/release/finetune-trainer"];
    let mut runs = 0;
    for run in text.lines().filter_map(|l| l.strip_prefix("RUN ")) {
        runs += 1;
        for command in run.split("&&") {
            let program = command.split_whitespace().next().unwrap_or_default();
            assert!(
                !cuda_binaries.contains(&program),
                "the build stage runs the CUDA binary: `{}`",
                command.trim()
            );
        }
    }
    assert!(runs >= 2, "no RUN instructions found");
    assert!(
        text.contains("target/cpu/release/finetune-trainer init-tiny"),
        "the tiny base is initialised by the CPU build"
    );
}
