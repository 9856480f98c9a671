//! The systemd notify protocol (`Type=notify`), written out: a datagram of
//! `KEY=VALUE` lines to the socket named by `NOTIFY_SOCKET` (a path, or
//! `@name` in the abstract namespace). Without `NOTIFY_SOCKET` every call is
//! a no-op, so the agent runs the same outside systemd.
//!
//! `READY=1` once the agent serves from its store and its MQTT session is
//! connecting; `WATCHDOG=1` from the main loop at half of `WATCHDOG_USEC`
//! while it is healthy; `RELOADING=1` / `READY=1` around a SIGHUP reload;
//! `STOPPING=1` when a shutdown begins.

use std::time::Duration;

fn socket_addr(name: &std::ffi::OsStr) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = name.as_bytes();
    match bytes.first() {
        #[cfg(target_os = "linux")]
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..])
        }
        Some(b'/') => std::os::unix::net::SocketAddr::from_pathname(name),
        _ => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "NOTIFY_SOCKET: expected a path or @name")),
    }
}

/// Sends one notification; false when there is no socket or it failed.
pub fn notify(state: &str) -> bool {
    let Some(name) = std::env::var_os("NOTIFY_SOCKET") else { return false };
    let sent = socket_addr(&name).and_then(|addr| {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(error = %e, "systemd notification not sent");
            false
        }
    }
}

pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

pub fn status(status: &str) {
    notify(&format!("STATUS={status}"));
}

pub fn reloading() {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

pub fn stopping() {
    notify("STOPPING=1\nSTATUS=stopping: finishing requests in flight");
}

pub fn watchdog() {
    notify("WATCHDOG=1");
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, when systemd
/// set one for this process (`WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_socket_addresses() {
        assert!(socket_addr(std::ffi::OsStr::new("/run/systemd/notify")).is_ok());
        assert!(socket_addr(std::ffi::OsStr::new("@/org/freedesktop/systemd1/notify/1")).is_ok());
        assert!(socket_addr(std::ffi::OsStr::new("relative")).is_err());
    }
}
