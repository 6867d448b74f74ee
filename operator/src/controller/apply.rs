//! Apply: carry out a [`Plan`] — remember what it says, run its writes in order (server-side
//! apply with one field manager, deletes, the status patch), then count what it counted.

use finetune_api::{FineTuneJob, FineTuneJobSpec, FineTuneJobStatus, JobPhase};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use tracing::{info, warn};

use super::ACCEPTED_SPEC_KEY;
use super::decide::{Plan, Write};
use crate::build::{Children, name_and_namespace, pod_group_api};
use crate::context::Context;
use crate::names;
use crate::reason::Reason;
use crate::status::{condition, find_condition, merge_diff};
use crate::{Error, FIELD_MANAGER, Result};

/// Executes `plan` for `job`, whose spec as run is `spec` (recorded with the children).
pub async fn execute(
    job: &FineTuneJob,
    ctx: &Context,
    spec: &FineTuneJobSpec,
    plan: Plan,
) -> Result<()> {
    let (name, ns) = name_and_namespace(job)?;
    let uid = job.uid().unwrap_or_default();
    if plan.forget {
        ctx.forget(&uid);
    } else {
        ctx.remember(&uid, |m| {
            let (superseded, failures) = (m.superseded_version.take(), m.failed_reconciles);
            *m = plan.memory.clone();
            m.superseded_version = superseded;
            m.failed_reconciles = failures;
        });
    }
    if let Some(waited) = plan.unschedulable_for {
        ctx.metrics
            .unschedulable_seconds
            .observe(waited.as_secs_f64());
    }
    ctx.metrics
        .unschedulable_jobs
        .set(ctx.count_unschedulable());
    let old = job.status.clone().unwrap_or_default();
    for write in plan.writes {
        let what = write.describe();
        let children_write = !matches!(write, Write::Status);
        let done = match write {
            Write::ApplyChildren(children) => apply_children(ctx, &ns, *children, spec).await,
            Write::DeletePods { names, grace } => delete_pods(ctx, &ns, &names, grace).await,
            Write::Status => write_status(job, ctx, &ns, &name, &old, &plan.status).await,
            Write::DeleteFinishedChildren => delete_finished_children(ctx, &ns, &name, spec).await,
        };
        if let Err(e) = done {
            if children_write {
                let message = format!("{what}: {}", e.api_message());
                report_failed_write(job, ctx, &ns, &name, &old, &message).await;
            }
            return Err(Error::Write {
                write: what,
                source: Box::new(e),
            });
        }
    }
    if let Some(class) = plan.restart {
        ctx.metrics.pod_restarts.with_label_values(&[class]).inc();
    }
    Ok(())
}

/// Shows a refused write of the job's children in its status (`Ready=False`, reason
/// `ApplyFailed`, `message`: the write and the API server's words), the rest of the status as it
/// was. Best effort: the reconcile fails with the write's error either way.
async fn report_failed_write(
    job: &FineTuneJob,
    ctx: &Context,
    ns: &str,
    name: &str,
    old: &FineTuneJobStatus,
    message: &str,
) {
    let now = super::plan::Clock::now().wall;
    let status = crate::status::with_failed_write(old, message, job.metadata.generation, &now);
    if let Err(e) = write_status(job, ctx, ns, name, old, &status).await {
        warn!(error = %e, "could not report the failed write in the status");
    }
}

async fn delete_pods(ctx: &Context, ns: &str, pods: &[String], grace: Option<u32>) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    for pod in pods {
        ctx.metrics.api_writes.with_label_values(&["delete"]).inc();
        let dp = DeleteParams {
            grace_period_seconds: grace,
            ..DeleteParams::background()
        };
        match api.delete(pod, &dp).await {
            Ok(_) => {
                info!(pod, "deleted trainer pod");
                crate::crash_point!("after-delete-pod");
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn apply<K>(ctx: &Context, api: &Api<K>, obj: &K) -> Result<()>
where
    K: Resource<DynamicType = ()>
        + Serialize
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let name = obj
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingField("metadata.name"))?;
    let mut value = serde_json::to_value(obj)?;
    value["apiVersion"] = serde_json::Value::String(K::api_version(&()).into_owned());
    value["kind"] = serde_json::Value::String(K::kind(&()).into_owned());
    ctx.metrics.api_writes.with_label_values(&["apply"]).inc();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await?;
    crate::crash_point!(&format!("after-apply-{}", K::kind(&()).to_lowercase()));
    Ok(())
}

/// Applies every child with server-side apply. The ConfigMap also records the accepted spec.
async fn apply_children(
    ctx: &Context,
    ns: &str,
    mut children: Children,
    spec: &FineTuneJobSpec,
) -> Result<()> {
    let client = &ctx.client;
    children
        .config_map
        .data
        .get_or_insert_with(Default::default)
        .insert(ACCEPTED_SPEC_KEY.into(), serde_json::to_string(spec)?);
    apply(
        ctx,
        &Api::<ConfigMap>::namespaced(client.clone(), ns),
        &children.config_map,
    )
    .await?;
    if let Some(pvc) = &children.checkpoint_claim {
        let api = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns);
        // A claim's spec is immutable once bound: create it once, never re-apply.
        if api.get_opt(&pvc.name_any()).await?.is_none() {
            apply(ctx, &api, pvc).await?;
        }
    }
    apply(
        ctx,
        &Api::<Service>::namespaced(client.clone(), ns),
        &children.metrics_service,
    )
    .await?;
    // Before the pod, so the trainer never runs without its NetworkPolicy.
    apply(
        ctx,
        &Api::<NetworkPolicy>::namespaced(client.clone(), ns),
        &children.network_policy,
    )
    .await?;
    // The PodGroup before the pods: a gang scheduler holds pods whose group does not exist.
    if let Some(group) = &children.pod_group {
        apply_pod_group(ctx, ns, spec, group).await?;
    }
    // A gang's pods are created together (rank order), so a gang scheduler sees them all.
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    for pod in &children.pods {
        apply(ctx, &pods, pod).await?;
    }
    Ok(())
}

/// Applies a gang-scheduled job's PodGroup; a cluster without the scheduler's CRD is named as
/// such (the API server only says "could not find the requested resource").
async fn apply_pod_group(
    ctx: &Context,
    ns: &str,
    spec: &FineTuneJobSpec,
    group: &DynamicObject,
) -> Result<()> {
    let Some(gang) = &spec.resources.gang_scheduling else {
        return Ok(());
    };
    let resource = pod_group_api(gang);
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &resource);
    // The object carries its apiVersion and kind (its `types`, set by the builder).
    let value = serde_json::to_value(group)?;
    ctx.metrics.api_writes.with_label_values(&["apply"]).inc();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api
        .patch(&group.name_any(), &params, &Patch::Apply(&value))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(Error::MissingApi {
            api: format!("{} {}", resource.api_version, resource.kind),
            hint: "install the gang scheduler and its PodGroup CRD, or remove \
                   spec.resources.gangScheduling (docs/distributed.md)",
        }),
        Err(e) => Err(e.into()),
    }
}

/// Deletes a finished job's ConfigMap, metrics Service, NetworkPolicy and PodGroup once its TTL
/// expired. Each is read first, so that a job whose children are gone causes no writes.
async fn delete_finished_children(
    ctx: &Context,
    ns: &str,
    name: &str,
    spec: &FineTuneJobSpec,
) -> Result<()> {
    let client = &ctx.client;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    if delete_if_present(ctx, &cms, &names::config_map(name)).await? {
        crate::crash_point!("after-delete-configmap");
    }
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    if delete_if_present(ctx, &svcs, &names::metrics_service(name)).await? {
        crate::crash_point!("after-delete-service");
    }
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    delete_if_present(ctx, &policies, &names::network_policy(name)).await?;
    if let Some(gang) = &spec.resources.gang_scheduling {
        let resource = pod_group_api(gang);
        let groups: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
        delete_if_present(ctx, &groups, &names::pod_group(name)).await?;
    }
    Ok(())
}

/// Deletes `name` when it exists; whether it did.
async fn delete_if_present<K>(ctx: &Context, api: &Api<K>, name: &str) -> Result<bool>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if api.get_opt(name).await?.is_none() {
        return Ok(false);
    }
    ctx.metrics.api_writes.with_label_values(&["delete"]).inc();
    api.delete(name, &DeleteParams::default()).await?;
    Ok(true)
}

/// Writes the status when it changed (never otherwise: an idle job causes no writes), with the
/// object's resourceVersion as a precondition so a reconcile working from a stale cache cannot
/// count a failure twice. Publishes an event when the phase or its reason changed.
pub(super) async fn write_status(
    job: &FineTuneJob,
    ctx: &Context,
    ns: &str,
    name: &str,
    old: &FineTuneJobStatus,
    new: &FineTuneJobStatus,
) -> Result<()> {
    if old == new {
        return Ok(());
    }
    let Some(diff) = merge_diff(&serde_json::to_value(old)?, &serde_json::to_value(new)?) else {
        return Ok(());
    };
    let api: Api<FineTuneJob> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": job.resource_version() },
        "status": diff,
    });
    ctx.metrics.api_writes.with_label_values(&["status"]).inc();
    let result = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(kube::Error::Api(s)) if s.code == 409 => "conflict",
        Err(_) => "error",
    };
    ctx.metrics
        .status_writes
        .with_label_values(&[outcome])
        .inc();
    let written = result?;
    if written.resource_version() != job.resource_version() {
        ctx.remember(&job.uid().unwrap_or_default(), |m| {
            m.superseded_version = job.resource_version();
        });
    }
    crate::crash_point!("after-status-patch");
    let reason_of = |s: &FineTuneJobStatus| {
        find_condition(&s.conditions, condition::READY)
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    let (old_reason, new_reason) = (reason_of(old), reason_of(new));
    if old.phase != new.phase
        || old_reason.as_ref().map(|r| &r.0) != new_reason.as_ref().map(|r| &r.0)
    {
        let (reason, message) = new_reason.unwrap_or_default();
        let warning =
            matches!(new.phase, Some(JobPhase::Failed)) || Reason::parse(&reason).is_warning();
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.clone(),
            note: Some(message.chars().take(1000).collect()),
            action: new
                .phase
                .map(|p| p.as_str().to_string())
                .unwrap_or_default(),
            secondary: None,
        };
        info!(phase = ?new.phase, %reason, "status changed");
        if let Err(e) = ctx.recorder.publish(&event, &job.object_ref(&())).await {
            warn!(error = %e, "could not publish event");
        }
        crate::crash_point!("after-event");
    }
    Ok(())
}
