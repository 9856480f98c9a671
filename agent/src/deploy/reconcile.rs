//! Desired vs actual: the one place that decides what a desired-state message
//! means. A pure state machine, `(state, message) -> decision`, with no I/O.
//!
//! Rules: the device topic beats group topics; among groups the first listed
//! wins; an empty payload withdraws that source's desired state (the device
//! falls back to the next source, or undeploys when none is left); an older
//! or equal `revision` from the same source never replaces what it sent
//! before; the same deployment seen again (QoS 1 redelivery, reconnect,
//! retained replay) is a no-op.

use outpost_protocol::Deployment;

/// Where a desired state came from. Ordered by precedence: Device first, then
/// groups in the order they are configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub enum Source {
    Device,
    Group(usize),
}

impl Source {
    /// A group that is no longer configured (a record from before the
    /// configuration changed): nothing arrives from it any more.
    pub const GONE: Source = Source::Group(usize::MAX);
}

/// What the agent should do about a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Start deploying this (superseding anything in progress).
    Deploy(Deployment),
    /// Nothing is desired any more: stop serving.
    Undeploy,
    /// Already applied or in progress: report `unchanged`, do nothing.
    Unchanged(Deployment),
    /// Older than or equal to what this source sent before: report `stale_revision`.
    Stale { deployment: Deployment, newest: u64 },
    /// Valid, but shadowed by a source of higher precedence: nothing to do.
    Shadowed(Deployment),
    /// Empty payload for a source that had nothing, or that was shadowed.
    Nothing,
    /// A signed undeployment older than what this source sent before.
    StaleWithdraw { revision: u64, newest: u64 },
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reconciler {
    /// Desired state per source (None: nothing, or withdrawn).
    desired: Vec<(Source, Deployment)>,
    /// Highest revision seen per source, kept even after a withdrawal.
    newest: Vec<(Source, u64)>,
    /// What the agent is deploying or serving now (its source and deployment).
    target: Option<(Source, Deployment)>,
    /// What each topic asked for before a restart: taken back as its
    /// desired state only when the topic replays it (same deployment, same
    /// revision, through the signature check in force now); a topic that
    /// was withdrawn meanwhile replays nothing and stays withdrawn.
    #[serde(default)]
    recalled: Vec<(Source, Deployment)>,
}

fn same(a: &Deployment, b: &Deployment) -> bool {
    a.deployment_id == b.deployment_id && a.revision == b.revision && a.model == b.model && a.serving == b.serving
}

impl Reconciler {
    pub fn new() -> Self {
        Self::default()
    }

    fn effective(&self) -> Option<(Source, Deployment)> {
        self.desired.iter().min_by_key(|(s, _)| *s).cloned()
    }

    /// Handles one desired state of `source` (already parsed and, with trust
    /// keys, verified): `None` withdraws it (an empty payload).
    pub fn on_message(&mut self, source: Source, payload: Option<Deployment>) -> Decision {
        match payload {
            Some(d) => {
                if let Some((_, newest)) = self.newest.iter().find(|(s, _)| *s == source).copied() {
                    let current = self.desired.iter().find(|(s, _)| *s == source).map(|(_, d)| d);
                    if current.is_some_and(|c| same(c, &d))
                        || self.target.as_ref().is_some_and(|(s, t)| *s == source && same(t, &d))
                    {
                        return Decision::Unchanged(d);
                    }
                    if d.revision <= newest {
                        let recalled = self.recalled.iter().position(|(s, r)| *s == source && same(r, &d));
                        if let Some(i) = recalled.filter(|_| d.revision == newest) {
                            self.recalled.remove(i);
                            self.desired.retain(|(s, _)| *s != source);
                            self.desired.push((source, d.clone()));
                            return self.apply_effective(Some(d));
                        }
                        return Decision::Stale { deployment: d, newest };
                    }
                }
                self.newest.retain(|(s, _)| *s != source);
                self.newest.push((source, d.revision));
                self.desired.retain(|(s, _)| *s != source);
                self.desired.push((source, d.clone()));
                self.apply_effective(Some(d))
            }
            None => {
                let had = self.desired.iter().any(|(s, _)| *s == source);
                self.desired.retain(|(s, _)| *s != source);
                if !had {
                    return Decision::Nothing;
                }
                self.apply_effective(None)
            }
        }
    }

    /// A signed undeployment: withdraws the source's desired state like an
    /// empty payload, and raises its revision like a deployment, so an
    /// older signed deployment replayed afterwards is stale. Seen again (a
    /// retained replay) it is nothing.
    pub fn on_withdraw(&mut self, source: Source, revision: u64) -> Decision {
        if let Some(newest) = self.newest(source)
            && revision <= newest
        {
            let desired = self.desired.iter().any(|(s, _)| *s == source);
            return if revision == newest && !desired {
                Decision::Nothing
            } else {
                Decision::StaleWithdraw { revision, newest }
            };
        }
        self.remember(source, revision);
        self.on_message(source, None)
    }

    /// True when a source of higher precedence has a desired state: what
    /// `source` sends is shadowed.
    pub fn outranked(&self, source: Source) -> bool {
        self.desired.iter().any(|(s, _)| *s < source)
    }

    /// Forgets every revision (they were accepted without signatures and
    /// the device now requires them).
    pub fn forget_revisions(&mut self) {
        self.newest.clear();
    }

    /// The highest revision accepted from `source`.
    pub fn newest(&self, source: Source) -> Option<u64> {
        self.newest.iter().find(|(s, _)| *s == source).map(|(_, r)| *r)
    }

    /// True when `d` would be taken as a new desired state of `source` (not
    /// a replay, not stale).
    pub fn is_new(&self, source: Source, d: &Deployment) -> bool {
        self.newest(source).is_none_or(|n| d.revision > n)
    }

    /// Raises the highest revision known from `source` (persisted across
    /// restarts by the deployer); never lowers it.
    pub fn remember(&mut self, source: Source, revision: u64) {
        let newest = self.newest(source).map_or(revision, |n| n.max(revision));
        self.newest.retain(|(s, _)| *s != source);
        self.newest.push((source, newest));
    }

    fn apply_effective(&mut self, incoming: Option<Deployment>) -> Decision {
        match (self.effective(), &self.target) {
            (None, None) => Decision::Nothing,
            (None, Some(_)) => {
                self.target = None;
                Decision::Undeploy
            }
            (Some((s, d)), Some((ts, td))) if *ts == s && same(td, &d) => match incoming {
                Some(i) if !same(&i, &d) => Decision::Shadowed(i),
                _ => Decision::Unchanged(d),
            },
            (Some((s, d)), _) => {
                self.target = Some((s, d.clone()));
                Decision::Deploy(d)
            }
        }
    }

    /// What `source` asks for now, if anything.
    pub fn desired_of(&self, source: Source) -> Option<&Deployment> {
        self.desired.iter().find(|(s, _)| *s == source).map(|(_, d)| d)
    }

    /// Remembers what `source` asked for before a restart (not yet its
    /// desired state, not the target): its retained replay is recognised as
    /// such (not refused as stale), so a withdrawal of a source above it
    /// falls back to it; without a replay nothing comes back.
    pub fn recall(&mut self, source: Source, d: Deployment) {
        self.remember(source, d.revision);
        if self.desired_of(source).is_none() {
            self.recalled.retain(|(s, _)| *s != source);
            self.recalled.push((source, d));
        }
    }

    /// Restores the target after a restart, so replayed retained messages are `unchanged`.
    pub fn restore(&mut self, source: Source, d: Deployment) {
        self.remember(source, d.revision);
        self.desired.retain(|(s, _)| *s != source);
        self.desired.push((source, d.clone()));
        self.target = Some((source, d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(id: &str, rev: u64, version: &str) -> Deployment {
        Deployment::from_json(
            serde_json::json!({"schema": "outpost.deployment.v1", "deployment_id": id, "revision": rev,
                "model": {"name": "m", "version": version, "manifest_url": "http://r/m/1/manifest.json",
                          "manifest_sha256": "c".repeat(64)}})
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn a_recalled_desired_state_returns_only_when_its_topic_replays_it() {
        let (g, d) = (dep("g", 5, "1"), dep("d", 9, "2"));
        let mut r = Reconciler::new();
        r.restore(Source::Device, d.clone());
        r.recall(Source::Group(0), g.clone());
        // Not desired yet: withdrawing the device leaves nothing.
        let mut withdrawn = r.clone();
        assert_eq!(withdrawn.on_message(Source::Device, None), Decision::Undeploy);
        // Replayed (same revision): shadowed, then the fallback.
        assert_eq!(r.on_message(Source::Group(0), Some(g.clone())), Decision::Shadowed(g.clone()));
        assert_eq!(r.on_message(Source::Device, None), Decision::Deploy(g.clone()));
        // A different deployment at the recalled revision is still stale.
        let mut other = Reconciler::new();
        other.recall(Source::Group(0), g.clone());
        let forged = dep("g-other", 5, "3");
        assert!(matches!(other.on_message(Source::Group(0), Some(forged)), Decision::Stale { .. }));
    }

    #[test]
    fn first_deployment_deploys_and_replay_is_unchanged() {
        let mut r = Reconciler::new();
        let d = dep("d1", 1, "1");
        assert_eq!(r.on_message(Source::Device, Some(d.clone())), Decision::Deploy(d.clone()));
        assert_eq!(r.on_message(Source::Device, Some(d.clone())), Decision::Unchanged(d));
    }

    #[test]
    fn older_or_equal_revision_is_stale() {
        let mut r = Reconciler::new();
        r.on_message(Source::Device, Some(dep("d5", 5, "1")));
        assert!(matches!(r.on_message(Source::Device, Some(dep("d4", 4, "0"))), Decision::Stale { newest: 5, .. }));
        assert!(matches!(r.on_message(Source::Device, Some(dep("other", 5, "2"))), Decision::Stale { newest: 5, .. }));
        assert_eq!(r.on_message(Source::Device, Some(dep("d6", 6, "2"))), Decision::Deploy(dep("d6", 6, "2")));
    }

    #[test]
    fn device_beats_groups_and_first_group_beats_later() {
        let mut r = Reconciler::new();
        let g1 = dep("g1", 1, "g1");
        let g0 = dep("g0", 1, "g0");
        let dv = dep("dv", 1, "dv");
        assert_eq!(r.on_message(Source::Group(1), Some(g1.clone())), Decision::Deploy(g1.clone()));
        assert_eq!(r.on_message(Source::Group(0), Some(g0.clone())), Decision::Deploy(g0.clone()));
        assert_eq!(
            r.on_message(Source::Group(1), Some(dep("g1b", 2, "g1b"))),
            Decision::Shadowed(dep("g1b", 2, "g1b"))
        );
        assert_eq!(r.on_message(Source::Device, Some(dv.clone())), Decision::Deploy(dv.clone()));
        // withdrawing the device override falls back to the first group
        assert_eq!(r.on_message(Source::Device, None), Decision::Deploy(g0.clone()));
        assert_eq!(r.on_message(Source::Group(0), None), Decision::Deploy(dep("g1b", 2, "g1b")));
        assert_eq!(r.on_message(Source::Group(1), None), Decision::Undeploy);
        assert_eq!(r.on_message(Source::Group(1), None), Decision::Nothing);
    }

    #[test]
    fn a_signed_withdrawal_raises_the_revision_and_replays_as_nothing() {
        let mut r = Reconciler::new();
        r.on_message(Source::Device, Some(dep("d5", 5, "1")));
        assert_eq!(r.on_withdraw(Source::Device, 5), Decision::StaleWithdraw { revision: 5, newest: 5 });
        assert_eq!(r.on_withdraw(Source::Device, 6), Decision::Undeploy);
        assert_eq!(r.on_withdraw(Source::Device, 6), Decision::Nothing);
        assert_eq!(r.on_withdraw(Source::Device, 4), Decision::StaleWithdraw { revision: 4, newest: 6 });
        // The deployment it withdrew, replayed, is stale now.
        assert!(matches!(r.on_message(Source::Device, Some(dep("d5", 5, "1"))), Decision::Stale { newest: 6, .. }));
        // A remembered revision (from the record) is never lowered.
        r.remember(Source::Group(0), 9);
        r.remember(Source::Group(0), 3);
        assert_eq!(r.newest(Source::Group(0)), Some(9));
        assert!(!r.is_new(Source::Group(0), &dep("g", 9, "1")));
        assert!(r.is_new(Source::Group(0), &dep("g", 10, "1")));
    }

    #[test]
    fn restored_target_makes_replay_unchanged() {
        let mut r = Reconciler::new();
        let d = dep("d1", 3, "1");
        r.restore(Source::Device, d.clone());
        assert_eq!(r.on_message(Source::Device, Some(d.clone())), Decision::Unchanged(d));
    }
}
