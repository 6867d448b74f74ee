//! State shared by every reconciliation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store, store::Writer};

use crate::Args;
use crate::build::BuildSettings;
use crate::metrics::Metrics;

/// What the operator remembers between reconciliations of one job (not persisted: losing it
/// only delays the Stalled condition).
#[derive(Clone, Debug)]
pub struct JobMemory {
    /// Last step seen and when it was first seen.
    pub step: u64,
    /// When `step` was first seen.
    pub since: Instant,
    /// When the job was first seen unschedulable.
    pub unschedulable_since: Option<Instant>,
    /// Until when a gang released for being partly placed waits before it is created again.
    pub gang_retry_at: Option<Instant>,
    /// Releases of the gang in a row, without it being placed whole in between: the exponent of
    /// the wait before the next try ([`crate::controller::decide::gang_retry_wait`]).
    pub gang_releases: u32,
    /// The job's resourceVersion that this operator's last status write replaced. A reconcile
    /// that still sees it works from a cache the watch has not caught up with yet; it waits for
    /// the newer version (its arrival triggers the next reconcile) instead of writing from stale
    /// state and hitting a 409 conflict.
    pub superseded_version: Option<String>,
    /// Reconciles of this job that failed in a row (0 after one succeeds): the exponent of
    /// the retry backoff.
    pub failed_reconciles: u32,
}

impl JobMemory {
    /// Nothing seen yet: step 0 from now.
    pub fn new() -> Self {
        JobMemory {
            step: 0,
            since: Instant::now(),
            unschedulable_since: None,
            gang_retry_at: None,
            gang_releases: 0,
            superseded_version: None,
            failed_reconciles: 0,
        }
    }
}

impl Default for JobMemory {
    fn default() -> Self {
        Self::new()
    }
}

/// Passed to every reconciliation.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Operator flags.
    pub args: Args,
    /// Settings of the pure builders.
    pub settings: BuildSettings,
    /// Metrics.
    pub metrics: Metrics,
    /// Event recorder.
    pub recorder: Recorder,
    /// Per-job memory, keyed by uid.
    pub memory: Mutex<HashMap<String, JobMemory>>,
    /// Caches of the trainer pods and ConfigMaps, filled by the controller's own watches, so a
    /// reconcile reads its children without a request to the API server.
    pub caches: ChildCaches,
    /// The writers of `caches`, taken once by the controller that feeds them.
    cache_writers: Mutex<Option<ChildCacheWriters>>,
}

/// Read side of the child caches.
#[derive(Clone)]
pub struct ChildCaches {
    /// Trainer pods (label `finetune.dev/job`), managed fields stripped.
    pub pods: Store<Pod>,
    /// Trainer ConfigMaps (they hold the accepted spec), managed fields stripped.
    pub config_maps: Store<ConfigMap>,
}

/// Write side of the child caches, fed by the controller's watches.
pub struct ChildCacheWriters {
    /// Feeds `ChildCaches::pods`.
    pub pods: Writer<Pod>,
    /// Feeds `ChildCaches::config_maps`.
    pub config_maps: Writer<ConfigMap>,
}

impl Context {
    /// Creates the context.
    pub fn new(client: Client, args: Args, metrics: Metrics) -> Arc<Context> {
        let reporter = Reporter {
            controller: crate::FIELD_MANAGER.into(),
            instance: (!args.identity.is_empty()).then(|| args.identity.clone()),
        };
        let (pods, pod_writer) = reflector::store();
        let (config_maps, config_map_writer) = reflector::store();
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            settings: BuildSettings::from(&args),
            client,
            args,
            metrics,
            memory: Mutex::new(HashMap::new()),
            caches: ChildCaches { pods, config_maps },
            cache_writers: Mutex::new(Some(ChildCacheWriters {
                pods: pod_writer,
                config_maps: config_map_writer,
            })),
        })
    }

    /// Runs `f` on what is remembered of the job `uid` (a fresh entry when there is none).
    pub fn remember<T>(&self, uid: &str, f: impl FnOnce(&mut JobMemory) -> T) -> T {
        let mut map = self
            .memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(map.entry(uid.to_string()).or_default())
    }

    /// Counts a failed reconcile of job `uid`; the failures in a row, this one included.
    pub fn count_failure(&self, uid: &str) -> u32 {
        self.remember(uid, |m| {
            m.failed_reconciles = m.failed_reconciles.saturating_add(1);
            m.failed_reconciles
        })
    }

    /// A reconcile of job `uid` succeeded: the next failure backs off from the start again.
    /// (A job that is not remembered stays so.)
    pub fn clear_failures(&self, uid: &str) {
        let mut map = self
            .memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(m) = map.get_mut(uid) {
            m.failed_reconciles = 0;
        }
    }

    /// Forgets the job `uid` (it finished for good).
    pub fn forget(&self, uid: &str) {
        self.memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(uid);
    }

    /// Keeps what is remembered of the jobs for which `live(uid)` holds.
    pub fn retain_memory(&self, live: impl Fn(&str) -> bool) {
        self.memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|uid, _| live(uid));
    }

    /// Jobs currently remembered as unschedulable.
    pub fn count_unschedulable(&self) -> i64 {
        self.memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|m| m.unschedulable_since.is_some())
            .count() as i64
    }

    /// Takes the writers of the child caches; `None` after the first call.
    pub fn take_cache_writers(&self) -> Option<ChildCacheWriters> {
        self.cache_writers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}
