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
