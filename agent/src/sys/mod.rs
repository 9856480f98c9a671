//! What the agent needs from the system around it: systemd's notify and
//! watchdog ([`systemd`]), TLS trust ([`tls`]), time, jitter, and the
//! fault-injection points the crash and race tests use.

pub mod alloc;
pub mod journald;
pub mod systemd;
pub mod tls;

/// Now, as RFC 3339 to the second (event and state timestamps).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// A URL as logs, events and `check-config` show it: a broker URL's
/// password becomes `***` (its user name stays: it names the device); an
/// HTTP URL's whole userinfo (a token as user name), its query string
/// (presigned URLs carry their token there) and fragment become `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    if scheme.starts_with("mqtt") || scheme == "tcp" || scheme == "ssl" {
        // No path: the login is everything before the last '@'.
        return match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => format!("{scheme}://{userinfo}@{host}"),
            },
            None => url.to_string(),
        };
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_string(),
    };
    let tail = match tail.find(['?', '#']) {
        Some(i) => format!("{}{}***", &tail[..i], &tail[i..=i]),
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
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

/// Fault injection for race tests: when `OUTPOST_DELAY_AT` is
/// `POINT:MILLISECONDS` and names this point, the caller waits that long
/// here (logged, so a test knows the instant is reached). Opens the windows
/// between two steps that are otherwise microseconds apart. Points:
/// `before-swap` (a deployment prepared, not yet swapped in),
/// `mqtt-request` (an MQTT request received, not yet parsed),
/// `retention-SLOT` (model slot SLOT swapped a version in, its store
/// retention not yet applied; `retention-` for the default slot).
pub async fn delay_point(point: &str) {
    if let Some(ms) = delay_at(point) {
        eprintln!("outpost: OUTPOST_DELAY_AT={point}: delaying {ms} ms");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

/// [`delay_point`] for blocking threads.
pub fn delay_point_blocking(point: &str) {
    if let Some(ms) = delay_at(point) {
        eprintln!("outpost: OUTPOST_DELAY_AT={point}: delaying {ms} ms");
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

fn delay_at(point: &str) -> Option<u64> {
    static AT: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| {
        let v = std::env::var("OUTPOST_DELAY_AT").ok()?;
        let (p, ms) = v.rsplit_once(':')?;
        Some((p.to_string(), ms.parse().ok()?))
    });
    at.as_ref().filter(|(p, _)| p == point).map(|(_, ms)| *ms)
}

/// The delay before retry number `attempt` (0-based): `base * 2^attempt`,
/// capped at `max`, then jittered into [d/2, d] so devices that failed
/// together do not retry together. Used for reconnects and downloads alike.
pub fn backoff_delay(base: std::time::Duration, attempt: u32, max: std::time::Duration) -> std::time::Duration {
    base.saturating_mul(1u32 << attempt.min(16)).min(max).mul_f64(0.5 + 0.5 * jitter())
}

/// A number in [0, 1) for backoff jitter. Not for cryptography: it only has
/// to differ between devices and attempts (fastrand's generator is seeded
/// per thread from the OS).
pub fn jitter() -> f64 {
    fastrand::f64()
}

#[cfg(test)]
mod redact_tests {
    #[test]
    fn passwords_and_query_strings_are_masked() {
        use super::redact_url as r;
        assert_eq!(r("mqtt://admin:hunter2@broker:1883"), "mqtt://admin:***@broker:1883");
        assert_eq!(r("mqtt://admin@broker"), "mqtt://admin@broker");
        // Passwords holding '/', '?' or '@' (base64-made ones do).
        assert_eq!(r("mqtts://admin:hun/ter?2@x@broker:8883"), "mqtts://admin:***@broker:8883");
        assert_eq!(
            r("https://bucket.s3/m/1/manifest.json?X-Amz-Signature=abc&X-Amz-Credential=k"),
            "https://bucket.s3/m/1/manifest.json?***"
        );
        assert_eq!(r("http://u:p@h/a@b?x"), "http://***@h/a@b?***");
        assert_eq!(r("https://TOKEN@h/m.json#frag"), "https://***@h/m.json#***");
        assert_eq!(r("http://registry:8000/m/1/model.onnx"), "http://registry:8000/m/1/model.onnx");
    }
}
