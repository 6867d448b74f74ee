//! What platform teams set on the trainer pod beyond resources and scheduling: its identity,
//! pull secrets, runtime class, scheduler, and labels and annotations for the mesh, autoscalers
//! and cost tools.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::source::is_dns_subdomain;

/// Label and annotation key prefixes the operator owns on its pods; `trainerPod` may not set them.
pub const RESERVED_KEY_PREFIXES: [&str; 2] = ["finetune.dev/", "app.kubernetes.io/"];

/// Settings copied onto the trainer pod.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerPodSpec {
    /// Labels added to the trainer pod (e.g. `sidecar.istio.io/inject: "false"`, a cost centre).
    /// Keys under `finetune.dev/` and `app.kubernetes.io/` are the operator's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 63}))]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to the trainer pod (e.g. `karpenter.sh/do-not-disrupt: "true"`,
    /// `cluster-autoscaler.kubernetes.io/safe-to-evict: "false"`). Keys under `finetune.dev/`
    /// and `app.kubernetes.io/` are the operator's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 4096}))]
    pub annotations: BTreeMap<String, String>,
    /// ServiceAccount of the trainer pod, for workload identity (IRSA, GKE Workload Identity,
    /// Azure Workload Identity) to read datasets or models from object storage. Its API token
    /// is still not mounted (`automountServiceAccountToken: false`); the identity webhooks
    /// project their own tokens. Default: the namespace's `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,
    /// Secrets (by name, in the job's namespace) for pulling the trainer image from a private
    /// registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub image_pull_secrets: Vec<SecretName>,
    /// RuntimeClass of the trainer pod (e.g. `nvidia` where the GPU runtime is not the
    /// default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub runtime_class_name: Option<String>,
    /// Scheduler of the trainer pod (e.g. `volcano`); default: the cluster's default scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub scheduler_name: Option<String>,
}

/// A Secret in the job's namespace, by name.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct SecretName {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

impl TrainerPodSpec {
    /// Each problem as (field path under `spec.trainerPod`, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (field, keys) in [
            ("labels", self.labels.keys()),
            ("annotations", self.annotations.keys()),
        ] {
            for key in keys {
                let path = format!("spec.trainerPod.{field}[{key:?}]");
                if let Some(prefix) = RESERVED_KEY_PREFIXES.iter().find(|p| key.starts_with(*p)) {
                    out.push((path, format!("keys under {prefix} are set by the operator")));
                } else if !is_qualified_name(key) {
                    out.push((
                        path,
                        "is not a valid key: an optional DNS prefix and '/', then at most 63 \
                         letters, digits, '-', '_' or '.', starting and ending alphanumeric"
                            .into(),
                    ));
                }
            }
        }
        for (key, value) in &self.labels {
            if !is_label_value(value) {
                out.push((
                    format!("spec.trainerPod.labels[{key:?}]"),
                    format!("{value:?} is not a valid label value (at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric)"),
                ));
            }
        }
        let names = [
            ("serviceAccountName", self.service_account_name.as_deref()),
            ("runtimeClassName", self.runtime_class_name.as_deref()),
            ("schedulerName", self.scheduler_name.as_deref()),
        ];
        let secrets = self
            .image_pull_secrets
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("imagePullSecrets[{i}].name"), s.name.as_str()));
        let named = names
            .into_iter()
            .filter_map(|(f, v)| v.map(|v| (f.to_string(), v)))
            .chain(secrets);
        for (field, name) in named {
            if !is_dns_subdomain(name) {
                out.push((
                    format!("spec.trainerPod.{field}"),
                    format!("{name:?} is not a valid name (lowercase DNS subdomain)"),
                ));
            }
        }
        out
    }
}

/// A Kubernetes label or annotation key: `[prefix/]name`.
fn is_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    prefix.is_none_or(is_dns_subdomain) && !name.is_empty() && is_label_value(name)
}

/// A label value (or the name part of a key): at most 63 characters, alphanumerics with `-`,
/// `_` and `.` inside. The empty value is allowed.
fn is_label_value(v: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    v.is_empty()
        || (v.len() <= 63
            && alnum(v.chars().next())
            && alnum(v.chars().last())
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reserved_and_malformed_keys_and_names_are_refused_with_their_field() {
        let spec: TrainerPodSpec = serde_json::from_value(serde_json::json!({
            "labels": {"finetune.dev/job": "x", "team": "ml", "bad key": "v", "ok": "not ok!"},
            "annotations": {"karpenter.sh/do-not-disrupt": "true", "app.kubernetes.io/name": "y"},
            "serviceAccountName": "Trainer",
            "imagePullSecrets": [{"name": "mirror"}, {"name": "no_underscores"}],
            "schedulerName": "volcano"
        }))
        .unwrap();
        let paths: Vec<String> = spec.problems().into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            paths,
            vec![
                r#"spec.trainerPod.labels["bad key"]"#,
                r#"spec.trainerPod.labels["finetune.dev/job"]"#,
                r#"spec.trainerPod.annotations["app.kubernetes.io/name"]"#,
                r#"spec.trainerPod.labels["ok"]"#,
                "spec.trainerPod.serviceAccountName",
                "spec.trainerPod.imagePullSecrets[1].name",
            ]
        );
        assert!(TrainerPodSpec::default().problems().is_empty());
    }
}
