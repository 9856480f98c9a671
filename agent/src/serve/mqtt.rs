//! Requests over MQTT: a request on `infer` is answered on its MQTT 5
//! response topic, its `reply_to`, or `predictions`, with its correlation data.

use super::model::InferFailure;
use super::{Engine, Transport};
use crate::link::publisher::{Outbox, Outgoing};
use crate::link::session::Message;
use outpost_protocol::{ErrorCode, InferError};

/// Runs one request and hands its answer to the publisher; `predictions`
/// is where it goes when the request names no reply topic.
/// `overloaded`: the request is refused unread with this reason (the bytes
/// of requests in flight are at their bound).
pub async fn answer(
    engine: &Engine,
    out: &Outbox,
    predictions: &str,
    reply_prefixes: &[String],
    request: &Message,
    max_packet: usize,
    overloaded: Option<String>,
) {
    // Fault injection: the window between a request's arrival and its parsing.
    crate::sys::delay_point("mqtt-request").await;
    let payload = request.payload();
    let answer = if let Some(why) = overloaded {
        engine.refuse(payload, InferFailure::new(ErrorCode::Overloaded, why), Transport::Mqtt)
    } else if payload.len() > max_packet {
        // Refused unread (the limit protects memory); the id is still salvaged for the answer.
        let message = format!(
            "the request is {} bytes, over the MQTT packet limit of {max_packet} (--max-packet-size): send a smaller batch, or use the HTTP endpoint",
            payload.len()
        );
        engine.refuse(payload, InferFailure::new(ErrorCode::TooLarge, message), Transport::Mqtt)
    } else {
        engine.infer_body(payload, None, Transport::Mqtt).await
    };
    // MQTT 5's response topic first, then `reply_to` in the request, then
    // `predictions`. A reply topic outside the reply prefixes is not
    // published on (the agent must not speak for others on their topics):
    // the refusal goes to `predictions`, counted and logged.
    let asked = request.response_topic().map(str::to_string).or(answer.reply_to);
    let (topic, result) = match reply_topic(asked.as_deref(), predictions, reply_prefixes) {
        Ok(t) => (t, answer.result),
        Err(message) => {
            engine.counters.reply_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                reply_to = %outpost_protocol::error::excerpt(asked.as_deref().unwrap_or_default(), 120),
                "a request's reply topic is outside the reply prefixes: answered on predictions"
            );
            (predictions.to_string(), Err(InferFailure::new(ErrorCode::ReplyRefused, message)))
        }
    };
    let mut body = match result {
        Ok(resp) => serde_json::to_vec(&resp),
        Err(f) => serde_json::to_vec(&InferError { id: answer.id.clone(), error: f.message, code: f.code }),
    }
    .unwrap_or_default();
    // An answer over the packet limit would be dropped (or break the
    // connection): answer why instead.
    let correlation = request.correlation().map(<[u8]>::to_vec);
    let overhead = crate::link::packet_overhead(&topic, correlation.as_deref());
    if body.len() + overhead > max_packet {
        let error = format!(
            "the answer is {} bytes, over the MQTT packet limit of {max_packet}: send a smaller batch, or use the HTTP endpoint",
            body.len()
        );
        body = serde_json::to_vec(&InferError { id: answer.id, error, code: ErrorCode::TooLarge }).unwrap_or_default();
    }
    out.send(Outgoing { topic, payload: body, retain: false, reliable: request.reliable(), correlation });
}

/// Where an answer goes: the reply topic the request asked for (MQTT 5
/// response topic or `reply_to`) if it is publishable and under one of the
/// reply prefixes (or is `predictions` itself), `predictions` when it asked
/// for none; `Err` (the refusal's message) otherwise.
pub(crate) fn reply_topic(asked: Option<&str>, predictions: &str, prefixes: &[String]) -> Result<String, String> {
    match asked {
        None => Ok(predictions.to_string()),
        Some(t) if valid_reply_topic(t) && (t == predictions || prefixes.iter().any(|p| t.starts_with(p.as_str()))) => {
            Ok(t.to_string())
        }
        Some(t) => Err(format!(
            "reply topic {} refused: answers go only to topics under {} (mqtt.reply_prefixes) or to {predictions}",
            outpost_protocol::error::excerpt(t, 120),
            prefixes.join(", ")
        )),
    }
}

/// A reply topic must be publishable: no wildcards, not empty.
fn valid_reply_topic(t: &str) -> bool {
    !t.is_empty() && t.len() <= 1024 && !t.contains(['+', '#', '\0'])
}

#[cfg(test)]
mod tests {
    #[test]
    fn reply_topics_must_be_publishable() {
        assert!(super::valid_reply_topic("clients/7/answers"));
        for t in ["", "a/+/b", "a/#", "a\0b"] {
            assert!(!super::valid_reply_topic(t), "{t:?}");
        }
    }
}
