//! The `snapgate` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use snapgate::config::Config;

#[derive(Parser)]
#[command(version, about = "Scale-to-zero edge gateway for microVM apps")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "snapgate=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => match run(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
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
        let mut asks = gateway.reload_requests().expect("taken once, here");
        let name = loop {
            let reply = tokio::select! {
                _ = int.recv() => break "SIGINT",
                _ = term.recv() => break "SIGTERM",
                _ = hup.recv() => None,
                Some(ask) = asks.recv() => Some(ask.reply),
            };
            // The file as it is now, checked whole before anything changes.
            let outcome = gateway.reload_file(file).await;
            match (&outcome, reply) {
                (_, Some(reply)) => {
                    let _ = reply.send(outcome);
                }
                (Ok(summary), None) => println!("SIGHUP: reloaded: {summary}"),
                (Err(e), None) => println!("SIGHUP: rejected, the running config stays: {e}"),
            }
        };
        println!("{name}: draining (grace {:?})", config.shutdown_grace);
        gateway.shutdown().await;
        println!("stopped");
        Ok(())
    })
}
