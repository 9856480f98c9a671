//! A second real broker: RabbitMQ's MQTT plugin (Debian's rabbitmq-server),
//! driven the way an operator would, with `outpost-sim` and mosquitto's
//! clients. RabbitMQ routes MQTT through AMQP topic exchanges: a `.` in a
//! topic becomes a level separator (`outpost/devices/cam.18/desired` is
//! delivered as `outpost/devices/cam/18/desired`), retained messages reach
//! exact-topic subscriptions only, and MQTT 5 is refused.

use super::*;
use outpost_protocol::{DeviceState, Topics};
use std::io::BufRead;
use std::time::Instant;

/// A device and a group whose ids contain `.`, which RabbitMQ turns into `/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_the_operator_flow_works_for_a_device_and_group_with_dots_in_their_ids() {
    operator_flow("rabbitmq_the_operator_flow_works_for_a_device_and_group_with_dots_in_their_ids", "cam.18", "site.7")
        .await;
}

/// The control: the same flow with ids RabbitMQ delivers unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_the_operator_flow_works_for_plain_ids() {
    operator_flow("rabbitmq_the_operator_flow_works_for_plain_ids", "cam-19", "site-8").await;
}

async fn operator_flow(test: &str, device: &str, group: &str) {
    let Some(broker) = RabbitMq::start_or_skip(test) else { return };
    let began = Instant::now();
    let reg = Registry::start().await;
    let root = reg.root().display().to_string();
    let labels = fixture("labels.txt").display().to_string();
    for (model, version) in [("digits-mlp.onnx", "1"), ("digits-cnn.onnx", "2"), ("digits-mlp.onnx", "3")] {
        let model = fixture(model).display().to_string();
        let args =
            ["register", &model, "--name", "digits", "--version", version, "--registry", &root, "--labels", &labels];
        let (code, out, err) = sim_async(&args).await;
        assert_eq!(code, 0, "register digits@{version}: {out}{err}");
    }
    let (b, u) = (broker.broker_arg(), reg.url.clone());
    let topics = Topics::default();
    let data = tempfile::tempdir().unwrap();
    // MQTT 5 asked for: RabbitMQ 3.10 refuses it and the agent falls back.
    let mut agent =
        Agent::start_with(broker.port, device, &data.path().join(device), &[group], &["--mqtt-version", "5"]);
    agent.wait_log("falling back to MQTT 3.1.1", 1, Duration::from_secs(60));
    retained(&broker, &topics.availability(device), |p| p == b"online").await.unwrap();

    // A group deployment, then the device's own (the device topic wins).
    let deploy = |target: &str, name: &str, model: &str, extra: &[&str]| {
        let mut args: Vec<String> =
            ["deploy", "--broker", &b, target, name, "--model", model, "--registry-url", &u, "--timeout", "90"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    // `deploy --group --wait` follows PREFIX/devices/+/events, and a `+` is
    // one AMQP word on RabbitMQ: it never matches `cam.18` (two words). A
    // dotted device's group deployment is followed on its own state topic.
    let group_wait = !device.contains('.');
    let group_flags: &[&str] = if group_wait { &["--wait"] } else { &[] };
    let (code, out, err) = sim_async(&deploy("--group", group, "digits@1", group_flags)).await;
    assert_eq!(code, 0, "deploy --group {group} digits@1 {group_flags:?}:\n{out}{err}\nagent log:\n{}", log(&agent));
    assert!(!group_wait || (out.contains(device) && out.contains("active")), "{out}");
    device_state(&broker, &agent, |s| s.active.as_ref().is_some_and(|a| a.version == "1")).await;
    assert_eq!(served(&agent).await, "1");
    let v2 = deploy("--device", device, "digits@2", &["--wait", "--deployment-id", "rmq-2", "--revision", "100"]);
    let (code, out, err) = sim_async(&v2).await;
    assert_eq!(code, 0, "deploy --device {device} digits@2 --wait:\n{out}{err}\nagent log:\n{}", log(&agent));
    assert!(out.contains(device) && out.contains("active"), "{out}");
    assert_eq!(served(&agent).await, "2");
    // The same deployment again (a script run twice): the device answers
    // `unchanged`, which deploy --wait confirms from the device's retained
    // state (read on its exact topic, delivered with the broker's `/`s).
    let (code, out, err) = sim_async(&v2).await;
    assert_eq!(code, 0, "the same deploy again:\n{out}{err}\nagent log:\n{}", log(&agent));
    assert!(out.contains("unchanged"), "{out}");
    let state = device_state(&broker, &agent, |s| s.active.as_ref().is_some_and(|a| a.version == "2")).await;
    assert_eq!(state.last_deployment.unwrap().outcome, Outcome::Active);

    // Inference over MQTT: answered on the device's predictions topic (read
    // with mosquitto_sub), and on a reply topic (outpost-sim infer).
    let expected = expected_probabilities(CNN_EXPECTED);
    let mut request = digits_request(5);
    request["id"] = "over-rabbitmq".into();
    let (topic, answer) =
        mqtt_round_trip(&broker, &topics.predictions(device), &topics.infer(device), &request.to_string()).await;
    // What the broker did to the topic, as a subscriber sees it.
    assert_eq!(topic, topics.predictions(device).replace('.', "/"));
    assert_eq!(
        (answer["id"].as_str(), answer["model_version"].as_str()),
        (Some("over-rabbitmq"), Some("2")),
        "{answer}"
    );
    let (diff, acc) = score(&answer, &expected);
    assert!(diff < 1e-4 && acc >= 0.8, "diff {diff}, accuracy {acc}");
    let input = data.path().join("request.json");
    std::fs::write(&input, digits_request(1).to_string()).unwrap();
    let (code, out, err) = sim_async(&[
        "infer",
        "--broker",
        &b,
        "--device",
        device,
        "--input",
        input.to_str().unwrap(),
        "--timeout",
        "60",
    ])
    .await;
    assert_eq!(code, 0, "outpost-sim infer: {out}{err}");
    assert!(out.contains("\"model_version\": \"2\""), "{out}");

    // Over HTTP.
    let body = serde_json::to_vec(&digits_request(5)).unwrap();
    let (status, answer) =
        http("POST", format!("http://127.0.0.1:{}/v2/models/digits/infer", agent.http_port), Some(body)).await;
    assert_eq!((status, answer["model_version"].as_str()), (200, Some("2")), "{answer}");
    assert!(score(&answer, &expected).0 < 1e-4);

    // A second swap.
    let (code, out, err) = sim_async(&deploy("--device", device, "digits@3", &["--wait"])).await;
    assert_eq!(code, 0, "deploy digits@3 --wait:\n{out}{err}\nagent log:\n{}", log(&agent));
    assert_eq!(served(&agent).await, "3");

    // Withdrawn (an empty retained payload): the group's deployment applies again.
    let (code, out, err) = sim_async(&["undeploy", "--broker", &b, "--device", device]).await;
    assert_eq!(code, 0, "undeploy: {out}{err}");
    device_state(&broker, &agent, |s| s.active.as_ref().is_some_and(|a| a.version == "1")).await;
    assert_eq!(served(&agent).await, "1");

    // Desired state, not commands: deployed while the device is down, applied
    // when it returns (RabbitMQ keeps the retained desired state for the
    // device's exact-topic subscription).
    agent.kill();
    let (code, out, err) = sim_async(&deploy("--device", device, "digits@2", &[])).await;
    assert_eq!(code, 0, "deploy without --wait: {out}{err}");
    agent.kill_and_restart();
    device_state(&broker, &agent, |s| s.active.as_ref().is_some_and(|a| a.version == "2")).await;
    assert_eq!(served(&agent).await, "2");
    println!("{test}: operator flow on RabbitMQ in {:.1} s", began.elapsed().as_secs_f64());
}

/// `outpost-sim ARGS` off the runtime's threads (the registry serves on them).
async fn sim_async<S: AsRef<str>>(args: &[S]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
    tokio::task::spawn_blocking(move || sim(&args.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap()
}

fn log(agent: &Agent) -> String {
    std::fs::read_to_string(&agent.log).unwrap_or_default()
}

/// The version the agent's HTTP endpoint says it serves.
async fn served(agent: &Agent) -> String {
    let (status, meta) = http("GET", format!("http://127.0.0.1:{}/v2/models/digits", agent.http_port), None).await;
    assert_eq!(status, 200, "{meta}");
    meta["versions"][0].as_str().unwrap_or_else(|| panic!("no version in {meta}")).to_string()
}

/// Starts `mosquitto_sub -v` (QoS 1) with `args`.
fn mosquitto_sub(broker: &RabbitMq, args: &[&str]) -> std::process::Child {
    std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "1", "-v"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run mosquitto_sub ({e}): install mosquitto-clients"))
}

/// The messages (topic, payload) a `mosquitto_sub -v` printed before it exited.
fn messages(child: std::process::Child) -> Vec<(String, String)> {
    let out = child.wait_with_output().unwrap();
    out.stdout
        .lines()
        .map(|l| l.unwrap())
        .map(|l| l.split_once(' ').map(|(t, p)| (t.to_string(), p.to_string())).unwrap_or((l, String::new())))
        .collect()
}

/// Subscribes to `answers` with mosquitto_sub and publishes `request` on
/// `requests` with mosquitto_pub until an answer comes (mosquitto_sub says
/// nothing when its subscription is in); returns the first: (topic as
/// delivered, payload).
async fn mqtt_round_trip(
    broker: &RabbitMq,
    answers: &str,
    requests: &str,
    request: &str,
) -> (String, serde_json::Value) {
    let mut sub = mosquitto_sub(broker, &["-t", answers, "-C", "1", "-W", "60"]);
    let (port, requests, request) = (broker.port.to_string(), requests.to_string(), request.to_string());
    let mut got = tokio::task::spawn_blocking(move || {
        while sub.try_wait().unwrap().is_none() {
            let ok = std::process::Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-t", &requests, "-m", &request])
                .status();
            assert!(ok.is_ok_and(|s| s.success()), "mosquitto_pub failed");
            std::thread::sleep(Duration::from_millis(1000));
        }
        messages(sub)
    })
    .await
    .unwrap();
    assert!(!got.is_empty(), "no answer on {answers} within 60 s");
    let (topic, payload) = got.remove(0);
    (topic, serde_json::from_str(&payload).unwrap_or_else(|e| panic!("{e}: {payload}")))
}

/// The retained message on `topic` as a fresh subscriber (to that exact
/// topic: RabbitMQ gives retained messages to no other) sees it, once it
/// satisfies `pred`.
async fn retained(broker: &RabbitMq, topic: &str, pred: impl Fn(&[u8]) -> bool) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while Instant::now() < deadline {
        let sub = mosquitto_sub(broker, &["-t", topic, "-C", "1", "-W", "3"]);
        let got = tokio::task::spawn_blocking(move || messages(sub)).await.unwrap();
        if let Some((_, payload)) = got.into_iter().next() {
            if pred(payload.as_bytes()) {
                return Ok(payload.into_bytes());
            }
            last = Some(payload);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("the retained message on {topic} never matched; last {last:?}"))
}

/// The device's retained state once it satisfies `pred`.
async fn device_state(broker: &RabbitMq, agent: &Agent, pred: impl Fn(&DeviceState) -> bool) -> DeviceState {
    let topic = Topics::default().state(&agent.device);
    match retained(broker, &topic, |p| DeviceState::from_json(p).is_ok_and(|s| pred(&s))).await {
        Ok(payload) => DeviceState::from_json(&payload).unwrap(),
        Err(e) => panic!("{e}\nagent log:\n{}", log(agent)),
    }
}
