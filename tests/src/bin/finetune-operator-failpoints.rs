//! The operator, built as part of finetune-e2e so that it always has its crash points: this
//! crate enables the operator's `failpoints` feature, and this binary runs the operator's own
//! `main` (operator/src/main.rs). `tests/tests/chaos.rs` arms one crash point at a time with
//! `FAILPOINTS=<name>=return`. Without FAILPOINTS it behaves exactly as `finetune-operator`.
//!
//! A separate binary because `target/debug/finetune-operator` is whatever the last build of the
//! operator package made: `cargo build -p finetune-operator` builds it without the feature.

#[path = "../../../operator/src/main.rs"]
mod operator_main;

fn main() -> anyhow::Result<()> {
    operator_main::main()
}
