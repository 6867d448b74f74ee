//! The chart's optional ValidatingAdmissionPolicy (`admissionPolicy.*`), rendered by real Helm
//! and evaluated by a CEL evaluator (kube-cel's VAP evaluator, which binds `object`, `oldObject`
//! and `request` as the API server does) against the samples: each platform limit refuses what it
//! should with its message, lets the rest through, and the match condition leaves the operator's
//! own writes alone. The 1.20 API server of the e2e tests has no admission policies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use finetune_e2e::packaging::{NAMESPACE, RELEASE, helm_render, of_kind, parse_docs, repo_root};
use kube_cel::{AdmissionRequest, VapEvaluator, VapExpression};
use serde_json::{Value, json};

/// The policy's match conditions and validations as rendered with `values`.
fn policy(values: Value) -> (Vec<VapExpression>, Vec<VapExpression>) {
    let text = helm_render(Some(&values), RELEASE, NAMESPACE, false).unwrap();
    let docs = parse_docs(&text).unwrap();
    let policies = of_kind(&docs, "ValidatingAdmissionPolicy");
    assert_eq!(policies.len(), 1, "one policy");
    assert_eq!(of_kind(&docs, "ValidatingAdmissionPolicyBinding").len(), 1);
    let spec = serde_json::to_value(&policies[0]["spec"]).unwrap();
    let read = |key: &str| -> Vec<VapExpression> {
        spec[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| VapExpression {
                expression: v["expression"].as_str().unwrap().into(),
                message: v["message"].as_str().map(str::to_string),
                message_expression: v["messageExpression"].as_str().map(str::to_string),
            })
            .collect()
    };
    (read("matchConditions"), read("validations"))
}

fn sample(name: &str) -> Value {
    let path = repo_root().join("manifests/samples").join(name);
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    serde_json::to_value(yaml).unwrap()
}

/// The queue label as kube-cel spells it. kube-cel's VAP evaluator has no schema, so it escapes
/// every map key as the API server escapes only property names (`.` → `__dot__`, …); the API
/// server leaves label keys as they are. The expressions are rewritten to that spelling for the
/// evaluator only: the chart keeps the API server's.
fn for_kube_cel(expressions: &[VapExpression]) -> Vec<VapExpression> {
    const QUEUE: &str = "'kueue.x-k8s.io/queue-name'";
    const ESCAPED: &str = "'kueue__dot__x__dash__k8s__dot__io__slash__queue__dash__name'";
    expressions
        .iter()
        .map(|e| VapExpression {
            expression: e.expression.replace(QUEUE, ESCAPED),
            ..e.clone()
        })
        .collect()
}

/// What the policy answers for `object` (created when `old` is None): `None` when it does not
/// judge the request, else the messages of the failed validations.
fn admit(
    policy: &(Vec<VapExpression>, Vec<VapExpression>),
    object: &Value,
    old: Option<&Value>,
) -> Option<Vec<String>> {
    let mut builder = VapEvaluator::builder()
        .object(object.clone())
        .request(AdmissionRequest {
            operation: if old.is_some() { "UPDATE" } else { "CREATE" }.into(),
            name: "job".into(),
            namespace: "ml".into(),
            ..AdmissionRequest::default()
        });
    if let Some(old) = old {
        builder = builder.old_object(old.clone());
    }
    let evaluator = builder.build();
    if !evaluator
        .evaluate(&for_kube_cel(&policy.0))
        .iter()
        .all(|r| r.passed)
    {
        return None;
    }
    Some(
        evaluator
            .evaluate(&for_kube_cel(&policy.1))
            .into_iter()
            .filter(|r| !r.passed)
            .map(|r| r.message.unwrap_or_default())
            .collect(),
    )
}

fn limits() -> Value {
    json!({"admissionPolicy": {"enabled": true, "maxGpusPerJob": 8, "requireQueueName": true,
           "allowedModelSources": ["hf://meta-llama/", "pvc://models/"]}})
}

/// `job` without a Kueue queue label.
fn unqueued(mut job: Value) -> Value {
    job["metadata"].as_object_mut().unwrap().remove("labels");
    job
}

fn queued(mut job: Value) -> Value {
    job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = json!("team-ml");
    job
}

#[test]
fn the_policy_is_off_by_default_and_empty_limits_render_no_rule() {
    let text = helm_render(None, RELEASE, NAMESPACE, false).unwrap();
    let docs = parse_docs(&text).unwrap();
    assert!(of_kind(&docs, "ValidatingAdmissionPolicy").is_empty());
    let (_, validations) = policy(json!({"admissionPolicy": {"enabled": true}}));
    assert!(validations.is_empty(), "no limit set: {validations:?}");
}

#[test]
fn each_limit_refuses_what_it_forbids_and_passes_the_rest() {
    let policy = policy(limits());
    let l7b = queued(sample("llama-2-7b-lora-sentiment.yaml"));
    assert_eq!(
        admit(&policy, &l7b, None),
        Some(vec![]),
        "the 7B sample fits"
    );
    let l13b = queued(sample("llama-2-13b-lora.yaml"));
    assert_eq!(
        admit(&policy, &l13b, None),
        Some(vec![]),
        "pvc://models/ is allowed"
    );

    let mut big = l7b.clone();
    big["spec"]["resources"]["gpus"] = json!(4);
    big["spec"]["resources"]["nodes"] = json!(4);
    assert_eq!(
        admit(&policy, &big, None).unwrap(),
        ["spec.resources.gpus asks for 16 GPUs; this cluster allows at most 8 per job"]
    );
    let mut unstated = l7b.clone();
    unstated["spec"]["resources"]
        .as_object_mut()
        .unwrap()
        .remove("gpus");
    assert_eq!(
        admit(&policy, &unstated, None).unwrap(),
        ["spec.resources.gpus must be set: this cluster allows at most 8 GPUs per job"]
    );

    let refused = admit(&policy, &unqueued(l7b.clone()), None).unwrap();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("kueue.x-k8s.io/queue-name"),
        "{refused:?}"
    );

    let mut elsewhere = l7b.clone();
    elsewhere["spec"]["model"]["source"] = json!("hf://someone/llama-2-7b-copy");
    assert_eq!(
        admit(&policy, &elsewhere, None).unwrap(),
        ["spec.model.source must start with one of hf://meta-llama/, pvc://models/"]
    );
    let tiny = queued(sample("tiny-sentiment-cpu.yaml"));
    assert_eq!(
        admit(&policy, &tiny, None),
        Some(vec![]),
        "tiny has no source"
    );
}

#[test]
fn only_creations_and_spec_changes_are_judged() {
    let policy = policy(limits());
    // A job from before the policy: the operator's writes that leave the spec alone pass.
    let old = unqueued(sample("llama-2-7b-lora-sentiment.yaml"));
    let mut labelled = old.clone();
    labelled["metadata"]["annotations"] = json!({"touched": "yes"});
    assert_eq!(admit(&policy, &labelled, Some(&old)), None);
    // A spec change is judged like a creation.
    let mut suspended = old.clone();
    suspended["spec"]["suspend"] = json!(true);
    let refused = admit(&policy, &suspended, Some(&old)).unwrap();
    assert!(refused[0].contains("queue-name"), "{refused:?}");
}
