//! A one-line progress bar with rate and ETA for people at a terminal (pretraining, training,
//! evaluation in `finetune-trainer`, downloads in `finetune-fetch`). Where stderr is not a
//! terminal (pods, CI, pipes) it draws nothing and the structured logs tell the story, as before.
//! Shared by both binaries, so it lives in the crate both depend on.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Set to `0` to turn the bar off on a terminal too.
pub const PROGRESS_ENV: &str = "FINETUNE_PROGRESS";

/// Redraws at most this often (and always at the end).
const REDRAW: Duration = Duration::from_millis(100);
/// Width of the bar itself, in characters.
const BAR: usize = 24;

/// A progress bar over `total` units (steps, rows, bytes).
#[derive(Debug)]
pub struct ProgressBar {
    label: String,
    unit: &'static str,
    total: u64,
    started: Instant,
    first: u64,
    drawn: Option<Instant>,
    enabled: bool,
}

impl ProgressBar {
    /// A bar labelled `label` counting `unit`s up to `total`; drawn only when stderr is a
    /// terminal and `FINETUNE_PROGRESS` is not `0`.
    pub fn new(label: impl Into<String>, unit: &'static str, total: u64) -> Self {
        let enabled = std::io::stderr().is_terminal()
            && std::env::var(PROGRESS_ENV).map_or(true, |v| v != "0");
        Self::drawn_when(enabled, label, unit, total)
    }

    /// A bar that draws exactly when `enabled` (for callers that decide themselves).
    pub fn drawn_when(
        enabled: bool,
        label: impl Into<String>,
        unit: &'static str,
        total: u64,
    ) -> Self {
        ProgressBar {
            label: label.into(),
            unit,
            total,
            started: Instant::now(),
            first: 0,
            drawn: None,
            enabled,
        }
    }

    /// Counts the rate from `done` units already done before this process (a resumed run).
    pub fn resumed_at(mut self, done: u64) -> Self {
        self.first = done;
        self
    }

    /// Whether the bar draws (a terminal); callers may skip their periodic log lines then.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Shows `done` units and a short `detail` (e.g. the loss).
    pub fn set(&mut self, done: u64, detail: &str) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if done < self.total && self.drawn.is_some_and(|t| now - t < REDRAW) {
            return;
        }
        self.drawn = Some(now);
        let rate =
            done.saturating_sub(self.first) as f64 / (now - self.started).as_secs_f64().max(1e-9);
        let line = render(&self.label, self.unit, done, self.total, rate, detail);
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
    }

    /// Clears the bar's line so a log line can be printed; the next [`Self::set`] redraws.
    pub fn clear(&mut self) {
        if self.enabled && self.drawn.is_some() {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
            self.drawn = None;
        }
    }

    /// Ends the bar's line.
    pub fn finish(&mut self) {
        if self.enabled && self.drawn.is_some() {
            let _ = writeln!(std::io::stderr().lock());
            self.drawn = None;
        }
    }
}

impl Drop for ProgressBar {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `1h02m`, `3m05s`, `42s`.
fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// The bar's text: `train [#########---------------] 120/332 steps  3.2 steps/s  ETA 1m06s  loss 0.612`.
pub fn render(label: &str, unit: &str, done: u64, total: u64, rate: f64, detail: &str) -> String {
    let fraction = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).clamp(0.0, 1.0)
    };
    let filled = (fraction * BAR as f64).round() as usize;
    let eta = if rate <= 0.0 || done >= total {
        String::new()
    } else {
        format!("  ETA {}", duration((total - done) as f64 / rate))
    };
    let rate = if rate >= 10.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.1}")
    };
    let detail = if detail.is_empty() {
        String::new()
    } else {
        format!("  {detail}")
    };
    format!(
        "{label} [{}{}] {done}/{total} {unit}  {rate} {unit}/s{eta}{detail}",
        "#".repeat(filled),
        "-".repeat(BAR - filled),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_count_rate_eta_and_detail() {
        let line = render("train", "steps", 120, 332, 3.0, "loss 0.612");
        assert_eq!(
            line,
            "train [#########---------------] 120/332 steps  3.0 steps/s  ETA 1m11s  loss 0.612"
        );
        let done = render("eval", "rows", 500, 500, 250.0, "");
        assert_eq!(
            done,
            format!("eval [{}] 500/500 rows  250 rows/s", "#".repeat(24))
        );
        assert_eq!(duration(3725.0), "1h02m");
        assert_eq!(duration(42.4), "42s");
    }

    #[test]
    fn a_disabled_bar_draws_nothing_and_an_enabled_one_throttles() {
        let mut off = ProgressBar::drawn_when(false, "train", "steps", 10);
        off.set(5, "x");
        assert!(off.drawn.is_none());
        let mut on = ProgressBar::drawn_when(true, "train", "steps", 10);
        on.set(1, "");
        let first = on.drawn;
        assert!(first.is_some());
        on.set(2, "");
        assert_eq!(on.drawn, first, "redrawn within 100 ms");
        on.set(10, "");
        assert_ne!(on.drawn, first, "the end is always drawn");
        on.clear();
        assert!(on.drawn.is_none());
    }
}
