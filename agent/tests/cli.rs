//! The `outpost` command line: bad arguments exit 64 with a message that says
//! what was expected. (This file also makes `cargo test` build the binary the
//! end-to-end tests run.)

use std::process::Command;

fn outpost(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost")).args(args).output().expect("run outpost");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_arguments_exit_64_with_the_reason() {
    let dir = std::env::temp_dir();
    let d = dir.to_str().expect("utf-8 temp dir");
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--broker", "http://x", "--device", "a", "--data-dir", d], "expected mqtt://HOST:PORT"),
        (
            &["run", "--broker", "mqtt://x:1883", "--device", "a/b", "--data-dir", d],
            "--device: expected 1 to 64 characters",
        ),
        (&["run", "--broker", "mqtt://x:1883", "--device", "a", "--data-dir", d, "--group", "#"], "--group: expected"),
        (
            &["run", "--broker", "mqtt://x:1883", "--device", "a", "--data-dir", d, "--workers", "0"],
            "--workers: expected 1 to 256",
        ),
        (
            &["run", "--broker", "mqtt://x:1883", "--device", "a", "--data-dir", d, "--store-quota", "3 parsecs"],
            "unknown unit 'parsecs'",
        ),
        (
            &["run", "--broker", "mqtt://x:1883", "--device", "a", "--data-dir", d, "--ca-file", "/nonexistent/ca.pem"],
            "--ca-file /nonexistent/ca.pem: cannot read it",
        ),
        (
            &["run", "--broker", "mqtt://x:1883", "--device", "a", "--data-dir", d, "--ca-file", "Cargo.toml"],
            "expected PEM certificates (-----BEGIN CERTIFICATE-----), found none",
        ),
        (&["run", "--device", "a"], "--broker"),
        (&["fly"], "unrecognized subcommand"),
    ];
    for (args, why) in cases {
        let (code, err) = outpost(args);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
}

#[test]
fn help_exits_0() {
    assert_eq!(outpost(&["--help"]).0, 0);
    assert_eq!(outpost(&["--version"]).0, 0);
}
