//! The broker configuration shipped for a real fleet
//! (`packaging/mosquitto/`), run as shipped with only its paths and port
//! changed: mutual TLS where the certificate's CN is the identity, and the
//! ACL that `make-acl.sh` writes. The device serves what the operator
//! deploys; another device can neither deploy to it nor take its session.

use outpost_protocol::{Deployment, DeploymentEvent, DeviceState, Phase, Topics};
use outpost_sim::operator::{deployment, resolve_manifest};
use outpost_tests::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, TlsConfiguration, Transport};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PACKAGING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/mosquitto");

/// cam-1 follows group `cameras` and is deployed to through it and its own
/// topic; it answers over HTTP and MQTT. cam-2, a device of the same fleet
/// (and group), publishes a deployment on cam-1's topics and connects with
/// cam-1's client id: nothing reaches cam-1, which stays online throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_broker_keeps_each_device_to_its_own_topics_and_session() {
    let topics = Topics::default();
    let certs = tempfile::tempdir().unwrap();
    make_pki(certs.path(), &["cam-1", "cam-2", "operator", "ci"]);
    let identity = |name: &str| certs.path().join(name);
    let ca = certs.path().join("ca.pem");

    // The shipped configuration, and an ACL written by the shipped script.
    let broker_dir = tempfile::tempdir().unwrap();
    for file in ["ca.pem", "broker.pem", "broker.key"] {
        std::fs::copy(certs.path().join(file), broker_dir.path().join(file)).unwrap();
    }
    // Two operator identities: the test's own client, and `ci` for the operator CLI.
    let acl = make_acl(&["-o", "operator", "-o", "ci"], "cam-1 cameras\ncam-2 cameras\n");
    std::fs::write(broker_dir.path().join("acl"), acl).unwrap();
    let port = outpost_sim::broker::free_port().unwrap();
    let conf = fleet_conf(broker_dir.path(), port);
    let broker_log = broker_dir.path().join("broker.log");
    let _broker = Mosquitto::start_conf(broker_dir, &conf, port);
    let broker_log = move || std::fs::read_to_string(&broker_log).unwrap_or_default();

    // No certificate, or one from another CA (even with a fleet device's CN): refused.
    let refused = TlsClient::connect(port, &ca, None, "anonymous").await;
    assert!(refused.is_err(), "a client without a certificate got in\n{}", broker_log());
    let stranger = tempfile::tempdir().unwrap();
    make_pki(stranger.path(), &["cam-1"]);
    let refused = TlsClient::connect(port, &ca, Some(&stranger.path().join("cam-1")), "outpost-cam-1").await;
    assert!(refused.is_err(), "a certificate from another CA got in\n{}", broker_log());

    let mut op = TlsClient::connect(port, &ca, Some(&identity("operator")), "fleet-operator").await.unwrap();
    let availability = topics.availability("cam-1");
    for filter in [
        availability.clone(),
        topics.events("cam-1"),
        topics.state("cam-1"),
        topics.predictions("cam-1"),
        "outpost/replies/operator/#".to_string(),
    ] {
        op.subscribe(&filter).await;
    }
    let reg = Registry::start().await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits", "2");
    let data = tempfile::tempdir().unwrap();
    let path = |p: PathBuf| p.display().to_string();
    let (broker_url, ca_file) = (format!("mqtts://localhost:{port}"), path(ca.clone()));
    let (cert, key) = (path(identity("cam-1.pem")), path(identity("cam-1.key")));
    let flags = ["--broker", &broker_url, "--ca-file", &ca_file, "--client-cert", &cert, "--client-key", &key];
    let mut agent = Agent::start_with(port, "cam-1", &data.path().join("cam-1"), &["cameras"], &flags);
    op.wait_for("cam-1 online", |t, p| t == availability && p == b"online").await;

    // The operator deploys through the group, then through the device's own topic.
    let v1 = desired(&reg, "1", None, None).await;
    op.publish_acked(&topics.group_desired("cameras"), v1.to_json(), true).await;
    assert_eq!(final_event(&mut op, &topics, &v1.deployment_id).await.phase, Phase::Active);
    assert_eq!(served_version(&agent).await, "1");
    let v2 = desired(&reg, "2", None, None).await;
    op.publish_acked(&topics.device_desired("cam-1"), v2.to_json(), true).await;
    assert_eq!(final_event(&mut op, &topics, &v2.deployment_id).await.phase, Phase::Active);
    assert_eq!(served_version(&agent).await, "2");
    assert_eq!(mqtt_infer(&mut op, &topics, "op-1", None).await["model_version"], "2");
    // Answers to a reply_to go under outpost/replies/, which devices may write.
    let answer = mqtt_infer(&mut op, &topics, "op-2", Some("outpost/replies/operator/op-2")).await;
    assert_eq!(answer["model_version"], "2", "{answer}");
    // A model slot through the group, and its own infer topic: the ACL lets cam-1 read both.
    let mut det = desired(&reg, "1", None, Some("det-1")).await;
    det.policy.allow_downgrade = Some(true);
    op.publish_acked(&topics.group_model_desired("cameras", "det"), det.to_json(), true).await;
    assert_eq!(final_event(&mut op, &topics, "det-1").await.phase, Phase::Active, "{}", broker_log());
    let mut request = digits_request(1);
    request["id"] = "op-det".into();
    op.publish_acked(&topics.model_infer("cam-1", "det"), serde_json::to_vec(&request).unwrap(), false).await;
    let answer = op
        .wait_for("the det slot's answer", |t, p| {
            t == topics.predictions("cam-1")
                && serde_json::from_slice::<serde_json::Value>(p).is_ok_and(|v| v["id"] == "op-det")
        })
        .await;
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["model_version"], "1", "{answer}");

    // cam-2 deploys its own choice to cam-1, on both of cam-1's desired topics.
    // Mosquitto drops what the ACL forbids, yet acks it (MQTT 3.1.1 has no
    // way to refuse a publish): publish_acked returns.
    let mut cam2 = TlsClient::connect(port, &ca, Some(&identity("cam-2")), "cam-2").await.unwrap();
    // Subscribing is never refused; the ACL decides what is delivered.
    cam2.subscribe(&topics.device_desired("cam-1")).await;
    cam2.subscribe(&topics.infer("cam-1")).await;
    // A deployment cam-1 would apply if it got it: newer, and allowed to go back to v1.
    let mut forged = desired(&reg, "1", Some(v2.revision + 1_000_000), Some("forged-by-cam-2")).await;
    forged.policy.allow_downgrade = Some(true);
    cam2.publish_acked(&topics.device_desired("cam-1"), forged.to_json(), true).await;
    cam2.publish_acked(&topics.group_desired("cameras"), forged.to_json(), true).await;
    // The broker handled those before this request: cam-1 would have seen them first.
    assert_eq!(mqtt_infer(&mut op, &topics, "after-forgery", None).await["model_version"], "2");
    // The retained desired states are still the operator's.
    op.subscribe(&topics.device_desired("cam-1")).await;
    op.subscribe(&topics.group_desired("cameras")).await;
    for (topic, expected) in [(topics.device_desired("cam-1"), &v2), (topics.group_desired("cameras"), &v1)] {
        let retained = op.wait_for(&format!("the retained {topic}"), |t, _| t == topic).await;
        let retained = Deployment::from_json(&retained).unwrap();
        assert_eq!(retained.deployment_id, expected.deployment_id, "{topic}\n{}", broker_log());
    }

    // cam-2 asks for cam-1's client id. The broker makes it "cam-2" (its CN)
    // instead of closing cam-1's connection: no Last Will, no reconnection,
    // and requests go on being answered while the intruder stays connected.
    let mut intruder = TlsClient::connect(port, &ca, Some(&identity("cam-2")), "outpost-cam-1").await.unwrap();
    intruder.subscribe("outpost/devices/cam-1/#").await;
    for i in 0..3 {
        let answer = mqtt_infer(&mut op, &topics, &format!("during-{i}"), None).await;
        assert_eq!(answer["model_version"], "2", "{answer}");
    }
    assert_eq!(served_version(&agent).await, "2");
    assert!(intruder.closed().is_none() && op.closed().is_none(), "{}", broker_log());
    // cam-1's desired state, requests and answers went by while cam-2 was
    // subscribed to them: it may read none.
    assert!(intruder.next(Duration::from_millis(300)).await.is_none(), "cam-2 read cam-1's topics");
    assert!(cam2.next(Duration::ZERO).await.is_none(), "cam-2 read cam-1's desired state or requests");

    // Seen from the operator: cam-1 never went offline, and never heard of the forgery.
    let offline = op.seen.iter().filter(|(t, p)| *t == availability && p == b"offline").count();
    assert_eq!(offline, 0, "cam-1 was pushed offline\n{}", broker_log());
    assert!(
        !op.seen.iter().any(|(_, p)| String::from_utf8_lossy(p).contains("forged-by-cam-2")),
        "cam-1 reported on the forged deployment"
    );
    let state = op.seen.iter().rev().find(|(t, _)| *t == topics.state("cam-1")).map(|(_, p)| p).unwrap();
    let active = DeviceState::from_json(state).unwrap().active.unwrap();
    assert_eq!((active.version.as_str(), active.deployment_id), ("2", v2.deployment_id.clone()));
    // The operator CLI reaches the same broker with its own certificate
    // (README, "Security model"), and cam-1 applies what it publishes.
    let (ci_cert, ci_key) = (path(identity("ci.pem")), path(identity("ci.key")));
    let (code, out, err) = sim(&[
        "deploy",
        "--broker",
        &broker_url,
        "--ca-file",
        &ca_file,
        "--client-cert",
        &ci_cert,
        "--client-key",
        &ci_key,
        "--device",
        "cam-1",
        "--model",
        "digits@1",
        "--registry-url",
        &reg.url,
        "--allow-downgrade",
        "--wait",
    ]);
    assert_eq!(code, 0, "{out}{err}\n{}", broker_log());
    assert_eq!(served_version(&agent).await, "1");

    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(!log.contains("forged-by-cam-2"), "the agent received cam-2's deployment:\n{log}");
    let reconnected =
        log.contains("MQTT connection lost") || !log.contains("reconnects=0") || log.contains("reconnects=1");
    assert!(!reconnected, "cam-1 lost its connection:\n{log}");
    assert!(agent.is_running());
}

/// Writes a throw-away fleet CA (`ca.pem`), the broker's certificate for
/// `localhost` and `127.0.0.1` (`broker.pem`, `broker.key`) and, for each
/// of `clients`, a client certificate with that CN (`NAME.pem`, `NAME.key`).
fn make_pki(dir: &Path, clients: &[&str]) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    // A name of its own: two test CAs must not look like the same issuer.
    static CAS: AtomicUsize = AtomicUsize::new(0);
    let n = CAS.fetch_add(1, Ordering::Relaxed);
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, format!("Outpost fleet test CA {} {n}", std::process::id()));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let issue = |file: &str, cn: &str, names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    };
    let server_names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    issue("broker", "localhost", server_names, ExtendedKeyUsagePurpose::ServerAuth);
    for &name in clients {
        issue(name, name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth);
    }
}

/// The ACL `make-acl.sh` writes, with these options, for this device list.
fn make_acl(options: &[&str], devices: &str) -> String {
    let mut child = Command::new("sh")
        .arg(Path::new(PACKAGING).join("make-acl.sh"))
        .args(options)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(devices.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "make-acl.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `outpost-fleet.conf` as shipped, with its placeholder paths pointed into
/// `dir` and its listener on `port`; nothing else changes.
fn fleet_conf(dir: &Path, port: u16) -> String {
    let mut conf = std::fs::read_to_string(Path::new(PACKAGING).join("outpost-fleet.conf")).unwrap();
    let here = dir.display();
    for (shipped, test) in [
        ("/etc/mosquitto/outpost/", format!("{here}/")),
        ("/var/lib/mosquitto/", format!("{here}/")),
        ("/var/log/mosquitto/mosquitto.log", format!("{here}/broker.log")),
        ("\nlistener 8883\n", format!("\nlistener {port}\n")),
    ] {
        assert!(conf.contains(shipped), "outpost-fleet.conf no longer has {shipped:?}: update this test");
        conf = conf.replace(shipped, &test);
    }
    for line in conf.lines().filter(|l| !l.trim_start().starts_with('#')) {
        assert!(!line.contains("/mosquitto/") && !line.contains(" 8883"), "not redirected for the test: {line}");
    }
    conf
}

/// A deployment of digits@`version` from `reg` (revision from the clock unless given).
async fn desired(reg: &Registry, version: &str, revision: Option<u64>, id: Option<&str>) -> Deployment {
    let (url, sha) = resolve_manifest(&reg.url, "digits", version).await.unwrap();
    deployment("digits", version, &url, &sha, revision, id.map(str::to_string))
}

async fn final_event(op: &mut TlsClient, topics: &Topics, deployment_id: &str) -> DeploymentEvent {
    let events = topics.events("cam-1");
    let payload = op
        .wait_for(&format!("a final event of {deployment_id}"), |t, p| {
            t == events
                && DeploymentEvent::from_json(p).is_ok_and(|e| e.deployment_id == deployment_id && e.phase.is_final())
        })
        .await;
    DeploymentEvent::from_json(&payload).unwrap()
}

/// The version cam-1's local HTTP endpoint answers with.
async fn served_version(agent: &Agent) -> String {
    let body = serde_json::to_vec(&digits_request(1)).unwrap();
    let url = format!("http://127.0.0.1:{}/v2/models/digits/infer", agent.http_port);
    let (status, answer) = http("POST", url, Some(body)).await;
    assert_eq!(status, 200, "{answer}");
    answer["model_version"].as_str().unwrap().to_string()
}

/// Sends a digits request to cam-1 over MQTT and returns its answer: from
/// `reply_to` when given, else from cam-1's predictions.
async fn mqtt_infer(op: &mut TlsClient, topics: &Topics, id: &str, reply_to: Option<&str>) -> serde_json::Value {
    let mut request = digits_request(1);
    request["id"] = id.into();
    if let Some(topic) = reply_to {
        request["reply_to"] = topic.into();
    }
    op.publish_acked(&topics.infer("cam-1"), serde_json::to_vec(&request).unwrap(), false).await;
    let answers = reply_to.map(str::to_string).unwrap_or_else(|| topics.predictions("cam-1"));
    let payload = op
        .wait_for(&format!("the answer to {id}"), |t, p| {
            t == answers && serde_json::from_slice::<serde_json::Value>(p).is_ok_and(|v| v["id"] == id)
        })
        .await;
    serde_json::from_slice(&payload).unwrap()
}

/// An MQTT 3.1.1 client over TLS, logged in with one of the test's
/// certificates. It does not reconnect: a closed connection is a finding.
struct TlsClient {
    client: AsyncClient,
    incoming: tokio::sync::mpsc::UnboundedReceiver<Publish>,
    subacks: tokio::sync::mpsc::UnboundedReceiver<()>,
    pubacks: Arc<AtomicUsize>,
    closed: Arc<Mutex<Option<String>>>,
    /// Every message taken from `incoming` so far: (topic, payload).
    seen: Vec<(String, Vec<u8>)>,
}

impl TlsClient {
    /// Connects to `localhost:port`, trusting `ca`, with the certificate
    /// `identity`.pem and key `identity`.key (none when `None`), asking for
    /// `client_id`. Err when the broker refuses or says nothing within 10 s.
    async fn connect(port: u16, ca: &Path, identity: Option<&Path>, client_id: &str) -> Result<TlsClient, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            Some(stem) => {
                let file = |ext: &str| PathBuf::from(format!("{}.{ext}", stem.display()));
                let chain = CertificateDer::pem_file_iter(file("pem")).unwrap().collect::<Result<Vec<_>, _>>().unwrap();
                let key = PrivateKeyDer::from_pem_file(file("key")).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        let mut opts = MqttOptions::new(client_id, "localhost", port);
        opts.set_keep_alive(Duration::from_secs(15));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config))));
        let (client, mut events) = AsyncClient::new(opts, 64);
        let connack = async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), connack)
            .await
            .unwrap_or_else(|_| Err("no CONNACK within 10 s".to_string()))?;

        let (tx, incoming) = tokio::sync::mpsc::unbounded_channel();
        let (sub_tx, subacks) = tokio::sync::mpsc::unbounded_channel();
        let pubacks = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(Mutex::new(None));
        let (acks, why) = (pubacks.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        *why.lock().unwrap() = Some(e.to_string());
                        return;
                    }
                }
            }
        });
        Ok(TlsClient { client, incoming, subacks, pubacks, closed, seen: Vec::new() })
    }

    /// Subscribes (QoS 1) and waits for the SUBACK. Mosquitto accepts any
    /// filter; the ACL decides what is delivered.
    async fn subscribe(&mut self, filter: &str) {
        self.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(10), self.subacks.recv()).await;
        assert!(matches!(ack, Ok(Some(()))), "no SUBACK for {filter} within 10 s");
    }

    /// Publishes at QoS 1 and returns once the broker acknowledged it.
    async fn publish_acked(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        let before = self.pubacks.load(Ordering::SeqCst);
        self.client.publish(topic, QoS::AtLeastOnce, retain, payload).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.pubacks.load(Ordering::SeqCst) == before {
            assert!(Instant::now() < deadline, "no PUBACK for {topic} within 10 s ({:?})", self.closed());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The next message within `timeout`.
    async fn next(&mut self, timeout: Duration) -> Option<Publish> {
        let p = tokio::time::timeout(timeout, self.incoming.recv()).await.ok().flatten()?;
        self.seen.push((p.topic.clone(), p.payload.to_vec()));
        Some(p)
    }

    /// The payload of the next message for which `pred(topic, payload)`
    /// holds; panics after 30 s.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&str, &[u8]) -> bool) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next(left).await {
                Some(p) if pred(p.topic.as_str(), &p.payload[..]) => return p.payload.to_vec(),
                Some(_) => {}
                None => break,
            }
        }
        let topics: Vec<&str> = self.seen.iter().map(|(t, _)| t.as_str()).collect();
        panic!("{what}: not seen within 30 s (connection closed: {:?}); seen {topics:?}", self.closed());
    }

    /// Why the connection ended, once it has.
    fn closed(&self) -> Option<String> {
        self.closed.lock().unwrap().clone()
    }
}
