//! The Debian package's files: what the unit and the man page promise is
//! what the package ships and what the binary does.

use super::*;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// (source relative to agent/, target in the package) of every asset of
/// agent/Cargo.toml's `[package.metadata.deb]`.
fn deb_assets() -> Vec<(String, String)> {
    let manifest = read("agent/Cargo.toml");
    let section = manifest.split("[package.metadata.deb]").nth(1).expect("a [package.metadata.deb] section");
    let list = section.split("assets = [").nth(1).expect("assets").split("\n]").next().unwrap();
    list.lines()
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .map(|l| {
            let fields: Vec<&str> = l.split('"').collect();
            (fields[1].to_string(), fields[3].to_string())
        })
        .collect()
}

/// The agent binary the tests run (as the harness finds it).
fn agent_binary() -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os("OUTPOST_AGENT_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("outpost")
}

/// The man page as text: roff's `\-` is a plain hyphen.
fn man_text() -> String {
    read("packaging/outpost.8").replace("\\-", "-")
}

#[test]
fn the_package_ships_every_file_it_names_and_the_unit_points_to() {
    let assets = deb_assets();
    assert!(assets.len() >= 5, "{assets:?}");
    for (source, _) in &assets {
        if source.starts_with("target/") {
            continue; // built by cargo deb
        }
        assert!(std::path::Path::new(&format!("{ROOT}/agent/{source}")).is_file(), "asset {source} is missing");
    }
    let unit = read("packaging/outpost.service");
    let docs = unit.lines().find_map(|l| l.strip_prefix("Documentation=")).expect("Documentation=");
    for doc in docs.split_whitespace() {
        let shipped = if let Some(page) = doc.strip_prefix("man:") {
            // man:outpost(8) -> usr/share/man/man8/outpost.8 (cargo-deb gzips it)
            let (name, section) = page.trim_end_matches(')').split_once('(').expect("man:NAME(SECTION)");
            format!("usr/share/man/man{section}/{name}.{section}")
        } else {
            doc.strip_prefix("file:///").expect("man: or file:///").to_string()
        };
        assert!(assets.iter().any(|(_, t)| *t == shipped), "{doc}: the package ships no {shipped} ({assets:?})");
    }
}

/// The unit stops restarting on a configuration error (exit 64), which only
/// works for the main process: no ExecStartPre may stand in its way.
#[test]
fn the_unit_does_not_restart_a_bad_configuration_forever() {
    let unit = read("packaging/outpost.service");
    let settings: Vec<&str> = unit.lines().filter(|l| !l.starts_with('#')).collect();
    let prevent =
        settings.iter().find_map(|l| l.strip_prefix("RestartPreventExitStatus=")).expect("RestartPreventExitStatus=");
    assert!(prevent.split_whitespace().any(|c| c == outpost_agent::EXIT_USAGE.to_string()), "{prevent}");
    assert!(
        !settings.iter().any(|l| l.starts_with("ExecStartPre=")),
        "systemd ignores RestartPreventExitStatus= for ExecStartPre="
    );
    let max = settings.iter().find_map(|l| l.strip_prefix("MemoryMax=")).expect("MemoryMax=");
    assert!(outpost_agent::parse_size(&format!("{max}iB")).is_ok_and(|b| b >= 256 << 20), "MemoryMax={max}");

    // A bad configuration is exit 64 from `outpost run` itself.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "device = \"cam-1\"\n[mqtt]\nbroker = \"mqtt://127.0.0.1:1\"\nkeep_alive = 2\n").unwrap();
    let (code, _, err) =
        outpost(&["run", "--config", config.to_str().unwrap(), "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, i32::from(outpost_agent::EXIT_USAGE), "{err}");
    assert!(err.contains("mqtt.keep_alive = 2"), "{err}");
}

/// Every configuration key, every flag of `outpost run` and every
/// subcommand is in the man page.
#[test]
fn the_man_page_documents_every_key_flag_and_command() {
    let man = man_text();
    for k in outpost_agent::config::KEYS {
        assert!(man.contains(k.name), "the man page does not document the key {}", k.name);
    }
    let (code, help, _) = outpost(&["run", "--help"]);
    assert_eq!(code, 0);
    let flags: Vec<&str> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|l| l.split([' ', ',']).next().unwrap())
        .filter(|f| *f != "help")
        .collect();
    assert!(flags.len() >= 20, "{help}");
    for f in flags {
        assert!(man.contains(&format!("--{f}")), "the man page does not document --{f}");
    }
    let (_, help, _) = outpost(&["--help"]);
    let commands = help.split("Commands:").nth(1).unwrap().split("Options:").next().unwrap();
    for c in commands.lines().filter_map(|l| l.split_whitespace().next()).filter(|c| *c != "help") {
        assert!(
            man.contains(&format!(".B {c}")) || man.contains(&format!(".BI \"{c} ")),
            "command {c} is not in the man page"
        );
    }
    assert!(man.contains(&format!(".B {}\n", outpost_agent::EXIT_USAGE)), "exit status {}", outpost_agent::EXIT_USAGE);
}

/// `systemd-analyze verify` accepts the unit with the accelerator drop-in,
/// and groff renders the man page without a warning (where they are installed).
#[test]
fn the_unit_drop_in_and_man_page_pass_their_tools() {
    let dir = tempfile::tempdir().unwrap();
    if std::process::Command::new("groff").arg("--version").output().is_ok() {
        let out = std::process::Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z", &format!("{ROOT}/packaging/outpost.8")])
            .output()
            .unwrap();
        assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    } else {
        eprintln!("groff not installed: the man page's rendering is not checked");
    }
    if std::process::Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("systemd-analyze not installed: the unit is not verified");
        return;
    }
    // The unit as installed, with the binary under test at /usr/bin/outpost's
    // place and the man page where man finds it.
    let units = dir.path().join("units");
    std::fs::create_dir_all(units.join("outpost.service.d")).unwrap();
    std::fs::create_dir_all(dir.path().join("man/man8")).unwrap();
    std::fs::copy(format!("{ROOT}/packaging/outpost.8"), dir.path().join("man/man8/outpost.8")).unwrap();
    let unit = read("packaging/outpost.service").replace("/usr/bin/outpost", agent_binary().to_str().unwrap());
    std::fs::write(units.join("outpost.service"), unit).unwrap();
    std::fs::copy(
        format!("{ROOT}/packaging/systemd/accelerators.conf"),
        units.join("outpost.service.d/accelerators.conf"),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", units.join("outpost.service").to_str().unwrap()])
        .env("SYSTEMD_UNIT_PATH", format!("{}:", units.display()))
        .env("MANPATH", dir.path().join("man"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Outside a booted systemd it may miss the system's own units; anything about ours is a failure.
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("outpost") || l.contains("accelerators")).collect();
    assert!(ours.is_empty(), "systemd-analyze verify:\n{err}");
}
