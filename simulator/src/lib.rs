//! Outpost's operator side and lab.
//!
//! - [`broker`]: the embedded MQTT broker (rumqttd).
//! - [`registry`]: `register` (write a model version as static files) and a static HTTP server.
//! - [`operator`]: an MQTT client that deploys, follows events and sends inference requests.
//! - [`demo`]: the one-command tour.
//! - [`fleet`]: N agents in one process against a broker, one group deployment, a fault mix.

pub mod broker;
pub mod demo;
pub mod fleet;
pub mod operator;
pub mod registry;
