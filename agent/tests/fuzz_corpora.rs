//! Replays every committed fuzz input (the seeds and the inputs of
//! findings already fixed) through the fuzz targets' functions
//! with the stable toolchain: a regression fails `cargo test`, no nightly
//! needed. Fuzzing itself: `cargo +nightly fuzz run TARGET` in `fuzz/`.
#![allow(clippy::unwrap_used)]

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("desired", outpost_agent::fuzzing::desired),
    ("manifest", outpost_agent::fuzzing::manifest),
    ("infer_json", outpost_agent::fuzzing::infer_json),
    ("binary", outpost_agent::fuzzing::binary),
    ("mqtt_request", outpost_agent::fuzzing::mqtt_request),
    ("config", outpost_agent::fuzzing::config),
    ("journal", outpost_agent::fuzzing::journal),
    ("model", outpost_agent::fuzzing::model),
];

#[test]
fn every_committed_fuzz_input_runs_clean() {
    outpost_agent::fuzzing::ready().unwrap();
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut total = 0;
    for (name, run) in TARGETS {
        let mut inputs = 0;
        for dir in ["seeds", "regressions"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(name)) else { continue };
            for entry in entries.flatten() {
                let data = std::fs::read(entry.path()).unwrap();
                run(&data);
                inputs += 1;
            }
        }
        assert!(inputs > 0, "no committed inputs for fuzz target {name}");
        total += inputs;
    }
    assert!(total >= TARGETS.len());
}
