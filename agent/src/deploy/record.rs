//! The device's deployment record, `DATA/agent.json`: what serves, what is
//! being deployed, what was refused, which versions retention keeps, and
//! the last event number. Only the [`super::Deployer`] holds it; it writes
//! the file whole (temp file, fsync, rename) after each change, awaiting
//! each write, so the file never holds an older record than a newer one
//! already written.

use super::reconcile::Source;
use super::store::Store;
use crate::report::View;
use outpost_protocol::{ActiveModel, Deployment, ErrorInfo, LastDeployment, Outcome};
use serde::{Deserialize, Serialize};

/// What survives a restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub active: Option<ActiveRecord>,
    pub last_deployment: Option<LastDeployment>,
    /// Manifest digests of the versions that served, most recent first: what
    /// retention keeps (the active one and `keep_versions` before it).
    #[serde(default)]
    pub history: Vec<String>,
    /// The deployment the agent rolled back from, so that replaying its
    /// retained desired state after a restart does not deploy it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<ActiveRecord>,
    /// A desired state accepted (and acked to the broker) whose deployment
    /// has not ended: resumed after a restart, broker or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<ActiveRecord>,
    /// Set while a version's model code runs for the first time (isolated
    /// validation, then its load in the agent, up to the swap): an unclean
    /// exit meanwhile quarantines it (the crash-loop breaker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installing: Option<ActiveRecord>,
    /// True while an agent runs on this record; false after a clean exit.
    #[serde(default)]
    pub running: bool,
    /// The kernel's boot id when it last ran: an exit across a reboot (a
    /// power cut) is not blamed on a model.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot_id: String,
    /// When the agent exited uncleanly while serving the active version
    /// (Unix seconds, oldest first; cleared when another version serves).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crashes: Vec<u64>,
    /// What served before the active version: where the breaker falls back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<ActiveRecord>,
    /// A version the breaker quarantined, and why: not retried until a new revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<Quarantined>,
    /// The highest revision accepted per desired topic (`device`,
    /// `group:NAME`): rollback and freeze protection across restarts.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub revisions: std::collections::BTreeMap<String, u64>,
    /// True when `revisions` (and `pending`) were accepted with trust keys
    /// configured: what an unsigned publisher set before keys were
    /// configured is not carried into signed operation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub signed_revisions: bool,
    /// The desired deployment each topic holds now (same keys as
    /// `revisions`; a withdrawal removes it): after a restart, a retained
    /// replay is recognised as what its topic already asked for (not
    /// refused as stale and forgotten, which lost the group a device falls
    /// back to when its own override is withdrawn).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub desired: std::collections::BTreeMap<String, outpost_protocol::Deployment>,
    /// The groups `Source::Group(i)` indexes, as configured when written:
    /// a reordered or shortened group list is mapped by name at start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

impl Record {
    /// Maps the sources of the records from the groups they were written
    /// with to `groups` (by name); a group no longer configured becomes
    /// [`Source::GONE`]. Records written before groups were recorded keep
    /// their positions.
    pub fn remap_groups(&mut self, groups: &[String]) {
        let old = std::mem::replace(&mut self.groups, groups.to_vec());
        if old.is_empty() || old == groups {
            return;
        }
        let map = |a: &mut ActiveRecord| {
            if let Source::Group(i) = a.source {
                a.source =
                    old.get(i).and_then(|g| groups.iter().position(|x| x == g)).map_or(Source::GONE, Source::Group);
            }
        };
        for a in [&mut self.active, &mut self.rolled_back, &mut self.pending, &mut self.installing, &mut self.previous]
            .into_iter()
            .flatten()
        {
            map(a);
        }
        if let Some(q) = &mut self.quarantined {
            map(&mut q.record);
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActiveRecord {
    pub source: Source,
    pub deployment: Deployment,
    pub since: String,
    /// How its validation settled that it runs (restored without rerunning it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled: Option<crate::serve::model::Settled>,
}

impl ActiveRecord {
    pub fn new(source: Source, deployment: Deployment) -> ActiveRecord {
        ActiveRecord { source, deployment, since: crate::sys::now_rfc3339(), settled: None }
    }

    /// Whether both name the same deployment (id and revision).
    pub fn same(&self, d: &Deployment) -> bool {
        self.deployment.deployment_id == d.deployment_id && self.deployment.revision == d.revision
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Quarantined {
    pub record: ActiveRecord,
    pub error: ErrorInfo,
}

/// The file's name in the data directory (the default slot's record).
pub const FILE: &str = "agent.json";

/// Where the record of model slot `slot` is kept (None: the default slot's, [`FILE`]).
pub fn file(slot: Option<&str>) -> String {
    match slot {
        Some(s) => format!("slots/{s}.json"),
        None => FILE.to_string(),
    }
}

/// The model slots that have a record in the store (restored at start).
pub fn slots_on_disk(store: &Store) -> Vec<String> {
    let mut slots: Vec<String> = std::fs::read_dir(store.root().join("slots"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_string))
        .filter(|s| outpost_protocol::topics::validate_slot(s).is_ok())
        .collect();
    slots.sort();
    slots
}

/// The slots (keys: `""` for the default slot) an unclean exit of the last
/// run is blamed on: with several models in one process the crash cannot
/// be pinned on one for sure, so it goes to the slots that were installing
/// a version (their model code ran for the first time), else to the slot
/// whose active version went live last; the others count nothing.
pub fn blamed_for_exit(store: &Store) -> Vec<String> {
    let mut records: Vec<(String, Record)> = vec![(String::new(), Record::read(store, None))];
    records.extend(slots_on_disk(store).into_iter().map(|s| {
        let r = Record::read(store, Some(&s));
        (s, r)
    }));
    records.retain(|(_, r)| r.running);
    let installing: Vec<String> =
        records.iter().filter(|(_, r)| r.installing.is_some()).map(|(k, _)| k.clone()).collect();
    if !installing.is_empty() {
        return installing;
    }
    let newest = records.iter().filter_map(|(k, r)| Some((r.active.as_ref()?.since.clone(), k))).max();
    newest.map(|(_, k)| vec![k.clone()]).unwrap_or_default()
}

impl Record {
    /// The record of the last run (an unreadable one counts as none).
    pub fn read(store: &Store, slot: Option<&str>) -> Record {
        store.read(&file(slot)).and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Writes it durably (an fsync: from a blocking thread).
    pub fn write(&self, store: &Store, slot: Option<&str>) -> Result<(), String> {
        store.write_atomic(&file(slot), &serde_json::to_vec_pretty(self).unwrap_or_default()).map_err(|e| {
            tracing::error!(error = %e, "cannot persist agent state; it will be lost at restart");
            e.to_string()
        })
    }

    /// Records the outcome of `d`. An ended deployment is no longer pending;
    /// one that goes active clears the refusal of an earlier one.
    pub fn set_outcome(&mut self, d: &Deployment, outcome: Outcome, error: Option<ErrorInfo>) {
        self.last_deployment =
            Some(LastDeployment { deployment_id: d.deployment_id.clone(), revision: d.revision, outcome, error });
        if outcome == Outcome::Active {
            self.rolled_back = None;
            // A newer revision from the topic of a quarantined one went active:
            // the quarantine is over (that topic has moved on).
            if let Some(q) = &self.quarantined
                && q.record.deployment.revision < d.revision
            {
                self.quarantined = None;
            }
        }
        if outcome != Outcome::InProgress {
            if self.pending.as_ref().is_some_and(|p| p.same(d)) {
                self.pending = None;
            }
            if self.installing.as_ref().is_some_and(|p| p.same(d)) {
                self.installing = None;
            }
        }
    }

    /// Records `sha` as the version serving now and returns the versions to
    /// keep: it and at most `keep_previous` before it.
    pub fn push_history(&mut self, sha: &str, keep_previous: usize) -> Vec<String> {
        self.history.retain(|h| h != sha);
        self.history.insert(0, sha.to_string());
        self.history.truncate(keep_previous + 1);
        self.history.clone()
    }

    pub fn view(&self) -> View {
        View {
            active: self.active.as_ref().map(|a| ActiveModel {
                name: a.deployment.model.name.clone(),
                version: a.deployment.model.version.clone(),
                manifest_sha256: a.deployment.model.manifest_sha256.clone(),
                deployment_id: a.deployment.deployment_id.clone(),
                revision: a.deployment.revision,
                since: a.since.clone(),
                runtime: a.settled.as_ref().map(|s| s.runtime.to_string()),
            }),
            last_deployment: self.last_deployment.clone(),
        }
    }
}
