//! Figures a person can read, as SVG: axes with units, ticks, legends and
//! titles (plotters, SVG backend). Text is written as SVG `<text>`, so no
//! font files are needed to draw; the viewer's sans-serif renders it.
//!
//! - [`swap_timeline`]: latency and throughput through hot swaps (`bench`).
//! - [`fleet_activation`]: devices active over time after a group deployment (`fleet --svg`).
//! - [`chaos_timeline`]: faults, versions served per device and the invariants (`chaos --svg`).

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Plot<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Axes with their titles and tick labels; without `y_desc`, no y mesh or labels.
fn axes(chart: &mut Plot, x_desc: &str, y_desc: Option<&str>) -> Result<(), String> {
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(x_desc).light_line_style(WHITE.mix(0.0)).x_label_formatter(&tick).y_label_formatter(&tick);
    match y_desc {
        Some(y) => mesh.y_desc(y),
        None => mesh.disable_y_mesh().y_labels(0),
    };
    mesh.draw().map_err(err)
}

/// A line of `colour`, named `label` in the legend.
fn line(
    chart: &mut Plot,
    points: impl IntoIterator<Item = (f64, f64)>,
    colour: RGBColor,
    label: impl Into<String>,
) -> Result<(), String> {
    chart
        .draw_series(LineSeries::new(points, colour.stroke_width(2)))
        .map_err(err)?
        .label(label)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour.stroke_width(2)));
    Ok(())
}

/// The legend of the series drawn so far.
fn legend<'b>(chart: &mut Plot<'b, 'b>, at: SeriesLabelPosition) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

const BLUE: RGBColor = RGBColor(0x1a, 0x73, 0xe8);
const ORANGE: RGBColor = RGBColor(0xe8, 0x71, 0x0a);
const GREEN: RGBColor = RGBColor(0x2e, 0x8b, 0x57);
const FAILED: RGBColor = RGBColor(0xd9, 0x30, 0x25);
const SWAP: RGBColor = RGBColor(0xf4, 0xc7, 0xc3);
const QUIET: RGBColor = RGBColor(0xee, 0xee, 0xee);
const GREY: RGBColor = RGBColor(0x66, 0x66, 0x66);

fn err(e: impl std::fmt::Display) -> String {
    format!("plot: {e}")
}

/// Renders `draw` on an SVG canvas of `size` and returns the document.
fn svg(size: (u32, u32), draw: impl FnOnce(&Area) -> Result<(), String>) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, size).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        draw(&root)?;
        root.present().map_err(err)?;
    }
    Ok(out)
}

/// Upper bound of an axis: 10 % over the largest value, never zero.
fn headroom(values: impl Iterator<Item = f64>, at_least: f64) -> f64 {
    values.filter(|v| v.is_finite()).fold(at_least, f64::max) * 1.1
}

/// A tick label: at most two decimals, no trailing zeros (`2`, `0.5`, `12000`).
fn tick(v: &f64) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.to_string() }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// One request of a load run: when it started (s since the run started),
/// its latency (ms) and whether it succeeded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    pub at_s: f64,
    pub latency_ms: f64,
    pub ok: bool,
}

/// The hot swap under load: per 250 ms, p50 and p99 latency (top panel, ms)
/// and requests/s (bottom panel), each with its own axis; the swap windows
/// (desired published → `active` + 200 ms) shaded in both; failed requests
/// marked.
pub fn swap_timeline(
    requests: &[Request],
    windows: &[(f64, f64)],
    seconds: f64,
    title: &str,
) -> Result<String, String> {
    let bucket = 0.25;
    let seconds = seconds.max(bucket);
    let n = (seconds / bucket).ceil() as usize;
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut failed = vec![0usize; n];
    for r in requests {
        let i = ((r.at_s.max(0.0) / bucket) as usize).min(n - 1);
        if r.ok {
            lat[i].push(r.latency_ms);
        } else {
            failed[i] += 1;
        }
    }
    let mid = |i: usize| (i as f64 + 0.5) * bucket;
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    let mut rps = Vec::new();
    for (i, v) in lat.iter_mut().enumerate() {
        // The last bucket may be cut short by the end of the run.
        let width = (seconds - i as f64 * bucket).clamp(bucket / 10.0, bucket);
        rps.push((mid(i), v.len() as f64 / width));
        if v.is_empty() {
            continue;
        }
        v.sort_by(f64::total_cmp);
        p50.push((mid(i), quantile(v, 0.5)));
        p99.push((mid(i), quantile(v, 0.99)));
    }
    let failures: Vec<(f64, f64)> =
        failed.iter().enumerate().filter(|(_, f)| **f > 0).map(|(i, f)| (mid(i), *f as f64 / bucket)).collect();
    // Room above the data for the legends.
    let max_ms = headroom(p99.iter().map(|p| p.1), 0.1) * 1.4;
    let max_rps = headroom(rps.iter().map(|p| p.1).chain(failures.iter().map(|p| p.1)), 1.0) * 1.4;

    svg((1000, 620), |root| {
        let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
        let (top, bottom) = root.split_vertically(300);
        let shade = |chart: &mut ChartContext<'_, SVGBackend<'_>, Cartesian2d<_, _>>, max: f64, label: bool| {
            let s = chart
                .draw_series(windows.iter().map(|(a, b)| Rectangle::new([(*a, 0.0), (*b, max)], SWAP.filled())))
                .map_err(err)?;
            if label {
                s.label("swap: deployment published → active (+200 ms)")
                    .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], SWAP.filled()));
            }
            Ok::<_, String>(())
        };

        let mut chart = ChartBuilder::on(&top)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..seconds, 0.0..max_ms)
            .map_err(err)?;
        axes(&mut chart, "time since the load started (s)", Some("latency per 250 ms (ms)"))?;
        shade(&mut chart, max_ms, true)?;
        line(&mut chart, p99.iter().copied(), ORANGE, "p99 latency")?;
        line(&mut chart, p50.iter().copied(), BLUE, "p50 latency")?;
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;

        let mut chart = ChartBuilder::on(&bottom)
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..seconds, 0.0..max_rps)
            .map_err(err)?;
        axes(&mut chart, "time since the load started (s)", Some("throughput (requests/s)"))?;
        shade(&mut chart, max_rps, false)?;
        line(&mut chart, rps.iter().copied(), GREEN, "answered requests/s (2 keep-alive clients)")?;
        chart
            .draw_series(failures.iter().map(|p| Cross::new(*p, 5, FAILED.stroke_width(2))))
            .map_err(err)?
            .label(format!("failed requests/s ({} in all)", failed.iter().sum::<usize>()))
            .legend(|(x, y)| Cross::new((x + 8, y), 5, FAILED.stroke_width(2)));
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    })
}

/// A group deployment across a fleet: the share of devices active (left
/// axis, %; right axis, devices) against the time since the deployment
/// was published, failures likewise, 50 / 90 / 100 % marked.
/// `active_s` and `failed_s`: when each device became active / failed.
pub fn fleet_activation(devices: usize, active_s: &[f64], failed_s: &[f64], title: &str) -> Result<String, String> {
    let devices = devices.max(1);
    let mut active: Vec<f64> = active_s.iter().copied().filter(|t| t.is_finite()).collect();
    let mut failed: Vec<f64> = failed_s.iter().copied().filter(|t| t.is_finite()).collect();
    active.sort_by(f64::total_cmp);
    failed.sort_by(f64::total_cmp);
    let end = headroom(active.iter().chain(&failed).copied(), 1.0);
    let share = |k: usize| k as f64 * 100.0 / devices as f64;
    // A step curve: flat until each device's moment, then one device up.
    let steps = |times: &[f64]| {
        let mut pts = vec![(0.0, 0.0)];
        for (k, t) in times.iter().enumerate() {
            pts.push((*t, share(k)));
            pts.push((*t, share(k + 1)));
        }
        pts.push((end, share(times.len())));
        pts
    };
    // The first device, then 50 / 90 / 99 / 100 % of the fleet. The labels
    // of the first and of 99 % go above their point: in a large fleet 99 and
    // 100 % are a few pixels apart.
    let first = active.first().map(|t| (*t, share(1), format!("first at {t:.1} s"), true));
    let need = |q: f64| ((devices as f64 * q).ceil() as usize).max(1);
    // (A fleet of under 100 devices has its 99 % at its 100 %: one mark.)
    let quantiles = [0.5, 0.9, 0.99, 1.0].into_iter().filter(|&q| q != 0.99 || need(q) < devices);
    let quantiles = quantiles.filter_map(|q| {
        let label = if q == 0.99 { "99".to_string() } else { format!("{:.0}", q * 100.0) };
        active.get(need(q) - 1).map(|t| (*t, q * 100.0, format!("{label} % at {t:.1} s"), q == 0.99))
    });
    let marks: Vec<(f64, f64, String, bool)> = first.into_iter().chain(quantiles).collect();

    svg((1000, 520), |root| {
        let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .right_y_label_area_size(70)
            .build_cartesian_2d(0.0..end, 0.0..105.0)
            .map_err(err)?
            .set_secondary_coord(0.0..end, 0.0..devices as f64 * 1.05);
        axes(&mut chart, "time since the group deployment was published (s)", Some("devices active (% of the fleet)"))?;
        chart.configure_secondary_axes().y_desc("devices (count)").y_label_formatter(&tick).draw().map_err(err)?;
        line(&mut chart, steps(&active), GREEN, format!("active ({} of {devices})", active.len()))?;
        line(&mut chart, steps(&failed), FAILED, format!("failed ({})", failed.len()))?;
        chart
            .draw_series(marks.iter().map(|(t, pct, text, above)| {
                // Labels right of their point, or left of it near the right edge.
                let (dx, h) = if *t > end * 0.7 { (-8, HPos::Right) } else { (8, HPos::Left) };
                let (dy, v) = if *above { (-6, VPos::Bottom) } else { (6, VPos::Top) };
                let style = TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(h, v));
                EmptyElement::at((*t, *pct))
                    + Circle::new((0, 0), 4, BLACK.filled())
                    + Text::new(text.clone(), (dx, dy), style)
            }))
            .map_err(err)?
            .label("first device, 50 / 90 / 99 / 100 % of the fleet active")
            .legend(|(x, y)| Circle::new((x + 8, y), 4, BLACK.filled()));
        legend(&mut chart, SeriesLabelPosition::LowerRight)
    })
}

/// A rollout across a simulated fleet (`fleet --rollout`): above, the
/// devices that heard of the candidate and those serving it; below, the
/// requests answered each second by the previous version, by the candidate,
/// and those that failed. `timeline`: (seconds, serving, touched);
/// `answers`: the seconds at which each request was answered, by kind;
/// `rollout`: when the rollout started and ended (shaded).
pub fn fleet_rollout(
    devices: usize,
    timeline: &[(f64, usize, usize)],
    answers: [&[f64]; 3],
    rollout: (f64, f64),
    title: &str,
) -> Result<String, String> {
    let end = headroom(timeline.iter().map(|t| t.0).chain(answers.iter().flat_map(|a| a.iter().copied())), 1.0);
    // Answers per second, bucketed by the second they came in.
    let buckets = end.ceil() as usize + 1;
    let per_second = |times: &[f64]| {
        let mut n = vec![0.0; buckets];
        for t in times.iter().filter(|t| t.is_finite() && **t >= 0.0) {
            n[(*t as usize).min(buckets - 1)] += 1.0;
        }
        n.iter().enumerate().map(|(i, v)| (i as f64 + 0.5, *v)).collect::<Vec<_>>()
    };
    let [previous, candidate, failed] = answers.map(per_second);
    let top_rate = headroom(previous.iter().chain(&candidate).chain(&failed).map(|p| p.1), 1.0);
    let counts = |f: fn(&(f64, usize, usize)) -> usize| timeline.iter().map(|t| (t.0, f(t) as f64)).collect::<Vec<_>>();
    // The devices axis goes as high as the rollout went: a halted one's few
    // devices stay visible.
    let most = timeline.iter().map(|t| t.1.max(t.2)).max().unwrap_or(0);
    let top_devices = headroom(std::iter::once(most as f64), 1.0).min(devices.max(1) as f64 * 1.05);
    let last = timeline.last().copied().unwrap_or_default();
    svg((1000, 680), |root| {
        let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
        let (upper, lower) = root.split_vertically(360);
        let mut chart = ChartBuilder::on(&upper)
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..end, 0.0..top_devices)
            .map_err(err)?;
        let x = format!(
            "time since the load started (s); the rollout ran from {:.1} to {:.1} s (shaded)",
            rollout.0, rollout.1
        );
        let shade = |top: f64| Rectangle::new([(rollout.0, 0.0), (rollout.1, top)], QUIET.filled());
        chart.draw_series([shade(top_devices)]).map_err(err)?;
        axes(&mut chart, &x, Some(&format!("devices (of {devices})")))?;
        let touched = format!("touched by the candidate (an event for it): {} at the end", last.2);
        line(&mut chart, counts(|t| t.2), ORANGE, touched)?;
        line(&mut chart, counts(|t| t.1), GREEN, format!("serving the candidate: {} at the end", last.1))?;
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        let mut chart = ChartBuilder::on(&lower)
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..end, 0.0..top_rate)
            .map_err(err)?;
        chart.draw_series([shade(top_rate)]).map_err(err)?;
        axes(&mut chart, &x, Some("requests answered per second"))?;
        let total = |v: &[(f64, f64)]| v.iter().map(|p| p.1).sum::<f64>();
        line(&mut chart, previous.clone(), BLUE, format!("by the previous version ({:.0})", total(&previous)))?;
        line(&mut chart, candidate.clone(), GREEN, format!("by the candidate ({:.0})", total(&candidate)))?;
        line(&mut chart, failed.clone(), FAILED, format!("failed ({:.0})", total(&failed)))?;
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    })
}

/// The colour of a version in the chaos timeline.
fn version_colour(v: &str) -> RGBColor {
    match v {
        "digits@1" => RGBColor(0x4e, 0x79, 0xa7),
        "digits@2" => RGBColor(0x59, 0xa1, 0x4f),
        "digits@3" => RGBColor(0xed, 0xc9, 0x48),
        "big@1" => RGBColor(0xb0, 0x7a, 0xa1),
        "none" => RGBColor(0xdd, 0xdd, 0xdd),
        _ => RGBColor(0xe1, 0x57, 0x59),
    }
}

/// The second a violation names (`... at 12.5 s: ...`), when it does.
fn violation_time(text: &str) -> Option<f64> {
    let (_, rest) = text.split_once(" at ")?;
    let (num, _) = rest.split_once(" s")?;
    num.trim().parse().ok()
}

/// The chaos soak from its JSON report (`outpost-sim chaos --json`): one row
/// per fault kind (a dot each time it was injected), one lane per device
/// coloured by the version its retained state named, restarts as ticks,
/// the quiet tail shaded, and the invariants with whether they held.
/// `quiet_from_s`: when the schedule stopped injecting faults.
pub fn chaos_timeline(report: &Value, quiet_from_s: f64) -> Result<String, String> {
    let duration = report["duration_s"].as_f64().unwrap_or(0.0).max(1.0);
    let happened = report["happened"].as_array().cloned().unwrap_or_default();
    let lanes = report["timeline"].as_array().cloned().unwrap_or_default();
    let mut kinds: Vec<String> = happened.iter().filter_map(|h| h["kind"].as_str().map(str::to_string)).collect();
    kinds.sort();
    kinds.dedup();
    let settled = report["settled_after_s"].as_f64().map(|s| duration + s);
    let end = settled.unwrap_or(duration).max(duration) * 1.03;
    let devices: Vec<String> = lanes.iter().map(|l| l["device"].as_str().unwrap_or("?").to_string()).collect();
    // Rows from the bottom: devices (last device lowest), then fault kinds.
    let rows = devices.len() + kinds.len();
    let device_row = |i: usize| (devices.len() - 1 - i) as f64;
    let kind_row = |k: &str| (devices.len() + kinds.len() - 1 - kinds.iter().position(|x| x == k).unwrap_or(0)) as f64;
    let mut versions_seen: Vec<String> = Vec::new();
    let mut bars: Vec<(f64, f64, f64, String)> = Vec::new();
    let mut restarts: Vec<(f64, f64)> = Vec::new();
    for (i, lane) in lanes.iter().enumerate() {
        let v = lane["versions"].as_array().cloned().unwrap_or_default();
        for (j, p) in v.iter().enumerate() {
            let (Some(t), Some(name)) = (p[0].as_f64(), p[1].as_str()) else { continue };
            let until = v.get(j + 1).and_then(|q| q[0].as_f64()).unwrap_or(end);
            bars.push((t, until, device_row(i), name.to_string()));
            if !versions_seen.iter().any(|s| s == name) {
                versions_seen.push(name.to_string());
            }
        }
        for r in lane["restarts"].as_array().into_iter().flatten().filter_map(Value::as_f64) {
            restarts.push((r, device_row(i)));
        }
    }
    versions_seen.sort();
    let mut violations: Vec<(f64, f64)> = Vec::new();
    let invariants = report["invariants"].as_array().cloned().unwrap_or_default();
    for inv in &invariants {
        for v in inv["violations"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            let row = devices.iter().position(|d| v.starts_with(d.as_str())).map(device_row);
            let at = violation_time(v).unwrap_or(end / 1.03);
            violations.push((at, row.unwrap_or(0.0)));
        }
    }
    let title = format!(
        "Chaos soak: seed {}, {} devices, {:.0} s, {} faults injected — {}",
        report["seed"],
        devices.len(),
        duration,
        report["faults_total"],
        if report["ok"].as_bool() == Some(true) { "every invariant held" } else { "INVARIANTS BROKEN" }
    );
    let row_px = 26u32;
    let legend_h = 60 + 18 * invariants.len() as u32;
    let height = 120 + row_px * rows as u32 + legend_h;

    svg((1200, height), |root| {
        let root_t = root.titled(&title, ("sans-serif", 20)).map_err(err)?;
        let (top, bottom) = root_t.split_vertically(height - 40 - legend_h);
        let mut chart = ChartBuilder::on(&top)
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(260)
            .build_cartesian_2d(0.0..end, 0.0..rows as f64)
            .map_err(err)?;
        axes(&mut chart, "time since the run started (s)", None)?;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(quiet_from_s, 0.0), (duration, rows as f64)],
                QUIET.filled(),
            )))
            .map_err(err)?;
        if let Some(s) = settled {
            chart
                .draw_series(std::iter::once(PathElement::new([(s, 0.0), (s, rows as f64)], GREY.stroke_width(1))))
                .map_err(err)?;
        }
        chart
            .draw_series(
                bars.iter()
                    .map(|(a, b, y, v)| Rectangle::new([(*a, y + 0.15), (*b, y + 0.85)], version_colour(v).filled())),
            )
            .map_err(err)?;
        chart
            .draw_series(restarts.iter().map(|(t, y)| PathElement::new([(*t, y + 0.05), (*t, y + 0.95)], BLACK)))
            .map_err(err)?;
        chart
            .draw_series(happened.iter().filter_map(|h| {
                let (t, k) = (h["at_s"].as_f64()?, h["kind"].as_str()?);
                Some(Circle::new((t, kind_row(k) + 0.5), 3, GREY.filled()))
            }))
            .map_err(err)?;
        chart
            .draw_series(violations.iter().map(|(t, y)| Cross::new((*t, y + 0.5), 7, FAILED.stroke_width(3))))
            .map_err(err)?;
        // Row names beside the axis, where tick labels would be.
        let label = TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
        for (i, d) in devices.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(0.0, device_row(i) + 0.5));
            root.draw(&Text::new(format!("{d} (version served)"), (x - 8, y), label.clone())).map_err(err)?;
        }
        for k in &kinds {
            let count = happened.iter().filter(|h| h["kind"].as_str() == Some(k.as_str())).count();
            let (x, y) = chart.backend_coord(&(0.0, kind_row(k) + 0.5));
            root.draw(&Text::new(format!("{k} ×{count}"), (x - 8, y), label.clone())).map_err(err)?;
        }
        let (qx, qy) = chart.backend_coord(&(quiet_from_s, rows as f64));
        root.draw(&Text::new("quiet: no new faults", (qx + 4, qy + 2), ("sans-serif", 12).into_font().color(&GREY)))
            .map_err(err)?;
        if let Some(s) = settled {
            let (sx, sy) = chart.backend_coord(&(s, rows as f64));
            let right =
                TextStyle::from(("sans-serif", 12).into_font()).color(&GREY).pos(Pos::new(HPos::Right, VPos::Top));
            root.draw(&Text::new("all settled", (sx - 3, sy + 2), right)).map_err(err)?;
        }

        // The legend: what the marks mean, then the invariants.
        let font = TextStyle::from(("sans-serif", 13).into_font());
        let mut x = 20;
        let y = 12;
        for v in &versions_seen {
            bottom.draw(&Rectangle::new([(x, y - 6), (x + 14, y + 6)], version_colour(v).filled())).map_err(err)?;
            let text = if v == "none" { "no model".to_string() } else { v.clone() };
            bottom
                .draw(&Text::new(text.clone(), (x + 20, y), font.clone().pos(Pos::new(HPos::Left, VPos::Center))))
                .map_err(err)?;
            x += 40 + 7 * text.chars().count() as i32;
        }
        let marks: [(&str, u8); 4] =
            [("agent restart", 0), ("fault injected", 1), ("quiet tail", 2), ("invariant violation", 3)];
        for (text, kind) in marks {
            match kind {
                0 => bottom.draw(&PathElement::new([(x + 7, y - 8), (x + 7, y + 8)], BLACK)).map_err(err)?,
                1 => bottom.draw(&Circle::new((x + 7, y), 3, GREY.filled())).map_err(err)?,
                2 => bottom.draw(&Rectangle::new([(x, y - 6), (x + 14, y + 6)], QUIET.filled())).map_err(err)?,
                _ => bottom.draw(&Cross::new((x + 7, y), 6, FAILED.stroke_width(3))).map_err(err)?,
            }
            bottom
                .draw(&Text::new(text, (x + 20, y), font.clone().pos(Pos::new(HPos::Left, VPos::Center))))
                .map_err(err)?;
            x += 40 + 7 * text.chars().count() as i32;
        }
        let probes = report["probes"].as_u64().unwrap_or(0);
        bottom
            .draw(&Text::new(
                format!(
                    "Invariants, checked throughout ({probes} HTTP probes of the answering version, every 500 ms) and at the end:"
                ),
                (20, y + 26),
                font.clone().pos(Pos::new(HPos::Left, VPos::Center)),
            ))
            .map_err(err)?;
        for (i, inv) in invariants.iter().enumerate() {
            let held = inv["held"].as_bool() == Some(true);
            let n = inv["violations"].as_array().map_or(0, Vec::len);
            let text =
                format!("{}: {}", if held { "held" } else { "BROKEN" }, inv["invariant"].as_str().unwrap_or_default())
                    + &if held { String::new() } else { format!(" ({n} violations)") };
            let colour = if held { GREEN } else { FAILED };
            bottom
                .draw(&Text::new(
                    text,
                    (36, y + 46 + 18 * i as i32),
                    font.clone().color(&colour).pos(Pos::new(HPos::Left, VPos::Center)),
                ))
                .map_err(err)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(svg: &str) -> String {
        // The text content of every <text> element, joined.
        svg.split("<text").skip(1).filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0)).collect()
    }

    #[test]
    fn ticks_have_no_trailing_zeros() {
        assert_eq!(
            [tick(&2.0), tick(&0.5), tick(&12000.0), tick(&0.25), tick(&0.30000000000000004)],
            ["2", "0.5", "12000", "0.25", "0.3"]
        );
    }

    #[test]
    fn the_swap_timeline_has_axes_units_legend_and_its_swaps() {
        let requests: Vec<Request> = (0..400)
            .map(|i| Request { at_s: i as f64 * 0.01, latency_ms: 0.2 + (i % 7) as f64 * 0.01, ok: i != 150 })
            .collect();
        let svg = swap_timeline(&requests, &[(1.0, 1.3), (2.5, 2.8)], 4.0, "Hot swap under load").expect("renders");
        let t = texts(&svg);
        for want in [
            "Hot swap under load",
            "latency per 250 ms (ms)",
            "throughput (requests/s)",
            "time since the load started (s)",
            "p99 latency",
            "p50 latency",
            "swap: deployment published → active (+200 ms)",
            "failed requests/s (1 in all)",
        ] {
            assert!(t.contains(&want.replace('>', "&gt;")), "{want} missing from {t}");
        }
        // Ticks: numbers on both axes.
        assert!(t.contains("0.5") || t.contains("1.0"), "{t}");
        // Two shaded swaps per panel.
        assert_eq!(svg.matches(&format!("fill=\"#{:02X}{:02X}{:02X}\"", SWAP.0, SWAP.1, SWAP.2)).count(), 4 + 1);
    }

    #[test]
    fn the_fleet_curve_marks_50_90_and_100_percent_on_two_axes() {
        let active: Vec<f64> = (0..10).map(|i| 1.0 + i as f64 * 0.5).collect();
        let svg = fleet_activation(10, &active, &[], "Group deployment to 10 devices").expect("renders");
        let t = texts(&svg);
        for want in [
            "Group deployment to 10 devices",
            "time since the group deployment was published (s)",
            "devices active (% of the fleet)",
            "devices (count)",
            "active (10 of 10)",
            "failed (0)",
            "50 % at 3.0 s",
            "90 % at 5.0 s",
            "100 % at 5.5 s",
        ] {
            assert!(t.contains(want), "{want} missing from {t}");
        }
    }

    #[test]
    fn the_chaos_timeline_names_fault_kinds_devices_versions_and_invariants() {
        let report = serde_json::json!({
            "ok": false, "seed": 7, "duration_s": 60, "faults_total": 3, "probes": 120, "settled_after_s": 4.0,
            "happened": [
                {"at_s": 2.0, "kind": "sigkill", "what": "Kill"},
                {"at_s": 9.0, "kind": "registry 503", "what": "Registry"},
                {"at_s": 20.0, "kind": "sigkill", "what": "Kill"}
            ],
            "timeline": [
                {"device": "chaos-0", "versions": [[0.5, "digits@1"], [10.0, "digits@2"]], "restarts": [2.0, 2.5]},
                {"device": "chaos-1", "versions": [[0.6, "digits@1"], [30.0, "none"]], "restarts": []}
            ],
            "invariants": [
                {"invariant": "1 retained state = version answering", "held": false,
                 "violations": ["chaos-1 at 31.5 s: state says digits@1@1, HTTP answers x@1 for 5.5 s"]},
                {"invariant": "6 no panic in any log", "held": true, "violations": []}
            ]
        });
        let svg = chaos_timeline(&report, 40.0).expect("renders");
        let t = texts(&svg);
        for want in [
            "seed 7",
            "INVARIANTS BROKEN",
            "time since the run started (s)",
            "sigkill ×2",
            "registry 503 ×1",
            "chaos-0 (version served)",
            "chaos-1 (version served)",
            "digits@1",
            "digits@2",
            "no model",
            "agent restart",
            "fault injected",
            "quiet tail",
            "invariant violation",
            "BROKEN: 1 retained state = version answering (1 violations)",
            "held: 6 no panic in any log",
            "all settled",
            "120 HTTP probes",
        ] {
            assert!(t.contains(want), "{want} missing from {t}");
        }
        assert_eq!(violation_time("chaos-1 at 31.5 s: x"), Some(31.5));
        assert_eq!(violation_time("chaos-1: no state seen"), None);
    }
}
