//! `dynagate`: run the gateway, check a configuration file, or drive a running gateway.

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod bridge;
mod ctl;
mod files;
mod run;
mod settings;
mod token;

use clap::{Args, Parser, Subcommand};
use settings::Settings;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "dynagate",
    version,
    about = "A dynamic gateway: routes and upstreams change at runtime, durably, without reloads."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the gateway (the default).
    Run(RunArgs),
    /// Validate a configuration file; exits non-zero naming the field at fault.
    CheckConfig { file: PathBuf },
    /// Drive a running gateway through its admin API.
    Ctl(ctl::CtlArgs),
}

#[derive(Args, Default, Clone)]
pub struct RunArgs {
    /// TOML configuration file.
    #[arg(long, env = "DYNAGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Data-plane listener [default: 0.0.0.0:8080]
    #[arg(long, env = "DYNAGATE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Admin API listener [default: 127.0.0.1:9180]
    #[arg(long, env = "DYNAGATE_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Service-registry listener [default: 127.0.0.1:8500]
    #[arg(long, env = "DYNAGATE_REGISTRY_LISTEN")]
    registry_listen: Option<SocketAddr>,
    /// Data directory [default: ./dynagate-data]
    #[arg(long, env = "DYNAGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Data-plane threads [default: number of cores]
    #[arg(long, env = "DYNAGATE_WORKERS")]
    workers: Option<usize>,
    /// Grace period for in-flight requests on shutdown, e.g. 30s
    #[arg(long, env = "DYNAGATE_GRACE_PERIOD", value_parser = parse_duration)]
    grace_period: Option<Duration>,
    /// Log filter, e.g. info or dynagate=debug
    #[arg(long, env = "DYNAGATE_LOG")]
    log: Option<String>,
    /// Access log: `stdout` or a file path (format from the config file, default combined)
    #[arg(long, env = "DYNAGATE_ACCESS_LOG")]
    access_log: Option<String>,
    /// This gateway's zone, for local_first balancing
    #[arg(long, env = "DYNAGATE_ZONE")]
    zone: Option<String>,
    /// Token the service registry requires for writes
    #[arg(long, env = "DYNAGATE_REGISTRY_TOKEN", hide_env_values = true)]
    registry_token: Option<String>,
    /// Threads helping the registry answer many blocking queries at once (0: none)
    /// [default: cores - 1, at most 3]
    #[arg(long, env = "DYNAGATE_REGISTRY_FANOUT_THREADS")]
    registry_fanout_threads: Option<usize>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    dynagate_model::duration::parse_duration(s)
}

impl RunArgs {
    /// Defaults, then the file, then env and flags (clap has already merged those two).
    fn settings(&self) -> Result<Settings, String> {
        let mut s = match &self.config {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        if let Some(v) = self.listen {
            s.listen = v;
        }
        if let Some(v) = self.admin_listen {
            s.admin_listen = v;
        }
        if let Some(v) = self.registry_listen {
            s.registry_listen = v;
        }
        if let Some(v) = &self.data_dir {
            s.data_dir = v.clone();
        }
        if let Some(v) = self.workers {
            s.workers = v;
        }
        if let Some(v) = self.grace_period {
            s.grace_period = v;
        }
        if let Some(v) = &self.log {
            s.log = v.clone();
        }
        if let Some(v) = &self.access_log {
            let format = s.access_log.as_ref().map(|a| a.format).unwrap_or_default();
            s.access_log = Some(settings::AccessLogSettings {
                path: v.clone(),
                format,
            });
        }
        if let Some(v) = &self.zone {
            s.zone = Some(v.clone());
        }
        if let Some(v) = &self.registry_token {
            s.registry.token = Some(v.clone());
        }
        if let Some(v) = self.registry_fanout_threads {
            s.registry.fanout_threads = Some(v);
        }
        s.validate()?;
        Ok(s)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => start(cli.run),
        Some(Cmd::Run(args)) => start(args),
        Some(Cmd::CheckConfig { file }) => match Settings::from_file(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Some(Cmd::Ctl(args)) => ctl::main(args),
    }
}

fn start(args: RunArgs) -> ExitCode {
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dynagate: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&settings.log))
        .with_writer(std::io::stderr)
        .init();
    match run::run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("dynagate: {e}");
            ExitCode::from(1)
        }
    }
}
