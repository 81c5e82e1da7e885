//! The ranges of `xlbd`'s numeric start-up options, checked before anything is attached: a
//! value out of range is refused with the option, the value and the allowed range, never
//! turned into a panic or an allocation the host cannot make.

use std::time::Duration;

/// An inclusive range of an option's values, with its unit for messages.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    pub min: f64,
    pub max: f64,
    pub unit: &'static str,
}

/// `--status-interval`: 10 ms to a day.
pub const STATUS_INTERVAL: Range = Range {
    min: 0.01,
    max: 86_400.0,
    unit: "seconds",
};
/// `--max-runtime`: 100 ms to a year.
pub const MAX_RUNTIME: Range = Range {
    min: 0.1,
    max: 31_536_000.0,
    unit: "seconds",
};
/// `--self-probe-interval`: 100 ms to an hour.
pub const SELF_PROBE_INTERVAL: Range = Range {
    min: 0.1,
    max: 3_600.0,
    unit: "seconds",
};
/// `--flow-capacity`, per worker: the table is allocated at start (about 94 bytes a flow with
/// its index and links), so the most, 8 388 607 flows (what a 24-bit index entry can name,
/// `xlb_engine::flow::MAX_CAPACITY`), takes about 790 MB per worker.
pub const FLOW_CAPACITY: Range = Range {
    min: 16.0,
    max: 8_388_607.0,
    unit: "flows per worker",
};
/// `--workers`: the XDP program's socket map has 64 queues per interface.
pub const WORKERS: Range = Range {
    min: 1.0,
    max: 64.0,
    unit: "workers",
};
/// `--queues`: as many as the socket map holds per interface.
pub const QUEUES: Range = Range {
    min: 1.0,
    max: 64.0,
    unit: "queues",
};

/// `--ipfix-max-rate`: records per second.
pub const IPFIX_RATE: Range = Range {
    min: 1.0,
    max: 10_000_000.0,
    unit: "records per second",
};

fn out_of_range(flag: &str, value: impl std::fmt::Display, r: Range) -> String {
    format!(
        "{flag} {value}: out of range (allowed: {}–{} {})",
        r.min, r.max, r.unit
    )
}

/// A duration option in seconds.
pub fn seconds(flag: &str, value: f64, r: Range) -> Result<Duration, String> {
    if !(value.is_finite() && value >= r.min && value <= r.max) {
        // Whole numbers as written ("0"), others in the shortest form ("1e300", "0.5").
        let shown = if value.fract() == 0.0 && value.abs() < 1e15 {
            format!("{value:.0}")
        } else {
            format!("{value:?}")
        };
        return Err(out_of_range(flag, shown, r));
    }
    Ok(Duration::from_secs_f64(value))
}

/// A whole-number option.
pub fn count<T: Copy + Into<u64> + std::fmt::Display>(
    flag: &str,
    value: T,
    r: Range,
) -> Result<T, String> {
    let v = value.into() as f64;
    if v < r.min || v > r.max {
        return Err(out_of_range(flag, value, r));
    }
    Ok(value)
}

/// `--cores`: every core must exist on this host.
pub fn cores(values: &[usize], available: usize) -> Result<(), String> {
    match values.iter().find(|c| **c >= available) {
        Some(c) => Err(format!(
            "--cores {c}: no such core (allowed: 0–{} on this host)",
            available.saturating_sub(1)
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_in_range_pass_and_others_name_flag_value_and_range() {
        assert_eq!(
            seconds("--status-interval", 1.5, STATUS_INTERVAL).unwrap(),
            Duration::from_millis(1500)
        );
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300, 86_400.5] {
            let e = seconds("--status-interval", bad, STATUS_INTERVAL).unwrap_err();
            assert!(e.starts_with("--status-interval "), "{e}");
            assert!(e.contains("allowed: 0.01–86400 seconds"), "{e}");
        }
        assert!(count("--flow-capacity", 65_536u32, FLOW_CAPACITY).is_ok());
        let e = count("--flow-capacity", u32::MAX, FLOW_CAPACITY).unwrap_err();
        assert_eq!(
            e,
            "--flow-capacity 4294967295: out of range (allowed: 16–8388607 flows per worker)"
        );
        // The flag's ceiling is the engine's: a larger table would not fit its index entries.
        assert_eq!(FLOW_CAPACITY.max, f64::from(xlb_engine::flow::MAX_CAPACITY));
        assert!(count(
            "--flow-capacity",
            xlb_engine::flow::MAX_CAPACITY,
            FLOW_CAPACITY
        )
        .is_ok());
        assert!(count("--workers", 0u32, WORKERS).is_err());
        assert!(cores(&[0, 1], 2).is_ok());
        assert_eq!(
            cores(&[0, 7], 2).unwrap_err(),
            "--cores 7: no such core (allowed: 0–1 on this host)"
        );
    }
}
