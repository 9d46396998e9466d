//! Access log: nginx `combined` (plus upstream address and times) or JSON lines, to a
//! file or stdout. Workers hand entries to a dedicated writer thread through a bounded
//! queue; when the queue is full the entry is dropped and counted — logging never blocks
//! the request path.

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Combined,
    Json,
}

/// One finished request.
#[derive(Debug)]
pub struct Entry {
    pub time: SystemTime,
    pub client: IpAddr,
    pub method: http::Method,
    pub uri: http::Uri,
    pub version: http::Version,
    pub host: Option<http::HeaderValue>,
    pub status: u16,
    pub bytes_sent: u64,
    pub referer: Option<http::HeaderValue>,
    pub user_agent: Option<http::HeaderValue>,
    pub route: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
    pub upstream_addr: Option<Arc<str>>,
    pub upstream_time: Option<Duration>,
    pub total_time: Duration,
}

#[derive(Debug)]
pub struct AccessLog {
    tx: SyncSender<Entry>,
    pub dropped: AtomicU64,
    pub written: Arc<AtomicU64>,
}

const QUEUE: usize = 16_384;

impl AccessLog {
    /// `target` is `stdout` or a file path (appended to).
    pub fn open(target: &str, format: LogFormat) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = if target == "stdout" || target == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(target)?,
            )
        };
        let (tx, rx) = sync_channel::<Entry>(QUEUE);
        let written = Arc::new(AtomicU64::new(0));
        let counter = written.clone();
        std::thread::Builder::new()
            .name("dynagate-access-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
                let mut line = String::with_capacity(512);
                while let Ok(entry) = rx.recv() {
                    let mut next = Some(entry);
                    // Write everything queued, then flush once.
                    while let Some(e) = next {
                        line.clear();
                        match format {
                            LogFormat::Combined => combined(&e, &mut line),
                            LogFormat::Json => json(&e, &mut line),
                        }
                        let _ = out.write_all(line.as_bytes());
                        counter.fetch_add(1, Ordering::Relaxed);
                        next = rx.try_recv().ok();
                    }
                    let _ = out.flush();
                }
                let _ = out.flush();
            })?;
        Ok(AccessLog {
            tx,
            dropped: AtomicU64::new(0),
            written,
        })
    }

    pub fn log(&self, entry: Entry) {
        match self.tx.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn header_str(v: &Option<http::HeaderValue>) -> &str {
    v.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-")
}

fn version_str(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + if m <= 2 { 1 } else { 0 }, m, d)
}

struct Utc {
    year: i64,
    month: u32,
    day: u32,
    hour: u64,
    min: u64,
    sec: u64,
    millis: u32,
}

fn utc(t: SystemTime) -> Utc {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (year, month, day) = civil((secs / 86_400) as i64);
    Utc {
        year,
        month,
        day,
        hour: secs % 86_400 / 3600,
        min: secs % 3600 / 60,
        sec: secs % 60,
        millis: d.subsec_millis(),
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `$remote_addr - - [$time_local] "$request" $status $body_bytes_sent "$http_referer"
/// "$http_user_agent"` followed by `$upstream_addr $upstream_response_time $request_time`.
pub fn combined(e: &Entry, out: &mut String) {
    use std::fmt::Write as _;
    let t = utc(e.time);
    let _ =
        writeln!(
        out,
        "{} - - [{:02}/{}/{}:{:02}:{:02}:{:02} +0000] \"{} {} {}\" {} {} \"{}\" \"{}\" {} {} {:.3}",
        e.client,
        t.day,
        MONTHS[(t.month - 1) as usize],
        t.year,
        t.hour,
        t.min,
        t.sec,
        e.method,
        e.uri,
        version_str(e.version),
        e.status,
        e.bytes_sent,
        header_str(&e.referer).replace('"', "\\x22"),
        header_str(&e.user_agent).replace('"', "\\x22"),
        e.upstream_addr.as_deref().unwrap_or("-"),
        e.upstream_time.map(|d| format!("{:.3}", d.as_secs_f64())).unwrap_or_else(|| "-".into()),
        e.total_time.as_secs_f64(),
    );
}

pub fn json(e: &Entry, out: &mut String) {
    let t = utc(e.time);
    let value = serde_json::json!({
        "time": format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z", t.year, t.month, t.day, t.hour, t.min, t.sec, t.millis),
        "client": e.client.to_string(),
        "method": e.method.as_str(),
        "uri": e.uri.to_string(),
        "protocol": version_str(e.version),
        "host": e.host.as_ref().and_then(|v| v.to_str().ok()),
        "status": e.status,
        "bytes_sent": e.bytes_sent,
        "referer": e.referer.as_ref().and_then(|v| v.to_str().ok()),
        "user_agent": e.user_agent.as_ref().and_then(|v| v.to_str().ok()),
        "route": e.route.as_deref(),
        "upstream": e.upstream.as_deref(),
        "upstream_addr": e.upstream_addr.as_deref(),
        "upstream_time": e.upstream_time.map(|d| d.as_secs_f64()),
        "total_time": e.total_time.as_secs_f64(),
    });
    out.push_str(&value.to_string());
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            time: UNIX_EPOCH + Duration::from_secs(971_186_136),
            client: "10.0.0.1".parse().unwrap(),
            method: http::Method::GET,
            uri: "/a?b=1".parse().unwrap(),
            version: http::Version::HTTP_11,
            host: Some(http::HeaderValue::from_static("shop.example.com")),
            status: 200,
            bytes_sent: 1234,
            referer: None,
            user_agent: Some(http::HeaderValue::from_static("curl/8 \"x\"")),
            route: Some(Arc::from("r1")),
            upstream: Some(Arc::from("shop")),
            upstream_addr: Some(Arc::from("127.0.0.1:9001")),
            upstream_time: Some(Duration::from_millis(12)),
            total_time: Duration::from_millis(13),
        }
    }

    #[test]
    fn combined_line() {
        let mut s = String::new();
        combined(&entry(), &mut s);
        assert_eq!(
            s,
            "10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] \"GET /a?b=1 HTTP/1.1\" 200 1234 \"-\" \"curl/8 \\x22x\\x22\" 127.0.0.1:9001 0.012 0.013\n"
        );
    }

    #[test]
    fn json_line() {
        let mut s = String::new();
        json(&entry(), &mut s);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["time"], "2000-10-10T13:55:36.000Z");
        assert_eq!(v["upstream_addr"], "127.0.0.1:9001");
        assert_eq!(v["status"], 200);
    }
}
