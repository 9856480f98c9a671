//! Health judgement of a stage, without I/O: telemetry figures summed over a
//! soak, events that end a stage at once, and the shadow gate.
//!
//! - A device's **error rate** is its `errors / requests` summed over the
//!   telemetry reports of the soak (each report counts its own interval).
//! - Its **p99** over several reports is the request-weighted mean of the
//!   reports' p99s (percentiles of separate intervals cannot be merged
//!   exactly; a mean weighted by traffic follows the busy intervals).
//! - Both are judged only from `min_requests` requests on: a device with no
//!   traffic, or too little, is named as not judged instead.

use outpost_protocol::telemetry::{InferenceStats, ShadowStats};
use outpost_protocol::{DeploymentEvent, ErrorCode, Phase};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The limits of `--max-error-rate`, `--max-p99-ratio`, `--min-agreement`
/// and `--min-requests`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Highest share of requests a device may answer with an error during the soak.
    pub max_error_rate: Option<f64>,
    /// Highest p99 as a multiple of the p99 the same device had on the previous version.
    pub max_p99_ratio: Option<f64>,
    /// Requests (or shadow comparisons) a device needs before its figures are judged.
    pub min_requests: u64,
    /// Lowest top-1 agreement of the candidate in shadow, when the stage runs a shadow step.
    pub min_agreement: Option<f64>,
    /// Devices of a stage that may fail (or time out, or stay offline) before it halts.
    #[serde(default)]
    pub max_failed: usize,
    /// Seconds a soaking device may be offline and come back on the same deployment.
    #[serde(default)]
    pub offline_grace_s: f64,
}

impl Limits {
    /// Refuses limits out of range: shares from 0 to 1, a positive ratio.
    pub fn check(&self) -> Result<(), String> {
        for (what, v) in [("max_error_rate", self.max_error_rate), ("min_agreement", self.min_agreement)] {
            if let Some(x) = v
                && !(0.0..=1.0).contains(&x)
            {
                return Err(format!("{what}: expected a share from 0 to 1, found {x}"));
            }
        }
        if let Some(r) = self.max_p99_ratio
            && !(r > 0.0 && r.is_finite())
        {
            return Err(format!("max_p99_ratio: expected a positive multiple, found {r}"));
        }
        if !(self.offline_grace_s.is_finite() && (0.0..=86_400.0).contains(&self.offline_grace_s)) {
            return Err(format!("offline_grace_s: expected 0 to 86400 seconds, found {}", self.offline_grace_s));
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_error_rate: None,
            max_p99_ratio: None,
            min_requests: 20,
            min_agreement: None,
            max_failed: 0,
            offline_grace_s: 60.0,
        }
    }
}

/// What halted a stage: which device, which figure, against which limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Breach {
    pub device: String,
    /// `failed`, `rolled_back`, `not_applied`, `refused`, `timeout`, `offline`,
    /// `error_rate`, `p99_ratio`, `agreement`, `shadow_errors`, `no_evidence`.
    pub check: String,
    /// The whole story in words, device first.
    pub message: String,
}

impl fmt::Display for Breach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Breach {
    pub fn new(device: &str, check: &str, message: String) -> Breach {
        Breach { device: device.into(), check: check.into(), message }
    }
}

/// A device's traffic summed over telemetry reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    pub requests: u64,
    pub errors: u64,
    /// Sum of each report's p99 (µs) times its requests: [`Traffic::p99_us`] divides.
    pub p99_weight: u128,
    pub reports: u64,
}

/// The most requests one telemetry report is believed to count: a report
/// over it is clamped (figures come from whoever can publish on the
/// device's topic; sums must neither overflow nor be swamped).
pub const MAX_REPORT_REQUESTS: u64 = 1_000_000_000;
/// The highest p99 one report is believed to carry (an hour, in µs).
pub const MAX_REPORT_P99_US: u64 = 3_600_000_000;

impl Traffic {
    /// Adds one telemetry report (its counts are for its own interval).
    /// The errors counted are the model's own (`model_errors`) when the
    /// agent reports them, else every error (older agents): a client's bad
    /// input is not the candidate's fault. Counts are clamped to what one
    /// report can plausibly hold, and sums saturate.
    pub fn add(&mut self, s: &InferenceStats) {
        let requests = s.requests.min(MAX_REPORT_REQUESTS);
        let errors = s.model_errors.unwrap_or(s.errors).min(requests);
        let p99 = s.latency_us.p99.min(MAX_REPORT_P99_US);
        self.requests = self.requests.saturating_add(requests);
        self.errors = self.errors.saturating_add(errors).min(self.requests);
        self.p99_weight = self.p99_weight.saturating_add(u128::from(p99) * u128::from(requests));
        self.reports = self.reports.saturating_add(1);
    }

    /// The request-weighted mean of the reports' p99 (None without requests).
    pub fn p99_us(&self) -> Option<u64> {
        (self.requests > 0).then(|| (self.p99_weight / u128::from(self.requests)) as u64)
    }

    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }
}

/// What a stage's soak showed, device by device and in all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SoakVerdict {
    pub breach: Option<Breach>,
    /// Devices whose figures were not judged, and why.
    pub not_judged: Vec<String>,
    pub requests: u64,
    pub errors: u64,
    /// The stage's p99 (request-weighted over its devices), µs.
    pub p99_us: Option<u64>,
    /// The same devices' p99 on the previous version, µs.
    pub baseline_p99_us: Option<u64>,
    /// The highest device p99 / its own previous p99 among judged devices.
    pub worst_p99_ratio: Option<f64>,
}

/// A latency in words: `850 µs`, `1.30 ms`, `2.10 s`.
pub fn latency(us: u64) -> String {
    match us {
        0..1000 => format!("{us} µs"),
        1000..1_000_000 => format!("{:.2} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

fn percent(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// Judges a soak: each device's traffic against the limits; `baseline`
/// holds each device's p99 on the previous version (µs), when measured.
/// The first breach by device name wins (deterministic).
pub fn judge_soak(
    traffic: &BTreeMap<String, Traffic>,
    baseline: &BTreeMap<String, u64>,
    limits: &Limits,
) -> SoakVerdict {
    let mut v = SoakVerdict::default();
    let (mut weight, mut base_weight, mut base_requests) = (0u128, 0u128, 0u64);
    // Without a limit on them, the figures are reported, not judged: nothing to say.
    let limited = limits.max_error_rate.is_some() || limits.max_p99_ratio.is_some();
    let mut judged = 0usize;
    for (device, t) in traffic {
        v.requests = v.requests.saturating_add(t.requests);
        v.errors = v.errors.saturating_add(t.errors).min(v.requests);
        weight = weight.saturating_add(t.p99_weight);
        if !limited {
            continue;
        }
        if t.reports == 0 {
            v.not_judged.push(format!(
                "{device}: no telemetry during the soak (a soak shorter than two of its telemetry intervals?): error rate and p99 not judged"
            ));
            continue;
        }
        if t.requests == 0 {
            v.not_judged.push(format!("{device}: no requests during the soak: error rate and p99 not judged"));
            continue;
        }
        if t.requests < limits.min_requests {
            v.not_judged.push(format!(
                "{device}: {} request(s) during the soak, fewer than --min-requests {}: error rate and p99 not judged",
                t.requests, limits.min_requests
            ));
            continue;
        }
        judged += 1;
        let rate = t.errors as f64 / t.requests as f64;
        if let Some(max) = limits.max_error_rate
            && rate > max
            && v.breach.is_none()
        {
            v.breach = Some(Breach::new(
                device,
                "error_rate",
                format!(
                    "{device}: error rate {} ({} error(s) in {} requests) over --max-error-rate {}",
                    percent(rate),
                    t.errors,
                    t.requests,
                    percent(max)
                ),
            ));
        }
        let p99 = t.p99_us().unwrap_or(0);
        match baseline.get(device) {
            Some(&before) => {
                base_weight = base_weight.saturating_add(u128::from(before) * u128::from(t.requests));
                base_requests = base_requests.saturating_add(t.requests);
                let ratio = p99 as f64 / (before.max(1)) as f64;
                v.worst_p99_ratio = Some(v.worst_p99_ratio.map_or(ratio, |w: f64| w.max(ratio)));
                if let Some(max) = limits.max_p99_ratio
                    && ratio > max
                    && v.breach.is_none()
                {
                    v.breach = Some(Breach::new(
                        device,
                        "p99_ratio",
                        format!(
                            "{device}: p99 {} is {ratio:.2}x its {} on the previous version, over --max-p99-ratio {max}",
                            latency(p99),
                            latency(before)
                        ),
                    ));
                }
            }
            None if limits.max_p99_ratio.is_some() => v.not_judged.push(format!(
                "{device}: no p99 on the previous version to compare with (too little traffic before it moved): p99 not judged"
            )),
            None => {}
        }
    }
    // The stage as a whole: many devices each under --min-requests can
    // together show an error rate no single one could.
    let combined = limited && v.requests >= limits.min_requests.max(1);
    if combined
        && let Some(max) = limits.max_error_rate
        && v.breach.is_none()
    {
        let rate = v.errors as f64 / v.requests as f64;
        if rate > max {
            let device = traffic.keys().next().cloned().unwrap_or_default();
            v.breach = Some(Breach::new(
                &device,
                "error_rate",
                format!(
                    "the stage's {} device(s): error rate {} ({} error(s) in {} requests) over --max-error-rate {}",
                    traffic.len(),
                    percent(rate),
                    v.errors,
                    v.requests,
                    percent(max)
                ),
            ));
        }
    }
    if limited && judged == 0 && !combined && v.breach.is_none() && !traffic.is_empty() {
        let device = traffic.keys().next().cloned().unwrap_or_default();
        v.breach = Some(Breach::new(
            &device,
            "no_evidence",
            format!(
                "no device of the stage served {} request(s) during the soak ({} in all): the limits cannot be judged, so the stage does not pass (is there traffic? lower --min-requests, lengthen --soak, or drop the limits)",
                limits.min_requests.max(1),
                v.requests
            ),
        ));
    }
    if v.requests > 0 {
        v.p99_us = Some((weight / u128::from(v.requests)) as u64);
    }
    if base_requests > 0 {
        v.baseline_p99_us = Some((base_weight / u128::from(base_requests)) as u64);
    }
    v
}

/// A device's p99 on the previous version, when it had `min_requests` to measure it by.
pub fn baseline_p99(t: &Traffic, limits: &Limits) -> Option<u64> {
    (t.requests >= limits.min_requests.max(1)).then(|| t.p99_us()).flatten()
}

/// What one event of a stage device means for the deployment `id` it is
/// judged on: a breach (the deployment failed, was rolled back, was not
/// applied, or the device refused an unverified desired state), or nothing.
/// `active` and events of other deployments are not breaches.
pub fn judge_event(ev: &DeploymentEvent, id: &str) -> Option<Breach> {
    let words = || {
        let mut w = ev.phase.as_str().to_string();
        if let Some(e) = &ev.error {
            w.push_str(&format!(": {}: {}", e.code, e.message));
        }
        if let Some(d) = &ev.detail {
            w.push_str(&format!(" ({d})"));
        }
        w
    };
    let d = &ev.device;
    if ev.deployment_id.is_empty() && ev.phase == Phase::Failed {
        // A device that verifies signatures reports a refused message under
        // no deployment id (a forged copy must not fail a real deployment).
        let unverified = ev
            .error
            .as_ref()
            .is_some_and(|e| matches!(e.code, ErrorCode::SignatureRequired | ErrorCode::SignatureInvalid));
        return unverified
            .then(|| Breach::new(d, "refused", format!("{d} refused the desired state of {id}: {}", words())));
    }
    if ev.deployment_id != id {
        return None;
    }
    match ev.phase {
        Phase::Failed if ev.error.as_ref().is_some_and(|e| e.code == ErrorCode::StaleRevision) => {
            Some(stale_revision(d, id, &words()))
        }
        Phase::Failed => Some(Breach::new(d, "failed", format!("{d} failed {id}: {}", words()))),
        Phase::RolledBack => Some(Breach::new(d, "rolled_back", format!("{d} rolled {id} back: {}", words()))),
        Phase::Superseded | Phase::Undeployed => Some(Breach::new(
            d,
            "not_applied",
            format!("{d} did not apply {id}: {} (another desired state replaced it)", words()),
        )),
        _ => None,
    }
}

/// The rows one shadow request is believed to hold at most (a batch).
pub const MAX_ROWS_PER_REQUEST: u64 = 4096;

/// What a device's shadow statistics gained since its previous report of
/// the same candidate (they are cumulative): `None` for a report to drop,
/// one whose counts are inconsistent or jump past what one interval can
/// hold. A report below the previous one (the candidate restarted) counts
/// from zero.
pub fn shadow_delta(last: Option<&ShadowStats>, now: &ShadowStats) -> Option<ShadowStats> {
    let consistent = now.top1_agree <= now.rows
        && now.errors <= now.compared
        && now.rows <= now.compared.saturating_mul(MAX_ROWS_PER_REQUEST)
        && now.max_abs_diff.is_finite();
    if !consistent {
        return None;
    }
    let base = match last {
        Some(l)
            if now.compared >= l.compared
                && now.rows >= l.rows
                && now.top1_agree >= l.top1_agree
                && now.errors >= l.errors =>
        {
            l.clone()
        }
        _ => ShadowStats::default(),
    };
    let d = ShadowStats {
        model: now.model.clone(),
        compared: now.compared - base.compared,
        rows: now.rows - base.rows,
        top1_agree: now.top1_agree - base.top1_agree,
        errors: now.errors - base.errors,
        skipped: now.skipped.saturating_sub(base.skipped),
        max_abs_diff: now.max_abs_diff,
        ..Default::default()
    };
    if d.compared > MAX_REPORT_REQUESTS || d.top1_agree > d.rows || d.errors > d.compared {
        return None;
    }
    Some(d)
}

/// Adds a [`shadow_delta`] to a device's sum over the step.
pub fn add_shadow(sum: &mut ShadowStats, d: &ShadowStats) {
    sum.model = d.model.clone();
    sum.compared = sum.compared.saturating_add(d.compared);
    sum.rows = sum.rows.saturating_add(d.rows);
    sum.top1_agree = sum.top1_agree.saturating_add(d.top1_agree).min(sum.rows);
    sum.errors = sum.errors.saturating_add(d.errors).min(sum.compared);
    sum.skipped = sum.skipped.saturating_add(d.skipped);
    sum.max_abs_diff = sum.max_abs_diff.max(d.max_abs_diff);
    sum.agreement = if sum.rows == 0 { 0.0 } else { sum.top1_agree as f64 / sum.rows as f64 };
}

/// A device refused the rollout's desired state as older than one it saw:
/// a clock or revision problem, not the candidate's fault.
pub fn stale_revision(d: &str, id: &str, words: &str) -> Breach {
    Breach::new(
        d,
        "stale_revision",
        format!(
            "{d} refused {id} as stale ({words}): it remembers a higher revision than the rollout's, which comes from this machine's clock; not the candidate's fault: set the clock right (or withdraw the device's topic) and run the rollout again"
        ),
    )
}

/// What the shadow step of a stage showed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowVerdict {
    pub breach: Option<Breach>,
    pub not_judged: Vec<String>,
    /// The lowest agreement among judged devices.
    pub agreement: Option<f64>,
    /// Requests compared on the stage's devices in all.
    pub compared: u64,
}

/// Judges the shadow step: every device whose candidate ran on
/// `min_requests` requests must agree with the serving version on the
/// top-1 class of `min_agreement` of the rows compared, and (with
/// `max_error_rate`) fail no more than that share of its runs; at least one
/// device must have been judged, else there is no evidence and the stage
/// halts. `latest` holds each device's last (cumulative) statistics for
/// the candidate. Agreement is computed from the counts, not taken from the
/// device's own `agreement`.
pub fn judge_shadow(latest: &BTreeMap<String, Option<ShadowStats>>, limits: &Limits) -> ShadowVerdict {
    let mut v = ShadowVerdict::default();
    let min = limits.min_agreement.unwrap_or(0.0);
    let need = limits.min_requests.max(1);
    let mut judged = false;
    for (device, stats) in latest {
        let Some(s) = stats else {
            v.not_judged.push(format!("{device}: no shadow statistics for the candidate: agreement not judged"));
            continue;
        };
        v.compared = v.compared.saturating_add(s.compared);
        if s.compared < need {
            v.not_judged.push(format!(
                "{device}: the candidate ran on {} request(s) in shadow, fewer than --min-requests {need}: agreement not judged",
                s.compared
            ));
            continue;
        }
        judged = true;
        let failed = s.errors as f64 / s.compared as f64;
        let agreement = (s.rows > 0).then(|| s.top1_agree as f64 / s.rows as f64);
        if let Some(a) = agreement {
            v.agreement = Some(v.agreement.map_or(a, |x: f64| x.min(a)));
        }
        if v.breach.is_some() {
            continue;
        }
        let too_many_errors = limits.max_error_rate.is_some_and(|max| failed > max);
        v.breach = match agreement {
            _ if too_many_errors || s.rows == 0 => Some(Breach::new(
                device,
                "shadow_errors",
                format!(
                    "{device}: the candidate failed {} of {} runs in shadow{}",
                    s.errors,
                    s.compared,
                    match limits.max_error_rate {
                        Some(max) if too_many_errors => format!(", over --max-error-rate {}", percent(max)),
                        _ => ": nothing could be compared".into(),
                    }
                ),
            )),
            Some(a) if a < min => Some(Breach::new(
                device,
                "agreement",
                format!(
                    "{device}: the candidate agreed with the serving version on {} of {} rows in shadow ({}), under --min-agreement {} (largest difference {:.3e})",
                    s.top1_agree,
                    s.rows,
                    percent(a),
                    percent(min),
                    s.max_abs_diff
                ),
            )),
            _ => None,
        };
    }
    if !judged {
        let device = latest.keys().next().cloned().unwrap_or_default();
        v.breach = Some(Breach::new(
            &device,
            "no_evidence",
            format!(
                "no device of the stage ran the candidate on {need} request(s) in shadow during the soak: agreement cannot be judged (is there traffic? does the agent score shadows?)"
            ),
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::ErrorInfo;
    use outpost_protocol::telemetry::{Latency, ModelId};

    fn report(requests: u64, errors: u64, p99: u64) -> InferenceStats {
        InferenceStats {
            requests,
            errors,
            rejected: 0,
            latency_us: Latency { p50: p99 / 2, p90: p99, p99, max: p99 },
            ..Default::default()
        }
    }

    #[test]
    fn device_supplied_counts_cannot_overflow() {
        let mut t = Traffic::default();
        for _ in 0..3 {
            t.add(&report(u64::MAX, u64::MAX, u64::MAX));
        }
        assert!(t.requests >= t.errors, "{t:?}");
        let soak = BTreeMap::from([("cam-0".to_string(), t), ("cam-1".to_string(), t)]);
        let base = BTreeMap::from([("cam-0".to_string(), u64::MAX), ("cam-1".to_string(), u64::MAX)]);
        let v = judge_soak(&soak, &base, &limits());
        assert!(v.requests >= v.errors);
        let big = Some(ShadowStats { compared: u64::MAX, rows: u64::MAX, top1_agree: u64::MAX, ..Default::default() });
        let v = judge_shadow(&BTreeMap::from([("a".to_string(), big.clone()), ("b".to_string(), big)]), &limits());
        assert!(v.compared > 0);
    }

    #[test]
    fn a_soak_with_limits_and_no_judged_device_halts() {
        // No device had enough traffic: there is no evidence the candidate is healthy.
        let soak = BTreeMap::from([
            ("cam-0".to_string(), traffic(&[(3, 0, 1000)])),
            ("cam-1".to_string(), traffic(&[(0, 0, 0)])),
        ]);
        let b = judge_soak(&soak, &BTreeMap::new(), &limits()).breach.expect("no evidence is a breach");
        assert_eq!(b.check, "no_evidence");
        // Without limits, nothing to judge: passes.
        assert_eq!(judge_soak(&soak, &BTreeMap::new(), &Limits::default()).breach, None);
    }

    #[test]
    fn the_stage_s_combined_figures_are_judged_too() {
        // 100 devices of 10 requests at 50% errors: each under --min-requests, together 1,000 requests.
        let soak: BTreeMap<String, Traffic> =
            (0..100).map(|i| (format!("cam-{i:03}"), traffic(&[(10, 5, 1000)]))).collect();
        let b = judge_soak(&soak, &BTreeMap::new(), &Limits { max_p99_ratio: None, ..limits() }).breach.unwrap();
        assert_eq!(b.check, "error_rate");
        assert!(b.message.starts_with("the stage's 100 device(s): error rate 50.0%"), "{}", b.message);
    }

    #[test]
    fn model_errors_are_judged_when_reported_not_client_errors() {
        let mut r = report(100, 40, 1000);
        r.model_errors = Some(1);
        let mut t = Traffic::default();
        t.add(&r);
        let soak = BTreeMap::from([("cam-0".to_string(), t)]);
        let v = judge_soak(&soak, &BTreeMap::new(), &Limits { max_p99_ratio: None, ..limits() });
        assert_eq!(v.breach, None, "40 client errors, 1 model error: {v:?}");
        // An older agent without model_errors: all its errors count.
        let soak = BTreeMap::from([("cam-0".to_string(), traffic(&[(100, 40, 1000)]))]);
        assert_eq!(judge_soak(&soak, &BTreeMap::new(), &limits()).breach.unwrap().check, "error_rate");
    }

    fn traffic(reports: &[(u64, u64, u64)]) -> Traffic {
        let mut t = Traffic::default();
        for &(r, e, p) in reports {
            t.add(&report(r, e, p));
        }
        t
    }

    fn limits() -> Limits {
        Limits {
            max_error_rate: Some(0.05),
            max_p99_ratio: Some(2.0),
            min_requests: 20,
            min_agreement: Some(0.95),
            ..Limits::default()
        }
    }

    #[test]
    fn traffic_sums_intervals_and_weights_p99_by_requests() {
        let t = traffic(&[(30, 1, 1000), (10, 1, 3000), (0, 0, 0)]);
        assert_eq!((t.requests, t.errors, t.reports), (40, 2, 3));
        assert_eq!(t.p99_us(), Some(1500), "(30 x 1000 + 10 x 3000) / 40");
        assert_eq!(t.error_rate(), Some(0.05));
        assert_eq!(Traffic::default().p99_us(), None);
    }

    #[test]
    fn a_healthy_soak_passes_and_says_which_devices_were_not_judged() {
        let mut soak = BTreeMap::new();
        soak.insert("cam-0".to_string(), traffic(&[(50, 1, 1200), (50, 0, 1400)]));
        soak.insert("cam-1".to_string(), traffic(&[(0, 0, 0)]));
        soak.insert("cam-2".to_string(), traffic(&[(5, 0, 900)]));
        soak.insert("cam-3".to_string(), traffic(&[(40, 0, 1000)]));
        soak.insert("cam-4".to_string(), Traffic::default());
        let baseline = BTreeMap::from([("cam-0".to_string(), 1000), ("cam-2".to_string(), 800)]);
        let v = judge_soak(&soak, &baseline, &limits());
        assert_eq!(v.breach, None, "{v:?}");
        assert_eq!((v.requests, v.errors), (145, 1));
        assert_eq!(v.worst_p99_ratio, Some(1.3));
        assert_eq!(v.baseline_p99_us, Some(1000));
        assert_eq!(v.not_judged.len(), 4, "{:?}", v.not_judged);
        assert!(v.not_judged[0].starts_with("cam-1: no requests during the soak"), "{:?}", v.not_judged);
        assert!(v.not_judged[1].starts_with("cam-2: 5 request(s) during the soak, fewer than --min-requests 20"));
        assert!(v.not_judged[2].starts_with("cam-3: no p99 on the previous version"));
        assert!(v.not_judged[3].starts_with("cam-4: no telemetry during the soak"));
    }

    #[test]
    fn an_error_rate_over_the_limit_names_the_device_and_the_figure() {
        let mut soak = BTreeMap::new();
        soak.insert("cam-0".to_string(), traffic(&[(100, 2, 1000)]));
        soak.insert("cam-1".to_string(), traffic(&[(30, 3, 1000), (10, 1, 1000)]));
        let v = judge_soak(&soak, &BTreeMap::new(), &Limits { max_p99_ratio: None, ..limits() });
        let b = v.breach.unwrap();
        assert_eq!((b.device.as_str(), b.check.as_str()), ("cam-1", "error_rate"));
        assert_eq!(b.message, "cam-1: error rate 10.0% (4 error(s) in 40 requests) over --max-error-rate 5.0%");
        // Without a limit, the same figures pass, and a device without traffic is not worth a word.
        soak.insert("cam-2".to_string(), Traffic::default());
        let v = judge_soak(&soak, &BTreeMap::new(), &Limits::default());
        assert_eq!((v.breach, v.requests, v.errors), (None, 140, 6));
        assert!(v.not_judged.is_empty(), "{:?}", v.not_judged);
    }

    #[test]
    fn a_p99_over_the_ratio_of_the_previous_version_is_a_breach() {
        let soak = BTreeMap::from([("cam-0".to_string(), traffic(&[(40, 0, 2500)]))]);
        let baseline = BTreeMap::from([("cam-0".to_string(), 1000)]);
        let b = judge_soak(&soak, &baseline, &limits()).breach.unwrap();
        assert_eq!(b.check, "p99_ratio");
        assert_eq!(
            b.message,
            "cam-0: p99 2.50 ms is 2.50x its 1.00 ms on the previous version, over --max-p99-ratio 2"
        );
        // Exactly at the limit passes.
        let soak = BTreeMap::from([("cam-0".to_string(), traffic(&[(40, 0, 2000)]))]);
        assert_eq!(judge_soak(&soak, &baseline, &limits()).breach, None);
    }

    #[test]
    fn baselines_need_enough_requests() {
        assert_eq!(baseline_p99(&traffic(&[(19, 0, 900)]), &limits()), None);
        assert_eq!(baseline_p99(&traffic(&[(10, 0, 900), (10, 0, 1100)]), &limits()), Some(1000));
        let none = Limits { min_requests: 0, ..limits() };
        assert_eq!(baseline_p99(&Traffic::default(), &none), None, "no requests: no p99, whatever the minimum");
    }

    fn event(device: &str, id: &str, phase: Phase, error: Option<ErrorCode>) -> DeploymentEvent {
        DeploymentEvent {
            schema: outpost_protocol::event::SCHEMA.into(),
            device: device.into(),
            deployment_id: id.into(),
            revision: 1,
            seq: 1,
            at: "2026-01-01T00:00:00Z".into(),
            phase,
            progress: None,
            error: error.map(|c| ErrorInfo::new(c, "why")),
            detail: None,
            timings_ms: None,
            slot: None,
            shadow: None,
            backend: None,
        }
    }

    #[test]
    fn a_stale_revision_is_not_blamed_on_the_candidate() {
        let b = judge_event(&event("cam-0", "d", Phase::Failed, Some(ErrorCode::StaleRevision)), "d").unwrap();
        assert_eq!(b.check, "stale_revision");
        assert!(b.message.contains("not the candidate's fault") && b.message.contains("clock"), "{}", b.message);
    }

    #[test]
    fn failures_rollbacks_and_refusals_end_a_stage() {
        let b = judge_event(&event("cam-0", "d", Phase::Failed, Some(ErrorCode::ValidationFailed)), "d").unwrap();
        assert_eq!((b.device.as_str(), b.check.as_str()), ("cam-0", "failed"));
        assert_eq!(b.message, "cam-0 failed d: failed: validation_failed: why");
        let b = judge_event(&event("cam-1", "d", Phase::RolledBack, Some(ErrorCode::ProbationFailed)), "d").unwrap();
        assert_eq!(b.check, "rolled_back");
        assert_eq!(judge_event(&event("cam-1", "d", Phase::Superseded, None), "d").unwrap().check, "not_applied");
        let refused = event("cam-2", "", Phase::Failed, Some(ErrorCode::SignatureInvalid));
        assert_eq!(judge_event(&refused, "d").unwrap().check, "refused");
        // Progress, success, other deployments and other refusals are not breaches.
        for ok in [
            event("cam-0", "d", Phase::Downloading, None),
            event("cam-0", "d", Phase::Active, None),
            event("cam-0", "other", Phase::Failed, Some(ErrorCode::DigestMismatch)),
            event("cam-0", "", Phase::Failed, Some(ErrorCode::InvalidMessage)),
        ] {
            assert_eq!(judge_event(&ok, "d"), None, "{ok:?}");
        }
    }

    /// Statistics of `compared` requests of one row each, `errors` of which failed.
    fn shadow(compared: u64, agree: u64, errors: u64) -> Option<ShadowStats> {
        let rows = compared - errors;
        Some(ShadowStats {
            model: ModelId { name: "digits".into(), version: "2".into() },
            compared,
            rows,
            top1_agree: agree,
            agreement: if rows == 0 { 1.0 } else { agree as f64 / rows as f64 },
            max_abs_diff: 0.25,
            errors,
            ..Default::default()
        })
    }

    #[test]
    fn the_shadow_gate_needs_agreement_from_devices_with_comparisons() {
        let l = limits();
        let ok = BTreeMap::from([
            ("cam-0".to_string(), shadow(100, 99, 0)),
            ("cam-1".to_string(), shadow(3, 0, 0)),
            ("cam-2".to_string(), None),
        ]);
        let v = judge_shadow(&ok, &l);
        assert_eq!(v.breach, None, "{v:?}");
        assert_eq!(v.agreement, Some(0.99));
        assert_eq!(v.compared, 103);
        assert_eq!(v.not_judged.len(), 2, "{:?}", v.not_judged);
        assert!(v.not_judged[0].starts_with("cam-1: the candidate ran on 3 request(s) in shadow, fewer than"));

        let low = BTreeMap::from([("cam-0".to_string(), shadow(100, 99, 0)), ("cam-1".to_string(), shadow(50, 40, 0))]);
        let b = judge_shadow(&low, &l).breach.unwrap();
        assert_eq!((b.device.as_str(), b.check.as_str()), ("cam-1", "agreement"));
        assert_eq!(
            b.message,
            "cam-1: the candidate agreed with the serving version on 40 of 50 rows in shadow (80.0%), under --min-agreement 95.0% (largest difference 2.500e-1)"
        );

        // Batches: agreement is over rows, whatever the number of requests.
        let mut batches = shadow(20, 0, 0);
        if let Some(s) = batches.as_mut() {
            (s.rows, s.top1_agree) = (400, 396);
        }
        assert_eq!(judge_shadow(&BTreeMap::from([("cam-0".to_string(), batches)]), &l).agreement, Some(0.99));

        // The reported `agreement` is not trusted over the counts it comes from.
        let mut forged = shadow(50, 10, 0);
        if let Some(s) = forged.as_mut() {
            s.agreement = 1.0;
        }
        assert_eq!(
            judge_shadow(&BTreeMap::from([("cam-0".to_string(), forged)]), &l).breach.unwrap().check,
            "agreement"
        );
    }

    #[test]
    fn shadow_figures_are_summed_deltas_of_plausible_reports() {
        let st = |compared, rows, agree| ShadowStats { compared, rows, top1_agree: agree, ..Default::default() };
        let mut sum = ShadowStats::default();
        let mut last: Option<ShadowStats> = None;
        for r in [st(10, 10, 2), st(30, 30, 4), st(u64::MAX, 1000, 1000), st(20, 20, 20), st(40, 40, 22)] {
            if let Some(d) = shadow_delta(last.as_ref(), &r) {
                add_shadow(&mut sum, &d);
                last = Some(r);
            }
        }
        // 10 + 20 (then the implausible claim is dropped), a restart from 20, then 20 more.
        assert_eq!((sum.compared, sum.rows, sum.top1_agree), (70, 70, 26), "{sum:?}");
        assert_eq!(shadow_delta(None, &st(5, 5, 6)), None, "more agreeing rows than rows");
        // One report claiming the largest count no longer wins the gate.
        let v = judge_shadow(&BTreeMap::from([("cam-0".to_string(), Some(sum))]), &limits());
        assert_eq!(v.breach.unwrap().check, "agreement");
    }

    #[test]
    fn a_candidate_that_fails_in_shadow_breaches() {
        let l = limits();
        let failing = BTreeMap::from([("cam-0".to_string(), shadow(50, 40, 10))]);
        let b = judge_shadow(&failing, &l).breach.unwrap();
        assert_eq!(b.check, "shadow_errors");
        assert_eq!(b.message, "cam-0: the candidate failed 10 of 50 runs in shadow, over --max-error-rate 5.0%");
        // Without an error limit, the runs that worked are judged...
        let lenient = Limits { max_error_rate: None, ..l };
        assert_eq!(judge_shadow(&failing, &lenient).breach, None);
        // ... but a candidate that never produced a comparable answer is no evidence of agreement.
        let b = judge_shadow(&BTreeMap::from([("cam-0".to_string(), shadow(30, 0, 30))]), &lenient).breach.unwrap();
        assert_eq!(b.message, "cam-0: the candidate failed 30 of 30 runs in shadow: nothing could be compared");
    }

    #[test]
    fn a_shadow_step_without_comparisons_halts_for_want_of_evidence() {
        let none = BTreeMap::from([("cam-0".to_string(), shadow(0, 0, 0)), ("cam-1".to_string(), None)]);
        let v = judge_shadow(&none, &limits());
        let b = v.breach.unwrap();
        assert_eq!(b.check, "no_evidence");
        assert!(
            b.message.starts_with("no device of the stage ran the candidate on 20 request(s) in shadow"),
            "{}",
            b.message
        );
        assert_eq!(v.not_judged.len(), 2);
    }

    #[test]
    fn latencies_read_in_their_unit() {
        assert_eq!(latency(850), "850 µs");
        assert_eq!(latency(1300), "1.30 ms");
        assert_eq!(latency(2_100_000), "2.10 s");
    }
}
