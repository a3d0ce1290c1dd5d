//! Rate-limited diagnostics for the host's log, one limit per topic.

#![forbid(unsafe_code)]

use super::LOG_PER_SECOND;
use crate::config::{LogLevel, LogSink};
use crate::shared::Shared;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a diagnostic is about. Each kind has its own rate limit, so that a
/// flood of one (over-limit connections, say) cannot hide another.
#[derive(Clone, Copy)]
pub(super) enum Topic {
    Lifecycle = 0,
    Accept,
    Limit,
    Frame,
    Close,
    Internal,
}

#[derive(Default)]
pub(super) struct Bucket {
    window: Option<Instant>,
    written: u32,
    suppressed: u64,
}

/// Rate-limited diagnostics for the host's log.
pub(super) struct Logger {
    pub(super) sink: Option<LogSink>,
    /// Set when the host freed the server from a callback: no more calls.
    pub(super) shared: Arc<Shared>,
    pub(super) buckets: [Bucket; 6],
}

impl Logger {
    pub(super) fn log(&mut self, topic: Topic, level: LogLevel, msg: impl FnOnce() -> String) {
        let Some(sink) = &self.sink else { return };
        if self.shared.silent.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        let b = &mut self.buckets[topic as usize];
        if b.window.is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1)) {
            if b.suppressed > 0 {
                let note = format!("tcpframe: {} similar log messages suppressed (rate limit)", b.suppressed);
                let _one_at_a_time = self.shared.core.log_lock.lock().unwrap_or_else(|p| p.into_inner());
                sink(LogLevel::Warn, &note);
            }
            *b = Bucket { window: Some(now), written: 0, suppressed: 0 };
        }
        if b.written >= LOG_PER_SECOND {
            b.suppressed += 1;
            return;
        }
        b.written += 1;
        let text = msg();
        // Loops of one server never call the log function at the same time.
        let _one_at_a_time = self.shared.core.log_lock.lock().unwrap_or_else(|p| p.into_inner());
        sink(level, &text);
    }
}
