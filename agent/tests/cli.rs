//! The `outpost` command line: bad arguments exit 64 with a message that says
//! what was expected. (This file also makes `cargo test` build the binary the
//! end-to-end tests run.)

use std::process::Command;

fn outpost(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost")).args(args).output().expect("run outpost");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn outpost_env(args: &[&str], config: Option<&std::path::Path>) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outpost"));
    cmd.args(args).env_remove("OUTPOST_MQTT_PASSWORD").env_remove("OUTPOST_LOG");
    match config {
        Some(c) => cmd.env("OUTPOST_CONFIG", c),
        None => cmd.env_remove("OUTPOST_CONFIG"),
    };
    let out = cmd.output().expect("run outpost");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_arguments_exit_64_with_the_reason() {
    let dir = std::env::temp_dir();
    let d = dir.to_str().expect("utf-8 temp dir");
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "--broker", "http://x", "--device", "a", "--data-dir", d],
            "--broker: mqtt.broker = \"http://x\": expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (tcp:// and ssl:// are the same)",
        ),
        (
            &["run", "--broker", "mqtt://x:1883", "--device", "a/b", "--data-dir", d],
            "--device: device = \"a/b\": expected a device id: [A-Za-z0-9_.-]{1,64}",
        ),
        (
            &["run", "--broker", "mqtt://x:1883", "--device", "a", "--data-dir", d, "--group", "#"],
            "--group: groups = [\"#\"]: expected a list of group names",
        ),
        (
            &["run", "--broker", "mqtt://x:1883", "--device", "a", "--data-dir", d, "--workers", "0"],
            "--workers: limits.workers = 0: expected 1 to 256",
        ),
        (
            &["run", "--broker", "mqtt://x:1883", "--device", "a", "--data-dir", d, "--store-quota", "3 parsecs"],
            "unknown unit 'parsecs'",
        ),
        (
            &["run", "--broker", "mqtt://x:1883", "--device", "a", "--data-dir", d, "--ca-file", "/nonexistent/ca.pem"],
            "tls.ca_file: /nonexistent/ca.pem: cannot read it",
        ),
        (
            &["run", "--broker", "mqtt://x:1883", "--device", "a", "--data-dir", d, "--ca-file", "Cargo.toml"],
            "expected PEM certificates (-----BEGIN CERTIFICATE-----), found none",
        ),
        (&["run", "--device", "a"], "mqtt.broker = (not set): expected mqtt://HOST[:PORT]"),
        (&["fly"], "unrecognized subcommand"),
    ];
    for (args, why) in cases {
        let (code, _, err) = outpost_env(args, None);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
}

/// agent.toml, then agent.d/*.toml in name order, then flags; check-config
/// prints the result with origins and masks secrets; a bad file exits 64
/// naming the file, the key, the value and what was expected.
#[test]
fn configuration_files_merge_and_check_config_reports_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let main = dir.path().join("agent.toml");
    std::fs::write(
        &main,
        "device = \"cam-17\"\n[mqtt]\nbroker = \"mqtt://broker.lan\"\nusername = \"cam\"\npassword = \"hunter2\"\n",
    )
    .expect("write");
    std::fs::create_dir(dir.path().join("agent.d")).expect("mkdir");
    std::fs::write(dir.path().join("agent.d/10-site.toml"), "groups = [\"site-a\"]\n[mqtt]\nkeep_alive = 30\n")
        .expect("write");
    std::fs::write(dir.path().join("agent.d/20-limits.toml"), "[limits]\nstore_quota = \"1GiB\"\nworkers = 1\n")
        .expect("write");
    let (code, out, err) = outpost_env(&["check-config", "--workers", "3"], Some(&main));
    assert_eq!(code, 0, "{err}");
    let line = |key: &str| out.lines().find(|l| l.starts_with(&format!("{key} = "))).unwrap_or_default().to_string();
    assert!(line("device").contains("\"cam-17\"") && line("device").ends_with("agent.toml:1"), "{out}");
    assert!(line("groups").ends_with("10-site.toml:1"), "{out}");
    assert!(line("mqtt.keep_alive").starts_with("mqtt.keep_alive = 30"), "{out}");
    assert!(line("limits.store_quota").ends_with("20-limits.toml:2"), "{out}");
    assert!(line("limits.workers").starts_with("limits.workers = 3") && line("limits.workers").ends_with("--workers"));
    assert!(line("mqtt.password").contains("\"***\""), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    assert!(line("http.bind").ends_with("default"), "{out}");

    // The environment names the password too, and wins over the file; still masked.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outpost"));
    let shown = cmd.args(["check-config"]).env("OUTPOST_CONFIG", &main).env("OUTPOST_MQTT_PASSWORD", "s3cret").output();
    let shown = String::from_utf8_lossy(&shown.expect("run").stdout).into_owned();
    assert!(shown.contains("# OUTPOST_MQTT_PASSWORD") && !shown.contains("s3cret"), "{shown}");

    // A bad drop-in: exit 64 with the file, the key, the value, what was expected.
    std::fs::write(dir.path().join("agent.d/30-bad.toml"), "[mqtt]\nkeep_alive = 2\n").expect("write");
    let (code, _, err) = outpost_env(&["check-config"], Some(&main));
    assert_eq!(code, 64);
    assert!(err.contains("30-bad.toml:2: mqtt.keep_alive = 2: expected 5 to 3600 seconds"), "{err}");
    // The same refusal stops `run` before it touches anything.
    let (code, _, err) = outpost_env(&["run"], Some(&main));
    assert_eq!(code, 64);
    assert!(err.contains("mqtt.keep_alive = 2"), "{err}");
    std::fs::write(dir.path().join("agent.d/30-bad.toml"), "[mqtt]\nkeepalive = 20\n").expect("write");
    let (code, _, err) = outpost_env(&["check-config"], Some(&main));
    assert_eq!(code, 64);
    assert!(err.contains("mqtt.keepalive = 20: expected one of the known keys: mqtt.broker"), "{err}");
    std::fs::write(dir.path().join("agent.d/30-bad.toml"), "[mqtt\n").expect("write");
    let (code, _, err) = outpost_env(&["check-config"], Some(&main));
    assert_eq!(code, 64);
    assert!(err.contains("30-bad.toml") && err.contains("valid TOML"), "{err}");
    // A named configuration file that does not exist is an error, not an empty configuration.
    let (code, _, err) = outpost_env(&["check-config"], Some(&dir.path().join("nope.toml")));
    assert_eq!(code, 64);
    assert!(err.contains("nope.toml") && err.contains("a readable TOML file"), "{err}");
}

#[test]
fn help_exits_0() {
    assert_eq!(outpost(&["--help"]).0, 0);
    assert_eq!(outpost(&["--version"]).0, 0);
}

/// An address the host does not have is a configuration error (64: systemd
/// stops instead of restarting every 2 s), and under journald the reason is
/// logged as an error (`<3>`), so `journalctl -p warning` shows why it stopped.
#[test]
fn an_address_this_host_does_not_have_exits_64_as_an_error_under_journald() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("stderr.log");
    let file = std::fs::File::create(&log).expect("log file");
    let meta = file.metadata().expect("stat");
    let status = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["run", "--device", "b1", "--broker", "mqtt://127.0.0.1:9", "--http-bind", "192.0.2.1:8080"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env_remove("OUTPOST_CONFIG")
        .stderr(file)
        .status()
        .expect("run outpost");
    let text = std::fs::read_to_string(&log).expect("read log");
    assert_eq!(status.code(), Some(64), "{text}");
    assert!(text.contains("<3>outpost: HTTP endpoint 192.0.2.1:8080:"), "{text}");
}
