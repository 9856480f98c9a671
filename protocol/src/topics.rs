//! MQTT topics. All live under a prefix (default `outpost`), so one broker can
//! carry several fleets.

use crate::ProtocolError;

/// Default topic prefix.
pub const DEFAULT_PREFIX: &str = "outpost";

/// Topic names for one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics { prefix: DEFAULT_PREFIX.to_string() }
    }
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Topics { prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Retained `Deployment` for one device; an empty payload undeploys.
    pub fn device_desired(&self, device: &str) -> String {
        format!("{}/devices/{device}/desired", self.prefix)
    }
    /// Retained `Deployment` for every device of a group.
    pub fn group_desired(&self, group: &str) -> String {
        format!("{}/groups/{group}/desired", self.prefix)
    }
    /// Retained `online` / `offline` (Last Will).
    pub fn availability(&self, device: &str) -> String {
        format!("{}/devices/{device}/availability", self.prefix)
    }
    /// Retained `DeviceState`.
    pub fn state(&self, device: &str) -> String {
        format!("{}/devices/{device}/state", self.prefix)
    }
    /// `DeploymentEvent`s.
    pub fn events(&self, device: &str) -> String {
        format!("{}/devices/{device}/events", self.prefix)
    }
    /// Periodic `Telemetry`.
    pub fn telemetry(&self, device: &str) -> String {
        format!("{}/devices/{device}/telemetry", self.prefix)
    }
    /// `InferRequest`s from any client.
    pub fn infer(&self, device: &str) -> String {
        format!("{}/devices/{device}/infer", self.prefix)
    }
    /// `InferResponse`s and inference errors (unless the request named `reply_to`).
    pub fn predictions(&self, device: &str) -> String {
        format!("{}/devices/{device}/predictions", self.prefix)
    }
    /// The reply namespace, `PREFIX/replies/`: where a request's `reply_to`
    /// (or MQTT 5 response topic) may point by default. A client picks a
    /// topic of its own under it, e.g. `outpost/replies/<client id>/...`.
    pub fn replies(&self) -> String {
        format!("{}/replies/", self.prefix)
    }
    /// Sampled inputs with their predictions.
    pub fn capture(&self, device: &str) -> String {
        format!("{}/devices/{device}/capture", self.prefix)
    }

    /// Retained `Deployment` for one model slot of one device (see
    /// [`validate_slot`]); an empty payload undeploys that slot only.
    pub fn device_model_desired(&self, device: &str, slot: &str) -> String {
        format!("{}/devices/{device}/models/{slot}/desired", self.prefix)
    }
    /// Retained `Deployment` for one model slot of every device of a group.
    pub fn group_model_desired(&self, group: &str, slot: &str) -> String {
        format!("{}/groups/{group}/models/{slot}/desired", self.prefix)
    }
    /// `InferRequest`s for the model in one slot.
    pub fn model_infer(&self, device: &str, slot: &str) -> String {
        format!("{}/devices/{device}/models/{slot}/infer", self.prefix)
    }
    /// The desired topic of a device for `slot` (None: the device's own
    /// `desired`, the default slot).
    pub fn device_desired_in(&self, device: &str, slot: Option<&str>) -> String {
        match slot {
            Some(s) => self.device_model_desired(device, s),
            None => self.device_desired(device),
        }
    }
    /// The desired topic of a group for `slot` (None: the group's `desired`).
    pub fn group_desired_in(&self, group: &str, slot: Option<&str>) -> String {
        match slot {
            Some(s) => self.group_model_desired(group, s),
            None => self.group_desired(group),
        }
    }
    /// Retained progress of a staged rollout to a group (operator tools
    /// only; devices never read it): `outpost/rollouts/{group}` for the
    /// default slot, `outpost/rollouts/{group}/models/{slot}` for a slot.
    pub fn rollout(&self, group: &str, slot: Option<&str>) -> String {
        match slot {
            Some(s) => format!("{}/rollouts/{group}/models/{s}", self.prefix),
            None => format!("{}/rollouts/{group}", self.prefix),
        }
    }

    /// What a device/group topic refers to, if it is one of ours.
    ///
    /// Brokers that bridge MQTT to AMQP (RabbitMQ's MQTT plugin) deliver a
    /// topic with every `.` turned into `/`: a message published on
    /// `outpost/devices/cam.18/desired` arrives as
    /// `outpost/devices/cam/18/desired`. So the name is everything between
    /// the scope and the leaf, and [`same_name`] compares it with a device
    /// or group name either way; the prefix is matched either way too.
    pub fn classify<'a>(&self, topic: &'a str) -> Option<TopicKind<'a>> {
        let rest = match topic.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest,
            None if self.prefix.contains('.') => topic.strip_prefix(self.prefix.replace('.', "/").as_str())?,
            None => return None,
        };
        let rest = rest.strip_prefix('/')?;
        let (scope, rest) = rest.split_once('/')?;
        let (name, leaf) = rest.rsplit_once('/')?;
        // `{name}/models/{slot}/{leaf}`: a slot never holds `/` (nor `.`,
        // which RabbitMQ would turn into one).
        let slotted = name.rsplit_once('/').and_then(|(head, slot)| {
            let name = head.strip_suffix("/models")?;
            validate_slot(slot).ok()?;
            Some((name, slot))
        });
        let bad = |name: &str| name.is_empty() || name.starts_with('/') || name.ends_with('/') || name.contains("//");
        if let Some((name, slot)) = slotted.filter(|(name, _)| !bad(name)) {
            return match (scope, leaf) {
                ("devices", "desired") => Some(TopicKind::DeviceModelDesired(name, slot)),
                ("groups", "desired") => Some(TopicKind::GroupModelDesired(name, slot)),
                ("devices", "infer") => Some(TopicKind::ModelInfer(name, slot)),
                _ => None,
            };
        }
        if bad(name) {
            return None;
        }
        match (scope, leaf) {
            ("devices", "desired") => Some(TopicKind::DeviceDesired(name)),
            ("groups", "desired") => Some(TopicKind::GroupDesired(name)),
            ("devices", "infer") => Some(TopicKind::Infer(name)),
            _ => None,
        }
    }
}

/// True when `wire`, a name taken from a received topic, is `name` as
/// published, or `name` with its dots turned into slashes by the broker
/// (RabbitMQ's MQTT plugin does that).
pub fn same_name(wire: &str, name: &str) -> bool {
    wire == name
        || (name.contains('.')
            && wire.len() == name.len()
            && wire.bytes().zip(name.bytes()).all(|(w, n)| w == n || (n == b'.' && w == b'/')))
}

/// The topics an agent subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind<'a> {
    DeviceDesired(&'a str),
    GroupDesired(&'a str),
    Infer(&'a str),
    /// `devices/{name}/models/{slot}/desired`.
    DeviceModelDesired(&'a str, &'a str),
    /// `groups/{name}/models/{slot}/desired`.
    GroupModelDesired(&'a str, &'a str),
    /// `devices/{name}/models/{slot}/infer`.
    ModelInfer(&'a str, &'a str),
}

/// Checks a model slot name: `[A-Za-z0-9_-]{1,64}` (no `.`: brokers that
/// bridge to AMQP turn dots into topic levels).
pub fn validate_slot(slot: &str) -> Result<(), ProtocolError> {
    let ok = !slot.is_empty()
        && slot.len() <= 64
        && slot.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::invalid("slot", "1 to 64 characters of A-Z a-z 0-9 _ -", crate::error::excerpt(slot, 80)))
    }
}

/// Checks a device or group name: `[A-Za-z0-9_.-]{1,64}`, so it is safe in a
/// topic (no `/`, `+`, `#`) and in a file name; never with `.models.` in
/// it (RabbitMQ would deliver `a.models.x`'s own topics as model slot `x`
/// of device `a`).
pub fn validate_name(what: &str, name: &str) -> Result<(), ProtocolError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && name != "."
        && name != ".."
        && !name.contains(".models.");
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::invalid(
            what,
            "1 to 64 characters of A-Z a-z 0-9 _ . - (without \".models.\")",
            crate::error::excerpt(name, 80),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_the_design() {
        let t = Topics::default();
        assert_eq!(t.device_desired("dev1"), "outpost/devices/dev1/desired");
        assert_eq!(t.group_desired("cams"), "outpost/groups/cams/desired");
        assert_eq!(t.availability("dev1"), "outpost/devices/dev1/availability");
        assert_eq!(t.state("dev1"), "outpost/devices/dev1/state");
        assert_eq!(t.events("dev1"), "outpost/devices/dev1/events");
        assert_eq!(t.telemetry("dev1"), "outpost/devices/dev1/telemetry");
        assert_eq!(t.infer("dev1"), "outpost/devices/dev1/infer");
        assert_eq!(t.predictions("dev1"), "outpost/devices/dev1/predictions");
        assert_eq!(t.capture("dev1"), "outpost/devices/dev1/capture");
        assert_eq!(t.device_model_desired("dev1", "det"), "outpost/devices/dev1/models/det/desired");
        assert_eq!(t.group_model_desired("cams", "det"), "outpost/groups/cams/models/det/desired");
        assert_eq!(t.model_infer("dev1", "det"), "outpost/devices/dev1/models/det/infer");
        assert_eq!(t.rollout("cams", None), "outpost/rollouts/cams");
        assert_eq!(t.rollout("cams", Some("det")), "outpost/rollouts/cams/models/det");
    }

    #[test]
    fn classifies_slot_topics() {
        let t = Topics::default();
        assert_eq!(t.classify("outpost/devices/d/models/det/desired"), Some(TopicKind::DeviceModelDesired("d", "det")));
        assert_eq!(t.classify("outpost/groups/g/models/c-1/desired"), Some(TopicKind::GroupModelDesired("g", "c-1")));
        assert_eq!(t.classify("outpost/devices/d/models/det/infer"), Some(TopicKind::ModelInfer("d", "det")));
        // RabbitMQ: a dotted device name arrives with slashes.
        let Some(TopicKind::DeviceModelDesired(d, s)) = t.classify("outpost/devices/cam/18/models/det/desired") else {
            panic!()
        };
        assert!(same_name(d, "cam.18"));
        assert_eq!(s, "det");
        assert_eq!(t.classify("outpost/devices/d/models/det/state"), None);
        assert_eq!(t.classify("outpost/devices//models/det/desired"), None);
        // A device named `models` keeps its own topics.
        assert_eq!(t.classify("outpost/devices/models/desired"), Some(TopicKind::DeviceDesired("models")));
        for bad in ["", "a.b", "a/b", "+", &"x".repeat(65)] {
            assert!(validate_slot(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn classifies_only_our_topics() {
        let t = Topics::new("fleet/a");
        assert_eq!(t.classify("fleet/a/devices/d/desired"), Some(TopicKind::DeviceDesired("d")));
        assert_eq!(t.classify("fleet/a/groups/g/desired"), Some(TopicKind::GroupDesired("g")));
        assert_eq!(t.classify("fleet/a/devices/d/infer"), Some(TopicKind::Infer("d")));
        assert_eq!(t.classify("fleet/a/devices/d/state"), None);
        assert_eq!(t.classify("fleet/ab/devices/d/desired"), None);
        assert_eq!(t.classify("fleet/a/devices/d/desired/x"), None);
        assert_eq!(t.classify("fleet/a/devices//desired"), None);
        assert_eq!(t.classify("fleet/a/devices/desired"), None);
    }

    #[test]
    fn dotted_names_arrive_as_slashes_on_rabbitmq_and_still_match() {
        let t = Topics::new("fleet.a");
        // As published (Mosquitto) and as RabbitMQ's MQTT plugin delivers it.
        for topic in ["fleet.a/devices/cam.18/desired", "fleet/a/devices/cam/18/desired"] {
            let Some(TopicKind::DeviceDesired(name)) = t.classify(topic) else { panic!("{topic}") };
            assert!(same_name(name, "cam.18"), "{topic}");
            assert!(!same_name(name, "cam"), "{topic}");
        }
        let Some(TopicKind::GroupDesired(g)) = t.classify("fleet/a/groups/site.1/desired") else { panic!() };
        assert!(same_name(g, "site.1"));
        assert!(!same_name(g, "site-1"));
        let Some(TopicKind::Infer(d)) = t.classify("fleet/a/devices/a/b/infer") else { panic!() };
        assert!(same_name(d, "a.b"));
        // A slash in the name never matches a name without a dot there.
        assert!(!same_name("a/b", "a_b"));
        assert!(!same_name("cam.18", "cam/18"));
    }

    #[test]
    fn names_are_topic_and_path_safe() {
        assert!(validate_name("device", "dev-1.a_B").is_ok());
        for bad in ["", "a/b", "a+b", "#", "..", "é", &"x".repeat(65), "cam.models.det"] {
            let err = validate_name("device", bad).unwrap_err();
            assert_eq!(err.path, "device");
        }
    }
}
