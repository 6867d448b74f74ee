//! A thread that owns something which may not move between threads (an NCCL communicator) and
//! answers requests for it, each within a deadline. Safe code cannot cancel work that waits for
//! a dead peer, so when an answer is late the caller's [`OnTimeout`] acts (in the trainer:
//! [`exit_gang`], the process exits with [`crate::distributed::COLLECTIVE_EXIT_CODE`] and the
//! operator restarts the gang).

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use super::COLLECTIVE_EXIT_CODE;

/// What happens when an answer is late (`what` the request, `timeout` its deadline).
pub type OnTimeout = fn(what: &str, timeout: Duration);

/// A thread serving requests, answered in order, one reply each.
pub struct Worker<Req, Rep> {
    requests: Sender<Req>,
    replies: Receiver<Rep>,
    timeout: Duration,
    on_timeout: OnTimeout,
}

impl<Req: Send + 'static, Rep: Send + 'static> Worker<Req, Rep> {
    /// Starts `serve` on a thread named `name`; it reads the requests and sends the replies (it
    /// may send one first, before any request, for [`Worker::next_reply`] to wait for).
    pub fn start(
        name: &str,
        timeout: Duration,
        on_timeout: OnTimeout,
        serve: impl FnOnce(Receiver<Req>, Sender<Rep>) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (requests, jobs) = channel();
        let (answers, replies) = channel();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || serve(jobs, answers))?;
        Ok(Self {
            requests,
            replies,
            timeout,
            on_timeout,
        })
    }

    /// The thread's next reply to `what`, within the deadline; when it is late `on_timeout`
    /// runs and the answer is an error.
    pub fn next_reply(&self, what: &str) -> Result<Rep, String> {
        match self.replies.recv_timeout(self.timeout) {
            Ok(reply) => Ok(reply),
            Err(RecvTimeoutError::Timeout) => {
                (self.on_timeout)(what, self.timeout);
                Err(format!("no answer within {:?}", self.timeout))
            }
            Err(RecvTimeoutError::Disconnected) => Err("the worker thread ended".into()),
        }
    }

    /// Sends `request` and waits for its reply (see [`Worker::next_reply`]).
    pub fn call(&self, what: &str, request: Req) -> Result<Rep, String> {
        self.requests
            .send(request)
            .map_err(|_| "the worker thread ended".to_string())?;
        self.next_reply(what)
    }
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

    static LATE: AtomicUsize = AtomicUsize::new(0);

    fn count(_: &str, _: Duration) {
        LATE.fetch_add(1, Ordering::SeqCst);
    }

    /// Doubles each request after `delay_ms` of it; answers "ready" first.
    fn doubler(timeout_ms: u64) -> Worker<u64, u64> {
        Worker::start(
            "test",
            Duration::from_millis(timeout_ms),
            count,
            |jobs, answers| {
                let _ = answers.send(0);
                for delay_ms in jobs {
                    std::thread::sleep(Duration::from_millis(delay_ms));
                    if answers.send(delay_ms * 2).is_err() {
                        return;
                    }
                }
            },
        )
        .unwrap()
    }

    #[test]
    fn answers_in_time_are_returned_and_a_late_one_runs_the_timeout_action() {
        let w = doubler(300);
        assert_eq!(w.next_reply("ready").unwrap(), 0);
        assert_eq!(w.call("quick", 1).unwrap(), 2);
        let before = LATE.load(Ordering::SeqCst);
        let err = w.call("slow", 600).unwrap_err();
        assert!(err.contains("no answer within"), "{err}");
        assert_eq!(LATE.load(Ordering::SeqCst), before + 1);
    }

    #[test]
    fn a_worker_that_ended_is_an_error_not_a_hang() {
        let w: Worker<u64, u64> =
            Worker::start("test", Duration::from_secs(5), count, |_jobs, _answers| {}).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let err = w.call("after the end", 1).unwrap_err();
        assert!(err.contains("ended"), "{err}");
    }
}
