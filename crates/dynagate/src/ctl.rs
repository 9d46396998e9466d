//! `dynagate ctl`: drives a running gateway through its admin API (docs/admin-api.md).
//!
//! Where to connect: `--admin`, else `DYNAGATE_ADMIN_URL`, else the `admin` address in
//! `<data-dir>/run.json` (written by `dynagate run`), else 127.0.0.1:9180. The token:
//! `--token`, else `DYNAGATE_ADMIN_TOKEN`, else `<data-dir>/admin.token`.
//!
//! Exit status: 0 done; 1 the API refused (its status and body are printed as sent);
//! 2 a local problem (arguments, files, cannot connect); 3 `server drain --wait` timed out.

use clap::{Args, Subcommand, ValueEnum};
use dynagate_admin::client::{Client, Reply};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const DEFAULT_ADMIN: &str = "127.0.0.1:9180";
const DEFAULT_DATA_DIR: &str = "./dynagate-data";

#[derive(Args, Debug)]
#[command(
    after_help = "Exit status: 0 ok, 1 refused by the API, 2 local error or unreachable, 3 drain timed out."
)]
pub struct CtlArgs {
    /// Admin API, as host:port or http://host:port [default: the `admin` entry of
    /// <data-dir>/run.json, else 127.0.0.1:9180]
    #[arg(
        long,
        env = "DYNAGATE_ADMIN_URL",
        global = true,
        value_name = "URL_OR_ADDR",
        help_heading = "Global options"
    )]
    admin: Option<String>,
    /// Admin token [default: the contents of <data-dir>/admin.token]
    #[arg(
        long,
        env = "DYNAGATE_ADMIN_TOKEN",
        global = true,
        hide_env_values = true,
        help_heading = "Global options"
    )]
    token: Option<String>,
    /// Data directory of the gateway, for run.json and admin.token [default: ./dynagate-data]
    #[arg(
        long,
        env = "DYNAGATE_DATA_DIR",
        global = true,
        help_heading = "Global options"
    )]
    data_dir: Option<PathBuf>,
    /// Print the API's JSON answers as they are instead of tables
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// List, show, create or replace, and delete upstreams
    #[command(subcommand)]
    Upstream(UpstreamCmd),
    /// Add, change, remove and drain one server of an upstream
    #[command(subcommand)]
    Server(ServerCmd),
    /// List, show, create or replace, and delete routes
    #[command(subcommand)]
    Route(RouteCmd),
    /// Recent revisions (every accepted change), newest first
    Revisions {
        /// How many [default: 100]
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Restore the routes and upstreams of revision N (recorded as a new revision)
    Rollback {
        #[arg(value_name = "N")]
        revision: u64,
    },
}

#[derive(Subcommand, Debug)]
enum UpstreamCmd {
    /// All upstreams with server counts and live totals
    List,
    /// One upstream: its settings and each server with live counters
    Get { name: String },
    /// Create or replace an upstream.
    ///
    /// With --server, settings not given (timeouts, max_fails, ..., and the state,
    /// backup flag and weight of servers already present) keep their current values.
    /// With --file, the file is the whole upstream as JSON (`-` reads standard input);
    /// --balance/--retries override its fields.
    Put {
        name: String,
        /// A server, repeatable: host:port, or host:port=WEIGHT
        #[arg(long = "server", value_name = "ADDR[=WEIGHT]", conflicts_with = "file")]
        servers: Vec<String>,
        /// Upstream JSON, e.g. {"servers":[{"address":"127.0.0.1:9001"}],"retries":2}
        #[arg(long, value_name = "F.json")]
        file: Option<PathBuf>,
        /// Balancing method (round_robin)
        #[arg(long, value_name = "METHOD")]
        balance: Option<String>,
        /// Other servers to try after a failed attempt (0-20)
        #[arg(long)]
        retries: Option<u32>,
        /// Allow leaving the upstream without servers
        #[arg(long)]
        force: bool,
    },
    /// Delete an upstream (refused while routes use it)
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
enum ServerCmd {
    /// Add a server to an upstream
    Add {
        upstream: String,
        #[arg(value_name = "ADDR")]
        address: String,
        /// 1-1000 [default: 1]
        #[arg(long)]
        weight: Option<u32>,
        /// Take traffic only when no primary server is available
        #[arg(long)]
        backup: bool,
    },
    /// Change the weight, state or backup flag of a server
    Set {
        upstream: String,
        #[arg(value_name = "ADDR")]
        address: String,
        /// 1-1000
        #[arg(long)]
        weight: Option<u32>,
        /// up: takes requests; drain: no new requests, in-flight ones finish; down: out
        #[arg(long)]
        state: Option<StateArg>,
        /// Backup servers take traffic only when no primary server is available
        #[arg(long, value_name = "true|false", action = clap::ArgAction::Set)]
        backup: Option<bool>,
    },
    /// Remove a server (the last one needs --force)
    Remove {
        upstream: String,
        #[arg(value_name = "ADDR")]
        address: String,
        #[arg(long)]
        force: bool,
    },
    /// Stop sending new requests to a server; with --wait, wait for its in-flight
    /// requests to finish
    Drain {
        upstream: String,
        #[arg(value_name = "ADDR")]
        address: String,
        #[arg(long)]
        wait: bool,
        /// Longest wait with --wait, e.g. 90s or 5m
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum StateArg {
    Up,
    Drain,
    Down,
}

impl StateArg {
    fn as_str(self) -> &'static str {
        match self {
            StateArg::Up => "up",
            StateArg::Drain => "drain",
            StateArg::Down => "down",
        }
    }
}

#[derive(Subcommand, Debug)]
enum RouteCmd {
    /// All routes
    List,
    /// One route
    Get { id: String },
    /// Create or replace a route
    Put {
        id: String,
        /// Upstream to send matching requests to
        #[arg(long, required_unless_present = "file")]
        upstream: Option<String>,
        /// Host to match, repeatable: exact or *.suffix [default: any host]
        #[arg(long = "host", value_name = "H")]
        hosts: Vec<String>,
        /// [default: /]
        #[arg(long, value_name = "P")]
        path_prefix: Option<String>,
        /// Method to match, repeatable [default: any method]
        #[arg(long = "method", value_name = "M")]
        methods: Vec<String>,
        /// Host header to send upstream instead of the client's
        #[arg(long, value_name = "H")]
        upstream_host: Option<String>,
        /// Send the client's original path bytes upstream instead of the normalised
        /// path (routing still uses the normalised path)
        #[arg(long)]
        forward_original_path: bool,
        /// Stream every request body as it arrives instead of reading bodies up to
        /// `[limits] request_buffer_bytes` whole first (for large uploads)
        #[arg(long)]
        no_request_buffering: bool,
        /// Route JSON (`-` reads standard input)
        #[arg(long, value_name = "F.json",
              conflicts_with_all = ["upstream", "hosts", "path_prefix", "methods", "upstream_host",
                                    "forward_original_path", "no_request_buffering"])]
        file: Option<PathBuf>,
    },
    /// Delete a route
    Delete { id: String },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    dynagate_model::duration::parse_duration(s)
}

/// Why a command failed.
#[derive(Debug)]
enum Failure {
    /// The API answered with an error status.
    Api(Reply),
    /// Anything on this side: arguments, files, connection.
    Local(String),
    /// `drain --wait` ran out of time.
    Timeout(String),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Local(format!("writing output: {e}"))
    }
}

type Result<T, E = Failure> = std::result::Result<T, E>;

pub fn main(args: CtlArgs) -> ExitCode {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let result = connect(&args).and_then(|client| {
        let mut ctx = Ctx {
            client,
            json: args.json,
            out: &mut stdout.lock(),
            err: &mut stderr.lock(),
            poll: Duration::from_millis(250),
        };
        ctx.run(&args.command)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Api(reply)) => {
            eprintln!("HTTP {} {}", reply.status, reason(reply.status));
            let text = reply.text();
            eprintln!("{}", text.trim_end());
            ExitCode::from(1)
        }
        Err(Failure::Local(message)) => {
            eprintln!("dynagate ctl: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Timeout(message)) => {
            eprintln!("dynagate ctl: {message}");
            ExitCode::from(3)
        }
    }
}

/// The admin address and token, from flags, environment (clap merged those) or files.
fn connect(args: &CtlArgs) -> Result<Client> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let admin = match &args.admin {
        Some(a) => a.clone(),
        None => admin_from_run_file(&data_dir)?.unwrap_or_else(|| DEFAULT_ADMIN.to_string()),
    };
    let token = match &args.token {
        Some(t) => t.clone(),
        None => {
            let path = data_dir.join("admin.token");
            std::fs::read_to_string(&path).map_err(|e| {
                Failure::Local(format!(
                    "no admin token: {}: {e} (pass --token, set DYNAGATE_ADMIN_TOKEN, or point --data-dir at the gateway's data directory)",
                    path.display()
                ))
            })?
        }
    };
    if token.trim().is_empty() {
        return Err(Failure::Local("the admin token is empty".into()));
    }
    Client::new(&admin, &token).map_err(|e| Failure::Local(e.to_string()))
}

/// The `admin` entry of `<data-dir>/run.json`, if the file exists.
fn admin_from_run_file(data_dir: &Path) -> Result<Option<String>> {
    let path = data_dir.join("run.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Failure::Local(format!("{}: {e}", path.display()))),
    };
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Failure::Local(format!("{}: {e}", path.display())))?;
    match value.get("admin").and_then(Value::as_str) {
        Some(a) => Ok(Some(a.to_string())),
        None => Err(Failure::Local(format!(
            "{}: no \"admin\" address in it",
            path.display()
        ))),
    }
}

struct Ctx<'a> {
    client: Client,
    json: bool,
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
    /// Interval of `drain --wait` polls.
    poll: Duration,
}

impl Ctx<'_> {
    fn run(&mut self, command: &CtlCommand) -> Result<()> {
        match command {
            CtlCommand::Upstream(cmd) => self.upstream(cmd),
            CtlCommand::Server(cmd) => self.server(cmd),
            CtlCommand::Route(cmd) => self.route(cmd),
            CtlCommand::Revisions { limit } => {
                let path = match limit {
                    Some(n) => format!("/v1/revisions?limit={n}"),
                    None => "/v1/revisions".to_string(),
                };
                let reply = self.call("GET", &path, None)?;
                self.show(&reply, render_revisions)
            }
            CtlCommand::Rollback { revision } => {
                let reply =
                    self.call("POST", &format!("/v1/revisions/{revision}/rollback"), None)?;
                self.show(&reply, render_outcome)
            }
        }
    }

    fn upstream(&mut self, cmd: &UpstreamCmd) -> Result<()> {
        match cmd {
            UpstreamCmd::List => {
                let reply = self.call("GET", "/v1/upstreams", None)?;
                self.show(&reply, render_upstream_list)
            }
            UpstreamCmd::Get { name } => {
                let reply = self.call("GET", &format!("/v1/upstreams/{}", enc(name)), None)?;
                self.show(&reply, |v| render_upstream(v, now_ms()))
            }
            UpstreamCmd::Put {
                name,
                servers,
                file,
                balance,
                retries,
                force,
            } => {
                let mut body = match file {
                    Some(path) => read_json_object(path)?,
                    None => {
                        let current = self.current_upstream(name)?;
                        merge_servers(current, &parse_server_flags(servers)?)
                    }
                };
                if let Some(b) = balance {
                    body.insert("balance".into(), json!(b));
                }
                if let Some(r) = retries {
                    body.insert("retries".into(), json!(r));
                }
                let mut path = format!("/v1/upstreams/{}", enc(name));
                if *force {
                    path.push_str("?force=true");
                }
                let reply = self.call("PUT", &path, Some(&Value::Object(body)))?;
                self.show(&reply, render_outcome)
            }
            UpstreamCmd::Delete { name } => {
                let reply = self.call("DELETE", &format!("/v1/upstreams/{}", enc(name)), None)?;
                self.show(&reply, render_outcome)
            }
        }
    }

    /// The upstream's configuration without its live part, or None if it does not exist.
    fn current_upstream(&mut self, name: &str) -> Result<Option<Map<String, Value>>> {
        let reply = self.send("GET", &format!("/v1/upstreams/{}", enc(name)), None)?;
        match reply.status {
            404 => Ok(None),
            200 => match reply.json().map_err(|e| Failure::Local(e.to_string()))? {
                Value::Object(mut map) => {
                    map.remove("live");
                    Ok(Some(map))
                }
                _ => Err(Failure::Local(
                    "GET upstream did not answer an object".into(),
                )),
            },
            _ => Err(Failure::Api(reply)),
        }
    }

    fn server(&mut self, cmd: &ServerCmd) -> Result<()> {
        match cmd {
            ServerCmd::Add {
                upstream,
                address,
                weight,
                backup,
            } => {
                let mut body = json!({ "address": address });
                if let Some(w) = weight {
                    body["weight"] = json!(w);
                }
                if *backup {
                    body["backup"] = json!(true);
                }
                let reply = self.call(
                    "POST",
                    &format!("/v1/upstreams/{}/servers", enc(upstream)),
                    Some(&body),
                )?;
                self.show(&reply, render_outcome)
            }
            ServerCmd::Set {
                upstream,
                address,
                weight,
                state,
                backup,
            } => {
                let mut body = Map::new();
                if let Some(w) = weight {
                    body.insert("weight".into(), json!(w));
                }
                if let Some(s) = state {
                    body.insert("state".into(), json!(s.as_str()));
                }
                if let Some(b) = backup {
                    body.insert("backup".into(), json!(b));
                }
                let reply = self.call(
                    "PATCH",
                    &server_path(upstream, address),
                    Some(&Value::Object(body)),
                )?;
                self.show(&reply, render_outcome)
            }
            ServerCmd::Remove {
                upstream,
                address,
                force,
            } => {
                let mut path = server_path(upstream, address);
                if *force {
                    path.push_str("?force=true");
                }
                let reply = self.call("DELETE", &path, None)?;
                self.show(&reply, render_outcome)
            }
            ServerCmd::Drain {
                upstream,
                address,
                wait,
                timeout,
            } => {
                let reply = self.call(
                    "PATCH",
                    &server_path(upstream, address),
                    Some(&json!({ "state": "drain" })),
                )?;
                self.show(&reply, render_outcome)?;
                if *wait {
                    self.wait_drained(upstream, address, *timeout)?;
                }
                Ok(())
            }
        }
    }

    /// Polls the upstream until the server has no request in flight.
    fn wait_drained(&mut self, upstream: &str, address: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut last: Option<u64> = None;
        loop {
            let reply = self.call("GET", &format!("/v1/upstreams/{}", enc(upstream)), None)?;
            let value = reply.json().map_err(|e| Failure::Local(e.to_string()))?;
            let server = value["live"]
                .as_array()
                .and_then(|live| live.iter().find(|s| s["address"] == address))
                .ok_or_else(|| {
                    Failure::Local(format!("{address} is no longer a server of {upstream}"))
                })?;
            let state = server["state"].as_str().unwrap_or("?");
            if state == "up" {
                return Err(Failure::Local(format!(
                    "{address} was set back to up while waiting for it to drain"
                )));
            }
            let in_flight = server["in_flight"].as_u64().unwrap_or(0);
            if in_flight == 0 {
                writeln!(
                    self.err,
                    "{address} drained: 0 requests in flight (after {})",
                    short_duration(start.elapsed())
                )?;
                return Ok(());
            }
            if last != Some(in_flight) {
                writeln!(
                    self.err,
                    "waiting for {address} to drain: {in_flight} in flight"
                )?;
                last = Some(in_flight);
            }
            if start.elapsed() >= timeout {
                return Err(Failure::Timeout(format!(
                    "{address} still has {in_flight} requests in flight after {}; it stays in state {state}",
                    short_duration(timeout)
                )));
            }
            std::thread::sleep(self.poll.min(timeout.saturating_sub(start.elapsed())));
        }
    }

    fn route(&mut self, cmd: &RouteCmd) -> Result<()> {
        match cmd {
            RouteCmd::List => {
                let reply = self.call("GET", "/v1/routes", None)?;
                self.show(&reply, render_routes)
            }
            RouteCmd::Get { id } => {
                let reply = self.call("GET", &format!("/v1/routes/{}", enc(id)), None)?;
                self.show(&reply, |v| render_routes(&Value::Array(vec![v.clone()])))
            }
            RouteCmd::Put {
                id,
                upstream,
                hosts,
                path_prefix,
                methods,
                upstream_host,
                forward_original_path,
                no_request_buffering,
                file,
            } => {
                let body = match file {
                    Some(path) => Value::Object(read_json_object(path)?),
                    None => {
                        let mut body =
                            json!({ "hosts": hosts, "methods": methods, "upstream": upstream });
                        if let Some(p) = path_prefix {
                            body["path_prefix"] = json!(p);
                        }
                        if let Some(h) = upstream_host {
                            body["upstream_host"] = json!(h);
                        }
                        if *forward_original_path {
                            body["forward_original_path"] = json!(true);
                        }
                        if *no_request_buffering {
                            body["request_buffering"] = json!(false);
                        }
                        body
                    }
                };
                let reply = self.call("PUT", &format!("/v1/routes/{}", enc(id)), Some(&body))?;
                self.show(&reply, render_outcome)
            }
            RouteCmd::Delete { id } => {
                let reply = self.call("DELETE", &format!("/v1/routes/{}", enc(id)), None)?;
                self.show(&reply, render_outcome)
            }
        }
    }

    /// One call; any non-2xx answer is a failure.
    fn call(&mut self, method: &str, path: &str, body: Option<&Value>) -> Result<Reply> {
        let reply = self.send(method, path, body)?;
        if reply.is_success() {
            Ok(reply)
        } else {
            Err(Failure::Api(reply))
        }
    }

    fn send(&mut self, method: &str, path: &str, body: Option<&Value>) -> Result<Reply> {
        let bytes = body.map(|b| b.to_string().into_bytes());
        self.client
            .send_blocking(method, path, bytes.as_deref())
            .map_err(|e| Failure::Local(e.to_string()))
    }

    /// Prints the answer: as sent with --json, else through `render`.
    fn show(&mut self, reply: &Reply, render: impl FnOnce(&Value) -> String) -> Result<()> {
        if self.json {
            self.out.write_all(&reply.body)?;
            if !reply.body.ends_with(b"\n") {
                self.out.write_all(b"\n")?;
            }
            return Ok(());
        }
        let value = reply.json().map_err(|e| Failure::Local(e.to_string()))?;
        self.out.write_all(render(&value).as_bytes())?;
        Ok(())
    }
}

fn server_path(upstream: &str, address: &str) -> String {
    format!("/v1/upstreams/{}/servers/{}", enc(upstream), enc(address))
}

/// Percent-encodes a path segment (IPv6 brackets, spaces, `/`, ...).
fn enc(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'@') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `--server ADDR[=WEIGHT]` values as (address, weight).
fn parse_server_flags(flags: &[String]) -> Result<Vec<(String, Option<u32>)>> {
    flags
        .iter()
        .map(|flag| match flag.rsplit_once('=') {
            Some((addr, w)) => w
                .parse::<u32>()
                .map(|w| (addr.to_string(), Some(w)))
                .map_err(|_| Failure::Local(format!("--server {flag}: {w:?} is not a weight"))),
            None => Ok((flag.clone(), None)),
        })
        .collect()
}

/// The PUT body for `upstream put --server ...`: the current settings (if any) with the
/// server list replaced; servers already present keep what the flags do not set.
fn merge_servers(
    current: Option<Map<String, Value>>,
    servers: &[(String, Option<u32>)],
) -> Map<String, Value> {
    let mut body = current.unwrap_or_default();
    let existing: Vec<Value> = body
        .get("servers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let list: Vec<Value> = servers
        .iter()
        .map(|(address, weight)| {
            let mut server = existing
                .iter()
                .find(|s| s["address"] == address.as_str())
                .cloned()
                .unwrap_or_else(|| json!({ "address": address }));
            if let Some(w) = weight {
                server["weight"] = json!(w);
            }
            server
        })
        .collect();
    body.insert("servers".into(), Value::Array(list));
    body
}

fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| Failure::Local(format!("standard input: {e}")))?
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| Failure::Local(format!("{}: {e}", path.display())))?
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Failure::Local(format!(
            "{}: expected a JSON object",
            path.display()
        ))),
        Err(e) => Err(Failure::Local(format!("{}: {e}", path.display()))),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "",
    }
}

// ---- rendering -------------------------------------------------------------------

fn render_outcome(v: &Value) -> String {
    format!(
        "revision {}: {}\n",
        v["revision"].as_u64().unwrap_or(0),
        v["summary"].as_str().unwrap_or("")
    )
}

/// Columns separated by two spaces; the last column is not padded.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn yes_no(v: &Value) -> String {
    if v.as_bool().unwrap_or(false) {
        "yes"
    } else {
        "no"
    }
    .into()
}

fn render_upstream_list(v: &Value) -> String {
    let Some(list) = v.as_array() else {
        return String::new();
    };
    if list.is_empty() {
        return "no upstreams\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|u| {
            let live = u["live"].as_array().cloned().unwrap_or_default();
            let sum = |k: &str| live.iter().map(|s| s[k].as_u64().unwrap_or(0)).sum::<u64>();
            let up = live
                .iter()
                .filter(|s| s["state"] == "up" && s["passive_unhealthy"] != true)
                .count();
            vec![
                s(&u["name"]),
                live.len().to_string(),
                up.to_string(),
                sum("in_flight").to_string(),
                sum("requests").to_string(),
                sum("failures").to_string(),
                s(&u["balance"]),
                s(&u["retries"]),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "SERVERS",
            "UP",
            "IN-FLIGHT",
            "REQUESTS",
            "FAILURES",
            "BALANCE",
            "RETRIES",
        ],
        &rows,
    )
}

fn render_upstream(v: &Value, now_ms: u64) -> String {
    let mut out = format!("upstream {}\n", s(&v["name"]));
    for key in [
        "balance",
        "retries",
        "connect_timeout",
        "read_timeout",
        "max_fails",
        "fail_timeout",
        "keepalive",
    ] {
        if !v[key].is_null() {
            out.push_str(&format!("  {key:<16} {}\n", s(&v[key])));
        }
    }
    out.push('\n');
    let live = v["live"].as_array().cloned().unwrap_or_default();
    if live.is_empty() {
        out.push_str("no servers\n");
        return out;
    }
    let rows: Vec<Vec<String>> = live
        .iter()
        .map(|srv| {
            let changed = srv["last_state_change_ms"].as_u64().unwrap_or(0);
            vec![
                s(&srv["address"]),
                s(&srv["weight"]),
                s(&srv["state"]),
                yes_no(&srv["backup"]),
                s(&srv["in_flight"]),
                s(&srv["requests"]),
                s(&srv["failures"]),
                if srv["passive_unhealthy"] == true {
                    "failing"
                } else {
                    "ok"
                }
                .into(),
                ago(changed, now_ms),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "ADDRESS",
            "WEIGHT",
            "STATE",
            "BACKUP",
            "IN-FLIGHT",
            "REQUESTS",
            "FAILURES",
            "HEALTH",
            "LAST-CHANGE",
        ],
        &rows,
    ));
    out
}

fn render_routes(v: &Value) -> String {
    let Some(list) = v.as_array() else {
        return String::new();
    };
    if list.is_empty() {
        return "no routes\n".into();
    }
    let joined = |v: &Value| {
        let items: Vec<String> = v
            .as_array()
            .map(|a| a.iter().map(s).collect())
            .unwrap_or_default();
        if items.is_empty() {
            "*".to_string()
        } else {
            items.join(",")
        }
    };
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                s(&r["id"]),
                joined(&r["hosts"]),
                s(&r["path_prefix"]),
                joined(&r["methods"]),
                s(&r["upstream"]),
                s(&r["upstream_host"]),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "HOSTS",
            "PATH-PREFIX",
            "METHODS",
            "UPSTREAM",
            "UPSTREAM-HOST",
        ],
        &rows,
    )
}

fn render_revisions(v: &Value) -> String {
    let Some(list) = v.as_array() else {
        return String::new();
    };
    if list.is_empty() {
        return "no revisions\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                s(&r["number"]),
                utc(r["time_ms"].as_u64().unwrap_or(0)),
                s(&r["summary"]),
            ]
        })
        .collect();
    table(&["REVISION", "TIME (UTC)", "SUMMARY"], &rows)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `1h2m3s`-style, whole seconds (or milliseconds below one second).
fn short_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    dynagate_model::duration::format_duration(Duration::from_secs(d.as_secs()))
}

fn ago(then_ms: u64, now_ms: u64) -> String {
    if then_ms == 0 {
        return "-".into();
    }
    let d = Duration::from_millis(now_ms.saturating_sub(then_ms));
    if d < Duration::from_secs(1) {
        return "just now".into();
    }
    format!("{} ago", short_duration(d))
}

/// `2025-01-31 13:05:09` for Unix milliseconds (UTC).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(Subcommand, Debug)]
    enum Top {
        Ctl(CtlArgs),
    }

    fn parse(line: &str) -> Result<CtlArgs, clap::Error> {
        let argv = std::iter::once("dynagate").chain(line.split_whitespace());
        Cli::try_parse_from(argv).map(|c| match c.cmd {
            Top::Ctl(a) => a,
        })
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_every_command() {
        let a = parse("ctl --admin 127.0.0.1:1 --token t upstream put shop --server 127.0.0.1:9001=3 --server [::1]:80 --retries 2 --force").unwrap();
        assert_eq!(a.admin.as_deref(), Some("127.0.0.1:1"));
        match a.command {
            CtlCommand::Upstream(UpstreamCmd::Put {
                name,
                servers,
                retries,
                force,
                file,
                ..
            }) => {
                assert_eq!(name, "shop");
                assert_eq!(servers, ["127.0.0.1:9001=3", "[::1]:80"]);
                assert_eq!((retries, force, file), (Some(2), true, None));
            }
            other => panic!("{other:?}"),
        }
        // Global options after the subcommand.
        let a = parse(
            "ctl server set shop 127.0.0.1:9001 --state drain --backup false --weight 4 --json",
        )
        .unwrap();
        assert!(a.json);
        match a.command {
            CtlCommand::Server(ServerCmd::Set {
                state,
                backup,
                weight,
                ..
            }) => {
                assert_eq!(
                    (state, backup, weight),
                    (Some(StateArg::Drain), Some(false), Some(4))
                );
            }
            other => panic!("{other:?}"),
        }
        match parse("ctl server drain shop a:1 --wait --timeout 1m30s")
            .unwrap()
            .command
        {
            CtlCommand::Server(ServerCmd::Drain { wait, timeout, .. }) => {
                assert!(wait);
                assert_eq!(timeout, Duration::from_secs(90));
            }
            other => panic!("{other:?}"),
        }
        match parse("ctl server drain shop a:1").unwrap().command {
            CtlCommand::Server(ServerCmd::Drain { wait, timeout, .. }) => {
                assert!(!wait);
                assert_eq!(timeout, Duration::from_secs(60));
            }
            other => panic!("{other:?}"),
        }
        match parse("ctl route put r1 --upstream shop --host a.example.com --host b.example.com --method GET --path-prefix /api").unwrap().command {
            CtlCommand::Route(RouteCmd::Put { hosts, methods, path_prefix, upstream, forward_original_path, .. }) => {
                assert_eq!(hosts, ["a.example.com", "b.example.com"]);
                assert_eq!(methods, ["GET"]);
                assert_eq!(path_prefix.as_deref(), Some("/api"));
                assert_eq!(upstream.as_deref(), Some("shop"));
                assert!(!forward_original_path);
            }
            other => panic!("{other:?}"),
        }
        match parse("ctl route put r1 --upstream shop --forward-original-path")
            .unwrap()
            .command
        {
            CtlCommand::Route(RouteCmd::Put {
                forward_original_path,
                ..
            }) => {
                assert!(forward_original_path)
            }
            other => panic!("{other:?}"),
        }
        assert!(parse("ctl route put r1 --file r.json --forward-original-path").is_err());
        assert!(matches!(
            parse("ctl revisions --limit 5").unwrap().command,
            CtlCommand::Revisions { limit: Some(5) }
        ));
        assert!(matches!(
            parse("ctl rollback 7").unwrap().command,
            CtlCommand::Rollback { revision: 7 }
        ));
        for ok in [
            "ctl upstream list",
            "ctl upstream get shop",
            "ctl upstream delete shop",
            "ctl upstream put shop --file u.json --retries 3",
            "ctl server add shop a:1 --weight 2 --backup",
            "ctl server remove shop a:1 --force",
            "ctl route list",
            "ctl route get r1",
            "ctl route put r1 --file r.json",
            "ctl route delete r1",
            "ctl revisions",
        ] {
            parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "ctl",
            "ctl upstream put shop --server a:1 --file u.json",
            "ctl route put r1",
            "ctl route put r1 --file r.json --host a.example.com",
            "ctl server set shop a:1 --state sleeping",
            "ctl server set shop a:1 --backup maybe",
            "ctl server drain shop a:1 --timeout soon",
            "ctl rollback x",
            "ctl revisions --limit x",
            "ctl upstream get",
        ] {
            assert!(parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn server_flags_and_merging() {
        let flags = parse_server_flags(&["a:1=3".into(), "[::1]:80".into()]).unwrap();
        assert_eq!(
            flags,
            [("a:1".to_string(), Some(3)), ("[::1]:80".to_string(), None)]
        );
        assert!(parse_server_flags(&["a:1=x".into()]).is_err());
        let current = json!({"name":"shop","retries":4,"read_timeout":"2s",
            "servers":[{"address":"a:1","weight":5,"state":"drain","backup":false},{"address":"b:1","weight":1}]});
        let merged = merge_servers(
            current.as_object().cloned(),
            &[("a:1".into(), None), ("c:1".into(), Some(2))],
        );
        assert_eq!(
            Value::Object(merged),
            json!({"name":"shop","retries":4,"read_timeout":"2s",
                "servers":[{"address":"a:1","weight":5,"state":"drain","backup":false},{"address":"c:1","weight":2}]})
        );
        assert_eq!(
            Value::Object(merge_servers(None, &[])),
            json!({"servers":[]})
        );
    }

    #[test]
    fn renders_tables_and_times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_825_600_000), "2000-02-29 12:00:00");
        assert_eq!(utc(1_767_225_599_000), "2025-12-31 23:59:59");
        assert_eq!(ago(0, 5), "-");
        assert_eq!(ago(1_000, 201_000), "3m20s ago");
        assert_eq!(enc("[::1]:80"), "%5B::1%5D:80");
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
        let t = table(&["A", "LONGER"], &[vec!["xxxx".into(), "1".into()]]);
        assert_eq!(t, "A     LONGER\nxxxx  1\n");
        let up = json!({"name":"shop","balance":"round_robin","retries":2,"live":[
            {"address":"127.0.0.1:9001","weight":1,"state":"drain","backup":true,"in_flight":3,
             "requests":10,"failures":1,"passive_unhealthy":true,"last_state_change_ms":1000}]});
        let text = render_upstream(&up, 61_000);
        assert!(text.contains("ADDRESS         WEIGHT  STATE  BACKUP  IN-FLIGHT  REQUESTS  FAILURES  HEALTH   LAST-CHANGE"), "{text}");
        assert!(text.contains("127.0.0.1:9001  1       drain  yes     3          10        1         failing  1m ago"), "{text}");
    }

    // ---- against a real admin server --------------------------------------------------

    use dynagate_proxy::runtime::InFlight;
    use dynagate_proxy::Controller;
    use std::sync::Arc;

    const TOKEN: &str = "ctl-test-token-0123456789";

    struct Server {
        _rt: tokio::runtime::Runtime,
        controller: Arc<Controller>,
        addr: String,
        dir: PathBuf,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
    }

    impl Server {
        fn start() -> Server {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "dynagate-ctl-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let store = dynagate_store::SqliteStore::open(&dir.join("dynagate.db"), 100).unwrap();
            let controller = Arc::new(Controller::open(Arc::new(store)).unwrap());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let listener = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            rt.spawn(dynagate_admin::serve(
                listener,
                controller.clone(),
                dynagate_admin::AdminOptions {
                    token: TOKEN.into(),
                    metrics_open: false,
                    registry: None,
                },
                async {
                    let _ = rx.await;
                },
            ));
            Server {
                _rt: rt,
                controller,
                addr,
                dir,
                stop: Some(tx),
            }
        }

        /// Runs one ctl command line (without `dynagate`), returning its stdout, stderr
        /// and result.
        fn ctl(&self, line: &str) -> (String, String, Result<()>) {
            let args = parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            let client = connect(&args).unwrap();
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let result = Ctx {
                client,
                json: args.json,
                out: &mut out,
                err: &mut err,
                poll: Duration::from_millis(20),
            }
            .run(&args.command);
            (
                String::from_utf8(out).unwrap(),
                String::from_utf8(err).unwrap(),
                result,
            )
        }

        fn ok(&self, line: &str) -> String {
            let (out, err, result) = self.ctl(line);
            if let Err(e) = result {
                panic!("{line}: {e:?} {err}");
            }
            out
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            if let Some(tx) = self.stop.take() {
                let _ = tx.send(());
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn drives_a_real_admin_api() {
        let srv = Server::start();
        let a = format!("ctl --admin http://{} --token {TOKEN}", srv.addr);
        let run = |rest: &str| srv.ok(&format!("{a} {rest}"));
        assert_eq!(run("upstream list"), "no upstreams\n");
        assert_eq!(
            run("upstream put shop --server 127.0.0.1:9001=2 --server [::1]:9002 --retries 3"),
            "revision 1: create upstream shop\n"
        );
        // Change a setting through the API, then re-put servers: the setting stays.
        let (_, _, r) = srv.ctl(&format!("{a} server set shop [::1]:9002 --state down"));
        r.unwrap();
        run("upstream put shop --server 127.0.0.1:9001 --server [::1]:9002 --server 127.0.0.1:9003=5");
        let spec = srv.controller.config().upstream("shop").unwrap().clone();
        assert_eq!(spec.retries, 3);
        assert_eq!(spec.servers[0].weight, 2);
        assert_eq!(spec.servers[1].state, dynagate_model::ServerState::Down);
        assert_eq!(spec.servers[2].weight, 5);
        let text = run("upstream get shop");
        assert!(text.contains("ADDRESS"), "{text}");
        assert!(text.contains("[::1]:9002      1       down"), "{text}");
        let list = run("upstream list");
        assert!(list.starts_with("NAME  SERVERS  UP"), "{list}");
        assert!(list.contains("shop  3        2"), "{list}");
        // --json prints the API's body as is.
        let raw = run("upstream get shop --json");
        let v: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(v["live"].as_array().unwrap().len(), 3);
        run("server add shop 127.0.0.1:9004 --weight 2 --backup");
        assert!(
            srv.controller
                .config()
                .upstream("shop")
                .unwrap()
                .server("127.0.0.1:9004")
                .unwrap()
                .backup
        );
        assert!(run("server remove shop [::1]:9002").contains("remove server [::1]:9002 from shop"));
        // Routes.
        assert!(run(
            "route put r1 --upstream shop --host shop.example.com --path-prefix /api/ --method GET"
        )
        .contains("create route r1 -> shop"));
        let routes = run("route list");
        assert!(
            routes.contains("r1  shop.example.com  /api/        GET      shop      -"),
            "{routes}"
        );
        assert!(run("route get r1").contains("shop.example.com"));
        // Refusals: status and body as sent.
        let (_, _, r) = srv.ctl(&format!("{a} upstream delete shop"));
        match r {
            Err(Failure::Api(reply)) => {
                assert_eq!(reply.status, 409);
                assert!(reply.text().contains("r1"));
            }
            other => panic!("{other:?}"),
        }
        let (_, _, r) = srv.ctl(&format!("{a} server set shop 127.0.0.1:9001 --weight 0"));
        assert!(
            matches!(r, Err(Failure::Api(ref reply)) if reply.status == 400),
            "{r:?}"
        );
        assert!(run("route delete r1").contains("delete route r1"));
        // Revisions and rollback.
        let revs = run("revisions --limit 3");
        assert!(revs.starts_with("REVISION  TIME (UTC)"), "{revs}");
        assert_eq!(revs.lines().count(), 4, "{revs}");
        assert!(run("rollback 1").contains("rollback to revision 1"));
        assert_eq!(
            srv.controller
                .config()
                .upstream("shop")
                .unwrap()
                .servers
                .len(),
            2
        );
        // A wrong token is a refusal with 401.
        let (_, _, r) = srv.ctl(&format!(
            "ctl --admin {} --token wrong-token upstream list",
            srv.addr
        ));
        assert!(
            matches!(r, Err(Failure::Api(ref reply)) if reply.status == 401),
            "{r:?}"
        );
    }

    #[test]
    fn drain_waits_for_in_flight_requests() {
        let srv = Server::start();
        let a = format!("ctl --admin {} --token {TOKEN}", srv.addr);
        srv.ok(&format!(
            "{a} upstream put shop --server 127.0.0.1:9001 --server 127.0.0.1:9002"
        ));
        // Two requests in flight on 9001, finishing in 150 ms.
        let stats = {
            let snap = srv.controller.snapshots().load_full();
            snap.upstreams["shop"].servers[0].stats.clone()
        };
        let guards = vec![InFlight::start(&stats), InFlight::start(&stats)];
        let done = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            drop(guards);
        });
        let (out, err, result) = srv.ctl(&format!(
            "{a} server drain shop 127.0.0.1:9001 --wait --timeout 10s"
        ));
        result.unwrap();
        done.join().unwrap();
        assert!(out.contains("state=drain"), "{out}");
        assert!(
            err.contains("waiting for 127.0.0.1:9001 to drain: 2 in flight"),
            "{err}"
        );
        assert!(err.contains("127.0.0.1:9001 drained"), "{err}");
        // Stats survive the drain change (the runtime reuses them), so a stuck request
        // makes --wait time out.
        let snap = srv.controller.snapshots().load_full();
        let _stuck = InFlight::start(&snap.upstreams["shop"].servers[1].stats);
        let (_, err, result) = srv.ctl(&format!(
            "{a} server drain shop 127.0.0.1:9002 --wait --timeout 100ms"
        ));
        assert!(
            matches!(result, Err(Failure::Timeout(ref m)) if m.contains("1 requests in flight")),
            "{result:?} {err}"
        );
    }

    #[test]
    fn finds_the_admin_and_token_in_the_data_dir() {
        let srv = Server::start();
        std::fs::write(srv.dir.join("admin.token"), format!("{TOKEN}\n")).unwrap();
        let ip_any = srv.addr.replace("127.0.0.1", "0.0.0.0");
        std::fs::write(
            srv.dir.join("run.json"),
            json!({"pid": 1, "proxy": "0.0.0.0:8080", "admin": ip_any, "registry": "127.0.0.1:8500"}).to_string(),
        )
        .unwrap();
        // Flags only for the data dir; DYNAGATE_* may be set in the environment of the
        // test run, so pass what the env would otherwise supply explicitly as absent.
        let args = CtlArgs {
            admin: None,
            token: None,
            data_dir: Some(srv.dir.clone()),
            json: false,
            command: CtlCommand::Upstream(UpstreamCmd::List),
        };
        let client = connect(&args).unwrap();
        assert_eq!(client.authority(), srv.addr);
        let reply = client.send_blocking("GET", "/v1/upstreams", None).unwrap();
        assert_eq!(reply.status, 200);
        let missing = CtlArgs {
            data_dir: Some(srv.dir.join("nope")),
            ..args
        };
        match connect(&missing) {
            Err(Failure::Local(m)) => assert!(m.contains("admin.token"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
