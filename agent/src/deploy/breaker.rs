//! The crash-loop breaker: a pure judgement made once at start-up, on the
//! record the last run left. The record says whether that run ended
//! cleanly (`running` is cleared by a requested stop only), in which boot
//! (an exit across a reboot is a power cut, not a model's doing), and what
//! it was doing: installing a version (its model code running in the agent
//! for the first time: its load after the isolated validation, up to the
//! swap), or serving one. An unclean exit while installing X
//! quarantines X at once; `max_crashes` unclean exits within `window`
//! while serving X quarantine X and the version before it serves again.
//! A quarantined version is not retried until a new revision.

use super::record::{ActiveRecord, Quarantined, Record};
use outpost_protocol::{ErrorCode, ErrorInfo, Outcome};
use std::time::{Duration, SystemTime};

/// `limits.crash_loop_max` unclean exits within `limits.crash_loop_window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub max_crashes: u32,
    pub window: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy { max_crashes: 3, window: Duration::from_secs(600) }
    }
}

/// What the breaker did.
#[derive(Debug, Clone)]
pub struct Tripped {
    pub quarantined: ActiveRecord,
    /// The version that serves again in its place.
    pub restored: Option<ActiveRecord>,
    /// It was serving (else it was being installed).
    pub was_active: bool,
    pub error: ErrorInfo,
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// The kernel's id of this boot (empty where there is none).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Judges the last run's exit and updates `record` (the caller persists it).
pub fn judge(record: &mut Record, policy: Policy, now: SystemTime, boot: &str) -> Option<Tripped> {
    if !record.running {
        record.installing = None;
        return None;
    }
    if !record.boot_id.is_empty() && record.boot_id != boot {
        // The machine went down (a power cut, a reboot): not a model's doing.
        tracing::warn!("the last run ended with the machine (a reboot or a power cut): nothing is blamed on a model");
        record.installing = None;
        return None;
    }
    let now_s = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if let Some(x) = record.installing.take() {
        let m = &x.deployment.model;
        let error = ErrorInfo::new(
            ErrorCode::ModelCrashed,
            format!(
                "{}@{}: the agent stopped uncleanly while installing it (loading it after its isolated validation, from {}); quarantined until a new revision",
                m.name, m.version, x.since
            ),
        );
        record.set_outcome(&x.deployment, Outcome::Failed, Some(error.clone()));
        record.quarantined = Some(Quarantined { record: x.clone(), error: error.clone() });
        return Some(Tripped { quarantined: x, restored: None, was_active: false, error });
    }
    let active = record.active.clone()?;
    record.crashes.push(now_s);
    record.crashes.retain(|t| now_s.saturating_sub(*t) < policy.window.as_secs());
    if policy.max_crashes == 0 || (record.crashes.len() as u32) < policy.max_crashes {
        tracing::warn!(
            crashes = record.crashes.len(),
            max = policy.max_crashes,
            "the last run ended uncleanly while serving {}@{}",
            active.deployment.model.name,
            active.deployment.model.version
        );
        return None;
    }
    let m = &active.deployment.model;
    let at: Vec<String> = record.crashes.iter().map(|t| rfc3339(*t)).collect();
    let error = ErrorInfo::new(
        ErrorCode::ModelCrashed,
        format!(
            "{}@{}: {} unclean exits of the agent within {} s while it served (at {}); quarantined until a new revision",
            m.name,
            m.version,
            at.len(),
            policy.window.as_secs(),
            at.join(", ")
        ),
    );
    record.crashes.clear();
    let restored = record.previous.take().map(|p| ActiveRecord { since: rfc3339(now_s), ..p });
    record.active = restored.clone();
    record.set_outcome(&active.deployment, Outcome::RolledBack, Some(error.clone()));
    record.quarantined = Some(Quarantined { record: active.clone(), error: error.clone() });
    Some(Tripped { quarantined: active, restored, was_active: true, error })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::reconcile::Source;

    fn rec(version: &str) -> ActiveRecord {
        let json = format!(
            r#"{{"schema":"outpost.deployment.v1","deployment_id":"d-{version}","revision":1,
            "model":{{"name":"m","version":"{version}","manifest_url":"http://r/m/{version}/manifest.json",
            "manifest_sha256":"{}"}}}}"#,
            version.repeat(64).chars().take(64).collect::<String>()
        );
        ActiveRecord::new(Source::Device, outpost_protocol::Deployment::from_json(json.as_bytes()).unwrap())
    }

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn a_clean_exit_counts_nothing() {
        let mut r = Record { active: Some(rec("1")), installing: Some(rec("2")), ..Record::default() };
        assert!(judge(&mut r, Policy::default(), at(1000), "b1").is_none());
        assert!(r.crashes.is_empty() && r.installing.is_none() && r.quarantined.is_none());
    }

    #[test]
    fn an_exit_across_a_reboot_is_not_blamed_on_a_model() {
        let mut r = Record {
            running: true,
            boot_id: "b0".into(),
            active: Some(rec("1")),
            installing: Some(rec("2")),
            ..Record::default()
        };
        assert!(judge(&mut r, Policy { max_crashes: 1, ..Policy::default() }, at(1000), "b1").is_none());
        assert!(r.crashes.is_empty() && r.installing.is_none() && r.quarantined.is_none());
    }

    #[test]
    fn dying_while_installing_quarantines_at_once() {
        let mut r = Record { running: true, active: Some(rec("1")), installing: Some(rec("2")), ..Record::default() };
        let t = judge(&mut r, Policy::default(), at(1000), "b1").unwrap();
        assert_eq!(t.quarantined.deployment.model.version, "2");
        assert_eq!(t.error.code, ErrorCode::ModelCrashed);
        assert!(!t.was_active);
        // What served keeps serving, and no crash is counted against it.
        assert_eq!(r.active.unwrap().deployment.model.version, "1");
        assert!(r.crashes.is_empty());
        assert_eq!(r.quarantined.unwrap().record.deployment.model.version, "2");
    }

    #[test]
    fn repeated_crashes_while_serving_restore_the_previous_version() {
        let mut r = Record { running: true, active: Some(rec("2")), previous: Some(rec("1")), ..Record::default() };
        let p = Policy { max_crashes: 3, window: Duration::from_secs(600) };
        assert!(judge(&mut r, p, at(1000), "b1").is_none());
        r.running = true;
        // Outside the window: the first one no longer counts.
        assert!(judge(&mut r, p, at(1700), "b1").is_none());
        r.running = true;
        assert!(judge(&mut r, p, at(1800), "b1").is_none());
        assert_eq!(r.crashes, vec![1700, 1800]);
        r.running = true;
        let t = judge(&mut r, p, at(1900), "b1").unwrap();
        assert!(t.was_active);
        assert!(t.error.message.contains("3 unclean exits of the agent within 600 s"), "{}", t.error.message);
        assert_eq!(r.active.as_ref().unwrap().deployment.model.version, "1");
        assert_eq!(t.restored.unwrap().deployment.model.version, "1");
        assert_eq!(r.last_deployment.unwrap().outcome, Outcome::RolledBack);
        assert!(r.crashes.is_empty() && r.previous.is_none());
    }
}
