//! Request bodies as Consul's Go decoder reads them: keys match case-insensitively
//! (`name`, `Name`, `NAME`), snake_case aliases (`deregister_critical_service_after`,
//! `tls_skip_verify`, `enable_tag_override`, `tagged_addresses`) match too, `null` means
//! absent, durations are Go strings or integer nanoseconds.

use crate::duration::{from_nanos, parse_go_duration};
use crate::model::{CheckKind, CheckStatus, ServiceDef, TaggedAddress, Weights};
use crate::ops::{CheckSpec, ServiceRegistration};
use crate::ApiError;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::time::Duration;

const MAX_NAME_LEN: usize = 512;

fn decode_err(msg: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("Request decode failed: {msg}"))
}

/// Parses a JSON body into an object.
pub(crate) fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(decode_err("EOF"));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(decode_err(format!(
            "json: cannot unmarshal {} into an object",
            kind(&other)
        ))),
        Err(e) => Err(decode_err(e)),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn norm(k: &str) -> String {
    k.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// A JSON object read the Go way.
pub(crate) struct Obj<'a> {
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Obj { map }
    }

    /// The value for `name` (exact key first, then case-/underscore-insensitive); `null`
    /// counts as absent.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        let v = self.map.get(name).or_else(|| {
            let want = norm(name);
            self.map
                .iter()
                .find(|(k, _)| norm(k) == want)
                .map(|(_, v)| v)
        })?;
        (!v.is_null()).then_some(v)
    }

    pub fn string(&self, name: &str) -> Result<Option<String>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(type_err(name, "string", v)),
        }
    }

    pub fn string_or_empty(&self, name: &str) -> Result<String, ApiError> {
        Ok(self.string(name)?.unwrap_or_default())
    }

    pub fn bool(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(type_err(name, "bool", v)),
        }
    }

    pub fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e18)
                        .map(|f| f as i64)
                })
                .map(Some)
                .ok_or_else(|| decode_err(format!("{name}: {n} is not an integer"))),
            Some(v) => Err(type_err(name, "int", v)),
        }
    }

    /// A Go duration: string (`"10s"`) or integer nanoseconds. Signed nanoseconds.
    pub fn duration(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => parse_go_duration(s)
                .map(Some)
                .map_err(|e| decode_err(format!("{name}: {e}"))),
            Some(Value::Number(_)) => self.int(name),
            Some(v) => Err(type_err(name, "duration", v)),
        }
    }

    pub fn string_list(&self, name: &str) -> Result<Vec<String>, ApiError> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(type_err(name, "string", other)),
                })
                .collect(),
            Some(v) => Err(type_err(name, "[]string", v)),
        }
    }

    pub fn string_map(&self, name: &str) -> Result<BTreeMap<String, String>, ApiError> {
        match self.get(name) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Err(type_err(&format!("{name}.{k}"), "string", other)),
                })
                .collect(),
            Some(v) => Err(type_err(name, "map[string]string", v)),
        }
    }

    /// `Header`: map of lists of strings (a plain string is taken as a one-item list).
    pub fn header_map(&self, name: &str) -> Result<BTreeMap<String, Vec<String>>, ApiError> {
        match self.get(name) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(m)) => {
                let mut out = BTreeMap::new();
                for (k, v) in m {
                    let vals = match v {
                        Value::Null => Vec::new(),
                        Value::String(s) => vec![s.clone()],
                        Value::Array(a) => a
                            .iter()
                            .map(|x| match x {
                                Value::String(s) => Ok(s.clone()),
                                other => Err(type_err(&format!("{name}.{k}"), "string", other)),
                            })
                            .collect::<Result<_, _>>()?,
                        other => return Err(type_err(&format!("{name}.{k}"), "[]string", other)),
                    };
                    out.insert(k.clone(), vals);
                }
                Ok(out)
            }
            Some(v) => Err(type_err(name, "map[string][]string", v)),
        }
    }

    pub fn object(&self, name: &str) -> Result<Option<Obj<'a>>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Obj::new(m))),
            Some(v) => Err(type_err(name, "object", v)),
        }
    }

    pub fn object_list(&self, name: &str) -> Result<Vec<Obj<'a>>, ApiError> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .filter(|v| !v.is_null())
                .map(|v| match v {
                    Value::Object(m) => Ok(Obj::new(m)),
                    other => Err(type_err(name, "object", other)),
                })
                .collect(),
            Some(v) => Err(type_err(name, "array", v)),
        }
    }

    /// Whether every value is a zero value (Go's `Empty()` on a check definition).
    pub fn is_zero(&self) -> bool {
        self.map.values().all(|v| match v {
            Value::Null => true,
            Value::Bool(b) => !b,
            Value::Number(n) => n.as_f64() == Some(0.0),
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
        })
    }
}

fn type_err(name: &str, want: &str, got: &Value) -> ApiError {
    decode_err(format!(
        "json: cannot unmarshal {} into Go struct field {name} of type {want}",
        kind(got)
    ))
}

fn check_err(msg: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("Invalid check: {msg}"))
}

const SCRIPT_REFUSED: &str = "script checks (Args/ScriptArgs/Script) are refused by this \
    registry: running a command on request is remote code execution. Use an HTTP, TCP or TTL check";

/// A check definition (`Check`, an item of `Checks`, or the body of
/// `/agent/check/register`). `None` for an all-zero object (Go skips an empty `Check`).
pub(crate) fn parse_check(o: &Obj<'_>, allow_empty: bool) -> Result<Option<CheckSpec>, ApiError> {
    if allow_empty && o.is_zero() {
        return Ok(None);
    }
    for script in ["Args", "ScriptArgs", "Script", "Shell"] {
        if let Some(v) = o.get(script) {
            let used = match v {
                Value::Array(a) => !a.is_empty(),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if used {
                return Err(check_err(SCRIPT_REFUSED));
            }
        }
    }
    for (field, what) in [
        ("GRPC", "gRPC"),
        ("UDP", "UDP"),
        ("H2PING", "H2PING"),
        ("DockerContainerID", "Docker"),
        ("AliasService", "alias"),
        ("AliasNode", "alias"),
        ("OSService", "OS service"),
    ] {
        if o.get(field)
            .is_some_and(|v| v != &Value::String(String::new()))
        {
            return Err(check_err(format!(
                "{what} checks are not supported by this registry; use an HTTP, TCP or TTL check"
            )));
        }
    }
    let id = match o.string("CheckID")? {
        Some(s) if !s.is_empty() => Some(s),
        _ => o.string("ID")?.filter(|s| !s.is_empty()),
    };
    let name = o.string("Name")?;
    let notes = o.string_or_empty("Notes")?;
    let service_id = o.string("ServiceID")?.filter(|s| !s.is_empty());
    let status = match o.string("Status")?.filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            CheckStatus::parse(&s)
                .ok_or_else(|| ApiError::bad_request(format!("Invalid check status: '{s}'")))?,
        ),
    };
    let interval = o.duration("Interval")?.unwrap_or(0);
    let ttl = o.duration("TTL")?.unwrap_or(0);
    let timeout = o.duration("Timeout")?.unwrap_or(0);
    let dereg = o.duration("DeregisterCriticalServiceAfter")?.unwrap_or(0);
    let http_url = o.string_or_empty("HTTP")?;
    let tcp = o.string_or_empty("TCP")?;
    if interval > 0 && ttl > 0 {
        return Err(check_err("Interval and TTL cannot both be specified"));
    }
    let interval_check = !http_url.is_empty() || !tcp.is_empty();
    if !http_url.is_empty() && !tcp.is_empty() {
        return Err(check_err("a check is either HTTP or TCP, not both"));
    }
    if interval_check && interval <= 0 {
        return Err(check_err(
            "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
        ));
    }
    if !interval_check && ttl <= 0 {
        return Err(check_err("TTL must be > 0 for TTL checks"));
    }
    let interval = from_nanos(interval).max(Duration::from_secs(1));
    let timeout = if timeout > 0 {
        from_nanos(timeout)
    } else {
        Duration::from_secs(10)
    };
    let kind = if !http_url.is_empty() {
        let uri: http::Uri = http_url
            .parse()
            .map_err(|e| check_err(format!("HTTP: invalid URL {http_url:?}: {e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(check_err(
                    "HTTPS health checks are not supported by this registry (it has no TLS \
                     client); use an http:// URL, a TCP check or a TTL check",
                ))
            }
            _ => {
                return Err(check_err(format!(
                    "HTTP: {http_url:?} is not an http:// URL"
                )))
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(check_err(format!("HTTP: {http_url:?} has no host")));
        }
        let method = o
            .string("Method")?
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| "GET".into());
        if http::Method::from_bytes(method.as_bytes()).is_err() {
            return Err(check_err(format!(
                "Method: {method:?} is not an HTTP method"
            )));
        }
        let header = o.header_map("Header")?;
        for (k, vs) in &header {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err()
                || vs.iter().any(|v| http::HeaderValue::from_str(v).is_err())
            {
                return Err(check_err(format!(
                    "Header: {k:?} is not a valid HTTP header"
                )));
            }
        }
        CheckKind::Http {
            url: http_url,
            method,
            header,
            body: o.string_or_empty("Body")?,
            tls_skip_verify: o.bool("TLSSkipVerify")?,
            interval,
            timeout,
        }
    } else if !tcp.is_empty() {
        match tcp.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {}
            _ => return Err(check_err(format!("TCP: {tcp:?} is not host:port"))),
        }
        CheckKind::Tcp {
            address: tcp,
            interval,
            timeout,
        }
    } else {
        CheckKind::Ttl {
            ttl: from_nanos(ttl),
        }
    };
    Ok(Some(CheckSpec {
        id,
        name,
        notes,
        service_id,
        kind,
        status,
        deregister_after: (dereg > 0).then(|| from_nanos(dereg)),
    }))
}

fn validate_meta(meta: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let bad = |m: String| ApiError::bad_request(format!("Invalid Service Meta: {m}"));
    if meta.len() > 64 {
        return Err(bad(
            "Node metadata cannot contain more than 64 key/value pairs".into(),
        ));
    }
    for (k, v) in meta {
        if k.is_empty() {
            return Err(bad("Key cannot be blank".into()));
        }
        if k.len() > 128 {
            return Err(bad(format!(
                "Key is too long (limit: 128 characters): {k:?}"
            )));
        }
        if !k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(bad(format!(
                "Couldn't load metadata pair ('{k}', '{v}'): Key contains invalid characters"
            )));
        }
        if k.starts_with("consul-") {
            return Err(bad(format!(
                "Key prefix 'consul-' is reserved for internal use: {k:?}"
            )));
        }
        if v.len() > 512 {
            return Err(bad(format!(
                "Value is too long (limit: 512 characters): {k:?}"
            )));
        }
    }
    Ok(())
}

/// `PUT /agent/service/register` body.
pub(crate) fn parse_service(
    body: &[u8],
    replace_existing_checks: bool,
) -> Result<ServiceRegistration, ApiError> {
    let map = parse_object(body)?;
    let o = Obj::new(&map);
    let name = o.string_or_empty("Name")?;
    if name.is_empty() {
        return Err(ApiError::bad_request("Missing service name"));
    }
    let id = o
        .string("ID")?
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| name.clone());
    if name.len() > MAX_NAME_LEN || id.len() > MAX_NAME_LEN {
        return Err(ApiError::bad_request(format!(
            "Service name and ID must be at most {MAX_NAME_LEN} bytes"
        )));
    }
    let port = match o.int("Port")? {
        None => 0,
        Some(p) => u16::try_from(p)
            .map_err(|_| decode_err(format!("Port: {p} is not a valid port (0-65535)")))?,
    };
    let meta = o.string_map("Meta")?;
    validate_meta(&meta)?;
    let mut tagged_addresses = BTreeMap::new();
    if let Some(ta) = o.object("TaggedAddresses")? {
        for (k, v) in ta.map {
            let Value::Object(m) = v else {
                if v.is_null() {
                    continue;
                }
                return Err(type_err(
                    &format!("TaggedAddresses.{k}"),
                    "ServiceAddress",
                    v,
                ));
            };
            let a = Obj::new(m);
            let port = a.int("Port")?.unwrap_or(0);
            tagged_addresses.insert(
                k.clone(),
                TaggedAddress {
                    address: a.string_or_empty("Address")?,
                    port: u16::try_from(port).map_err(|_| {
                        decode_err(format!(
                            "TaggedAddresses.{k}.Port: {port} is not a valid port"
                        ))
                    })?,
                },
            );
        }
    }
    let weights = match o.object("Weights")? {
        None => Weights::default(),
        Some(w) => {
            let passing = w.int("Passing")?.unwrap_or(0);
            let warning = w.int("Warning")?.unwrap_or(0);
            if passing < 1 {
                return Err(ApiError::bad_request(
                    "Invalid Weights: Passing must be greater than 0",
                ));
            }
            if warning < 0 {
                return Err(ApiError::bad_request(
                    "Invalid Weights: Warning must be greater or equal than 0",
                ));
            }
            Weights { passing, warning }
        }
    };
    let mut checks = Vec::new();
    if let Some(c) = o.object("Check")? {
        checks.extend(parse_check(&c, true)?);
    }
    for c in o.object_list("Checks")? {
        if let Some(spec) = parse_check(&c, true)? {
            checks.push(spec);
        }
    }
    Ok(ServiceRegistration {
        def: ServiceDef {
            id,
            name,
            tags: o.string_list("Tags")?,
            address: o.string_or_empty("Address")?,
            port,
            meta,
            tagged_addresses,
            weights,
            enable_tag_override: o.bool("EnableTagOverride")?,
            kind: o.string_or_empty("Kind")?,
            create_index: 0,
            modify_index: 0,
        },
        checks,
        replace_existing_checks,
    })
}

/// `PUT /agent/check/register` body.
pub(crate) fn parse_check_registration(body: &[u8]) -> Result<CheckSpec, ApiError> {
    let map = parse_object(body)?;
    let o = Obj::new(&map);
    if o.string("Name")?.unwrap_or_default().is_empty() {
        return Err(ApiError::bad_request("Missing check name"));
    }
    match parse_check(&o, false)? {
        Some(spec) => Ok(spec),
        None => Err(check_err("TTL must be > 0 for TTL checks")),
    }
}

/// `PUT /agent/check/update/:id` body: `(status, output)`.
pub(crate) fn parse_check_update(body: &[u8]) -> Result<(CheckStatus, String), ApiError> {
    let map = parse_object(body)?;
    let o = Obj::new(&map);
    let status = o.string_or_empty("Status")?;
    let status = CheckStatus::parse(&status)
        .ok_or_else(|| ApiError::bad_request(format!("Invalid check status: '{status}'")))?;
    Ok((status, o.string_or_empty("Output")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowercase_keys_and_aliases() {
        let r = parse_service(
            br#"{"name":"web","id":"web1","address":"10.0.0.1","port":8080,"tags":["a"],
                 "enable_tag_override":true,"meta":{"k":"v"},
                 "checks":[{"http":"http://127.0.0.1:1/h","interval":"10s",
                            "deregister_critical_service_after":"30s","tls_skip_verify":true},
                           {"ttl":"15s","status":"passing"}]}"#,
            false,
        )
        .unwrap();
        assert_eq!(r.def.id, "web1");
        assert_eq!(r.def.port, 8080);
        assert!(r.def.enable_tag_override);
        assert_eq!(r.checks.len(), 2);
        assert_eq!(r.checks[0].deregister_after, Some(Duration::from_secs(30)));
        assert!(matches!(
            r.checks[0].kind,
            CheckKind::Http {
                tls_skip_verify: true,
                ..
            }
        ));
        assert_eq!(r.checks[1].status, Some(CheckStatus::Passing));
    }

    #[test]
    fn nulls_and_empty_check() {
        let r = parse_service(
            br#"{"Name":"x","ID":null,"Tags":null,"Meta":null,"Check":null,"Checks":null,"Weights":null}"#,
            false,
        )
        .unwrap();
        assert_eq!(r.def.id, "x");
        assert!(r.def.tags.is_empty() && r.checks.is_empty());
        assert_eq!(r.def.weights, Weights::default());
        let r = parse_service(br#"{"Name":"x","Check":{}}"#, false).unwrap();
        assert!(r.checks.is_empty());
    }

    #[test]
    fn integer_nanosecond_durations() {
        let r = parse_service(br#"{"Name":"x","Check":{"TTL":15000000000}}"#, false).unwrap();
        assert_eq!(
            r.checks[0].kind,
            CheckKind::Ttl {
                ttl: Duration::from_secs(15)
            }
        );
    }

    #[test]
    fn refusals() {
        let e = parse_service(
            br#"{"Name":"x","Check":{"Args":["/bin/true"],"Interval":"10s"}}"#,
            false,
        )
        .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.msg.contains("remote code execution"), "{}", e.msg);
        let e = parse_service(
            br#"{"Name":"x","Check":{"HTTP":"https://x/","Interval":"1s"}}"#,
            false,
        )
        .unwrap_err();
        assert!(e.msg.contains("HTTPS"), "{}", e.msg);
        let e = parse_service(br#"{"Name":"x","Check":{"HTTP":"http://x/"}}"#, false).unwrap_err();
        assert!(
            e.msg.starts_with("Invalid check: Interval must be > 0"),
            "{}",
            e.msg
        );
        let e = parse_service(br#"{"Name":"x","Check":{"Name":"c"}}"#, false).unwrap_err();
        assert_eq!(e.msg, "Invalid check: TTL must be > 0 for TTL checks");
        let e = parse_service(
            br#"{"Name":"x","Check":{"TTL":"1s","Interval":"1s"}}"#,
            false,
        )
        .unwrap_err();
        assert!(e.msg.contains("cannot both"), "{}", e.msg);
        let e = parse_service(br#"{"Port":1}"#, false).unwrap_err();
        assert_eq!(e.msg, "Missing service name");
        let e = parse_service(br#"{"Name":"x","Port":"80"}"#, false).unwrap_err();
        assert!(e.msg.starts_with("Request decode failed:"), "{}", e.msg);
        let e = parse_service(b"{not json", false).unwrap_err();
        assert!(e.msg.starts_with("Request decode failed:"), "{}", e.msg);
        let e = parse_service(br#"{"Name":"x","Port":70000}"#, false).unwrap_err();
        assert_eq!(e.status, 400);
        let e = parse_service(br#"{"Name":"x","Weights":{"Passing":0}}"#, false).unwrap_err();
        assert!(e.msg.contains("Passing must be greater than 0"));
        let e = parse_service(br#"{"Name":"x","Meta":{"bad key":"v"}}"#, false).unwrap_err();
        assert!(e.msg.starts_with("Invalid Service Meta"));
    }
}
