//! `finetune-trainer plan FILE`: the memory plan of a FineTuneJob manifest or a trainer
//! configuration, the same plan the operator's fit check applies, as a table or JSON.

use std::path::Path;

use finetune_api::fit::plan_for;
use finetune_api::memory::{GIB, MemoryPlan};
use finetune_api::v1alpha1::{FineTuneJobSpec, Spread};
use finetune_api::{FineTuneJob, TrainerConfig};
use serde::Serialize;

use crate::{Result, TrainerError};

/// The plan of one file and, when it does not fit, the fit check's refusal.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanReport {
    /// What was read: `FineTuneJob NAME` or `trainer configuration JOB`.
    pub source: String,
    /// The plan.
    #[serde(flatten)]
    pub plan: MemoryPlan,
    /// The fit check's message (estimate, budget, what would fit) when it does not fit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
}

/// Reads `path` (YAML or JSON): a document of `kind: FineTuneJob`, or else a trainer
/// configuration, and plans it. Errors name the file and, for syntax, the line.
pub fn plan_file(path: &Path) -> Result<PlanReport> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
    let bad = |e: serde_yaml::Error| TrainerError::Config(format!("{}: {e}", path.display()));
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).map_err(bad)?;
    let (source, spec) = if doc.get("kind").and_then(|k| k.as_str()) == Some("FineTuneJob") {
        let job: FineTuneJob = serde_yaml::from_str(&text).map_err(bad)?;
        let name = job.metadata.name.clone().unwrap_or_default();
        (format!("FineTuneJob {name}"), job.spec)
    } else {
        let cfg: TrainerConfig = serde_yaml::from_str(&text).map_err(bad)?;
        (
            format!("trainer configuration {}", cfg.job),
            spec_of_config(&cfg),
        )
    };
    let plan = plan_for(&spec);
    let refusal = finetune_api::fit::check(&spec).err();
    Ok(PlanReport {
        source,
        plan,
        refusal,
    })
}

/// The spec a trainer configuration was rendered from, as far as the plan needs it: its
/// precision, checkpointing and GPU use are the resolved ones.
fn spec_of_config(cfg: &TrainerConfig) -> FineTuneJobSpec {
    let mut spec = FineTuneJobSpec {
        model: cfg.model.clone(),
        method: cfg.method.clone(),
        hyperparameters: cfg.hyperparameters.clone(),
        ..FineTuneJobSpec::default()
    };
    spec.hyperparameters.precision = Some(cfg.precision);
    spec.hyperparameters.gradient_checkpointing = Some(cfg.gradient_checkpointing);
    spec.resources.gpus = Some(u32::from(cfg.use_gpu));
    if let Some(last) = cfg.layer_gpus.iter().max() {
        spec.resources.gpus = Some(last + 1);
        spec.resources.spread = Spread::Layers;
    }
    spec
}

/// The report as a table: one row per component, the total, the budget and the verdict.
pub fn table(r: &PlanReport) -> String {
    let gib = |b: u64| b as f64 / GIB as f64;
    let mut out = match r.plan.devices.len() {
        0 => format!("memory plan of {} (one device)\n", r.source),
        n => format!(
            "memory plan of {} (layers split over {n} GPUs; the busiest below)\n",
            r.source
        ),
    };
    for d in &r.plan.devices {
        out.push_str(&format!(
            "  GPU {:<10} {:>9.2} GiB  layers {}-{}\n",
            d.gpu,
            gib(d.bytes),
            d.first_layer,
            d.end_layer.saturating_sub(1)
        ));
    }
    for c in &r.plan.components {
        out.push_str(&format!(
            "  {:<14} {:>9.2} GiB  {}\n",
            c.name,
            gib(c.bytes),
            c.detail
        ));
    }
    out.push_str(&format!(
        "  {:<14} {:>9.2} GiB\n",
        "total",
        gib(r.plan.per_gpu_bytes)
    ));
    if r.plan.gpu_budget_bytes == 0 {
        out.push_str("  a CPU run: no GPU budget to check\n");
    } else {
        out.push_str(&format!(
            "  {:<14} {:>9.2} GiB  {}\n",
            "GPU budget",
            gib(r.plan.gpu_budget_bytes),
            if r.plan.fits { "fits" } else { "DOES NOT FIT" }
        ));
    }
    if let Some(msg) = &r.refusal {
        out.push_str(&format!("\n{msg}\n"));
    }
    out
}
