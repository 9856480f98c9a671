//! A private RabbitMQ node with its MQTT plugin, the second real broker of
//! the end-to-end tests (Debian's `rabbitmq-server`).
//!
//! One node per test: a node takes about 10 s to start, but a node shared by
//! the whole test binary would have to live in a `static`, and statics are
//! never dropped, so it would outlive the test run. Only a few tests use it.
//!
//! The node runs as the user running the tests (root in CI, anyone on a
//! workstation): the package's `/usr/sbin/rabbitmq-server` wrapper refuses
//! other users, and as root it `su`s to `rabbitmq` with HOME=/var/lib/rabbitmq
//! (the system node's Erlang cookie and directories). Started through
//! `/usr/lib/rabbitmq/bin/rabbitmq-server` instead, everything the node
//! writes (its database, logs and Erlang cookie, through HOME) stays in a
//! temp dir of the test's own. It listens on loopback only, on free ports;
//! epmd (4369) is shared with any other Erlang node on the machine.
//!
//! Not installed: tests [`RabbitMq::start_or_skip`] skip with a printed line,
//! unless `CI` or `OUTPOST_REQUIRE_RABBITMQ=1` is set (then they fail).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `rabbitmq-server` in the directory `OUTPOST_RABBITMQ_BIN` names (e.g. an
/// unpacked generic-unix release's `sbin`), else where Debian (and the RPMs)
/// put the real scripts.
fn server_script() -> Option<PathBuf> {
    let dir =
        std::env::var_os("OUTPOST_RABBITMQ_BIN").map_or_else(|| PathBuf::from("/usr/lib/rabbitmq/bin"), PathBuf::from);
    Some(dir.join("rabbitmq-server")).filter(|p| p.is_file())
}

/// True when a missing RabbitMQ must fail the tests rather than skip them.
fn required() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    set("CI") || set("OUTPOST_REQUIRE_RABBITMQ")
}

/// A RabbitMQ node with the MQTT plugin on a free port; killed, with every
/// process it started, on drop.
pub struct RabbitMq {
    /// The MQTT listener (127.0.0.1).
    pub port: u16,
    /// The Erlang node name, `outpost-test-<port>@localhost`.
    pub node: String,
    /// From spawning the node to its first MQTT CONNACK.
    pub started_in: Duration,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RabbitMq {
    /// Starts a node, or returns `None` (after printing why) when RabbitMQ is
    /// not installed and nothing requires it. `test` names the caller in that line.
    pub fn start_or_skip(test: &str) -> Option<RabbitMq> {
        if server_script().is_none() {
            let why = "rabbitmq-server is not installed (apt-get install rabbitmq-server)";
            assert!(!required(), "{test}: {why}, and CI or OUTPOST_REQUIRE_RABBITMQ=1 requires it");
            println!("{test}: skipped: {why}; set OUTPOST_REQUIRE_RABBITMQ=1 to make this a failure");
            return None;
        }
        Some(RabbitMq::start())
    }

    /// Starts a node; panics when RabbitMQ is missing or does not come up.
    pub fn start() -> RabbitMq {
        let script = server_script().expect("rabbitmq-server is not installed (apt-get install rabbitmq-server)");
        let dir = tempfile::tempdir().unwrap();
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let p = outpost_sim::broker::free_port().unwrap();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let (port, amqp_port, dist_port) = (ports[0], ports[1], ports[2]);
        let node = format!("outpost-test-{port}@localhost");
        let path = |name: &str| dir.path().join(name);
        for d in ["mnesia", "log"] {
            std::fs::create_dir(path(d)).unwrap();
        }
        std::fs::write(path("enabled_plugins"), "[rabbitmq_mqtt].\n").unwrap();
        std::fs::write(
            path("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{amqp_port}\n\
                 mqtt.listeners.tcp.default = 127.0.0.1:{port}\n\
                 mqtt.allow_anonymous = true\n\
                 mqtt.default_user = guest\n\
                 mqtt.default_pass = guest\n\
                 mqtt.vhost = /\n\
                 loopback_users = none\n\
                 default_user = guest\n\
                 default_pass = guest\n\
                 default_vhost = /\n\
                 log.file.level = info\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(path("server.log")).unwrap();
        let started = Instant::now();
        let mut cmd = Command::new(&script);
        cmd.current_dir(dir.path())
            // The Erlang cookie (created at first start) lives in HOME.
            .env("HOME", dir.path())
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
            .env("RABBITMQ_LOG_BASE", path("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", path("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf"))
            // Distribution on loopback only; schedulers that do not spin
            // while idle (the machine is shared with the rest of the tests).
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1} +sbwt none +sbwtdcpu none +sbwtdio none",
            )
            // Under a systemd notify socket the script would exec the VM
            // directly and notify systemd: not ours to notify.
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Its own process group: drop kills the script, the VM and its helpers at once.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
        let mut r = RabbitMq { port, node, started_in: Duration::ZERO, child: Some(child), dir };
        r.wait_ready(started);
        r.started_in = started.elapsed();
        println!("rabbitmq node {} (mqtt port {}) ready in {:.1} s", r.node, r.port, r.started_in.as_secs_f64());
        r
    }

    /// Waits until the MQTT listener accepts a CONNECT (the TCP port opens
    /// a little before the plugin takes sessions).
    fn wait_ready(&mut self, started: Instant) {
        let limit = Duration::from_secs(180);
        loop {
            if mqtt_connack(self.port) {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "rabbitmq node {} exited ({status}) before taking MQTT connections:\n{}",
                    self.node,
                    self.logs()
                );
            }
            assert!(
                started.elapsed() < limit,
                "rabbitmq node {} took no MQTT connection within {limit:?}:\n{}",
                self.node,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The tail of the start script's output and of the node's own log.
    pub fn logs(&self) -> String {
        let tail = |p: &Path| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        let node_log = self.dir.path().join("log").join(format!("{}.log", self.node));
        format!(
            "--- {}\n{}\n--- {}\n{}",
            self.dir.path().join("server.log").display(),
            tail(&self.dir.path().join("server.log")),
            node_log.display(),
            tail(&node_log)
        )
    }

    /// `mqtt://127.0.0.1:PORT`, for `--broker`.
    pub fn broker_arg(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> outpost_agent::link::BrokerUrl {
        outpost_agent::link::BrokerUrl { host: "127.0.0.1".into(), port: self.port, tls: false }
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // The data goes with the temp dir: no graceful stop needed. The group
        // holds the script, the VM, erl_child_setup and inet_gethost (epmd
        // daemonizes out of it and is shared).
        let Some(group) = rustix::process::Pid::from_raw(child.id() as i32) else { return };
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        let _ = child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while rustix::process::test_kill_process_group(group).is_ok() && Instant::now() < deadline {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// True when an MQTT 3.1.1 CONNECT on `port` is accepted (CONNACK, return code 0).
fn mqtt_connack(port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut tcp) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else { return false };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let id = b"outpost-probe";
    // Variable header: protocol name, level 4, clean session, keep-alive 30 s.
    let mut packet = vec![0x10, (10 + 2 + id.len()) as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
    packet.extend_from_slice(&[0, id.len() as u8]);
    packet.extend_from_slice(id);
    let mut connack = [0u8; 4];
    let ok =
        tcp.write_all(&packet).is_ok() && tcp.read_exact(&mut connack).is_ok() && connack[0] == 0x20 && connack[3] == 0;
    if ok {
        let _ = tcp.write_all(&[0xE0, 0]);
    }
    ok
}
