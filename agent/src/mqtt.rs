//! The MQTT session: connection options, the always-polled event loop with
//! jittered reconnect backoff, resubscription on every new session, and the
//! publisher that drains what the rest of the agent wants to say.

use crate::status::Outgoing;
use outpost_protocol::Topics;
use rumqttc::{AsyncClient, LastWill, MqttOptions, QoS};
use std::time::Duration;

/// `mqtt://HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for BrokerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("mqtt://").or_else(|| s.strip_prefix("tcp://")).ok_or_else(|| {
            if s.starts_with("mqtts://") || s.starts_with("ssl://") {
                format!("'{s}': MQTT over TLS is not supported by this build yet; use mqtt://HOST:PORT")
            } else {
                format!("'{s}': expected mqtt://HOST:PORT")
            }
        })?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| format!("'{s}': port '{p}' is not a number from 1 to 65535"))?)
            }
            _ => (rest, 1883),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') || port == 0 {
            return Err(format!("'{s}': expected mqtt://HOST:PORT"));
        }
        Ok(BrokerUrl { host: host.to_string(), port })
    }
}

/// The largest packet MQTT can express (its remaining-length field).
pub const MQTT_MAX_PACKET: usize = 268_435_455;

/// Session settings.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub broker: BrokerUrl,
    pub client_id: String,
    /// The broker declares the device `offline` (Last Will) after 1.5× this without a packet.
    pub keep_alive: Duration,
    /// Largest MQTT packet sent or accepted.
    pub max_packet_size: usize,
}

pub fn options(cfg: &SessionConfig, topics: &Topics, device: &str) -> MqttOptions {
    let mut o = MqttOptions::new(cfg.client_id.clone(), cfg.broker.host.clone(), cfg.broker.port);
    o.set_keep_alive(cfg.keep_alive);
    o.set_last_will(LastWill::new(topics.availability(device), "offline", QoS::AtLeastOnce, true));
    // Incoming: MQTT's own maximum, so no message the broker delivers can
    // break the connection (a retained oversize desired state would otherwise
    // break it again on every reconnect); the agent refuses oversize payloads
    // itself, with an error. Outgoing: the configured limit.
    o.set_max_packet_size(MQTT_MAX_PACKET, cfg.max_packet_size);
    o.set_clean_session(true);
    o
}

/// Reconnect delays: exponential from 250 ms, capped at 30 s, with jitter so
/// a fleet that lost its broker together does not return in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub fn new() -> Self {
        Backoff { attempt: 0 }
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
    pub fn next_delay(&mut self) -> Duration {
        let delay = crate::backoff_delay(Duration::from_millis(250), self.attempt, Duration::from_secs(30));
        self.attempt = self.attempt.saturating_add(1);
        delay
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Publishes what the agent hands it. Runs in its own task so the event loop
/// is never blocked by a full request channel. A message larger than the
/// packet limit is dropped with an error instead of breaking the connection.
/// While `online` is false, events and answers go to the journal (retained
/// state is republished on connect, telemetry is skipped); when the
/// connection returns, the journal is published first, in order.
pub async fn publisher(
    client: AsyncClient,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Outgoing>,
    max_packet_size: usize,
    journal: std::sync::Arc<std::sync::Mutex<crate::journal::Journal>>,
    mut online: tokio::sync::watch::Receiver<bool>,
) {
    let lock = |j: &std::sync::Mutex<crate::journal::Journal>| {
        // The journal is plain data; a panic elsewhere leaves it usable.
        let mut g = j.lock().unwrap_or_else(|p| p.into_inner());
        g.take_all()
    };
    loop {
        let m = tokio::select! {
            m = rx.recv() => match m { Some(m) => Some(m), None => return },
            changed = online.changed() => {
                if changed.is_err() { return; }
                None
            }
        };
        let is_online = *online.borrow();
        if is_online {
            let backlog = lock(&journal);
            if !backlog.is_empty() {
                tracing::info!(messages = backlog.len(), "publishing what was journaled while offline");
            }
            for b in backlog {
                send(&client, b, max_packet_size).await;
            }
        }
        let Some(m) = m else { continue };
        if is_online {
            send(&client, m, max_packet_size).await;
        } else if crate::journal::Journal::keeps(&m) {
            let j = journal.clone();
            // An fsync: off the reactor.
            let _ = tokio::task::spawn_blocking(move || j.lock().unwrap_or_else(|p| p.into_inner()).push(m)).await;
        }
    }
}

async fn send(client: &AsyncClient, m: Outgoing, max_packet_size: usize) {
    // Fixed header + topic length prefix + packet id: keep a margin.
    if m.payload.len() + m.topic.len() + 16 > max_packet_size {
        tracing::error!(topic = %m.topic, bytes = m.payload.len(), max_packet_size, "message larger than the MQTT packet limit: not sent");
        return;
    }
    let qos = if m.reliable { QoS::AtLeastOnce } else { QoS::AtMostOnce };
    if let Err(e) = client.publish(m.topic.clone(), qos, m.retain, m.payload).await {
        tracing::warn!(topic = %m.topic, error = %e, "publish failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!("mqtt://localhost:1884".parse(), Ok(BrokerUrl { host: "localhost".into(), port: 1884 }));
        assert_eq!("mqtt://10.0.0.1".parse(), Ok(BrokerUrl { host: "10.0.0.1".into(), port: 1883 }));
        assert_eq!("mqtt://[::1]:1883".parse(), Ok(BrokerUrl { host: "::1".into(), port: 1883 }));
        assert!("http://x:1".parse::<BrokerUrl>().unwrap_err().contains("expected mqtt://HOST:PORT"));
        assert!("mqtt://x:99999".parse::<BrokerUrl>().unwrap_err().contains("port '99999'"));
        assert!("mqtts://x:8883".parse::<BrokerUrl>().unwrap_err().contains("TLS"));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new();
        let ms = |d: Duration| d.as_millis();
        let first = b.next_delay();
        assert!((125..=250).contains(&ms(first)), "{first:?}");
        let second = b.next_delay();
        assert!((250..=500).contains(&ms(second)), "{second:?}");
        for _ in 0..20 {
            b.next_delay();
        }
        // Once capped, every delay is in [cap/2, cap].
        for _ in 0..5 {
            let d = b.next_delay();
            assert!((15_000..=30_000).contains(&ms(d)), "{d:?}");
        }
        b.reset();
        assert!(ms(b.next_delay()) <= 250);
    }
}
