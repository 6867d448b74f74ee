//! A container's environment, resolved as a kubelet does: the fixed variables, the image's env,
//! `envFrom`, then `env` with `valueFrom` (`fieldRef`, `secretKeyRef`, `configMapKeyRef`,
//! `resourceFieldRef`) and `$(VAR)` expansion; plus the downward-API field values that
//! `fieldRef` and downwardAPI volumes read.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, EnvVar};

use super::pods::PodCtx;
use super::volumes::{KeySource, key_files};

/// The `PATH` a container gets unless its image or spec sets one.
pub(super) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The value of a downward-API field path.
pub(super) fn field_value(ctx: &PodCtx, path: &str) -> String {
    let meta = &ctx.pod.metadata;
    let spec = ctx.pod.spec.as_ref();
    let map_key = |prefix: &str, map: Option<&BTreeMap<String, String>>| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        map.and_then(|m| m.get(key).cloned())
    };
    match path {
        "metadata.name" => ctx.name.clone(),
        "metadata.namespace" => ctx.ns.clone(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => ctx.ip.clone(),
        "status.hostIP" | "status.hostIPs" => ctx.host_ip.clone(),
        p if p.starts_with("metadata.labels['") => {
            map_key("metadata.labels['", meta.labels.as_ref()).unwrap_or_default()
        }
        p if p.starts_with("metadata.annotations['") => {
            map_key("metadata.annotations['", meta.annotations.as_ref()).unwrap_or_default()
        }
        _ => String::new(),
    }
}

/// Expands `$(VAR)` references (kubelet semantics: `$$` escapes, unknown names stay as written).
pub fn expand(input: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn set_env(env: &mut Vec<(String, String)>, k: String, v: String) {
    env.retain(|(name, _)| *name != k);
    env.push((k, v));
}

/// The environment of container `c`, in order (later entries of the same name replaced earlier
/// ones). An error is the message of a `CreateContainerConfigError` (a missing source or key).
pub(super) async fn resolve_env(
    ctx: &PodCtx,
    c: &Container,
    image_env: &[(String, String)],
) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), "/root".into()),
        ("HOSTNAME".into(), ctx.name.clone()),
        ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
        (
            "KUBERNETES_SERVICE_PORT".into(),
            ctx.shared.apiserver_port.to_string(),
        ),
    ];
    for (k, v) in image_env {
        set_env(&mut env, k.clone(), v.clone());
    }
    for from in c.env_from.as_deref().unwrap_or_default() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let config_map = from.config_map_ref.as_ref();
        let secret = from.secret_ref.as_ref();
        let keyed = [
            config_map.map(|r| (KeySource::ConfigMap, &r.name, r.optional)),
            secret.map(|r| (KeySource::Secret, &r.name, r.optional)),
        ];
        for (source, name, optional) in keyed.into_iter().flatten() {
            for (k, v, _) in key_files(ctx, source, name, None, optional).await? {
                set_env(
                    &mut env,
                    format!("{prefix}{k}"),
                    String::from_utf8_lossy(&v).into_owned(),
                );
            }
        }
    }
    for EnvVar {
        name,
        value,
        value_from,
    } in c.env.as_deref().unwrap_or_default()
    {
        let v = match (value, value_from) {
            (Some(v), _) => expand(v, &env),
            (None, Some(src)) => {
                if let Some(f) = &src.field_ref {
                    field_value(ctx, &f.field_path)
                } else if let Some(r) = &src.secret_key_ref {
                    match key_value(ctx, KeySource::Secret, &r.name, &r.key, r.optional).await? {
                        Some(v) => v,
                        None => continue,
                    }
                } else if let Some(r) = &src.config_map_key_ref {
                    match key_value(ctx, KeySource::ConfigMap, &r.name, &r.key, r.optional).await? {
                        Some(v) => v,
                        None => continue,
                    }
                } else if let Some(r) = &src.resource_field_ref {
                    let res = c.resources.as_ref();
                    let (kind, resource) = r
                        .resource
                        .split_once('.')
                        .unwrap_or(("limits", &r.resource));
                    let map = if kind == "requests" {
                        res.and_then(|x| x.requests.as_ref())
                    } else {
                        res.and_then(|x| x.limits.as_ref())
                    };
                    map.and_then(|m| m.get(resource))
                        .map(|q| q.0.clone())
                        .unwrap_or_else(|| "0".into())
                } else {
                    String::new()
                }
            }
            (None, None) => String::new(),
        };
        set_env(&mut env, name.clone(), v);
    }
    Ok(env)
}

/// The value of `key` in a ConfigMap or Secret (`secretKeyRef`, `configMapKeyRef`); `None` when
/// the key (or the object) is missing and the reference is optional.
async fn key_value(
    ctx: &PodCtx,
    source: KeySource,
    name: &str,
    key: &str,
    optional: Option<bool>,
) -> Result<Option<String>, String> {
    let files = key_files(ctx, source, name, None, optional).await?;
    match files.into_iter().find(|(k, _, _)| *k == key) {
        Some((_, v, _)) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
        None if optional == Some(true) => Ok(None),
        None => Err(format!(
            "couldn't find key {key} in {} {}/{name}",
            source.kind(),
            ctx.ns
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_kubelet() {
        let env = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &env), "x-$(B)-$(A)-$");
    }
}
