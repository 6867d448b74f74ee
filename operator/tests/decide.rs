//! The reconciler's rules, from the table in `fixtures/decide/cases.yaml`: the sample job, pod
//! fixtures, what was observed and the time → phase, reason, writes, requeue (see the table's
//! header). `decide` is pure, so every rule that once needed a running control plane is a row.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use finetune_api::{FineTuneJob, JOB_LABEL, TrainerProgress};
use finetune_operator::Args;
use finetune_operator::context::JobMemory;
use finetune_operator::controller::decide::{Clock, Observed, Requeue, Settings, decide};
use finetune_operator::names::{ATTEMPT_LABEL, RANK_LABEL, gang_pod, trainer_pod};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

const CREATED: &str = "2026-12-01T12:00:00Z";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn yaml(path: &Path) -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn sample_job() -> Value {
    let mut job = yaml(&fixtures().join("../../../manifests/samples/tiny-sentiment-cpu.yaml"));
    merge(
        &mut job,
        &serde_json::json!({"metadata": {
            "namespace": "team-a",
            "uid": "0b5a6c1e-0000-4000-8000-000000000001",
            "generation": 1,
            "creationTimestamp": CREATED,
        }}),
    );
    job
}

fn pod(entry: &Value, job: &str) -> Pod {
    let mut pod = yaml(&fixtures().join(entry["file"].as_str().unwrap()));
    if let Some(p) = entry.get("patch") {
        merge(&mut pod, p);
    }
    let attempt = entry["attempt"].as_u64().unwrap() as u32;
    merge(
        &mut pod,
        &serde_json::json!({"metadata": {
            "name": trainer_pod(job, attempt),
            "namespace": "team-a",
            "labels": {JOB_LABEL: job, ATTEMPT_LABEL: attempt.to_string()},
        }}),
    );
    // A gang's pod: its rank's name and label.
    if let Some(rank) = entry.get("rank").and_then(Value::as_u64) {
        merge(
            &mut pod,
            &serde_json::json!({"metadata": {
                "name": gang_pod(job, attempt, rank as u32),
                "labels": {RANK_LABEL: rank.to_string()},
            }}),
        );
    }
    serde_json::from_value(pod).unwrap()
}

/// A list of strings (`[]` when absent).
fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn ago(mono: Instant, v: Option<&Value>) -> Option<Instant> {
    v.and_then(Value::as_u64)
        .map(|s| mono.checked_sub(Duration::from_secs(s)).unwrap())
}

fn settings() -> Settings {
    Settings::from_args(&Args::parse_from(["finetune-operator"]))
}

fn check(case: &Value) {
    let name = case["name"].as_str().unwrap();
    let mut job_value = sample_job();
    if let Some(p) = case.get("job") {
        merge(&mut job_value, p);
    }
    let job: FineTuneJob = serde_json::from_value(job_value).unwrap();
    // `accepted: {}` is the job's own spec as accepted at the start, unpatched.
    let accepted = case.get("accepted").map(|patch| {
        let mut spec = serde_json::to_value(&sample_job()["spec"]).unwrap();
        merge(&mut spec, patch);
        serde_json::from_value(spec).unwrap()
    });
    let job_name = job.metadata.name.clone().unwrap();
    let pods = case
        .get("pods")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|e| pod(e, &job_name)).collect())
        .unwrap_or_default();
    let progress: Option<TrainerProgress> = case.get("progress").map(|p| {
        let mut full = serde_json::to_value(TrainerProgress::default()).unwrap();
        merge(&mut full, p);
        serde_json::from_value(full).unwrap()
    });
    let mono = Instant::now() + Duration::from_secs(3600);
    let created: Timestamp = CREATED.parse().unwrap();
    let now = case.get("now").and_then(Value::as_i64).unwrap_or(1);
    let clock = Clock {
        wall: Time(created + jiff_seconds(now)),
        mono,
    };
    let memory_case = case.get("memory").cloned().unwrap_or(Value::Null);
    let memory = JobMemory {
        step: memory_case.get("step").and_then(Value::as_u64).unwrap_or(0),
        since: ago(mono, memory_case.get("stepSecondsAgo")).unwrap_or(mono),
        unschedulable_since: ago(mono, memory_case.get("unschedulableSecondsAgo")),
        gang_retry_at: memory_case
            .get("gangRetryInSeconds")
            .and_then(Value::as_u64)
            .map(|s| mono + Duration::from_secs(s)),
        gang_releases: memory_case
            .get("gangReleases")
            .and_then(Value::as_u64)
            .map_or(0, |n| n as u32),
        ..JobMemory::new()
    };
    let observed = Observed {
        accepted,
        pods,
        node_lost: case
            .get("nodeLost")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        progress,
        leftovers: strings(case.get("leftovers")),
        unmountable: strings(case.get("unmountable")),
        memory,
    };
    let plan = decide(&job, &observed, &settings(), &clock).unwrap();
    let want = &case["expect"];
    let ready = plan
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.reason.clone());
    assert_eq!(
        plan.status.phase.map(|p| p.as_str().to_string()).as_deref(),
        want["phase"].as_str(),
        "{name}: phase"
    );
    if let Some(reason) = want.get("reason") {
        assert_eq!(ready.as_deref(), reason.as_str(), "{name}: reason");
    }
    if let Some(text) = want.get("messageContains").and_then(Value::as_str) {
        let message = plan
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.message.clone())
            .unwrap_or_default();
        assert!(message.contains(text), "{name}: {message}");
    }
    let writes: Vec<String> = plan.writes.iter().map(|w| w.describe()).collect();
    let want_writes: Vec<String> = want["writes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect();
    assert_eq!(writes, want_writes, "{name}: writes");
    let requeue = match &want["requeue"] {
        Value::String(s) if s == "await" => Requeue::AwaitChange,
        v => Requeue::After(Duration::from_secs(v.as_u64().unwrap())),
    };
    assert_eq!(plan.requeue, requeue, "{name}: requeue");
    let field = |k: &str| want.get(k);
    if let Some(n) = field("restarts") {
        assert_eq!(
            u64::from(plan.status.restarts),
            n.as_u64().unwrap(),
            "{name}: restarts"
        );
    }
    if let Some(n) = field("disruptions") {
        assert_eq!(
            u64::from(plan.status.disruptions),
            n.as_u64().unwrap(),
            "{name}: disruptions"
        );
    }
    assert_eq!(
        plan.restart,
        field("restartCounted").and_then(Value::as_str),
        "{name}: restart counted"
    );
    assert_eq!(
        plan.forget,
        field("forget").and_then(Value::as_bool).unwrap_or(false),
        "{name}: forget"
    );
    let condition = |t: &str| plan.status.conditions.iter().find(|c| c.type_ == t);
    for (t, status) in field("conditions")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let c = condition(t).unwrap_or_else(|| panic!("{name}: no {t} condition"));
        assert_eq!(Some(c.status.as_str()), status.as_str(), "{name}: {t}");
    }
    for (t, reason) in field("conditionReasons")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        assert_eq!(
            condition(t).map(|c| c.reason.as_str()),
            reason.as_str(),
            "{name}: {t} reason"
        );
    }
    for t in field("noConditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        assert!(condition(t.as_str().unwrap()).is_none(), "{name}: {t} set");
    }
    if field("unschedulableRemembered").is_some() {
        assert_eq!(plan.memory.unschedulable_since, Some(mono), "{name}");
    }
    if let Some(s) = field("unschedulableFor") {
        assert_eq!(
            plan.unschedulable_for,
            Some(Duration::from_secs(s.as_u64().unwrap())),
            "{name}"
        );
        assert!(plan.memory.unschedulable_since.is_none(), "{name}");
    }
    if let Some(step) = field("progressStep") {
        let p = plan.status.progress.as_ref().expect("progress in status");
        assert_eq!(p.step, step.as_u64().unwrap(), "{name}: progress");
        assert_eq!(
            plan.memory.step, p.step,
            "{name}: the new step is remembered"
        );
        assert_eq!(plan.memory.since, mono, "{name}: from now");
    }
    if let Some(report) = field("outputReport") {
        let out = plan.status.output.as_ref().expect("outputs in status");
        assert_eq!(out.report.as_deref(), report.as_str(), "{name}");
        assert!(plan.status.completion_time.is_some(), "{name}");
    }
    if let Some(start) = field("startTime") {
        assert_eq!(
            plan.status.start_time.as_ref().map(|t| t.0.to_string()),
            start.as_str().map(str::to_string),
            "{name}: startTime"
        );
    }
    if let Some(accepted) = field("acceptedGeneration") {
        assert_eq!(
            plan.status.accepted_generation,
            accepted.as_i64(),
            "{name}: acceptedGeneration"
        );
    }
    if let Some(gang) = field("gang") {
        assert_eq!(
            serde_json::to_value(&plan.status.gang).unwrap(),
            *gang,
            "{name}: gang"
        );
    }
    if let Some(s) = field("gangRetryInSeconds") {
        assert_eq!(
            plan.memory.gang_retry_at,
            Some(mono + Duration::from_secs(s.as_u64().unwrap())),
            "{name}: gang retry"
        );
    }
    if let Some(n) = field("gangReleases") {
        assert_eq!(
            Some(u64::from(plan.memory.gang_releases)),
            n.as_u64(),
            "{name}: gang releases in a row"
        );
    }
    let generation = field("generation").and_then(Value::as_i64).unwrap_or(1);
    assert_eq!(plan.status.observed_generation, Some(generation), "{name}");
}

fn jiff_seconds(s: i64) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::from_secs(s)
}

#[test]
fn every_rule_of_the_table() {
    let table = yaml(&fixtures().join("decide/cases.yaml"));
    let cases = table["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "the table covers every rule");
    for case in cases {
        check(case);
    }
}
