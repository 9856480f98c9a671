//! `outpost`: the device daemon.

use clap::{Parser, Subcommand};
use outpost_agent::fetch::FetchConfig;
use outpost_agent::mqtt::{BrokerUrl, SessionConfig};
use outpost_agent::serve::{DEFAULT_MAX_QUEUE, DEFAULT_WORKERS};
use outpost_protocol::Topics;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use outpost_agent::EXIT_USAGE;

#[derive(Parser, Debug)]
#[command(
    name = "outpost",
    version,
    about = "Deploys ONNX models to this device from MQTT desired state and serves them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM.
    Run(Box<RunArgs>),
    /// Run a bundle through the agent's deployment checks (download, sha256
    /// and sizes, safe paths, memory, load, golden sample) in a throw-away
    /// store, without serving it. Exit 0 when the agent would serve it, 1
    /// when it would refuse it (the error code says why).
    CheckBundle(CheckArgs),
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
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// MQTT broker: mqtt://HOST[:PORT], or mqtts://HOST[:PORT] for TLS.
    #[arg(long)]
    broker: BrokerUrl,
    /// This device's id: [A-Za-z0-9_.-]{1,64}.
    #[arg(long)]
    device: String,
    /// Where models and state are stored.
    #[arg(long)]
    data_dir: PathBuf,
    /// A group this device belongs to; repeat for several (the first listed wins).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Topic prefix.
    #[arg(long, default_value = outpost_protocol::topics::DEFAULT_PREFIX)]
    topic_prefix: String,
    /// MQTT keep-alive in seconds; the broker reports the device offline after ~1.5x this.
    #[arg(long, default_value_t = 15)]
    keep_alive: u64,
    /// Largest MQTT packet sent or received (bytes, or with a unit: 4MiB).
    #[arg(long, default_value = "4MiB", value_parser = outpost_agent::parse_size)]
    max_packet_size: u64,
    /// Most disk space the model store may use (e.g. 500MB, 2GiB); 0 = only the filesystem limits it.
    /// Versions kept for rollback are evicted before a download is refused with `disk_full`.
    #[arg(long, default_value = "0", value_parser = outpost_agent::parse_size)]
    store_quota: u64,
    /// Inference worker threads.
    #[arg(long, default_value_t = DEFAULT_WORKERS)]
    workers: usize,
    /// Requests that may wait for a worker before new ones get `overloaded`.
    #[arg(long, default_value_t = DEFAULT_MAX_QUEUE)]
    max_queue: usize,
    /// Download attempts per file before a deployment fails.
    #[arg(long, default_value_t = 4)]
    download_attempts: u32,
    /// Seconds without a byte before a download counts as stalled.
    #[arg(long, default_value_t = 30)]
    stall_timeout: u64,
    /// Seconds between two telemetry reports.
    #[arg(long, default_value_t = 30)]
    telemetry_interval: u64,
    /// Address of the local Open Inference Protocol v2 HTTP endpoint; `off` disables it.
    #[arg(long, default_value = "127.0.0.1:8080", value_parser = parse_http_bind)]
    http_bind: HttpBind,
    /// PEM file of the certificate authorities trusted for HTTPS downloads and
    /// an mqtts:// broker, instead of the built-in Mozilla roots (a private CA).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for an mqtts:// broker that asks for one.
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Broker user name.
    #[arg(long)]
    username: Option<String>,
    /// File holding the broker password (first line), so it is not in the
    /// process list; or set OUTPOST_MQTT_PASSWORD.
    #[arg(long, requires = "username")]
    password_file: Option<PathBuf>,
    /// Ask the broker to keep this device's session while it is offline, so
    /// inference requests sent meanwhile are answered when it returns.
    #[arg(long)]
    persistent_session: bool,
    /// MQTT protocol: 3.1.1, or 5 to answer requests on their MQTT 5 response
    /// topic with their correlation data (falls back to 3.1.1 if the broker refuses 5).
    #[arg(long, default_value = "3.1.1")]
    mqtt_version: outpost_agent::mqtt::Protocol,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn main() -> ExitCode {
    let cli: Cli = match outpost_agent::parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let args = match cli.command {
        Command::Run(args) => *args,
        Command::CheckBundle(a) => return check_bundle(a),
    };
    init_logging(args.log_json);
    if let Err(msg) = check(&args) {
        eprintln!("outpost: {msg}");
        return ExitCode::from(EXIT_USAGE);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (roots, tls, credentials) = match security(&args) {
        Ok(s) => s,
        Err(msg) => {
            eprintln!("outpost: {msg}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let config = outpost_agent::Config {
        device: args.device.clone(),
        groups: args.groups.clone(),
        data_dir: args.data_dir.clone(),
        topics: Topics::new(args.topic_prefix.clone()),
        session: SessionConfig {
            broker: args.broker.clone(),
            client_id: format!("outpost-{}", args.device),
            keep_alive: Duration::from_secs(args.keep_alive),
            max_packet_size: args.max_packet_size as usize,
            tls,
            credentials,
            persistent_session: args.persistent_session,
            protocol: args.mqtt_version,
        },
        fetch: FetchConfig {
            attempts: args.download_attempts,
            stall_timeout: Duration::from_secs(args.stall_timeout),
            roots,
            ..FetchConfig::default()
        },
        workers: args.workers,
        max_queue: args.max_queue,
        http_bind: args.http_bind.0,
        store_quota: (args.store_quota > 0).then_some(args.store_quota),
        telemetry_interval: Duration::from_secs(args.telemetry_interval),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outpost: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(outpost_agent::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_bundle(a: CheckArgs) -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let roots = match a.ca_file.as_deref().map(outpost_agent::fetch::load_certs).transpose() {
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
    let fetch = FetchConfig { roots, ..FetchConfig::default() };
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
    Option<outpost_agent::mqtt::Credentials>,
);

/// CA file, TLS client configuration and broker login from the flags.
fn security(a: &RunArgs) -> Result<Security, String> {
    use outpost_agent::fetch::{load_certs, load_key};
    let roots = a.ca_file.as_deref().map(load_certs).transpose().map_err(|m| format!("--ca-file {m}"))?;
    let client = match (&a.client_cert, &a.client_key) {
        (Some(c), Some(k)) => Some((
            load_certs(c).map_err(|m| format!("--client-cert {m}"))?,
            load_key(k).map_err(|m| format!("--client-key {m}"))?,
        )),
        _ => None,
    };
    let tls = if a.broker.tls {
        Some(outpost_agent::mqtt::tls_config(roots.as_deref(), client)?)
    } else if client.is_some() {
        return Err("--client-cert: only for an mqtts:// broker".into());
    } else {
        None
    };
    let credentials = match &a.username {
        None => None,
        Some(username) => {
            let password = match (&a.password_file, std::env::var("OUTPOST_MQTT_PASSWORD")) {
                (Some(f), _) => std::fs::read_to_string(f)
                    .map_err(|e| format!("--password-file {}: cannot read it: {e}", f.display()))?
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string(),
                (None, Ok(p)) => p,
                (None, Err(_)) => String::new(),
            };
            Some(outpost_agent::mqtt::Credentials { username: username.clone(), password })
        }
    };
    Ok((roots, tls, credentials))
}

#[derive(Debug, Clone, Copy)]
struct HttpBind(Option<std::net::SocketAddr>);

fn parse_http_bind(s: &str) -> Result<HttpBind, String> {
    if s == "off" {
        return Ok(HttpBind(None));
    }
    s.parse().map(|a| HttpBind(Some(a))).map_err(|_| format!("'{s}': expected IP:PORT (e.g. 127.0.0.1:8080) or off"))
}

fn check(a: &RunArgs) -> Result<(), String> {
    outpost_protocol::topics::validate_name("--device", &a.device).map_err(|e| e.to_string())?;
    for g in &a.groups {
        outpost_protocol::topics::validate_name("--group", g).map_err(|e| e.to_string())?;
    }
    if a.topic_prefix.is_empty() || a.topic_prefix.contains(['+', '#']) || a.topic_prefix.ends_with('/') {
        return Err(format!(
            "--topic-prefix: expected a topic without wildcards or trailing '/', found '{}'",
            a.topic_prefix
        ));
    }
    if !(5..=3600).contains(&a.keep_alive) {
        return Err(format!("--keep-alive: expected 5 to 3600 seconds, found {}", a.keep_alive));
    }
    if !(1..=256).contains(&a.workers) {
        return Err(format!("--workers: expected 1 to 256, found {}", a.workers));
    }
    if a.max_packet_size < 64 * 1024 || a.max_packet_size > 256 * 1024 * 1024 {
        return Err(format!("--max-packet-size: expected 65536 to 268435456 bytes, found {}", a.max_packet_size));
    }
    if !(1..=86_400).contains(&a.telemetry_interval) {
        return Err(format!("--telemetry-interval: expected 1 to 86400 seconds, found {}", a.telemetry_interval));
    }
    if a.download_attempts == 0 {
        return Err("--download-attempts: expected at least 1, found 0".into());
    }
    Ok(())
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
