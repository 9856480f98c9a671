//! Will a new model fit in memory beside the one serving? Checked before
//! loading, so a device refuses a model it cannot hold with a clear error
//! instead of being killed by the OOM killer in the middle of a swap.
//!
//! Available memory is the smaller of the kernel's `MemAvailable` and the
//! headroom under this process's cgroup limit (v2 `memory.max`, or v1
//! `memory.limit_in_bytes`), which is what a systemd `MemoryMax=` sets.

use outpost_protocol::{ErrorCode, ErrorInfo};

/// Memory a model takes while it loads, as a multiple of its file size: the
/// parsed graph, the typed and optimised copies and the packed weights.
pub const LOAD_FACTOR: u64 = 3;
/// Working room kept besides (activations of the golden sample, the agent itself).
pub const HEADROOM: u64 = 16 << 20;

/// Bytes this process can still allocate, if it can be told.
pub fn available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| meminfo_available(&t));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|t| cgroup_headroom(&t));
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Headroom under the memory limit of the cgroup named in /proc/self/cgroup.
fn cgroup_headroom(self_cgroup: &str) -> Option<u64> {
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (dir, limit, usage, inactive) = match controllers {
            "" => (format!("/sys/fs/cgroup{path}"), "memory.max", "memory.current", "inactive_file"),
            c if c.split(',').any(|c| c == "memory") => (
                format!("/sys/fs/cgroup/memory{path}"),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            ),
            _ => continue,
        };
        let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok();
        if let (Some(l), Some(u)) = (read(limit), read(usage))
            && let Some(h) = headroom(&l, &u)
        {
            // The usage counts the page cache too (the blob just downloaded,
            // for one); its inactive part is reclaimed before anything is
            // killed, so it is room as well.
            let reclaimable = read("memory.stat").and_then(|t| stat_value(&t, inactive)).unwrap_or(0);
            return Some(h.saturating_add(reclaimable));
        }
    }
    None
}

/// A value of cgroup's `memory.stat`, in bytes.
fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Limit minus usage; `None` when there is no limit ("max", or v1's huge number).
fn headroom(limit: &str, usage: &str) -> Option<u64> {
    let limit: u64 = limit.trim().parse().ok().filter(|l| *l < (1 << 60))?;
    let usage: u64 = usage.trim().parse().ok()?;
    Some(limit.saturating_sub(usage))
}

/// Memory kept for the agent itself when the isolated validation's limit
/// comes from what is available.
pub const VALIDATION_RESERVE: u64 = 32 << 20;
/// The smallest automatic validation limit.
pub const VALIDATION_MIN: u64 = 64 << 20;

/// The isolated validation's memory limit when the configuration sets
/// none: what this process could still allocate, less a reserve for the
/// agent (`None`: the system cannot tell; the OOM killer still picks the
/// child first).
pub fn validation_limit(available: Option<u64>) -> Option<u64> {
    available.map(|a| a.saturating_sub(VALIDATION_RESERVE).max(VALIDATION_MIN))
}

/// Refuses a model of `model_bytes` (its file) when loading it beside the
/// serving one would not fit in `available` bytes.
pub fn check_fits(what: &str, model_bytes: u64, available: Option<u64>) -> Result<(), ErrorInfo> {
    let Some(available) = available else { return Ok(()) };
    let need = model_bytes.saturating_mul(LOAD_FACTOR).saturating_add(HEADROOM);
    if need <= available {
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    Err(ErrorInfo::new(
        ErrorCode::InsufficientMemory,
        format!(
            "{what}: loading it beside the serving model needs about {:.0} MiB ({LOAD_FACTOR} x its {:.1} MiB + {} MiB), only {:.0} MiB are available (MemAvailable or the service's cgroup limit); the serving model is untouched",
            mib(need),
            mib(model_bytes),
            HEADROOM >> 20,
            mib(available)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_cgroup_limits_are_read() {
        let text = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(meminfo_available(text), Some(2048 * 1024));
        assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
        assert_eq!(headroom("max\n", "123"), None);
        assert_eq!(headroom("9223372036854771712", "5"), None);
        assert_eq!(headroom("1000\n", "300\n"), Some(700));
        assert_eq!(headroom("100", "300"), Some(0));
        let stat = "cache 100\ninactive_file 4096\ntotal_inactive_file 8192\n";
        assert_eq!(stat_value(stat, "inactive_file"), Some(4096));
        assert_eq!(stat_value(stat, "total_inactive_file"), Some(8192));
        assert_eq!(stat_value(stat, "active_file"), None);
        // This machine answers something, and it is not zero.
        assert!(available().is_some_and(|a| a > 0));
    }

    #[test]
    fn a_model_that_does_not_fit_is_refused_with_the_figures() {
        assert!(check_fits("model.onnx", 10 << 20, Some(1 << 30)).is_ok());
        assert!(check_fits("model.onnx", 10 << 20, None).is_ok());
        let e = check_fits("model.onnx", 100 << 20, Some(200 << 20)).unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientMemory);
        assert!(
            e.message.starts_with("model.onnx: loading it beside the serving model needs about 316 MiB (3 x its 100.0 MiB + 16 MiB), only 200 MiB are available"),
            "{}",
            e.message
        );
    }
}
