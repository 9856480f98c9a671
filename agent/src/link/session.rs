//! The MQTT session: the receiving half ([`Session`], which must be polled
//! continuously: it also sends) and the sending half ([`Link`], shared by
//! the publisher and the acker), in either protocol version. What a poll
//! reports is sorted here, by type, into the events the connection's state
//! machine ([`super::connection`]) takes.

use super::connection::{Event, FailureKind};
use super::{SessionConfig, network_options, options, options_v5};
use outpost_protocol::Topics;
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::{AsyncClient, QoS};

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
    /// Whether it came at QoS 1 or 2 (answers go at the request's QoS: a
    /// client that asked at QoS 0 is not made to wait for acknowledgements).
    pub fn reliable(&self) -> bool {
        match &self.0 {
            Received::V4(p) => p.qos != QoS::AtMostOnce,
            Received::V5(p) => p.qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce,
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
    /// A connection was made or failed: for the state machine.
    Event(Event),
    Message(Message),
    /// The DISCONNECT packet went out.
    Disconnected,
    Other,
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
            Client::V5(c) => {
                // Everything the agent says in JSON is an object; the rest
                // (availability's online/offline) is plain text.
                let json = payload.first() == Some(&b'{');
                let props = m5::PublishProperties {
                    correlation_data: correlation.map(Into::into),
                    payload_format_indicator: Some(1),
                    content_type: Some(if json { "application/json" } else { "text/plain" }.to_string()),
                    ..Default::default()
                };
                c.publish_with_properties(topic, qos5(qos), retain, payload, props).await.map_err(|e| e.to_string())
            }
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

    /// Subscribes at QoS 1 (waits for room in the request channel).
    pub async fn subscribe(&self, topic: String) -> Result<(), String> {
        let qos = QoS::AtLeastOnce;
        match &*self.0.load_full() {
            Client::V4(c) => c.subscribe(topic, qos).await.map_err(|e| e.to_string()),
            Client::V5(c) => c.subscribe(topic, qos5(qos)).await.map_err(|e| e.to_string()),
        }
    }

    /// Queues a QoS 1 publish without waiting (for shutdown).
    pub fn try_publish(&self, topic: String, retain: bool, payload: &'static str) {
        let qos = QoS::AtLeastOnce;
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
pub struct Session {
    inner: Inner,
    /// The text of the last connection error, for the log.
    last_error: String,
}

enum Inner {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl Session {
    /// Opens a session (the connection is made by the first poll).
    pub fn new(cfg: &SessionConfig, topics: &Topics, device: &str, cap: usize) -> Result<(Client, Session), String> {
        let (client, inner) = match cfg.protocol {
            super::Protocol::V311 => {
                let (c, mut e) = AsyncClient::new(options(cfg, topics, device)?, cap);
                e.set_network_options(network_options());
                (Client::V4(c), Inner::V4(Box::new(e)))
            }
            super::Protocol::V5 => {
                let (c, e) = rumqttc::v5::AsyncClient::new(options_v5(cfg, topics, device)?, cap);
                (Client::V5(c), Inner::V5(Box::new(e)))
            }
        };
        Ok((client, Session { inner, last_error: String::new() }))
    }

    /// The last connection error, as the MQTT library words it.
    pub fn last_error(&self) -> &str {
        &self.last_error
    }

    pub async fn poll(&mut self) -> Net {
        match &mut self.inner {
            Inner::V4(e) => match e.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                    Net::Event(Event::ConnAck { session_present: a.session_present })
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => Net::Message(Message(Received::V4(p))),
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Net::Disconnected,
                Ok(_) => Net::Other,
                Err(e) => {
                    self.last_error = e.to_string();
                    Net::Event(Event::Failed(classify_v4(&e)))
                }
            },
            Inner::V5(e) => match e.poll().await {
                Ok(rumqttc::v5::Event::Incoming(m5::Packet::ConnAck(a))) => {
                    Net::Event(Event::ConnAck { session_present: a.session_present })
                }
                Ok(rumqttc::v5::Event::Incoming(m5::Packet::Publish(p))) => {
                    Net::Message(Message(Received::V5(Box::new(p))))
                }
                Ok(rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Net::Disconnected,
                Ok(_) => Net::Other,
                Err(e) => {
                    self.last_error = e.to_string();
                    Net::Event(Event::Failed(classify_v5(&e)))
                }
            },
        }
    }
}

/// Sorts an MQTT 3.1.1 connection error by its type.
fn classify_v4(e: &rumqttc::ConnectionError) -> FailureKind {
    use rumqttc::{ConnectReturnCode as Code, ConnectionError as E};
    match e {
        E::ConnectionRefused(Code::BadUserNamePassword | Code::NotAuthorized) => FailureKind::LoginRefused,
        E::ConnectionRefused(Code::RefusedProtocolVersion) => FailureKind::ProtocolRefused,
        E::MqttState(rumqttc::StateError::ConnectionAborted) => FailureKind::ClosedByPeer,
        E::MqttState(rumqttc::StateError::Deserialization(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_))) => {
            FailureKind::OversizePacket
        }
        E::Tls(t) => classify_tls(t),
        _ => FailureKind::Other,
    }
}

/// Sorts an MQTT 5 connection error by its type.
fn classify_v5(e: &rumqttc::v5::ConnectionError) -> FailureKind {
    use m5::ConnectReturnCode as Code;
    use rumqttc::v5::ConnectionError as E;
    match e {
        E::ConnectionRefused(Code::BadUserNamePassword | Code::NotAuthorized) => FailureKind::LoginRefused,
        E::ConnectionRefused(Code::UnsupportedProtocolVersion) => FailureKind::ProtocolRefused,
        E::MqttState(rumqttc::v5::StateError::ConnectionAborted) => FailureKind::ClosedByPeer,
        E::MqttState(rumqttc::v5::StateError::Deserialization(
            rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded { .. },
        )) => FailureKind::OversizePacket,
        E::Tls(t) => classify_tls(t),
        _ => FailureKind::Other,
    }
}

fn classify_tls(e: &rumqttc::TlsError) -> FailureKind {
    let rustls_error = match e {
        rumqttc::TlsError::TLS(r) => Some(r),
        rumqttc::TlsError::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        _ => None,
    };
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(_)) => FailureKind::UntrustedCertificate,
        Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => FailureKind::NotTls,
        _ => FailureKind::Other,
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
