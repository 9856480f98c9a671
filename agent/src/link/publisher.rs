//! The publisher: one task that sends what the rest of the agent wants to
//! say, so that nothing else ever waits on the MQTT request channel. While
//! the connection is down, events and answers go to the [`Journal`]
//! (retained state is republished on connect, telemetry is skipped); when it
//! returns, the journal is published first, in order, and only then trimmed,
//! so a crash during the replay loses nothing (a message may go out twice,
//! with the same `seq`: MQTT QoS 1 is at-least-once anyway).

use super::journal::Journal;
use super::session::Link;
use rumqttc::QoS;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, watch};

/// A message for the publisher.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// QoS 1 when true (events, state, answers), else 0 (telemetry).
    pub reliable: bool,
    /// MQTT 5 correlation data echoed from a request (ignored over 3.1.1).
    pub correlation: Option<Vec<u8>>,
}

#[derive(Debug)]
enum Item {
    Message(Outgoing),
    /// Answered once everything handed over before it is sent or journaled.
    Flush(oneshot::Sender<()>),
}

/// The sending side, cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox(mpsc::UnboundedSender<Item>);

/// The receiving side, for [`publish`].
#[derive(Debug)]
pub struct Inbox(mpsc::UnboundedReceiver<Item>);

pub fn outbox() -> (Outbox, Inbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Outbox(tx), Inbox(rx))
}

impl Outbox {
    pub fn send(&self, m: Outgoing) {
        // The publisher lives as long as the agent; a send error means it has stopped.
        let _ = self.0.send(Item::Message(m));
    }

    /// Waits until every message handed over before this call is sent (or
    /// journaled): the drain's last step before the goodbye.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.0.send(Item::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

impl Inbox {
    /// The next message (answering flushes on the way).
    pub async fn recv(&mut self) -> Option<Outgoing> {
        loop {
            match self.0.recv().await? {
                Item::Message(m) => return Some(m),
                Item::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }
}

/// Publishes what the agent hands it, until every [`Outbox`] is dropped. A
/// message larger than the packet limit is dropped with an error instead of
/// breaking the connection.
pub async fn publish(
    client: Link,
    Inbox(mut rx): Inbox,
    max_packet_size: usize,
    journal: Arc<Mutex<Journal>>,
    mut online: watch::Receiver<bool>,
) {
    loop {
        let item = tokio::select! {
            m = rx.recv() => match m { Some(m) => Some(m), None => return },
            changed = online.changed() => {
                if changed.is_err() { return; }
                None
            }
        };
        let is_online = *online.borrow();
        if is_online {
            replay(&client, &journal, max_packet_size, &online).await;
        }
        match item {
            None => {}
            Some(Item::Flush(done)) => {
                let _ = done.send(());
            }
            Some(Item::Message(m)) if is_online => send(&client, m, max_packet_size).await,
            Some(Item::Message(m)) if Journal::keeps(&m) => {
                let j = journal.clone();
                // An fsync: off the reactor.
                let _ = tokio::task::spawn_blocking(move || lock(&j).push(m)).await;
            }
            Some(Item::Message(_)) => {}
        }
    }
}

fn lock(j: &Mutex<Journal>) -> std::sync::MutexGuard<'_, Journal> {
    // The journal is plain data: a panic elsewhere leaves it usable.
    j.lock().unwrap_or_else(|p| p.into_inner())
}

/// Publishes what the journal holds, oldest first, then trims what went
/// out; stops early if the connection drops meanwhile.
async fn replay(client: &Link, journal: &Arc<Mutex<Journal>>, max_packet_size: usize, online: &watch::Receiver<bool>) {
    let pending = lock(journal).pending();
    if pending.is_empty() {
        return;
    }
    tracing::info!(messages = pending.len(), "publishing what was journaled while offline");
    crate::sys::crash_point("journal-taken");
    let mut n = 0;
    for m in pending {
        if !*online.borrow() {
            break;
        }
        send(client, m, max_packet_size).await;
        n += 1;
    }
    let j = journal.clone();
    let _ = tokio::task::spawn_blocking(move || lock(&j).forget_first(n)).await;
}

async fn send(client: &Link, m: Outgoing, max_packet_size: usize) {
    // Fixed header + topic length prefix + packet id: keep a margin.
    if m.payload.len() + super::packet_overhead(&m.topic, m.correlation.as_deref()) > max_packet_size {
        tracing::error!(topic = %m.topic, bytes = m.payload.len(), max_packet_size, "message larger than the MQTT packet limit: not sent");
        return;
    }
    let qos = if m.reliable { QoS::AtLeastOnce } else { QoS::AtMostOnce };
    if let Err(e) = client.publish(m.topic.clone(), qos, m.retain, m.payload, m.correlation).await {
        tracing::warn!(topic = %m.topic, error = %e, "publish failed");
    }
}
