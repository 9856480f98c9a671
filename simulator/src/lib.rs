//! Outpost's operator side and lab.
//!
//! - [`broker`]: the embedded MQTT broker (rumqttd).
//! - [`registry`]: `register` (write a model version as static files) and a static HTTP server.
//! - [`operator`]: an MQTT client that deploys, follows events and sends inference requests.
//! - [`progress`]: progress lines for a terminal (indicatif) or a log.
//! - [`demo`]: the one-command tour.
//! - [`bench`]: Outpost side by side with its floors and peers, one run, ratios.
//! - [`fleet`]: N agents in one process against a broker, one group deployment, a fault mix.
//! - [`rollout`]: staged rollouts to a group, gated on health, resumable from the broker.
//! - [`plot`]: the figures (SVG) of the bench, the fleet and the chaos soak.
//! - [`status`]: the fleet view (`outpost-sim status`): a row per device and model slot.

pub mod bench;
pub mod broker;
pub mod chaos;
pub mod demo;
pub mod fleet;
pub mod operator;
pub mod plot;
pub mod progress;
pub mod registry;
pub mod rollout;
pub mod signing;
pub mod status;
