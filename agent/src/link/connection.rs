//! The MQTT connection's lifecycle as a pure state machine: what the
//! session reports goes in ([`Connection::on_event`]), what the agent must
//! do comes out ([`Action`]). No sockets and no clock of its own (the caller
//! passes `now`), so every path is unit-tested.
//!
//! Waiting to reconnect is not a sleep: the machine names the instant of the
//! next attempt, and the main loop keeps serving its other arms (watchdog,
//! reload, telemetry, shutdown) until a timer fires at that instant.

use super::Protocol;
use std::time::Duration;
use tokio::time::Instant;

/// Why a connection attempt failed or a connection broke, sorted from the
/// error's type (never from its text) into what the agent acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The broker refused the protocol version asked for.
    ProtocolRefused,
    /// The broker closed the connection (on MQTT 5 before any ConnAck:
    /// how rumqttd and older brokers refuse it).
    ClosedByPeer,
    /// The broker's TLS certificate is not trusted.
    UntrustedCertificate,
    /// The broker refused the login.
    LoginRefused,
    /// The TLS handshake met something that is not TLS.
    NotTls,
    /// The broker sent a packet over `mqtt.max_packet_size`.
    OversizePacket,
    /// Anything else: a passing network fault.
    Other,
}

impl FailureKind {
    /// What the operator should check, when the failure is a setting rather
    /// than a passing network fault.
    pub(crate) fn hint(self) -> Option<&'static str> {
        match self {
            FailureKind::UntrustedCertificate => Some(
                "the broker's TLS certificate is not trusted: give its CA with --ca-file, and check the host name in --broker",
            ),
            FailureKind::LoginRefused => Some(
                "the broker refused the login: check --username and the password (--password-file or OUTPOST_MQTT_PASSWORD)",
            ),
            FailureKind::NotTls => Some(
                "TLS handshake failed: is this a TLS port? Use mqtt:// for a plain listener, mqtts:// for a TLS one",
            ),
            FailureKind::OversizePacket => Some(
                "the broker sent a packet over mqtt.max_packet_size and the connection was closed before reading it; with MQTT 3.1.1 the broker cannot be told the limit, so a retained message over it on one of this device's topics comes back at every connection: clear it on the broker (mosquitto_pub -r -n -t TOPIC), raise --max-packet-size, or use --mqtt-version 5 (the broker then drops what is over the limit)",
            ),
            FailureKind::ProtocolRefused | FailureKind::ClosedByPeer | FailureKind::Other => None,
        }
    }
}

/// What the session reported.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    ConnAck { session_present: bool },
    Failed(FailureKind),
}

/// What the agent must do about it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Subscribe to the agent's topics: the session is new and has none.
    Subscribe,
    /// Connected: say `online`, republish the state, release the journal.
    Online { reconnects: u64 },
    /// The connection is gone: journal what would be published.
    Offline,
    /// Open a new session speaking MQTT 3.1.1 and connect at once.
    FallBackToV311,
    /// The broker sent a packet over the limit on MQTT 3.1.1, which cannot
    /// tell it the limit: open a new session speaking MQTT 5, which does
    /// (the broker then drops what is over it, so a retained oversize
    /// message cannot break every connection), and connect at once.
    UpgradeToV5,
    /// Connect again at this instant (the delay, for the log), not before.
    RetryAt(Instant, Duration),
}

/// Reconnect delays: exponential from 250 ms, capped at 30 s, with jitter so
/// a fleet that lost its broker together does not return in lockstep.
#[derive(Debug, Clone, Default)]
pub(crate) struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = crate::sys::backoff_delay(Duration::from_millis(250), self.attempt, Duration::from_secs(30));
        self.attempt = self.attempt.saturating_add(1);
        delay
    }
}

/// The connection's state.
#[derive(Debug)]
pub(crate) struct Connection {
    protocol: Protocol,
    connected_once: bool,
    /// A connection was made with MQTT 5 (a later close is an ordinary failure).
    v5_connected: bool,
    /// MQTT 5 was tried because of an oversize packet (only once).
    v5_tried: bool,
    /// MQTT 5 connections the broker closed before any ConnAck.
    closed_before_connack: u32,
    backoff: Backoff,
    /// Connections made after the first.
    pub(crate) reconnects: u64,
    online: bool,
    /// When the next attempt may start (None: now).
    retry_at: Option<Instant>,
}

impl Connection {
    pub(crate) fn new(protocol: Protocol) -> Connection {
        Connection {
            protocol,
            connected_once: false,
            v5_connected: false,
            v5_tried: false,
            closed_before_connack: 0,
            backoff: Backoff::default(),
            reconnects: 0,
            online: false,
            retry_at: None,
        }
    }

    #[cfg(test)]
    pub(crate) fn protocol(&self) -> Protocol {
        self.protocol
    }

    #[cfg(test)]
    pub(crate) fn is_online(&self) -> bool {
        self.online
    }

    /// MQTT 5 was tried because the broker sent an oversize packet.
    pub(crate) fn oversize_seen(&self) -> bool {
        self.v5_tried
    }

    /// The instant the session may be polled again, while waiting to reconnect.
    pub(crate) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// The wait is over: the next poll connects.
    pub(crate) fn on_retry_timer(&mut self) {
        self.retry_at = None;
    }

    pub(crate) fn on_event(&mut self, event: Event, now: Instant) -> Vec<Action> {
        match event {
            Event::ConnAck { session_present } => {
                self.backoff.reset();
                self.retry_at = None;
                if self.connected_once {
                    self.reconnects += 1;
                }
                self.connected_once = true;
                self.v5_connected |= self.protocol == Protocol::V5;
                self.online = true;
                let mut actions = Vec::with_capacity(2);
                // A clean session has no subscriptions: subscribe on every new one.
                if !session_present {
                    actions.push(Action::Subscribe);
                }
                actions.push(Action::Online { reconnects: self.reconnects });
                actions
            }
            Event::Failed(kind) => {
                let mut actions = Vec::with_capacity(2);
                if std::mem::replace(&mut self.online, false) {
                    actions.push(Action::Offline);
                }
                if self.protocol == Protocol::V5 && !self.v5_connected {
                    if kind == FailureKind::ClosedByPeer {
                        self.closed_before_connack += 1;
                    }
                    if kind == FailureKind::ProtocolRefused || self.closed_before_connack >= 2 {
                        self.protocol = Protocol::V311;
                        actions.push(Action::FallBackToV311);
                        return actions;
                    }
                }
                if kind == FailureKind::OversizePacket && self.protocol == Protocol::V311 && !self.v5_tried {
                    self.v5_tried = true;
                    self.protocol = Protocol::V5;
                    self.closed_before_connack = 0;
                    actions.push(Action::UpgradeToV5);
                    return actions;
                }
                let delay = self.backoff.next_delay();
                let at = now + delay;
                self.retry_at = Some(at);
                actions.push(Action::RetryAt(at, delay));
                actions
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry_delay(actions: &[Action]) -> Duration {
        match actions.last() {
            Some(Action::RetryAt(_, d)) => *d,
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn a_new_session_subscribes_and_goes_online_and_a_kept_one_does_not_resubscribe() {
        let now = Instant::now();
        let mut c = Connection::new(Protocol::V311);
        assert_eq!(
            c.on_event(Event::ConnAck { session_present: false }, now),
            [Action::Subscribe, Action::Online { reconnects: 0 }]
        );
        assert!(c.is_online());
        assert_eq!(
            c.on_event(Event::Failed(FailureKind::Other), now)[0],
            Action::Offline,
            "a broken connection goes offline first"
        );
        c.on_retry_timer();
        assert_eq!(c.on_event(Event::ConnAck { session_present: true }, now), [Action::Online { reconnects: 1 }]);
    }

    #[test]
    fn failures_wait_longer_each_time_and_a_connection_resets_the_wait() {
        let now = Instant::now();
        let mut c = Connection::new(Protocol::V311);
        let mut delays = Vec::new();
        for _ in 0..12 {
            let actions = c.on_event(Event::Failed(FailureKind::Other), now);
            assert_eq!(actions.len(), 1, "never online: no Offline action: {actions:?}");
            let d = retry_delay(&actions);
            assert_eq!(c.retry_at(), Some(now + d));
            c.on_retry_timer();
            assert_eq!(c.retry_at(), None);
            delays.push(d);
        }
        assert!(delays[0] <= Duration::from_millis(250), "{delays:?}");
        assert!(delays[1] >= Duration::from_millis(250), "{delays:?}");
        // Capped: every delay at the cap is in [15 s, 30 s].
        assert!(delays[11] >= Duration::from_secs(15) && delays[11] <= Duration::from_secs(30), "{delays:?}");
        c.on_event(Event::ConnAck { session_present: false }, now);
        let d = retry_delay(&c.on_event(Event::Failed(FailureKind::Other), now));
        assert!(d <= Duration::from_millis(250), "{d:?}");
    }

    #[test]
    fn mqtt5_falls_back_to_311_when_refused_or_closed_twice_before_connack() {
        let now = Instant::now();
        let mut c = Connection::new(Protocol::V5);
        assert_eq!(c.on_event(Event::Failed(FailureKind::ProtocolRefused), now), [Action::FallBackToV311]);
        assert_eq!(c.protocol(), Protocol::V311);
        assert_eq!(c.retry_at(), None, "the fallback connects at once");

        let mut c = Connection::new(Protocol::V5);
        retry_delay(&c.on_event(Event::Failed(FailureKind::ClosedByPeer), now));
        c.on_retry_timer();
        assert_eq!(c.on_event(Event::Failed(FailureKind::ClosedByPeer), now), [Action::FallBackToV311]);

        // Once connected with MQTT 5, a closed connection is an ordinary failure.
        let mut c = Connection::new(Protocol::V5);
        c.on_event(Event::ConnAck { session_present: false }, now);
        for _ in 0..3 {
            c.on_event(Event::Failed(FailureKind::ClosedByPeer), now);
            c.on_retry_timer();
        }
        assert_eq!(c.protocol(), Protocol::V5);
    }

    #[test]
    fn an_oversize_packet_on_311_tries_mqtt5_once_and_falls_back_if_refused() {
        let now = Instant::now();
        let mut c = Connection::new(Protocol::V311);
        c.on_event(Event::ConnAck { session_present: false }, now);
        assert_eq!(c.on_event(Event::Failed(FailureKind::OversizePacket), now), [Action::Offline, Action::UpgradeToV5]);
        assert_eq!(c.protocol(), Protocol::V5);
        // A broker without MQTT 5: back to 3.1.1, and never again.
        assert_eq!(c.on_event(Event::Failed(FailureKind::ProtocolRefused), now), [Action::FallBackToV311]);
        retry_delay(&c.on_event(Event::Failed(FailureKind::OversizePacket), now));
        assert_eq!(c.protocol(), Protocol::V311);
        // With MQTT 5 connected, an oversize packet is an ordinary failure.
        let mut c = Connection::new(Protocol::V311);
        c.on_event(Event::Failed(FailureKind::OversizePacket), now);
        c.on_event(Event::ConnAck { session_present: false }, now);
        retry_delay(&c.on_event(Event::Failed(FailureKind::OversizePacket), now));
        assert_eq!(c.protocol(), Protocol::V5);
    }

    #[test]
    fn settings_get_a_hint_and_passing_faults_do_not() {
        assert!(FailureKind::UntrustedCertificate.hint().unwrap().contains("--ca-file"));
        assert!(FailureKind::LoginRefused.hint().unwrap().contains("--username"));
        assert!(FailureKind::NotTls.hint().unwrap().contains("mqtt://"));
        assert_eq!(FailureKind::Other.hint(), None);
    }
}
