//! The Outpost device agent.
//!
//! Map of the crate, by folder (each depends only on those above it):
//! - [`sys`]: systemd notify/watchdog, TLS trust, time, fault injection.
//! - [`link`]: the broker — URL and session options, the MQTT session, its
//!   lifecycle as a pure state machine (`connection`), the publisher and its
//!   offline journal.
//! - [`serve`]: serving — the tract [`serve::model`] (load, golden sample,
//!   inference), the [`serve::Engine`] (active model behind an atomic swap, a
//!   bounded worker pool, probation), the HTTP endpoint, MQTT requests.
//! - [`report`]: what the device says — events and retained state, telemetry,
//!   captures.
//! - [`deploy`]: deployments — the `Deployer` task (sole owner of the
//!   deployment record, `agent.json`), the pure `reconcile` decision, the
//!   `pipeline` (fetch, store, memory check, load, validate, bind the port).
//! - [`agent`]: the main loop that wires them together and drains them.
//! - [`config`]: configuration files, drop-ins, flags; [`check`]:
//!   `outpost check-bundle`, the pipeline on a throw-away store.
//!
//! Modules are `pub(crate)` except what the `outpost` binary and the
//! simulator use (the broker URL and session options, the fetch
//! configuration, the store, the tract model, telemetry's process figures,
//! systemd and TLS helpers, configuration).

pub mod agent;
pub mod check;
pub mod config;
pub mod deploy;
#[doc(hidden)]
pub mod fuzzing;
pub mod link;
pub mod report;
pub mod serve;
pub mod sys;

pub use agent::{Config, run};

/// Exit code for a usage or configuration error (sysexits `EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;

/// Every argument and subcommand of `cmd` (at any depth) that has no help
/// text, by path (`outpost-sim deploy --wait`): both binaries' tests require
/// none.
pub fn without_help(cmd: &clap::Command) -> Vec<String> {
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let help = a.get_help().or(a.get_long_help()).map(|h| h.to_string()).unwrap_or_default();
            if help.trim().is_empty() {
                let name = a.get_long().map(|l| format!("--{l}")).unwrap_or_else(|| a.get_id().to_string());
                out.push(format!("{path} {name}"));
            }
        }
        for sub in cmd.get_subcommands() {
            let sub_path = format!("{path} {}", sub.get_name());
            if sub.get_about().or(sub.get_long_about()).is_none_or(|h| h.to_string().trim().is_empty()) {
                out.push(sub_path.clone());
            }
            walk(sub, &sub_path, out);
        }
    }
    let mut out = Vec::new();
    walk(cmd, cmd.get_name(), &mut out);
    out
}

#[cfg(test)]
#[test]
fn the_help_walk_finds_what_lacks_help_at_any_depth() {
    let probe = clap::Command::new("probe")
        .arg(clap::Arg::new("quiet").long("quiet").help("Say less"))
        .subcommand(clap::Command::new("sub").arg(clap::Arg::new("x").long("x")));
    assert_eq!(without_help(&probe), ["probe sub", "probe sub --x"]);
}

/// Parses the command line of one of Outpost's binaries: help and version
/// exit 0, a usage error prints the reason and exits 64.
pub fn parse_args<T: clap::Parser>() -> Result<T, std::process::ExitCode> {
    T::try_parse().map_err(|e| {
        let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
        let _ = e.print();
        std::process::ExitCode::from(code)
    })
}

/// Parses a byte size: a whole number with an optional unit, `K`/`KB`
/// (1000), `KiB` (1024), likewise `M`, `G`, `T` (case-insensitive), e.g.
/// `500MB`, `2GiB`, `65536`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("'{s}': expected a size such as 65536, 500MB or 2GiB"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "g" | "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        "t" | "tb" => 1000 * 1000 * 1000 * 1000,
        "tib" => 1 << 40,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (expected B, KB, KiB, MB, MiB, GB, GiB, TB or TiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{s}': too large"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        for (s, n) in [("65536", 65536), ("500MB", 500_000_000), ("2GiB", 2 << 30), ("4 mib", 4 << 20), ("7k", 7000)] {
            assert_eq!(super::parse_size(s), Ok(n), "{s}");
        }
        for s in ["", "MB", "1.5GB", "-1", "3 parsecs", "99999999999TB"] {
            assert!(super::parse_size(s).is_err(), "{s}");
        }
    }
}
