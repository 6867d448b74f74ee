//! Crash points for fault-injection tests.
//!
//! Every API write of a reconcile is followed by a [`crash_point!`](crate::crash_point) naming
//! it. With the `failpoints` cargo feature the operator reads the `FAILPOINTS` environment
//! variable at start (the `fail` crate's syntax, e.g. `FAILPOINTS=after-apply-pod=return`), and an
//! active point aborts the process right after that write, as a crash (or a SIGKILL) would. Without
//! the feature the macro expands to nothing, so release builds carry no trace of it.

/// Every crash point the reconciler declares, in the order a fresh job meets the first six.
pub const CRASH_POINTS: &[&str] = &[
    "after-apply-configmap",
    "after-apply-persistentvolumeclaim",
    "after-apply-service",
    "after-apply-networkpolicy",
    "after-apply-pod",
    "after-status-patch",
    "after-event",
    "after-delete-pod",
    "after-delete-configmap",
    "after-delete-service",
];

/// Whether this build has the `failpoints` feature (the crash points are compiled in).
pub const COMPILED: bool = cfg!(feature = "failpoints");

/// Keeps the crash points armed while alive (the `fail` crate's scenario; nothing without the
/// `failpoints` feature).
#[must_use = "the crash points are disarmed when this is dropped"]
pub struct Armed {
    #[cfg(feature = "failpoints")]
    _scenario: fail::FailScenario<'static>,
}

impl std::fmt::Debug for Armed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Armed")
            .field("compiled", &COMPILED)
            .finish()
    }
}

/// Arms the crash points named by the `FAILPOINTS` environment variable (e.g.
/// `after-apply-pod=return`); a no-op without the `failpoints` feature.
pub fn arm_from_env() -> Armed {
    Armed {
        #[cfg(feature = "failpoints")]
        _scenario: fail::FailScenario::setup(),
    }
}

/// Aborts the process after logging which crash point fired (on stderr, unbuffered, so the
/// line survives the abort).
pub fn crash(name: &str) -> ! {
    eprintln!("crash point {name} fired: aborting");
    std::process::abort()
}

/// A crash point right after an API write: aborts the process when the `fail` point `$name` is
/// active (built with the `failpoints` feature only; otherwise nothing).
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        {
            let name: &str = $name;
            fail::fail_point!(name, |_| $crate::failpoints::crash(name));
        }
    };
}

#[cfg(test)]
mod tests {
    use super::CRASH_POINTS;

    #[test]
    fn every_declared_crash_point_is_placed_in_the_reconciler() {
        let source = include_str!("controller/apply.rs");
        for name in CRASH_POINTS {
            let kind = name.strip_prefix("after-apply-");
            let placed = source.contains(&format!("crash_point!(\"{name}\")"))
                || kind
                    .is_some_and(|_| source.contains("crash_point!(&format!(\"after-apply-{}\""));
            assert!(placed, "crash point {name} is declared but not placed");
        }
        assert_eq!(
            CRASH_POINTS.len(),
            CRASH_POINTS
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            "names are unique"
        );
    }
}
