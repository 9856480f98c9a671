//! Stage planning: `--stages 1,10%,50%,100%` into how many devices each stage
//! has moved in all, and which devices a stage takes next. Pure functions:
//! the same members and the same stages always give the same devices.

use std::collections::BTreeSet;
use std::fmt;

/// One stage of `--stages`: how many of the group's devices have moved once
/// it is done (cumulative, so `1,10%,100%` is one device, then up to a
/// tenth, then everyone).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stage {
    /// A number of devices (at least 1).
    Count(usize),
    /// A share of the group's devices, above 0 up to 100 (percent).
    Percent(f64),
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Count(n) => write!(f, "{n}"),
            Stage::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for Stage {
    type Err = String;

    fn from_str(s: &str) -> Result<Stage, String> {
        let s = s.trim();
        match s.strip_suffix('%') {
            Some(p) => match p.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(Stage::Percent(p)),
                _ => Err(format!("stage '{s}': expected a percentage above 0 up to 100%")),
            },
            None => match s.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(Stage::Count(n)),
                _ => Err(format!("stage '{s}': expected a number of devices (1 or more) or a percentage (10%)")),
            },
        }
    }
}

impl Stage {
    /// How many of `members` devices have moved once this stage is done:
    /// a percentage rounds up (10% of 4 is 1, never 0), a count is capped
    /// at the group's size.
    pub fn cumulative(self, members: usize) -> usize {
        match self {
            Stage::Count(n) => n.min(members),
            Stage::Percent(p) => {
                // Integer maths on thousandths of a percent: 7% of 100 is
                // exactly 7 (p / 100.0 * n in floats gives 7.000000000000001,
                // which rounded up to 8).
                let milli = (p * 1000.0).round() as u128;
                let n = members as u128;
                let share = (milli * n).div_ceil(100_000);
                (share as usize).clamp(1, members.max(1)).min(members)
            }
        }
    }
}

/// Parses `--stages`: comma-separated counts and percentages, each of a
/// kind larger than the one before (`1,10%,5` is fine, `10%,5%` is not).
pub fn parse_stages(text: &str) -> Result<Vec<Stage>, String> {
    let stages = text.split(',').map(str::parse::<Stage>).collect::<Result<Vec<_>, _>>()?;
    if stages.is_empty() {
        return Err("--stages: expected at least one stage, e.g. 1,10%,50%,100%".into());
    }
    let (mut count, mut percent) = (0usize, 0f64);
    for s in &stages {
        let growing = match *s {
            Stage::Count(n) => std::mem::replace(&mut count, n) < n,
            Stage::Percent(p) => std::mem::replace(&mut percent, p) < p,
        };
        if !growing {
            return Err(format!(
                "--stages {text}: stage '{s}' is not above the earlier stage of its kind (stages are cumulative)"
            ));
        }
    }
    Ok(stages)
}

/// The cumulative number of devices moved after each stage, for a group of
/// `members` devices (never fewer than after the stage before).
pub fn targets(stages: &[Stage], members: usize) -> Vec<usize> {
    let mut last = 0;
    stages
        .iter()
        .map(|s| {
            last = last.max(s.cumulative(members));
            last
        })
        .collect()
}

/// What a stage takes: the next devices in `members` order (sorted by
/// name, so a run is reproducible) that have not moved yet, until `target`
/// have moved in all. Offline devices are passed over (and named, as
/// `skipped`): a later stage takes them if they are back by then, and the
/// group's desired state reaches them when the rollout completes.
pub fn pick(
    members: &[String],
    moved: &BTreeSet<String>,
    target: usize,
    online: impl Fn(&str) -> bool,
) -> (Vec<String>, Vec<String>) {
    let (mut picked, mut skipped) = (Vec::new(), Vec::new());
    let mut count = moved.len();
    for m in members.iter().filter(|m| !moved.contains(*m)) {
        if count >= target {
            break;
        }
        if online(m) {
            picked.push(m.clone());
            count += 1;
        } else {
            skipped.push(m.clone());
        }
    }
    (picked, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("cam-{i:02}")).collect()
    }

    #[test]
    fn stages_parse_as_counts_and_percentages() {
        assert_eq!(
            parse_stages("1,10%,50%,100%").unwrap(),
            [Stage::Count(1), Stage::Percent(10.0), Stage::Percent(50.0), Stage::Percent(100.0)]
        );
        assert_eq!(parse_stages(" 2 , 12.5% ").unwrap(), [Stage::Count(2), Stage::Percent(12.5)]);
        for bad in ["", "0", "0%", "101%", "-1", "ten", "10%,5%", "5,5", "1,,2"] {
            assert!(parse_stages(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse_stages("10%,5%").unwrap_err().contains("'5%' is not above"));
        assert_eq!(Stage::Percent(12.5).to_string(), "12.5%");
        assert_eq!(Stage::Count(3).to_string(), "3");
    }

    #[test]
    fn percentages_round_up_and_counts_cap_at_the_group() {
        let stages = parse_stages("1,10%,50%,100%").unwrap();
        assert_eq!(targets(&stages, 4), [1, 1, 2, 4]);
        assert_eq!(targets(&stages, 1000), [1, 100, 500, 1000]);
        assert_eq!(targets(&stages, 1), [1, 1, 1, 1]);
        assert_eq!(targets(&parse_stages("5,1%").unwrap(), 50), [5, 5], "never fewer than the stage before");
        assert_eq!(targets(&parse_stages("33.3%,100%").unwrap(), 3), [1, 3]);
        assert_eq!(Stage::Count(10).cumulative(3), 3);
        assert_eq!(Stage::Percent(100.0).cumulative(7), 7);
        assert_eq!(Stage::Percent(0.1).cumulative(7), 1, "a stage moves at least one device");
        // Integer maths: no float rounding past the exact share.
        assert_eq!(Stage::Percent(7.0).cumulative(100), 7, "7% of 100 is 7, not 8");
        for p in [1.0, 3.0, 7.0, 14.0, 28.0, 29.0, 57.0, 58.0] {
            assert_eq!(Stage::Percent(p).cumulative(100), p as usize, "{p}% of 100");
        }
        assert_eq!(Stage::Percent(7.0).cumulative(10_000), 700);
        assert_eq!(Stage::Percent(12.5).cumulative(8), 1);
        assert_eq!(Stage::Percent(12.5).cumulative(9), 2, "rounds up");
    }

    #[test]
    fn picks_are_the_next_devices_by_name_passing_over_offline_ones() {
        let members = names(6);
        let mut moved = BTreeSet::new();
        let (p, s) = pick(&members, &moved, 1, |_| true);
        assert_eq!((p, s), (vec!["cam-00".to_string()], vec![]));
        moved.insert("cam-00".to_string());
        // cam-01 is offline: passed over, named, and cam-02 and cam-03 taken.
        let (p, s) = pick(&members, &moved, 3, |d| d != "cam-01");
        assert_eq!(p, ["cam-02", "cam-03"]);
        assert_eq!(s, ["cam-01"]);
        moved.extend(p);
        // Back online by the next stage: taken then.
        let (p, s) = pick(&members, &moved, 6, |_| true);
        assert_eq!(p, ["cam-01", "cam-04", "cam-05"]);
        assert!(s.is_empty());
        // Nothing left to take.
        moved.extend(p);
        assert_eq!(pick(&members, &moved, 6, |_| true), (vec![], vec![]));
        // The same inputs, the same picks.
        let once = pick(&members, &BTreeSet::new(), 4, |d| d != "cam-02");
        assert_eq!(once, pick(&members, &BTreeSet::new(), 4, |d| d != "cam-02"));
    }
}
