//! Optimisation: AdamW with serialisable state, learning-rate schedules, gradient clipping.

pub mod adamw;
pub mod clip;
mod fused_adamw;
pub mod schedule;

pub use adamw::{AdamW, AdamWParams};
pub use clip::{clip_factor, clip_grad_norm, global_norm};
pub use schedule::Schedule;
