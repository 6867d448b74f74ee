#!/usr/bin/env python3
"""Generates charts/finetune-operator/dashboards/*.json (run: python3 charts/hack/dashboards.py).
Edit the panels here, not the JSON; then regenerate manifests/default (see charts/hack/helm.py)."""
import json
DS = {"type": "prometheus", "uid": "${datasource}"}
def ds_var():
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0}
def q_var(name, label, query, multi=False):
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2,
            "includeAll": False, "multi": multi, "sort": 1, "current": {}, "hide": 0}
def panel(pid, title, targets, x, y, w=12, h=8, kind="timeseries", unit=None, desc=""):
    p = {"id": pid, "type": kind, "title": title, "description": desc, "datasource": DS,
         "gridPos": {"x": x, "y": y, "w": w, "h": h},
         "targets": [{"refId": chr(65+i), "expr": e, "legendFormat": l, "datasource": DS} for i, (e, l) in enumerate(targets)],
         "fieldConfig": {"defaults": {"unit": unit or "short"}, "overrides": []},
         "options": {}}
    return p
def dash(uid, title, desc, variables, panels, tags):
    return {"uid": uid, "title": title, "description": desc, "tags": tags, "editable": True,
            "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
            "timezone": "", "graphTooltip": 1, "annotations": {"list": []},
            "templating": {"list": variables}, "panels": panels}

S = '{namespace="$namespace", finetune_job="$job"}'
job_panels = [
    panel(1, "Progress", [(f'max(finetune_step{S}) / max(finetune_total_steps{S})', "progress")], 0, 0, 6, 4, "stat", "percentunit", "Optimizer steps done out of the planned total."),
    panel(2, "ETA", [(f'(max(finetune_total_steps{S}) - max(finetune_step{S})) / max(rate(finetune_step{S}[5m]))', "eta")], 6, 0, 6, 4, "stat", "s", "Remaining steps divided by the step rate of the last 5 minutes."),
    panel(3, "Epoch", [(f'max(finetune_epoch{S})', "epoch")], 12, 0, 6, 4, "stat"),
    panel(4, "Trainer pod restarts", [(f'count(count by (pod) (count_over_time(finetune_step{S}[$__range]))) - 1', "restarts")], 18, 0, 6, 4, "stat", None, "Trainer pods of this job seen in the time range, minus one (each replacement after a failure, OOM or disruption is a new pod)."),
    panel(5, "Train vs validation loss", [(f'finetune_train_loss{S}', "train {{pod}}"), (f'finetune_validation_loss{S}', "validation {{pod}}"), (f'finetune_best_validation_loss{S}', "best validation")], 0, 4, 12, 8),
    panel(6, "Generalization gap", [(f'finetune_generalization_gap{S}', "gap (validation - train)"), (f'finetune_overfitting{S}', "overfitting flag")], 12, 4, 12, 8, desc="Validation minus training loss; the flag is 1 while the job's overfitting thresholds are exceeded."),
    panel(7, "Validation accuracy", [(f'finetune_validation_accuracy{S}', "accuracy")], 0, 12, 8, 8, unit="percentunit"),
    panel(8, "Learning rate", [(f'finetune_learning_rate{S}', "lr")], 8, 12, 8, 8),
    panel(9, "Gradient norm", [(f'finetune_grad_norm{S}', "grad norm (before clipping)")], 16, 12, 8, 8),
    panel(10, "Tokens per second", [(f'finetune_tokens_per_second{S}', "trainer"), (f'sum(rate(finetune_tokens_total{S}[$__rate_interval]))', "rate of tokens_total")], 0, 20, 8, 8),
    panel(11, "Checkpoints", [(f'max(finetune_checkpoints_total{S})', "written"), (f'sum(finetune_checkpoint_duration_seconds_sum{S}) / sum(finetune_checkpoint_duration_seconds_count{S})', "mean write seconds")], 8, 20, 8, 8),
    panel(12, "Memory (resident)", [(f'finetune_process_resident_memory_bytes{S}', "{{pod}}")], 16, 20, 8, 8, unit="bytes"),
    panel(13, "Retention perplexity before / after", [(f'finetune_retention_perplexity{S}', "{{phase}}")], 0, 28, 12, 8, "bargauge", None, "Perplexity on general text before and after fine-tuning: a large rise means forgetting."),
    panel(14, "Dataset rows by outcome", [(f'max by (outcome) (finetune_data_rows_total{S})', "{{outcome}}")], 12, 28, 12, 8, "bargauge"),
    panel(15, "KL to the base model (forgetting penalty)", [(f'finetune_base_kl{S}', "KL(base || tuned) per prompt position")], 0, 36, 12, 8, unit="short", desc="The divergence of the tuned model's next-token distribution from the base's on the prompts, which method.lora.klToBase penalises; it stays near 0 when the adapters change only the answers. Empty without klToBase."),
]
job = dash("finetune-job", "FineTuneJob", "One fine-tuning job: losses, overfitting, throughput, checkpoints, restarts, memory and forgetting.",
           [ds_var(), q_var("namespace", "Namespace", "label_values(finetune_step, namespace)"),
            q_var("job", "Job", 'label_values(finetune_step{namespace="$namespace"}, finetune_job)')], job_panels, ["finetune"])
O = '{job="$operator_job"}'
fleet_panels = [
    panel(1, "Jobs by phase", [(f'max by (phase) (finetune_operator_jobs{O})', "{{phase}}")], 0, 0, 12, 8),
    panel(2, "Jobs waiting for GPUs", [(f'max(finetune_operator_unschedulable_jobs{O})', "unschedulable now")], 12, 0, 6, 8, "stat"),
    panel(3, "Operator replicas up / leader", [(f'sum(up{O})', "up"), (f'sum(finetune_operator_leader{O})', "leaders")], 18, 0, 6, 8, "stat"),
    panel(4, "Queue wait for GPUs (mean and p90)", [(f'sum(rate(finetune_operator_unschedulable_seconds_sum{O}[1h])) / sum(rate(finetune_operator_unschedulable_seconds_count{O}[1h]))', "mean"), (f'histogram_quantile(0.9, sum by (le) (rate(finetune_operator_unschedulable_seconds_bucket{O}[1h])))', "p90")], 0, 8, 12, 8, unit="s", desc="How long jobs waited unschedulable before their trainer pod was placed."),
    panel(5, "Failures and restarts (1h)", [(f'sum by (reason) (increase(finetune_operator_pod_restarts_total{O}[1h])) or on() vector(0)', "restarts: {{reason}}"), (f'max(finetune_operator_jobs{{job="$operator_job", phase="Failed"}})', "failed jobs")], 12, 8, 12, 8),
    panel(6, "Reconcile rate", [(f'sum by (result) (rate(finetune_operator_reconcile_total{O}[$__rate_interval]))', "{{result}}")], 0, 16, 8, 8, unit="ops"),
    panel(7, "Reconcile error ratio", [(f'(sum(rate(finetune_operator_reconcile_total{{job="$operator_job", result="error"}}[$__rate_interval])) or on() vector(0)) / sum(rate(finetune_operator_reconcile_total{O}[$__rate_interval]))', "errors")], 8, 16, 8, 8, unit="percentunit"),
    panel(8, "Reconcile latency", [(f'histogram_quantile(0.5, sum by (le) (rate(finetune_operator_reconcile_duration_seconds_bucket{O}[$__rate_interval])))', "p50"), (f'histogram_quantile(0.99, sum by (le) (rate(finetune_operator_reconcile_duration_seconds_bucket{O}[$__rate_interval])))', "p99")], 16, 16, 8, 8, unit="s"),
    panel(9, "Status writes", [(f'sum by (result) (rate(finetune_operator_status_writes_total{O}[$__rate_interval]))', "{{result}}")], 0, 24, 12, 8, unit="ops"),
    panel(10, "Running jobs: progress", [('max by (namespace, finetune_job) (finetune_step) / max by (namespace, finetune_job) (finetune_total_steps)', "{{namespace}}/{{finetune_job}}")], 12, 24, 12, 8, "bargauge", "percentunit"),
]
fleet = dash("finetune-fleet", "FineTune fleet", "All fine-tuning jobs and the operator: phases, queue wait for GPUs, failures, reconcile rate, errors and latency.",
             [ds_var(), q_var("operator_job", "Operator scrape job", "label_values(finetune_operator_leader, job)")], fleet_panels, ["finetune"])
import os
import sys
# Optional argument: another output directory (the packaging test checks the JSON is current).
d = (sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "finetune-operator", "dashboards")) + "/"
for name, dash in [("finetune-job.json", job), ("finetune-fleet.json", fleet)]:
    with open(d + name, "w") as f:
        json.dump(dash, f, indent=2)
        f.write("\n")
