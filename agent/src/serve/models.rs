//! The engines a device serves from: the default slot's (the model of the
//! device's `desired` topic, served under its own name) and one per model
//! slot (`models/{slot}/desired`, served under the slot's name). Each has
//! its own model, worker pool, probation and latencies, so one model's
//! backlog never queues another's requests; they share the counters of
//! `/metrics`.

use super::{Engine, Model};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

#[derive(Debug)]
pub struct Models {
    pub default: Arc<Engine>,
    slots: RwLock<BTreeMap<String, Arc<Engine>>>,
}

/// What a request's model name reaches.
pub enum Route {
    /// A model slot by that name (its engine may have no model yet).
    Slot(Arc<Engine>),
    /// No slot by that name: the default slot's engine, when its model has that name.
    Default(Arc<Engine>),
}

impl Models {
    pub fn new(default: Arc<Engine>) -> Models {
        Models { default, slots: Default::default() }
    }

    pub fn add(&self, slot: &str, engine: Arc<Engine>) {
        self.slots.write().unwrap_or_else(|p| p.into_inner()).insert(slot.to_string(), engine);
    }

    pub fn slot(&self, slot: &str) -> Option<Arc<Engine>> {
        self.slots.read().unwrap_or_else(|p| p.into_inner()).get(slot).cloned()
    }

    /// Every model slot and its engine, by name.
    pub fn slots(&self) -> Vec<(String, Arc<Engine>)> {
        self.slots.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn count(&self) -> usize {
        self.slots.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A model slot named `name` wins over a default-slot model of that name.
    pub fn route(&self, name: &str) -> Route {
        match self.slot(name) {
            Some(e) => Route::Slot(e),
            None => Route::Default(self.default.clone()),
        }
    }

    /// Every model serving now, under the name a client addresses it by.
    pub fn serving(&self) -> Vec<(String, Arc<Model>)> {
        let mut out: Vec<(String, Arc<Model>)> =
            self.default.active().map(|m| (m.name.clone(), m)).into_iter().collect();
        out.extend(self.slots().into_iter().filter_map(|(slot, e)| Some((slot, e.active()?))));
        out
    }
}
