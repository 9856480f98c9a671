//! Latencies of answered requests per telemetry interval.

use outpost_protocol::telemetry::Latency;
use std::sync::Mutex;

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

    /// Percentiles so far, without starting a new interval.
    pub fn peek(&self) -> Latency {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.0.is_empty() {
            return Latency::default();
        }
        let at = |q: f64| g.0.value_at_quantile(q).min(g.1);
        Latency { p50: at(0.50), p90: at(0.90), p99: at(0.99), max: g.1 }
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
}
