//! The link to the broker: who the device connects to and how
//! ([`BrokerUrl`], [`SessionConfig`], the MQTT options), the session itself
//! ([`session`]), its lifecycle as a pure state machine ([`connection`]),
//! and the [`publisher`] with its offline [`journal`].

pub(crate) mod connection;
pub(crate) mod journal;
pub(crate) mod publisher;
pub(crate) mod session;

pub use crate::sys::tls::tls_config;
use outpost_protocol::Topics;
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::{LastWill, MqttOptions, QoS};
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
    /// Read incoming packets up to MQTT's own maximum (the agent then
    /// refuses oversize payloads itself): for a broker that speaks only MQTT
    /// 3.1.1 and has sent a packet over `max_packet_size`, which it would
    /// otherwise send again at every connection.
    pub read_oversize: bool,
}

/// How long an MQTT 5 broker keeps a persistent session of a device that is away.
pub const SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;

/// The session's MQTT options. Fails only when an `mqtts://` broker has no
/// usable TLS configuration: the device never falls back to plain text.
pub fn options(cfg: &SessionConfig, topics: &Topics, device: &str) -> Result<MqttOptions, String> {
    let mut o = MqttOptions::new(cfg.client_id.clone(), cfg.broker.host.clone(), cfg.broker.port);
    o.set_keep_alive(cfg.keep_alive);
    o.set_last_will(LastWill::new(topics.availability(device), "offline", QoS::AtLeastOnce, true));
    // Both ways: the configured limit. A packet over it is refused from its
    // fixed header, before its bytes are read (the connection closes: see
    // `FailureKind::OversizePacket` for what a retained one does on 3.1.1).
    let incoming = if cfg.read_oversize { MQTT_MAX_PACKET } else { cfg.max_packet_size };
    o.set_max_packet_size(incoming, cfg.max_packet_size);
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
    // Told to the broker in CONNECT: it drops what is over it for this
    // client rather than sending it, and rumqttc refuses it too.
    o.set_max_packet_size(Some(cfg.max_packet_size.min(MQTT_MAX_PACKET) as u32));
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
/// Bytes a PUBLISH of `topic` takes beyond its payload, at most: fixed
/// header, topic, packet id and, over MQTT 5, the properties the agent sets
/// (content type, payload format, correlation data echoed from a request,
/// which the requester sizes). A message whose payload plus this passes the
/// packet limit is not sent: the client refuses it and drops the session.
pub fn packet_overhead(topic: &str, correlation: Option<&[u8]>) -> usize {
    // 5 fixed header + 2 topic length + 2 packet id + 4 properties length
    // + 2 payload format + 3+16 content type, rounded up.
    topic.len() + correlation.map_or(0, |c| c.len() + 3) + 48
}

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
        None => crate::sys::tls::tls_config(None, None)?,
    };
    Ok(Some(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls))))
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
    }
}
