//! What the rollout sees of the fleet: one MQTT session subscribed to every
//! device's retained state and availability, events, telemetry and own
//! desired topic (wildcards, QoS 0: a broker never drops them for a full
//! queue, and retained state backs up any event lost), plus the group's
//! desired topic and the rollout's record.
//!
//! Wildcard subscriptions must be handed retained messages: Mosquitto, EMQX,
//! HiveMQ and AWS IoT do; RabbitMQ's MQTT plugin does not (README, "Brokers").

use crate::operator::Operator;
use outpost_protocol::telemetry::{InferenceStats, ModelId, ShadowStats};
use outpost_protocol::{ActiveModel, DeploymentEvent, DeviceState, LastDeployment, Telemetry, Topics};
use rumqttc::{Publish, QoS};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One telemetry report (or shadow event) of one device, for the rollout's slot.
#[derive(Debug, Clone)]
pub struct Sample {
    pub device: String,
    pub model: Option<ModelId>,
    pub inference: Option<InferenceStats>,
    pub shadow: Option<ShadowStats>,
}

/// The latest of everything, by device.
#[derive(Debug)]
pub struct Watch {
    topics: Topics,
    slot: Option<String>,
    group_topic: String,
    record_topic: String,
    barrier: String,
    /// The marker [`Watch::sync`] waits for, and whether it came back.
    marker: u64,
    barrier_seen: bool,
    pub states: HashMap<String, DeviceState>,
    pub online: HashMap<String, bool>,
    /// What each device's own desired topic (for the slot) holds; absent or
    /// empty: nothing.
    pub overrides: HashMap<String, Vec<u8>>,
    /// A device's own desired topic changed since the last look.
    pub overrides_changed: bool,
    /// What the group's desired topic holds (empty: nothing).
    pub group_desired: Vec<u8>,
    /// The rollout record last seen on its topic (empty: none).
    pub record: Vec<u8>,
    /// A record written by someone else since the last look.
    pub record_changed: bool,
    events: Vec<DeploymentEvent>,
    samples: Vec<Sample>,
}

impl Watch {
    /// Subscribes and returns once every retained message is in: a marker
    /// published after the subscriptions comes back after them.
    pub async fn start(op: &mut Operator, group: &str, slot: Option<&str>) -> Result<Watch, String> {
        let mut w = Watch::new(op.topics.clone(), group, slot);
        let p = w.topics.prefix().to_string();
        let desired = match slot {
            Some(s) => format!("{p}/devices/+/models/{s}/desired"),
            None => format!("{p}/devices/+/desired"),
        };
        for leaf in ["state", "availability", "events", "telemetry"] {
            op.subscribe_with(&format!("{p}/devices/+/{leaf}"), QoS::AtMostOnce).await?;
        }
        op.subscribe_with(&desired, QoS::AtMostOnce).await?;
        op.subscribe(&w.group_topic.clone()).await?;
        op.subscribe(&w.record_topic.clone()).await?;
        op.subscribe(&w.barrier.clone()).await?;
        w.sync(op).await?;
        w.record_changed = false;
        Ok(w)
    }

    /// Nothing seen yet.
    pub fn new(topics: Topics, group: &str, slot: Option<&str>) -> Watch {
        Watch {
            group_topic: topics.group_desired_in(group, slot),
            record_topic: topics.rollout(group, slot),
            barrier: format!("{}rollout-{}-{}", topics.replies(), std::process::id(), crate::rollout::record::now_ms()),
            marker: 0,
            barrier_seen: false,
            topics,
            slot: slot.map(str::to_string),
            states: HashMap::new(),
            online: HashMap::new(),
            overrides: HashMap::new(),
            overrides_changed: false,
            group_desired: Vec::new(),
            record: Vec::new(),
            record_changed: false,
            events: Vec::new(),
            samples: Vec::new(),
        }
    }

    /// Returns once the broker handled everything published before: a
    /// marker published now comes back after it (one session's messages
    /// stay in order). At the start, that is every retained message of the
    /// subscriptions; at the end, the record's last write.
    pub async fn sync(&mut self, op: &mut Operator) -> Result<(), String> {
        self.marker += 1;
        self.barrier_seen = false;
        op.publish(&self.barrier, self.marker.to_string().into_bytes(), false).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.barrier_seen {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = op.next(left).await.ok_or("the broker did not answer within 30 s")?;
            self.ingest(m);
        }
        Ok(())
    }

    /// Takes one message in.
    pub fn ingest(&mut self, m: Publish) {
        if m.topic == self.barrier {
            self.barrier_seen |= m.payload[..] == self.marker.to_string().into_bytes()[..];
            return;
        }
        if m.topic == self.group_topic {
            self.group_desired = m.payload.to_vec();
            return;
        }
        if m.topic == self.record_topic {
            self.record = m.payload.to_vec();
            self.record_changed = true;
            return;
        }
        let Some(rest) = m.topic.strip_prefix(self.topics.prefix()).and_then(|r| r.strip_prefix("/devices/")) else {
            return;
        };
        let Some((device, leaf)) = rest.split_once('/') else { return };
        let device = device.to_string();
        match leaf {
            "state" => {
                if let Ok(s) = DeviceState::from_json(&m.payload) {
                    self.states.insert(device, s);
                }
            }
            "availability" => {
                self.online.insert(device, &m.payload[..] == b"online");
            }
            "events" => {
                // The device is the topic's: a device (or anyone with its
                // topic) cannot speak for another; other slots' events are
                // not the rollout's.
                if let Ok(ev) = DeploymentEvent::from_json(&m.payload)
                    && ev.device == device
                    && ev.slot == self.slot
                {
                    if let Some(s) = &ev.shadow {
                        self.samples.push(Sample {
                            device: ev.device.clone(),
                            model: None,
                            inference: None,
                            shadow: Some(s.clone()),
                        });
                    }
                    self.events.push(ev);
                }
            }
            "telemetry" => {
                if let Ok(t) = serde_json::from_slice::<Telemetry>(&m.payload)
                    && t.device == device
                {
                    self.samples.push(slot_sample(device, t, self.slot.as_deref()));
                }
            }
            _ if self.is_desired_leaf(leaf) => {
                self.overrides_changed = true;
                self.overrides.insert(device, m.payload.to_vec());
            }
            _ => {}
        }
    }

    fn is_desired_leaf(&self, leaf: &str) -> bool {
        match &self.slot {
            Some(s) => leaf.strip_prefix("models/").and_then(|l| l.strip_suffix("/desired")) == Some(s.as_str()),
            None => leaf == "desired",
        }
    }

    pub fn take_events(&mut self) -> Vec<DeploymentEvent> {
        std::mem::take(&mut self.events)
    }

    pub fn take_samples(&mut self) -> Vec<Sample> {
        std::mem::take(&mut self.samples)
    }

    pub fn is_online(&self, device: &str) -> bool {
        self.online.get(device).copied().unwrap_or(false)
    }

    /// The devices whose retained state names `group`, by name.
    pub fn members(&self, group: &str) -> Vec<String> {
        let mut m: Vec<String> =
            self.states.iter().filter(|(_, s)| s.groups.iter().any(|g| g == group)).map(|(d, _)| d.clone()).collect();
        m.sort();
        m
    }

    /// What serves in the rollout's slot on `device`, and how its last deployment there ended.
    pub fn slot_state(&self, device: &str) -> Option<(Option<&ActiveModel>, Option<&LastDeployment>)> {
        let s = self.states.get(device)?;
        Some(match &self.slot {
            None => (s.active.as_ref(), s.last_deployment.as_ref()),
            Some(slot) => match s.models.get(slot) {
                Some(m) => (m.active.as_ref(), m.last_deployment.as_ref()),
                None => (None, None),
            },
        })
    }

    /// What `device`'s own desired topic holds, withdrawals included (for its revision).
    pub fn raw_override(&self, device: &str) -> Option<&[u8]> {
        self.overrides.get(device).map(Vec::as_slice).filter(|p| !p.is_empty())
    }

    /// The desired state `device`'s own topic holds, if any: not empty and
    /// not a signed undeployment.
    pub fn override_of(&self, device: &str) -> Option<&[u8]> {
        self.raw_override(device).filter(|p| !is_withdrawal(p))
    }

    /// The deployment id `device`'s own topic holds.
    pub fn override_id(&self, device: &str) -> Option<String> {
        self.override_of(device).and_then(crate::operator::revision_of).and_then(|(_, id)| id)
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }
}

/// A signed undeployment (what a signing operator leaves on a withdrawn topic).
fn is_withdrawal(payload: &[u8]) -> bool {
    serde_json::from_slice::<outpost_protocol::trust::Envelope>(payload)
        .is_ok_and(|e| e.payload_type == outpost_protocol::trust::UNDEPLOY_TYPE)
}

/// A telemetry report's figures for `slot` (None: the default slot's fields).
pub fn slot_sample(device: String, t: Telemetry, slot: Option<&str>) -> Sample {
    match slot {
        None => Sample { device, model: t.model, inference: Some(t.inference), shadow: t.shadow },
        Some(s) => match t.models.get(s) {
            Some(m) => Sample {
                device,
                model: m.model.clone(),
                inference: Some(m.inference.clone()),
                shadow: m.shadow.clone(),
            },
            None => Sample { device, model: None, inference: None, shadow: None },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::telemetry::SlotTelemetry;

    fn publish(topic: &str, payload: Vec<u8>) -> Publish {
        Publish::new(topic, QoS::AtMostOnce, payload)
    }

    #[test]
    fn a_device_speaks_only_for_itself() {
        let mut w = Watch::new(Topics::default(), "cams", None);
        let ev = |device: &str| {
            let mut e: DeploymentEvent =
                DeploymentEvent::from_json(include_bytes!("../../../protocol/golden/event.json")).expect("golden");
            e.device = device.into();
            e.deployment_id = "cand".into();
            serde_json::to_vec(&e).unwrap()
        };
        // dev-c claims to be dev-a: dropped.
        w.ingest(publish("outpost/devices/dev-c/events", ev("dev-a")));
        w.ingest(publish("outpost/devices/dev-a/events", ev("dev-a")));
        let got: Vec<String> = w.take_events().into_iter().map(|e| e.device).collect();
        assert_eq!(got, ["dev-a"]);
        let mut t: Telemetry =
            serde_json::from_slice(include_bytes!("../../../protocol/golden/telemetry.json")).expect("golden");
        t.device = "dev-a".into();
        w.ingest(publish("outpost/devices/dev-c/telemetry", serde_json::to_vec(&t).unwrap()));
        w.ingest(publish("outpost/devices/dev-a/telemetry", serde_json::to_vec(&t).unwrap()));
        let got: Vec<String> = w.take_samples().into_iter().map(|s| s.device).collect();
        assert_eq!(got, ["dev-a"]);
        // Events of another slot are not the rollout's.
        let mut other = DeploymentEvent::from_json(&ev("dev-a")).unwrap();
        other.slot = Some("det".into());
        w.ingest(publish("outpost/devices/dev-a/events", serde_json::to_vec(&other).unwrap()));
        assert!(w.take_events().is_empty());
    }

    #[test]
    fn a_slot_s_figures_come_from_its_own_entry() {
        let mut t: Telemetry =
            serde_json::from_slice(include_bytes!("../../../protocol/golden/telemetry.json")).expect("golden");
        t.inference.requests = 7;
        let slot = SlotTelemetry {
            model: Some(ModelId { name: "det".into(), version: "3".into() }),
            inference: InferenceStats { requests: 11, ..Default::default() },
            shadow: Some(ShadowStats { compared: 5, ..Default::default() }),
        };
        t.models.insert("detector".into(), slot);
        let s = slot_sample("cam-0".into(), t.clone(), Some("detector"));
        assert_eq!(s.model.as_ref().map(|m| m.version.as_str()), Some("3"));
        assert_eq!(s.inference.as_ref().map(|i| i.requests), Some(11));
        assert_eq!(s.shadow.as_ref().map(|s| s.compared), Some(5));
        let d = slot_sample("cam-0".into(), t.clone(), None);
        assert_eq!(d.inference.as_ref().map(|i| i.requests), Some(7));
        let none = slot_sample("cam-0".into(), t, Some("other"));
        assert!(none.inference.is_none() && none.model.is_none());
    }
}
