//! The Outpost device agent.
//!
//! Map of the crate (one module per job, in the order a deployment meets them):
//! - [`mqtt`]: broker URL, session options, reconnect backoff, the publisher task.
//! - [`reconcile`]: desired vs actual, a pure decision function.
//! - [`fetch`]: streaming downloads with sha256, size caps, timeouts and retries.
//! - [`store`]: content-addressed blobs and versions, crash-safe writes.
//! - [`engine`]: tract model loading, golden-sample validation, inference.
//! - [`serve`]: the active model behind an atomic swap, a bounded worker pool.
//! - [`deploy`]: one deployment from manifest to swap.
//! - [`status`]: events, retained state and what survives a restart.
//! - [`http`]: the local Open Inference Protocol v2 endpoint and `/metrics`.
//! - [`telemetry`]: periodic health reports.
//! - [`agent`]: the main loop that wires them together.

pub mod agent;
pub mod deploy;
pub mod engine;
pub mod fetch;
pub mod http;
pub mod mqtt;
pub mod reconcile;
pub mod serve;
pub mod status;
pub mod store;
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
