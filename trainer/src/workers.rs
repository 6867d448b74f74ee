//! Single-threaded CPU workers, one per core: a training micro-batch's rows, or an evaluation's
//! batches, are split between them.
//!
//! candle parallelises each op over the cores (a GEMM's blocks, an element-wise op's chunks).
//! At the shapes a CPU fine-tune has (hidden 288 to 2048) the ops are small and the threads meet
//! at thousands of barriers per step: the stories15M-shape benchmark ran only 1.5× faster on two
//! cores than on one. Splitting the micro-batch's rows between workers that each run every op on
//! one thread removes those barriers: about 1.3× more tokens/s on the same two cores
//! (BENCHMARKS.md). `train::step::micro_batch_grads` splits a micro-batch's rows and
//! `eval::sequence_log_likelihoods` its batches; this module holds the rules: how many workers,
//! which rows each takes, and how they run.
//!
//! candle's element-wise ops also use a thread pool of their own, sized once per process from
//! `CANDLE_NUM_THREADS`; with workers it only competes with them (its threads spin between
//! ops), so the trainer runs with `CANDLE_NUM_THREADS=1` ([`exec_with_workers_environment`]).

use std::cell::Cell;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use candle_core::Device;

use crate::{Result, TrainerError};

/// Overrides the number of CPU workers (`1` turns the split off).
pub use finetune_api::fit::CPU_WORKERS_ENV as WORKERS_ENV;

/// candle's element-wise thread count, read once per process.
const CANDLE_THREADS_ENV: &str = "CANDLE_NUM_THREADS";

/// Workers a step on `device` uses: on the CPU [`WORKERS_ENV`] when set to a positive number,
/// otherwise the cores this process may run on (both read once per process: every step and
/// evaluation asks); on a GPU one (the device runs the ops).
pub fn cpu_workers(device: &Device) -> usize {
    static CPU_WORKERS: OnceLock<usize> = OnceLock::new();
    if !device.is_cpu() {
        return 1;
    }
    *CPU_WORKERS.get_or_init(|| {
        std::env::var(WORKERS_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
    })
}

/// At most `workers` contiguous, non-empty ranges covering `0..rows` in order, their lengths
/// differing by at most one (the rows of a batch share one padded width, so work is per row).
pub fn row_ranges(rows: usize, workers: usize) -> Vec<Range<usize>> {
    let parts = workers.clamp(1, rows.max(1));
    let (base, extra) = (rows / parts, rows % parts);
    let mut ranges = Vec::with_capacity(parts);
    let mut start = 0;
    for part in 0..parts {
        let len = base + usize::from(part < extra);
        if len > 0 {
            ranges.push(start..start + len);
        }
        start += len;
    }
    ranges
}

/// The workers' threads, each the only thread of its own rayon pool, started when first needed
/// and kept for the process: a thread's allocator keeps the memory it freed for its next
/// allocations, where a new thread per micro-batch would fault in fresh pages for every tensor
/// (measured: a fifth of the step zeroing pages in the kernel).
static POOLS: Mutex<Vec<Arc<rayon::ThreadPool>>> = Mutex::new(Vec::new());

thread_local! {
    /// Set on a worker's thread while it runs a job: a job that splits work again runs it inline.
    static IN_WORKER: Cell<bool> = const { Cell::new(false) };
}

/// The first `n` workers' pools, started if missing.
fn pools(n: usize) -> Result<Vec<Arc<rayon::ThreadPool>>> {
    let mut pools = POOLS.lock().unwrap_or_else(PoisonError::into_inner);
    while pools.len() < n {
        let index = pools.len();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(move |_| format!("cpu-worker-{index}"))
            .build()
            .map_err(|e| TrainerError::Worker(format!("cannot start a CPU worker: {e}")))?;
        pools.push(Arc::new(pool));
    }
    Ok(pools[..n].to_vec())
}

/// Marks this thread as a worker's while alive (also when the job panics).
struct InWorker;

impl InWorker {
    fn enter() -> Self {
        IN_WORKER.with(|w| w.set(true));
        InWorker
    }
}

impl Drop for InWorker {
    fn drop(&mut self) {
        IN_WORKER.with(|w| w.set(false));
    }
}

/// Runs each job on a worker of its own, a thread that is the only thread of its rayon pool, so
/// the rayon-parallel loops inside candle's GEMMs and the trainer's kernels run sequentially on
/// it; returns the results in the jobs' order (the first error if any failed). Called from a
/// worker, runs the jobs there one after the other.
pub fn run_single_threaded<T, F>(jobs: Vec<F>) -> Result<Vec<T>>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    if IN_WORKER.with(Cell::get) {
        return jobs.into_iter().map(|job| job()).collect();
    }
    let pools = pools(jobs.len())?;
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .into_iter()
            .zip(pools)
            .map(|(job, pool)| {
                scope.spawn(move || {
                    pool.install(|| {
                        let _in_worker = InWorker::enter();
                        job()
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .map_err(|_| TrainerError::Worker("a CPU worker panicked".into()))?
            })
            .collect()
    })
}

/// Replaces this process with itself run with `CANDLE_NUM_THREADS=1` when it trains on the CPU
/// with several workers and the variable is unset (candle reads it once, at its first
/// element-wise op, and offers no other setting). Returns only if there is nothing to do or the
/// exec failed, with the reason in the latter case. Call it first in `main`, before any thread
/// or file is opened: the new image keeps the process id and arguments.
pub fn exec_with_workers_environment() -> Option<std::io::Error> {
    if std::env::var_os(CANDLE_THREADS_ENV).is_some() || cpu_workers(&Device::Cpu) <= 1 {
        return None;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return Some(e),
    };
    let mut args = std::env::args_os();
    let argv0 = args.next();
    let mut command = std::process::Command::new(exe);
    command.args(args).env(CANDLE_THREADS_ENV, "1");
    if let Some(argv0) = argv0 {
        std::os::unix::process::CommandExt::arg0(&mut command, argv0);
    }
    Some(std::os::unix::process::CommandExt::exec(&mut command))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn row_ranges_cover_the_rows_in_order_and_balanced() {
        for rows in 0..12 {
            for workers in 1..6 {
                let ranges = row_ranges(rows, workers);
                assert!(ranges.len() <= workers.max(1));
                let covered: Vec<usize> = ranges.iter().cloned().flatten().collect();
                assert_eq!(
                    covered,
                    (0..rows).collect::<Vec<_>>(),
                    "{rows} rows, {workers}"
                );
                let lens: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
                if let (Some(min), Some(max)) = (lens.iter().min(), lens.iter().max()) {
                    assert!(*min >= 1 && max - min <= 1, "{lens:?}");
                }
                if rows >= workers {
                    assert_eq!(ranges.len(), workers);
                }
            }
        }
    }

    #[test]
    fn jobs_run_on_their_own_single_threaded_pools_in_order() {
        let jobs: Vec<_> = (0..3)
            .map(|i| move || Ok((i, rayon::current_num_threads(), std::thread::current().id())))
            .collect();
        let got = run_single_threaded(jobs).unwrap();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(
            got.iter().all(|g| g.1 == 1),
            "one rayon thread each: {got:?}"
        );
        let main = std::thread::current().id();
        assert!(got.iter().all(|g| g.2 != main));
        assert_ne!(got[0].2, got[1].2);
        // The same workers serve the next call.
        let again = run_single_threaded(
            (0..2)
                .map(|_| || Ok(std::thread::current().id()))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(again, vec![got[0].2, got[1].2]);
        // A job that splits again runs the inner jobs on its own thread.
        let nested = run_single_threaded(vec![|| {
            let me = std::thread::current().id();
            let inner = run_single_threaded(
                (0..2)
                    .map(|_| || Ok(std::thread::current().id()))
                    .collect::<Vec<_>>(),
            )?;
            Ok(inner.iter().all(|id| *id == me))
        }])
        .unwrap();
        assert_eq!(nested, vec![true]);
        // A parallel loop inside a job runs on the job's thread.
        let jobs = vec![|| {
            use rayon::prelude::*;
            let me = std::thread::current().id();
            Ok((0..1000)
                .into_par_iter()
                .all(|_| std::thread::current().id() == me))
        }];
        assert_eq!(run_single_threaded(jobs).unwrap(), vec![true]);
    }

    #[test]
    fn a_failing_or_panicking_job_is_an_error() {
        let failing: Vec<Box<dyn FnOnce() -> Result<u8> + Send>> = vec![
            Box::new(|| Ok(1)),
            Box::new(|| Err(TrainerError::Data("no rows".into()))),
        ];
        assert!(matches!(
            run_single_threaded(failing),
            Err(TrainerError::Data(_))
        ));
        let panicking: Vec<Box<dyn FnOnce() -> Result<u8> + Send>> =
            vec![Box::new(|| panic!("boom"))];
        assert!(matches!(
            run_single_threaded(panicking),
            Err(TrainerError::Worker(_))
        ));
    }
}
