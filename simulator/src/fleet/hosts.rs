//! Where the fleet's agents run: in this process, or spread over worker
//! processes (`outpost-sim fleet-worker`, one agent library per device as
//! here) that the fleet drives over their standard input.
//!
//! Thousands of agents in one process cost more than the sum of their
//! parts: the open-file limit (20,000 here, and not raisable without
//! CAP_SYS_RESOURCE) holds each device's MQTT connection and both ends of
//! its registry connection, and arc-swap, which the agent uses for its
//! active model, pool and limits, walks a list as long as the most threads
//! that ever held an arc-swap reader at once on every store and drop: each
//! device's pipeline holds a blocking thread, so that cost grows with the
//! square of the devices in one process.
//!
//! Worker protocol, one line each way: the fleet writes `start ID`,
//! `stop ID` and `quit`; a worker writes `ready` once, then `ended ID` when
//! a device's agent has stopped (its run over, its store free for the next).

use outpost_agent::deploy::fetch::FetchConfig;
use outpost_agent::link::{BrokerUrl, SessionConfig};
use outpost_protocol::Topics;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Devices per worker process when the fleet is left to choose.
pub const DEVICES_PER_PROCESS: usize = 2500;

pub(super) fn agent_config(id: &str, group: &str, broker: &BrokerUrl, data: &Path) -> outpost_agent::Config {
    outpost_agent::Config {
        device: id.to_string(),
        groups: vec![group.to_string()],
        data_dir: data.join(id),
        topics: Topics::default(),
        session: SessionConfig {
            broker: broker.clone(),
            client_id: format!("outpost-{id}"),
            keep_alive: Duration::from_secs(30),
            max_packet_size: 1 << 20,
            tls: None,
            credentials: None,
            persistent_session: false,
            protocol: Default::default(),
            read_oversize: false,
        },
        fetch: FetchConfig {
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(2),
            attempts: 8,
            ..FetchConfig::default()
        },
        http_bind: None,
        metrics_bind: None,
        isolation: outpost_agent::deploy::isolate::Isolation::InProcess,
        http_limits: Default::default(),
        trust: Default::default(),
        reply_prefixes: vec!["outpost/replies/".into()],
        mqtt_max_inflight_bytes: 64 << 20,
        journal_max_bytes: 16 << 20,
        live: outpost_agent::config::Live {
            workers: 1,
            max_queue: 4,
            telemetry_interval: Duration::from_secs(3600),
            // Long enough for the drain to end with the deployer: a device
            // brought back (offline role) must not share its store with a
            // deployer of its previous run still writing its record, which a
            // real device's exit would have ended (model_crashed otherwise).
            shutdown_grace: Duration::from_secs(10),
            ..Default::default()
        },
    }
}

/// Starts one agent; firing or dropping the sender stops it.
fn start_agent(
    id: &str,
    group: &str,
    broker: &BrokerUrl,
    data: &Path,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = oneshot::channel::<()>();
    let config = agent_config(id, group, broker, data);
    let id = id.to_string();
    let task = tokio::spawn(async move {
        let (_reload, reload_rx) = mpsc::unbounded_channel();
        if let Err(e) = outpost_agent::run(
            config,
            async {
                let _ = rx.await;
            },
            reload_rx,
        )
        .await
        {
            eprintln!("outpost-sim fleet: {id}: {e}");
        }
    });
    (tx, task)
}

/// An agent running in this process.
struct Local {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// A worker process and the line its devices are written on.
struct Worker {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
}

/// The devices' hosts.
pub(super) struct Hosts {
    group: String,
    broker: BrokerUrl,
    stores: PathBuf,
    local: HashMap<String, Local>,
    workers: Vec<Worker>,
    /// Devices started in a worker and not yet reported ended.
    remote: std::collections::HashSet<String>,
    /// `ended ID` lines from the workers' outputs.
    ended: mpsc::UnboundedReceiver<String>,
}

impl Hosts {
    /// `processes` > 1: that many worker processes of `exe` (outpost-sim);
    /// otherwise every agent runs in this process.
    pub(super) fn new(
        processes: usize,
        exe: &Path,
        group: &str,
        broker: &BrokerUrl,
        stores: &Path,
    ) -> Result<Hosts, String> {
        let (tx, ended) = mpsc::unbounded_channel();
        let mut workers = Vec::new();
        for _ in 0..if processes > 1 { processes } else { 0 } {
            let mut child = std::process::Command::new(exe)
                .args(["fleet-worker", "--broker", &broker.to_string(), "--group", group])
                .arg("--stores")
                .arg(stores)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("{}: {e}", exe.display()))?;
            let stdin = child.stdin.take().ok_or("a worker without its standard input")?;
            let stdout = child.stdout.take().ok_or("a worker without its standard output")?;
            let mut lines = std::io::BufReader::new(stdout).lines();
            match lines.next() {
                Some(Ok(l)) if l == "ready" => {}
                other => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("a fleet worker did not start ({other:?})"));
                }
            }
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in lines.map_while(Result::ok) {
                    if let Some(id) = line.strip_prefix("ended ") {
                        let _ = tx.send(id.to_string());
                    }
                }
            });
            workers.push(Worker { child, stdin });
        }
        Ok(Hosts {
            group: group.into(),
            broker: broker.clone(),
            stores: stores.into(),
            local: HashMap::new(),
            workers,
            remote: Default::default(),
            ended,
        })
    }

    /// The worker processes' ids (none when the agents run here).
    pub(super) fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.child.id()).collect()
    }

    fn worker_of(&mut self, i: usize) -> &mut Worker {
        let n = self.workers.len();
        &mut self.workers[i % n]
    }

    fn tell(&mut self, i: usize, line: &str) -> Result<(), String> {
        let w = self.worker_of(i);
        writeln!(w.stdin, "{line}").and_then(|_| w.stdin.flush()).map_err(|e| format!("a fleet worker: {e}"))
    }

    /// Starts device `i` (its id `id`).
    pub(super) fn start(&mut self, i: usize, id: &str) -> Result<(), String> {
        if self.workers.is_empty() {
            let (stop, task) = start_agent(id, &self.group, &self.broker, &self.stores);
            self.local.insert(id.to_string(), Local { stop: Some(stop), task });
            Ok(())
        } else {
            self.remote.insert(id.to_string());
            self.tell(i, &format!("start {id}"))
        }
    }

    /// Asks device `i` to stop (it is running until [`Hosts::running`] says otherwise).
    pub(super) fn stop(&mut self, i: usize, id: &str) -> Result<(), String> {
        if self.workers.is_empty() {
            if let Some(stop) = self.local.get_mut(id).and_then(|l| l.stop.take()) {
                let _ = stop.send(());
            }
            Ok(())
        } else {
            self.tell(i, &format!("stop {id}"))
        }
    }

    /// Whether a run of the device is still going (a stopped one is over
    /// only when its agent has drained and ended).
    pub(super) fn running(&mut self, id: &str) -> bool {
        while let Ok(ended) = self.ended.try_recv() {
            self.remote.remove(&ended);
        }
        match self.local.get(id) {
            Some(l) => !l.task.is_finished(),
            None => self.remote.contains(id),
        }
    }

    /// Stops every agent and waits for them until `deadline` (their stores
    /// must outlive them), the worker processes too.
    pub(super) async fn finish(mut self, deadline: tokio::time::Instant) {
        for l in self.local.values_mut() {
            if let Some(stop) = l.stop.take() {
                let _ = stop.send(());
            }
        }
        for l in self.local.into_values() {
            let _ = tokio::time::timeout_at(deadline, l.task).await;
        }
        for w in &mut self.workers {
            let _ = writeln!(w.stdin, "quit").and_then(|_| w.stdin.flush());
        }
        for mut w in self.workers {
            while tokio::time::Instant::now() < deadline && matches!(w.child.try_wait(), Ok(None)) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // An early return of the fleet leaves no worker behind.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `outpost-sim fleet-worker`: runs the agents the fleet starts on its
/// standard input until `quit` (or the end of its input), then stops them
/// all and waits for them.
pub async fn worker(broker: BrokerUrl, group: String, stores: PathBuf) -> Result<(), String> {
    super::raise_open_files(u64::MAX);
    let (lines_tx, mut lines) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<String>();
    let mut running: HashMap<String, oneshot::Sender<()>> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let say = |line: &str| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}").and_then(|_| out.flush());
    };
    say("ready");
    loop {
        tokio::select! {
            line = lines.recv() => {
                let Some(line) = line else { break };
                match line.split_once(' ') {
                    Some(("start", id)) => {
                        let (stop, task) = start_agent(id, &group, &broker, &stores);
                        running.insert(id.to_string(), stop);
                        let (tx, id) = (ended_tx.clone(), id.to_string());
                        tasks.spawn(async move {
                            let _ = task.await;
                            let _ = tx.send(id);
                        });
                    }
                    Some(("stop", id)) => {
                        if let Some(stop) = running.remove(id) {
                            let _ = stop.send(());
                        }
                    }
                    _ if line == "quit" => break,
                    _ => eprintln!("outpost-sim fleet-worker: unknown command {line:?}"),
                }
            }
            Some(id) = ended.recv() => {
                running.remove(&id);
                say(&format!("ended {id}"));
            }
        }
    }
    for (_, stop) in running.drain() {
        let _ = stop.send(());
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}
