//! Prometheus metrics (`/metrics`) and the trainer's progress (`/progress`, JSON), served by a
//! small HTTP server on a background thread.

pub mod progress;
pub mod registry;
pub mod server;

pub use progress::{Phase, Progress};
pub use registry::Metrics;
