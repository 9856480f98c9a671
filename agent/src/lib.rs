//! The Outpost device agent.
//!
//! Map of the crate (one module per job, in the order a deployment meets them):
//! - [`mqtt`]: broker URL, session options, reconnect backoff, the publisher task.
//! - [`reconcile`]: desired vs actual, a pure decision function.
//! - [`fetch`]: streaming downloads with sha256, size caps, timeouts and retries.
//! - [`store`]: content-addressed blobs and versions, crash-safe writes.
//! - [`memory`]: will a model fit beside the serving one (checked before loading).
//! - [`engine`]: tract model loading, golden-sample validation, inference.
//! - [`serve`]: the active model behind an atomic swap, a bounded worker pool.
//! - [`probation`]: judging a new version after the swap, for automatic rollback.
//! - [`deploy`]: one deployment from manifest to swap.
//! - [`status`]: events, retained state and what survives a restart.
//! - [`journal`]: the on-disk outbox of events while the broker is unreachable.
//! - [`http`]: the local Open Inference Protocol v2 endpoint and `/metrics`.
//! - [`telemetry`]: periodic health reports.
//! - [`agent`]: the main loop that wires them together.
//! - [`check`]: `outpost check-bundle`, the deployment pipeline on a throw-away store.

pub mod agent;
pub mod check;
pub mod config;
pub mod deploy;
pub mod engine;
pub mod fetch;
pub mod http;
pub mod journal;
pub mod memory;
pub mod mqtt;
pub mod probation;
pub mod reconcile;
pub mod serve;
pub mod status;
pub mod store;
pub mod systemd;
pub mod telemetry;

pub use agent::{Config, run};

/// Exit code for a usage or configuration error (sysexits `EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;

/// Parses the command line of one of Outpost's binaries: help and version
/// exit 0, a usage error prints the reason and exits 64.
pub fn parse_args<T: clap::Parser>() -> Result<T, std::process::ExitCode> {
    T::try_parse().map_err(|e| {
        let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
        let _ = e.print();
        std::process::ExitCode::from(code)
    })
}

/// Fault injection for crash tests: when the environment variable
/// `OUTPOST_CRASH_AT` names this point, the process aborts here, as a power
/// cut would stop it (no destructor, no further write). The points are the
/// instants between two durable steps of installing a version:
/// `desired-received` (a deployment message handled, not yet recorded or acked),
/// `blob-stored`, `version-unrenamed`, `version-installed`, `state-persisted`.
pub fn crash_point(point: &str) {
    if fault_at(point) {
        eprintln!("outpost: OUTPOST_CRASH_AT={point}: aborting");
        std::process::abort();
    }
}

fn fault_at(point: &str) -> bool {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    AT.get_or_init(|| std::env::var("OUTPOST_CRASH_AT").ok()).as_deref() == Some(point)
}

/// Fault injection for the watchdog test: when `OUTPOST_CRASH_AT` names
/// this point (`stall-main-loop`), the calling thread hangs here for good,
/// as a deadlocked loop would.
pub fn fault_point(point: &str) {
    if fault_at(point) {
        eprintln!("outpost: OUTPOST_CRASH_AT={point}: hanging");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
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

/// The delay before retry number `attempt` (0-based): `base * 2^attempt`,
/// capped at `max`, then jittered into [d/2, d] so devices that failed
/// together do not retry together. Used for reconnects and downloads alike.
pub fn backoff_delay(base: std::time::Duration, attempt: u32, max: std::time::Duration) -> std::time::Duration {
    base.saturating_mul(1u32 << attempt.min(16)).min(max).mul_f64(0.5 + 0.5 * jitter())
}

/// A number in [0, 1) for backoff jitter. Not for cryptography: it only has
/// to differ between devices and attempts.
pub fn jitter() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        x = t ^ (u64::from(std::process::id()) << 32) | 1;
    }
    // xorshift64*
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    STATE.store(x, Ordering::Relaxed);
    (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
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
