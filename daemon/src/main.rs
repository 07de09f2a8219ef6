//! ultd: keeps models resident and governs their memory. `ultd --config models.toml`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ult_engine::{CandleEngine, Engine};
use ultd::config::Config;

#[global_allocator]
static ALLOC: ultd::alloc::Counting = ultd::alloc::Counting;

/// Exit code for an invalid configuration (EX_USAGE-like, as linkerd2-proxy uses).
const EXIT_CONFIG: u8 = 64;

/// ult's daemon.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The models and settings file.
    #[arg(short, long, env = "ULT_CONFIG", default_value = "models.toml")]
    config: PathBuf,
    /// Override `[daemon] listen` (e.g. 127.0.0.1:0 picks a free port).
    #[arg(long)]
    listen: Option<String>,
    /// Override `[daemon] socket` ("off" for none).
    #[arg(long)]
    socket: Option<String>,
    /// Override `[daemon] device` (cpu, cuda:0, metal:0, auto).
    #[arg(long)]
    device: Option<String>,
    /// Override `[daemon] state_file` ("off" for none).
    #[arg(long)]
    state_file: Option<String>,
    /// Override `[daemon] http`, the OpenAI-compatible API ("off" for none).
    #[arg(long)]
    http: Option<String>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists or CUDA is initialised.
    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)]
    if let Some(code) = unsafe { ult_engine::cuda_jit::init_process() } {
        return ExitCode::from(code);
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ULT_LOG")
                .unwrap_or_else(|_| "ultd=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ultd: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check {
        // The pool is the machine's memory here (a GPU's is known once the device is open, at start).
        let mut prober =
            ultd::probe::Prober::new(config.daemon.probe.clone(), &candle_core::Device::Cpu);
        if let Ok(pool) = prober.pool_total()
            && let Err(e) = config.check_memory(pool)
        {
            eprintln!("ultd: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        println!(
            "{}: ok ({} models, {} routes)",
            config.file.display(),
            config.models.len(),
            config.routes.len()
        );
        return ExitCode::SUCCESS;
    }
    match run(config, args.device) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ultd: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn load_config(args: &Args) -> Result<Config, ultd::config::ConfigError> {
    let text = std::fs::read_to_string(&args.config).map_err(|e| ultd::config::ConfigError {
        file: args.config.clone(),
        line: 0,
        key: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    // Command-line overrides are applied to the document so they are validated like the file itself.
    // A file that is not valid TOML gets the configuration parser's located error (file, line, key).
    let Ok(mut doc) = text.parse::<toml_edit::DocumentMut>() else {
        return Config::parse(&args.config, &text);
    };
    let overrides = [
        ("listen", &args.listen),
        ("socket", &args.socket),
        ("device", &args.device),
        ("state_file", &args.state_file),
        ("http", &args.http),
    ];
    for (key, value) in overrides {
        if let Some(v) = value {
            doc["daemon"][key] = toml_edit::value(v.as_str());
        }
    }
    let text = if overrides.iter().any(|(_, v)| v.is_some()) {
        doc.to_string()
    } else {
        text
    };
    Config::parse(&args.config, &text)
}

fn run(config: Config, _device: Option<String>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ultd-io")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let engine: Arc<dyn Engine> = Arc::new(CandleEngine::new(&config.daemon.device).context("opening the device")?);
        let device = engine.device_name();
        let stop = shutdown_signal()?;
        // Installed before the models are inspected: a SIGHUP during start-up must not end the daemon
        // (its default action); one that arrives then is handled once serving begins.
        let hangups = hangup_signal()?;
        let running = ultd::server::spawn(config.clone(), engine).await?;
        reload_on(hangups, running.handle.clone());
        // The one startup line scripts and tests read.
        let tcp = running.tcp.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        let socket = running.socket.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into());
        let http = running.http.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        let ollama = running.ollama.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        println!("ultd listening on {tcp} (unix socket {socket}, http {http}, ollama {ollama}, device {device}, {} models)", config.models.len());
        tracing::info!(tcp = %tcp, socket = %socket, device = %device, models = config.models.len(), "ultd started");
        stop.await;
        tracing::info!("shutting down");
        running.stop().await;
        Ok(())
    })
}

/// The SIGHUP stream (None where there is no SIGHUP).
#[cfg(unix)]
fn hangup_signal() -> anyhow::Result<Option<tokio::signal::unix::Signal>> {
    use tokio::signal::unix::{SignalKind, signal};
    Ok(Some(
        signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
    ))
}

#[cfg(not(unix))]
fn hangup_signal() -> anyhow::Result<Option<()>> {
    Ok(None)
}

/// Reloads the configuration on every SIGHUP (as `ultctl reload` does), logging what changed or why the
/// file was refused.
#[cfg(unix)]
fn reload_on(hangups: Option<tokio::signal::unix::Signal>, handle: ultd::supervisor::Handle) {
    let Some(mut hup) = hangups else { return };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            if let Err(e) = handle.reload().await {
                tracing::error!(error = %e, "SIGHUP reload failed");
            }
        }
    });
}

#[cfg(not(unix))]
fn reload_on(_hangups: Option<()>, _handle: ultd::supervisor::Handle) {}

/// Resolves on SIGTERM or Ctrl-C. Build it before announcing readiness: a supervisor may send TERM as soon
/// as it sees the listening line, and the handler must already be installed then.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_overrides_reach_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("models.toml");
        std::fs::write(
            &path,
            "[daemon]\nlisten = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:8080\"\n[models.a]\npath = \"a.gguf\"\nkind = \"chat\"\n",
        )
        .unwrap();
        let config = path.display().to_string();
        let args = |extra: &[&str]| {
            let mut a = vec!["ultd", "--config", config.as_str()];
            a.extend_from_slice(extra);
            Args::try_parse_from(a).unwrap()
        };
        let c = load_config(&args(&[])).unwrap();
        assert_eq!(c.daemon.http, Some("127.0.0.1:8080".parse().unwrap()));
        let c = load_config(&args(&["--http", "off", "--listen", "127.0.0.1:7"])).unwrap();
        assert_eq!(c.daemon.http, None);
        assert_eq!(c.daemon.listen, Some("127.0.0.1:7".parse().unwrap()));
        let c = load_config(&args(&["--http", "127.0.0.1:9"])).unwrap();
        assert_eq!(c.daemon.http, Some("127.0.0.1:9".parse().unwrap()));
    }
}
