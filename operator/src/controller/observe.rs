//! Observe: everything a decision needs, read before anything is decided — the child caches
//! (accepted spec, pods), the node of a running trainer, the trainer's progress, and what is
//! remembered of the job. Reads only.

use std::time::Duration;

use finetune_api::{FineTuneJob, FineTuneJobSpec, JOB_LABEL, JobPhase};
use futures::FutureExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim, Pod};
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::ACCEPTED_SPEC_KEY;
use super::decide::{Observed, pod_attempt};
use crate::build::name_and_namespace;
use crate::context::Context;
use crate::gang::pod_rank;
use crate::lifecycle::{PodOutcome, Waiting, classify, mount_problem, required_config_maps};
use crate::names;
use crate::{Error, Result};

/// What observing found: either the inputs of a decision, or a reason to come back later.
#[derive(Debug)]
pub enum Observation {
    /// Nothing to decide now: come back as this action says.
    NotNow(Action),
    /// The inputs of [`super::decide::decide`].
    Ready(Box<Observed>),
}

/// Observes `job`.
pub async fn observe(job: &FineTuneJob, ctx: &Context) -> Result<Observation> {
    if job.meta().deletion_timestamp.is_some() {
        // Owner references make the garbage collector delete the children.
        return Ok(Observation::NotNow(Action::await_change()));
    }
    let (name, ns) = name_and_namespace(job)?;
    let uid = job.uid().unwrap_or_default();
    let seen = job.resource_version();
    if seen.is_some() && ctx.remember(&uid, |m| m.superseded_version == seen) {
        // Our own status write is newer than this copy; its watch event brings us back sooner
        // than this safety requeue (the scheduler keeps only the earliest of the two).
        return Ok(Observation::NotNow(Action::requeue(Duration::from_secs(
            30,
        ))));
    }

    // Children come from the caches; a reconcile never acts before they hold a full list. Their
    // readiness is checked, not awaited: kube-runtime's readiness future wakes only the last of
    // several concurrent waiters, so awaiting it from parallel reconciles can stall all but one.
    let caches = &ctx.caches;
    match (
        caches.pods.wait_until_ready().now_or_never(),
        caches.config_maps.wait_until_ready().now_or_never(),
    ) {
        (Some(Ok(())), Some(Ok(()))) => {}
        (Some(Err(_)), _) | (_, Some(Err(_))) => return Err(Error::Cache),
        _ => {
            return Ok(Observation::NotNow(Action::requeue(Duration::from_millis(
                500,
            ))));
        }
    }
    // Children are this job's by owner UID, not by name: a job deleted and re-created with the
    // same name must not adopt the old one's accepted spec, pods or progress.
    let accepted: Option<FineTuneJobSpec> = caches
        .config_maps
        .get(&ObjectRef::new(&names::config_map(&name)).within(&ns))
        .filter(|cm| controlled_by(cm.meta(), &uid))
        .as_ref()
        .and_then(|cm| cm.data.as_ref())
        .and_then(|d| d.get(ACCEPTED_SPEC_KEY))
        .and_then(|s| serde_json::from_str(s).ok());
    let (pods, foreign): (Vec<Pod>, Vec<Pod>) = caches
        .pods
        .state()
        .iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns.as_str())
                && p.labels().get(JOB_LABEL) == Some(&names::label_value(&name))
        })
        .map(|p| Pod::clone(p))
        .partition(|p| controlled_by(p.meta(), &uid));
    let mut leftovers: Vec<String> = foreign
        .iter()
        .map(|p| format!("pod/{}", p.name_any()))
        .collect();

    // The running trainers of the current attempt (of a job neither finished nor suspended):
    // are their nodes still there, and how far has rank 0 (the one that reports) got?
    let status = job.status.clone().unwrap_or_default();
    let attempt = status.restarts + status.disruptions;
    let live = !status.phase.is_some_and(JobPhase::is_finished) && !job.spec.suspend;
    let running: Vec<&Pod> = pods
        .iter()
        .filter(|p| pod_attempt(p) == Some(attempt))
        .filter(|p| classify(p) == PodOutcome::Running)
        .filter(|_| live)
        .collect();
    // About to create the attempt's pod: its checkpoint claim must not be an earlier job's (its
    // garbage collection is due: the new pod would resume that run's checkpoints, or wait
    // forever for a claim being deleted). A retained claim (no owner) is reused.
    let creating = !pods.iter().any(|p| pod_attempt(p) == Some(attempt))
        && !status.phase.is_some_and(JobPhase::is_finished)
        && !job.spec.suspend;
    if creating && job.spec.checkpoints.storage.existing_claim.is_none() {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        let claim = names::checkpoint_claim(&name);
        if let Some(c) = claims.get_opt(&claim).await? {
            let meta = c.meta();
            if meta.deletion_timestamp.is_some() {
                leftovers.push(format!("persistentvolumeclaim/{claim} (being deleted)"));
            } else if controller_uid(meta).is_some_and(|owner| owner != uid) {
                leftovers.push(format!("persistentvolumeclaim/{claim} (an earlier job's)"));
            }
        }
    }
    // A pod of the current attempt that is still starting (a gang's pods share their volumes):
    // can the kubelet set up its volumes?
    // It says why not only in events, so the ConfigMaps its volumes name are read here.
    let starting = pods
        .iter()
        .filter(|p| pod_attempt(p) == Some(attempt))
        .filter(|_| live)
        .find(|p| classify(p) == PodOutcome::Pending(Waiting::Starting));
    let unmountable = match starting {
        Some(pod) => unmountable_volumes(&ctx.client, &ns, pod).await?,
        None => Vec::new(),
    };
    let (mut node_lost, mut progress) = (false, None);
    for pod in &running {
        node_lost |= is_node_lost(&ctx.client, pod).await?;
    }
    let reporter = running.iter().find(|p| pod_rank(p) == 0);
    if !node_lost && let Some(ip) = reporter.and_then(|p| p.status.as_ref()?.pod_ip.clone()) {
        progress = crate::progress::fetch(&ip, None, Duration::from_secs(3)).await;
    }
    Ok(Observation::Ready(Box::new(Observed {
        accepted,
        pods,
        node_lost,
        progress,
        leftovers,
        unmountable,
        memory: ctx.remember(&uid, |m| m.clone()),
    })))
}

/// The UID of an object's controller owner, if it has one.
fn controller_uid(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<&str> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// Whether `uid` is the controller owner of an object.
fn controlled_by(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    uid: &str,
) -> bool {
    controller_uid(meta) == Some(uid)
}

/// What keeps the kubelet from setting up `pod`'s ConfigMap volumes (see
/// [`crate::lifecycle::mount_problem`]).
async fn unmountable_volumes(client: &kube::Client, ns: &str, pod: &Pod) -> Result<Vec<String>> {
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut problems = Vec::new();
    for required in required_config_maps(pod) {
        let found = config_maps.get_opt(&required.name).await?;
        problems.extend(mount_problem(&required, found.as_ref()));
    }
    Ok(problems)
}

async fn is_node_lost(client: &kube::Client, pod: &Pod) -> Result<bool> {
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        return Ok(false);
    };
    let nodes: Api<Node> = Api::all(client.clone());
    Ok(nodes.get_opt(&node).await?.is_none())
}
