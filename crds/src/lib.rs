//! The `FineTuneJob` API (`finetune.dev/v1alpha1`).
//!
//! This crate is the single source of truth for everything that crosses a process boundary:
//! the custom resource the user writes, its status, the model presets and their sizes, the
//! pure [`validate()`] function the operator runs before it creates anything, and the
//! [`TrainerConfig`] file the operator renders for the trainer.

pub mod cel;
pub mod console;
pub mod document;
pub mod fit;
pub mod gang;
pub mod memory;
pub mod mutability;
pub mod placement;
pub mod presets;
pub mod progress;
pub mod quantity;
pub mod source;
pub mod trainer_config;
pub mod v1alpha1;
pub mod validate;

pub use document::validate_document;
pub use mutability::validate_update;
pub use presets::{ModelArchitecture, ModelPreset, PresetDefaults};
pub use progress::{TrainerPhase, TrainerProgress};
pub use trainer_config::{ModelSource, TrainerConfig, TrainerPaths};
pub use v1alpha1::*;
pub use validate::{FieldError, FieldWarning, validate, warnings};

/// API group of every resource in this crate.
pub const GROUP: &str = "finetune.dev";
/// API version of the resources in this module.
pub const VERSION: &str = "v1alpha1";
/// Label that every child object carries, naming the FineTuneJob that owns it.
pub const JOB_LABEL: &str = "finetune.dev/job";
/// Kueue's queue label. A job carrying it passes it (with [`KUEUE_PRIORITY_LABEL`]) to its
/// trainer pod, which Kueue's plain-Pod integration then admits: its webhook holds the pod at the
/// `kueue.x-k8s.io/admission` scheduling gate until the queue's quota admits it (the job shows
/// Pending, reason `SchedulingGated`), and a preempted pod is replaced by the operator as any
/// disruption is. See docs/kueue.md for the cluster setup.
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// Kueue's workload priority label, passed to the trainer pod with [`KUEUE_QUEUE_LABEL`].
pub const KUEUE_PRIORITY_LABEL: &str = "kueue.x-k8s.io/priority-class";
