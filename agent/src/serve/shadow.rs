//! Shadow scoring: a candidate version runs beside the active one on a
//! sampled share of live requests. Its answers are compared with the
//! active model's and never returned: top-1 agreement (the arg max of each
//! row of the first numeric output), the largest absolute difference over
//! every numeric output both return, and both latencies. One candidate run
//! at a time, on a blocking thread after the client has its answer: a
//! sampled request that finds the candidate busy is skipped (counted), so
//! scoring never queues or slows live traffic by more than one core.

use super::latency::Latencies;
use super::model::{InferFailure, Model};
use outpost_protocol::telemetry::{ModelId, ShadowStats};
use outpost_protocol::{InferRequest, InferResponse, OutData};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct Shadow {
    pub model: Arc<Model>,
    pub rate: f64,
    /// The deployment that asked for it (its events name it).
    pub deployment_id: String,
    pub revision: u64,
    busy: AtomicBool,
    tally: Mutex<Tally>,
    latency: Latencies,
    active_latency: Latencies,
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    compared: u64,
    rows: u64,
    top1_agree: u64,
    max_abs_diff: f64,
    errors: u64,
    skipped: u64,
}

/// The candidate, claimed for one run (taken before the request is even
/// copied); dropping it, after the run or instead of it, frees the candidate.
pub struct Claim(Arc<Shadow>);

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

impl Claim {
    /// Runs the candidate on a sampled request the active model answered
    /// (`active` in `active_us`), off the caller's thread.
    pub fn score(self, req: InferRequest, active: InferResponse, active_us: u64) {
        tokio::task::spawn_blocking(move || {
            let me = &self.0;
            let t = std::time::Instant::now();
            let candidate = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| me.model.infer(&req)))
                .unwrap_or_else(|_| {
                    Err(InferFailure::new(outpost_protocol::ErrorCode::Internal, "the candidate panicked"))
                });
            me.record(&active, active_us, candidate, t.elapsed().as_micros() as u64);
        });
    }
}

impl Shadow {
    pub fn new(model: Arc<Model>, rate: f64, deployment_id: String, revision: u64) -> Shadow {
        Shadow {
            model,
            rate,
            deployment_id,
            revision,
            busy: AtomicBool::new(false),
            tally: Default::default(),
            latency: Default::default(),
            active_latency: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this request is in the sample.
    pub fn sampled(&self) -> bool {
        self.rate > 0.0 && crate::sys::jitter() < self.rate
    }

    /// The candidate for one sampled request, unless its previous run is
    /// still going (the request is then skipped, and counted).
    pub fn claim(self: &Arc<Self>) -> Option<Claim> {
        if self.busy.swap(true, Ordering::AcqRel) {
            self.lock().skipped += 1;
            return None;
        }
        Some(Claim(self.clone()))
    }

    fn record(&self, active: &InferResponse, active_us: u64, candidate: Result<InferResponse, InferFailure>, us: u64) {
        let compared = candidate.map_err(|e| e.message).and_then(|c| compare(active, &c));
        let mut t = self.lock();
        t.compared += 1;
        match compared {
            Ok((rows, agree, diff)) => {
                t.rows += rows;
                t.top1_agree += agree;
                t.max_abs_diff = t.max_abs_diff.max(diff);
                self.latency.record(us);
                self.active_latency.record(active_us);
            }
            Err(why) => {
                t.errors += 1;
                tracing::debug!(candidate = %self.model.version, %why, "shadow run not comparable");
            }
        }
    }

    /// The figures so far.
    pub fn stats(&self) -> ShadowStats {
        let t = *self.lock();
        ShadowStats {
            model: ModelId { name: self.model.name.clone(), version: self.model.version.clone() },
            compared: t.compared,
            rows: t.rows,
            top1_agree: t.top1_agree,
            // Nothing compared yet is no agreement to speak of.
            agreement: if t.rows == 0 { 0.0 } else { t.top1_agree as f64 / t.rows as f64 },
            max_abs_diff: t.max_abs_diff,
            errors: t.errors,
            skipped: t.skipped,
            latency_us: self.latency.peek(),
            active_latency_us: self.active_latency.peek(),
        }
    }
}

/// (rows, rows whose top-1 agrees, largest absolute difference) of two
/// answers to one request, or why they cannot be compared. Outputs are
/// matched by name; string outputs (top-k labels) are not compared.
pub fn compare(active: &InferResponse, candidate: &InferResponse) -> Result<(u64, u64, f64), String> {
    let mut diff: f64 = 0.0;
    let mut top1 = None;
    for a in &active.outputs {
        let OutData::Numbers(av) = &a.data else { continue };
        let Some(c) = candidate.outputs.iter().find(|c| c.name == a.name) else {
            return Err(format!("the candidate has no output '{}'", a.name));
        };
        let OutData::Numbers(cv) = &c.data else { return Err(format!("output '{}' is not numeric", a.name)) };
        if a.shape != c.shape || av.len() != cv.len() {
            return Err(format!("output '{}': shape {:?} against {:?}", a.name, c.shape, a.shape));
        }
        let (av, cv) = (av.to_f64_vec(), cv.to_f64_vec());
        for (x, y) in av.iter().zip(&cv) {
            // Equal (the same infinity included) is no difference; NaN on
            // one side only is as far apart as answers get.
            let d = match (x == y, x.is_nan() && y.is_nan()) {
                (true, _) | (false, true) => 0.0,
                _ => (x - y).abs(),
            };
            diff = diff.max(if d.is_nan() { f64::INFINITY } else { d });
        }
        if top1.is_none() {
            let row = a.shape.last().copied().unwrap_or(av.len()).max(1);
            // The class of each row; a row with a non-finite score has none
            // (it never agrees).
            let argmax = |v: &[f64]| {
                v.chunks(row)
                    .map(|r| {
                        r.iter().all(|x| x.is_finite()).then(|| {
                            r.iter()
                                .enumerate()
                                .fold((0, f64::NEG_INFINITY), |b, (i, x)| if *x > b.1 { (i, *x) } else { b })
                                .0
                        })
                    })
                    .collect::<Vec<_>>()
            };
            let (a, c) = (argmax(&av), argmax(&cv));
            let agree = a.iter().zip(&c).filter(|(x, y)| x.is_some() && x == y).count();
            top1 = Some((a.len() as u64, agree as u64));
        }
    }
    match top1 {
        Some((rows, agree)) => Ok((rows, agree, diff)),
        None => Err("no numeric output to compare".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::{TensorData, TensorOut};

    fn answer(rows: Vec<f32>, labels: bool) -> InferResponse {
        let mut outputs = vec![TensorOut {
            name: "p".into(),
            shape: vec![rows.len() / 3, 3],
            datatype: "FP32".into(),
            data: OutData::Numbers(TensorData::F32(rows)),
        }];
        if labels {
            outputs.push(TensorOut {
                name: "p_top_k".into(),
                shape: vec![1, 1],
                datatype: "BYTES".into(),
                data: OutData::Strings(vec!["x".into()]),
            });
        }
        InferResponse { id: None, model_name: "m".into(), model_version: "1".into(), outputs, parameters: None }
    }

    #[test]
    fn agreement_is_the_arg_max_of_every_row_and_the_difference_the_largest() {
        let a = answer(vec![0.1, 0.7, 0.2, 0.5, 0.3, 0.2], true);
        let same_top = answer(vec![0.2, 0.6, 0.2, 0.6, 0.3, 0.1], false);
        let (rows, agree, diff) = compare(&a, &same_top).unwrap();
        assert_eq!((rows, agree), (2, 2));
        assert!((diff - 0.1).abs() < 1e-6, "{diff}");
        let second_row_differs = answer(vec![0.1, 0.7, 0.2, 0.2, 0.3, 0.5], false);
        assert_eq!(compare(&a, &second_row_differs).unwrap().1, 1);
        let nan = answer(vec![f32::NAN, 0.7, 0.2, 0.5, 0.3, 0.2], false);
        let (_, agree, diff) = compare(&a, &nan).unwrap();
        assert_eq!((agree, diff), (1, f64::INFINITY), "a row with a NaN never agrees");
        // An all-NaN answer agrees with nothing, not with class 0.
        let skewed = answer(vec![0.9, 0.05, 0.05, 0.8, 0.1, 0.1], false);
        assert_eq!(compare(&skewed, &answer(vec![f32::NAN; 6], false)).unwrap().1, 0);
        // The same infinity on both sides is no difference.
        let inf = answer(vec![f32::INFINITY, 0.7, 0.2, 0.5, 0.3, 0.2], false);
        assert_eq!(compare(&inf, &inf).unwrap().2, 0.0);
        let other_shape = answer(vec![0.1, 0.7, 0.2], false);
        assert!(compare(&a, &other_shape).unwrap_err().contains("shape"));
        let mut renamed = a.clone();
        renamed.outputs[0].name = "q".into();
        assert!(compare(&a, &renamed).unwrap_err().contains("no output 'p'"));
    }
}
