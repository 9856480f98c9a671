//! The agent's configuration: `/etc/outpost/agent.toml`, then the drop-ins
//! in `/etc/outpost/agent.d/*.toml` in file-name order, then command-line
//! flags; a later source wins key by key. `OUTPOST_CONFIG` (or `--config`)
//! names another main file (its drop-ins are in `<file without .toml>.d/`).
//!
//! Every source is flattened to dotted keys (`mqtt.keep_alive`) with where
//! each value came from, so an error names the key, the value, the file (or
//! flag) and what was expected, and `outpost check-config` prints each
//! effective value with its origin.

use crate::link::{BrokerUrl, Protocol};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The main configuration file when neither `--config` nor `OUTPOST_CONFIG` names one.
pub const DEFAULT_PATH: &str = "/etc/outpost/agent.toml";
/// Where models and state live when `data_dir` is not set (systemd's `StateDirectory=outpost`).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/outpost";

/// A configuration value and where it was set.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub value: toml::Value,
    pub origin: String,
}

/// All sources merged: key -> the winning entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layers {
    entries: BTreeMap<String, Entry>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
}

/// A configuration error: which key, which value, from where, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub origin: String,
    pub key: String,
    pub value: String,
    pub expected: String,
}

impl ConfigError {
    fn file(path: &Path, what: String) -> ConfigError {
        ConfigError { origin: path.display().to_string(), key: String::new(), value: String::new(), expected: what }
    }
}

/// `FILE[:LINE]: KEY = VALUE: expected ...`, or `FILE[:LINE[:COLUMN]]:
/// expected ...` for an error about the file itself (unreadable, not TOML).
impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.key.is_empty() {
            true => write!(f, "{}: expected {}", self.origin, self.expected),
            false => write!(f, "{}: {} = {}: expected {}", self.origin, self.key, self.value, self.expected),
        }
    }
}

/// A value as TOML writes it (check-config's output parses as TOML again):
/// the `toml` crate is built without its writer, which this agent needs
/// only for these one-line values.
fn toml_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => {
            let mut out = String::with_capacity(s.len() + 2);
            out.push('"');
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\t' => out.push_str("\\t"),
                    '\r' => out.push_str("\\r"),
                    c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) if f.is_nan() => "nan".into(),
        toml::Value::Float(f) if f.is_infinite() => if *f > 0.0 { "inf" } else { "-inf" }.into(),
        toml::Value::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{f:.1}"),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(a) => format!("[{}]", a.iter().map(toml_text).collect::<Vec<_>>().join(", ")),
        toml::Value::Table(t) => format!(
            "{{ {} }}",
            t.iter()
                .map(|(k, v)| format!("{} = {}", toml_text(&toml::Value::String(k.clone())), toml_text(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The 1-based line and column of a byte offset of `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The line where a flattened key (`mqtt.keep_alive`) is set in a TOML
/// document written the usual way (`[mqtt]` then `keep_alive = ...`, or
/// `mqtt.keep_alive = ...`); None for the rarer forms (inline tables).
fn line_of(text: &str, key: &str) -> Option<usize> {
    let bare =
        |s: &str| s.split('.').map(|p| p.trim().trim_matches('"').trim_matches('\'')).collect::<Vec<_>>().join(".");
    // Brackets opened minus closed outside quoted strings.
    let depth = |s: &str| {
        let (mut d, mut quote) = (0i32, None);
        for c in s.chars() {
            match (quote, c) {
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, '[') => d += 1,
                (None, ']') => d -= 1,
                (None, '#') => break,
                _ => {}
            }
        }
        d
    };
    let mut section = String::new();
    // Inside a multi-line string (its closing delimiter) or array (its depth):
    // lines there are values, not keys.
    let (mut string_ends, mut array) = (None::<&str>, 0i32);
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(delim) = string_ends {
            if line.contains(delim) {
                string_ends = None;
            }
            continue;
        }
        if array > 0 {
            array += depth(line);
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if let Some(h) = line.strip_prefix('[') {
            let h = h.strip_prefix('[').unwrap_or(h);
            section = bare(h.split(']').next().unwrap_or_default());
            continue;
        }
        let Some((k, value)) = line.split_once('=') else { continue };
        for delim in ["\"\"\"", "\'\'\'"] {
            if value.matches(delim).count() % 2 == 1 {
                string_ends = Some(delim);
            }
        }
        if string_ends.is_none() && value.trim_start().starts_with('[') {
            array = depth(value).max(0);
        }
        let k = bare(k);
        let full = if section.is_empty() { k } else { format!("{section}.{k}") };
        if full == key {
            return Some(i + 1);
        }
    }
    None
}

/// Every key the agent knows, with its flag, what it takes, and its
/// default (as shown by check-config); `secret` values are masked.
pub struct Key {
    pub name: &'static str,
    pub flag: &'static str,
    pub takes: &'static str,
    pub default: &'static str,
    pub secret: bool,
    /// Applied by SIGHUP without a restart.
    pub reloadable: bool,
}

const fn key(name: &'static str, flag: &'static str, takes: &'static str, default: &'static str) -> Key {
    Key { name, flag, takes, default, secret: false, reloadable: false }
}

const fn live(k: Key) -> Key {
    Key { reloadable: true, ..k }
}

pub const KEYS: &[Key] = &[
    key("device", "--device", "a device id: [A-Za-z0-9_.-]{1,64}", ""),
    key("groups", "--group", "a list of group names: [A-Za-z0-9_.-]{1,64} each", "[]"),
    key("data_dir", "--data-dir", "a directory path", DEFAULT_DATA_DIR),
    key("topic_prefix", "--topic-prefix", "a topic without wildcards or trailing '/'", "outpost"),
    live(key("telemetry_interval", "--telemetry-interval", "1 to 86400 seconds", "30")),
    live(key("shutdown_grace", "--shutdown-grace", "0 to 600 seconds", "10")),
    key("log.format", "--log-format", "text or json", "text"),
    live(key("log.level", "--log-level", "a filter like info or info,outpost_agent=debug", "info")),
    key("mqtt.broker", "--broker", "mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (tcp:// and ssl:// are the same)", ""),
    key("mqtt.client_id", "--client-id", "an MQTT client id (default outpost-DEVICE)", ""),
    key(
        "mqtt.reply_prefixes",
        "--reply-prefix",
        "a list of topic prefixes ending in '/' that reply_to may name, outside TOPIC_PREFIX/devices/ and /groups/ (default: TOPIC_PREFIX/replies/)",
        "[]",
    ),
    key("mqtt.version", "--mqtt-version", "3.1.1 or 5", "3.1.1"),
    key("mqtt.keep_alive", "--keep-alive", "5 to 3600 seconds", "15"),
    key("mqtt.max_packet_size", "--max-packet-size", "a size from 64KiB to 256MiB (bytes, or 4MiB, 500KB)", "4MiB"),
    key("mqtt.max_inflight_bytes", "--set", "a size from 1MiB (e.g. 64MiB)", "64MiB"),
    key("mqtt.journal_max_bytes", "--set", "a size from 64KiB (e.g. 16MiB)", "16MiB"),
    key("mqtt.persistent_session", "--persistent-session", "true or false", "false"),
    key("mqtt.username", "--username", "a user name", ""),
    Key { secret: true, ..key("mqtt.password", "OUTPOST_MQTT_PASSWORD", "a password", "") },
    key("mqtt.password_file", "--password-file", "a readable file whose first line is the password", ""),
    key("tls.ca_file", "--ca-file", "a PEM file of CA certificates", ""),
    key("tls.client_cert", "--client-cert", "a PEM certificate chain", ""),
    key("tls.client_key", "--client-key", "a PEM private key", ""),
    key("http.bind", "--http-bind", "IP:PORT (e.g. 127.0.0.1:8080) or off", "127.0.0.1:8080"),
    key(
        "metrics.bind",
        "--set",
        "IP:PORT (e.g. 0.0.0.0:9464) serving GET /metrics alone, for a central Prometheus; unset: /metrics only on http.bind",
        "",
    ),
    key("http.header_timeout", "--set", "1 to 3600 seconds", "10"),
    key("http.body_timeout", "--set", "1 to 3600 seconds", "30"),
    key("http.max_connections", "--set", "1 to 100000", "256"),
    key("http.max_body", "--set", "a size from 1KiB (e.g. 64MiB)", "64MiB"),
    key("http.max_inflight_bytes", "--set", "a size of at least 8 x http.max_body (e.g. 512MiB)", "512MiB"),
    live(key("limits.workers", "--workers", "1 to 256", "2")),
    live(key("limits.max_queue", "--max-queue", "0 to 100000", "64")),
    live(key("limits.store_quota", "--store-quota", "a size (e.g. 2GiB); 0 = no quota", "0")),
    live(key("limits.max_model_size", "--max-model-size", "a size (e.g. 500MB); 0 = no limit", "0")),
    live(key(
        "limits.validation_memory",
        "--set",
        "a size (e.g. 512MiB); 0 = what the device has available less 32 MiB",
        "0",
    )),
    live(key("limits.validation_timeout", "--set", "1 to 86400 seconds", "120")),
    live(key("limits.revalidate_at_start", "--set", "true or false", "false")),
    live(key("limits.disk_reserve", "--set", "a size (e.g. 64MiB) downloads leave free", "64MiB")),
    live(key("limits.crash_loop_max", "--set", "0 to 100 (0: only a crash while installing counts)", "3")),
    live(key("limits.crash_loop_window", "--set", "1 to 86400 seconds", "600")),
    key(
        "download.file_root",
        "--set",
        "a directory file:// URLs may read from (labs); unset: only http:// and https://",
        "",
    ),
    key(
        "trust.keys",
        "--trust-key",
        "a list of ed25519 public keys: PEM files (openssl pkey -pubout) or ed25519:<base64>",
        "[]",
    ),
    key(
        "runtime.default",
        "--set",
        "auto, tract or onnxruntime: the engine of models whose manifest sets no model.runtime",
        "auto",
    ),
    key(
        "runtime.onnxruntime_library",
        "--set",
        "the path of libonnxruntime.so (1.17 or newer; agents built with the onnxruntime feature); unset: tract only",
        "",
    ),
    key("download.attempts", "--download-attempts", "1 to 100", "4"),
    key("download.stall_timeout", "--stall-timeout", "1 to 3600 seconds", "30"),
];

fn known(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// The key named `name`, or an error that lists the known keys of its section.
fn known_key(name: &str, value: &str, origin: &str) -> Result<&'static Key, ConfigError> {
    known(name).ok_or_else(|| ConfigError {
        origin: origin.to_string(),
        key: name.to_string(),
        value: value.to_string(),
        expected: format!("one of the known keys: {}", suggestions(name)),
    })
}

impl Layers {
    /// Reads the main file (if it exists; `required`: it must) and its
    /// drop-ins. Unknown keys and values of the wrong type are errors here.
    pub fn load(main: &Path, required: bool) -> Result<Layers, ConfigError> {
        let mut layers = Layers::default();
        match std::fs::read_to_string(main) {
            Ok(text) => layers.add_file(main, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {}
            Err(e) => return Err(ConfigError::file(main, format!("a readable TOML file ({e})"))),
        }
        let dir = main.with_extension("d");
        let mut dropins: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect(),
            Err(_) => Vec::new(),
        };
        dropins.sort();
        for p in dropins {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| ConfigError::file(&p, format!("a readable TOML file ({e})")))?;
            layers.add_file(&p, &text)?;
        }
        Ok(layers)
    }

    /// Adds one TOML document (later sources win key by key).
    pub fn add_file(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let at = match e.span() {
                Some(span) => {
                    let (line, col) = line_col(text, span.start);
                    format!("{}:{line}:{col}", path.display())
                }
                None => path.display().to_string(),
            };
            let message = e.message().trim().replace('\n', "; ");
            ConfigError {
                origin: at,
                expected: format!("valid TOML ({message})"),
                ..ConfigError::file(path, String::new())
            }
        })?;
        let file = path.display().to_string();
        let mut flat = Vec::new();
        flatten("", table, &mut flat);
        for (k, v) in flat {
            // Errors about a key name the line it is set on.
            let origin = line_of(text, &k).map_or_else(|| file.clone(), |n| format!("{file}:{n}"));
            known_key(&k, &toml_text(&v), &origin)?;
            self.entries.insert(k, Entry { value: v, origin });
        }
        self.files.push(path.to_path_buf());
        Ok(())
    }

    /// Sets a key from a flag or the environment (wins over files).
    pub fn set(&mut self, key: &str, value: toml::Value, origin: &str) {
        self.entries.insert(key.to_string(), Entry { value, origin: origin.to_string() });
    }

    /// Sets a key from command-line text: a number or a boolean where the
    /// key takes one (so check-config shows it as such), else a string. An
    /// unknown key is an error naming the known ones.
    pub fn set_text(&mut self, key: &str, text: &str, origin: &str) -> Result<(), ConfigError> {
        let k = known_key(key, text, origin)?;
        let value = match (text.parse::<i64>(), text.parse::<bool>()) {
            (Ok(n), _) if k.default.parse::<u64>().is_ok() => toml::Value::Integer(n),
            (_, Ok(b)) if k.default == "true" || k.default == "false" => toml::Value::Boolean(b),
            _ => toml::Value::String(text.to_string()),
        };
        self.set(key, value, origin);
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Resolves every key to its typed value, checking ranges and formats.
    pub fn resolve(&self) -> Result<Settings, ConfigError> {
        let r = Resolver { layers: self };
        let required = |k: &str| -> Result<String, ConfigError> {
            r.string(k)?.ok_or_else(|| ConfigError {
                origin: "configuration".into(),
                key: k.into(),
                value: "(not set)".into(),
                expected: format!(
                    "{} (set `{k}` in {} or pass {})",
                    known(k).map_or("", |x| x.takes),
                    self.files.first().map_or_else(|| DEFAULT_PATH.to_string(), |p| p.display().to_string()),
                    known(k).map_or("", |x| x.flag)
                ),
            })
        };
        let device = required("device")?;
        r.check("device", outpost_protocol::topics::validate_name("device", &device).is_ok())?;
        let groups = r.strings("groups")?;
        for g in &groups {
            if outpost_protocol::topics::validate_name("group", g).is_err() {
                return Err(r.error("groups", "a list of group names: [A-Za-z0-9_.-]{1,64} each"));
            }
        }
        let topic_prefix = r.string("topic_prefix")?.unwrap_or_else(|| "outpost".into());
        r.check(
            "topic_prefix",
            !topic_prefix.is_empty() && !topic_prefix.contains(['+', '#']) && !topic_prefix.ends_with('/'),
        )?;
        let (broker_text, login) = split_login(&required("mqtt.broker")?);
        let broker: BrokerUrl = broker_text.parse().map_err(|_| r.error("mqtt.broker", ""))?;
        let mut trust = outpost_protocol::trust::Trust::default();
        for k in r.strings("trust.keys")? {
            let keys = if k.trim_start().starts_with("ed25519:") {
                outpost_protocol::trust::PublicKey::parse(&k).map(|k| vec![k])
            } else {
                std::fs::read_to_string(&k).map_err(|e| format!("{k}: cannot read it: {e}")).and_then(|text| {
                    outpost_protocol::trust::PublicKey::parse_all(&text).map_err(|e| format!("{k}: {e}"))
                })
            };
            let takes = known("trust.keys").map_or("", |x| x.takes);
            trust.roots.extend(keys.map_err(|e| r.error("trust.keys", &format!("{takes} ({e})")))?);
        }
        let reply_prefixes = r.strings("mqtt.reply_prefixes")?;
        // A prefix may not reach the device and group topics: the agent
        // would publish there for whoever asked.
        let (device_topics, group_topics) = (format!("{topic_prefix}/devices/"), format!("{topic_prefix}/groups/"));
        for p in &reply_prefixes {
            let own = |t: &str| t.starts_with(p.as_str()) || p.starts_with(t);
            r.check(
                "mqtt.reply_prefixes",
                p.ends_with('/')
                    && p.len() > 1
                    && !p.contains(['+', '#'])
                    && !own(&device_topics)
                    && !own(&group_topics),
            )?;
        }
        let client_id = r.string("mqtt.client_id")?;
        if let Some(c) = &client_id {
            r.check(
                "mqtt.client_id",
                !c.is_empty() && c.len() <= 256 && !c.contains(['+', '#', '/']) && !c.chars().any(char::is_control),
            )?;
        }
        let log_format = r.string("log.format")?.unwrap_or_else(|| "text".into());
        r.check("log.format", log_format == "text" || log_format == "json")?;
        let log_level = r.string("log.level")?.unwrap_or_else(|| "info".into());
        r.check("log.level", log_level.parse::<tracing_subscriber::filter::Targets>().is_ok())?;
        let http_bind = match r.string("http.bind")?.as_deref() {
            None => Some(std::net::SocketAddr::from(([127, 0, 0, 1], 8080))),
            Some("off") => None,
            Some(s) => Some(s.parse().map_err(|_| r.error("http.bind", ""))?),
        };
        let metrics_bind = match r.string("metrics.bind")?.as_deref() {
            None | Some("off") | Some("") => None,
            Some(s) => Some(s.parse().map_err(|_| r.error("metrics.bind", ""))?),
        };
        if metrics_bind.is_some() && metrics_bind == http_bind {
            return Err(r.error("metrics.bind", "an address other than http.bind's (it serves /metrics there already)"));
        }
        let settings = Settings {
            metrics_bind,
            device,
            groups,
            data_dir: r.string("data_dir")?.map(PathBuf::from).unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            topic_prefix,
            telemetry_interval: Duration::from_secs(r.int("telemetry_interval", 1, 86_400)?.unwrap_or(30)),
            shutdown_grace: Duration::from_secs(r.int("shutdown_grace", 0, 600)?.unwrap_or(10)),
            log_json: log_format == "json",
            log_level,
            broker,
            protocol: match r.string("mqtt.version")? {
                None => Protocol::default(),
                Some(s) => s.parse().map_err(|_| r.error("mqtt.version", ""))?,
            },
            keep_alive: Duration::from_secs(r.int("mqtt.keep_alive", 5, 3600)?.unwrap_or(15)),
            max_packet_size: r.size("mqtt.max_packet_size", 64 * 1024, 256 * 1024 * 1024)?.unwrap_or(4 << 20),
            persistent_session: r.boolean("mqtt.persistent_session")?.unwrap_or(false),
            journal_max_bytes: r
                .size("mqtt.journal_max_bytes", 64 << 10, 1 << 40)?
                .unwrap_or(crate::link::journal::DEFAULT_MAX_BYTES),
            mqtt_max_inflight_bytes: r.size("mqtt.max_inflight_bytes", 1 << 20, 1 << 40)?.unwrap_or(64 << 20) as usize,
            username: r.string("mqtt.username")?.or_else(|| login.as_ref().map(|l| l.0.clone())),
            password: r.string("mqtt.password")?.or_else(|| login.as_ref().and_then(|l| l.1.clone())),
            client_id,
            reply_prefixes,
            trust,
            file_root: r.string("download.file_root")?.filter(|s| !s.is_empty()).map(PathBuf::from),
            password_file: r.string("mqtt.password_file")?.map(PathBuf::from),
            ca_file: r.string("tls.ca_file")?.map(PathBuf::from),
            client_cert: r.string("tls.client_cert")?.map(PathBuf::from),
            client_key: r.string("tls.client_key")?.map(PathBuf::from),
            http_bind,
            http_limits: crate::serve::http::Limits {
                header_timeout: Duration::from_secs(r.int("http.header_timeout", 1, 3600)?.unwrap_or(10)),
                body_timeout: Duration::from_secs(r.int("http.body_timeout", 1, 3600)?.unwrap_or(30)),
                max_connections: r.int("http.max_connections", 1, 100_000)?.unwrap_or(256) as usize,
                max_body: r.size("http.max_body", 1024, u32::MAX as u64)?.unwrap_or(64 << 20) as usize,
                max_inflight_bytes: r.size("http.max_inflight_bytes", 1 << 20, 1 << 40)?.unwrap_or(512 << 20) as usize,
            },
            workers: r.int("limits.workers", 1, 256)?.unwrap_or(crate::serve::DEFAULT_WORKERS as u64) as usize,
            max_queue: r.int("limits.max_queue", 0, 100_000)?.unwrap_or(crate::serve::DEFAULT_MAX_QUEUE as u64)
                as usize,
            store_quota: r.size("limits.store_quota", 0, u64::MAX)?.filter(|q| *q > 0),
            max_model_size: r.size("limits.max_model_size", 0, u64::MAX)?.filter(|q| *q > 0),
            validation_memory: r.size("limits.validation_memory", 0, u64::MAX)?.filter(|q| *q > 0),
            validation_timeout: Duration::from_secs(r.int("limits.validation_timeout", 1, 86_400)?.unwrap_or(120)),
            revalidate_at_start: r.boolean("limits.revalidate_at_start")?.unwrap_or(false),
            disk_reserve: r
                .size("limits.disk_reserve", 0, u64::MAX)?
                .unwrap_or(crate::deploy::pipeline::DEFAULT_DISK_RESERVE),
            breaker: crate::deploy::breaker::Policy {
                max_crashes: r.int("limits.crash_loop_max", 0, 100)?.unwrap_or(3) as u32,
                window: Duration::from_secs(r.int("limits.crash_loop_window", 1, 86_400)?.unwrap_or(600)),
            },
            download_attempts: r.int("download.attempts", 1, 100)?.unwrap_or(4) as u32,
            runtime_default: match r.string("runtime.default")? {
                None => outpost_protocol::Runtime::Auto,
                Some(s) => s.parse().map_err(|_| r.error("runtime.default", ""))?,
            },
            onnxruntime_library: r.string("runtime.onnxruntime_library")?.filter(|s| !s.is_empty()).map(PathBuf::from),
            stall_timeout: Duration::from_secs(r.int("download.stall_timeout", 1, 3600)?.unwrap_or(30)),
        };
        if settings.http_limits.max_inflight_bytes
            < settings.http_limits.max_body.saturating_mul(crate::serve::http::PARSED_FACTOR)
        {
            return Err(r.error(
                "http.max_inflight_bytes",
                "a size of at least 8 x http.max_body (a body counts 8 times its size, what it takes parsed; one of unknown length counts as http.max_body)",
            ));
        }
        if settings.client_cert.is_some() != settings.client_key.is_some() {
            let k = if settings.client_cert.is_some() { "tls.client_key" } else { "tls.client_cert" };
            return Err(ConfigError {
                origin: "configuration".into(),
                key: k.into(),
                value: "(not set)".into(),
                expected: "tls.client_cert and tls.client_key together".into(),
            });
        }
        if settings.password_file.is_some() && settings.username.is_none() {
            return Err(r.error("mqtt.password_file", "mqtt.username as well (a password without a user name)"));
        }
        Ok(settings)
    }

    /// The effective configuration as TOML with each value's origin (secrets masked).
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# effective configuration: files");
        if self.files.is_empty() {
            out.push_str(" (none)");
        }
        for f in &self.files {
            out.push_str(&format!(" {}", f.display()));
        }
        out.push_str(", then flags and environment\n");
        for k in KEYS {
            let (value, origin) = match self.entries.get(k.name) {
                Some(e) if k.secret => ("\"***\"".to_string(), e.origin.as_str()),
                Some(e) if k.name == "mqtt.broker" => {
                    (format!("{:?}", crate::sys::redact_url(e.value.as_str().unwrap_or_default())), e.origin.as_str())
                }
                Some(e) => (toml_text(&e.value), e.origin.as_str()),
                None if k.default.is_empty() => continue,
                None => (default_literal(k), "default"),
            };
            let line = format!("{} = {value}", k.name);
            out.push_str(&format!("{line:<48} # {origin}\n"));
        }
        out
    }

    /// The keys whose values differ between two loads.
    pub fn changed(&self, other: &Layers) -> Vec<&'static str> {
        KEYS.iter()
            .filter(|k| self.entries.get(k.name).map(|e| &e.value) != other.entries.get(k.name).map(|e| &e.value))
            .map(|k| k.name)
            .collect()
    }
}

impl Settings {
    /// What an operator should know about this configuration's security,
    /// said at start (log) and by `check-config`.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.trust.enforced() {
            w.push(
                "trust.keys is empty: any client that can publish on the broker can deploy to this device \
                 (configure trust.keys to accept only signed deployments)"
                    .to_string(),
            );
        }
        if !self.broker.tls && (self.username.is_some() || self.password.is_some() || self.password_file.is_some()) {
            w.push(format!(
                "a broker login over plain mqtt:// ({}): the user name and password cross the network in clear text; \
                 use mqtts://",
                self.broker
            ));
        }
        if let Some(root) = &self.file_root {
            w.push(format!(
                "download.file_root = {}: deployments may read files under it (file:// URLs)",
                root.display()
            ));
        }
        match (&self.onnxruntime_library, cfg!(feature = "onnxruntime")) {
            (Some(lib), false) => w.push(format!(
                "runtime.onnxruntime_library = {}: {}; models run on tract",
                lib.display(),
                crate::serve::backend::NOT_BUILT
            )),
            (Some(lib), true) if !lib.is_file() => w.push(format!(
                "runtime.onnxruntime_library = {}: no such file; models run on tract (onnxruntime unavailable)",
                lib.display()
            )),
            (None, _) if self.runtime_default == outpost_protocol::Runtime::Onnxruntime => w.push(
                "runtime.default = onnxruntime but runtime.onnxruntime_library is not set: models run on tract".into(),
            ),
            _ => {}
        }
        w
    }
}

/// `mqtt://USER:PASSWORD@HOST:PORT` → (`mqtt://HOST:PORT`, the login). A
/// broker URL has no path, so the login is everything before the last `@`
/// (a password may hold `/`, `?` or `@`).
fn split_login(url: &str) -> (String, Option<(String, Option<String>)>) {
    let Some((scheme, rest)) = url.split_once("://") else { return (url.to_string(), None) };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let login = match userinfo.split_once(':') {
                Some((u, p)) => (u.to_string(), Some(p.to_string())),
                None => (userinfo.to_string(), None),
            };
            (format!("{scheme}://{host}"), Some(login))
        }
        None => (url.to_string(), None),
    }
}

fn default_literal(k: &Key) -> String {
    if k.default.parse::<i64>().is_ok() || k.default == "true" || k.default == "false" || k.default.starts_with('[') {
        k.default.to_string()
    } else {
        format!("{:?}", k.default)
    }
}

fn flatten(prefix: &str, table: toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in table {
        let name = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
        match v {
            toml::Value::Table(t) => flatten(&name, t, out),
            v => out.push((name, v)),
        }
    }
}

/// The known keys of the unknown key's section (or all), for the error.
fn suggestions(unknown: &str) -> String {
    let section = unknown.rsplit_once('.').map(|(s, _)| s);
    let same: Vec<&str> =
        KEYS.iter().map(|k| k.name).filter(|n| n.rsplit_once('.').map(|(s, _)| s) == section).collect();
    let list = if same.is_empty() { KEYS.iter().map(|k| k.name).collect() } else { same };
    list.join(", ")
}

struct Resolver<'a> {
    layers: &'a Layers,
}

impl Resolver<'_> {
    fn error(&self, key: &str, expected: &str) -> ConfigError {
        let entry = self.layers.get(key);
        let secret = known(key).is_some_and(|k| k.secret);
        ConfigError {
            origin: entry.map_or_else(|| "configuration".into(), |e| e.origin.clone()),
            key: key.to_string(),
            value: match entry {
                Some(_) if secret => "\"***\"".into(),
                Some(e) if key == "mqtt.broker" => {
                    format!("{:?}", crate::sys::redact_url(e.value.as_str().unwrap_or_default()))
                }
                Some(e) => toml_text(&e.value),
                None => "(not set)".into(),
            },
            expected: if expected.is_empty() {
                known(key).map_or("", |k| k.takes).to_string()
            } else {
                expected.into()
            },
        }
    }

    fn check(&self, key: &str, ok: bool) -> Result<(), ConfigError> {
        if ok { Ok(()) } else { Err(self.error(key, "")) }
    }

    fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.layers.get(key).map(|e| &e.value) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.error(key, &format!("a string: {}", known(key).map_or("", |k| k.takes)))),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, ConfigError> {
        match self.layers.get(key).map(|e| &e.value) {
            None => Ok(Vec::new()),
            Some(toml::Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| self.error(key, "a list of strings")))
                .collect(),
            Some(toml::Value::String(s)) => Ok(vec![s.clone()]),
            Some(_) => Err(self.error(key, "a list of strings")),
        }
    }

    fn int(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, ConfigError> {
        let n = match self.layers.get(key).map(|e| &e.value) {
            None => return Ok(None),
            Some(toml::Value::Integer(i)) => u64::try_from(*i).ok(),
            Some(toml::Value::String(s)) => s.trim().parse::<u64>().ok(),
            Some(_) => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(self.error(key, "")),
        }
    }

    fn size(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, ConfigError> {
        let n = match self.layers.get(key).map(|e| &e.value) {
            None => return Ok(None),
            Some(toml::Value::Integer(i)) => u64::try_from(*i).ok(),
            Some(toml::Value::String(s)) => match crate::parse_size(s) {
                Ok(n) => Some(n),
                Err(why) => {
                    let takes = known(key).map_or("", |k| k.takes);
                    return Err(self.error(key, &format!("{takes} ({why})")));
                }
            },
            Some(_) => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(self.error(key, "")),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.layers.get(key).map(|e| &e.value) {
            None => Ok(None),
            Some(toml::Value::Boolean(b)) => Ok(Some(*b)),
            Some(toml::Value::String(s)) if s == "true" || s == "false" => Ok(Some(s == "true")),
            Some(_) => Err(self.error(key, "")),
        }
    }
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub device: String,
    pub groups: Vec<String>,
    pub data_dir: PathBuf,
    pub topic_prefix: String,
    pub telemetry_interval: Duration,
    pub shutdown_grace: Duration,
    pub log_json: bool,
    pub log_level: String,
    pub broker: BrokerUrl,
    pub protocol: Protocol,
    pub keep_alive: Duration,
    pub max_packet_size: u64,
    pub persistent_session: bool,
    pub journal_max_bytes: u64,
    pub mqtt_max_inflight_bytes: usize,
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_id: Option<String>,
    /// Topic prefixes `reply_to` may name (empty: the default namespace).
    pub reply_prefixes: Vec<String>,
    pub trust: outpost_protocol::trust::Trust,
    pub file_root: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub http_bind: Option<std::net::SocketAddr>,
    pub metrics_bind: Option<std::net::SocketAddr>,
    pub http_limits: crate::serve::http::Limits,
    pub workers: usize,
    pub max_queue: usize,
    pub store_quota: Option<u64>,
    pub max_model_size: Option<u64>,
    pub validation_memory: Option<u64>,
    pub validation_timeout: Duration,
    pub revalidate_at_start: bool,
    pub disk_reserve: u64,
    pub breaker: crate::deploy::breaker::Policy,
    pub download_attempts: u32,
    /// `runtime.default`: the engine when a manifest names none.
    pub runtime_default: outpost_protocol::Runtime,
    /// `runtime.onnxruntime_library`.
    pub onnxruntime_library: Option<PathBuf>,
    pub stall_timeout: Duration,
}

/// What SIGHUP can change in a running agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Live {
    pub telemetry_interval: Duration,
    pub shutdown_grace: Duration,
    pub workers: usize,
    pub max_queue: usize,
    pub store_quota: Option<u64>,
    pub max_model_size: Option<u64>,
    pub validation_memory: Option<u64>,
    pub validation_timeout: Duration,
    pub revalidate_at_start: bool,
    pub disk_reserve: u64,
    pub breaker: crate::deploy::breaker::Policy,
}

impl Default for Live {
    fn default() -> Live {
        Live {
            telemetry_interval: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            workers: crate::serve::DEFAULT_WORKERS,
            max_queue: crate::serve::DEFAULT_MAX_QUEUE,
            store_quota: None,
            max_model_size: None,
            validation_memory: None,
            validation_timeout: crate::deploy::pipeline::DEFAULT_VALIDATION_TIMEOUT,
            revalidate_at_start: false,
            disk_reserve: crate::deploy::pipeline::DEFAULT_DISK_RESERVE,
            breaker: Default::default(),
        }
    }
}

impl Settings {
    pub fn live(&self) -> Live {
        Live {
            telemetry_interval: self.telemetry_interval,
            shutdown_grace: self.shutdown_grace,
            workers: self.workers,
            max_queue: self.max_queue,
            store_quota: self.store_quota,
            max_model_size: self.max_model_size,
            validation_memory: self.validation_memory,
            validation_timeout: self.validation_timeout,
            revalidate_at_start: self.revalidate_at_start,
            disk_reserve: self.disk_reserve,
            breaker: self.breaker,
        }
    }
}

/// The main file: `--config`, else `OUTPOST_CONFIG`, else the default; and
/// whether it must exist (it must when named explicitly).
pub fn main_path(flag: Option<&Path>) -> (PathBuf, bool) {
    match (flag, std::env::var_os("OUTPOST_CONFIG")) {
        (Some(p), _) => (p.to_path_buf(), true),
        (None, Some(p)) if !p.is_empty() => (PathBuf::from(p), true),
        _ => (PathBuf::from(DEFAULT_PATH), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(files: &[(&str, &str)]) -> Result<Layers, ConfigError> {
        let mut l = Layers::default();
        for (name, text) in files {
            l.add_file(Path::new(name), text)?;
        }
        Ok(l)
    }

    const BASE: &str = r#"
device = "cam-17"
groups = ["cameras", "site-berlin"]
[mqtt]
broker = "mqtt://broker.lan"
password = "hunter2"
username = "cam-17"
[limits]
store_quota = "2GiB"
"#;

    #[test]
    fn drop_ins_and_flags_override_key_by_key() {
        let mut l = layers(&[
            ("agent.toml", BASE),
            ("agent.d/10-site.toml", "[mqtt]\nkeep_alive = 30\n[http]\nbind = \"off\"\n"),
            ("agent.d/20-more.toml", "mqtt.keep_alive = 45\ntelemetry_interval = 5\n"),
        ])
        .unwrap();
        l.set("telemetry_interval", toml::Value::String("7".into()), "--telemetry-interval");
        let s = l.resolve().unwrap();
        assert_eq!(s.device, "cam-17");
        assert_eq!(s.groups, ["cameras", "site-berlin"]);
        assert_eq!(s.keep_alive, Duration::from_secs(45));
        assert_eq!(s.telemetry_interval, Duration::from_secs(7));
        assert_eq!(s.http_bind, None);
        assert_eq!(s.store_quota, Some(2 << 30));
        assert_eq!(s.broker.port, 1883);
        assert_eq!(s.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(l.get("mqtt.keep_alive").unwrap().origin, "agent.d/20-more.toml:1");
        let shown = l.render();
        assert!(shown.contains("mqtt.password = \"***\""), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("# agent.d/20-more.toml:1"), "{shown}");
        assert!(shown.contains("mqtt.version = \"3.1.1\""), "{shown}");
        assert!(shown.contains("# --telemetry-interval"), "{shown}");
        // What is shown parses as TOML again.
        let reparsed: toml::Table = shown.parse().unwrap();
        assert!(reparsed.contains_key("mqtt"));
    }

    #[test]
    fn lines_inside_multi_line_strings_and_arrays_are_not_keys() {
        let doc = "[mqtt]\npassword = \"\"\"\nkeep_alive = 1\n\"\"\"\nreply_prefixes = [\n  \"keep_alive = 2\",\n]\nkeep_alive = 3\n";
        assert_eq!(line_of(doc, "mqtt.keep_alive"), Some(8));
        assert_eq!(line_of(doc, "mqtt.reply_prefixes"), Some(5));
        assert_eq!(line_of("[[x]]\nk = 1\n[mqtt]\n# keep_alive = 9\nkeep_alive = 2\n", "mqtt.keep_alive"), Some(5));
    }

    #[test]
    fn values_are_shown_as_toml_that_parses_back() {
        let doc = "s = \"a\\\"b\\\\c\\n\\u0001é\"\ni = -3\nf = 2.5\ng = 3.0\nb = true\na = [\"x\", 1]\nt = { k = 1 }\n";
        let table: toml::Table = doc.parse().unwrap();
        for (k, v) in &table {
            let shown = format!("{k} = {}", toml_text(v));
            let back: toml::Table = shown.parse().unwrap_or_else(|e| panic!("{shown}: {e}"));
            assert_eq!(&back[k], v, "{shown}");
        }
    }

    #[test]
    fn errors_name_the_key_the_value_the_source_and_what_was_expected() {
        let err =
            |extra: &str| layers(&[("agent.toml", BASE), ("x.toml", extra)]).and_then(|l| l.resolve().map(|_| ()));
        let e = err("[mqtt]\nkeep_alive = 2\n").unwrap_err();
        // The file and the line the value is on.
        assert_eq!(e.to_string(), "x.toml:2: mqtt.keep_alive = 2: expected 5 to 3600 seconds");
        let e = err("# comment\ndevice = \"d\"\n\n[mqtt]\nbroker = \"mqtt://b\"\n[mqtt.x]\n[limits]\n workers = 0\n")
            .unwrap_err();
        assert_eq!(e.to_string(), "x.toml:8: limits.workers = 0: expected 1 to 256");
        let e = err("mqtt.keep_alive = 1\n").unwrap_err();
        assert!(e.to_string().starts_with("x.toml:1: mqtt.keep_alive = 1"), "{e}");
        let e = err("[mqtt]\nkep_alive = 20\n").unwrap_err();
        assert_eq!(e.key, "mqtt.kep_alive");
        assert!(e.expected.contains("mqtt.keep_alive"), "{e}");
        let e = err("[mqtt]\nbroker = \"http://x\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "x.toml:2: mqtt.broker = \"http://x\": expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (tcp:// and ssl:// are the same)"
        );
        let e = err("[limits]\nstore_quota = \"lots\"\n").unwrap_err();
        assert!(e.to_string().starts_with("x.toml:2: limits.store_quota = \"lots\": expected a size"), "{e}");
        let e = err("device = \"a/b\"\n").unwrap_err();
        assert!(e.to_string().starts_with("x.toml:1: device = \"a/b\": expected a device id"), "{e}");
        let e = err("[http]\nbind = \"localhost\"\n").unwrap_err();
        assert!(e.to_string().contains("expected IP:PORT"), "{e}");
        let e = err("[http]\nbind = \"127.0.0.1:9000\"\n[metrics]\nbind = \"127.0.0.1:9000\"\n").unwrap_err();
        assert!(
            e.to_string().contains("metrics.bind = \"127.0.0.1:9000\": expected an address other than http.bind's"),
            "{e}"
        );
        let e = err("mqtt.persistent_session = \"yes\"\n").unwrap_err();
        assert_eq!(e.key, "mqtt.persistent_session");
        let e = err("tls.client_cert = \"c.pem\"\n").unwrap_err();
        assert_eq!(e.key, "tls.client_key");
        // A syntax error: file, line and column, and what the parser wanted
        // (it printed `x.toml:  = : expected valid TOML: ...` over lines).
        let e = err("device = \"d\"\n[mqtt]\nbroker = \n").unwrap_err();
        assert!(
            e.to_string().starts_with("x.toml:3:10: expected valid TOML (invalid string; expected `\"`, `'`)"),
            "{e}"
        );
        assert!(!e.to_string().contains('\n'), "{e}");
        let e = err("device = [\n").unwrap_err();
        assert!(e.to_string().starts_with("x.toml:"), "{e}");
        assert!(e.expected.contains("valid TOML"), "{e}");
        // A secret is masked in errors as well.
        let e = err("mqtt.password = 5\n").unwrap_err();
        assert!(!e.to_string().contains('5'), "{e}");
        let missing = layers(&[("agent.toml", "[mqtt]\nbroker = \"mqtt://b\"\n")]).unwrap().resolve().unwrap_err();
        assert_eq!(missing.key, "device");
        assert!(missing.expected.contains("--device"), "{missing}");
        // The file in use is named (OUTPOST_CONFIG / --config), not always /etc/outpost.
        assert!(missing.expected.contains("set `device` in agent.toml or pass --device"), "{missing}");
    }

    /// The configuration file the package installs documents every key, and
    /// with every line uncommented it is a valid configuration.
    #[test]
    fn the_packaged_template_documents_every_key() {
        let template = include_str!("../../packaging/agent.toml");
        let uncommented: String = template
            .lines()
            .map(|l| match l.strip_prefix('#') {
                // `#key = value`, not a comment sentence.
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase()) && rest.contains(" = ") => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let mut l = Layers::default();
        l.add_file(Path::new("agent.toml"), &uncommented).unwrap();
        for k in KEYS.iter().filter(|k| !k.secret) {
            assert!(l.get(k.name).is_some(), "packaging/agent.toml does not document {}", k.name);
        }
        l.resolve().unwrap();
    }

    #[test]
    fn files_on_disk_and_their_drop_in_directory() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("agent.toml");
        std::fs::write(&main, BASE).unwrap();
        std::fs::create_dir(dir.path().join("agent.d")).unwrap();
        std::fs::write(dir.path().join("agent.d/50-b.toml"), "telemetry_interval = 9\n").unwrap();
        std::fs::write(dir.path().join("agent.d/10-a.toml"), "telemetry_interval = 3\n").unwrap();
        std::fs::write(dir.path().join("agent.d/README"), "not toml").unwrap();
        let l = Layers::load(&main, true).unwrap();
        assert_eq!(l.files.len(), 3);
        assert_eq!(l.resolve().unwrap().telemetry_interval, Duration::from_secs(9));
        // Missing: fine for the default path, an error when named.
        assert!(Layers::load(&dir.path().join("none.toml"), false).is_ok());
        let e = Layers::load(&dir.path().join("none.toml"), true).unwrap_err();
        assert!(e.expected.contains("readable TOML file"), "{e}");
        let mut again = Layers::load(&main, true).unwrap();
        again.set("limits.workers", toml::Value::Integer(4), "--workers");
        assert_eq!(l.changed(&again), vec!["limits.workers"]);
    }
}
