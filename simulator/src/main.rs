//! `outpost-sim`: register models, serve a registry and broker, deploy, infer, demo.

use clap::{Parser, Subcommand};
use outpost_agent::link::BrokerUrl;
use outpost_protocol::trust::Target;
use outpost_protocol::{Phase, Topics};
use outpost_sim::operator::{self, Operator};
use outpost_sim::registry::{RegisterSpec, register};
use outpost_sim::signing::{self, Signer};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use outpost_agent::EXIT_USAGE;
/// A deployment that failed on a device (or was rolled back there), a
/// command that failed.
const EXIT_FAILED: u8 = 1;
/// `deploy --wait`: a device did not apply the deployment (shadowed by a
/// desired state of higher precedence, its version quarantined, superseded,
/// withdrawn).
const EXIT_NOT_APPLIED: u8 = 3;
/// Could not reach the broker or registry, or timed out.
const EXIT_UNAVAILABLE: u8 = 69;

/// `deploy --help`: what its exit status means (README.md, "Exit codes", says the same).
const DEPLOY_EXIT_CODES: &str = "\
Exit codes:
  0   published (without --wait); with --wait, every device serves this deployment:
      `active`, or `unchanged` because it already served exactly this deployment
  1   a device failed the deployment or rolled it back (`failed`, `rolled_back`)
  3   a device did not apply it: `unchanged` because a desired state of higher
      precedence shadows it or its version is quarantined, `superseded`, `undeployed`
  64  usage: a bad flag, or a key, certificate or TLS file that cannot be used;
      a --revision not above the one the topic holds (nothing is published)
  69  unavailable: the broker or registry cannot be reached, or not every device
      finished within --timeout (the retained desired state stays published)
  A version the registry does not have (HTTP 4xx) or a file that is not a
  manifest is a usage error (64). With several devices (--group --expect N),
  1 wins over 69, and 69 over 3; verdicts that arrived before a timeout are
  printed.";

/// `status --help`: brokers that need something of the operator.
const STATUS_NOTES: &str = "\
Rows are built from retained `state` and `availability` at once, and from
`telemetry` (p99, error rate, requests/s, shadow agreement) as it comes. Last
seen counts live messages only: a retained one may be of any age.

RabbitMQ: a retained message reaches only a subscription on its exact topic,
and `+` does not match a dotted device id; without --device the view
subscribes to outpost/devices/+/..., so give --device for each device there
(exact topics) to see its state and availability.

Exit codes: 0 printed (or Ctrl-C with --watch); 64 usage; 69 the broker cannot
be reached.";

/// `rollout --help`: what a run judges and what its exit status means (README.md, "Staged rollouts").
const ROLLOUT_HELP: &str = "\
Failed devices: a stage device that fails, rolls back or does not apply the candidate,
refuses a signature on the slot, is not active within --timeout, or goes offline after it
moved and is not back on the same deployment within --offline-grace. Within --max-failed
they go back to the previous version and the stage goes on. Breaches: a failure past
--max-failed, or soak figures (the devices' and the stage's) past --max-error-rate /
--max-p99-ratio / --min-agreement, or limits set and no figure to judge them by. Offline
devices are passed over when a stage picks its devices (the group's desired state reaches
them at the end). A device with its own desired state is left out. Devices without
enough traffic are not judged on figures, and the report says so.

Exit codes:
  0   every stage passed and every online member serves the group's new desired state;
      with --abort: the devices moved are back on the previous version
  1   a stage breached: it halted and the devices moved went back to the previous version
      (the reason is printed and kept in the record); a device failed the group's
      deployment at the end; another run's --abort stopped this one or took it over
  64  usage: a bad flag, key or file; a version the registry does not have; a rollout
      already running for the group and slot (--resume or --abort it); nothing to resume;
      a record refused (another group or slot, inconsistent, not signed by --sign-key);
      with --sign-key, a group deployment signed by neither it nor a --trust-key
  69  unavailable: the broker or registry cannot be reached (a running rollout stays
      recorded: --resume it), or devices did not confirm their last move within --timeout
      (the rollout itself ended: the report lists them)";

#[derive(Parser, Debug)]
#[command(name = "outpost-sim", version, about = "Outpost's operator side and lab")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How the operator reaches an `mqtts://` broker that wants client
/// certificates (packaging/mosquitto/).
#[derive(clap::Args, Debug, Clone)]
struct TlsArgs {
    /// CA certificates (PEM) trusted for the broker's certificate (default: the system's).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM), e.g. the operator's (CN operator).
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
}

impl TlsArgs {
    fn config(&self, broker: &BrokerUrl) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, String> {
        use outpost_agent::sys::tls::{load_certs, load_key};
        if !broker.tls {
            if self.ca_file.is_some() || self.client_cert.is_some() {
                return Err("--ca-file/--client-cert need an mqtts:// broker".into());
            }
            return Ok(None);
        }
        let roots = self.ca_file.as_deref().map(load_certs).transpose()?;
        let client = match (&self.client_cert, &self.client_key) {
            (Some(c), Some(k)) => Some((load_certs(c)?, load_key(k)?)),
            _ => None,
        };
        outpost_agent::link::tls_config(roots.as_deref(), client).map(Some)
    }

    async fn connect(&self, broker: &BrokerUrl, client_id: &str) -> Result<Operator, (u8, String)> {
        let tls = self.config(broker).map_err(|e| (EXIT_USAGE, e))?;
        Operator::connect_tls(broker, client_id, Topics::default(), true, tls).await.map_err(|e| (EXIT_UNAVAILABLE, e))
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Register an ONNX model as NAME/VERSION in a registry directory.
    Register {
        /// The ONNX model file.
        model: PathBuf,
        /// Model name ([A-Za-z0-9_.-]), as deployments and requests name it.
        #[arg(long)]
        name: String,
        /// Version ([A-Za-z0-9_.-]); versions are immutable, register a new one instead of rewriting.
        #[arg(long)]
        version: String,
        /// Registry directory the version is written under (NAME/VERSION/manifest.json and files).
        #[arg(long)]
        registry: PathBuf,
        /// Labels file, one class per line: answers include the top-k labels.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Golden sample input (an Open Inference Protocol request); default: a deterministic one.
        #[arg(long)]
        sample: Option<PathBuf>,
        /// Fix an input's shape, e.g. --shape images=1,3,320,320 (-1 keeps a dimension dynamic).
        #[arg(long = "shape", value_parser = parse_shape)]
        shapes: Vec<(String, Vec<i64>)>,
        /// Largest allowed |difference| when the device reproduces the golden sample.
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f64,
        /// How many of the most probable labels answers carry (with --labels).
        #[arg(long, default_value_t = 3)]
        top_k: usize,
        /// Multiply the first input by this on the device before the model sees it.
        #[arg(long)]
        scale: Option<f64>,
        /// The manifest's model.runtime: auto, tract or onnxruntime (default: unset, the device's runtime.default).
        /// With onnxruntime (or a model tract cannot read) ONNX Runtime reads the model and computes the golden sample.
        #[arg(long)]
        runtime: Option<outpost_protocol::Runtime>,
        /// libonnxruntime.so to run models on (default: $OUTPOST_ONNXRUNTIME_LIBRARY).
        #[arg(long)]
        onnxruntime_library: Option<PathBuf>,
    },
    /// Run an embedded MQTT broker and a static HTTP server for a registry until Ctrl-C.
    Serve {
        /// TCP port of the MQTT broker (0: any free port).
        #[arg(long, default_value_t = 1883)]
        mqtt_port: u16,
        /// TCP port of the registry's HTTP server (0: any free port).
        #[arg(long, default_value_t = 8000)]
        http_port: u16,
        /// Registry directory to serve (created if missing).
        #[arg(long, default_value = "registry")]
        registry: PathBuf,
        /// Address to bind both servers to.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
    },
    /// Publish the retained desired state for a device or group.
    ///
    /// Looks the version up in the registry (its manifest's sha256 goes into
    /// the deployment), publishes it retained on
    /// outpost/devices/DEVICE/desired or outpost/groups/GROUP/desired, and
    /// with --wait follows the devices' events until each one finished.
    #[command(after_help = DEPLOY_EXIT_CODES)]
    Deploy {
        /// MQTT broker: mqtt://HOST[:PORT] (port 1883; tcp:// is the same) or mqtts://HOST[:PORT]
        /// for TLS (port 8883; ssl:// is the same).
        #[arg(long)]
        broker: BrokerUrl,
        /// The device to deploy to (its own desired topic, which outranks its groups').
        #[arg(long, conflicts_with = "group", required_unless_present = "group")]
        device: Option<String>,
        /// The group to deploy to (every device started with --group GROUP).
        #[arg(long)]
        group: Option<String>,
        /// The registered model version to deploy, as NAME@VERSION.
        #[arg(long, value_parser = parse_model)]
        model: (String, String),
        /// Base URL of the registry (http://, https:// or file://).
        #[arg(long)]
        registry_url: String,
        /// Revision of the deployment; devices take only a higher one than the topic's last
        /// (default: milliseconds since 1970, so later deploys from any machine are higher).
        #[arg(long)]
        revision: Option<u64>,
        /// Id the devices' events and state name it by (default: NAME-VERSION-REVISION).
        #[arg(long)]
        deployment_id: Option<String>,
        /// Follow the devices' events until each finished; the exit code says how (below).
        #[arg(long)]
        wait: bool,
        /// With --group --wait: how many devices must finish (the exit code judges those
        /// that did; give the group's size to judge them all). Ignored with --device.
        #[arg(long, default_value_t = 1)]
        expect: usize,
        /// With --wait: seconds to wait for every device to finish.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Sign the deployment with this ed25519 private key (PKCS#8 PEM, e.g. from keygen or
        /// `openssl genpkey -algorithm ed25519`): devices with trust.keys accept only signed ones.
        #[arg(long)]
        sign_key: Option<PathBuf>,
        /// The signing key's certificate from a root (`certify`), when it is a deploy key.
        #[arg(long, requires = "sign_key")]
        certificate: Option<PathBuf>,
        /// Allow going back to an older version of the model than the one serving.
        #[arg(long)]
        allow_downgrade: bool,
        /// Deploy to this model slot (`.../models/SLOT/desired`, served at /v2/models/SLOT)
        /// instead of the device's or group's default model.
        #[arg(long)]
        slot: Option<String>,
        /// Score this registered candidate, NAME@VERSION, in shadow beside the model: it runs on
        /// --shadow-sample of live requests, never answers them; its agreement goes to telemetry.
        #[arg(long, value_parser = parse_model)]
        shadow: Option<(String, String)>,
        /// With --shadow: the share of requests the candidate also runs on (above 0, at most 1).
        #[arg(long, default_value_t = 0.1, requires = "shadow")]
        shadow_sample: f64,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Withdraw the desired state of a device or group (empty retained payload; signed with --sign-key).
    Undeploy {
        /// MQTT broker: mqtt://HOST[:PORT] (port 1883; tcp:// is the same) or mqtts://HOST[:PORT]
        /// for TLS (port 8883; ssl:// is the same).
        #[arg(long)]
        broker: BrokerUrl,
        /// The device whose own desired state is withdrawn (its groups' then apply).
        #[arg(long, conflicts_with = "group", required_unless_present = "group")]
        device: Option<String>,
        /// The group whose desired state is withdrawn.
        #[arg(long)]
        group: Option<String>,
        /// Sign the undeployment with this ed25519 private key (PKCS#8 PEM; required by devices
        /// with trust.keys).
        #[arg(long)]
        sign_key: Option<PathBuf>,
        /// The signing key's certificate from a root (`certify`), when it is a deploy key.
        #[arg(long, requires = "sign_key")]
        certificate: Option<PathBuf>,
        /// Revision of the signed undeployment (default: from the clock, like deploy).
        #[arg(long)]
        revision: Option<u64>,
        /// Withdraw this model slot's desired state instead of the default model's.
        #[arg(long)]
        slot: Option<String>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// The fleet at a glance: a row per device and model slot (online, model@version, last
    /// outcome, p99, error rate, requests/s, shadow agreement, last seen), from the devices'
    /// retained state and availability and their telemetry (not retained: listened for).
    #[command(after_help = STATUS_NOTES)]
    Status {
        /// MQTT broker: mqtt://HOST[:PORT] (port 1883; tcp:// is the same) or mqtts://HOST[:PORT]
        /// for TLS (port 8883; ssl:// is the same).
        #[arg(long)]
        broker: BrokerUrl,
        /// Only the devices whose retained state lists this group.
        #[arg(long)]
        group: Option<String>,
        /// Only these devices (repeat or comma-separate): their own topics are subscribed to,
        /// which RabbitMQ needs to hand out retained state.
        #[arg(long = "device", value_name = "DEVICE", value_delimiter = ',')]
        devices: Vec<String>,
        /// Keep the view current until Ctrl-C: redrawn every second on a terminal, a snapshot
        /// whenever something changed (at most every second) otherwise.
        #[arg(long)]
        watch: bool,
        /// Rows and summary as JSON (with --watch, one line per snapshot).
        #[arg(long)]
        json: bool,
        /// How long to listen for telemetry before printing, at most (e.g. 5s, 500ms, 1m; a
        /// bare number is seconds): it is not retained, and devices report every
        /// --telemetry-interval (30 s by default). Default 5s; it ends sooner once every
        /// online device reported.
        #[arg(long, value_parser = parse_wait, conflicts_with = "watch")]
        wait: Option<Duration>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Roll a model version out to a group in stages, each gated on the health of the devices
    /// it moved.
    ///
    /// The group's members are the devices whose retained state lists it, in name order. Each
    /// stage gives its next devices the candidate on their own desired topics, waits for them
    /// to go active and soaks, judging events and telemetry; a breach returns every device
    /// moved to the previous version (the group's desired state, untouched until the end) and
    /// halts. After the last stage the group's desired state takes the candidate and the
    /// per-device overrides are cleared. Progress is retained on outpost/rollouts/GROUP (with
    /// --slot: outpost/rollouts/GROUP/models/SLOT): --resume continues it after this command
    /// was stopped, --abort returns the moved devices.
    #[command(after_help = ROLLOUT_HELP)]
    Rollout {
        /// MQTT broker: mqtt://HOST[:PORT] (port 1883; tcp:// is the same) or mqtts://HOST[:PORT]
        /// for TLS (port 8883; ssl:// is the same).
        #[arg(long)]
        broker: BrokerUrl,
        /// The group to roll out to.
        #[arg(long)]
        group: String,
        /// The model slot to roll out in (default: the devices' own `desired` topics).
        #[arg(long)]
        slot: Option<String>,
        /// The registered model version to roll out, as NAME@VERSION.
        #[arg(long, value_parser = parse_model, required_unless_present_any = ["resume", "abort"])]
        model: Option<(String, String)>,
        /// Base URL of the registry (http://, https:// or file://).
        #[arg(long, required_unless_present_any = ["resume", "abort"])]
        registry_url: Option<String>,
        /// Cumulative stages: device counts and percentages of the group, e.g. 1,10%,50%,100%
        /// (percentages round up; the group's desired state moves after the last one).
        #[arg(long, required_unless_present_any = ["resume", "abort"])]
        stages: Option<String>,
        /// How long each stage's devices are watched once active (e.g. 60s, 10m; a bare number
        /// is seconds). Make it at least two of the devices' telemetry intervals.
        #[arg(long, value_parser = parse_wait, required_unless_present_any = ["resume", "abort"])]
        soak: Option<Duration>,
        /// Halt when a device answers more than this share of its requests with an error during
        /// the soak (0 to 1, e.g. 0.01), from its telemetry.
        #[arg(long)]
        max_error_rate: Option<f64>,
        /// Halt when a device's p99 during the soak is over this multiple of its p99 on the
        /// previous version (measured before it moved).
        #[arg(long)]
        max_p99_ratio: Option<f64>,
        /// Requests a device needs during the soak (or comparisons in shadow) before its error
        /// rate, p99 and agreement are judged; devices with fewer are named as not judged.
        #[arg(long, default_value_t = 20)]
        min_requests: u64,
        /// Before promoting a stage, run the candidate in shadow beside the previous version on
        /// its devices for a soak and require this top-1 agreement (0 to 1).
        #[arg(long, requires = "shadow_sample")]
        min_agreement: Option<f64>,
        /// With --min-agreement: the share of live requests the candidate runs on in shadow.
        #[arg(long, requires = "min_agreement")]
        shadow_sample: Option<f64>,
        /// Allow the candidate to be an older version than the one serving.
        #[arg(long)]
        allow_downgrade: bool,
        /// Sign every desired state it publishes, and its record, with this ed25519 private key
        /// (PKCS#8 PEM); give it again with --resume and --abort (a record it did not sign is
        /// refused). The group's current desired state must then be signed by this key or a
        /// --trust-key.
        #[arg(long)]
        sign_key: Option<PathBuf>,
        /// With --sign-key: a key (PEM file or ed25519:<base64>, as the agent's --trust-key)
        /// whose signature on the group's current desired state is trusted too; repeat for several.
        #[arg(long = "trust-key", requires = "sign_key")]
        trust_keys: Vec<String>,
        /// The signing key's certificate from a root (`certify`), when it is a deploy key.
        #[arg(long, requires = "sign_key")]
        certificate: Option<PathBuf>,
        /// How long a stage's devices get to go active (and returned devices to come back),
        /// e.g. 120s.
        #[arg(long, value_parser = parse_wait, default_value = "120s")]
        timeout: Duration,
        /// Devices of a stage that may fail or time out before it halts (they are returned to
        /// the previous version, the stage goes on).
        #[arg(long, default_value_t = 0)]
        max_failed: usize,
        /// A soaking device offline for less than this that comes back on the same deployment
        /// is not a breach (e.g. 60s; 0: any offline moment is).
        #[arg(long, value_parser = parse_wait, default_value = "60s")]
        offline_grace: Duration,
        /// Continue the rollout recorded for the group (and slot), with its recorded options
        /// (--registry-url: look its candidate up there again instead of in the registry its
        /// manifest URL names).
        #[arg(long, conflicts_with_all = ["abort", "model", "stages", "soak", "max_error_rate", "max_p99_ratio", "min_requests", "min_agreement", "shadow_sample", "allow_downgrade", "max_failed", "offline_grace"])]
        resume: bool,
        /// Return every device the recorded rollout moved to the previous version; mark it aborted.
        #[arg(long, conflicts_with_all = ["model", "registry_url", "stages", "soak", "max_error_rate", "max_p99_ratio", "min_requests", "min_agreement", "shadow_sample", "allow_downgrade", "max_failed", "offline_grace"])]
        abort: bool,
        /// Print the final report as JSON (progress stays on stderr).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Make an ed25519 key pair: OUT.pem (private, PKCS#8, 0600) and OUT.pub.pem (public, SPKI).
    Keygen {
        /// Path without extension, e.g. keys/root.
        out: PathBuf,
    },
    /// Certify a deploy key with a root key, for a scope and until an expiry; writes the
    /// certificate (a DSSE envelope) to give `deploy --certificate`.
    Certify {
        /// The root's private key.
        #[arg(long)]
        root_key: PathBuf,
        /// The deploy key's public key: a PEM file or ed25519:<base64>.
        #[arg(long)]
        key: String,
        /// A name for logs and events (e.g. ci-2026).
        #[arg(long)]
        name: Option<String>,
        /// RFC 3339 time or a duration from now (e.g. 90d).
        #[arg(long)]
        expires: String,
        /// Devices it may deploy to: names, prefix*, or *; repeat or comma-separate.
        #[arg(long, value_delimiter = ',')]
        devices: Vec<String>,
        /// Groups it may deploy to: names, prefix*, or *; repeat or comma-separate.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// File the certificate is written to (JSON), for `deploy --certificate`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Send one inference request to a device and print the answer.
    Infer {
        /// MQTT broker: mqtt://HOST[:PORT] (port 1883; tcp:// is the same) or mqtts://HOST[:PORT]
        /// for TLS (port 8883; ssl:// is the same).
        #[arg(long)]
        broker: BrokerUrl,
        /// The device to ask.
        #[arg(long)]
        device: String,
        /// File holding the request body: an Open Inference Protocol v2 request in JSON
        /// ({"inputs": [...]}); its reply_to is set to a private reply topic.
        #[arg(long, value_name = "FILE")]
        input: PathBuf,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// The whole workflow on this machine: broker, registry, agent, real digits.
    Demo,
    /// Benchmarks, side by side in one run: local HTTP scoring vs tract
    /// in-process and Azure ML's inference server, MQTT round trip vs an echo
    /// client, hot swap under load, deployment latency, footprint, sha256,
    /// a detector-sized model. Writes a Markdown report, JSON and an SVG.
    Bench {
        /// The agent binary to measure.
        #[arg(long, default_value = "target/release/outpost")]
        agent: PathBuf,
        /// A smoke run of a few seconds (not figures).
        #[arg(long)]
        quick: bool,
        /// The Markdown report (JSON and SVG are written next to it).
        #[arg(long, default_value = "BENCHMARKS.md")]
        report: PathBuf,
        /// Python of the peer's virtualenv (default simulator/bench/.venv/bin/python, from setup_peer.sh).
        #[arg(long)]
        peer_python: Option<PathBuf>,
        /// Where fixtures/make_large_models.py wrote its models.
        #[arg(long, default_value = "target/large-models")]
        large_models: PathBuf,
        /// An earlier release build of the agent, measured side by side (section 9).
        #[arg(long)]
        baseline_agent: Option<PathBuf>,
        /// Run only these sections (comma-separated: http, mqtt, swap) and
        /// print their report instead of writing the whole one (the swap
        /// timeline SVG is still written next to --report).
        #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(outpost_sim::bench::SECTIONS))]
        only: Vec<String>,
        /// libonnxruntime.so given to the agent (section 7 measures both engines); default: the peer virtualenv's.
        #[arg(long)]
        onnxruntime_library: Option<PathBuf>,
    },
    /// A seeded soak: real agent processes against Mosquitto and a registry
    /// under a reproducible schedule of faults (kills mid-install and
    /// mid-replay, broker restarts, registry 503/stall/cut, a full disk,
    /// hostile models, slow and oversize clients, stale redeliveries), with
    /// invariants checked throughout. Exit 0 only when every one held.
    Chaos {
        /// Length of the run in seconds: faults first, then a quiet end (a quarter, at least 20 s)
        /// before the final checks.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// Seed of the fault schedule: the same seed replays the same schedule.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How many agent processes to run.
        #[arg(long, default_value_t = 3)]
        devices: usize,
        /// The agent binary.
        #[arg(long, default_value = "target/release/outpost")]
        agent: PathBuf,
        /// Write the report as JSON here too.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write a timeline of faults and versions per device (SVG) here.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Run nothing: draw --svg from the JSON report of an earlier run (its --json).
        #[arg(long, value_name = "REPORT.json", requires = "svg")]
        replay: Option<PathBuf>,
        /// Where the devices, broker and registry live (default: a temporary directory).
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// Simulate a fleet: N agents (the agent library, each with its own MQTT
    /// session, store and state) receive one group deployment, with flaky
    /// downloads, late starters and devices that drop offline; prints
    /// progress and a report. Exit 0 when every device is active (and a
    /// --rollout ended as its candidate should, with no failed request).
    Fleet {
        /// How many simulated devices.
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// A broker to use, e.g. mqtt://127.0.0.1:1883 (Mosquitto); default: an embedded one.
        #[arg(long)]
        broker: Option<BrokerUrl>,
        /// Start a Mosquitto for the run instead (no connection limit, this
        /// process's raised open-file limit) and report its memory and CPU.
        #[arg(long, conflicts_with = "broker")]
        mosquitto: bool,
        /// Share of model downloads that fail (503 or a cut body) and are retried.
        #[arg(long, default_value_t = 0.1)]
        flaky: f64,
        /// Share of devices that start 1-8 s after the deployment.
        #[arg(long, default_value_t = 0.05)]
        late: f64,
        /// Share of devices that go offline for 3 s once they start downloading.
        #[arg(long, default_value_t = 0.05)]
        offline: f64,
        /// The ONNX model to deploy (default: the digits MLP).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Seconds to wait for every device to finish (half of it for them to come online).
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Write the report as JSON here too.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Draw the activation curve (devices active over time) as SVG here.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Where the devices' stores go (default: a temporary directory, in /dev/shm if present).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Seed of which devices are flaky, late or offline: the same seed, the same fleet.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Processes the agents run in: 1, this one; more, worker processes
        /// this one drives (each with its own open-file limit and threads);
        /// 0, one per 2,500 devices.
        #[arg(long, default_value_t = 0)]
        processes: usize,
        /// Once every device is active: roll version 2 out to the group with
        /// the engine of `outpost-sim rollout`, under --load. `good`: the
        /// digits CNN; `broken`: a golden sample no device reproduces. Exit 0
        /// when a good one reaches every device, or a broken one halts in its
        /// first stage touching no other device, with no failed request.
        #[arg(long, value_name = "good|broken")]
        rollout: Option<outpost_sim::fleet::Candidate>,
        /// The rollout's stages (counts or shares of the group), as `rollout --stages`.
        #[arg(long, default_value = "1%,10%,50%,100%", requires = "rollout")]
        stages: String,
        /// How long each stage's devices are watched once active, e.g. 10s.
        #[arg(long, value_parser = parse_wait, default_value = "10s", requires = "rollout")]
        soak: Duration,
        /// Inference requests per second over MQTT across the fleet during the rollout
        /// (each device in turn); every answer is counted.
        #[arg(long, default_value_t = 100.0, requires = "rollout")]
        load: f64,
        /// Draw the rollout (devices touched and serving version 2, requests answered by
        /// each version and failed, per second) as SVG here.
        #[arg(long, requires = "rollout")]
        rollout_svg: Option<PathBuf>,
    },
    /// Runs the agents `outpost-sim fleet` starts and stops on this
    /// process's standard input (`start ID`, `stop ID`, `quit`); internal.
    #[command(hide = true)]
    FleetWorker {
        /// The broker the agents connect to.
        #[arg(long)]
        broker: BrokerUrl,
        /// The group every agent belongs to.
        #[arg(long)]
        group: String,
        /// The directory holding one store per device.
        #[arg(long)]
        stores: PathBuf,
    },
}

fn parse_shape(s: &str) -> Result<(String, Vec<i64>), String> {
    let (name, dims) = s.split_once('=').ok_or_else(|| format!("'{s}': expected INPUT=D1,D2,..."))?;
    let dims = dims
        .split(',')
        .map(|d| {
            d.trim()
                .parse::<i64>()
                .ok()
                .filter(|v| *v == -1 || *v > 0)
                .ok_or_else(|| format!("'{s}': '{d}' is not a dimension (>= 1, or -1)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name.to_string(), dims))
}

/// `status --wait`: 5s, 500ms, 1m, or a bare number of seconds.
fn parse_wait(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(s).map_err(|e| format!("'{s}': {e} (e.g. 5s, 500ms, 1m)")),
    }
}

fn parse_model(s: &str) -> Result<(String, String), String> {
    match s.split_once('@') {
        Some((n, v)) if !n.is_empty() && !v.is_empty() => Ok((n.into(), v.into())),
        _ => Err(format!("'{s}': expected NAME@VERSION")),
    }
}

fn main() -> ExitCode {
    let cli: Cli = match outpost_agent::parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let default_level = match cli.command {
        Command::Demo => "error",
        Command::Fleet { .. } | Command::FleetWorker { .. } | Command::Bench { .. } => "error",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{default_level},rumqttd={}",
            if default_level == "error" { "off" } else { "error" }
        ))
    });
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    // `fleet` runs hundreds of agents in this one process, and each runs its
    // deployment pipeline on a blocking thread that waits for its deployer
    // task, which persists its record on another blocking thread: past
    // tokio's default of 512 blocking threads every pipeline waited for a
    // thread none would give back (1000 devices: 513 stuck downloading, 0
    // active). A device runs one agent and needs a few.
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(8192).build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outpost-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Register {
            model,
            name,
            version,
            registry,
            labels,
            sample,
            shapes,
            tolerance,
            top_k,
            scale,
            runtime,
            onnxruntime_library,
        } => {
            outpost_agent::serve::backend::configure(outpost_agent::serve::backend::Runtimes {
                default: outpost_protocol::Runtime::Auto,
                onnxruntime_library: onnxruntime_library
                    .or_else(|| std::env::var_os("OUTPOST_ONNXRUNTIME_LIBRARY").map(PathBuf::from)),
            });
            let spec = RegisterSpec {
                model,
                name,
                version,
                registry,
                labels,
                sample,
                shapes,
                tolerance,
                top_k,
                scale,
                runtime,
            };
            match tokio::task::spawn_blocking(move || register(&spec)).await {
                Ok(Ok(r)) => {
                    println!("registered {}@{}", r.manifest.name, r.manifest.version);
                    for f in &r.manifest.files {
                        println!("  {:<24} {:>10} bytes  sha256 {}", f.path, f.size, f.sha256);
                    }
                    println!("manifest: {}", r.manifest_path);
                    println!("manifest_sha256: {}", r.manifest_sha256);
                    ExitCode::SUCCESS
                }
                Ok(Err(e)) => fail(EXIT_FAILED, &e),
                Err(e) => fail(EXIT_FAILED, &e.to_string()),
            }
        }
        Command::Serve { mqtt_port, http_port, registry, bind } => {
            if let Err(e) = std::fs::create_dir_all(&registry) {
                return fail(EXIT_USAGE, &format!("{}: {e}", registry.display()));
            }
            let broker = match outpost_sim::broker::start(bind, mqtt_port) {
                Ok(a) => a,
                Err(e) => return fail(EXIT_UNAVAILABLE, &e),
            };
            let listener = match tokio::net::TcpListener::bind((bind, http_port)).await {
                Ok(l) => l,
                Err(e) => return fail(EXIT_UNAVAILABLE, &format!("HTTP {bind}:{http_port}: {e}")),
            };
            println!("MQTT broker: mqtt://{broker}");
            println!(
                "registry:    http://{} serving {}",
                listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                registry.display()
            );
            println!("Ctrl-C to stop");
            tokio::select! {
                r = outpost_sim::registry::serve_http(registry, listener) => {
                    if let Err(e) = r { return fail(EXIT_UNAVAILABLE, &e.to_string()); }
                }
                _ = tokio::signal::ctrl_c() => {}
            }
            ExitCode::SUCCESS
        }
        Command::Deploy {
            broker,
            device,
            group,
            model,
            registry_url,
            revision,
            deployment_id,
            wait,
            expect,
            timeout,
            sign_key,
            certificate,
            allow_downgrade,
            slot,
            shadow,
            shadow_sample,
            tls,
        } => {
            let signer = match sign_key.as_deref().map(|k| Signer::load(k, certificate.as_deref())).transpose() {
                Ok(s) => s,
                Err(e) => return fail(EXIT_USAGE, &e),
            };
            if let Some(Err(e)) = slot.as_deref().map(outpost_protocol::topics::validate_slot) {
                return fail(EXIT_USAGE, &format!("--slot: {e}"));
            }
            if expect == 0 {
                return fail(EXIT_USAGE, "--expect 0: expected at least one device to wait for");
            }
            let (name, version) = model;
            let lookup =
                operator::lookup_manifest(&registry_url, &name, &version, Duration::from_secs(timeout.min(60)));
            let (url, sha) = match lookup.await {
                Ok(x) => x,
                Err(e) if e.permanent => return fail(EXIT_USAGE, &e.message),
                Err(e) => return fail(EXIT_UNAVAILABLE, &e.message),
            };
            let mut d = operator::deployment(&name, &version, &url, &sha, revision, deployment_id);
            if allow_downgrade {
                d.policy.allow_downgrade = Some(true);
            }
            if let Some((shadow_name, shadow_version)) = shadow {
                let lookup = operator::lookup_manifest(
                    &registry_url,
                    &shadow_name,
                    &shadow_version,
                    Duration::from_secs(timeout.min(60)),
                );
                let (url, sha) = match lookup.await {
                    Ok(x) => x,
                    Err(e) if e.permanent => return fail(EXIT_USAGE, &format!("--shadow: {}", e.message)),
                    Err(e) => return fail(EXIT_UNAVAILABLE, &e.message),
                };
                let model = operator::deployment(&shadow_name, &shadow_version, &url, &sha, Some(1), None).model;
                d.shadow = Some(outpost_protocol::Shadow { model, sample_rate: shadow_sample });
            }
            // Named in the message too: a signed deployment is bound to its slot.
            d.slot = slot.clone();
            if let Err(e) = d.validate() {
                return fail(EXIT_USAGE, &e.to_string());
            }
            let topics = Topics::default();
            let (topic, events, target) = match (&device, &group) {
                (Some(dev), _) => {
                    (topics.device_desired_in(dev, slot.as_deref()), topics.events(dev), Target::Device(dev.clone()))
                }
                (None, Some(g)) => (
                    topics.group_desired_in(g, slot.as_deref()),
                    format!("{}/devices/+/events", topics.prefix()),
                    Target::Group(g.clone()),
                ),
                _ => return fail(EXIT_USAGE, "give --device or --group"),
            };
            d.target = Some(target);
            let payload = match &signer {
                Some(s) => s.deployment(&d),
                None => d.to_json(),
            };
            let mut op = match tls.connect(&broker, &format!("outpost-sim-deploy-{}", std::process::id())).await {
                Ok(o) => o,
                Err((code, e)) => return fail(code, &e),
            };
            // An explicit revision not above the one the topic holds would
            // replace the retained desired state with one every device
            // refuses (stale_revision): refused here, nothing published.
            if revision.is_some() {
                match operator::retained_revision(&mut op, &topic, Duration::from_secs(1)).await {
                    // The very same deployment again is fine (it is `unchanged`).
                    Ok(Some((held, id)))
                        if held > d.revision
                            || (held == d.revision && id.as_deref() != Some(d.deployment_id.as_str())) =>
                    {
                        op.disconnect().await;
                        return fail(
                            EXIT_USAGE,
                            &format!(
                                "--revision {} is not above revision {held}, which {topic} holds: devices would refuse it as stale_revision, and it would replace the retained desired state; give a higher --revision (or none: the clock's)",
                                d.revision
                            ),
                        );
                    }
                    Ok(_) => {}
                    Err(e) => return fail(EXIT_UNAVAILABLE, &e),
                }
            }
            if wait && let Err(e) = op.subscribe(&events).await {
                return fail(EXIT_UNAVAILABLE, &e);
            }
            if let Err(e) = op.publish(&topic, payload, true).await {
                return fail(EXIT_UNAVAILABLE, &e);
            }
            let signed = if signer.is_some() { " signed" } else { "" };
            println!("published{signed} {} revision {} ({}@{}) to {topic}", d.deployment_id, d.revision, name, version);
            if !wait {
                op.disconnect().await;
                return ExitCode::SUCCESS;
            }
            let expect = if device.is_some() { 1 } else { expect };
            let mut progress = outpost_sim::progress::Deployments::new();
            let result = operator::wait_for_outcome_with(
                &mut op,
                &d.deployment_id,
                expect,
                Duration::from_secs(timeout),
                device.is_some() && signer.is_none(),
                |ev| progress.event(ev),
            )
            .await;
            progress.finish();
            // A timeout still reports (and is judged by) the verdicts that arrived.
            let (finals, timed_out) = match result {
                Ok(finals) => (finals, None),
                Err((finals, e)) => (finals, Some(e)),
            };
            let mut code = ExitCode::SUCCESS;
            let mut failed = false;
            for f in &finals {
                // `unchanged` is a success only when the device serves this very deployment.
                let state = match f.phase {
                    Phase::Unchanged => operator::device_state(&mut op, &f.device, Duration::from_secs(5)).await,
                    _ => None,
                };
                // A slot's deployment is judged by what the slot serves.
                let state = state.map(|mut s| {
                    if let Some(slot) = &slot {
                        s.active = s.models.get(slot).and_then(|m| m.active.clone());
                    }
                    s
                });
                let why = || {
                    let mut why = f.phase.as_str().to_string();
                    if let Some(e) = &f.error {
                        why.push_str(&format!(" {}: {}", e.code, e.message));
                    }
                    if let Some(detail) = &f.detail {
                        why.push_str(&format!(" ({detail})"));
                    }
                    why
                };
                match operator::verdict(f, &d, state.as_ref()) {
                    operator::Verdict::Serving => {}
                    operator::Verdict::Failed => {
                        eprintln!("outpost-sim: {} failed deployment {}: {}", f.device, d.deployment_id, why());
                        (code, failed) = (ExitCode::from(EXIT_FAILED), true);
                    }
                    operator::Verdict::NotApplied => {
                        let serving = match state.as_ref().map(|s| s.active.as_ref()) {
                            Some(Some(a)) => format!("; it serves {}@{} ({})", a.name, a.version, a.deployment_id),
                            Some(None) => "; it serves nothing".into(),
                            None if f.phase == Phase::Unchanged => "; its state did not say what it serves".into(),
                            None => String::new(),
                        };
                        eprintln!(
                            "outpost-sim: {} did not apply deployment {}: {}{serving}",
                            f.device,
                            d.deployment_id,
                            why()
                        );
                        if !failed {
                            code = ExitCode::from(EXIT_NOT_APPLIED);
                        }
                    }
                }
            }
            if let Some(e) = timed_out {
                eprintln!("outpost-sim: {e}");
                if !failed {
                    code = ExitCode::from(EXIT_UNAVAILABLE);
                }
            }
            op.disconnect().await;
            code
        }
        Command::Undeploy { broker, device, group, sign_key, certificate, revision, slot, tls } => {
            let signer = match sign_key.as_deref().map(|k| Signer::load(k, certificate.as_deref())).transpose() {
                Ok(s) => s,
                Err(e) => return fail(EXIT_USAGE, &e),
            };
            if let Some(Err(e)) = slot.as_deref().map(outpost_protocol::topics::validate_slot) {
                return fail(EXIT_USAGE, &format!("--slot: {e}"));
            }
            let topics = Topics::default();
            let (topic, target) = match (&device, &group) {
                (Some(d), _) => (topics.device_desired_in(d, slot.as_deref()), Target::Device(d.clone())),
                (None, Some(g)) => (topics.group_desired_in(g, slot.as_deref()), Target::Group(g.clone())),
                _ => return fail(EXIT_USAGE, "give --device or --group"),
            };
            let revision = revision.unwrap_or_else(operator::clock_revision);
            let payload = signer.as_ref().map(|s| s.undeploy(target, slot.as_deref(), revision)).unwrap_or_default();
            let op = match tls.connect(&broker, &format!("outpost-sim-undeploy-{}", std::process::id())).await {
                Ok(o) => o,
                Err((code, e)) => return fail(code, &e),
            };
            if let Err(e) = op.publish(&topic, payload, true).await {
                return fail(EXIT_UNAVAILABLE, &e);
            }
            op.disconnect().await;
            match signer {
                Some(_) => println!("withdrew the desired state on {topic} (signed, revision {revision})"),
                None => println!("withdrew the desired state on {topic}"),
            }
            ExitCode::SUCCESS
        }
        Command::Chaos { duration, seed, devices, agent, json, svg, replay, work_dir } => {
            if let (Some(report), Some(svg)) = (&replay, &svg) {
                return match outpost_sim::chaos::replay_svg(report, svg) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(EXIT_USAGE, &e),
                };
            }
            if devices == 0 {
                return fail(EXIT_USAGE, "--devices must be at least 1");
            }
            let spec = outpost_sim::chaos::ChaosSpec {
                agent,
                duration: Duration::from_secs(duration),
                seed,
                devices,
                json,
                svg,
                work_dir,
            };
            match outpost_sim::chaos::run(spec).await {
                Ok(r) if r["ok"].as_bool() == Some(true) => ExitCode::SUCCESS,
                Ok(_) => ExitCode::from(EXIT_FAILED),
                Err(e) => fail(EXIT_UNAVAILABLE, &e),
            }
        }
        Command::Status { broker, group, devices, watch, json, wait, tls } => {
            let names = group.iter().map(|g| ("group", g)).chain(devices.iter().map(|d| ("device", d)));
            for (what, name) in names {
                if let Err(e) = outpost_protocol::topics::validate_name(what, name) {
                    return fail(EXIT_USAGE, &format!("--{what}: {e}"));
                }
            }
            let mut op = match tls.connect(&broker, &format!("outpost-sim-status-{}", std::process::id())).await {
                Ok(o) => o,
                Err((code, e)) => return fail(code, &e),
            };
            let filter = outpost_sim::status::Filter { devices, group };
            let wait = wait.unwrap_or(Duration::from_secs(5));
            let result =
                outpost_sim::status::run(&mut op, outpost_sim::status::Options { filter, watch, json, wait }).await;
            op.disconnect().await;
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(EXIT_UNAVAILABLE, &e),
            }
        }
        Command::Rollout {
            broker,
            group,
            slot,
            model,
            registry_url,
            stages,
            soak,
            max_error_rate,
            max_p99_ratio,
            min_requests,
            min_agreement,
            shadow_sample,
            allow_downgrade,
            sign_key,
            trust_keys,
            certificate,
            timeout,
            max_failed,
            offline_grace,
            resume,
            abort,
            json,
            tls,
        } => {
            use outpost_sim::rollout::{self, Action, Params, Start, health::Limits, plan};
            let signer = match sign_key.as_deref().map(|k| Signer::load(k, certificate.as_deref())).transpose() {
                Ok(s) => s,
                Err(e) => return fail(EXIT_USAGE, &e),
            };
            let mut trusted = Vec::new();
            for k in &trust_keys {
                let keys = if k.trim_start().starts_with("ed25519:") {
                    outpost_protocol::trust::PublicKey::parse(k).map(|k| vec![k])
                } else {
                    std::fs::read_to_string(k)
                        .map_err(|e| format!("cannot read it: {e}"))
                        .and_then(|t| outpost_protocol::trust::PublicKey::parse_all(&t))
                };
                match keys {
                    Ok(keys) => trusted.extend(keys),
                    Err(e) => return fail(EXIT_USAGE, &format!("--trust-key {k}: {e}")),
                }
            }
            let resume_registry = if resume { registry_url.clone() } else { None };
            let tls = match tls.config(&broker) {
                Ok(c) => c,
                Err(e) => return fail(EXIT_USAGE, &e),
            };
            let action = match (resume, abort, model, registry_url, stages, soak) {
                (true, ..) => Action::Resume,
                (_, true, ..) => Action::Abort,
                (_, _, Some((model, version)), Some(registry_url), Some(stages), Some(soak)) => {
                    let stages = match plan::parse_stages(&stages) {
                        Ok(s) => s,
                        Err(e) => return fail(EXIT_USAGE, &e),
                    };
                    let limits = Limits {
                        max_error_rate,
                        max_p99_ratio,
                        min_requests,
                        min_agreement,
                        max_failed,
                        offline_grace_s: offline_grace.as_secs_f64(),
                    };
                    Action::Start(Start {
                        model,
                        version,
                        registry_url,
                        stages,
                        soak,
                        limits,
                        shadow_sample,
                        allow_downgrade,
                    })
                }
                _ => {
                    return fail(
                        EXIT_USAGE,
                        "give --model, --registry-url, --stages and --soak (or --resume, --abort)",
                    );
                }
            };
            let mut params = Params::new(broker, &group, action);
            (params.tls, params.slot, params.signer, params.timeout, params.progress) =
                (tls, slot, signer, timeout, true);
            (params.trust_keys, params.registry_url) = (trusted, resume_registry);
            match rollout::run(params).await {
                Ok(report) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
                    } else {
                        print!("{report}");
                    }
                    ExitCode::from(report.exit_code())
                }
                Err(e) => fail(e.exit_code(), &e.to_string()),
            }
        }
        Command::Keygen { out } => match signing::keygen(&out) {
            Ok((private, public, key)) => {
                println!("private key: {} (keep it secret; PKCS#8 PEM)", private.display());
                println!("public key:  {} (trust.keys on devices)", public.display());
                println!("             {}", key.to_text());
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_USAGE, &e),
        },
        Command::Certify { root_key, key, name, expires, devices, groups, out } => {
            let scope = outpost_protocol::trust::Scope { devices, groups };
            match signing::certify(&root_key, &key, name.as_deref(), &expires, scope)
                .and_then(|c| std::fs::write(&out, c).map_err(|e| format!("{}: {e}", out.display())))
            {
                Ok(()) => {
                    println!("certificate written to {}", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_USAGE, &e),
            }
        }
        Command::Infer { broker, device, input, timeout, tls } => {
            let body = match std::fs::read(&input)
                .map_err(|e| format!("cannot read it: {e}"))
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| format!("not JSON: {e}")))
            {
                Ok(v) if v.is_object() => v,
                Ok(_) => {
                    return fail(
                        EXIT_USAGE,
                        &format!("{}: expected a JSON object ({{\"inputs\": [...]}})", input.display()),
                    );
                }
                Err(e) => return fail(EXIT_USAGE, &format!("{}: {e}", input.display())),
            };
            let mut op = match tls.connect(&broker, &format!("outpost-sim-infer-{}", std::process::id())).await {
                Ok(o) => o,
                Err((code, e)) => return fail(code, &e),
            };
            let result = operator::infer_once(&mut op, &device, body, Duration::from_secs(timeout)).await;
            op.disconnect().await;
            match result {
                Ok(reply) => {
                    println!("{}", serde_json::to_string_pretty(&reply).unwrap_or_default());
                    if matches!(reply, outpost_protocol::InferReply::Ok(_)) {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(EXIT_FAILED)
                    }
                }
                Err(e) => fail(EXIT_UNAVAILABLE, &e),
            }
        }
        Command::Demo => match outpost_sim::demo::run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(EXIT_FAILED, &e),
        },
        Command::Bench {
            agent,
            quick,
            report,
            peer_python,
            large_models,
            baseline_agent,
            only,
            onnxruntime_library,
        } => {
            let root = std::env::current_dir().unwrap_or_default();
            if !root.join("fixtures/digits-mlp.onnx").is_file() {
                return fail(EXIT_USAGE, "run outpost-sim bench from the repository root (it uses fixtures/)");
            }
            let spec = outpost_sim::bench::BenchSpec {
                agent,
                quick,
                report: report.clone(),
                peer_python,
                large_models,
                root,
                baseline_agent,
                only: only.clone(),
                onnxruntime_library,
            };
            match outpost_sim::bench::run(spec).await {
                Ok(_) if !only.is_empty() => ExitCode::SUCCESS,
                Ok(_) => {
                    println!("report: {}", report.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_FAILED, &e),
            }
        }
        Command::FleetWorker { broker, group, stores } => match outpost_sim::fleet::worker(broker, group, stores).await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(EXIT_FAILED, &e),
        },
        Command::Fleet {
            devices,
            broker,
            mosquitto,
            flaky,
            late,
            offline,
            model,
            timeout,
            json,
            svg,
            work_dir,
            seed,
            processes,
            rollout,
            stages,
            soak,
            load,
            rollout_svg,
        } => {
            for (what, v) in [("--flaky", flaky), ("--late", late), ("--offline", offline)] {
                if !(0.0..=1.0).contains(&v) {
                    return fail(EXIT_USAGE, &format!("{what}: expected a share from 0 to 1, found {v}"));
                }
            }
            if late + offline > 1.0 {
                return fail(EXIT_USAGE, "--late + --offline: expected at most 1 together");
            }
            if devices == 0 {
                return fail(EXIT_USAGE, "--devices: expected at least 1");
            }
            if !(load.is_finite() && load > 0.0) {
                return fail(EXIT_USAGE, &format!("--load: expected requests per second above 0, found {load}"));
            }
            let rollout = match rollout.map(|candidate| {
                outpost_sim::rollout::plan::parse_stages(&stages).map(|stages| outpost_sim::fleet::RolloutSpec {
                    candidate,
                    stages,
                    soak,
                    load_rps: load,
                })
            }) {
                None => None,
                Some(Ok(r)) => Some(r),
                Some(Err(e)) => return fail(EXIT_USAGE, &e),
            };
            let spec = outpost_sim::fleet::FleetSpec {
                devices,
                broker,
                mosquitto,
                flaky,
                late,
                offline,
                model,
                timeout: Duration::from_secs(timeout),
                work_dir,
                seed,
                progress: true,
                processes,
                rollout,
            };
            match outpost_sim::fleet::run(spec).await {
                Ok(report) => {
                    println!("{report}");
                    if let Some(path) = json {
                        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
                        if let Err(e) = std::fs::write(&path, text + "\n") {
                            return fail(EXIT_FAILED, &format!("{}: {e}", path.display()));
                        }
                    }
                    if let Some(path) = svg
                        && let Err(e) = report
                            .activation_svg()
                            .and_then(|s| std::fs::write(&path, s).map_err(|e| format!("{}: {e}", path.display())))
                    {
                        return fail(EXIT_FAILED, &e);
                    }
                    if let (Some(path), Some(r)) = (rollout_svg, &report.rollout)
                        && let Err(e) = r
                            .svg(report.devices)
                            .and_then(|s| std::fs::write(&path, s).map_err(|e| format!("{}: {e}", path.display())))
                    {
                        return fail(EXIT_FAILED, &e);
                    }
                    if report.succeeded() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_FAILED) }
                }
                Err(e) => fail(EXIT_UNAVAILABLE, &e),
            }
        }
    }
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("outpost-sim: {msg}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_and_argument_has_help() {
        let missing = outpost_agent::without_help(&Cli::command());
        assert!(missing.is_empty(), "without help text: {missing:?}");
    }

    #[test]
    fn deploy_help_lists_every_exit_code_it_uses() {
        let mut cli = Cli::command();
        let help = cli.find_subcommand_mut("deploy").expect("deploy").render_long_help().to_string();
        for code in [0, EXIT_FAILED, EXIT_NOT_APPLIED, EXIT_USAGE, EXIT_UNAVAILABLE] {
            assert!(help.contains(&format!("\n  {code:<3} ")), "exit code {code} is not in deploy --help:\n{help}");
        }
    }

    #[test]
    fn infer_input_is_a_file() {
        let cli = Cli::command();
        let infer = cli.find_subcommand("infer").expect("infer");
        let input = infer.get_arguments().find(|a| a.get_id() == "input").expect("--input");
        assert!(input.get_help().is_some_and(|h| h.to_string().starts_with("File holding the request body")));
    }
}
