//! The `snapgate` command.

use std::path::PathBuf;
use std::process::ExitCode;

use sd_notify::NotifyState;

use clap::{Parser, Subcommand};
use snapgate::config::Config;

/// The version and the commit built (`build.rs`); `modified: true` when
/// the checkout had changes not committed.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("VERGEN_GIT_SHA"),
    ", modified: ",
    env!("VERGEN_GIT_DIRTY"),
    ")"
);

#[derive(Parser)]
#[command(version = VERSION, about = "Scale-to-zero edge gateway for microVM apps")]
struct Cli {
    /// How log lines (on stderr) are written: `text` for people, `json`
    /// (one object per line) for collectors; `auto`, the default, is text
    /// on a terminal and JSON otherwise.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Auto,
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGINT or SIGTERM; SIGHUP (or `POST /reload`
    /// on the admin listener) reloads the config file.
    Run {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a config file and print every problem with its key.
    Check {
        /// The config file.
        file: PathBuf,
    },
    /// Snapshot operations.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Show a running gateway's apps and instances.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Reload a running gateway's config file (as SIGHUP does).
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Drain one instance of a running gateway: it takes no new requests
    /// and stops once those in flight end; a replacement starts if the
    /// app's min_warm wants one.
    Drain {
        /// The instance's id, as `snapgate status` lists it.
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Bring an app of a running gateway to N warm instances (restores
    /// counted), within its max_instances; those beyond min_warm are
    /// reaped after idle_timeout.
    Prewarm {
        /// The app.
        app: String,
        /// How many warm instances (1 to 1000).
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Where a running gateway's admin API is.
#[derive(clap::Args)]
struct AdminArgs {
    /// The gateway's config file: its `admin` address and
    /// `admin_token_file`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The admin address (default: the config's, else 127.0.0.1:9090).
    #[arg(long)]
    admin: Option<std::net::SocketAddr>,
    /// A file whose first line is the admin bearer token (default: the
    /// config's `admin_token_file`).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

/// Runs one admin command against the gateway `args` names; prints its
/// answer, or the error.
fn admin_command<F, Fut>(args: &AdminArgs, f: F) -> ExitCode
where
    F: FnOnce(snapgate::ctl::AdminClient) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<String>>,
{
    let result = (|| -> anyhow::Result<String> {
        let client = snapgate::ctl::AdminClient::new(
            args.config.as_deref(),
            args.admin,
            args.token_file.as_deref(),
        )?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f(client))
    })();
    match result {
        Ok(out) => {
            // A reader that went away (`| head`) is no failure of ours.
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), "{}", out.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("snapgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Boot each app's template, wait until ready, and snapshot it.
    Build {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
        /// Only this app (repeatable); all apps by default.
        #[arg(long = "app")]
        apps: Vec<String>,
    },
}

/// mimalloc instead of glibc's allocator: the forward path allocates and
/// frees per request on every worker thread; in a profile of the warm path
/// (BENCHMARKS.md) glibc's malloc and free took about 13% of the
/// gateway's samples, mimalloc's about 8%. Called through
/// `snapgate::alloc`, which takes mimalloc's plain calls wherever they meet
/// the alignment.
#[global_allocator]
static ALLOCATOR: snapgate::alloc::Mimalloc = snapgate::alloc::Mimalloc;

/// The gateway's control runtime: pools, restores, the admin listener,
/// reloads. Client connections are served on the edge workers
/// (`snapgate::proxy::edge`), a single-threaded runtime per core.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let json = match cli.log_format {
        LogFormat::Json => true,
        LogFormat::Auto => !terminal,
        LogFormat::Text => false,
    };
    // Kept to the end of main: dropping it flushes the queued lines.
    let flush = snapgate::logs::init(json, terminal);
    match cli.command {
        Command::Run { config } => match run(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // The log lines before it go out first.
                drop(flush);
                eprintln!("snapgate: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Check { file } => match Config::load(&file) {
            Ok(config) => {
                // The certificates are loaded as `run` loads them: a key
                // that does not match, or a file that is no PEM, fails here.
                if let Some(Err(e)) = config
                    .tls
                    .as_ref()
                    .map(snapgate::proxy::tls::CertStore::load)
                {
                    eprintln!("{}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
                println!("{}: ok ({} apps)", file.display(), config.apps.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Status { admin } => admin_command(&admin, |c| async move { c.status().await }),
        Command::Reload { admin } => admin_command(&admin, |c| async move { c.reload().await }),
        Command::Drain { id, admin } => {
            admin_command(&admin, |c| async move { c.drain(&id).await })
        }
        Command::Prewarm { app, count, admin } => {
            admin_command(&admin, |c| async move { c.prewarm(&app, count).await })
        }
        Command::Snapshot {
            command: SnapshotCommand::Build { config, apps },
        } => {
            let result = (|| -> anyhow::Result<()> {
                let config = Config::load(&config)?;
                let rt = tokio::runtime::Runtime::new()?;
                rt.block_on(snapgate::gateway::build_snapshots(
                    &config,
                    &apps,
                    &mut std::io::stdout(),
                ))?;
                Ok(())
            })();
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("snapshot build failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Tells the service manager how the gateway stands (systemd's
/// `Type=notify`, sd_notify(3)): ready once it serves, reloading while it
/// reloads, stopping as it drains. Nothing without `NOTIFY_SOCKET`; a
/// failure is logged, never fatal.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("telling the service manager {states:?}: {e}");
    }
}

/// Loads the config, starts the gateway, reloads the config on SIGHUP or
/// an admin `POST /reload`, and on SIGINT or SIGTERM drains it.
fn run(file: &std::path::Path) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let config = Config::load(file)?;
    let rt = runtime()?;
    rt.block_on(async {
        // Signals are caught before anything starts, so none is missed.
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        // A signal while starting (say, during a snapshot build) stops it: the
        // dropped start-up kills the VMs it made.
        let mut out = std::io::stdout();
        let mut gateway = tokio::select! {
            started = snapgate::gateway::start(&config, &mut out) => started?,
            _ = int.recv() => return Ok(()),
            _ = term.recv() => return Ok(()),
        };
        notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
        let mut asks = gateway.reload_requests().expect("taken once, here");
        let name = loop {
            let reply = tokio::select! {
                _ = int.recv() => break "SIGINT",
                _ = term.recv() => break "SIGTERM",
                _ = hup.recv() => None,
                Some(ask) = asks.recv() => Some(ask.reply),
            };
            // The file as it is now, checked whole before anything changes.
            let mut reloading = vec![NotifyState::Reloading];
            reloading.extend(NotifyState::monotonic_usec_now().ok());
            notify(&reloading);
            let outcome = gateway.reload_file(file).await;
            let status = match &outcome {
                Ok(_) => "serving; last reload applied".to_owned(),
                Err(e) => format!(
                    "serving; last reload rejected: {}",
                    e.lines().next().unwrap_or("")
                ),
            };
            notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
            match (&outcome, reply) {
                (_, Some(reply)) => {
                    let _ = reply.send(outcome);
                }
                (Ok(summary), None) => println!("SIGHUP: reloaded: {summary}"),
                (Err(e), None) => println!("SIGHUP: rejected, the running config stays: {e}"),
            }
        };
        notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
        println!("{name}: draining (grace {:?})", config.shutdown_grace);
        gateway.shutdown().await;
        println!("stopped");
        Ok(())
    })
}
