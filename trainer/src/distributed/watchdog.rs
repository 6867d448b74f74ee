//! A deadline for work that cannot be interrupted: a collective waiting on a GPU stream for a
//! rank that died. Safe code cannot cancel it, so when the deadline passes a watchdog thread
//! acts instead (in the trainer: the process exits with
//! [`crate::distributed::COLLECTIVE_EXIT_CODE`], which tells the operator to restart the gang).

use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::Duration;

use super::COLLECTIVE_EXIT_CODE;

/// What the watchdog does when `what` has not finished in time.
pub type OnTimeout = fn(what: &str, timeout: Duration);

/// Runs `work`; when it has not returned within `timeout`, `on_timeout` runs on a watchdog
/// thread while `work` goes on (it must end the process for the deadline to hold).
pub fn within<T>(
    timeout: Duration,
    what: &str,
    on_timeout: OnTimeout,
    work: impl FnOnce() -> T,
) -> T {
    let (done, finished) = channel::<()>();
    let what = what.to_string();
    let watchdog = std::thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(timeout) {
            on_timeout(&what, timeout);
        }
    });
    let out = work();
    // The watchdog may already have acted and ended; a failed send is then expected.
    let _ = done.send(());
    let _ = watchdog.join();
    out
}

/// The trainer's [`OnTimeout`]: logs and exits with the collective failure code, so the gang is
/// restarted as a whole instead of hanging.
pub fn exit_gang(what: &str, timeout: Duration) {
    tracing::error!(
        what,
        timeout_seconds = timeout.as_secs_f64(),
        "a collective did not finish in time: leaving the gang"
    );
    std::process::exit(i32::from(COLLECTIVE_EXIT_CODE));
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static FIRED: AtomicUsize = AtomicUsize::new(0);

    fn count(_: &str, _: Duration) {
        FIRED.fetch_add(1, Ordering::SeqCst);
    }

    #[test]
    fn the_watchdog_acts_only_when_the_work_outlives_its_deadline() {
        let quick = within(Duration::from_millis(500), "quick", count, || 7);
        assert_eq!((quick, FIRED.load(Ordering::SeqCst)), (7, 0));
        let slow = within(Duration::from_millis(20), "slow", count, || {
            std::thread::sleep(Duration::from_millis(300));
            8
        });
        assert_eq!((slow, FIRED.load(Ordering::SeqCst)), (8, 1));
    }
}
