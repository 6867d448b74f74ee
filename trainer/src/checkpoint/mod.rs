//! Checkpoints: atomic writes, a checksummed manifest, retention, and verified resume.

pub mod store;

pub use store::{CheckpointState, CheckpointStore, LoadedCheckpoint, RunIdentity};
