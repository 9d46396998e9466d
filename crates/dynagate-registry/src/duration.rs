//! Go `time.Duration` as Consul clients send it: a string such as `"10s"`, `"1m30s"`,
//! `"300000ms"`, `"1.5h"`, `"-2s"`, or an integer number of nanoseconds.

use std::time::Duration;

/// Parses a Go duration string into signed nanoseconds.
pub fn parse_go_duration(text: &str) -> Result<i64, String> {
    let s = text.trim();
    let bad = || format!("time: invalid duration {text:?}");
    if s.is_empty() {
        return Err(bad());
    }
    let (neg, mut rest) = match s.as_bytes()[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(bad());
        }
        let num = &rest[..num_len];
        if num == "." {
            return Err(bad());
        }
        let value: f64 = num.parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        if unit_len == 0 {
            return Err(format!("time: missing unit in duration {text:?}"));
        }
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(format!("time: unknown unit {unit:?} in duration {text:?}")),
        };
        total += value * scale;
    }
    if !total.is_finite() || total > i64::MAX as f64 {
        return Err(bad());
    }
    let n = total as i64;
    Ok(if neg { -n } else { n })
}

/// Nanoseconds to a std Duration; negative values become zero.
pub fn from_nanos(n: i64) -> Duration {
    Duration::from_nanos(n.max(0) as u64)
}

/// Formats like Go's `Duration.String()`: `"10s"`, `"1m30s"`, `"1h0m0s"`, `"500ms"`, `"0s"`.
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}µs", trim_frac(nanos, 1_000));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", trim_frac(nanos, 1_000_000));
    }
    let secs_total = d.as_secs();
    let h = secs_total / 3600;
    let m = (secs_total % 3600) / 60;
    let s_nanos = nanos - u128::from(h * 3600 + m * 60) * 1_000_000_000;
    let s = trim_frac(s_nanos, 1_000_000_000);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

fn trim_frac(value: u128, unit: u128) -> String {
    let whole = value / unit;
    let frac = value % unit;
    if frac == 0 {
        return whole.to_string();
    }
    let width = unit.to_string().len() - 1;
    let frac = format!("{frac:0width$}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_strings() {
        assert_eq!(parse_go_duration("10s").unwrap(), 10_000_000_000);
        assert_eq!(parse_go_duration("1m30s").unwrap(), 90_000_000_000);
        assert_eq!(parse_go_duration("300000ms").unwrap(), 300_000_000_000);
        assert_eq!(parse_go_duration("1.5h").unwrap(), 5_400_000_000_000);
        assert_eq!(parse_go_duration("0").unwrap(), 0);
        assert_eq!(parse_go_duration("-2s").unwrap(), -2_000_000_000);
        assert_eq!(parse_go_duration("250us").unwrap(), 250_000);
        assert!(parse_go_duration("").is_err());
        assert!(parse_go_duration("10").is_err());
        assert!(parse_go_duration("s").is_err());
        assert!(parse_go_duration("10x").is_err());
        assert!(parse_go_duration(".").is_err());
        assert!(parse_go_duration("99999999999999h").is_err());
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format_go_duration(Duration::from_secs(10)), "10s");
        assert_eq!(format_go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(format_go_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_go_duration(Duration::ZERO), "0s");
    }
}
