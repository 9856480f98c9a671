//! Helpers for Outpost's end-to-end tests: real processes for everything that
//! crosses a process boundary. A Mosquitto broker per test on a free port, the
//! registry served over HTTP, and the `outpost` binary itself.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

pub use outpost_agent_bin::{agent_binary, sim_binary};
use outpost_protocol::{DeploymentEvent, DeviceState, Phase, Topics};
use outpost_sim::operator::{Operator, deployment, resolve_manifest};
use outpost_sim::registry::{RegisterSpec, register, sha256};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod rabbitmq;
pub use rabbitmq::RabbitMq;

mod outpost_agent_bin {
    use std::path::PathBuf;

    /// `target/<profile>/outpost`, built by `cargo test --workspace` (the agent
    /// package has integration tests, so cargo builds its binary first).
    /// `OUTPOST_AGENT_BIN` runs the tests against another build of the agent
    /// (e.g. an aarch64 one under qemu-user: scripts/aarch64-smoke.sh).
    pub fn agent_binary() -> PathBuf {
        if let Some(bin) = std::env::var_os("OUTPOST_AGENT_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().unwrap().parent().unwrap();
        let bin = dir.join(format!("outpost{}", std::env::consts::EXE_SUFFIX));
        assert!(
            bin.is_file(),
            "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p outpost-agent` first)",
            bin.display()
        );
        bin
    }

    /// `target/<profile>/outpost-sim`, built the same way.
    pub fn sim_binary() -> PathBuf {
        let exe = std::env::current_exe().unwrap();
        exe.parent().unwrap().parent().unwrap().join(format!("outpost-sim{}", std::env::consts::EXE_SUFFIX))
    }
}

/// Runs `outpost-sim` and returns (exit code, stdout, stderr).
pub fn sim(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(outpost_agent_bin::sim_binary()).args(args).env("OUTPOST_LOG", "warn").output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures");

/// Runs `outpost ARGS` to completion: (exit code, stdout, stderr).
pub fn outpost(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_binary()).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

/// A Mosquitto broker on a free port, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    /// A TLS listener with a password file, when started with [`Mosquitto::start_tls`].
    pub tls_port: Option<u16>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Mosquitto::start_with(false)
    }

    /// With `persistent`, sessions and retained messages survive a restart
    /// (written to the broker's directory when it stops).
    pub fn start_with(persistent: bool) -> Mosquitto {
        Mosquitto::start_extra(persistent, "max_packet_size 16777216\n")
    }

    /// With `extra` configuration lines (e.g. a smaller `max_packet_size`).
    pub fn start_extra(persistent: bool, extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = outpost_sim::broker::free_port().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        // Started as root, Mosquitto drops to its own user: let it write its database here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let persistence = if persistent {
            format!("persistence true\npersistence_location {}/\n", dir.path().display())
        } else {
            "persistence false\n".to_string()
        };
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\n{persistence}log_dest stderr\n{extra}set_tcp_nodelay true\n")).unwrap();
        let mut m = Mosquitto { port, tls_port: None, child: None, dir };
        m.spawn();
        m
    }

    /// A plain anonymous listener (for the test's watchers) and a TLS
    /// listener with the certificate of `pki` that only lets `user` in.
    pub fn start_tls(pki: &TestPki, user: &str, password: &str) -> Mosquitto {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        // Mosquitto started as root reads these as its own user.
        std::fs::set_permissions(pki.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for f in [&pki.ca, &pki.server_cert, &pki.server_key] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let passwd = dir.path().join("passwd");
        let ok = Command::new("mosquitto_passwd").arg("-b").arg("-c").arg(&passwd).arg(user).arg(password).status();
        assert!(ok.is_ok_and(|s| s.success()), "mosquitto_passwd failed (it comes with the mosquitto package)");
        std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (port, tls_port) = (outpost_sim::broker::free_port().unwrap(), outpost_sim::broker::free_port().unwrap());
        let conf = format!(
            "per_listener_settings true\nlog_dest stderr\npersistence false\nset_tcp_nodelay true\n\
             listener {port} 127.0.0.1\nallow_anonymous true\n\
             listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nallow_anonymous false\npassword_file {}\n",
            pki.ca.display(),
            pki.server_cert.display(),
            pki.server_key.display(),
            passwd.display()
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf).unwrap();
        let mut m = Mosquitto { port, tls_port: Some(tls_port), child: None, dir };
        m.spawn();
        wait_port(tls_port);
        m
    }

    fn spawn(&mut self) {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("mosquitto");
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("mosquitto.log")).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} ({e}): install Mosquitto (apt-get install mosquitto)"));
        self.child = Some(child);
        wait_port(self.port);
    }

    /// Stops the broker (SIGTERM: a persistent one saves its state).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn url(&self) -> outpost_agent::link::BrokerUrl {
        outpost_agent::link::BrokerUrl { host: "127.0.0.1".into(), port: self.port, tls: false }
    }

    /// A broker running `conf` (written as `dir`/mosquitto.conf), whose one
    /// listener is on `port`: e.g. the shipped fleet configuration with its
    /// paths pointed at files the test put in `dir`. Returns once `port` answers.
    pub fn start_conf(dir: tempfile::TempDir, conf: &str, port: u16) -> Mosquitto {
        use std::os::unix::fs::PermissionsExt;
        // Started as root, Mosquitto reads these, and writes its log and
        // database here, as its own user.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
        std::fs::write(dir.path().join("mosquitto.conf"), conf).unwrap();
        let mut m = Mosquitto { port, tls_port: Some(port), child: None, dir };
        m.spawn();
        m
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on port {port} after 10 s");
}

/// A registry directory served over HTTP for the life of the test runtime.
pub struct Registry {
    pub dir: tempfile::TempDir,
    pub url: String,
}

impl Registry {
    pub async fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(outpost_sim::registry::serve_http(dir.path().to_path_buf(), listener));
        Registry { dir, url }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Registers a fixture model with the fixture labels.
    pub fn register(&self, fixture_model: &str, name: &str, version: &str) -> String {
        let r = register(&RegisterSpec {
            model: fixture(fixture_model),
            name: name.into(),
            version: version.into(),
            registry: self.root().to_path_buf(),
            labels: Some(fixture("labels.txt")),
            sample: None,
            shapes: vec![],
            tolerance: 1e-4,
            top_k: 3,
            scale: None,
            runtime: None,
        })
        .unwrap();
        r.manifest_sha256
    }

    /// Registers one of the hostile models of `fixtures/hostile/` without running it.
    pub fn register_hostile(&self, stem: &str, name: &str, version: &str) -> String {
        outpost_sim::registry::register_hostile(&fixture(""), stem, self.root(), name, version).unwrap()
    }

    /// Rewrites a version's manifest after its files were changed on purpose,
    /// so only the change under test is wrong. Returns the new manifest sha256.
    pub fn rehash(&self, name: &str, version: &str) -> String {
        let dir = self.root().join(name).join(version);
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        for f in m["files"].as_array_mut().unwrap() {
            let bytes = std::fs::read(dir.join(f["path"].as_str().unwrap())).unwrap();
            f["sha256"] = sha256(&bytes).into();
            f["size"] = bytes.len().into();
        }
        let bytes = serde_json::to_vec_pretty(&m).unwrap();
        std::fs::write(dir.join("manifest.json"), &bytes).unwrap();
        sha256(&bytes)
    }

    pub fn manifest_url(&self, name: &str, version: &str) -> String {
        format!("{}/{name}/{version}/manifest.json", self.url)
    }
}

/// The `outpost` binary running as a device, killed on drop. Its log is in `log`.
pub struct Agent {
    pub device: String,
    /// Port of the agent's local Open Inference Protocol endpoint.
    pub http_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
    /// Extra environment for the next spawns.
    pub env: Vec<(String, String)>,
    /// The memory cgroup the next spawns run in (see [`MemoryCgroup`]).
    pub cgroup: Option<PathBuf>,
}

impl Agent {
    pub fn start(broker_port: u16, device: &str, data_dir: &Path, groups: &[&str]) -> Agent {
        Agent::start_with(broker_port, device, data_dir, groups, &[])
    }

    /// Like `start`, with extra `outpost run` flags (later flags win).
    pub fn start_with(broker_port: u16, device: &str, data_dir: &Path, groups: &[&str], extra: &[&str]) -> Agent {
        Agent::start_with_env(broker_port, device, data_dir, groups, extra, &[])
    }

    /// Like `start_with`, with extra environment variables.
    pub fn start_with_env(
        broker_port: u16,
        device: &str,
        data_dir: &Path,
        groups: &[&str],
        extra: &[&str],
        env: &[(String, String)],
    ) -> Agent {
        let http_port = outpost_sim::broker::free_port().unwrap();
        let mut args = vec!["run".to_string()];
        if !extra.contains(&"--broker") {
            args.extend(["--broker".to_string(), format!("mqtt://127.0.0.1:{broker_port}")]);
        }
        args.extend(["--device".into(), device.into(), "--data-dir".into(), data_dir.display().to_string()]);
        for g in groups {
            args.push("--group".into());
            args.push((*g).into());
        }
        for (flag, value) in
            [("--download-attempts", "2".to_string()), ("--http-bind", format!("127.0.0.1:{http_port}"))]
        {
            if !extra.contains(&flag) {
                args.extend([flag.to_string(), value]);
            }
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut a = Agent {
            device: device.into(),
            http_port,
            data_dir: data_dir.into(),
            log: data_dir.with_extension("log"),
            child: None,
            args,
            env: env.to_vec(),
            cgroup: None,
        };
        a.spawn();
        a
    }

    /// Starts the agent process again (after [`Agent::kill`]).
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(agent_binary())
            .args(&self.args)
            .env("OUTPOST_LOG", "debug,rumqttc=info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        if let Some(cg) = &self.cgroup {
            std::fs::write(cg.join("cgroup.procs"), child.id().to_string()).unwrap();
        }
        self.child = Some(child);
    }

    /// The agent's process id (0 when it is not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Hard kill (power cut), then start again with the same arguments (and
    /// the current `env`). Also restarts an agent that crashed by itself.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Waits up to `timeout` for the process to end by itself; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends a signal (SIGTERM, SIGHUP, ...) to the running agent.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let child = self.child.as_ref().expect("the agent is running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a pid");
        rustix::process::kill_process(pid, signal).expect("kill");
    }

    /// Waits until the agent's log holds `what` at least `times` times.
    pub fn wait_log(&self, what: &str, times: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.matches(what).count() >= times {
                return;
            }
            assert!(Instant::now() < deadline, "{what:?} not logged {times} time(s) within {timeout:?}:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A raw POST to digits' infer route with these header lines (each ending
/// `\r\n`) and `body`, on a new connection: see [`raw_http`].
pub async fn raw_infer(port: u16, headers: &str, body: &[u8], wait: Duration) -> (u16, String) {
    raw_http(port, &format!("POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n{headers}\r\n"), body, wait).await
}

/// Writes `head` (and `body`) on a new connection and reads what comes back
/// within `wait`: (status, text); status 0 when the server said nothing.
pub async fn raw_http(port: u16, head: &str, body: &[u8], wait: Duration) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let _ = tcp.write_all(body).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// A cgroup v1 memory cgroup with a limit, what systemd's `MemoryMax=`
/// gives a service; removed on drop. `None` where this machine does not
/// allow creating one (the test says so and skips that part).
pub struct MemoryCgroup {
    pub dir: PathBuf,
}

impl MemoryCgroup {
    pub fn new(name: &str, limit: u64) -> Option<MemoryCgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let path = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers.split(',').any(|c| c == "memory").then(|| path.to_string())
        })?;
        let dir = PathBuf::from(format!("/sys/fs/cgroup/memory{path}/{name}-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        let cg = MemoryCgroup { dir };
        std::fs::write(cg.dir.join("memory.limit_in_bytes"), limit.to_string()).ok()?;
        // No swap to escape to, where the kernel accounts it.
        let _ = std::fs::write(cg.dir.join("memory.memsw.limit_in_bytes"), limit.to_string());
        Some(cg)
    }

    /// How many times the kernel's OOM killer acted in it.
    pub fn oom_kills(&self) -> u64 {
        let text = std::fs::read_to_string(self.dir.join("memory.oom_control")).unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An operator connected to the test's broker, watching one device.
pub struct Watcher {
    pub op: Operator,
    pub client: Operator,
    pub device: String,
    pub topics: Topics,
}

impl Watcher {
    pub async fn new(broker: &Mosquitto, device: &str) -> Watcher {
        Watcher::named(broker, device, "").await
    }

    /// A second watcher of the same device needs its own MQTT client ids.
    pub async fn named(broker: &Mosquitto, device: &str, name: &str) -> Watcher {
        Watcher::connect(broker, device, name, true).await
    }

    /// `clean: false`: the broker keeps this watcher's subscriptions and
    /// queues what it misses while away (across a restart of a persistent broker).
    pub async fn connect(broker: &Mosquitto, device: &str, name: &str, clean: bool) -> Watcher {
        let topics = Topics::default();
        let mut op = Operator::connect_with(&broker.url(), &format!("watch{name}-{device}"), topics.clone(), clean)
            .await
            .unwrap();
        op.subscribe(&topics.events(device)).await.unwrap();
        op.subscribe(&topics.state(device)).await.unwrap();
        op.subscribe(&topics.availability(device)).await.unwrap();
        let mut client =
            Operator::connect(&broker.url(), &format!("client{name}-{device}"), topics.clone()).await.unwrap();
        client.subscribe(&topics.predictions(device)).await.unwrap();
        Watcher { op, client, device: device.into(), topics }
    }

    /// Waits until the device says `online`.
    pub async fn online(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(m) = self.op.next(Duration::from_millis(200)).await
                && m.topic.ends_with("/availability")
                && &m.payload[..] == b"online"
            {
                return;
            }
        }
        panic!("{} did not come online", self.device);
    }

    /// Publishes a deployment of a registered version and returns its final
    /// event and every event seen for it.
    pub async fn deploy(
        &mut self,
        reg: &Registry,
        name: &str,
        version: &str,
    ) -> (DeploymentEvent, Vec<DeploymentEvent>) {
        let (url, sha) = resolve_manifest(&reg.url, name, version).await.unwrap();
        self.deploy_raw(name, version, &url, &sha).await
    }

    pub async fn deploy_raw(
        &mut self,
        name: &str,
        version: &str,
        url: &str,
        sha: &str,
    ) -> (DeploymentEvent, Vec<DeploymentEvent>) {
        let mut d = deployment(name, version, url, sha, None, None);
        // The tests swap back and forth between versions; the downgrade
        // rule has its own tests (trust.rs).
        d.policy.allow_downgrade = Some(true);
        self.publish_desired(d.to_json()).await;
        self.events_until_final(&d.deployment_id).await
    }

    pub async fn publish_desired(&mut self, payload: Vec<u8>) {
        self.op.publish(&self.topics.device_desired(&self.device), payload, true).await.unwrap();
    }

    pub async fn events_until_final(&mut self, deployment_id: &str) -> (DeploymentEvent, Vec<DeploymentEvent>) {
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let Some(m) = self.op.next(Duration::from_millis(200)).await else { continue };
            if !m.topic.ends_with("/events") {
                continue;
            }
            let ev = DeploymentEvent::from_json(&m.payload).unwrap();
            if ev.deployment_id != deployment_id {
                continue;
            }
            seen.push(ev.clone());
            if ev.phase.is_final() {
                return (ev, seen);
            }
        }
        panic!("no final event for {deployment_id} within 60 s; seen {seen:?}");
    }

    /// The next event matching `pred`.
    pub async fn event(&mut self, pred: impl Fn(&DeploymentEvent) -> bool) -> DeploymentEvent {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let Some(m) = self.op.next(Duration::from_millis(200)).await else { continue };
            if m.topic.ends_with("/events")
                && let Ok(ev) = DeploymentEvent::from_json(&m.payload)
                && pred(&ev)
            {
                return ev;
            }
        }
        panic!("expected event not seen within 30 s");
    }

    /// The retained state as a fresh subscriber sees it, once it satisfies `pred`.
    pub async fn state(&mut self, broker: &Mosquitto, pred: impl Fn(&DeviceState) -> bool) -> DeviceState {
        let mut fresh =
            Operator::connect(&broker.url(), &format!("state-{}", self.device), self.topics.clone()).await.unwrap();
        fresh.subscribe(&self.topics.state(&self.device)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        while Instant::now() < deadline {
            let Some(m) = fresh.next(Duration::from_millis(200)).await else { continue };
            if m.topic.ends_with("/state") {
                let s = DeviceState::from_json(&m.payload).unwrap();
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
        }
        panic!("state never matched; last {last:?}");
    }

    /// Sends a raw request body to `infer` and returns the answer with the same id.
    pub async fn infer_raw(&mut self, id: &str, body: Vec<u8>) -> serde_json::Value {
        self.client.publish(&self.topics.infer(&self.device), body, false).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let Some(m) = self.client.next(Duration::from_millis(200)).await else { continue };
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            if v["id"] == id {
                return v;
            }
        }
        panic!("no answer to {id} within 30 s");
    }

    pub async fn infer(&mut self, id: &str, request: serde_json::Value) -> serde_json::Value {
        let mut r = request;
        r["id"] = id.into();
        self.infer_raw(id, serde_json::to_vec(&r).unwrap()).await
    }
}

/// The usual cast of an end-to-end test: a Mosquitto broker, an empty
/// registry over HTTP, a data dir, an operator watching `device`, and the
/// `outpost` binary running as `device` (with `groups` and `extra` flags),
/// returned once the device says it is online.
pub async fn lab(
    device: &str,
    groups: &[&str],
    extra: &[&str],
) -> (Mosquitto, Registry, tempfile::TempDir, Watcher, Agent) {
    Lab::device(device).groups(groups).flags(extra).start().await
}

/// Builds the cast of [`lab`] step by step, e.g.
/// `Lab::device("cam-1").model("digits-mlp.onnx", "digits", "1").env("OUTPOST_DELAY_AT", "before-swap:3000").start()`.
#[derive(Debug, Default)]
pub struct Lab {
    device: String,
    groups: Vec<String>,
    flags: Vec<String>,
    env: Vec<(String, String)>,
    models: Vec<(String, String, String)>,
    broker_conf: Option<String>,
}

impl Lab {
    pub fn device(device: &str) -> Lab {
        Lab { device: device.into(), ..Default::default() }
    }

    pub fn groups(mut self, groups: &[&str]) -> Lab {
        self.groups.extend(groups.iter().map(|g| g.to_string()));
        self
    }

    /// Extra `outpost run` flags (later flags win).
    pub fn flags(mut self, flags: &[&str]) -> Lab {
        self.flags.extend(flags.iter().map(|f| f.to_string()));
        self
    }

    /// An environment variable of the agent's process.
    pub fn env(mut self, key: &str, value: &str) -> Lab {
        self.env.push((key.into(), value.into()));
        self
    }

    /// A fixture model registered as `name@version` before the agent starts.
    pub fn model(mut self, fixture_model: &str, name: &str, version: &str) -> Lab {
        self.models.push((fixture_model.into(), name.into(), version.into()));
        self
    }

    /// Extra Mosquitto configuration lines for this lab's broker.
    pub fn broker_conf(mut self, conf: &str) -> Lab {
        self.broker_conf = Some(conf.into());
        self
    }

    /// Starts everything; returns once the device says it is online.
    pub async fn start(self) -> (Mosquitto, Registry, tempfile::TempDir, Watcher, Agent) {
        let broker = match &self.broker_conf {
            Some(conf) => Mosquitto::start_extra(false, conf),
            None => Mosquitto::start(),
        };
        let reg = Registry::start().await;
        for (fixture_model, name, version) in &self.models {
            reg.register(fixture_model, name, version);
        }
        let data = tempfile::tempdir().unwrap();
        let mut w = Watcher::new(&broker, &self.device).await;
        let groups: Vec<&str> = self.groups.iter().map(String::as_str).collect();
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        let dir = data.path().join(&self.device);
        let agent = Agent::start_with_env(broker.port, &self.device, &dir, &groups, &flags, &self.env);
        w.online().await;
        (broker, reg, data, w, agent)
    }
}

/// Held-out digits from the fixtures: (images, labels).
pub fn heldout() -> (Vec<Vec<f64>>, Vec<usize>) {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture("digits-heldout.json")).unwrap()).unwrap();
    let images = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        .collect();
    let labels = v["labels"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    (images, labels)
}

/// onnxruntime's probabilities for the held-out digits.
pub fn expected_probabilities(fixture_name: &str) -> Vec<Vec<f64>> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture(fixture_name)).unwrap()).unwrap();
    v["probabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        .collect()
}

/// A request with the first `n` held-out digits as one batch, as nested rows.
pub fn digits_request(n: usize) -> serde_json::Value {
    let (images, _) = heldout();
    let rows: Vec<&Vec<f64>> = images.iter().take(n).collect();
    serde_json::json!({"inputs": [{"name": "input", "shape": [rows.len(), 64], "datatype": "FP32", "data": rows}]})
}

/// Checks an answer against onnxruntime's outputs: returns (max |diff|, accuracy).
pub fn score(answer: &serde_json::Value, expected: &[Vec<f64>]) -> (f64, f64) {
    let (_, labels) = heldout();
    let out = answer["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "probabilities")
        .unwrap_or_else(|| panic!("no probabilities in {answer}"));
    let data: Vec<f64> = out["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let rows = data.len() / 10;
    let mut max_diff: f64 = 0.0;
    let mut correct = 0;
    for r in 0..rows {
        let row = &data[r * 10..r * 10 + 10];
        for (a, b) in row.iter().zip(&expected[r]) {
            max_diff = max_diff.max((a - b).abs());
        }
        let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        if best == labels[r] {
            correct += 1;
        }
    }
    (max_diff, correct as f64 / rows as f64)
}

pub fn phase_names(events: &[DeploymentEvent]) -> Vec<Phase> {
    let mut v: Vec<Phase> = events.iter().map(|e| e.phase).collect();
    v.dedup();
    v
}

/// A plain HTTP call to the agent's local endpoint: (status, JSON body).
/// POSTs a body of the binary tensor extension (`json` then `tail`); returns
/// the status, the response's Inference-Header-Content-Length and its body.
pub async fn http_binary(url: String, json: serde_json::Value, tail: Vec<u8>) -> (u16, Option<usize>, Vec<u8>) {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let mut body = serde_json::to_vec(&json).unwrap();
        let n = body.len();
        body.extend_from_slice(&tail);
        let resp = agent
            .post(&url)
            .header("content-type", "application/octet-stream")
            .header("inference-header-content-length", n.to_string())
            .send(body)
            .unwrap();
        let status = resp.status().as_u16();
        let header = resp.headers().get("inference-header-content-length").and_then(|v| v.to_str().ok()?.parse().ok());
        (status, header, resp.into_body().with_config().limit(1 << 30).read_to_vec().unwrap())
    })
    .await
    .unwrap()
}

pub async fn http(method: &str, url: String, body: Option<Vec<u8>>) -> (u16, serde_json::Value) {
    let shown = url.clone();
    try_http(method, url, body).await.unwrap_or_else(|e| panic!("{method} {shown}: {e}"))
}

/// Like `http`, with a transport error (nothing listening yet) as `Err`.
pub async fn try_http(method: &str, url: String, body: Option<Vec<u8>>) -> Result<(u16, serde_json::Value), String> {
    let method = method.to_string();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let resp = match body {
            Some(b) => agent.post(&url).header("content-type", "application/json").send(b),
            None if method == "GET" => agent.get(&url).call(),
            None => panic!("unsupported method {method}"),
        }
        .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let text = resp.into_body().read_to_string().map_err(|e| e.to_string())?;
        Ok((status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))))
    })
    .await
    .unwrap()
}

/// What the faulty registry does to one request for a path.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answer with this status and no body.
    Status(u16),
    /// Announce the whole body, send only this many bytes, close.
    Truncate(usize),
    /// Send this many bytes, then nothing for the given time.
    Stall(usize, Duration),
    /// Send the file followed by this many extra bytes (a file larger than declared).
    Append(usize),
}

type Shared<T> = std::sync::Arc<std::sync::Mutex<T>>;

/// A registry over HTTP/1.1 that serves files (honouring `Range`) but injects
/// scripted faults per path, and logs every request as (path, range header).
pub struct FaultyRegistry {
    pub url: String,
    faults: Shared<std::collections::HashMap<String, std::collections::VecDeque<Fault>>>,
    log: Shared<Vec<(String, Option<String>)>>,
}

impl FaultyRegistry {
    pub async fn start(root: PathBuf) -> FaultyRegistry {
        FaultyRegistry::listen(root, None).await
    }

    /// The same over HTTPS, with the server certificate of `pki`.
    pub async fn start_tls(root: PathBuf, pki: &TestPki) -> FaultyRegistry {
        FaultyRegistry::listen(root, Some(tokio_rustls::TlsAcceptor::from(pki.server_config()))).await
    }

    async fn listen(root: PathBuf, tls: Option<tokio_rustls::TlsAcceptor>) -> FaultyRegistry {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let faults: Shared<std::collections::HashMap<String, std::collections::VecDeque<Fault>>> = Default::default();
        let log: Shared<Vec<(String, Option<String>)>> = Default::default();
        let (f2, l2) = (faults.clone(), log.clone());
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { return };
                let (faults, log, root, tls) = (f2.clone(), l2.clone(), root.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => serve_faulty(sock, faults, log, root).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(sock).await {
                                serve_faulty(stream, faults, log, root).await;
                            }
                        }
                    }
                });
            }
        });
        FaultyRegistry { url, faults, log }
    }

    /// Queues faults for the next requests of `path` (relative to the root).
    pub fn inject(&self, path: &str, faults: &[Fault]) {
        self.faults.lock().unwrap().entry(path.to_string()).or_default().extend(faults.iter().cloned());
    }

    /// Requests seen for `path`, with their Range header.
    pub fn requests(&self, path: &str) -> Vec<Option<String>> {
        self.log.lock().unwrap().iter().filter(|(p, _)| p == path).map(|(_, r)| r.clone()).collect()
    }
}

/// Answers one request on `sock` from `root`, applying the next queued fault for its path.
async fn serve_faulty<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut sock: S,
    faults: Shared<std::collections::HashMap<String, std::collections::VecDeque<Fault>>>,
    log: Shared<Vec<(String, Option<String>)>>,
    root: PathBuf,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
        if sock.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
    let range =
        head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("range: bytes=").map(|r| r.trim().to_string()));
    log.lock().unwrap().push((path.clone(), range.clone()));
    let fault = faults.lock().unwrap().get_mut(&path).and_then(|q| q.pop_front());
    let Ok(body) = std::fs::read(root.join(&path)) else {
        let _ = sock.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
        return;
    };
    let from = range.as_deref().and_then(|r| r.trim_end_matches('-').parse::<usize>().ok()).unwrap_or(0);
    let (status, slice) =
        if from > 0 && from < body.len() { ("206 Partial Content", &body[from..]) } else { ("200 OK", &body[..]) };
    let head = |len: usize| format!("HTTP/1.1 {status}\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n");
    match fault {
        Some(Fault::Status(s)) => {
            let _ = sock
                .write_all(
                    format!("HTTP/1.1 {s} Fault\r\ncontent-length: 0\r\nretry-after: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        }
        Some(Fault::Truncate(n)) => {
            let _ = sock.write_all(head(slice.len()).as_bytes()).await;
            let _ = sock.write_all(&slice[..n.min(slice.len())]).await;
        }
        Some(Fault::Stall(n, d)) => {
            let _ = sock.write_all(head(slice.len()).as_bytes()).await;
            let _ = sock.write_all(&slice[..n.min(slice.len())]).await;
            let _ = sock.flush().await;
            tokio::time::sleep(d).await;
        }
        Some(Fault::Append(extra)) => {
            let _ = sock.write_all(head(slice.len() + extra).as_bytes()).await;
            let _ = sock.write_all(slice).await;
            let _ = sock.write_all(&vec![b'x'; extra]).await;
        }
        None => {
            let _ = sock.write_all(head(slice.len()).as_bytes()).await;
            let _ = sock.write_all(slice).await;
        }
    }
    let _ = sock.shutdown().await;
}

/// A throw-away certificate authority and a server certificate it signed for
/// `localhost` and `127.0.0.1`, written as PEM files into `dir`.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    /// The CA certificate, to give a client (`--ca-file`).
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestPki {
    pub fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own: two test CAs must not look like the same issuer.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ca_params.distinguished_name.push(DnType::CommonName, format!("Outpost test CA {} {n}", std::process::id()));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        let (ca, server_cert, server_key) =
            (write("ca.pem", ca.pem()), write("server.pem", cert.pem()), write("server.key", key.serialize_pem()));
        TestPki { ca, server_cert, server_key, dir }
    }

    /// A rustls server configuration with the server certificate.
    pub fn server_config(&self) -> std::sync::Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(&self.server_cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&self.server_key).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        std::sync::Arc::new(config)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

/// A stand-in for systemd's notification socket (`NOTIFY_SOCKET`): collects
/// what the agent reports (`READY=1`, `WATCHDOG=1`, `STOPPING=1`, ...).
pub struct NotifySocket {
    pub path: PathBuf,
    rx: std::sync::mpsc::Receiver<(Instant, String)>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    pub fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                if tx.send((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned())).is_err() {
                    break;
                }
            }
        });
        NotifySocket { path, rx, _dir: dir }
    }

    /// The next notification within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<(Instant, String)> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Waits for a notification containing `what`; panics after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration) -> (Instant, String) {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some((at, m)) if m.contains(what) => return (at, m),
                Some((_, m)) => seen.push(m),
                None => break,
            }
        }
        panic!("no notification with {what:?} within {timeout:?}; seen {seen:?}");
    }

    /// Everything received within `window`, with when it arrived.
    pub fn collect_timed(&self, window: Duration) -> Vec<(Instant, String)> {
        let deadline = Instant::now() + window;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some(m) => seen.push(m),
                None => break,
            }
        }
        seen
    }

    /// Everything received within `window`.
    pub fn collect(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some((_, m)) => seen.push(m),
                None => break,
            }
        }
        seen
    }
}

impl Default for NotifySocket {
    fn default() -> Self {
        Self::new()
    }
}

/// The sum of every sample of one family in a Prometheus text exposition
/// (all label sets of a counter), 0 when it has none.
pub fn metric_total(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.chars().next()? {
                '{' => rest.rsplit_once(' ')?.1,
                ' ' => rest.trim(),
                _ => return None,
            };
            value.parse::<f64>().ok()
        })
        .sum::<f64>() as u64
}
