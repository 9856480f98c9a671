//! The embedded MQTT broker (rumqttd) for the demo and `outpost-sim serve`.
//! Tests that must kill or restart a broker use Mosquitto processes instead.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (rumqttd cannot report the port it bound, so
/// we pick one first).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn probe_addr(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() { SocketAddr::new([127, 0, 0, 1].into(), listen.port()) } else { listen }
}

/// Starts rumqttd on `bind` (port 0 = any free port) in its own thread and
/// returns once it accepts connections. It runs until the process exits.
pub fn start(bind_ip: std::net::IpAddr, port: u16) -> Result<SocketAddr, String> {
    let port = if port == 0 { free_port().map_err(|e| format!("no free port: {e}"))? } else { port };
    let listen = SocketAddr::new(bind_ip, port);
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 5000,
        max_payload_size: 16 * 1024 * 1024,
        max_inflight_count: 256,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server =
        rumqttd::ServerSettings { name: "v4".into(), listen, tls: None, next_connection_delay_ms: 0, connections };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            // The default of 0 refuses every client.
            max_connections: 10_000,
            max_outgoing_packet_count: 1024,
            max_segment_size: 64 * 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("v4".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| format!("cannot start the broker thread: {e}"))?;
    // Probe by binding, not connecting: a connect-and-close probe makes
    // rumqttd log an error. Once the broker holds the port, binding it fails.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpListener::bind(probe_addr(listen)).is_err() {
            return Ok(listen);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("the embedded broker did not accept connections on {listen} within 10 s"))
}
