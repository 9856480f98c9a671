//! Health telemetry: what the device publishes every `--telemetry-interval`
//! on `telemetry` — inference counts and latency percentiles for the
//! interval, process memory and CPU, store size, reconnects, uptime.

use crate::serve::Engine;
use crate::store::Store;
use outpost_protocol::Telemetry;
use outpost_protocol::telemetry::{InferenceStats, Latency, ModelId, MqttStats, ProcessStats, StoreStats};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Latencies of the current interval, in microseconds, in an HDR histogram:
/// constant memory and O(1) recording under any load, 3 significant digits
/// from 1 µs to a minute (longer ones count as a minute; `max` is exact).
#[derive(Debug)]
pub struct Latencies {
    inner: Mutex<(hdrhistogram::Histogram<u32>, u64)>,
}

/// The longest latency the histogram resolves, in microseconds.
const MAX_TRACKED_US: u64 = 60_000_000;

impl Default for Latencies {
    fn default() -> Self {
        let h = hdrhistogram::Histogram::new_with_bounds(1, MAX_TRACKED_US, 3)
            .expect("constant bounds that hdrhistogram accepts (tested)");
        Latencies { inner: Mutex::new((h, 0)) }
    }
}

impl Latencies {
    pub fn record(&self, micros: u64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.1 = g.1.max(micros);
        g.0.saturating_record(micros.clamp(1, MAX_TRACKED_US));
    }

    /// Percentiles of the interval that just ended; starts a new one.
    pub fn take(&self) -> Latency {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let max = std::mem::take(&mut g.1);
        if g.0.is_empty() {
            return Latency::default();
        }
        let h = &g.0;
        let at = |q: f64| h.value_at_quantile(q).min(max);
        let latency = Latency { p50: at(0.50), p90: at(0.90), p99: at(0.99), max };
        g.0.reset();
        latency
    }
}

/// Counter values at the previous report, to publish per-interval figures.
#[derive(Debug, Default)]
pub struct Reporter {
    last_requests: u64,
    last_errors: u64,
    last_rejected: u64,
    last_cpu_ticks: Option<(u64, Instant)>,
}

impl Reporter {
    /// Builds one report; counts are for the interval since the last one.
    pub fn report(
        &mut self,
        device: &str,
        started: Instant,
        engine: &Engine,
        store: &Store,
        reconnects: u64,
        journal: (u64, u64),
    ) -> Telemetry {
        let c = &engine.counters;
        let (requests, errors, rejected) =
            (c.requests.load(Ordering::Relaxed), c.errors.load(Ordering::Relaxed), c.rejected.load(Ordering::Relaxed));
        let inference = InferenceStats {
            requests: requests - self.last_requests,
            errors: errors - self.last_errors,
            rejected: rejected - self.last_rejected,
            latency_us: engine.latencies.take(),
        };
        (self.last_requests, self.last_errors, self.last_rejected) = (requests, errors, rejected);
        let cpu_percent = match (cpu_ticks(), self.last_cpu_ticks) {
            (Some(now), Some((before, at))) => {
                let secs = at.elapsed().as_secs_f64().max(1e-3);
                // Linux reports CPU time in clock ticks of 1/100 s.
                (now.saturating_sub(before) as f64 / 100.0 / secs * 100.0 * 10.0).round() / 10.0
            }
            _ => 0.0,
        };
        self.last_cpu_ticks = cpu_ticks().map(|t| (t, Instant::now()));
        let (bytes, versions) = store.usage();
        Telemetry {
            schema: outpost_protocol::telemetry::SCHEMA.into(),
            device: device.into(),
            at: crate::status::now_rfc3339(),
            uptime_s: started.elapsed().as_secs(),
            model: engine.active().map(|m| ModelId { name: m.name.clone(), version: m.version.clone() }),
            inference,
            process: ProcessStats { rss_bytes: rss_bytes().unwrap_or(0), cpu_percent },
            store: StoreStats { bytes, versions },
            mqtt: MqttStats { reconnects, journal_pending: journal.0, journal_dropped: journal.1 },
        }
    }
}

/// Resident memory from /proc/self/statm (0 where there is no /proc).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// utime + stime of this process in clock ticks, from /proc/self/stat.
pub fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_an_interval_then_a_fresh_one() {
        let l = Latencies::default();
        for us in 1..=100 {
            l.record(us);
        }
        let p = l.take();
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50, 90, 99, 100));
        assert_eq!(l.take(), Latency::default());
        // Constant memory: a million samples, then the percentiles within 0.1 %.
        for us in 1..=1_000_000 {
            l.record(us);
        }
        let p = l.take();
        assert!((499_500..=500_500).contains(&p.p50), "{p:?}");
        assert!((989_000..=991_000).contains(&p.p99), "{p:?}");
        assert_eq!(p.max, 1_000_000);
        // Beyond the tracked range: counted at the bound, the max is exact.
        l.record(3_600_000_000);
        assert_eq!(l.take().max, 3_600_000_000);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_figures_are_read_on_linux() {
        let rss = rss_bytes().expect("/proc/self/statm");
        assert!(rss > 1_000_000, "a test process uses more than 1 MB: {rss}");
        let before = cpu_ticks().expect("/proc/self/stat");
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 100 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(cpu_ticks().expect("/proc/self/stat") > before, "100 ms of spinning shows in utime ({x})");
    }
}
