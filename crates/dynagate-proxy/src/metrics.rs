//! Prometheus text exposition (format 0.0.4) of the gateway's live state.

use crate::control::Controller;
use crate::stats::LATENCY_BOUNDS_MS;
use std::fmt::Write;
use std::sync::atomic::Ordering;

/// Escapes a label value: backslash, double quote and newline.
fn esc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

pub fn render(controller: &Controller) -> String {
    let snapshot = controller.snapshots().load_full();
    let now = crate::runtime::mono_ms();
    let mut out = String::with_capacity(16 * 1024);
    let mut names: Vec<&String> = snapshot.upstreams.keys().collect();
    names.sort();

    header(
        &mut out,
        "dynagate_requests_total",
        "counter",
        "Responses from upstreams by route, upstream, server and status class.",
    );
    for name in &names {
        let up = &snapshot.upstreams[*name];
        for s in &up.servers {
            for (route, counts) in s.stats.by_route().iter() {
                for (i, n) in counts.iter().enumerate() {
                    if *n > 0 {
                        let _ = writeln!(
                            out,
                            "dynagate_requests_total{{route=\"{}\",upstream=\"{}\",server=\"{}\",class=\"{}xx\"}} {n}",
                            esc(route),
                            esc(name),
                            esc(&s.spec.address),
                            i + 1
                        );
                    }
                }
            }
        }
    }
    let c = &controller.counters;
    header(
        &mut out,
        "dynagate_unproxied_requests_total",
        "counter",
        "Requests answered by dynagate itself, by reason.",
    );
    for (reason, v) in [
        ("no_route", &c.no_route),
        ("bad_request", &c.bad_request),
        ("no_server", &c.no_server),
    ] {
        let _ = writeln!(
            out,
            "dynagate_unproxied_requests_total{{reason=\"{reason}\"}} {}",
            v.load(Ordering::Relaxed)
        );
    }
    header(
        &mut out,
        "dynagate_retries_total",
        "counter",
        "Attempts on another server after a failed one.",
    );
    let _ = writeln!(
        out,
        "dynagate_retries_total {}",
        c.retries.load(Ordering::Relaxed)
    );

    header(
        &mut out,
        "dynagate_upstream_response_seconds",
        "histogram",
        "Time from sending a request upstream to its response head.",
    );
    for name in &names {
        let up = &snapshot.upstreams[*name];
        for s in &up.servers {
            let labels = format!(
                "upstream=\"{}\",server=\"{}\"",
                esc(name),
                esc(&s.spec.address)
            );
            let counts = s.stats.latency_counts();
            let mut cumulative = 0;
            for (i, bound) in LATENCY_BOUNDS_MS.iter().enumerate() {
                cumulative += counts[i];
                let _ = writeln!(
                    out,
                    "dynagate_upstream_response_seconds_bucket{{{labels},le=\"{}\"}} {cumulative}",
                    bound / 1000.0
                );
            }
            cumulative += counts[LATENCY_BOUNDS_MS.len()];
            let _ = writeln!(
                out,
                "dynagate_upstream_response_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
            );
            let sum = s.stats.latency_sum_us() as f64 / 1e6;
            let _ = writeln!(
                out,
                "dynagate_upstream_response_seconds_sum{{{labels}}} {sum}"
            );
            let _ = writeln!(
                out,
                "dynagate_upstream_response_seconds_count{{{labels}}} {cumulative}"
            );
        }
    }

    type Gauge = fn(&crate::runtime::UpstreamRuntime, usize, u64) -> f64;
    let per_server: [(&str, &str, &str, Gauge); 7] = [
        (
            "dynagate_server_in_flight",
            "gauge",
            "Requests in flight.",
            |u, i, _| u.servers[i].stats.in_flight() as f64,
        ),
        (
            "dynagate_server_failures_total",
            "counter",
            "Failed attempts: connect errors, timeouts, broken responses.",
            |u, i, _| u.servers[i].stats.failures.load(Ordering::Relaxed) as f64,
        ),
        (
            "dynagate_server_available",
            "gauge",
            "1 if the server takes new requests now.",
            |u, i, now| u.available(i, now) as u8 as f64,
        ),
        (
            "dynagate_server_healthy",
            "gauge",
            "Active health: 1 healthy or unchecked, 0 unhealthy.",
            |u, i, _| {
                (u.servers[i].stats.health() != crate::runtime::Health::Unhealthy) as u8 as f64
            },
        ),
        (
            "dynagate_server_ejected",
            "gauge",
            "1 while outlier detection or passive health keeps the server out.",
            |u, i, now| {
                let s = &u.servers[i].stats;
                (s.ejected(now) || s.passive_skipped(now)) as u8 as f64
            },
        ),
        (
            "dynagate_server_ejections_total",
            "counter",
            "Outlier ejections.",
            |u, i, _| u.servers[i].stats.ejections.load(Ordering::Relaxed) as f64,
        ),
        (
            "dynagate_server_weight",
            "gauge",
            "Effective weight after slow start.",
            |u, i, _| u.current_weight(i),
        ),
    ];
    for (metric, kind, help, value) in per_server {
        header(&mut out, metric, kind, help);
        for name in &names {
            let up = &snapshot.upstreams[*name];
            for (i, s) in up.servers.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{metric}{{upstream=\"{}\",server=\"{}\"}} {}",
                    esc(name),
                    esc(&s.spec.address),
                    value(up, i, now)
                );
            }
        }
    }
    header(
        &mut out,
        "dynagate_server_state",
        "gauge",
        "Admin state of each server (1 for the state in force).",
    );
    for name in &names {
        for s in &snapshot.upstreams[*name].servers {
            let _ = writeln!(
                out,
                "dynagate_server_state{{upstream=\"{}\",server=\"{}\",state=\"{}\"}} 1",
                esc(name),
                esc(&s.spec.address),
                s.spec.state.as_str()
            );
        }
    }

    header(
        &mut out,
        "dynagate_config_revision",
        "gauge",
        "Revision of the configuration in force.",
    );
    let _ = writeln!(out, "dynagate_config_revision {}", snapshot.revision);
    header(
        &mut out,
        "dynagate_upstreams",
        "gauge",
        "Configured upstreams.",
    );
    let _ = writeln!(out, "dynagate_upstreams {}", snapshot.upstreams.len());
    header(&mut out, "dynagate_routes", "gauge", "Configured routes.");
    let _ = writeln!(out, "dynagate_routes {}", snapshot.routes.len());
    header(
        &mut out,
        "dynagate_uptime_seconds",
        "gauge",
        "Seconds since start.",
    );
    let _ = writeln!(
        out,
        "dynagate_uptime_seconds {}",
        controller.uptime().as_secs()
    );
    controller.render_extra_metrics(&mut out);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_labels() {
        assert_eq!(super::esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
