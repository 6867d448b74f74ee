//! State shared by every reconciliation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};

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
}

impl Context {
    /// Creates the context.
    pub fn new(client: Client, args: Args, metrics: Metrics) -> Arc<Context> {
        let reporter = Reporter {
            controller: crate::FIELD_MANAGER.into(),
            instance: (!args.identity.is_empty()).then(|| args.identity.clone()),
        };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            settings: BuildSettings::from(&args),
            client,
            args,
            metrics,
            memory: Mutex::new(HashMap::new()),
        })
    }
}
