//! Validation of every field an operator can set. Errors name the field at fault.

use crate::error::ModelError;
use crate::types::{Balance, CheckKind, HealthCheck, Route, Server, Upstream};
use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

pub const MAX_WEIGHT: u32 = 1000;
pub const MAX_RETRIES: u32 = 20;
pub const MAX_SERVERS: usize = 10_000;
pub const MAX_KEEPALIVE: u32 = 10_000;

/// Upstream names and route ids: 1–200 characters of `A-Z a-z 0-9 . _ - : @`.
pub fn validate_name(field: &str, name: &str) -> Result<(), ModelError> {
    if name.is_empty() {
        return Err(ModelError::invalid(field, "must not be empty"));
    }
    if name.len() > 200 {
        return Err(ModelError::invalid(field, "must be at most 200 characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@')))
    {
        return Err(ModelError::invalid(
            field,
            format!("{name:?} contains {c:?}; allowed are letters, digits and . _ - : @"),
        ));
    }
    Ok(())
}

/// A DNS name: labels of letters, digits and hyphens, at most 253 characters.
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `host:port` where host is an IPv4 address, a bracketed IPv6 address or a DNS name.
pub fn validate_address(field: &str, address: &str) -> Result<(), ModelError> {
    let bad = |why: &str| ModelError::invalid(field, format!("{address:?} {why}"));
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| bad("is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| bad("has no valid port (1-65535)"))?;
    if port == 0 {
        return Err(bad("has port 0"));
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad("has an invalid IPv6 address"))?;
        return Ok(());
    }
    if host.contains(':') {
        return Err(bad("must put an IPv6 address in brackets, like [::1]:80"));
    }
    if host.parse::<IpAddr>().is_ok() || is_dns_name(host) {
        Ok(())
    } else {
        Err(bad("has an invalid host"))
    }
}

pub fn validate_weight(field: &str, weight: u32) -> Result<(), ModelError> {
    if weight == 0 || weight > MAX_WEIGHT {
        return Err(ModelError::invalid(
            field,
            format!("{weight} is out of range 1-{MAX_WEIGHT}"),
        ));
    }
    Ok(())
}

pub fn validate_server(field: &str, server: &Server) -> Result<(), ModelError> {
    validate_address(&format!("{field}.address"), &server.address)?;
    validate_weight(&format!("{field}.weight"), server.weight)?;
    if let Some(z) = &server.zone {
        validate_zone(&format!("{field}.zone"), z)?;
    }
    Ok(())
}

/// Zones: up to 64 characters of letters, digits, `.`, `_`, `-`.
pub fn validate_zone(field: &str, zone: &str) -> Result<(), ModelError> {
    if zone.len() > 64
        || !zone
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(ModelError::invalid(
            field,
            format!("{zone:?} is not a zone name (letters, digits, . _ -)"),
        ));
    }
    Ok(())
}

/// `header:NAME`, `cookie:NAME`, `client_ip`, `uri` or `arg:NAME`.
pub fn validate_hash_key(field: &str, key: &str) -> Result<(), ModelError> {
    let ok = match key.split_once(':') {
        Some(("header", name)) => http_token(name),
        Some(("cookie", name)) | Some(("arg", name)) => {
            !name.is_empty()
                && name.len() <= 128
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'=' && b != b';' && b != b'&')
        }
        None => key == "client_ip" || key == "uri",
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(ModelError::invalid(
            field,
            format!("{key:?} is not one of header:NAME, cookie:NAME, client_ip, uri, arg:NAME"),
        ))
    }
}

fn http_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn validate_health_check(hc: &HealthCheck) -> Result<(), ModelError> {
    let ms = Duration::from_millis;
    validate_timeout("health_check.interval", hc.interval, ms(100), ms(3_600_000))?;
    validate_timeout("health_check.timeout", hc.timeout, ms(10), ms(600_000))?;
    if hc.timeout > hc.interval {
        return Err(ModelError::invalid(
            "health_check.timeout",
            "must not exceed interval",
        ));
    }
    if !(1..=100).contains(&hc.rise) {
        return Err(ModelError::invalid(
            "health_check.rise",
            format!("{} is out of range 1-100", hc.rise),
        ));
    }
    if !(1..=100).contains(&hc.fall) {
        return Err(ModelError::invalid(
            "health_check.fall",
            format!("{} is out of range 1-100", hc.fall),
        ));
    }
    if hc.kind != CheckKind::Tcp && hc.tcp_handshake.is_some() {
        return Err(ModelError::invalid(
            "health_check.tcp_handshake",
            "applies to checks of type tcp only",
        ));
    }
    if hc.kind == CheckKind::Http {
        if !hc.path.starts_with('/') || hc.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(ModelError::invalid(
                "health_check.path",
                "must start with / and have no spaces",
            ));
        }
        if !http_token(&hc.method) || hc.method != hc.method.to_ascii_uppercase() {
            return Err(ModelError::invalid(
                "health_check.method",
                format!("{:?} is not an upper-case HTTP method", hc.method),
            ));
        }
        for (name, value) in &hc.headers {
            if !http_token(name) {
                return Err(ModelError::invalid(
                    "health_check.headers",
                    format!("{name:?} is not a header name"),
                ));
            }
            if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(ModelError::invalid(
                    "health_check.headers",
                    format!("value of {name:?} has a control character"),
                ));
            }
        }
        if let Some(h) = &hc.host {
            if h.is_empty() || h.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(ModelError::invalid(
                    "health_check.host",
                    "must be a non-empty host[:port]",
                ));
            }
        }
        for s in &hc.expected_statuses {
            if !(100..=599).contains(s) {
                return Err(ModelError::invalid(
                    "health_check.expected_statuses",
                    format!("{s} is not an HTTP status"),
                ));
            }
        }
    }
    Ok(())
}

fn validate_timeout(
    field: &str,
    d: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ModelError> {
    if d < min || d > max {
        return Err(ModelError::invalid(
            field,
            format!(
                "{} is out of range {}-{}",
                crate::duration::format_duration(d),
                crate::duration::format_duration(min),
                crate::duration::format_duration(max)
            ),
        ));
    }
    Ok(())
}

pub fn validate_upstream(up: &Upstream) -> Result<(), ModelError> {
    validate_name("name", &up.name)?;
    if up.servers.len() > MAX_SERVERS {
        return Err(ModelError::invalid(
            "servers",
            format!("at most {MAX_SERVERS} servers per upstream"),
        ));
    }
    let mut seen = HashSet::new();
    for (i, s) in up.servers.iter().enumerate() {
        validate_server(&format!("servers[{i}]"), s)?;
        if !seen.insert(s.address.as_str()) {
            return Err(ModelError::invalid(
                format!("servers[{i}].address"),
                format!("duplicate server {:?}", s.address),
            ));
        }
    }
    if up.retries > MAX_RETRIES {
        return Err(ModelError::invalid(
            "retries",
            format!("{} is out of range 0-{MAX_RETRIES}", up.retries),
        ));
    }
    let ms = Duration::from_millis;
    validate_timeout("connect_timeout", up.connect_timeout, ms(1), ms(600_000))?;
    validate_timeout("read_timeout", up.read_timeout, ms(1), ms(86_400_000))?;
    validate_timeout("fail_timeout", up.fail_timeout, ms(1), ms(86_400_000))?;
    match (&up.hash_key, up.balance) {
        (Some(key), _) => validate_hash_key("hash_key", key)?,
        (None, Balance::ConsistentHash) => {
            return Err(ModelError::invalid(
                "hash_key",
                "consistent_hash needs a hash_key",
            ));
        }
        (None, _) => {}
    }
    if let Some(hc) = &up.health_check {
        validate_health_check(hc)?;
    }
    validate_timeout("slow_start", up.slow_start, Duration::ZERO, ms(3_600_000))?;
    let o = &up.outlier;
    validate_timeout(
        "outlier.base_ejection_time",
        o.base_ejection_time,
        ms(1),
        ms(86_400_000),
    )?;
    validate_timeout(
        "outlier.max_ejection_time",
        o.max_ejection_time,
        o.base_ejection_time,
        ms(86_400_000),
    )?;
    if o.max_ejection_percent > 100 {
        return Err(ModelError::invalid(
            "outlier.max_ejection_percent",
            "must be at most 100",
        ));
    }
    if up.keepalive > MAX_KEEPALIVE {
        return Err(ModelError::invalid(
            "keepalive",
            format!("{} is out of range 0-{MAX_KEEPALIVE}", up.keepalive),
        ));
    }
    Ok(())
}

/// `example.com` or `*.example.com`; compared in lower case.
pub fn validate_host_pattern(field: &str, host: &str) -> Result<(), ModelError> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    if name != name.to_ascii_lowercase() {
        return Err(ModelError::invalid(
            field,
            format!("{host:?} must be lower case"),
        ));
    }
    if !(is_dns_name(name) || name.parse::<IpAddr>().is_ok()) {
        return Err(ModelError::invalid(
            field,
            format!("{host:?} is not a host name or a *.suffix wildcard"),
        ));
    }
    Ok(())
}

pub fn validate_route(route: &Route) -> Result<(), ModelError> {
    validate_name("id", &route.id)?;
    let mut seen = HashSet::new();
    for (i, h) in route.hosts.iter().enumerate() {
        validate_host_pattern(&format!("hosts[{i}]"), h)?;
        if !seen.insert(h.as_str()) {
            return Err(ModelError::invalid(
                format!("hosts[{i}]"),
                format!("duplicate host {h:?}"),
            ));
        }
    }
    if !route.path_prefix.starts_with('/') {
        return Err(ModelError::invalid("path_prefix", "must start with /"));
    }
    if route.path_prefix.len() > 1024
        || route
            .path_prefix
            .bytes()
            .any(|b| b <= b' ' || b == 0x7f || b == b'?' || b == b'#')
    {
        return Err(ModelError::invalid(
            "path_prefix",
            "must be at most 1024 visible characters without ? or #",
        ));
    }
    for (i, m) in route.methods.iter().enumerate() {
        if m.is_empty() || m.len() > 20 || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ModelError::invalid(
                format!("methods[{i}]"),
                format!("{m:?} is not an upper-case HTTP method"),
            ));
        }
    }
    validate_name("upstream", &route.upstream)?;
    if let Some(h) = &route.upstream_host {
        if h.is_empty() || h.len() > 255 || h.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(ModelError::invalid(
                "upstream_host",
                "must be a non-empty host[:port]",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        for ok in [
            "127.0.0.1:80",
            "[::1]:8080",
            "backend.local:9000",
            "a-b.c_d:1",
        ] {
            validate_address("a", ok).unwrap();
        }
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            "::1:80",
            "bad host:80",
            ":80",
            "x:-1",
            "-a:1",
        ] {
            assert!(validate_address("a", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts() {
        validate_host_pattern("h", "shop.example.com").unwrap();
        validate_host_pattern("h", "*.example.com").unwrap();
        assert!(validate_host_pattern("h", "Shop.example.com").is_err());
        assert!(validate_host_pattern("h", "*example.com").is_err());
        assert!(validate_host_pattern("h", "a..b").is_err());
    }
}
