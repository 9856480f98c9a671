//! The Grafana dashboard shipped in packaging/grafana/: a well-formed
//! dashboard whose every query names metrics, and groups by labels, that a
//! real agent's `/metrics` has; and every Outpost and process metric the agent
//! exports is on some panel.

use super::*;
use std::collections::{BTreeMap, BTreeSet};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/grafana/outpost-dashboard.json");
/// What every panel queries through, so one import picks the data source.
const DATASOURCE: &str = "${DS_PROMETHEUS}";
/// The matcher every selector carries, so the device picker applies to every panel.
const INSTANCE_MATCHER: &str = "instance=~\"$instance\"";
/// Labels Prometheus adds to every series at scrape time: not in `/metrics`.
const TARGET_LABELS: &[&str] = &["instance", "job"];

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// One query of the dashboard: (panel title, PromQL).
fn queries(d: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((p["title"].as_str().unwrap_or_default().to_string(), t["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

/// A Grafana 10 dashboard a user can import: panels with unique ids on the
/// 24-column grid without overlaps, every query through the `DS_PROMETHEUS`
/// data source variable, and a device (`instance`) picker.
fn assert_well_formed(d: &serde_json::Value) {
    for key in ["title", "uid"] {
        assert!(d[key].as_str().is_some_and(|s| !s.is_empty()), "dashboard {key}");
    }
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion of Grafana 9/10: {}",
        d["schemaVersion"]
    );
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no ${name} variable"));
    assert_eq!(
        (var("DS_PROMETHEUS")["type"].as_str(), var("DS_PROMETHEUS")["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    let instance = var("instance");
    assert_eq!(instance["type"], "query");
    assert_eq!(instance["datasource"]["uid"], DATASOURCE);

    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default().to_string();
        assert!(!title.is_empty(), "a panel without a title: {p}");
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no numeric id"));
        assert!(ids.insert(id), "{title}: id {id} is used twice");
        let g = &p["gridPos"];
        let [x, y, w, h] =
            ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap_or_else(|| panic!("{title}: gridPos.{k}")));
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: gridPos {g}");
        for (other, [ox, oy, ow, oh]) in &boxes {
            let apart = x + w <= *ox || ox + ow <= x || y + h <= *oy || oy + oh <= y;
            assert!(apart, "{title} overlaps {other}");
        }
        boxes.push((title.clone(), [x, y, w, h]));
        let kind = p["type"].as_str().unwrap_or_default();
        if kind == "row" {
            assert!(p.get("targets").is_none(), "{title}: a row has no queries");
            continue;
        }
        assert!(
            ["timeseries", "stat", "table", "state-timeline", "bargauge", "gauge"].contains(&kind),
            "{title}: panel type {kind}"
        );
        assert_eq!(
            (p["datasource"]["type"].as_str(), p["datasource"]["uid"].as_str()),
            (Some("prometheus"), Some(DATASOURCE)),
            "{title}"
        );
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()), "{title}: a target without expr");
            assert!(
                refs.insert(t["refId"].as_str().unwrap_or_else(|| panic!("{title}: no refId"))),
                "{title}: refId twice"
            );
            assert_eq!(t["datasource"], p["datasource"], "{title}: a target on another data source");
        }
    }
}

/// A metric selector of a PromQL expression: its metric name and the text
/// between its braces ("" without).
#[derive(Debug, PartialEq, Eq)]
struct Selector {
    name: String,
    matchers: String,
}

/// What a PromQL expression names: its metric selectors, and the labels it
/// groups, joins or matches by.
#[derive(Debug, Default, PartialEq, Eq)]
struct Names {
    selectors: Vec<Selector>,
    labels: BTreeSet<String>,
}

/// Aggregation operators: followed by `(`, `by` or `without`.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Keywords followed by a list of labels in parentheses.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
/// Other words that are not metric names.
const KEYWORDS: &[&str] = &["bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"];

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

/// The index just past the string literal that starts at `i` (", ' or `).
fn skip_string(b: &[u8], i: usize) -> usize {
    let quote = b[i];
    let mut j = i + 1;
    while j < b.len() && b[j] != quote {
        j += if b[j] == b'\\' && quote != b'`' { 2 } else { 1 };
    }
    j + 1
}

/// The text between the `open` at `i` and its `close` (strings skipped),
/// and the index past `close`.
fn enclosed(b: &[u8], i: usize, close: u8) -> (&str, usize) {
    let mut j = i + 1;
    while j < b.len() && b[j] != close {
        j = if matches!(b[j], b'"' | b'\'' | b'`') { skip_string(b, j) } else { j + 1 };
    }
    let end = j.min(b.len());
    (std::str::from_utf8(&b[i + 1..end]).unwrap(), end + 1)
}

/// The label names of matchers like `a="x", b=~"y"`.
fn matcher_labels(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let (mut out, mut i) = (Vec::new(), 0);
    while i < b.len() {
        if matches!(b[i], b'"' | b'\'' | b'`') {
            i = skip_string(b, i);
        } else if is_ident_start(b[i]) {
            let start = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            out.push(text[start..i].to_string());
        } else {
            i += 1;
        }
    }
    out.retain(|l| l != "__name__");
    out
}

/// The metric names and labels of a PromQL expression, Grafana's `$variables`
/// and `${variables}` included (they are skipped).
fn promql_names(expr: &str) -> Names {
    let b = expr.as_bytes();
    let mut out = Names::default();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if matches!(c, b'"' | b'\'' | b'`') {
            i = skip_string(b, i);
        } else if c == b'$' {
            i += 1;
            if b.get(i) == Some(&b'{') {
                i = enclosed(b, i, b'}').1;
            } else {
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
            }
        } else if c == b'[' {
            // A range or subquery: durations and Grafana's $__rate_interval.
            i = enclosed(b, i, b']').1;
        } else if c == b'{' {
            let (text, end) = enclosed(b, i, b'}');
            out.labels.extend(matcher_labels(text));
            i = end;
        } else if c == b'#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            // A number or a duration (0.99, 1e3, 5m, 0x1f).
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let mut j = i;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            let next = b.get(j).copied();
            let next_word = {
                let mut k = j;
                while k < b.len() && is_ident(b[k]) {
                    k += 1;
                }
                &expr[j..k]
            };
            let lower = word.to_ascii_lowercase();
            if LABEL_LISTS.contains(&word) {
                if next == Some(b'(') {
                    let (list, end) = enclosed(b, j, b')');
                    out.labels.extend(list.split(',').map(str::trim).filter(|l| !l.is_empty()).map(String::from));
                    i = end;
                }
            } else if next == Some(b'(') || KEYWORDS.contains(&lower.as_str()) {
                // A function, an aggregation, or a keyword.
            } else if AGGREGATIONS.contains(&word) && (next_word == "by" || next_word == "without") {
                // `sum by (le) (...)`
            } else if next == Some(b'{') {
                let (text, end) = enclosed(b, j, b'}');
                out.labels.extend(matcher_labels(text));
                out.selectors.push(Selector { name: word.into(), matchers: text.into() });
                i = end;
            } else {
                out.selectors.push(Selector { name: word.into(), matchers: String::new() });
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn the_promql_name_extractor_finds_metrics_and_labels_only() {
    let names = |e: &str| -> Vec<String> { promql_names(e).selectors.into_iter().map(|s| s.name).collect() };
    let labels = |e: &str| -> Vec<String> { promql_names(e).labels.into_iter().collect() };

    let e = r#"histogram_quantile(0.99, sum by (instance, le) (rate(outpost_inference_latency_seconds_bucket{instance=~"$instance"}[$__rate_interval])))"#;
    let n = promql_names(e);
    assert_eq!(
        n.selectors,
        vec![Selector {
            name: "outpost_inference_latency_seconds_bucket".into(),
            matchers: "instance=~\"$instance\"".into()
        }]
    );
    assert_eq!(labels(e), ["instance", "le"]);

    // The old trailing `by`, joins, group_left without a list, offset, strings holding braces.
    let e = r#"sum(rate(a_total{code="x{y}",job!~'j'}[5m] offset 1h)) by (code) / ignoring(code) group_left sum(rate(b_total[5m:30s]))"#;
    assert_eq!(names(e), ["a_total", "b_total"]);
    assert_eq!(labels(e), ["code", "job"]);

    // Bare names, recording-rule colons, `bool`, `and on(...)`, numbers.
    let e = "up == bool 1 and on(job) job:outpost_requests:rate5m > 0.5e-3";
    assert_eq!(names(e), ["up", "job:outpost_requests:rate5m"]);
    assert_eq!(labels(e), ["job"]);

    // Function arguments that are strings, time(), Grafana variables in every form.
    let e = r#"label_replace(max without (version) (time() - process_start_time_seconds{instance=~"${instance:regex}"}), "dst", "$1", "src", "(.*)") * on(instance) group_right(name) outpost_model_info"#;
    assert_eq!(names(e), ["process_start_time_seconds", "outpost_model_info"]);
    assert_eq!(labels(e), ["instance", "name", "version"]);

    // A name followed by a space, then an operator; aggregations that are not followed by `by`.
    assert_eq!(
        names("count(outpost_store_versions > 3) + sum (outpost_store_bytes) / Inf"),
        ["outpost_store_versions", "outpost_store_bytes"]
    );
    assert!(names("vector(1) + scalar(time())").is_empty());
}

/// A text exposition: each family's type and each sample's name and labels.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>)>,
}

fn parse_exposition(text: &str) -> Exposition {
    let mut out = Exposition::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap_or_else(|| panic!("{line}")));
            out.types.insert(name.into(), kind.into());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let b = line.as_bytes();
        let end = b
            .iter()
            .position(|&c| c == b'{' || c == b' ')
            .unwrap_or_else(|| panic!("a sample without a value: {line}"));
        let name = &line[..end];
        assert!(name.bytes().all(is_ident) && !name.is_empty(), "metric name {name:?} in {line}");
        let mut labels = BTreeMap::new();
        let mut i = end;
        if b[i] == b'{' {
            i += 1;
            while b[i] != b'}' {
                let key_end = i + line[i..].find('=').unwrap_or_else(|| panic!("{line}"));
                let key = line[i..key_end].trim_start_matches(',').trim().to_string();
                assert_eq!(b[key_end + 1], b'"', "{line}");
                let mut j = key_end + 2;
                let mut value = String::new();
                while b[j] != b'"' {
                    if b[j] == b'\\' {
                        j += 1;
                    }
                    value.push(b[j] as char);
                    j += 1;
                }
                labels.insert(key, value);
                i = j + 1;
                if b[i] == b',' {
                    i += 1;
                }
            }
            i += 1;
        }
        let value = line[i..].split_whitespace().next().unwrap_or_else(|| panic!("no value: {line}"));
        assert!(value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value), "value {value:?} in {line}");
        out.samples.push((name.to_string(), labels));
    }
    out
}

impl Exposition {
    /// The family a sample name belongs to, as `# TYPE` declares it: the
    /// name itself, or a histogram's `_bucket`/`_sum`/`_count`.
    fn family(&self, name: &str) -> Option<(&str, &str)> {
        if let Some((n, t)) = self.types.get_key_value(name) {
            return Some((n, t));
        }
        for (suffix, kinds) in [
            ("_bucket", &["histogram"][..]),
            ("_sum", &["histogram", "summary"]),
            ("_count", &["histogram", "summary"]),
        ] {
            if let Some(base) = name.strip_suffix(suffix)
                && let Some((n, t)) = self.types.get_key_value(base)
                && kinds.contains(&t.as_str())
            {
                return Some((n, t));
            }
        }
        None
    }

    fn samples_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a BTreeMap<String, String>> + 'a {
        self.samples.iter().filter(move |(n, _)| n == name).map(|(_, l)| l)
    }
}

/// An agent with a model that was swapped in (on probation), answered and
/// failed requests over HTTP and MQTT, refused a reply topic and a desired
/// state: every labelled series exists. Each dashboard query must name
/// metrics it exports, with the labels it groups by; each of its Outpost and
/// process metrics must be on a panel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_names_what_a_real_agent_exports() {
    let d = dashboard();
    assert_well_formed(&d);

    let (_broker, reg, _data, mut w, agent) = Lab::device("dash-1")
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-mlp.onnx", "digits", "2")
        .start()
        .await;
    let base = format!("http://127.0.0.1:{}", agent.http_port);
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);

    let infer = format!("{base}/v2/models/digits/infer");
    let good = serde_json::to_vec(&digits_request(4)).unwrap();
    let bad =
        serde_json::json!({"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": vec![0.0; 63]}]});
    for _ in 0..2 {
        assert_eq!(http("POST", infer.clone(), Some(good.clone())).await.0, 200);
    }
    assert_eq!(http("POST", infer.clone(), Some(serde_json::to_vec(&bad).unwrap())).await.0, 400);
    let answer = w.infer("m-1", digits_request(2)).await;
    assert!(answer.get("outputs").is_some(), "{answer}");
    let answer = w.infer("m-2", bad.clone()).await;
    assert_eq!(answer["code"], "bad_input", "{answer}");
    // A reply topic outside the reply prefixes: answered on predictions, counted.
    let mut outside = digits_request(1);
    outside["reply_to"] = "elsewhere/answers".into();
    let answer = w.infer("m-3", outside).await;
    assert_eq!(answer["code"], "reply_refused", "{answer}");
    // A desired state that is not one: refused and counted.
    w.publish_desired(b"{not json".to_vec()).await;
    w.event(|e| e.phase == Phase::Failed).await;

    // The next version, on probation for long enough to be scraped so.
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "2").await.unwrap();
    let mut next = outpost_sim::operator::deployment("digits", "2", &url, &sha, None, None);
    next.policy.probation = Some(outpost_protocol::deployment::Probation { seconds: Some(3600), ..Default::default() });
    w.publish_desired(next.to_json()).await;
    assert_eq!(w.events_until_final(&next.deployment_id).await.0.phase, Phase::Active);
    assert_eq!(http("POST", infer.clone(), Some(good.clone())).await.0, 200);

    let (status, text) = http("GET", format!("{base}/metrics"), None).await;
    assert_eq!(status, 200);
    let text = text.as_str().unwrap().to_string();
    let exposition = parse_exposition(&text);

    let mut shown = BTreeSet::new();
    let mut problems = Vec::new();
    let mut exprs = queries(&d);
    // The device picker's own query: label_values(METRIC, LABEL).
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(def) = v["definition"].as_str()
            && let Some(args) = def.strip_prefix("label_values(").and_then(|a| a.strip_suffix(')'))
        {
            let metric = args.split(',').next().unwrap().trim();
            exprs.push((
                format!("variable ${}", v["name"].as_str().unwrap()),
                format!("{metric}{{{INSTANCE_MATCHER}}}"),
            ));
        }
    }
    for (panel, expr) in &exprs {
        let names = promql_names(expr);
        if names.selectors.is_empty() {
            problems.push(format!("{panel}: `{expr}` names no metric"));
        }
        for s in &names.selectors {
            match exposition.family(&s.name) {
                Some((family, _)) => {
                    shown.insert(family.to_string());
                }
                None if exposition.samples_of(&s.name).next().is_some() => {
                    shown.insert(s.name.clone());
                }
                None => problems.push(format!("{panel}: {} is not in /metrics", s.name)),
            }
            if !s.matchers.replace(' ', "").contains(INSTANCE_MATCHER) {
                problems.push(format!("{panel}: {} is not filtered by {INSTANCE_MATCHER}", s.name));
            }
        }
        // A `by (label)` the metrics do not have draws one unlabelled line.
        let sampled: Vec<&Selector> =
            names.selectors.iter().filter(|s| exposition.samples_of(&s.name).next().is_some()).collect();
        for label in names.labels.iter().filter(|l| !TARGET_LABELS.contains(&l.as_str())) {
            let carried = sampled.iter().any(|s| exposition.samples_of(&s.name).any(|l| l.contains_key(label)));
            if !sampled.is_empty() && !carried {
                let which: Vec<&str> = sampled.iter().map(|s| s.name.as_str()).collect();
                problems.push(format!("{panel}: label {label} is on no sample of {which:?}"));
            }
        }
        // Metrics named here with no sample at all (only `# TYPE`): the
        // scenario above makes every one exist, so the label check ran.
        for s in names
            .selectors
            .iter()
            .filter(|s| exposition.family(&s.name).is_some() && exposition.samples_of(&s.name).next().is_none())
        {
            problems.push(format!("{panel}: {} has no sample after the scenario (labels unchecked)", s.name));
        }
    }
    for family in exposition.types.keys() {
        if (family.starts_with("outpost_") || family.starts_with("process_")) && !shown.contains(family) {
            problems.push(format!("{family} is exported but on no panel of the dashboard"));
        }
    }
    assert!(problems.is_empty(), "{}\n\n/metrics:\n{text}", problems.join("\n"));
}
