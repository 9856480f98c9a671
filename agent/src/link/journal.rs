//! The outbox for what the device says while the broker is unreachable:
//! events and answers are appended to `DATA/journal.jsonl` (fsynced, so a
//! reboot during the outage keeps them) and published in order when the
//! connection returns. Bounded: past `max_entries` the oldest tenth is
//! dropped, and the number dropped is reported in telemetry.
//!
//! Retained messages (state, availability) are not journaled: the agent
//! republishes its current state on every connection, which is the truth.

use super::publisher::Outgoing;
use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Default bound: at a few hundred bytes per event, about 3 MB on disk.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Entry {
    topic: String,
    payload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation: Option<Vec<u8>>,
}

#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    max_entries: usize,
    entries: VecDeque<Outgoing>,
    /// Messages dropped to keep the bound since the agent started.
    pub dropped: u64,
}

impl Journal {
    /// Opens the journal, keeping what an earlier run could not publish.
    /// Unreadable lines (a write cut by a power loss) are skipped.
    pub fn open(dir: &Path, max_entries: usize) -> Journal {
        let path = dir.join("journal.jsonl");
        let entries: VecDeque<Outgoing> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Entry>(l).ok())
            .map(|e| Outgoing {
                topic: e.topic,
                payload: e.payload.into_bytes(),
                retain: false,
                reliable: true,
                correlation: e.correlation,
            })
            .collect();
        if !entries.is_empty() {
            tracing::info!(pending = entries.len(), "journal of an earlier outage found: it is published on connect");
        }
        Journal { path, max_entries: max_entries.max(10), entries, dropped: 0 }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether a message belongs in the journal when the broker is away:
    /// reliable, not retained.
    pub fn keeps(m: &Outgoing) -> bool {
        m.reliable && !m.retain
    }

    /// Appends a message (durably). Past the bound, the oldest tenth goes.
    pub fn push(&mut self, m: Outgoing) {
        self.entries.push_back(m);
        if self.entries.len() > self.max_entries {
            let drop = (self.max_entries / 10).max(1);
            self.entries.drain(..drop);
            self.dropped += drop as u64;
            tracing::warn!(dropped = drop, bound = self.max_entries, "journal full: the oldest messages are dropped");
            self.rewrite();
            return;
        }
        let line = self.entries.back().map(line).unwrap_or_default();
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()).and_then(|_| f.sync_data()));
        if let Err(e) = written {
            tracing::error!(error = %e, "cannot write the journal; the message is kept in memory only");
        }
    }

    /// Every message, oldest first, left in the journal: it is trimmed
    /// ([`Journal::forget_first`]) only once they are published, so a crash
    /// during the replay loses nothing.
    pub fn pending(&self) -> Vec<Outgoing> {
        self.entries.iter().cloned().collect()
    }

    /// Forgets the `n` oldest messages (published) and rewrites the file.
    pub fn forget_first(&mut self, n: usize) {
        let n = n.min(self.entries.len());
        if n > 0 {
            self.entries.drain(..n);
            self.rewrite();
        }
    }

    /// Writes the whole journal anew (temp file, fsync, rename).
    fn rewrite(&self) {
        let text: String = self.entries.iter().map(line).collect();
        let tmp = self.path.with_extension("jsonl.tmp");
        let result = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
            .and_then(|_| std::fs::rename(&tmp, &self.path));
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot rewrite the journal");
        }
    }
}

/// A message as one line of the journal file.
fn line(m: &Outgoing) -> String {
    let e = Entry {
        topic: m.topic.clone(),
        payload: String::from_utf8_lossy(&m.payload).into_owned(),
        correlation: m.correlation.clone(),
    };
    serde_json::to_string(&e).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize) -> Outgoing {
        Outgoing {
            topic: "outpost/devices/d/events".into(),
            payload: format!("{{\"n\":{n}}}").into_bytes(),
            retain: false,
            reliable: true,
            correlation: None,
        }
    }

    #[test]
    fn messages_survive_a_restart_in_order_and_leave_once_taken() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), 100);
        for n in 0..3 {
            j.push(msg(n));
        }
        // A line cut by a power loss is skipped, the rest kept.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("journal.jsonl"))
            .unwrap()
            .write_all(b"{\"topic\":")
            .unwrap();
        let mut j = Journal::open(dir.path(), 100);
        let all = j.pending();
        assert_eq!(
            all.iter().map(|m| String::from_utf8_lossy(&m.payload).into_owned()).collect::<Vec<_>>(),
            ["{\"n\":0}", "{\"n\":1}", "{\"n\":2}"]
        );
        // Read for a replay but not yet published: still there after a crash.
        assert_eq!(Journal::open(dir.path(), 100).len(), 3);
        j.push(msg(3));
        j.forget_first(all.len());
        let left = Journal::open(dir.path(), 100).pending();
        assert_eq!(left.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(), [b"{\"n\":3}".to_vec()]);
    }

    #[test]
    fn the_bound_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), 20);
        for n in 0..25 {
            j.push(msg(n));
        }
        assert_eq!((j.len(), j.dropped), (19, 6));
        let reopened = Journal::open(dir.path(), 20).pending();
        assert_eq!(reopened.first().map(|m| m.payload.clone()), Some(b"{\"n\":6}".to_vec()));
        assert_eq!(reopened.len(), 19);
        assert!(Journal::keeps(&msg(1)));
        assert!(!Journal::keeps(&Outgoing { retain: true, ..msg(1) }));
    }
}
