//! Progress for a person at a terminal and for log files alike.
//!
//! On a terminal (the stream written to is a TTY and `TERM` is not `dumb`,
//! indicatif's own rule) a line per device, or per run, is updated in place
//! with percent, rate and ETA. Anywhere else (a pipe, a file, CI) the same
//! information comes as plain lines: every phase change, and at most one
//! progress line per device every [`PLAIN_INTERVAL`] — never a `\r` or an
//! escape sequence.
//!
//! Used by `deploy --wait` ([`Deployments`]), `fleet` ([`Counts`]) and
//! `bench` ([`Phases`]).

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use outpost_protocol::{DeploymentEvent, Phase};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The shortest time between two plain progress lines of one device (or run).
pub const PLAIN_INTERVAL: Duration = Duration::from_secs(2);

/// Which stream progress goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn target(self) -> ProgressDrawTarget {
        match self {
            Stream::Stdout => ProgressDrawTarget::stdout(),
            Stream::Stderr => ProgressDrawTarget::stderr(),
        }
    }

    /// True when progress drawn there updates in place (a terminal).
    pub fn is_terminal(self) -> bool {
        !self.target().is_hidden()
    }

    fn line(self, text: &str) {
        match self {
            Stream::Stdout => println!("{text}"),
            Stream::Stderr => eprintln!("{text}"),
        }
    }
}

/// A byte count in decimal units: `950 B`, `12.6 kB`, `30.0 MB`, `1.20 GB`.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if n < 1000.0 {
        return format!("{} B", n.max(0.0).round());
    }
    let mut v = n / 1000.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1000.0 {
            break;
        }
        v /= 1000.0;
        unit = u;
    }
    if v < 10.0 { format!("{v:.2} {unit}") } else { format!("{v:.1} {unit}") }
}

/// A duration for an ETA: `7 s`, `3 min 05 s`, `2 h 10 min`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
    }
}

/// The average rate of a transfer since it was first seen (bytes per second).
#[derive(Debug, Clone, Copy)]
pub struct Meter {
    start: Instant,
    start_bytes: u64,
}

impl Meter {
    pub fn new(now: Instant, bytes: u64) -> Meter {
        Meter { start: now, start_bytes: bytes }
    }

    /// Bytes per second, once a quarter of a second and some bytes went by.
    pub fn rate(&self, now: Instant, bytes: u64) -> Option<f64> {
        let secs = now.saturating_duration_since(self.start).as_secs_f64();
        let moved = bytes.checked_sub(self.start_bytes).filter(|b| *b > 0)?;
        (secs >= 0.25).then(|| moved as f64 / secs)
    }
}

/// A download's progress in words: `42% of 30.0 MB (12.6 MB) at 3.10 MB/s, ETA 6 s`
/// (without rate and ETA until there is a rate; without percent when the size is unknown).
pub fn download_text(done: u64, total: u64, rate: Option<f64>) -> String {
    let mut text = if total > 0 {
        let percent = (done.min(total) as f64 * 100.0 / total as f64).floor();
        format!("{percent:>3}% of {} ({})", bytes(total as f64), bytes(done as f64))
    } else {
        bytes(done as f64)
    };
    if let Some(r) = rate.filter(|r| *r > 0.0) {
        text.push_str(&format!(" at {}/s", bytes(r)));
        if total > done {
            text.push_str(&format!(", ETA {}", duration(Duration::from_secs_f64((total - done) as f64 / r))));
        }
    }
    text
}

/// One event as a line: the device, its phase, progress (with a rate when
/// known), the error and the detail; the same columns as
/// `DeploymentEvent::summary`, so `  cam-1        active ...` reads the same.
pub fn event_line(ev: &DeploymentEvent, rate: Option<f64>) -> String {
    let mut line = format!("  {:<12} {:<12}", ev.device, ev.phase.as_str());
    if let Some(p) = ev.progress {
        line.push(' ');
        line.push_str(&download_text(p.bytes, p.total, rate));
    }
    if let Some(e) = &ev.error {
        line.push_str(&format!(" {}: {}", e.code, e.message));
    }
    if let Some(d) = &ev.detail {
        line.push_str(&format!(" ({d})"));
    }
    // Devices' words, escaped: whoever can publish on an events topic must
    // not move the operator's cursor or recolour the terminal.
    line.trim_end()
        .chars()
        .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
        .collect()
}

/// What is known of one device's deployment.
#[derive(Debug, Default)]
struct Device {
    phase: Option<Phase>,
    meter: Option<Meter>,
    /// Bytes in the last progress seen (a drop means the transfer restarted).
    bytes: u64,
    last_line: Option<Instant>,
    bar: Option<ProgressBar>,
}

/// Decides which events become plain lines: every phase change, every event
/// with an error or a detail (a retry, say), a transfer's end, and progress
/// at most every [`PLAIN_INTERVAL`] per device.
#[derive(Debug, Default)]
pub struct PlainLog {
    devices: HashMap<String, Device>,
}

impl PlainLog {
    /// The line to print for `ev` received at `now`, if any.
    pub fn line(&mut self, ev: &DeploymentEvent, now: Instant) -> Option<String> {
        let dev = self.devices.entry(ev.device.clone()).or_default();
        let (rate, changed) = track(dev, ev, now);
        let finished = ev.progress.is_some_and(|p| p.total > 0 && p.bytes >= p.total);
        let due = dev.last_line.is_none_or(|t| now.saturating_duration_since(t) >= PLAIN_INTERVAL);
        if changed || ev.error.is_some() || ev.detail.is_some() || finished || due {
            dev.last_line = Some(now);
            return Some(event_line(ev, rate));
        }
        None
    }
}

/// Updates a device's phase and meter with `ev`: (the rate, whether the phase changed).
fn track(dev: &mut Device, ev: &DeploymentEvent, now: Instant) -> (Option<f64>, bool) {
    let changed = dev.phase != Some(ev.phase);
    dev.phase = Some(ev.phase);
    let Some(p) = ev.progress else {
        dev.meter = None;
        return (None, changed);
    };
    if changed || p.bytes < dev.bytes {
        dev.meter = None;
    }
    dev.bytes = p.bytes;
    let meter = *dev.meter.get_or_insert_with(|| Meter::new(now, p.bytes));
    (meter.rate(now, p.bytes), changed)
}

/// The progress of one deployment on its devices (`deploy --wait`), on stdout.
#[derive(Debug)]
pub struct Deployments {
    bars: Option<MultiProgress>,
    plain: PlainLog,
}

impl Deployments {
    /// Bars when stdout is a terminal, plain lines otherwise.
    pub fn new() -> Deployments {
        Deployments::with_bars(Stream::Stdout.is_terminal())
    }

    pub fn with_bars(bars: bool) -> Deployments {
        let bars = bars.then(|| MultiProgress::with_draw_target(Stream::Stdout.target()));
        Deployments { bars, plain: PlainLog::default() }
    }

    pub fn event(&mut self, ev: &DeploymentEvent) {
        let now = Instant::now();
        let Some(multi) = &self.bars else {
            if let Some(line) = self.plain.line(ev, now) {
                Stream::Stdout.line(&line);
            }
            return;
        };
        let dev = self.plain.devices.entry(ev.device.clone()).or_default();
        let (_, changed) = track(dev, ev, now);
        // Phase changes, errors and details stay on screen above the live lines.
        if changed || ev.error.is_some() || ev.detail.is_some() {
            let mut quiet = ev.clone();
            quiet.progress = None;
            let _ = multi.println(event_line(&quiet, None));
        }
        if ev.phase.is_final() {
            if let Some(bar) = dev.bar.take() {
                bar.finish_and_clear();
                multi.remove(&bar);
            }
            return;
        }
        let bar = dev.bar.get_or_insert_with(|| {
            let bar = ProgressBar::no_length().with_style(phase_style()).with_prefix(ev.device.clone());
            bar.enable_steady_tick(Duration::from_millis(120));
            multi.add(bar)
        });
        match ev.progress {
            Some(p) if p.total > 0 => {
                if changed {
                    bar.reset();
                    bar.set_length(p.total);
                    bar.set_style(download_style());
                }
                if p.bytes < bar.position() {
                    bar.reset_eta();
                }
                bar.set_length(p.total);
                bar.set_position(p.bytes);
            }
            _ => {
                if changed {
                    // The time shown is the phase's.
                    bar.set_style(phase_style());
                    bar.reset_elapsed();
                }
                bar.set_message(ev.phase.as_str());
            }
        }
    }

    /// Leaves any line still in progress as it is (a timeout).
    pub fn finish(&mut self) {
        for dev in self.plain.devices.values_mut() {
            if let Some(bar) = dev.bar.take() {
                bar.abandon();
            }
        }
    }
}

impl Default for Deployments {
    fn default() -> Self {
        Deployments::new()
    }
}

fn download_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "  {prefix:<12} downloading  [{bar:24}] {percent:>3}% of {decimal_total_bytes} at {decimal_bytes_per_sec}, ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

fn phase_style() -> ProgressStyle {
    ProgressStyle::with_template("  {prefix:<12} {msg:<12} {spinner} {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

/// A count towards a total over a run (`fleet`: devices active), on stderr:
/// one live line on a terminal, a plain line every [`PLAIN_INTERVAL`] otherwise.
#[derive(Debug)]
pub struct Counts {
    bar: Option<ProgressBar>,
    total: u64,
    what: String,
    started: Instant,
    last_line: Option<Instant>,
}

impl Counts {
    pub fn new(total: u64, what: &str) -> Counts {
        Counts::with_bar(total, what, Stream::Stderr.is_terminal())
    }

    pub fn with_bar(total: u64, what: &str, bar: bool) -> Counts {
        let bar = bar.then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), Stream::Stderr.target());
            let template = format!("{{elapsed:>5}} [{{bar:30}}] {{pos}}/{{len}} {what}  {{msg}}");
            bar.set_style(
                ProgressStyle::with_template(&template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        Counts { bar, total, what: what.to_string(), started: Instant::now(), last_line: None }
    }

    /// `done` of the total so far, and the rest in words.
    pub fn update(&mut self, done: u64, text: &str) {
        let now = Instant::now();
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(text.to_string());
            }
            None if self.last_line.is_none_or(|t| now.saturating_duration_since(t) >= PLAIN_INTERVAL) => {
                self.last_line = Some(now);
                let elapsed = now.saturating_duration_since(self.started);
                Stream::Stderr.line(&counts_line(elapsed, done, self.total, &self.what, text));
            }
            None => {}
        }
    }

    /// The final count, always shown.
    pub fn finish(&mut self, done: u64, text: &str) {
        match self.bar.take() {
            Some(bar) => {
                bar.set_position(done);
                bar.finish_with_message(text.to_string());
            }
            None => Stream::Stderr.line(&counts_line(self.started.elapsed(), done, self.total, &self.what, text)),
        }
    }
}

/// A plain line of [`Counts`]: `  12.0 s  95/100 active  received 100 ...`.
pub fn counts_line(elapsed: Duration, done: u64, total: u64, what: &str, text: &str) -> String {
    format!("{:>6.1} s  {done}/{total} {what}  {text}", elapsed.as_secs_f64())
}

/// The phases of a long run (`bench`), on stderr: `[bench] NAME` when one
/// starts and `[bench] NAME: 12.3 s` when it ends; on a terminal a spinner
/// with the time so far in between.
#[derive(Debug)]
pub struct Phases {
    tag: &'static str,
    bars: bool,
    current: Option<(String, Instant, Option<ProgressBar>)>,
}

impl Phases {
    pub fn new(tag: &'static str) -> Phases {
        Phases { tag, bars: Stream::Stderr.is_terminal(), current: None }
    }

    /// Ends the phase in progress and starts `name`.
    pub fn start(&mut self, name: &str) {
        self.finish();
        let bar = if self.bars {
            let bar = ProgressBar::with_draw_target(None, Stream::Stderr.target());
            let template = format!("[{}] {{msg}} {{spinner}} {{elapsed}}", self.tag);
            bar.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_spinner()));
            bar.set_message(name.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            Some(bar)
        } else {
            eprintln!("[{}] {name}", self.tag);
            None
        };
        self.current = Some((name.to_string(), Instant::now(), bar));
    }

    /// Ends the phase in progress, if any, with its duration.
    pub fn finish(&mut self) {
        if let Some((name, started, bar)) = self.current.take() {
            let line = format!("[{}] {name}: {:.1} s", self.tag, started.elapsed().as_secs_f64());
            match bar {
                Some(bar) => bar.finish_with_message(format!("{name}: {:.1} s", started.elapsed().as_secs_f64())),
                None => eprintln!("{line}"),
            }
        }
    }
}

impl Drop for Phases {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_s_words_cannot_drive_the_terminal() {
        let mut ev = DeploymentEvent::from_json(
            br#"{"schema":"outpost.event.v1","device":"cam\u001b[2J","deployment_id":"d","revision":1,"seq":1,
                "at":"2026-01-01T00:00:00Z","phase":"failed","detail":"x\ry"}"#,
        )
        .unwrap();
        let line = event_line(&ev, None);
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert!(line.contains("cam\\u{1b}[2J") && line.contains("x\\ry"), "{line:?}");
        ev.detail = None;
        assert!(!event_line(&ev, None).contains('\u{1b}'));
    }
    use outpost_protocol::{ErrorCode, ErrorInfo, Progress};

    fn ev(device: &str, phase: Phase, progress: Option<(u64, u64)>) -> DeploymentEvent {
        DeploymentEvent {
            schema: outpost_protocol::event::SCHEMA.into(),
            device: device.into(),
            deployment_id: "d-1".into(),
            revision: 1,
            seq: 0,
            at: "2026-01-01T00:00:00Z".into(),
            phase,
            progress: progress.map(|(bytes, total)| Progress { bytes, total }),
            error: None,
            detail: None,
            timings_ms: None,
            slot: None,
            shadow: None,
            backend: None,
        }
    }

    #[test]
    fn sizes_rates_and_etas_read_as_words() {
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(999.0), "999 B");
        assert_eq!(bytes(12_600.0), "12.6 kB");
        assert_eq!(bytes(2_490_368.0), "2.49 MB");
        assert_eq!(bytes(30_000_000.0), "30.0 MB");
        assert_eq!(bytes(1_200_000_000.0), "1.20 GB");
        assert_eq!(duration(Duration::from_millis(6400)), "6 s");
        assert_eq!(duration(Duration::from_secs(185)), "3 min 05 s");
        assert_eq!(duration(Duration::from_secs(7800)), "2 h 10 min");
    }

    #[test]
    fn a_download_line_has_percent_rate_and_eta() {
        // 12 MB of 30 MB at 3 MB/s: 18 MB left, 6 s.
        assert_eq!(download_text(12_000_000, 30_000_000, Some(3e6)), " 40% of 30.0 MB (12.0 MB) at 3.00 MB/s, ETA 6 s");
        // No rate yet: no rate, no ETA.
        assert_eq!(download_text(0, 30_000_000, None), "  0% of 30.0 MB (0 B)");
        // Done: the average rate, no ETA.
        assert_eq!(download_text(30_000_000, 30_000_000, Some(2.5e6)), "100% of 30.0 MB (30.0 MB) at 2.50 MB/s");
        // Unknown size: the bytes so far.
        assert_eq!(download_text(5_000, 0, Some(1e3)), "5.00 kB at 1.00 kB/s");
        // Percent rounds down: 99.99% is not 100%.
        assert!(download_text(29_999_999, 30_000_000, None).starts_with(" 99%"));
    }

    #[test]
    fn the_meter_averages_since_it_started() {
        let t0 = Instant::now();
        let m = Meter::new(t0, 1_000_000);
        assert_eq!(m.rate(t0, 1_000_000), None);
        assert_eq!(m.rate(t0 + Duration::from_millis(100), 2_000_000), None, "too early to tell");
        assert_eq!(m.rate(t0 + Duration::from_secs(2), 7_000_000), Some(3e6));
    }

    #[test]
    fn plain_lines_are_throttled_per_device_but_keep_every_phase_change() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut log = PlainLog::default();
        let total = 30_000_000;
        let first = log.line(&ev("cam-1", Phase::Downloading, Some((0, total))), at(0)).unwrap();
        assert_eq!(first, "  cam-1        downloading    0% of 30.0 MB (0 B)");
        // 0.5 s later: too soon for cam-1, but cam-2's first event shows.
        assert_eq!(log.line(&ev("cam-1", Phase::Downloading, Some((1_500_000, total))), at(500)), None);
        assert!(log.line(&ev("cam-2", Phase::Downloading, Some((0, total))), at(500)).is_some());
        assert_eq!(log.line(&ev("cam-1", Phase::Downloading, Some((3_000_000, total))), at(1000)), None);
        // 2 s after the last line: percent, the rate since the download began, ETA.
        let line = log.line(&ev("cam-1", Phase::Downloading, Some((6_000_000, total))), at(2000)).unwrap();
        assert_eq!(line, "  cam-1        downloading   20% of 30.0 MB (6.00 MB) at 3.00 MB/s, ETA 8 s");
        // A retry's detail shows at once.
        let mut retry = ev("cam-1", Phase::Downloading, Some((6_000_000, total)));
        retry.detail = Some("model.onnx: attempt 1 of 4 failed".into());
        let line = log.line(&retry, at(2100)).unwrap();
        assert!(line.ends_with(" (model.onnx: attempt 1 of 4 failed)"), "{line}");
        // The transfer's end shows at once, and so does the next phase.
        assert!(log.line(&ev("cam-1", Phase::Downloading, Some((total, total))), at(2200)).unwrap().contains("100%"));
        assert_eq!(log.line(&ev("cam-1", Phase::Verifying, None), at(2300)).unwrap(), "  cam-1        verifying");
        let mut failed = ev("cam-1", Phase::Failed, None);
        failed.error = Some(ErrorInfo::new(ErrorCode::DigestMismatch, "model.onnx: sha256 differs"));
        let line = log.line(&failed, at(2400)).unwrap();
        assert_eq!(line, "  cam-1        failed       digest_mismatch: model.onnx: sha256 differs");
        assert!(!line.contains('\r'));
    }

    #[test]
    fn a_restarted_transfer_measures_its_rate_afresh() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut log = PlainLog::default();
        let total = 10_000_000;
        log.line(&ev("cam-1", Phase::Downloading, Some((0, total))), at(0));
        log.line(&ev("cam-1", Phase::Downloading, Some((8_000_000, total))), at(4));
        // The agent restarted it from 2 MB: the rate counts from there, not from 0.
        log.line(&ev("cam-1", Phase::Downloading, Some((2_000_000, total))), at(10));
        let line = log.line(&ev("cam-1", Phase::Downloading, Some((6_000_000, total))), at(12)).unwrap();
        assert!(line.ends_with("at 2.00 MB/s, ETA 2 s"), "{line}");
    }

    #[test]
    fn a_counts_line_starts_with_the_time_so_far() {
        assert_eq!(
            counts_line(Duration::from_millis(12_340), 95, 100, "active", "failed 1"),
            "  12.3 s  95/100 active  failed 1"
        );
    }
}
