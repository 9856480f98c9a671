//! `outpost-sim` command line errors: exit 64 and the reason. (This file also
//! makes `cargo test` build the binary the end-to-end tests drive.)

use std::process::Command;

fn sim(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost-sim")).args(args).output().expect("run outpost-sim");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_arguments_exit_64_with_the_reason() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["deploy", "--broker", "mqtt://x:1", "--device", "d", "--model", "digits", "--registry-url", "http://r"],
            "expected NAME@VERSION",
        ),
        (&["deploy", "--broker", "mqtt://x:1", "--model", "a@1", "--registry-url", "http://r"], "--device"),
        (
            &["register", "m.onnx", "--name", "n", "--version", "1", "--registry", "r", "--shape", "input=1,x"],
            "'x' is not a dimension",
        ),
        (&["infer", "--broker", "localhost", "--device", "d", "--input", "x.json"], "expected mqtt://HOST:PORT"),
    ];
    for (args, why) in cases {
        let (code, err) = sim(args);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
}

#[test]
fn register_reports_a_missing_model_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = dir.path().to_str().expect("utf-8");
    let (code, err) = sim(&["register", "/nonexistent/model.onnx", "--name", "n", "--version", "1", "--registry", reg]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/model.onnx"), "{err}");
}

/// Runs outpost-sim with `args`, failing the test if it takes over `limit`
/// (a hang is a failure, not a stuck CI job); its exit status and stdout.
fn sim_within(args: &[&str], limit: std::time::Duration) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost-sim"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run outpost-sim");
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("outpost-sim {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut out).expect("read");
    (status, out)
}

/// The README's first command: the demo runs every step and exits 0.
#[test]
fn the_demo_passes_every_step() {
    let (status, out) = sim_within(&["demo"], std::time::Duration::from_secs(120));
    assert!(status.success(), "{out}");
    assert_eq!(out.matches("\n  ok   ").count(), 9, "{out}");
    assert!(out.contains("0 failed, 0 lost") && out.contains("0 failed requests"), "{out}");
}

/// A small fleet (the smoke of `outpost-sim fleet --devices 1000`): every
/// device converges through flaky downloads, late starts and offline periods.
#[test]
fn a_small_fleet_converges_through_the_fault_mix() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("fleet.json");
    let args = ["fleet", "--devices", "24", "--flaky", "0.3", "--late", "0.1", "--offline", "0.15", "--timeout", "60"];
    let mut args: Vec<&str> = args.to_vec();
    let json_arg = json.display().to_string();
    let svg = dir.path().join("fleet.svg");
    let svg_arg = svg.display().to_string();
    args.extend(["--json", &json_arg, "--svg", &svg_arg]);
    let (status, out) = sim_within(&args, std::time::Duration::from_secs(120));
    assert!(status.success(), "{out}");
    assert!(out.contains("active:                        24 of 24 (0 failed)"), "{out}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).expect("JSON");
    assert_eq!(report["active"], 24, "{report}");
    assert!(report["downloads_faulted"].as_u64().unwrap_or(0) > 0, "the fault mix faulted nothing: {report}");
    assert!(report["offline_devices"].as_u64().unwrap_or(0) > 0 && report["late_devices"].as_u64().unwrap_or(0) > 0);
    assert!(report["t100_s"].as_f64().is_some(), "{report}");
    let svg = std::fs::read_to_string(&svg).expect("the activation curve");
    assert!(svg.contains("active (24 of 24)") && svg.contains("100 % at "), "{svg}");
}

/// The 10,000-device set-up in small (BENCHMARKS.md section 8): the agents
/// spread over worker processes the fleet drives (start, stop mid-download,
/// start again once the previous run ended) against a Mosquitto of the
/// run's own; every device converges and the broker's figures are reported.
#[test]
fn a_fleet_over_worker_processes_converges_on_its_own_mosquitto() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("fleet.json");
    let json_arg = json.display().to_string();
    let args = [
        "fleet",
        "--devices",
        "36",
        "--processes",
        "3",
        "--mosquitto",
        "--flaky",
        "0.2",
        "--late",
        "0.1",
        "--offline",
        "0.2",
        "--timeout",
        "90",
        "--json",
        &json_arg,
    ];
    let (status, out) = sim_within(&args, std::time::Duration::from_secs(180));
    assert!(status.success(), "{out}");
    assert!(out.contains("fleet of 36 devices (3 worker processes)"), "{out}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).expect("JSON");
    assert_eq!((report["active"].as_u64(), report["failed"].as_u64()), (Some(36), Some(0)), "{report}");
    assert_eq!(report["processes"], 3, "{report}");
    // The devices that went offline were stopped in their worker and started again.
    assert!(report["offline_devices"].as_u64().unwrap_or(0) > 0 && report["resumed"].as_u64().unwrap_or(0) > 0);
    assert!(report["mosquitto"]["peak_rss_mb"].as_f64().unwrap_or(0.0) > 0.0, "{report}");
    assert!(report["t_first_s"].as_f64() <= report["t99_s"].as_f64() && report["t99_s"].as_f64().is_some());
}

/// `fleet --rollout` (BENCHMARKS.md section 8b in small): the fleet's
/// converged devices get version 2 from the rollout engine under inference
/// load; the JSON report of a run with `kind`.
fn fleet_rollout(kind: &str, stages: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let (json, svg) = (dir.path().join("fleet.json"), dir.path().join("rollout.svg"));
    let (json_arg, svg_arg) = (json.display().to_string(), svg.display().to_string());
    let args = [
        "fleet",
        "--devices",
        "12",
        "--mosquitto",
        "--rollout",
        kind,
        "--stages",
        stages,
        "--soak",
        "1s",
        "--load",
        "20",
        "--json",
        &json_arg,
        "--rollout-svg",
        &svg_arg,
    ];
    let (status, out) = sim_within(&args, std::time::Duration::from_secs(240));
    assert!(status.success(), "{out}");
    let svg = std::fs::read_to_string(&svg).expect("the rollout's plot");
    assert!(svg.contains("serving the candidate") && svg.contains("failed (0)"), "{svg}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).expect("JSON");
    let r = report["rollout"].clone();
    // Requests went out and every one was answered with a prediction.
    assert!(r["requests"]["sent"].as_u64().unwrap_or(0) > 0, "{r:#}");
    assert_eq!(r["requests"]["failed_by_code"], serde_json::json!({}), "{r:#}");
    assert_eq!(r["requests"]["unanswered"], 0, "{r:#}");
    r
}

#[test]
fn a_broken_version_halts_in_the_fleets_first_stage_and_no_request_fails() {
    let r = fleet_rollout("broken", "1,50%,100%");
    assert_eq!(r["report"]["state"], "halted", "{r:#}");
    assert_eq!((r["first_stage"].as_u64(), r["touched"].as_u64()), (Some(1), Some(1)), "{r:#}");
    assert_eq!(r["serving_candidate"], 0, "{r:#}");
    assert!(r["report"]["reason"].as_str().unwrap_or_default().contains("validation_failed"), "{r:#}");
    let answered = r["requests"]["answered_by_version"].as_object().cloned().unwrap_or_default();
    assert_eq!(answered.keys().collect::<Vec<_>>(), ["1"], "only version 1 answered: {r:#}");
}

#[test]
fn a_good_version_reaches_the_whole_fleet_and_no_request_fails() {
    let r = fleet_rollout("good", "1,50%,100%");
    assert_eq!(r["report"]["state"], "done", "{r:#}");
    assert_eq!((r["touched"].as_u64(), r["serving_candidate"].as_u64()), (Some(12), Some(12)), "{r:#}");
    assert!(r["requests"]["answered_by_version"]["2"].as_u64().unwrap_or(0) > 0, "{r:#}");
}

/// The smoke of `outpost-sim bench`: every section runs against real
/// processes (Mosquitto, the agent) and the report holds each figure. The
/// peer and the large models are skipped here (not set up in CI), and say so.
#[test]
fn a_quick_bench_measures_every_section() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_outpost-sim"));
    let agent = exe.with_file_name("outpost");
    assert!(agent.is_file(), "{} is built by cargo test --workspace", agent.display());
    let dir = tempfile::tempdir().expect("temp dir");
    let report = dir.path().join("BENCH.md");
    let empty = dir.path().join("no-large-models");
    let out = Command::new(&exe)
        .current_dir(&root)
        .args(["bench", "--quick", "--agent", &agent.display().to_string()])
        .args(["--report", &report.display().to_string(), "--large-models", &empty.display().to_string()])
        .args(["--peer-python", "/nonexistent/python"])
        .output()
        .expect("run outpost-sim bench");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let md = std::fs::read_to_string(&report).expect("the report");
    for section in [
        "## 1. Local HTTP scoring",
        "## 2. MQTT",
        "## 2b. MQTT round trip on a default and on a tuned Mosquitto",
        "## 3. Hot swap",
        "## 4. Deployment",
        "## 5. Footprint",
        "## 9. The hostile-world limits",
    ] {
        assert!(md.contains(section), "{section} missing:\n{md}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.with_extension("json")).expect("JSON")).expect("valid JSON");
    assert_eq!(json["swap_under_load"]["failed"], 0, "{json}");
    assert!(json["http_scoring"]["outpost_sequential"]["p50_us"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(json["mqtt"]["agent"]["n"].as_u64().unwrap_or(0) > 0);
    for broker in ["default", "tuned"] {
        for qos in ["qos0", "qos1"] {
            let x = &json["mqtt_brokers"][broker][qos];
            assert!(x["agent"]["n"].as_u64().unwrap_or(0) > 0 && x["echo"]["n"].as_u64().unwrap_or(0) > 0, "{json}");
        }
    }
    // wrk beside our client when it is installed, a skipped line otherwise.
    let wrk = &json["http_scoring"]["outpost_wrk"];
    assert!(
        wrk["1_connection"]["n"].as_u64().unwrap_or(0) > 0 || md.contains("wrk: not installed"),
        "neither wrk figures nor a skipped line: {json}"
    );
    assert_eq!(json["sha256"]["digests_agree"], true);
    assert!(json["deployment"][0]["timings_ms"]["load"].as_f64().unwrap_or(0.0) > 0.0, "{json}");
    assert!(md.contains("## Skipped") && md.contains("setup_peer.sh"), "{md}");
    let svg = std::fs::read_to_string(dir.path().join("bench-swap-timeline.svg")).expect("the swap timeline");
    assert!(svg.contains("latency per 250 ms (ms)") && svg.contains("throughput (requests/s)"), "{svg}");
    assert!(
        std::fs::read_to_string(dir.path().join("bench-fleet-activation.svg"))
            .is_ok_and(|s| s.contains("devices (count)"))
    );
}

/// `chaos --replay`: the timeline drawn again from a run's JSON report, no
/// processes started; a missing report is a usage error.
#[test]
fn the_chaos_timeline_is_drawn_again_from_a_report() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("chaos.json");
    let svg = dir.path().join("chaos.svg");
    let report = serde_json::json!({
        "ok": true, "seed": 3, "duration_s": 60, "faults_total": 1, "probes": 10, "settled_after_s": 2.0,
        "happened": [{"at_s": 5.0, "kind": "sigkill", "what": "Kill"}],
        "timeline": [{"device": "chaos-0", "versions": [[1.0, "digits@1"]], "restarts": [5.0]}],
        "invariants": [{"invariant": "6 no panic in any log", "held": true, "violations": []}]
    });
    std::fs::write(&json, report.to_string()).expect("write the report");
    let (json_arg, svg_arg) = (json.display().to_string(), svg.display().to_string());
    let (code, err) = sim(&["chaos", "--replay", &json_arg, "--svg", &svg_arg]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&svg).expect("the SVG");
    for want in ["seed 3", "sigkill ×1", "chaos-0 (version served)", "held: 6 no panic in any log"] {
        assert!(text.contains(want), "{want} missing");
    }
    let missing = dir.path().join("none.json").display().to_string();
    let (code, err) = sim(&["chaos", "--replay", &missing, "--svg", &svg_arg]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("none.json"), "{err}");
}
