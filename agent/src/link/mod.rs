//! The MQTT session: connection options, the always-polled event loop with
//! jittered reconnect backoff, resubscription on every new session, and the
//! publisher that drains what the rest of the agent wants to say.

use crate::status::Outgoing;
use outpost_protocol::Topics;
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::{AsyncClient, LastWill, MqttOptions, QoS};
use std::time::Duration;

/// The MQTT protocol version the session speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// MQTT 3.1.1: what every broker speaks (the default).
    #[default]
    V311,
    /// MQTT 5: requests may carry a response topic and correlation data
    /// (answered with both); falls back to 3.1.1 when the broker refuses it.
    V5,
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "3.1.1" | "3" | "4" | "v4" => Ok(Protocol::V311),
            "5" | "5.0" | "v5" => Ok(Protocol::V5),
            _ => Err(format!("'{s}': expected 3.1.1 or 5")),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        })
    }
}

/// `mqtt://HOST[:PORT]` (default port 1883), or `mqtts://HOST[:PORT]` for
/// MQTT over TLS (default port 8883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl std::str::FromStr for BrokerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (rest, tls) = if let Some(r) = s.strip_prefix("mqtt://").or_else(|| s.strip_prefix("tcp://")) {
            (r, false)
        } else if let Some(r) = s.strip_prefix("mqtts://").or_else(|| s.strip_prefix("ssl://")) {
            (r, true)
        } else {
            return Err(format!("'{s}': expected mqtt://HOST:PORT or mqtts://HOST:PORT"));
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| format!("'{s}': port '{p}' is not a number from 1 to 65535"))?)
            }
            _ => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') || port == 0 {
            return Err(format!("'{s}': expected mqtt://HOST:PORT or mqtts://HOST:PORT"));
        }
        Ok(BrokerUrl { host: host.to_string(), port, tls })
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", if self.tls { "mqtts" } else { "mqtt" }, self.host, self.port)
    }
}

/// A broker login. The password never appears in logs or `Debug` output.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials {{ username: {:?}, password: \"***\" }}", self.username)
    }
}

/// The TLS client configuration for `mqtts://`: the CAs trusted for the
/// broker's certificate (`--ca-file`, else the system's:
/// [`crate::fetch::system_roots`]) and an optional client certificate.
pub fn tls_config(
    roots: Option<&[rustls::pki_types::CertificateDer<'static>]>,
    client: Option<(Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>)>,
) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Some(certs) => {
            for c in certs {
                store.add(c.clone()).map_err(|e| format!("--ca-file: a certificate rustls cannot use: {e}"))?;
            }
        }
        None => {
            let (added, _unusable) = store.add_parsable_certificates(crate::fetch::system_roots()?.iter().cloned());
            if added == 0 {
                return Err("the system's CA bundle holds no certificate rustls can use: set tls.ca_file".into());
            }
        }
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(store);
    let config = match client {
        Some((chain, key)) => {
            builder.with_client_auth_cert(chain, key).map_err(|e| format!("--client-cert/--client-key: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(std::sync::Arc::new(config))
}

/// What a connection error means for the operator, when it is a setting
/// rather than a passing network fault.
pub fn diagnose(error: &str) -> Option<&'static str> {
    if error.contains("invalid peer certificate") || error.contains("UnknownIssuer") {
        Some(
            "the broker's TLS certificate is not trusted: give its CA with --ca-file, and check the host name in --broker",
        )
    } else if error.contains("BadUserNamePassword") || error.contains("NotAuthorized") {
        Some(
            "the broker refused the login: check --username and the password (--password-file or OUTPOST_MQTT_PASSWORD)",
        )
    } else if error.contains("InvalidContentType") || error.contains("CorruptMessage") {
        Some("TLS handshake failed: is this a TLS port? Use mqtt:// for a plain listener, mqtts:// for a TLS one")
    } else {
        None
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
    /// For `mqtts://`: the TLS configuration (None: the system's CAs, no client certificate).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub credentials: Option<Credentials>,
    /// Ask the broker to keep this device's session (subscriptions and the
    /// QoS 1 messages sent to it) while it is away.
    pub persistent_session: bool,
    pub protocol: Protocol,
}

/// How long an MQTT 5 broker keeps a persistent session of a device that is away.
pub const SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;

/// The session's MQTT options. Fails only when an `mqtts://` broker has no
/// usable TLS configuration: the device never falls back to plain text.
pub fn options(cfg: &SessionConfig, topics: &Topics, device: &str) -> Result<MqttOptions, String> {
    let mut o = MqttOptions::new(cfg.client_id.clone(), cfg.broker.host.clone(), cfg.broker.port);
    o.set_keep_alive(cfg.keep_alive);
    o.set_last_will(LastWill::new(topics.availability(device), "offline", QoS::AtLeastOnce, true));
    // Incoming: MQTT's own maximum, so no message the broker delivers can
    // break the connection (a retained oversize desired state would otherwise
    // break it again on every reconnect); the agent refuses oversize payloads
    // itself, with an error. Outgoing: the configured limit.
    o.set_max_packet_size(MQTT_MAX_PACKET, cfg.max_packet_size);
    // Manual acks with a persistent session: a desired state is acked once it
    // is recorded on disk (see `acker`), so a message the broker considers
    // delivered is never lost. With a clean session the broker drops unacked
    // messages when the connection ends anyway (retained desired states come
    // back on the next connection), so acks stay automatic (rumqttd's v4
    // listener also stalls on manual acks under load).
    o.set_manual_acks(cfg.persistent_session);
    o.set_clean_session(!cfg.persistent_session);
    if let Some(t) = transport(cfg)? {
        o.set_transport(t);
    }
    if let Some(c) = &cfg.credentials {
        o.set_credentials(c.username.clone(), c.password.clone());
    }
    Ok(o)
}

/// The same session for MQTT 5.
pub fn options_v5(cfg: &SessionConfig, topics: &Topics, device: &str) -> Result<rumqttc::v5::MqttOptions, String> {
    let mut o = rumqttc::v5::MqttOptions::new(cfg.client_id.clone(), cfg.broker.host.clone(), cfg.broker.port);
    o.set_keep_alive(cfg.keep_alive);
    o.set_last_will(m5::LastWill::new(
        topics.availability(device),
        "offline",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        true,
        None,
    ));
    o.set_max_packet_size(Some(MQTT_MAX_PACKET as u32));
    o.set_manual_acks(cfg.persistent_session);
    o.set_network_options(network_options());
    o.set_clean_start(!cfg.persistent_session);
    if cfg.persistent_session {
        o.set_session_expiry_interval(Some(SESSION_EXPIRY_SECS));
    }
    if let Some(t) = transport(cfg)? {
        o.set_transport(t);
    }
    if let Some(c) = &cfg.credentials {
        o.set_credentials(c.username.clone(), c.password.clone());
    }
    Ok(o)
}

/// No Nagle delay: requests, answers and acks are small messages that
/// someone waits for (with it, a round trip through Mosquitto took ~40 ms).
pub fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

fn transport(cfg: &SessionConfig) -> Result<Option<rumqttc::Transport>, String> {
    if !cfg.broker.tls {
        return Ok(None);
    }
    let tls = match &cfg.tls {
        Some(t) => t.clone(),
        None => tls_config(None, None)?,
    };
    Ok(Some(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls))))
}

/// A message received on a subscription, in either protocol version.
#[derive(Debug, Clone)]
pub struct Message(Received);

#[derive(Debug, Clone)]
enum Received {
    V4(rumqttc::Publish),
    V5(Box<m5::Publish>),
}

impl Message {
    pub fn topic(&self) -> &str {
        match &self.0 {
            Received::V4(p) => &p.topic,
            Received::V5(p) => std::str::from_utf8(&p.topic).unwrap_or(""),
        }
    }
    pub fn payload(&self) -> &[u8] {
        match &self.0 {
            Received::V4(p) => &p.payload,
            Received::V5(p) => &p.payload,
        }
    }
    /// MQTT 5: where the sender wants the answer.
    pub fn response_topic(&self) -> Option<&str> {
        match &self.0 {
            Received::V4(_) => None,
            Received::V5(p) => p.properties.as_ref()?.response_topic.as_deref(),
        }
    }
    /// MQTT 5: what the sender wants echoed with the answer.
    pub fn correlation(&self) -> Option<&[u8]> {
        match &self.0 {
            Received::V4(_) => None,
            Received::V5(p) => p.properties.as_ref()?.correlation_data.as_deref(),
        }
    }
}

/// What the session reports on each poll.
#[derive(Debug)]
pub enum Net {
    Connected {
        session_present: bool,
    },
    Message(Message),
    /// The DISCONNECT packet went out.
    Disconnected,
    Other,
    /// The connection failed or broke. `refused_protocol`: the broker does not
    /// speak the requested protocol version.
    Error {
        text: String,
        refused_protocol: bool,
    },
}

/// One protocol version's client.
#[derive(Clone, Debug)]
pub enum Client {
    V4(AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The sending half of a session, cheap to clone. Shared by the tasks that
/// publish and ack; `replace` moves them all to a new client (after a
/// protocol fallback).
#[derive(Clone, Debug)]
pub struct Link(std::sync::Arc<arc_swap::ArcSwap<Client>>);

fn qos5(q: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

impl Link {
    pub fn new(client: Client) -> Link {
        Link(std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(client)))
    }

    pub fn replace(&self, client: Client) {
        self.0.store(std::sync::Arc::new(client));
    }

    pub async fn publish(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
        correlation: Option<Vec<u8>>,
    ) -> Result<(), String> {
        match &*self.0.load_full() {
            Client::V4(c) => c.publish(topic, qos, retain, payload).await.map_err(|e| e.to_string()),
            Client::V5(c) => match correlation {
                Some(data) => {
                    let props = m5::PublishProperties { correlation_data: Some(data.into()), ..Default::default() };
                    c.publish_with_properties(topic, qos5(qos), retain, payload, props).await
                }
                None => c.publish(topic, qos5(qos), retain, payload).await,
            }
            .map_err(|e| e.to_string()),
        }
    }

    pub async fn subscribe(&self, topic: String, qos: QoS) -> Result<(), String> {
        match &*self.0.load_full() {
            Client::V4(c) => c.subscribe(topic, qos).await.map_err(|e| e.to_string()),
            Client::V5(c) => c.subscribe(topic, qos5(qos)).await.map_err(|e| e.to_string()),
        }
    }

    /// Acknowledges a received message (QoS 0: nothing to do).
    pub async fn ack(&self, m: &Message) -> Result<(), String> {
        match (&*self.0.load_full(), &m.0) {
            (Client::V4(c), Received::V4(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            (Client::V5(c), Received::V5(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            // From a session of the other version (before a protocol fallback): that connection is gone.
            _ => Ok(()),
        }
    }

    /// Queues a publish without waiting (for shutdown).
    pub fn try_publish(&self, topic: String, qos: QoS, retain: bool, payload: &'static str) {
        let _ = match &*self.0.load_full() {
            Client::V4(c) => c.try_publish(topic, qos, retain, payload).map_err(|e| e.to_string()),
            Client::V5(c) => c.try_publish(topic, qos5(qos), retain, payload).map_err(|e| e.to_string()),
        };
    }

    pub fn try_disconnect(&self) {
        let _ = match &*self.0.load_full() {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

/// The receiving half: must be polled continuously (it also sends).
pub enum Session {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl Session {
    /// Opens a session (the connection is made by the first poll).
    pub fn new(cfg: &SessionConfig, topics: &Topics, device: &str, cap: usize) -> Result<(Client, Session), String> {
        Ok(match cfg.protocol {
            Protocol::V311 => {
                let (c, mut e) = AsyncClient::new(options(cfg, topics, device)?, cap);
                e.set_network_options(network_options());
                (Client::V4(c), Session::V4(Box::new(e)))
            }
            Protocol::V5 => {
                let (c, e) = rumqttc::v5::AsyncClient::new(options_v5(cfg, topics, device)?, cap);
                (Client::V5(c), Session::V5(Box::new(e)))
            }
        })
    }

    pub async fn poll(&mut self) -> Net {
        match self {
            Session::V4(e) => match e.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                    Net::Connected { session_present: a.session_present }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => Net::Message(Message(Received::V4(p))),
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Net::Disconnected,
                Ok(_) => Net::Other,
                Err(e) => Net::Error { text: e.to_string(), refused_protocol: false },
            },
            Session::V5(e) => match e.poll().await {
                Ok(rumqttc::v5::Event::Incoming(m5::Packet::ConnAck(a))) => {
                    Net::Connected { session_present: a.session_present }
                }
                Ok(rumqttc::v5::Event::Incoming(m5::Packet::Publish(p))) => {
                    Net::Message(Message(Received::V5(Box::new(p))))
                }
                Ok(rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Net::Disconnected,
                Ok(_) => Net::Other,
                Err(e) => {
                    let refused_protocol = matches!(
                        e,
                        rumqttc::v5::ConnectionError::ConnectionRefused(
                            m5::ConnectReturnCode::UnsupportedProtocolVersion
                                | m5::ConnectReturnCode::RefusedProtocolVersion
                        )
                    );
                    Net::Error { text: e.to_string(), refused_protocol }
                }
            },
        }
    }
}

/// Sends acks in the order the messages were handed to it, from its own task
/// (the event loop must never wait on the request channel it drains). None
/// when acks are automatic (a clean session: rumqttc acks on receipt, and a
/// second ack of the same packet id confuses brokers).
pub fn acker(link: Link, manual: bool) -> Option<tokio::sync::mpsc::UnboundedSender<Message>> {
    if !manual {
        return None;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Message>();
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if let Err(e) = link.ack(&m).await {
                tracing::debug!(error = %e, "ack not sent");
            }
        }
    });
    Some(tx)
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
    client: Link,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Outgoing>,
    max_packet_size: usize,
    journal: std::sync::Arc<std::sync::Mutex<crate::journal::Journal>>,
    mut online: tokio::sync::watch::Receiver<bool>,
    delivered: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    // The journal is plain data: a panic elsewhere leaves it usable.
    let backlog =
        |j: &std::sync::Mutex<crate::journal::Journal>| j.lock().unwrap_or_else(|p| p.into_inner()).take_all();
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
            let pending = backlog(&journal);
            if !pending.is_empty() {
                tracing::info!(messages = pending.len(), "publishing what was journaled while offline");
            }
            for b in pending {
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
        delivered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn send(client: &Link, m: Outgoing, max_packet_size: usize) {
    // Fixed header + topic length prefix + packet id: keep a margin.
    if m.payload.len() + m.topic.len() + 16 > max_packet_size {
        tracing::error!(topic = %m.topic, bytes = m.payload.len(), max_packet_size, "message larger than the MQTT packet limit: not sent");
        return;
    }
    let qos = if m.reliable { QoS::AtLeastOnce } else { QoS::AtMostOnce };
    if let Err(e) = client.publish(m.topic.clone(), qos, m.retain, m.payload, m.correlation).await {
        tracing::warn!(topic = %m.topic, error = %e, "publish failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let url = |host: &str, port, tls| BrokerUrl { host: host.into(), port, tls };
        assert_eq!("mqtt://localhost:1884".parse(), Ok(url("localhost", 1884, false)));
        assert_eq!("mqtt://10.0.0.1".parse(), Ok(url("10.0.0.1", 1883, false)));
        assert_eq!("mqtt://[::1]:1883".parse(), Ok(url("::1", 1883, false)));
        assert_eq!("mqtts://broker.lan".parse(), Ok(url("broker.lan", 8883, true)));
        assert_eq!("ssl://broker.lan:9883".parse(), Ok(url("broker.lan", 9883, true)));
        assert!("http://x:1".parse::<BrokerUrl>().unwrap_err().contains("expected mqtt://HOST:PORT"));
        assert!("mqtt://x:99999".parse::<BrokerUrl>().unwrap_err().contains("port '99999'"));
        assert_eq!(url("b", 8883, true).to_string(), "mqtts://b:8883");
        let creds = Credentials { username: "dev".into(), password: "hunter2".into() };
        assert!(!format!("{creds:?}").contains("hunter2"));
        assert!(diagnose("TLS: invalid peer certificate: UnknownIssuer").unwrap().contains("--ca-file"));
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
