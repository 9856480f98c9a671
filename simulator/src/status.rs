//! `outpost-sim status`: the fleet at a glance, one row per device and model
//! slot, built from what devices publish anyway: the retained `state` and
//! `availability` (there at once) and the periodic, unretained `telemetry`
//! (waited for), with `events` counting as a sign of life.
//!
//! Every message updates a map by device ([`Fleet`]); rows are built from the
//! map when a view is drawn, never per message, so a fleet of ten thousand
//! costs a parse per message and a sort per redraw.

use crate::operator::Operator;
use crate::progress::Stream;
use outpost_protocol::telemetry::{InferenceStats, ModelId, ShadowStats};
use outpost_protocol::{DeploymentEvent, DeviceState, LastDeployment, Outcome, Phase, Telemetry, Topics};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

/// The telemetry interval assumed for a device until two of its reports
/// show its own (the agent's default `--telemetry-interval`).
pub const DEFAULT_TELEMETRY_INTERVAL: Duration = Duration::from_secs(30);

/// A device whose availability says `online` but from which nothing came
/// for this many telemetry intervals is shown `stale`.
pub const STALE_INTERVALS: u32 = 3;

/// How long no new device must turn up before the retained messages are
/// taken to have all arrived.
const SETTLE: Duration = Duration::from_millis(500);

/// The longest text of a device shown in a cell (device ids are at most 64
/// characters; other fields are whatever the device wrote).
const CELL_MAX: usize = 64;

/// Which devices the view shows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only these devices (their exact topics are subscribed to); empty: all.
    pub devices: Vec<String>,
    /// Only devices whose retained state lists this group.
    pub group: Option<String>,
}

/// What a device's availability says, as the view judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Online {
    Online,
    Offline,
    /// Says `online`, but nothing came from it for [`STALE_INTERVALS`] telemetry intervals.
    Stale,
    /// No availability message seen (never connected, or a broker that does
    /// not hand retained messages to this subscription).
    Unknown,
}

impl Online {
    pub fn as_str(self) -> &'static str {
        match self {
            Online::Online => "online",
            Online::Offline => "offline",
            Online::Stale => "stale",
            Online::Unknown => "?",
        }
    }
}

/// How a shadow candidate scores beside the active model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shadow {
    /// The candidate, `name@version`.
    pub model: String,
    /// Share of compared requests with the same top-1 class.
    pub agreement: f64,
    pub compared: u64,
    pub max_abs_diff: f64,
    pub errors: u64,
}

/// One row of the view: a device's model slot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub device: String,
    pub online: Online,
    /// `None`: the default slot (the `desired` topic).
    pub slot: Option<String>,
    /// The active model, `name@version` (from the state; from telemetry when no state came).
    pub model: Option<String>,
    pub deployment_id: Option<String>,
    /// The last deployment's outcome (`active`, `failed`, `rolled_back`, ...).
    pub outcome: Option<&'static str>,
    /// The last deployment's error code, if it failed.
    pub error_code: Option<&'static str>,
    /// Why the device's retained state could not be read, if it could not.
    pub state_error: Option<String>,
    /// Whether a telemetry report of the device came while watching.
    pub telemetry: bool,
    /// Requests in the last telemetry interval (overloaded refusals included).
    pub requests: Option<u64>,
    /// Failed requests in that interval (overloaded refusals not included).
    pub errors: Option<u64>,
    /// `errors / requests` in that interval (None without requests).
    pub error_rate: Option<f64>,
    /// p99 latency of the answered requests of that interval, in ms.
    pub p99_ms: Option<f64>,
    /// Requests per second over that interval (once two reports showed the interval).
    pub requests_per_s: Option<f64>,
    pub shadow: Option<Shadow>,
    /// Seconds since the device's last live message (None: none came while watching).
    pub last_seen_s: Option<f64>,
}

/// Counts over the rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub devices: usize,
    pub online: usize,
    pub offline: usize,
    pub stale: usize,
    pub unknown: usize,
    /// Rows (device slots) serving each `name@version`.
    pub models: BTreeMap<String, usize>,
    /// Rows with nothing serving.
    pub nothing_serving: usize,
    /// Rows whose last deployment failed or was rolled back.
    pub failures: usize,
    /// Online (or stale) devices from which no telemetry came while watching.
    pub no_telemetry: Vec<String>,
}

impl Summary {
    pub fn of(rows: &[Row]) -> Summary {
        let mut s = Summary::default();
        let mut last: Option<&str> = None;
        for r in rows {
            if last != Some(r.device.as_str()) {
                last = Some(r.device.as_str());
                s.devices += 1;
                match r.online {
                    Online::Online => s.online += 1,
                    Online::Offline => s.offline += 1,
                    Online::Stale => s.stale += 1,
                    Online::Unknown => s.unknown += 1,
                }
                if matches!(r.online, Online::Online | Online::Stale) && !r.telemetry {
                    s.no_telemetry.push(r.device.clone());
                }
            }
            match &r.model {
                Some(m) => *s.models.entry(m.clone()).or_default() += 1,
                None => s.nothing_serving += 1,
            }
            if matches!(r.outcome, Some("failed" | "rolled_back")) {
                s.failures += 1;
            }
        }
        s
    }

    /// `12 devices: 10 online, 1 offline, 1 ?; digits@1 4, digits@2 7, nothing 1; 2 failed`.
    pub fn line(&self) -> String {
        let mut line = format!("{} device{}: {} online", self.devices, plural(self.devices), self.online);
        for (n, what) in [(self.offline, "offline"), (self.stale, "stale"), (self.unknown, "availability unknown")] {
            if n > 0 {
                line.push_str(&format!(", {n} {what}"));
            }
        }
        let mut models: Vec<String> = self.models.iter().map(|(m, n)| format!("{} {n}", clean(m))).collect();
        if self.nothing_serving > 0 {
            models.push(format!("nothing serving {}", self.nothing_serving));
        }
        if !models.is_empty() {
            line.push_str("; ");
            line.push_str(&models.join(", "));
        }
        line.push_str(&format!("; {} failed or rolled back", self.failures));
        line
    }

    /// The devices without telemetry, in words (`waited`: how long the view listened).
    pub fn no_telemetry_line(&self, waited: Option<Duration>) -> Option<String> {
        let n = self.no_telemetry.len();
        if n == 0 {
            return None;
        }
        let mut names: Vec<String> = self.no_telemetry.iter().take(10).map(|d| clean(d)).collect();
        if n > 10 {
            names.push(format!("and {} more", n - 10));
        }
        let within = match waited {
            Some(w) if w < Duration::from_secs(60) => format!("within {:.1} s", w.as_secs_f64()),
            Some(w) => format!("within {}", crate::progress::duration(w)),
            None => "yet".into(),
        };
        Some(format!(
            "no telemetry {within} from {n} online device{} (p99, errors and requests/s come from it; devices report every --telemetry-interval, 30 s by default): {}",
            plural(n),
            names.join(", ")
        ))
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// What is known of one device.
#[derive(Debug, Default)]
struct Device {
    online: Option<bool>,
    state: Option<Result<DeviceState, String>>,
    /// The last report and when it came.
    telemetry: Option<(Telemetry, Instant)>,
    /// Between its last two reports, from their `uptime_s`.
    interval: Option<Duration>,
    /// The last `shadow` event of each slot (None: the default slot), and when it came.
    shadow_events: BTreeMap<Option<String>, (ShadowStats, Instant)>,
    /// Its last live message (a retained one may be of any age).
    last_seen: Option<Instant>,
}

impl Device {
    fn state(&self) -> Option<&DeviceState> {
        self.state.as_ref().and_then(|s| s.as_ref().ok())
    }

    fn online(&self, now: Instant, watching_since: Instant) -> Online {
        match self.online {
            None => Online::Unknown,
            Some(false) => Online::Offline,
            Some(true) => {
                let every = self.interval.unwrap_or(DEFAULT_TELEMETRY_INTERVAL);
                let silent = now.saturating_duration_since(self.last_seen.unwrap_or(watching_since));
                if silent > every * STALE_INTERVALS { Online::Stale } else { Online::Online }
            }
        }
    }
}

/// The view's map of the fleet, fed message by message.
#[derive(Debug)]
pub struct Fleet {
    topics: Topics,
    filter: Filter,
    started: Instant,
    devices: BTreeMap<String, Device>,
    /// Bumped by every message taken in: a redraw shows something new when it moved.
    pub changes: u64,
    /// When the last device not seen before turned up.
    pub last_new_device: Instant,
}

impl Fleet {
    pub fn new(topics: Topics, filter: Filter, now: Instant) -> Fleet {
        Fleet { topics, filter, started: now, devices: BTreeMap::new(), changes: 0, last_new_device: now }
    }

    /// The device and leaf (`state`, ...) of a topic of ours. A device id
    /// with `.` arrives with `/` on RabbitMQ: placed only when it is one of
    /// the devices asked for (a `+` subscription never sees it there).
    fn place<'a>(&self, topic: &'a str) -> Option<(String, &'a str)> {
        let rest = topic.strip_prefix(self.topics.prefix())?.strip_prefix("/devices/")?;
        let (name, leaf) = rest.rsplit_once('/')?;
        if !matches!(leaf, "state" | "availability" | "telemetry" | "events") || name.is_empty() {
            return None;
        }
        if !name.contains('/') {
            return Some((name.to_string(), leaf));
        }
        let asked = self.filter.devices.iter().find(|d| outpost_protocol::topics::same_name(name, d))?;
        Some((asked.clone(), leaf))
    }

    /// Takes in one message (`retained`: delivered from the broker's store,
    /// so of unknown age). False when it is not one of ours.
    pub fn message(&mut self, topic: &str, payload: &[u8], retained: bool, now: Instant) -> bool {
        let Some((name, leaf)) = self.place(topic) else { return false };
        if !self.devices.contains_key(&name) {
            self.last_new_device = now;
        }
        let dev = self.devices.entry(name).or_default();
        match leaf {
            "availability" => match payload {
                b"online" => dev.online = Some(true),
                b"offline" => dev.online = Some(false),
                // Withdrawn (an empty retained payload): nothing is known.
                b"" => dev.online = None,
                _ => {}
            },
            "state" if payload.is_empty() => dev.state = None,
            "state" => dev.state = Some(DeviceState::from_json(payload).map_err(|e| e.to_string())),
            "telemetry" => {
                if let Ok(t) = serde_json::from_slice::<Telemetry>(payload)
                    && t.schema == outpost_protocol::telemetry::SCHEMA
                {
                    // The agent says its interval; older agents only show it in two reports.
                    if let Some(s) = t.interval_s.filter(|s| *s > 0) {
                        dev.interval = Some(Duration::from_secs(s));
                    } else if let Some((before, _)) = &dev.telemetry
                        && t.uptime_s > before.uptime_s
                    {
                        dev.interval = Some(Duration::from_secs(t.uptime_s - before.uptime_s));
                    }
                    dev.telemetry = Some((t, now));
                }
            }
            "events" => {
                if let Ok(ev) = DeploymentEvent::from_json(payload)
                    && ev.phase == Phase::Shadow
                    && let Some(stats) = ev.shadow
                {
                    dev.shadow_events.insert(ev.slot, (stats, now));
                }
            }
            _ => {}
        }
        if !retained {
            dev.last_seen = Some(now);
        }
        self.changes += 1;
        true
    }

    fn shown(&self, name: &str, dev: Option<&Device>) -> bool {
        if !self.filter.devices.is_empty() && !self.filter.devices.iter().any(|d| d == name) {
            return false;
        }
        match &self.filter.group {
            None => true,
            Some(g) => dev.and_then(Device::state).is_some_and(|s| s.groups.iter().any(|x| x == g)),
        }
    }

    /// The rows at `now`, by device then slot (the default slot first).
    pub fn rows(&self, now: Instant) -> Vec<Row> {
        let mut names: BTreeSet<&str> = self.devices.keys().map(String::as_str).collect();
        names.extend(self.filter.devices.iter().map(String::as_str));
        let empty = Device::default();
        let mut rows = Vec::new();
        for name in names {
            let dev = self.devices.get(name);
            if !self.shown(name, dev) {
                continue;
            }
            let dev = dev.unwrap_or(&empty);
            let state = dev.state();
            let telemetry = dev.telemetry.as_ref().map(|(t, _)| t);
            let mut slots: BTreeSet<&str> = BTreeSet::new();
            slots.extend(state.iter().flat_map(|s| s.models.keys().map(String::as_str)));
            slots.extend(telemetry.iter().flat_map(|t| t.models.keys().map(String::as_str)));
            // A device that uses only named slots has no default-slot row,
            // unless something is (or was) there.
            let default_used = state.is_some_and(|s| s.active.is_some() || s.last_deployment.is_some())
                || telemetry.is_some_and(|t| t.model.is_some() || t.inference.requests > 0 || t.shadow.is_some());
            if slots.is_empty() || default_used {
                rows.push(self.row(name, dev, None, now));
            }
            for slot in slots {
                rows.push(self.row(name, dev, Some(slot), now));
            }
        }
        rows
    }

    fn row(&self, name: &str, dev: &Device, slot: Option<&str>, now: Instant) -> Row {
        let state = dev.state();
        let (active, last): (Option<&outpost_protocol::ActiveModel>, Option<&LastDeployment>) = match (state, slot) {
            (Some(s), None) => (s.active.as_ref(), s.last_deployment.as_ref()),
            (Some(s), Some(slot)) => {
                s.models.get(slot).map_or((None, None), |m| (m.active.as_ref(), m.last_deployment.as_ref()))
            }
            (None, _) => (None, None),
        };
        let report = dev.telemetry.as_ref().map(|(t, at)| (t, *at));
        let (reported_model, stats, reported_shadow): (
            Option<&ModelId>,
            Option<&InferenceStats>,
            Option<&ShadowStats>,
        ) = match (report, slot) {
            (Some((t, _)), None) => (t.model.as_ref(), Some(&t.inference), t.shadow.as_ref()),
            (Some((t, _)), Some(slot)) => t
                .models
                .get(slot)
                .map_or((None, None, None), |m| (m.model.as_ref(), Some(&m.inference), m.shadow.as_ref())),
            (None, _) => (None, None, None),
        };
        let model = match (active, reported_model, state) {
            (Some(a), _, _) => Some(format!("{}@{}", a.name, a.version)),
            // Without a state, what the telemetry says serves.
            (None, Some(m), None) => Some(format!("{}@{}", m.name, m.version)),
            _ => None,
        };
        // A `shadow` event newer than the last report is the latest word.
        let event = dev.shadow_events.get(&slot.map(str::to_string));
        let shadow = match (event, report) {
            (Some((stats, at)), Some((_, reported))) if *at > reported => Some(stats),
            (Some((stats, _)), None) => Some(stats),
            _ => reported_shadow,
        };
        let answered = stats.map(|s| s.requests.saturating_sub(s.errors + s.rejected));
        Row {
            device: name.to_string(),
            online: dev.online(now, self.started),
            slot: slot.map(str::to_string),
            model,
            deployment_id: active.map(|a| a.deployment_id.clone()),
            outcome: last.map(|l| outcome_name(l.outcome)),
            error_code: last.and_then(|l| l.error.as_ref()).map(|e| e.code.as_str()),
            state_error: dev.state.as_ref().and_then(|s| s.as_ref().err().cloned()),
            telemetry: report.is_some(),
            requests: stats.map(|s| s.requests),
            errors: stats.map(|s| s.errors),
            error_rate: stats.filter(|s| s.requests > 0).map(|s| s.errors as f64 / s.requests as f64),
            p99_ms: stats.filter(|_| answered > Some(0)).map(|s| s.latency_us.p99 as f64 / 1000.0),
            requests_per_s: stats
                .zip(dev.interval)
                .filter(|(_, every)| !every.is_zero())
                .map(|(s, every)| s.requests as f64 / every.as_secs_f64()),
            shadow: shadow.map(|s| Shadow {
                model: format!("{}@{}", s.model.name, s.model.version),
                agreement: s.agreement,
                compared: s.compared,
                max_abs_diff: s.max_abs_diff,
                errors: s.errors,
            }),
            last_seen_s: dev.last_seen.map(|t| now.saturating_duration_since(t).as_secs_f64()),
        }
    }

    /// True once every online device shown sent telemetry (and at least one is shown).
    pub fn all_reported(&self, now: Instant) -> bool {
        let rows = self.rows(now);
        !rows.is_empty() && Summary::of(&rows).no_telemetry.is_empty()
    }
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::InProgress => "in_progress",
        Outcome::Active => "active",
        Outcome::Failed => "failed",
        Outcome::RolledBack => "rolled_back",
        Outcome::Superseded => "superseded",
        Outcome::Undeployed => "undeployed",
    }
}

/// A device's words made safe for a terminal: control characters and the
/// invisible bidirectional and zero-width marks escaped (whoever can publish
/// on a device's topics must not move the cursor, recolour or reorder the
/// operator's screen), and at most [`CELL_MAX`] characters.
pub fn clean(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == CELL_MAX {
            out.push('…');
            break;
        }
        let invisible =
            matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}');
        if c.is_control() || invisible {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

const HEADER: [&str; 10] =
    ["DEVICE", "ONLINE", "SLOT", "MODEL", "OUTCOME", "P99 MS", "ERRORS", "REQ/S", "SHADOW", "LAST SEEN"];
/// Columns aligned right (numbers).
const RIGHT: [bool; 10] = [false, false, false, false, false, true, true, true, false, true];

fn cells(r: &Row) -> [String; 10] {
    let dash = || "-".to_string();
    let outcome = match (&r.state_error, r.outcome, r.error_code) {
        (Some(_), _, _) => "unreadable state".to_string(),
        (None, Some(o), Some(code)) => format!("{o} ({code})"),
        (None, Some(o), None) => o.to_string(),
        (None, None, _) => dash(),
    };
    [
        clean(&r.device),
        r.online.as_str().to_string(),
        r.slot.as_deref().map_or_else(dash, clean),
        r.model.as_deref().map_or_else(dash, clean),
        outcome,
        r.p99_ms.map_or_else(dash, |v| format!("{v:.2}")),
        r.error_rate.map_or_else(dash, |v| format!("{:.1}%", v * 100.0)),
        r.requests_per_s.map_or_else(dash, |v| format!("{v:.1}")),
        r.shadow
            .as_ref()
            .map_or_else(dash, |s| format!("{} {:.1}% of {}", clean(&s.model), s.agreement * 100.0, s.compared)),
        r.last_seen_s.map_or_else(dash, |s| format!("{} ago", crate::progress::duration(Duration::from_secs_f64(s)))),
    ]
}

/// The table: a header line and a line per row, columns aligned.
pub fn table(rows: &[Row]) -> Vec<String> {
    let cells: Vec<[String; 10]> = rows.iter().map(cells).collect();
    let mut width = HEADER.map(|h| h.chars().count());
    for c in &cells {
        for (w, text) in width.iter_mut().zip(c) {
            *w = (*w).max(text.chars().count());
        }
    }
    let line = |c: &[String; 10]| {
        let mut line = String::new();
        for (i, text) in c.iter().enumerate() {
            let pad = " ".repeat(width[i].saturating_sub(text.chars().count()));
            if RIGHT[i] {
                line.push_str(&pad);
                line.push_str(text);
            } else {
                line.push_str(text);
                line.push_str(&pad);
            }
            line.push_str("  ");
        }
        line.trim_end().to_string()
    };
    let mut lines = vec![line(&HEADER.map(str::to_string))];
    lines.extend(cells.iter().map(line));
    lines
}

/// The whole view as text: table, summary line, and which devices sent no telemetry.
pub fn text(rows: &[Row], waited: Option<Duration>) -> String {
    let summary = Summary::of(rows);
    let mut lines = table(rows);
    lines.push(summary.line());
    lines.extend(summary.no_telemetry_line(waited));
    lines.join("\n") + "\n"
}

/// The view as JSON: `{"rows": [...], "summary": {...}}`.
pub fn json(rows: &[Row]) -> serde_json::Value {
    serde_json::json!({"rows": rows, "summary": Summary::of(rows)})
}

/// One screenful for `--watch` on a terminal of `height` lines and `width`
/// columns: home, as many rows as fit (then how many more there are), the
/// summary, every line cut to the width and cleared to its end.
pub fn screen(rows: &[Row], height: usize, width: usize) -> String {
    let summary = Summary::of(rows);
    let mut lines = table(rows);
    let mut tail = vec![summary.line()];
    tail.extend(summary.no_telemetry_line(None));
    tail.push("Ctrl-C to stop".into());
    // The header, the tail, and a line for "N more".
    let room = height.saturating_sub(1 + tail.len() + 1).max(1);
    if lines.len() - 1 > room {
        let more = lines.len() - 1 - room;
        lines.truncate(1 + room);
        lines.push(format!("… {more} more rows (narrow with --group or --device; --json or a pipe shows all)"));
    }
    lines.extend(tail);
    // No newline after the last line: on the terminal's last line it would scroll.
    let cut: Vec<String> = lines.iter().map(|l| l.chars().take(width.max(1)).collect::<String>() + "\x1b[K").collect();
    format!("\x1b[H{}\x1b[J", cut.join("\n"))
}

/// `outpost-sim status`'s options.
#[derive(Debug, Clone)]
pub struct Options {
    pub filter: Filter,
    pub watch: bool,
    pub json: bool,
    /// Without `watch`: how long to listen for telemetry at most.
    pub wait: Duration,
}

/// Subscribes, listens and prints the view (once, or until Ctrl-C with `watch`).
pub async fn run(op: &mut Operator, opts: Options) -> Result<(), String> {
    let topics = op.topics.clone();
    let leaves = ["state", "availability", "telemetry", "events"];
    // QoS 0: a broker never drops messages for this subscriber because its
    // queue of unacknowledged ones is full (a fleet's retained states at once).
    let qos = rumqttc::QoS::AtMostOnce;
    if opts.filter.devices.is_empty() {
        for leaf in leaves {
            op.subscribe_with(&format!("{}/devices/+/{leaf}", topics.prefix()), qos).await?;
        }
    } else {
        // Exact topics: RabbitMQ hands retained messages to those only.
        for d in &opts.filter.devices {
            for leaf in leaves {
                op.subscribe_with(&format!("{}/devices/{d}/{leaf}", topics.prefix()), qos).await?;
            }
        }
    }
    let fleet = Fleet::new(topics, opts.filter.clone(), Instant::now());
    if opts.watch { watch(op, fleet, opts.json).await } else { once(op, fleet, &opts).await }
}

async fn once(op: &mut Operator, mut fleet: Fleet, opts: &Options) -> Result<(), String> {
    let started = Instant::now();
    let deadline = started + opts.wait;
    let mut checked = started;
    loop {
        let now = Instant::now();
        // The retained states came (no new device for a while), and every
        // online device reported or the time is up; devices that keep
        // turning up get a few seconds more.
        let settled = now.saturating_duration_since(fleet.last_new_device) >= SETTLE;
        if (settled && now >= deadline) || now >= deadline + Duration::from_secs(5) {
            break;
        }
        // Every 100 ms, not per message: it builds every row.
        if settled && now.saturating_duration_since(checked) >= Duration::from_millis(100) {
            checked = now;
            if fleet.all_reported(now) {
                break;
            }
        }
        if let Some(m) = op.next(Duration::from_millis(100)).await {
            fleet.message(&m.topic, &m.payload, m.retain, Instant::now());
        }
    }
    let now = Instant::now();
    let rows = fleet.rows(now);
    let out = if opts.json {
        serde_json::to_string_pretty(&json(&rows)).unwrap_or_default() + "\n"
    } else {
        text(&rows, Some(now.saturating_duration_since(started)))
    };
    print(&out)
}

async fn watch(op: &mut Operator, mut fleet: Fleet, json_lines: bool) -> Result<(), String> {
    let terminal = !json_lines && Stream::Stdout.is_terminal();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut next_draw = Instant::now() + Duration::from_secs(1);
    let mut drawn: Option<u64> = None;
    loop {
        let left = next_draw.saturating_duration_since(Instant::now());
        tokio::select! {
            _ = &mut ctrl_c => break,
            m = op.next(left) => {
                if let Some(m) = m {
                    fleet.message(&m.topic, &m.payload, m.retain, Instant::now());
                }
            }
        }
        let now = Instant::now();
        if now < next_draw {
            continue;
        }
        next_draw = now + Duration::from_secs(1);
        let rows = fleet.rows(now);
        if terminal {
            // Redrawn every second: the ages move.
            let (height, width) = console::Term::stdout().size();
            print(&screen(&rows, height as usize, width as usize))?;
        } else if drawn != Some(fleet.changes) {
            // A log gets a snapshot when something changed, at most every second.
            drawn = Some(fleet.changes);
            let out = if json_lines {
                let mut v = json(&rows);
                v["at"] = outpost_agent::sys::now_rfc3339().into();
                v.to_string() + "\n"
            } else {
                format!("--- {}\n{}", outpost_agent::sys::now_rfc3339(), text(&rows, None))
            };
            print(&out)?;
        }
    }
    if terminal {
        print("\n")?;
    }
    Ok(())
}

fn print(text: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|_| out.flush()).map_err(|e| format!("stdout: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::state::SlotState;
    use outpost_protocol::telemetry::{Latency, SlotTelemetry};
    use outpost_protocol::{ActiveModel, ErrorCode, ErrorInfo};

    fn state(device: &str, groups: &[&str], version: Option<&str>) -> DeviceState {
        DeviceState {
            schema: outpost_protocol::state::SCHEMA.into(),
            device: device.into(),
            agent_version: "0.1.0".into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            seq: 1,
            at: None,
            active: version.map(|v| active("digits", v)),
            last_deployment: version.map(|v| LastDeployment {
                deployment_id: format!("digits-{v}"),
                revision: 1,
                outcome: Outcome::Active,
                error: None,
            }),
            models: BTreeMap::new(),
        }
    }

    fn active(name: &str, version: &str) -> ActiveModel {
        ActiveModel {
            name: name.into(),
            version: version.into(),
            manifest_sha256: "ab".repeat(32),
            deployment_id: format!("{name}-{version}"),
            revision: 1,
            since: "2026-01-01T00:00:00Z".into(),
            runtime: None,
        }
    }

    fn stats(requests: u64, errors: u64, p99_us: u64) -> InferenceStats {
        InferenceStats {
            requests,
            errors,
            rejected: 0,
            model_errors: None,
            latency_us: Latency { p50: 1, p90: 2, p99: p99_us, max: p99_us },
        }
    }

    fn telemetry(device: &str, uptime_s: u64, inference: InferenceStats) -> Telemetry {
        Telemetry {
            schema: outpost_protocol::telemetry::SCHEMA.into(),
            device: device.into(),
            at: "2026-01-01T00:00:00Z".into(),
            uptime_s,
            interval_s: None,
            model: Some(ModelId { name: "digits".into(), version: "1".into() }),
            inference,
            process: Default::default(),
            store: Default::default(),
            mqtt: Default::default(),
            shadow: None,
            models: BTreeMap::new(),
        }
    }

    fn put(fleet: &mut Fleet, device: &str, leaf: &str, payload: &[u8], retained: bool, at: Instant) {
        assert!(fleet.message(&format!("outpost/devices/{device}/{leaf}"), payload, retained, at));
    }

    fn json_of<T: Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    #[test]
    fn a_row_per_device_from_retained_state_and_telemetry() {
        let t0 = Instant::now();
        let mut fleet = Fleet::new(Topics::default(), Filter::default(), t0);
        // Retained at subscription: known at once, of unknown age.
        put(&mut fleet, "cam-2", "state", &json_of(&state("cam-2", &["cams"], Some("1"))), true, t0);
        put(&mut fleet, "cam-2", "availability", b"online", true, t0);
        put(&mut fleet, "cam-1", "state", &json_of(&state("cam-1", &["cams"], Some("2"))), true, t0);
        put(&mut fleet, "cam-1", "availability", b"online", true, t0);
        // Two reports of cam-1 a second apart: 40 requests, 2 failed, p99 1.5 ms.
        let t1 = t0 + Duration::from_millis(500);
        put(&mut fleet, "cam-1", "telemetry", &json_of(&telemetry("cam-1", 10, stats(7, 0, 900))), false, t1);
        let t2 = t0 + Duration::from_millis(1500);
        put(&mut fleet, "cam-1", "telemetry", &json_of(&telemetry("cam-1", 12, stats(40, 2, 1500))), false, t2);

        let rows = fleet.rows(t0 + Duration::from_secs(4));
        assert_eq!(rows.iter().map(|r| r.device.as_str()).collect::<Vec<_>>(), ["cam-1", "cam-2"], "sorted by device");
        let a = &rows[0];
        assert_eq!(
            (a.online, a.slot.as_deref(), a.model.as_deref(), a.outcome),
            (Online::Online, None, Some("digits@2"), Some("active"))
        );
        assert_eq!((a.requests, a.error_rate, a.p99_ms), (Some(40), Some(0.05), Some(1.5)));
        assert_eq!(a.requests_per_s, Some(20.0), "40 requests over the 2 s between the reports' uptimes");
        assert_eq!(a.last_seen_s, Some(2.5));
        let b = &rows[1];
        assert_eq!((b.model.as_deref(), b.telemetry, b.p99_ms, b.last_seen_s), (Some("digits@1"), false, None, None));

        let summary = Summary::of(&rows);
        assert_eq!((summary.devices, summary.online, summary.failures), (2, 2, 0));
        assert_eq!(summary.models, BTreeMap::from([("digits@1".into(), 1), ("digits@2".into(), 1)]));
        assert_eq!(summary.no_telemetry, ["cam-2"]);
        assert!(!fleet.all_reported(t2));

        let text = text(&rows, Some(Duration::from_secs(5)));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("DEVICE  ONLINE  SLOT  MODEL     OUTCOME  P99 MS  ERRORS  REQ/S"), "{text}");
        assert!(lines[1].starts_with("cam-1   online  -     digits@2  active     1.50    5.0%   20.0  -"), "{text}");
        assert!(lines[1].ends_with("3 s ago"), "{text}");
        assert!(lines[2].starts_with("cam-2   online  -     digits@1  active        -       -      -  -"), "{text}");
        assert_eq!(lines[3], "2 devices: 2 online; digits@1 1, digits@2 1; 0 failed or rolled back");
        assert!(
            lines[4].starts_with("no telemetry within 5.0 s from 1 online device (") && lines[4].ends_with("): cam-2"),
            "{text}"
        );
    }

    #[test]
    fn model_slots_are_rows_of_their_own_with_their_own_figures() {
        let t0 = Instant::now();
        let mut fleet = Fleet::new(Topics::default(), Filter::default(), t0);
        let mut s = state("cam-1", &[], Some("1"));
        s.models.insert(
            "detector".into(),
            SlotState {
                active: Some(active("yolo", "8")),
                last_deployment: Some(LastDeployment {
                    deployment_id: "yolo-9".into(),
                    revision: 3,
                    outcome: Outcome::RolledBack,
                    error: Some(ErrorInfo { code: ErrorCode::ProbationFailed, message: "error rate 0.4".into() }),
                }),
            },
        );
        s.models.insert("classifier".into(), SlotState::default());
        put(&mut fleet, "cam-1", "state", &json_of(&s), true, t0);
        let mut t = telemetry("cam-1", 5, stats(10, 0, 500));
        let candidate = ShadowStats {
            model: ModelId { name: "yolo".into(), version: "9".into() },
            compared: 200,
            top1_agree: 195,
            agreement: 0.975,
            ..Default::default()
        };
        t.models.insert(
            "detector".into(),
            SlotTelemetry {
                model: Some(ModelId { name: "yolo".into(), version: "8".into() }),
                inference: stats(4, 1, 20_000),
                shadow: Some(candidate.clone()),
            },
        );
        put(&mut fleet, "cam-1", "telemetry", &json_of(&t), false, t0);

        let rows = fleet.rows(t0);
        let slots: Vec<Option<&str>> = rows.iter().map(|r| r.slot.as_deref()).collect();
        assert_eq!(slots, [None, Some("classifier"), Some("detector")], "the default slot first, then by name");
        assert_eq!(
            (rows[0].model.as_deref(), rows[0].p99_ms, rows[0].shadow.as_ref()),
            (Some("digits@1"), Some(0.5), None)
        );
        assert_eq!((rows[1].model.as_deref(), rows[1].outcome, rows[1].requests), (None, None, None));
        let det = &rows[2];
        assert_eq!(
            (det.model.as_deref(), det.outcome, det.error_code),
            (Some("yolo@8"), Some("rolled_back"), Some("probation_failed"))
        );
        assert_eq!((det.error_rate, det.p99_ms), (Some(0.25), Some(20.0)));
        assert_eq!(
            det.shadow.as_ref().map(|s| (s.model.as_str(), s.agreement, s.compared)),
            Some(("yolo@9", 0.975, 200))
        );

        let summary = Summary::of(&rows);
        assert_eq!((summary.devices, summary.nothing_serving, summary.failures), (1, 1, 1));
        let text = text(&rows, None);
        assert!(text.contains("rolled_back (probation_failed)") && text.contains("yolo@9 97.5% of 200"), "{text}");

        // A later `shadow` event is newer than the report.
        let ev = DeploymentEvent {
            schema: outpost_protocol::event::SCHEMA.into(),
            device: "cam-1".into(),
            deployment_id: "yolo-8".into(),
            revision: 1,
            seq: 9,
            at: "2026-01-01T00:00:01Z".into(),
            phase: Phase::Shadow,
            progress: None,
            error: None,
            detail: None,
            timings_ms: None,
            slot: Some("detector".into()),
            shadow: Some(ShadowStats { compared: 400, agreement: 0.5, ..candidate }),
            backend: None,
        };
        put(&mut fleet, "cam-1", "events", &json_of(&ev), false, t0 + Duration::from_secs(1));
        let det = fleet.rows(t0 + Duration::from_secs(1)).remove(2);
        assert_eq!(det.shadow.map(|s| (s.agreement, s.compared)), Some((0.5, 400)));

        // Only named slots, nothing ever in the default one: no default row.
        let mut only = s.clone();
        (only.active, only.last_deployment) = (None, None);
        put(&mut fleet, "cam-3", "state", &json_of(&only), true, t0);
        let rows = fleet.rows(t0);
        let cam3: Vec<Option<&str>> = rows.iter().filter(|r| r.device == "cam-3").map(|r| r.slot.as_deref()).collect();
        assert_eq!(cam3, [Some("classifier"), Some("detector")]);
    }

    #[test]
    fn offline_stale_and_unknown_devices() {
        let t0 = Instant::now();
        let mut fleet = Fleet::new(Topics::default(), Filter::default(), t0);
        put(&mut fleet, "gone", "state", &json_of(&state("gone", &[], Some("1"))), true, t0);
        put(&mut fleet, "gone", "availability", b"offline", true, t0);
        put(&mut fleet, "quiet", "availability", b"online", true, t0);
        put(&mut fleet, "new", "state", &json_of(&state("new", &[], None)), true, t0);
        put(&mut fleet, "live", "availability", b"online", true, t0);
        // live reports every 2 s.
        for (i, up) in [(0u64, 100u64), (2, 102), (4, 104)] {
            let at = t0 + Duration::from_secs(i);
            put(&mut fleet, "live", "telemetry", &json_of(&telemetry("live", up, stats(1, 0, 1))), false, at);
        }
        let online = |fleet: &Fleet, at: Instant| -> Vec<(String, Online)> {
            fleet.rows(at).into_iter().map(|r| (r.device, r.online)).collect()
        };
        let t = t0 + Duration::from_secs(5);
        assert_eq!(
            online(&fleet, t),
            [
                ("gone".into(), Online::Offline),
                ("live".into(), Online::Online),
                ("new".into(), Online::Unknown),
                ("quiet".into(), Online::Online)
            ]
        );
        // live silent past 3 of its 2 s intervals: stale; quiet, silent for
        // 3 default intervals since the view started: stale too.
        assert_eq!(online(&fleet, t0 + Duration::from_secs(11))[1].1, Online::Stale);
        assert_eq!(online(&fleet, t0 + Duration::from_secs(89))[3].1, Online::Online);
        let rows = fleet.rows(t0 + Duration::from_secs(91));
        assert_eq!(rows[3].online, Online::Stale);
        let summary = Summary::of(&rows);
        assert_eq!((summary.online, summary.offline, summary.stale, summary.unknown), (0, 1, 2, 1));
        assert_eq!(summary.no_telemetry, ["quiet"], "offline and unknown devices are not waited for");
        // live has no state: its telemetry says what serves.
        assert_eq!((summary.models.get("digits@1"), summary.nothing_serving), (Some(&2), 2));
        assert!(
            summary.line().starts_with(
                "4 devices: 0 online, 1 offline, 2 stale, 1 availability unknown; digits@1 2, nothing serving 2"
            ),
            "{}",
            summary.line()
        );
        // The last report a device sent stays (an offline device keeps its last figures).
        put(&mut fleet, "live", "availability", b"offline", false, t0 + Duration::from_secs(6));
        let live = fleet.rows(t0 + Duration::from_secs(7)).remove(1);
        assert_eq!((live.online, live.p99_ms.is_some(), live.last_seen_s), (Online::Offline, true, Some(1.0)));
    }

    #[test]
    fn group_and_device_filters() {
        let t0 = Instant::now();
        let filter = Filter { devices: vec![], group: Some("cams".into()) };
        let mut fleet = Fleet::new(Topics::default(), filter, t0);
        put(&mut fleet, "a", "state", &json_of(&state("a", &["site", "cams"], Some("1"))), true, t0);
        put(&mut fleet, "b", "state", &json_of(&state("b", &["site"], Some("1"))), true, t0);
        put(&mut fleet, "c", "availability", b"online", true, t0);
        let names: Vec<String> = fleet.rows(t0).into_iter().map(|r| r.device).collect();
        assert_eq!(names, ["a"], "b is not in the group; c's groups are not known");

        let filter = Filter { devices: vec!["x.1".into(), "b".into()], group: None };
        let mut fleet = Fleet::new(Topics::default(), filter, t0);
        put(&mut fleet, "b", "availability", b"online", true, t0);
        put(&mut fleet, "other", "availability", b"online", true, t0);
        // RabbitMQ delivers x.1's topics as x/1.
        put(&mut fleet, "x/1", "availability", b"offline", true, t0);
        assert!(!fleet.message("outpost/devices/y/1/availability", b"online", true, t0), "not asked for");
        let rows: Vec<(String, Online)> = fleet.rows(t0).into_iter().map(|r| (r.device, r.online)).collect();
        assert_eq!(rows, [("b".into(), Online::Online), ("x.1".into(), Online::Offline)]);

        // A device asked for that never said anything is a row too.
        let filter = Filter { devices: vec!["nobody".into()], group: None };
        let rows = Fleet::new(Topics::default(), filter, t0).rows(t0);
        assert_eq!((rows.len(), rows[0].online, rows[0].model.as_ref()), (1, Online::Unknown, None));
    }

    #[test]
    fn not_our_topics_and_unreadable_messages() {
        let t0 = Instant::now();
        let mut fleet = Fleet::new(Topics::default(), Filter::default(), t0);
        assert!(!fleet.message("outpost/devices/a/desired", b"{}", true, t0));
        assert!(!fleet.message("other/devices/a/state", b"{}", true, t0));
        assert!(!fleet.message("outpost/devices/a/b/state", b"{}", true, t0), "a / only from a device asked for");
        assert!(!fleet.message("outpost/devices//state", b"{}", true, t0));
        put(&mut fleet, "a", "state", br#"{"schema":"outpost.state.v9"}"#, true, t0);
        put(&mut fleet, "a", "telemetry", b"not json", false, t0);
        let rows = fleet.rows(t0);
        assert_eq!(rows.len(), 1);
        assert!(rows[0].state_error.as_deref().is_some_and(|e| e.contains("outpost.state.v9")), "{rows:?}");
        assert!(!rows[0].telemetry);
        assert_eq!(rows[0].last_seen_s, Some(0.0), "a message is a sign of life even when unreadable");
        assert!(text(&rows, None).lines().nth(1).is_some_and(|l| l.contains("unreadable state")));
        // A withdrawn retained state: nothing known of it any more.
        put(&mut fleet, "a", "state", b"", true, t0);
        assert_eq!(fleet.rows(t0)[0].state_error, None);
    }

    #[test]
    fn a_device_s_words_cannot_drive_the_terminal() {
        let t0 = Instant::now();
        let mut fleet = Fleet::new(Topics::default(), Filter::default(), t0);
        // Topics may hold control characters; payloads anything.
        let evil = "cam\u{1b}[2J\u{202e}";
        let mut s = state(evil, &[], Some("1\u{7}"));
        s.active.as_mut().unwrap().name = format!("x\r{}", "n".repeat(100));
        s.models.insert("slot\u{1b}]0;title\u{7}".into(), SlotState::default());
        put(&mut fleet, evil, "state", &json_of(&s), true, t0);
        put(&mut fleet, evil, "availability", b"online", true, t0);
        let rows = fleet.rows(t0);
        let out = text(&rows, None) + &screen(&rows, 50, 500);
        // The screen's own control sequences aside, nothing of the device's is raw.
        let without_ours = out.replace("\x1b[H", "").replace("\x1b[K", "").replace("\x1b[J", "");
        assert!(!without_ours.chars().any(|c| c.is_control() && c != '\n'), "{without_ours:?}");
        assert!(!out.contains('\u{202e}'));
        assert!(
            out.contains("cam\\u{1b}[2J\\u{202e}") && out.contains("x\\r") && out.contains("slot\\u{1b}]0;title\\u{7}"),
            "{out}"
        );
        assert!(out.contains(&format!("x\\r{}…", "n".repeat(62))), "long text is cut: {out}");
        // JSON escapes by itself.
        let j = json(&rows).to_string();
        assert!(!j.chars().any(char::is_control) && j.contains("\\u001b"), "{j}");
    }

    #[test]
    fn a_screen_fits_the_terminal() {
        let t0 = Instant::now();
        let mut fleet = Fleet::new(Topics::default(), Filter::default(), t0);
        for i in 0..10_000 {
            let d = format!("dev-{i:05}");
            put(&mut fleet, &d, "state", &json_of(&state(&d, &["all"], Some("1"))), true, t0);
            put(&mut fleet, &d, "availability", if i % 100 == 0 { b"offline" } else { b"online" }, true, t0);
        }
        let rows = fleet.rows(t0);
        assert_eq!(rows.len(), 10_000);
        let summary = Summary::of(&rows);
        assert_eq!((summary.devices, summary.online, summary.offline), (10_000, 9_900, 100));
        assert!(summary.no_telemetry_line(None).unwrap().ends_with("dev-00010, and 9890 more"));
        let s = screen(&rows, 24, 60);
        assert_eq!(s.matches('\n').count(), 23, "24 lines, the last without a newline: {s}");
        assert!(s.contains("… 9981 more rows"), "{s}");
        assert!(s.split('\n').all(|l| l.replace("\x1b[K", "").replace("\x1b[H", "").chars().count() <= 60), "{s}");
    }
}
