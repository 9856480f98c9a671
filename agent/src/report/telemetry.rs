//! Health telemetry: what the device publishes every `--telemetry-interval`
//! on `telemetry` — inference counts and latency percentiles for the
//! interval, process memory and CPU, store size, reconnects, uptime.

use crate::serve::Engine;
use crate::serve::models::Models;
use outpost_protocol::Telemetry;
use outpost_protocol::telemetry::{InferenceStats, ModelId, MqttStats, ProcessStats, SlotTelemetry, StoreStats};
use std::time::Instant;

/// Counter values at the previous report, to publish per-interval figures.
#[derive(Debug, Default)]
pub struct Reporter {
    /// [requests, errors, rejected, model errors] of each slot's engine ("": the default slot's).
    last: std::collections::HashMap<String, [u64; 4]>,
    last_cpu_ticks: Option<(u64, Instant)>,
    /// The reporting interval in force, in seconds (said in each report).
    pub interval_s: Option<u64>,
}

impl Reporter {
    /// A reporter for reports every `every`.
    pub fn every(every: std::time::Duration) -> Reporter {
        Reporter { interval_s: Some(every.as_secs()), ..Default::default() }
    }

    /// Builds one report; counts are for the interval since the last one.
    pub fn report(
        &mut self,
        device: &str,
        started: Instant,
        models: &Models,
        store: StoreStats,
        reconnects: u64,
        journal: (u64, u64, u64),
    ) -> Telemetry {
        let engine = &models.default;
        let inference = self.inference("", engine);
        let slots = models
            .slots()
            .into_iter()
            .map(|(slot, e)| {
                let shadow = e.shadow().map(|s| s.stats());
                let t = SlotTelemetry { model: model_id(&e), inference: self.inference(&slot, &e), shadow };
                (slot, t)
            })
            .collect();
        let cpu_percent = match (cpu_ticks(), self.last_cpu_ticks) {
            (Some(now), Some((before, at))) => {
                let secs = at.elapsed().as_secs_f64().max(1e-3);
                // Linux reports CPU time in clock ticks of 1/100 s.
                (now.saturating_sub(before) as f64 / 100.0 / secs * 100.0 * 10.0).round() / 10.0
            }
            _ => 0.0,
        };
        self.last_cpu_ticks = cpu_ticks().map(|t| (t, Instant::now()));
        Telemetry {
            schema: outpost_protocol::telemetry::SCHEMA.into(),
            device: device.into(),
            at: crate::sys::now_rfc3339(),
            uptime_s: started.elapsed().as_secs(),
            interval_s: self.interval_s,
            model: model_id(engine),
            inference,
            process: ProcessStats { rss_bytes: rss_bytes().unwrap_or(0), cpu_percent },
            store,
            mqtt: MqttStats {
                reconnects,
                journal_pending: journal.0,
                journal_dropped: journal.1,
                journal_bytes: journal.2,
            },
            shadow: engine.shadow().map(|s| s.stats()),
            models: slots,
        }
    }

    /// One engine's figures for the interval since the last report.
    fn inference(&mut self, slot: &str, engine: &Engine) -> InferenceStats {
        let now = engine.own_counts();
        let last = self.last.insert(slot.to_string(), now).unwrap_or_default();
        let [requests, errors, rejected, model_errors] = [0, 1, 2, 3].map(|i| now[i] - last[i]);
        InferenceStats {
            requests,
            errors,
            rejected,
            model_errors: Some(model_errors),
            latency_us: engine.latencies.take(),
        }
    }
}

fn model_id(engine: &Engine) -> Option<ModelId> {
    engine.active().map(|m| ModelId { name: m.name.clone(), version: m.version.clone() })
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
