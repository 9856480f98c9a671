//! `/metrics`: the Prometheus text exposition (format 0.0.4) of the agent.
//!
//! Counters carry the labels a dashboard slices by (`transport`, `model`,
//! `code`, `outcome`); the process families are the ones every Prometheus
//! client library exports (`process_*`), so standard dashboards and alerts
//! work unchanged. Families the agent loop owns (MQTT link, journal, store)
//! come from a [`Source`] the agent installs; the engine's own are rendered
//! here. Names are a contract: `packaging/grafana/outpost-dashboard.json`
//! is built on them and a test checks every query against a live agent.

use super::{Engine, LATENCY_BUCKETS_US};
use outpost_protocol::ErrorCode;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// How a request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Mqtt,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Mqtt => "mqtt",
        }
    }
}

/// Labelled counters. Each is a short list searched linearly: a device
/// serves a handful of models and sees a handful of error codes, so this
/// costs less per request than hashing, and no series ever goes away (a
/// counter that vanished and came back at 0 would look like a reset). The
/// label values known in advance start at 0, so the first failure is an
/// increase Prometheus can see (a series born at 1 has no increase).
#[derive(Debug)]
pub struct Tally {
    /// (transport, model name) → requests received.
    requests: Mutex<Vec<(Transport, String, u64)>>,
    /// (transport, code) → requests answered with an error (`overloaded` too).
    errors: Mutex<Vec<((Transport, ErrorCode), u64)>>,
    /// Requests refused as overloaded, per transport (http, mqtt).
    rejected: [AtomicU64; 2],
    /// code → desired states refused.
    desired_refused: Mutex<Vec<(ErrorCode, u64)>>,
    /// final phase → deployments that ended so.
    outcomes: Mutex<Vec<(&'static str, u64)>>,
}

impl Default for Tally {
    fn default() -> Tally {
        use outpost_protocol::Phase;
        let errors = [ErrorCode::BadInput, ErrorCode::Overloaded, ErrorCode::NoModel, ErrorCode::InferenceFailed];
        let refusals = [
            ErrorCode::SignatureRequired,
            ErrorCode::SignatureInvalid,
            ErrorCode::StaleRevision,
            ErrorCode::DowngradeRefused,
            ErrorCode::InvalidMessage,
        ];
        let outcomes =
            [Phase::Active, Phase::Failed, Phase::RolledBack, Phase::Unchanged, Phase::Superseded, Phase::Undeployed];
        Tally {
            requests: Default::default(),
            errors: Mutex::new(
                [Transport::Http, Transport::Mqtt]
                    .into_iter()
                    .flat_map(|t| errors.iter().map(move |c| ((t, *c), 0)))
                    .collect(),
            ),
            rejected: Default::default(),
            desired_refused: Mutex::new(refusals.iter().map(|c| (*c, 0)).collect()),
            outcomes: Mutex::new(outcomes.iter().map(|p| (p.as_str(), 0)).collect()),
        }
    }
}

fn bump<K: PartialEq>(list: &Mutex<Vec<(K, u64)>>, key: K) {
    let mut l = list.lock().unwrap_or_else(|p| p.into_inner());
    match l.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += 1,
        None => l.push((key, 1)),
    }
}

impl Tally {
    pub fn request(&self, transport: Transport, model: &str) {
        let mut l = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        match l.iter_mut().find(|(t, m, _)| *t == transport && m == model) {
            Some((_, _, n)) => *n += 1,
            None => l.push((transport, model.to_string(), 1)),
        }
    }

    pub fn error(&self, transport: Transport, code: ErrorCode) {
        if code == ErrorCode::Overloaded {
            self.rejected[transport as usize].fetch_add(1, Ordering::Relaxed);
        }
        bump(&self.errors, (transport, code));
    }

    pub fn desired_refused(&self, code: ErrorCode) {
        bump(&self.desired_refused, code);
    }

    pub fn outcome(&self, phase: outpost_protocol::Phase) {
        bump(&self.outcomes, phase.as_str());
    }
}

/// Families the agent loop owns, appended to the engine's.
pub trait Source: Send + Sync + std::fmt::Debug {
    fn render(&self, out: &mut Exposition);
}

/// A Prometheus text exposition being written.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// `# HELP` and `# TYPE` of a family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample; label values are escaped as the format says.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.text.push_str("\\\\"),
                        '"' => self.text.push_str("\\\""),
                        '\n' => self.text.push_str("\\n"),
                        c => self.text.push(c),
                    }
                }
                self.text.push('"');
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    pub fn into_text(self) -> String {
        self.text
    }
}

/// The whole exposition: build, engine, model, probation, process, then
/// what the agent's [`Source`] adds.
pub fn render(engine: &Engine) -> String {
    let mut out = Exposition::default();
    let c = &engine.counters;
    let t = &c.tally;

    out.family("outpost_build_info", "gauge", "The agent's version and build target (always 1).");
    let target = format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS);
    out.sample("outpost_build_info", &[("version", env!("CARGO_PKG_VERSION")), ("target", &target)], 1);

    out.family("outpost_inference_requests_total", "counter", "Inference requests received, by transport and model.");
    for (transport, model, n) in t.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        out.sample("outpost_inference_requests_total", &[("transport", transport.as_str()), ("model", model)], n);
    }
    out.family(
        "outpost_inference_errors_total",
        "counter",
        "Inference requests answered with an error, by transport and error code (overloaded included).",
    );
    for ((transport, code), n) in t.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        out.sample("outpost_inference_errors_total", &[("transport", transport.as_str()), ("code", code.as_str())], n);
    }
    out.family(
        "outpost_inference_rejected_total",
        "counter",
        "Inference requests refused as overloaded, by transport.",
    );
    for transport in [Transport::Http, Transport::Mqtt] {
        let n = t.rejected[transport as usize].load(Ordering::Relaxed);
        out.sample("outpost_inference_rejected_total", &[("transport", transport.as_str())], n);
    }

    let (buckets, sum_us) = c.latency.snapshot();
    out.family(
        "outpost_inference_latency_seconds",
        "histogram",
        "Latency of answered requests, from arrival to answer.",
    );
    for (bound, n) in LATENCY_BUCKETS_US.iter().zip(&buckets) {
        let le = format!("{}", *bound as f64 / 1e6);
        out.sample("outpost_inference_latency_seconds_bucket", &[("le", &le)], n);
    }
    let total = buckets.last().copied().unwrap_or(0);
    out.sample("outpost_inference_latency_seconds_bucket", &[("le", "+Inf")], total);
    out.sample("outpost_inference_latency_seconds_sum", &[], format!("{:.6}", sum_us as f64 / 1e6));
    out.sample("outpost_inference_latency_seconds_count", &[], total);

    out.single(
        "outpost_inference_queue_depth",
        "gauge",
        "Requests admitted and waiting for a worker.",
        c.waiting.load(Ordering::Relaxed),
    );
    out.single(
        "outpost_inference_in_flight",
        "gauge",
        "Requests a worker is running.",
        c.running.load(Ordering::Relaxed),
    );
    let (workers, queue) = engine.pool_sizes();
    out.single("outpost_inference_workers", "gauge", "Inference worker threads.", workers);
    out.single("outpost_inference_queue_limit", "gauge", "Requests that may wait before `overloaded`.", queue);

    out.family("outpost_model_info", "gauge", "The model serving (1), labelled with its name and version.");
    if let Some(m) = engine.active() {
        out.sample(
            "outpost_model_info",
            &[("name", &m.name), ("version", &m.version), ("manifest_sha256", &m.manifest_sha256)],
            1,
        );
        out.single(
            "outpost_model_load_seconds",
            "gauge",
            "Time the serving model took to load and optimise.",
            format!("{:.6}", m.load_time.as_secs_f64()),
        );
    }
    out.family(
        "outpost_probation",
        "gauge",
        "1 while the serving version is on probation (a failed probation rolls back), labelled with it.",
    );
    if let Some((name, version)) = engine.probation_of() {
        out.sample("outpost_probation", &[("name", &name), ("version", &version)], 1);
    }
    out.single(
        "outpost_rollbacks_total",
        "counter",
        "Automatic rollbacks after a failed probation.",
        c.rollbacks.load(Ordering::Relaxed),
    );
    out.family("outpost_deployments_total", "counter", "Deployments that reached a final phase, by outcome.");
    for (outcome, n) in t.outcomes.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        out.sample("outpost_deployments_total", &[("outcome", outcome)], n);
    }
    out.family(
        "outpost_desired_refused_total",
        "counter",
        "Desired states refused (unsigned, bad signature, wrong target, invalid, stale, a downgrade), by error code.",
    );
    for (code, n) in t.desired_refused.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        out.sample("outpost_desired_refused_total", &[("code", code.as_str())], n);
    }
    out.single(
        "outpost_reply_refused_total",
        "counter",
        "MQTT requests whose reply topic is outside the reply prefixes (answered on predictions instead).",
        c.reply_refused.load(Ordering::Relaxed),
    );

    process(&mut out);
    if let Some(source) = engine.metrics_source.get() {
        source.render(&mut out);
    }
    out.into_text()
}

/// The `process_*` families every Prometheus client exports, from /proc
/// (absent where there is none).
fn process(out: &mut Exposition) {
    let page = rustix::param::page_size() as u64;
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        let mut f = statm.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
        let (size, resident) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
        out.single("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", size * page);
        out.single("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", resident * page);
    }
    // Linux reports times in clock ticks of 1/100 s (USER_HZ).
    const HZ: f64 = 100.0;
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some((_, rest)) = stat.rsplit_once(')')
    {
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // Fields after the command: state is 0; utime 11, stime 12, starttime 19.
        let cpu = (num(11) + num(12)) as f64 / HZ;
        out.single("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", cpu);
        if let Some(boot) = boot_time() {
            let start = boot as f64 + num(19) as f64 / HZ;
            out.single(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                start,
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        // The directory handle itself is one of the entries.
        let open = fds.count().saturating_sub(1);
        out.single("process_open_fds", "gauge", "Number of open file descriptors.", open);
    }
    if let Ok(limit) = std::fs::read_to_string("/proc/self/limits")
        && let Some(line) = limit.lines().find(|l| l.starts_with("Max open files"))
        && let Some(soft) = line.split_whitespace().nth(3)
    {
        let max = soft.parse::<u64>().map(|v| v.to_string()).unwrap_or_else(|_| "+Inf".into());
        out.single("process_max_fds", "gauge", "Maximum number of open file descriptors.", max);
    }
}

/// Seconds since the epoch at boot (`btime` of /proc/stat).
fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut out = Exposition::default();
        out.sample("m", &[("name", "a\"b\\c\nd"), ("v", "1")], 2);
        assert_eq!(out.into_text(), "m{name=\"a\\\"b\\\\c\\nd\",v=\"1\"} 2\n");
    }

    #[test]
    fn counters_keep_every_series_and_split_overloaded() {
        let t = Tally::default();
        t.request(Transport::Http, "digits");
        t.request(Transport::Http, "digits");
        t.request(Transport::Mqtt, "digits");
        t.error(Transport::Mqtt, ErrorCode::Overloaded);
        t.error(Transport::Http, ErrorCode::BadInput);
        let requests = t.requests.lock().unwrap().clone();
        assert_eq!(requests, vec![(Transport::Http, "digits".into(), 2), (Transport::Mqtt, "digits".into(), 1)]);
        assert_eq!(t.rejected[Transport::Mqtt as usize].load(Ordering::Relaxed), 1);
        assert_eq!(t.rejected[Transport::Http as usize].load(Ordering::Relaxed), 0);
        let errors = t.errors.lock().unwrap().clone();
        assert!(errors.contains(&((Transport::Http, ErrorCode::BadInput), 1)), "{errors:?}");
        assert!(errors.contains(&((Transport::Mqtt, ErrorCode::Overloaded), 1)), "{errors:?}");
        // Known label values exist from the start, at 0.
        assert!(errors.contains(&((Transport::Mqtt, ErrorCode::NoModel), 0)), "{errors:?}");
        assert!(t.outcomes.lock().unwrap().contains(&("rolled_back", 0)));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_families_are_read_on_linux() {
        let mut out = Exposition::default();
        process(&mut out);
        let text = out.into_text();
        for name in [
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_cpu_seconds_total",
            "process_start_time_seconds",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing:\n{text}");
        }
        let start: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_start_time_seconds "))
            .and_then(|v| v.parse().ok())
            .expect("a start time");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(start <= now + 1.0 && start > now - 86400.0 * 365.0, "start {start}, now {now}");
    }
}
