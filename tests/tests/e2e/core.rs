//! The agent's core under faults its shape used to hide (issue 13): the
//! watchdog during a broker outage, late probation verdicts, requests at
//! SIGTERM, superseded deployments, a crash while the journal is replayed.

use super::{Outage, persisted_active};
use outpost_protocol::{ErrorCode, Outcome, Phase, Probation};
use outpost_sim::operator::{deployment, resolve_manifest};
use outpost_tests::*;
use std::time::{Duration, Instant};

/// Restarts `agent` with `env` added (the harness starts it without).
fn restart_with(agent: &mut Agent, env: &[(&str, &str)]) {
    agent.kill();
    agent.env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    agent.kill_and_restart();
}

/// Regression (defect 1): the reconnect backoff slept inside the main loop
/// (up to 30 s), so during a broker outage the watchdog went unfed and
/// systemd killed a healthy agent. Waiting to reconnect is a timer now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_fed_all_through_a_broker_outage() {
    let notify = NotifySocket::new();
    // Nothing listens on this port: every connection attempt fails.
    let dead = outpost_sim::broker::free_port().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut agent = Agent::start_with(dead, "core1", &data.path().join("core1"), &[], &[]);
    restart_with(&mut agent, &[("NOTIFY_SOCKET", &notify.path.display().to_string()), ("WATCHDOG_USEC", "2000000")]);
    let (ready, _) = notify.wait_for("READY=1", Duration::from_secs(20));
    let pings: Vec<Instant> = notify
        .collect_timed(Duration::from_secs(15))
        .into_iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(at, _)| at)
        .collect();
    let mut gaps: Vec<Duration> = std::iter::once(ready)
        .chain(pings.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .collect();
    gaps.sort();
    let worst = gaps.last().copied().unwrap_or(Duration::from_secs(15));
    // Pinged every 1 s; systemd kills after 2 s without a ping. (The old
    // loop slept through its backoff: gaps of 4-8 s within 15 s.)
    assert!(
        worst < Duration::from_millis(1900),
        "a gap of {worst:?} between watchdog pings ({} pings in 15 s)",
        pings.len()
    );
    let log = std::fs::read_to_string(&agent.log).unwrap();
    let attempts = log.matches("MQTT connection lost").count();
    assert!(attempts >= 4, "the agent stopped trying to connect: {attempts} attempts in 15 s\n{log}");
    assert!(agent.is_running());
}

/// Regression (defect 2): v1 -> v2 on probation -> v3 downloading slowly; a
/// request v2 fails during v3's download rolls back to v1. The verdict used
/// to wait for v3's whole deployment and then record "v1 active" over v3:
/// the retained state and the disk said v1 while v3 served, and after a
/// restart v1 served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probation_verdict_reached_during_a_newer_deployment_does_not_rewrite_it() {
    let (broker, reg, data, mut w, mut agent) = Lab::device("core2")
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-fragile.onnx", "digits", "2")
        .model("digits-cnn.onnx", "digits", "3")
        .flags(&["--stall-timeout", "30"])
        .start()
        .await;
    let faulty = FaultyRegistry::start(reg.root().to_path_buf()).await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let (url, sha) = resolve_manifest(&reg.url, "digits", "2").await.unwrap();
    let mut d2 = deployment("digits", "2", &url, &sha, None, None);
    d2.policy.probation =
        Some(Probation { seconds: Some(120), min_requests: Some(5), max_non_finite: Some(1), ..Default::default() });
    w.publish_desired(d2.to_json()).await;
    assert_eq!(w.events_until_final(&d2.deployment_id).await.0.phase, Phase::Active);

    // v3's model stalls for 4 s after 2000 bytes.
    faulty.inject("digits/3/model.onnx", &[Fault::Stall(2000, Duration::from_secs(4))]);
    let (url, sha) = resolve_manifest(&reg.url, "digits", "3").await.unwrap();
    let d3 = deployment("digits", "3", &url.replace(&reg.url, &faulty.url), &sha, None, None);
    w.publish_desired(d3.to_json()).await;
    w.event(|e| e.deployment_id == d3.deployment_id && e.phase == Phase::Downloading).await;

    // An input on which v2 turns non-finite: v1 answers it, and v2 is out at once.
    let mut poison = digits_request(2);
    poison["inputs"][0]["data"][1][0] = 16.0.into();
    assert_eq!(w.infer("poison", poison).await["model_version"], "1");
    let asked = Instant::now();
    let rolled_back = w.event(|e| e.deployment_id == d2.deployment_id && e.phase == Phase::RolledBack).await;
    assert_eq!(rolled_back.error.unwrap().code, ErrorCode::ProbationFailed);
    assert_eq!(rolled_back.detail.as_deref(), Some("rolled back: digits@1 serves again"));
    assert!(asked.elapsed() < Duration::from_secs(2), "the rollback was reported {:?} late", asked.elapsed());

    let (last, events) = w.events_until_final(&d3.deployment_id).await;
    assert_eq!(last.phase, Phase::Active, "{events:?}");
    assert_eq!(w.infer("v3", digits_request(1)).await["model_version"], "3");
    // What the broker retains and what the disk says agree with what serves.
    let state = w.state(&broker, |_| true).await;
    assert_eq!(state.active.as_ref().map(|a| a.version.as_str()), Some("3"), "{state:?}");
    let last = state.last_deployment.unwrap();
    assert_eq!((last.deployment_id.as_str(), last.outcome), (d3.deployment_id.as_str(), Outcome::Active));
    let dir = data.path().join("core2");
    assert_eq!(persisted_active(&dir).as_deref(), Some("3"));
    agent.kill_and_restart();
    w.online().await;
    assert_eq!(w.infer("restarted", digits_request(1)).await["model_version"], "3");
}

/// Regression (defect 3): an MQTT request received before SIGTERM but not
/// yet admitted to the worker pool was not waited for: its answer was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_request_received_before_sigterm_is_answered_before_the_goodbye() {
    // Each MQTT request waits 1.5 s between its arrival and its parsing.
    let (_broker, reg, _data, mut w, mut agent) = Lab::device("core3")
        .model("digits-mlp.onnx", "digits", "1")
        .env("OUTPOST_DELAY_AT", "mqtt-request:1500")
        .start()
        .await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let mut req = digits_request(1);
    req["id"] = "at-sigterm".into();
    w.client.publish(&w.topics.infer("core3"), serde_json::to_vec(&req).unwrap(), false).await.unwrap();
    agent.wait_log("OUTPOST_DELAY_AT=mqtt-request: delaying", 1, Duration::from_secs(10));
    agent.signal(rustix::process::Signal::TERM);
    let mut answer = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while answer.is_none() && Instant::now() < deadline {
        if let Some(m) = w.client.next(Duration::from_millis(100)).await {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            if v["id"] == "at-sigterm" {
                answer = Some(v);
            }
        }
    }
    let answer = answer.expect("the request received before SIGTERM was not answered");
    assert_eq!(answer["model_version"], "1", "{answer}");
    let status = agent.wait_exit(Duration::from_secs(15)).expect("the agent exits within its grace period");
    assert!(status.success(), "{status:?}");
}

/// Regression (defect 5): the HTTP port was moved while a deployment was
/// prepared, before it was known whether that deployment would be swapped
/// in: a superseded one left the endpoint on its port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_deployment_leaves_the_http_port_where_it_was() {
    // Every deployment waits 3 s between its last check and its swap.
    let (_broker, reg, _data, mut w, agent) = Lab::device("core5")
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-cnn.onnx", "digits", "2")
        .env("OUTPOST_DELAY_AT", "before-swap:3000")
        .start()
        .await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let default = format!("http://127.0.0.1:{}/v2/models/digits", agent.http_port);
    assert_eq!(http("GET", default.clone(), None).await.1["versions"][0], "1");

    // v2 asks for another port; v3 (a wrong digest) supersedes it just before its swap.
    let port = outpost_sim::broker::free_port().unwrap();
    let (url, sha) = resolve_manifest(&reg.url, "digits", "2").await.unwrap();
    let mut d2 = deployment("digits", "2", &url, &sha, None, None);
    d2.serving.http_port = Some(port);
    w.publish_desired(d2.to_json()).await;
    agent.wait_log("OUTPOST_DELAY_AT=before-swap: delaying", 2, Duration::from_secs(20));
    let (url1, _) = resolve_manifest(&reg.url, "digits", "1").await.unwrap();
    let d3 = deployment("digits", "1", &url1, &"0".repeat(64), None, None);
    w.publish_desired(d3.to_json()).await;
    assert_eq!(w.events_until_final(&d2.deployment_id).await.0.phase, Phase::Superseded);
    assert_eq!(w.events_until_final(&d3.deployment_id).await.0.phase, Phase::Failed);

    let served = try_http("GET", default, None).await;
    assert_eq!(served.as_ref().map(|(s, b)| (*s, b["versions"][0].clone())), Ok((200, "1".into())), "{served:?}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the superseded deployment's port listens");
}

/// Regression (defect 6): replaying the journal emptied its file before the
/// messages were published, so a crash during the replay lost them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_the_journal_is_replayed_loses_nothing() {
    let Outage { mut broker, dir, mut w, mut agent, d, _reg, _faulty, _data, .. } =
        super::deploy_through_an_outage("core6").await;
    // The broker returns; the agent dies while it replays the journal.
    restart_with(&mut agent, &[("OUTPOST_CRASH_AT", "journal-taken")]);
    broker.restart();
    let status = agent.wait_exit(Duration::from_secs(30)).expect("the crash point was reached");
    assert!(!status.success());
    let kept = std::fs::read_to_string(dir.join("journal.jsonl")).unwrap_or_default();
    assert!(kept.contains(r#"\"phase\":\"active\""#), "the journal lost what it held: {kept:?}");

    // Restarted, it publishes what the journal held.
    agent.env.clear();
    agent.kill_and_restart();
    let ev = w.event(|e| e.deployment_id == d.deployment_id && e.phase == Phase::Active).await;
    assert!(ev.detail.unwrap().starts_with("digits@2 serving"));
}

/// Regression (defect 7): a bundle listing a file named `manifest.json`
/// whose bytes are another stored version's model had that blob hard-linked
/// where the agent then wrote its own manifest: the other version's model
/// was overwritten, and rolling back to it (or restarting) failed. Such a
/// bundle is refused before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_file_named_manifest_json_is_refused_and_damages_nothing() {
    let (_broker, reg, data, mut w, mut agent) = Lab::device("core7")
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-cnn.onnx", "digits", "8")
        .start()
        .await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let model = std::fs::read(fixture("digits-mlp.onnx")).unwrap();
    let path = reg.root().join("digits/8/manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let hostile = serde_json::json!({"path": "manifest.json", "sha256": outpost_sim::registry::sha256(&model),
        "size": model.len(), "url": format!("{}/digits/1/model.onnx", reg.url)});
    manifest["files"].as_array_mut().unwrap().push(hostile);
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let sha = outpost_sim::registry::sha256(&bytes);
    let (last, events) = w.deploy_raw("digits", "8", &reg.manifest_url("digits", "8"), &sha).await;
    assert_eq!(last.phase, Phase::Failed, "{events:?}");
    let e = last.error.unwrap();
    assert_eq!(e.code, ErrorCode::InvalidManifest);
    assert!(e.message.contains("the name of the manifest itself"), "{}", e.message);
    assert_eq!(w.infer("still-v1", digits_request(1)).await["model_version"], "1");
    // The stored version one is intact: it re-verifies after a restart and serves.
    agent.kill_and_restart();
    w.online().await;
    assert_eq!(w.infer("restarted", digits_request(1)).await["model_version"], "1");
    super::assert_store_consistent(&data.path().join("core7"));
}

/// Under systemd, every line carries its syslog priority (`<4>` for a
/// warning) so `journalctl -p warning` finds it; only when stderr is the
/// stream `JOURNAL_STREAM` names (an inherited variable with another stderr
/// gets the plain format).
#[test]
fn under_journald_log_lines_carry_their_priority() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let run = |journal_stream: Option<&str>, log: &std::path::Path| {
        let file = std::fs::File::create(log).unwrap();
        let stream = journal_stream.map(str::to_string).unwrap_or_else(|| {
            let m = file.metadata().unwrap();
            format!("{}:{}", m.dev(), m.ino())
        });
        let mut child = std::process::Command::new(agent_binary())
            .args(["run", "--device", "journal-1", "--broker", "mqtt://127.0.0.1:9", "--http-bind", "off"])
            .arg("--data-dir")
            .arg(dir.path())
            .env("JOURNAL_STREAM", stream)
            .stderr(file)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let _ = child.kill();
        let _ = child.wait();
        std::fs::read_to_string(log).unwrap()
    };
    let text = run(None, &dir.path().join("journal.log"));
    let first = text.lines().next().unwrap_or_default();
    assert!(first.starts_with("<4> WARN trust.keys is empty"), "{text}");
    assert!(text.lines().all(|l| l.starts_with('<')), "{text}");
    let text = run(Some("1:2"), &dir.path().join("plain.log"));
    assert!(!text.contains("<4>") && text.contains("WARN"), "{text}");
}
