//! Staged rollouts: a new version reaches a group's devices a stage at a
//! time, each stage gated on the health of the devices it moved, with the
//! progress retained on the broker so another run can resume or abort it.
//!
//! - [`plan`]: `--stages` and which devices a stage takes (pure).
//! - [`health`]: judging a stage from events, telemetry and shadow scores (pure).
//! - [`record`]: the retained record on `Topics::rollout(group, slot)` (`outpost.rollout.v1`).
//! - `watch`: what the rollout sees of the fleet over MQTT.
//! - `start`: the checks before anything is published; a new rollout's record.
//! - `engine`: a stage's steps (baseline, shadow, activate, soak).
//! - `moves`: returning the devices moved (halt, abort), or completing.
//! - `ui`: live progress on stderr.
//!
//! The engine is a library function, [`run`], so `outpost-sim rollout` and
//! the simulated fleet drive the same code:
//!
//! ```no_run
//! # async fn f() -> Result<(), outpost_sim::rollout::Error> {
//! use outpost_sim::rollout::{self, Action, Params, Start, health::Limits, plan::parse_stages};
//! let params = Params::new(
//!     "mqtt://127.0.0.1:1883".parse().unwrap(),
//!     "cameras",
//!     Action::Start(Start {
//!         model: "digits".into(),
//!         version: "2".into(),
//!         registry_url: "http://127.0.0.1:8000".into(),
//!         stages: parse_stages("1,10%,100%").unwrap(),
//!         soak: std::time::Duration::from_secs(60),
//!         limits: Limits { max_error_rate: Some(0.01), ..Limits::default() },
//!         shadow_sample: None,
//!         allow_downgrade: false,
//!     }),
//! );
//! let report = rollout::run(params).await?;
//! println!("{report}");
//! std::process::exit(report.exit_code().into());
//! # }
//! ```
//!
//! How a rollout judges devices:
//! - Members are the devices whose retained state lists the group, in name
//!   order. A member whose own desired topic already holds a desired state
//!   is left out (it outranks the group's; the rollout would erase it), and
//!   so is one that does not serve the group's current deployment (it
//!   follows another group, or failed the group's).
//! - Offline members are passed over when a stage picks its devices (a
//!   later stage takes them if they are back; the group's desired state
//!   reaches them at the end). A device that goes offline after it moved
//!   and is not back on the same deployment within `offline_grace_s` is a
//!   failure: a crashing model looks exactly like that.
//! - Failures within `max_failed` return the device and the stage goes on.
//! - Breaches: a `failed`, `rolled_back`, `superseded` or `undeployed`
//!   verdict for the stage's deployment, a refused signature, a device not
//!   `active` within `timeout`, the error rate or p99 limits over the soak,
//!   the shadow agreement. See [`health`] for devices without traffic.

pub mod health;
pub mod plan;
pub mod record;

mod engine;
mod moves;
mod start;
mod ui;
mod watch;

use crate::signing::Signer;
use health::{Breach, Limits};
use outpost_agent::link::BrokerUrl;
use outpost_protocol::Topics;
use plan::Stage;
use record::{Excluded, StageReport, State};
use serde::Serialize;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// What to do.
#[derive(Debug)]
// One value per run: boxing `Start` would only make callers' code noisier.
#[allow(clippy::large_enum_variant)]
pub enum Action {
    /// A new rollout (refused while one runs for the group and slot).
    Start(Start),
    /// Continue the rollout the retained record describes (after its tool
    /// was killed), or finish returning the devices of a halted or aborted one.
    Resume,
    /// Return every device the rollout moved to the previous version and mark it aborted.
    Abort,
}

/// A new rollout.
#[derive(Debug, Clone)]
pub struct Start {
    /// The registered model version to roll out.
    pub model: String,
    pub version: String,
    /// The registry it is looked up in (its manifest's URL and sha256 go
    /// into the deployments).
    pub registry_url: String,
    pub stages: Vec<Stage>,
    /// How long each stage's devices are watched once active.
    pub soak: Duration,
    pub limits: Limits,
    /// With a shadow step: the share of live requests the candidate runs
    /// on beside the previous version before a stage promotes it
    /// (`limits.min_agreement` is the gate).
    pub shadow_sample: Option<f64>,
    /// Allow the candidate to be older than the version serving.
    pub allow_downgrade: bool,
}

/// Everything [`run`] needs: plain values, no terminal or process state.
#[derive(Debug)]
pub struct Params {
    pub broker: BrokerUrl,
    /// For an `mqtts://` broker (None: the system's CAs, no client certificate).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub topics: Topics,
    pub group: String,
    /// The model slot (None: the default `desired` topics).
    pub slot: Option<String>,
    pub action: Action,
    /// Signs every desired state the rollout publishes (devices with
    /// `trust.keys`), and its record; a resumed or aborted rollout's record
    /// must be signed by the same key.
    pub signer: Option<Signer>,
    /// With a signer: keys besides its own whose signature makes the
    /// group's current desired state trusted (`--trust-key`); nothing
    /// unverified is ever copied into what the rollout signs.
    pub trust_keys: Vec<outpost_protocol::trust::PublicKey>,
    /// For `--resume`: the registry the candidate is looked up in again
    /// (default: the one its recorded manifest URL names).
    pub registry_url: Option<String>,
    /// How long a stage's devices get to go `active` (and returned devices to come back).
    pub timeout: Duration,
    /// Live progress on stderr.
    pub progress: bool,
}

impl Params {
    /// Default topics, no TLS, no signing, 120 s per activation, no progress.
    pub fn new(broker: BrokerUrl, group: &str, action: Action) -> Params {
        Params {
            broker,
            tls: None,
            topics: Topics::default(),
            group: group.into(),
            slot: None,
            action,
            signer: None,
            trust_keys: Vec::new(),
            registry_url: None,
            timeout: Duration::from_secs(120),
            progress: false,
        }
    }
}

/// Why a rollout could not be run (nothing or nothing more was changed).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad request: a flag, a version the registry does not have, a
    /// rollout already running, nothing to resume (exit 64).
    #[error("{0}")]
    Usage(String),
    /// The broker or registry cannot be reached or does not answer (exit 69).
    #[error("{0}")]
    Unavailable(String),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => outpost_agent::EXIT_USAGE,
            Error::Unavailable(_) => 69,
        }
    }
}

/// How a rollout ended, for people ([`fmt::Display`]) and scripts (JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub id: String,
    pub group: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    pub candidate: String,
    pub previous: String,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breach: Option<Breach>,
    pub members: usize,
    pub stages: Vec<StageReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<Excluded>,
    /// Devices returned to the previous version (halt, abort).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub returned: Vec<String>,
    /// Devices that did not confirm their last move within the timeout, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unconfirmed: Vec<String>,
    /// Devices that failed the group's deployment once the rollout completed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
    /// Another run's `--abort` stopped this one.
    pub interrupted: bool,
    /// This run was `--abort`.
    #[serde(skip)]
    pub by_abort: bool,
}

impl Report {
    /// 0 done (or aborted as asked), 1 halted (or a device failed the
    /// group's deployment at the end, or another run aborted this one), 69
    /// when devices did not confirm in time.
    pub fn exit_code(&self) -> u8 {
        match self.state {
            State::Halted => 1,
            _ if self.interrupted || !self.failed.is_empty() => 1,
            State::Aborted if !self.by_abort => 1,
            _ if !self.unconfirmed.is_empty() => 69,
            _ => 0,
        }
    }
}

fn or_dash<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

impl fmt::Display for Report {
    /// Device names and errors in it come from the devices: control
    /// characters are escaped, as on the live lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = String::new();
        self.write_text(&mut text)?;
        f.write_str(&ui::escape(&text, true))
    }
}

impl Report {
    fn write_text(&self, f: &mut impl fmt::Write) -> fmt::Result {
        let slot = self.slot.as_ref().map(|s| format!(" slot {s}")).unwrap_or_default();
        writeln!(
            f,
            "rollout {} of {} to group {}{slot} ({} device(s), previous {}): {}",
            self.id,
            self.candidate,
            self.group,
            self.members,
            self.previous,
            self.state.as_str()
        )?;
        writeln!(
            f,
            "  {:<6} {:>7}  {:>10}  {:>8}  {:>10}  {:<28}  {:>9}",
            "stage", "devices", "activation", "requests", "error rate", "p99 (previous)", "agreement"
        )?;
        for s in &self.stages {
            let p99 = match (s.p99_us, s.baseline_p99_us) {
                (Some(p), Some(b)) => format!(
                    "{} ({}, {})",
                    health::latency(p),
                    health::latency(b),
                    or_dash(s.worst_p99_ratio, |r| format!("max {r:.2}x"))
                ),
                (Some(p), None) => health::latency(p),
                _ => "-".into(),
            };
            writeln!(
                f,
                "  {:<6} {:>7}  {:>10}  {:>8}  {:>10}  {:<28}  {:>9}  {}",
                s.stage,
                s.devices.len(),
                or_dash(s.activation_s, |a| format!("{a:.1} s")),
                s.requests,
                or_dash(s.error_rate(), |r| format!("{:.2}%", r * 100.0)),
                p99,
                or_dash(s.agreement, |a| format!("{:.1}%", a * 100.0)),
                s.verdict
            )?;
            let names = if s.devices.len() <= 8 {
                s.devices.join(", ")
            } else {
                format!(
                    "{} ... {} ({} devices)",
                    s.devices[..4].join(", "),
                    s.devices[s.devices.len() - 1],
                    s.devices.len()
                )
            };
            if !names.is_empty() {
                writeln!(f, "         devices: {names}")?;
            }
            if !s.skipped_offline.is_empty() {
                writeln!(f, "         passed over (offline): {}", s.skipped_offline.join(", "))?;
            }
            for n in &s.not_judged {
                writeln!(f, "         not judged: {n}")?;
            }
            for n in &s.failed {
                writeln!(f, "         failed (returned, within --max-failed): {n}")?;
            }
        }
        for e in &self.excluded {
            writeln!(f, "  left out: {}: {}", e.device, e.why)?;
        }
        if let Some(r) = &self.reason {
            writeln!(f, "  {}: {r}", if self.state == State::Done { "note" } else { "why" })?;
        }
        if !self.returned.is_empty() {
            writeln!(f, "  returned to {}: {}", self.previous, self.returned.join(", "))?;
        }
        for u in &self.unconfirmed {
            writeln!(f, "  not confirmed: {u}")?;
        }
        for d in &self.failed {
            writeln!(f, "  failed the group's deployment: {d}")?;
        }
        Ok(())
    }
}

/// Runs `params.action` to its end: a rollout to completion or a halt, a
/// resume, an abort. `Err` when it could not run (usage, broker or
/// registry); `Ok` with the report otherwise (its
/// [`exit_code`](Report::exit_code) says how it ended).
pub async fn run(params: Params) -> Result<Report, Error> {
    start::run(params).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: State) -> Report {
        Report {
            id: "rollout-1".into(),
            group: "cameras".into(),
            slot: None,
            candidate: "digits@2".into(),
            previous: "digits@1".into(),
            state,
            reason: None,
            breach: None,
            members: 4,
            stages: vec![StageReport {
                stage: "1".into(),
                target: 1,
                devices: vec!["cam-0".into()],
                activation_s: Some(1.2),
                requests: 200,
                errors: 1,
                p99_us: Some(1500),
                baseline_p99_us: Some(1000),
                worst_p99_ratio: Some(1.5),
                not_judged: vec!["cam-9: no requests during the soak: error rate and p99 not judged".into()],
                verdict: "passed".into(),
                ..Default::default()
            }],
            excluded: vec![],
            returned: vec![],
            unconfirmed: vec![],
            failed: vec![],
            interrupted: false,
            by_abort: false,
        }
    }

    #[test]
    fn exit_codes_say_how_it_ended() {
        assert_eq!(report(State::Done).exit_code(), 0);
        assert_eq!(report(State::Halted).exit_code(), 1);
        let failed = Report { failed: vec!["cam-3: failed".into()], ..report(State::Done) };
        assert_eq!(failed.exit_code(), 1, "a device failed the group's deployment at the end");
        let late = Report { unconfirmed: vec!["cam-3: not on it within 120 s".into()], ..report(State::Done) };
        assert_eq!(late.exit_code(), 69);
        assert_eq!(Report { by_abort: true, ..report(State::Aborted) }.exit_code(), 0, "--abort did as asked");
        let stopped = Report { interrupted: true, ..report(State::Aborted) };
        assert_eq!(stopped.exit_code(), 1, "another run's --abort stopped this one");
        let halted_late = Report { unconfirmed: vec!["cam-0: offline".into()], ..report(State::Halted) };
        assert_eq!(halted_late.exit_code(), 1, "a breach outranks a late confirmation");
        assert_eq!(Error::Usage("x".into()).exit_code(), 64);
        assert_eq!(Error::Unavailable("x".into()).exit_code(), 69);
    }

    #[test]
    fn the_report_has_a_row_per_stage_and_escapes_device_words() {
        let mut r = report(State::Halted);
        r.reason = Some("cam-0\u{1b}[2J failed".into());
        r.returned = vec!["cam-0".into()];
        let text = r.to_string();
        assert!(
            text.starts_with(
                "rollout rollout-1 of digits@2 to group cameras (4 device(s), previous digits@1): halted\n"
            )
        );
        let row = text.lines().find(|l| l.trim_start().starts_with("1 ")).unwrap_or_default();
        for cell in ["1.2 s", "200", "0.50%", "1.50 ms (1.00 ms, max 1.50x)", "passed"] {
            assert!(row.contains(cell), "{cell:?} not in {row:?}");
        }
        assert!(text.contains("         not judged: cam-9: no requests during the soak"), "{text}");
        assert!(text.contains("  why: cam-0\\u{1b}[2J failed\n"), "{text}");
        assert!(text.contains("  returned to digits@1: cam-0\n"), "{text}");
        assert!(!text.contains('\u{1b}'));
    }
}
