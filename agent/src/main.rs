//! `outpost`: the device daemon.

use clap::{Parser, Subcommand};
use outpost_agent::config::{Layers, Settings};
use outpost_agent::deploy::fetch::FetchConfig;
use outpost_agent::link::SessionConfig;
use outpost_protocol::Topics;
use std::path::PathBuf;
use std::process::ExitCode;

use outpost_agent::EXIT_USAGE;

/// The system allocator; in the isolated validation child, a refused
/// allocation ends the child with a code the agent reports (see `sys::alloc`).
#[global_allocator]
static ALLOCATOR: outpost_agent::sys::alloc::Allocator = outpost_agent::sys::alloc::Allocator;

/// The version, and the optional features this binary was built with.
#[cfg(feature = "multithread")]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (features: multithread)");
#[cfg(not(feature = "multithread"))]
const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Parser, Debug)]
#[command(
    name = "outpost",
    version = VERSION,
    about = "Deploys ONNX models to this device from MQTT desired state and serves them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM (SIGHUP reloads the configuration).
    Run(Box<RunArgs>),
    /// Check the configuration (files, drop-ins, flags, certificate and
    /// password files) and print the effective values with where each was
    /// set, secrets masked. Exit 0 when valid, 64 naming the key, the value
    /// and what was expected.
    CheckConfig(Box<RunArgs>),
    /// Run a bundle through the agent's deployment checks (download, sha256
    /// and sizes, safe paths, memory, load, golden sample) in a throw-away
    /// store, without serving it. Exit 0 when the agent would serve it, 1
    /// when it would refuse it (the error code says why).
    CheckBundle(CheckArgs),
    /// Internal: the isolated first load and golden sample of a stored
    /// version, run by the agent itself as a child process.
    #[command(hide = true, name = "validate-model")]
    ValidateModel(ValidateArgs),
}

#[derive(clap::Args, Debug)]
struct ValidateArgs {
    /// The stored version's directory (already verified).
    dir: PathBuf,
    /// The manifest sha256 of the deployment being validated.
    #[arg(long)]
    manifest_sha256: String,
    /// Most memory the validation may allocate, in bytes (RLIMIT_DATA).
    #[arg(long)]
    memory_limit: Option<u64>,
    /// The agent's pid: the validation stops if its parent is another process.
    #[arg(long)]
    parent_pid: Option<u32>,
    /// The agent's runtime.default (auto, tract or onnxruntime).
    #[arg(long, default_value = "auto")]
    runtime_default: outpost_protocol::Runtime,
    /// The agent's runtime.onnxruntime_library.
    #[arg(long)]
    onnxruntime_library: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// The bundle: a manifest.json (or its directory) or a manifest URL (http, https, file).
    bundle: String,
    /// The manifest sha256 a deployment would carry (default: computed from the manifest).
    #[arg(long)]
    sha256: Option<String>,
    /// PEM file of the CAs trusted for an https:// registry.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// libonnxruntime.so to check ONNX Runtime with, as runtime.onnxruntime_library would (default: tract only).
    #[arg(long)]
    onnxruntime_library: Option<PathBuf>,
}

/// Flags of `run` and `check-config`. Each sets the configuration key named
/// in its help and wins over the configuration files.
#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    /// Main configuration file (default: $OUTPOST_CONFIG, else /etc/outpost/agent.toml;
    /// drop-ins are read from agent.d/*.toml next to it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// [mqtt.broker] MQTT broker: mqtt://HOST[:PORT] (port 1883; tcp:// is the same), or
    /// mqtts://HOST[:PORT] for TLS (port 8883; ssl:// is the same).
    #[arg(long)]
    broker: Option<String>,
    /// [device] This device's id: [A-Za-z0-9_.-]{1,64}.
    #[arg(long)]
    device: Option<String>,
    /// [data_dir] Where models and state are stored (default /var/lib/outpost).
    #[arg(long)]
    data_dir: Option<String>,
    /// [groups] A group this device belongs to; repeat for several (the first listed wins).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// [topic_prefix] Topic prefix (default outpost).
    #[arg(long)]
    topic_prefix: Option<String>,
    /// [mqtt.keep_alive] MQTT keep-alive in seconds (default 15); the broker reports the device offline after ~1.5x this.
    #[arg(long)]
    keep_alive: Option<String>,
    /// [mqtt.max_packet_size] Largest MQTT packet sent or received (default 4MiB).
    #[arg(long)]
    max_packet_size: Option<String>,
    /// [limits.store_quota] Most disk space the model store may use (e.g. 500MB, 2GiB); 0 = only the filesystem limits it.
    #[arg(long)]
    store_quota: Option<String>,
    /// [limits.max_model_size] Largest bundle (sum of its files) the agent accepts (e.g. 500MB); 0 = no limit.
    #[arg(long)]
    max_model_size: Option<String>,
    /// [limits.workers] Inference worker threads (default 2).
    #[arg(long)]
    workers: Option<String>,
    /// [limits.max_queue] Requests that may wait for a worker before new ones get `overloaded` (default 64).
    #[arg(long)]
    max_queue: Option<String>,
    /// [download.attempts] Download attempts per file before a deployment fails (default 4).
    #[arg(long)]
    download_attempts: Option<String>,
    /// [download.stall_timeout] Seconds without a byte before a download counts as stalled (default 30).
    #[arg(long)]
    stall_timeout: Option<String>,
    /// [telemetry_interval] Seconds between two telemetry reports (default 30).
    #[arg(long)]
    telemetry_interval: Option<String>,
    /// [shutdown_grace] Seconds requests in flight get to finish on SIGTERM (default 10).
    #[arg(long)]
    shutdown_grace: Option<String>,
    /// [http.bind] Address of the local Open Inference Protocol v2 endpoint (default 127.0.0.1:8080); `off` disables it.
    #[arg(long)]
    http_bind: Option<String>,
    /// [tls.ca_file] PEM file of the certificate authorities trusted for HTTPS downloads and
    /// an mqtts:// broker, instead of the system's CA bundle (a private CA).
    #[arg(long)]
    ca_file: Option<String>,
    /// [tls.client_cert] PEM client certificate (chain) for an mqtts:// broker that asks for one.
    #[arg(long)]
    client_cert: Option<String>,
    /// [tls.client_key] PEM private key of --client-cert.
    #[arg(long)]
    client_key: Option<String>,
    /// [mqtt.username] Broker user name.
    #[arg(long)]
    username: Option<String>,
    /// [mqtt.password_file] File holding the broker password (first line), so it is not in the
    /// process list; or set OUTPOST_MQTT_PASSWORD ([mqtt.password]).
    #[arg(long)]
    password_file: Option<String>,
    /// [mqtt.client_id] MQTT client id (default outpost-DEVICE).
    #[arg(long)]
    client_id: Option<String>,
    /// [mqtt.reply_prefixes] A topic prefix (ending in '/') that a request's reply_to may name; repeat for
    /// several (default TOPIC_PREFIX/replies/). Answers to other topics are refused.
    #[arg(long = "reply-prefix")]
    reply_prefixes: Vec<String>,
    /// [trust.keys] An ed25519 public key this device trusts to sign deployments: a PEM file or
    /// ed25519:<base64>; repeat for several. With keys, unsigned deployments are refused.
    #[arg(long = "trust-key")]
    trust_keys: Vec<String>,
    /// [mqtt.persistent_session] Ask the broker to keep this device's session while it is offline, so
    /// inference requests sent meanwhile are answered when it returns.
    #[arg(long)]
    persistent_session: bool,
    /// Sets any configuration key, e.g. --set limits.validation_timeout=300 or --set http.max_body=16MiB (repeatable; wins over the files).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// [mqtt.version] MQTT protocol: 3.1.1 (default), or 5 to answer requests on their MQTT 5 response
    /// topic with their correlation data (falls back to 3.1.1 if the broker refuses 5).
    #[arg(long)]
    mqtt_version: Option<String>,
    /// [log.format] text (default) or json.
    #[arg(long)]
    log_format: Option<String>,
    /// Same as --log-format json.
    #[arg(long)]
    log_json: bool,
    /// [log.level] Log filter, e.g. info or info,outpost_agent=debug (wins over OUTPOST_LOG, which wins over the files).
    #[arg(long)]
    log_level: Option<String>,
}

impl RunArgs {
    /// The configuration: files, then the environment, then these flags.
    fn layers(&self) -> Result<Layers, outpost_agent::config::ConfigError> {
        let (path, required) = outpost_agent::config::main_path(self.config.as_deref());
        let mut l = Layers::load(&path, required)?;
        let s = |v: &str| toml::Value::String(v.to_string());
        if let Ok(p) = std::env::var("OUTPOST_MQTT_PASSWORD") {
            l.set("mqtt.password", s(&p), "OUTPOST_MQTT_PASSWORD");
        }
        if let Ok(level) = std::env::var("OUTPOST_LOG") {
            l.set("log.level", s(&level), "OUTPOST_LOG");
        }
        // Each flag is the one `config::KEYS` names for its key (a test checks
        // that every one of those is a flag of `outpost run`).
        let flags: [(&str, &Option<String>); 23] = [
            ("mqtt.broker", &self.broker),
            ("device", &self.device),
            ("data_dir", &self.data_dir),
            ("topic_prefix", &self.topic_prefix),
            ("mqtt.keep_alive", &self.keep_alive),
            ("mqtt.max_packet_size", &self.max_packet_size),
            ("limits.store_quota", &self.store_quota),
            ("limits.max_model_size", &self.max_model_size),
            ("limits.workers", &self.workers),
            ("limits.max_queue", &self.max_queue),
            ("download.attempts", &self.download_attempts),
            ("download.stall_timeout", &self.stall_timeout),
            ("telemetry_interval", &self.telemetry_interval),
            ("shutdown_grace", &self.shutdown_grace),
            ("http.bind", &self.http_bind),
            ("tls.ca_file", &self.ca_file),
            ("tls.client_cert", &self.client_cert),
            ("tls.client_key", &self.client_key),
            ("mqtt.username", &self.username),
            ("mqtt.password_file", &self.password_file),
            ("mqtt.client_id", &self.client_id),
            ("mqtt.version", &self.mqtt_version),
            ("log.format", &self.log_format),
        ];
        for (key, value) in flags {
            if let Some(v) = value {
                let flag = outpost_agent::config::KEYS.iter().find(|k| k.name == key).map_or(key, |k| k.flag);
                l.set_text(key, v, flag)?;
            }
        }
        for kv in &self.set {
            let Some((key, v)) = kv.split_once('=') else {
                return Err(outpost_agent::config::ConfigError {
                    origin: "--set".into(),
                    key: kv.clone(),
                    value: String::new(),
                    expected: "KEY=VALUE, e.g. --set http.max_body=16MiB".into(),
                });
            };
            l.set_text(key.trim(), v.trim(), "--set")?;
        }
        if let Some(v) = &self.log_level {
            l.set("log.level", s(v), "--log-level");
        }
        if self.log_json {
            l.set("log.format", s("json"), "--log-json");
        }
        for (key, flag, values) in [
            ("groups", "--group", &self.groups),
            ("mqtt.reply_prefixes", "--reply-prefix", &self.reply_prefixes),
            ("trust.keys", "--trust-key", &self.trust_keys),
        ] {
            if !values.is_empty() {
                l.set(key, toml::Value::Array(values.iter().map(|g| s(g)).collect()), flag);
            }
        }
        if self.persistent_session {
            l.set("mqtt.persistent_session", toml::Value::Boolean(true), "--persistent-session");
        }
        Ok(l)
    }
}

fn main() -> ExitCode {
    let cli: Cli = match outpost_agent::parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let args = match cli.command {
        Command::Run(args) => *args,
        Command::CheckBundle(a) => return check_bundle(a),
        Command::CheckConfig(args) => return check_config(&args),
        Command::ValidateModel(a) => {
            outpost_agent::serve::backend::configure(outpost_agent::serve::backend::Runtimes {
                default: a.runtime_default,
                onnxruntime_library: a.onnxruntime_library,
            });
            return ExitCode::from(outpost_agent::deploy::isolate::child(
                &a.dir,
                &a.manifest_sha256,
                a.memory_limit,
                a.parent_pid,
            ));
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    outpost_agent::sys::alloc::keep_large_buffers();
    let (layers, settings, config) = match configure(&args) {
        Ok(c) => c,
        Err(msg) => {
            fatal(&msg);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let log = init_logging(settings.log_json, &settings.log_level);
    for w in settings.warnings() {
        tracing::warn!("{w}");
    }
    // The library is opened later, by the first validation child that uses
    // it (a library that crashes while loading ends that child, not the agent).
    outpost_agent::serve::backend::configure(outpost_agent::serve::backend::Runtimes {
        default: settings.runtime_default,
        onnxruntime_library: settings.onnxruntime_library.clone(),
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outpost: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (live_tx, live_rx) = tokio::sync::mpsc::unbounded_channel();
    runtime.spawn(reload_on_sighup(args, layers, settings, log, live_tx));
    let shutdown = {
        let _inside = runtime.enter();
        shutdown_signal()
    };
    let ran = runtime.block_on(outpost_agent::run(config, shutdown, live_rx));
    // A model load or an inference still running on a blocking thread past
    // the grace period is not waited for.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            fatal(&e.to_string());
            // A setting that can never work (an address this host does not
            // have, a port it may not bind) stops the unit like any other
            // configuration error instead of restarting it every 2 s.
            if e.is_configuration() { ExitCode::from(EXIT_USAGE) } else { ExitCode::FAILURE }
        }
    }
}

/// Why the agent stops, on stderr; under journald as an error (`<3>`), so
/// `journalctl -p warning` shows it beside the warnings before it.
fn fatal(message: &str) {
    let prefix = if outpost_agent::sys::journald::stderr_is_journal() { "<3>" } else { "" };
    for line in message.lines() {
        eprintln!("{prefix}outpost: {line}");
    }
}

/// Files + flags -> settings -> the agent's configuration (certificates and
/// password files read): every error names the key to fix.
fn configure(args: &RunArgs) -> Result<(Layers, Settings, outpost_agent::Config), String> {
    let layers = args.layers().map_err(|e| e.to_string())?;
    let settings = layers.resolve().map_err(|e| e.to_string())?;
    let config = agent_config(&settings)?;
    Ok((layers, settings, config))
}

fn check_config(args: &RunArgs) -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match configure(args) {
        Ok((layers, settings, _)) => {
            print!("{}", layers.render());
            for w in settings.warnings() {
                println!("# WARNING: {w}");
            }
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("outpost: {msg}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn agent_config(s: &Settings) -> Result<outpost_agent::Config, String> {
    let (roots, tls, credentials) = security(s)?;
    Ok(outpost_agent::Config {
        device: s.device.clone(),
        groups: s.groups.clone(),
        data_dir: s.data_dir.clone(),
        topics: Topics::new(s.topic_prefix.clone()),
        session: SessionConfig {
            broker: s.broker.clone(),
            client_id: s.client_id.clone().unwrap_or_else(|| format!("outpost-{}", s.device)),
            keep_alive: s.keep_alive,
            max_packet_size: s.max_packet_size as usize,
            tls,
            credentials,
            persistent_session: s.persistent_session,
            read_oversize: false,
            protocol: s.protocol,
        },
        fetch: FetchConfig {
            attempts: s.download_attempts,
            stall_timeout: s.stall_timeout,
            roots,
            file_root: s.file_root.clone(),
            ..FetchConfig::default()
        },
        trust: s.trust.clone(),
        reply_prefixes: if s.reply_prefixes.is_empty() {
            vec![format!("{}/replies/", s.topic_prefix)]
        } else {
            s.reply_prefixes.clone()
        },
        http_bind: s.http_bind,
        metrics_bind: s.metrics_bind,
        http_limits: s.http_limits,
        mqtt_max_inflight_bytes: s.mqtt_max_inflight_bytes,
        journal_max_bytes: s.journal_max_bytes,
        live: s.live(),
        isolation: outpost_agent::deploy::isolate::Isolation::this_binary(),
    })
}

/// SIGHUP: reads the configuration again and applies what can change
/// without a restart (log level, telemetry interval, limits, shutdown
/// grace); other changes are named in the log as needing a restart. A bad
/// configuration is refused whole, and the running one stays.
async fn reload_on_sighup(
    args: RunArgs,
    mut layers: Layers,
    mut settings: Settings,
    log: LogHandle,
    live: tokio::sync::mpsc::UnboundedSender<outpost_agent::config::Live>,
) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        outpost_agent::sys::systemd::reloading();
        let (new_layers, new_settings) = match configure(&args) {
            Ok((l, s, _)) => (l, s),
            Err(msg) => {
                tracing::error!("configuration not reloaded, the running one stays: {msg}");
                outpost_agent::sys::systemd::ready("configuration reload refused; running as before");
                continue;
            }
        };
        let changed = layers.changed(&new_layers);
        let (now, later): (Vec<&str>, Vec<&str>) =
            changed.iter().partition(|k| outpost_agent::config::KEYS.iter().any(|x| x.name == **k && x.reloadable));
        if new_settings.log_level != settings.log_level
            && let Ok(filter) = new_settings.log_level.parse::<tracing_subscriber::filter::Targets>()
        {
            let _ = log.modify(|f| *f = filter);
        }
        let _ = live.send(new_settings.live());
        if !later.is_empty() {
            tracing::warn!(keys = ?later, "changed in the configuration, applies after a restart");
        }
        tracing::info!(applied = ?now, "configuration reloaded");
        (layers, settings) = (new_layers, new_settings);
        outpost_agent::sys::systemd::ready("configuration reloaded");
    }
}

fn check_bundle(a: CheckArgs) -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    outpost_agent::serve::backend::configure(outpost_agent::serve::backend::Runtimes {
        default: outpost_protocol::Runtime::Auto,
        onnxruntime_library: a.onnxruntime_library.clone(),
    });
    let roots = match a.ca_file.as_deref().map(outpost_agent::sys::tls::load_certs).transpose() {
        Ok(r) => r,
        Err(m) => {
            eprintln!("outpost: --ca-file {m}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let url = match outpost_agent::check::manifest_url(&a.bundle) {
        Ok(u) => u,
        Err(m) => {
            eprintln!("outpost: {m}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outpost: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("checking {url}");
    // The operator names the bundle on the command line: local files are theirs to read.
    let fetch = FetchConfig { roots, file_root: Some("/".into()), ..FetchConfig::default() };
    match runtime.block_on(outpost_agent::check::check_bundle(&url, a.sha256, fetch)) {
        Ok(report) => {
            println!("ok: the agent would serve {report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("refused: {}: {}", e.code, e.message);
            ExitCode::FAILURE
        }
    }
}

type Security = (
    Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
    Option<std::sync::Arc<rustls::ClientConfig>>,
    Option<outpost_agent::link::Credentials>,
);

/// CA file, TLS client configuration and broker login.
fn security(s: &Settings) -> Result<Security, String> {
    use outpost_agent::sys::tls::{load_certs, load_key};
    let roots = s.ca_file.as_deref().map(load_certs).transpose().map_err(|m| format!("tls.ca_file: {m}"))?;
    let client = match (&s.client_cert, &s.client_key) {
        (Some(c), Some(k)) => Some((
            load_certs(c).map_err(|m| format!("tls.client_cert: {m}"))?,
            load_key(k).map_err(|m| format!("tls.client_key: {m}"))?,
        )),
        _ => None,
    };
    let tls = if s.broker.tls {
        Some(outpost_agent::link::tls_config(roots.as_deref(), client)?)
    } else if client.is_some() {
        return Err("tls.client_cert: only for an mqtts:// broker".into());
    } else {
        None
    };
    let credentials = match &s.username {
        None => None,
        Some(username) => {
            let password = match (&s.password_file, &s.password) {
                (Some(f), _) => std::fs::read_to_string(f)
                    .map_err(|e| format!("mqtt.password_file = {}: cannot read it: {e}", f.display()))?
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string(),
                (None, Some(p)) => p.clone(),
                (None, None) => String::new(),
            };
            Some(outpost_agent::link::Credentials { username: username.clone(), password })
        }
    };
    Ok((roots, tls, credentials))
}

type LogHandle = tracing_subscriber::reload::Handle<tracing_subscriber::filter::Targets, tracing_subscriber::Registry>;

/// Logs to stderr: plain text without colours unless stderr is a terminal,
/// and without timestamps under systemd (the journal adds its own); or JSON
/// lines. The filter can be changed at run time (SIGHUP).
fn init_logging(json: bool, level: &str) -> LogHandle {
    use outpost_agent::sys::journald::Prioritised;
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let filter: tracing_subscriber::filter::Targets =
        level.parse().unwrap_or_else(|_| tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    // Under systemd: `<N>` priorities for journald, no timestamps (the
    // journal adds its own).
    let journald = outpost_agent::sys::journald::stderr_is_journal();
    if json {
        let format = tracing_subscriber::fmt::format().json();
        let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        if journald {
            registry.with(layer.json().event_format(Prioritised(format))).init();
        } else {
            registry.with(layer.json().event_format(format)).init();
        }
    } else {
        // Colours only on a terminal: on the layer (span fields) and the format.
        let ansi = std::io::stderr().is_terminal();
        let format = tracing_subscriber::fmt::format().with_target(false).with_ansi(ansi);
        let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
        if journald {
            registry.with(layer.event_format(Prioritised(format.without_time()))).init();
        } else {
            registry.with(layer.event_format(format)).init();
        }
    }
    handle
}

/// SIGTERM or SIGINT. The handlers are installed now (inside the runtime),
/// not when the future is first polled: a stop during start-up (while the
/// stored model loads) is a clean stop too, not a kill.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                one.recv().await;
            }
            (Err(_), Err(_)) => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// `outpost --help` and each subcommand's say what every flag does
    /// (the hidden `validate-model` too: it shows up in process lists).
    #[test]
    fn every_subcommand_and_argument_has_help() {
        let missing = outpost_agent::without_help(&Cli::command());
        assert!(missing.is_empty(), "without help text: {missing:?}");
    }

    /// Every configuration key's flag, as `config::KEYS` names it (in
    /// check-config's origins and in errors), is a flag of `outpost run`.
    #[test]
    fn every_keys_flag_is_a_flag_of_outpost_run() {
        let cli = Cli::command();
        let run = cli.find_subcommand("run").expect("a run subcommand");
        let longs: Vec<&str> = run.get_arguments().filter_map(|a| a.get_long()).collect();
        // (mqtt.password has an environment variable instead: no secret on a command line.)
        assert!(longs.contains(&"set"), "--set KEY=VALUE sets the keys without a flag of their own");
        for k in outpost_agent::config::KEYS.iter().filter(|k| k.flag.starts_with("--") && k.flag != "--set") {
            let flag = k.flag.trim_start_matches("--");
            assert!(longs.contains(&flag), "{}: {} is not a flag of `outpost run` ({longs:?})", k.name, k.flag);
        }
    }
}
