//! `models.toml`: daemon settings, models and routes, parsed into typed structs and validated before any
//! socket is bound. Every error names the file, the line and the key.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use ult_policy::{KeepAlive, Route, RouteStrategy, Router, SizeSpec, parse_duration_ms};

use crate::probe::ProbeSource;
use ult_engine::ModelKind;

/// A configuration error, located in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line (0 when the file could not be read).
    pub line: usize,
    /// The dotted key (`models.smollm2.context`), or empty when the file as a whole is wrong.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub file: PathBuf,
    /// Daemon settings.
    pub daemon: DaemonConfig,
    /// Models, by name.
    pub models: Vec<ModelConfig>,
    /// Routes.
    pub routes: Vec<Route>,
    /// What the scan of `model_dirs` skipped, each with why (logged at boot).
    pub skipped: Vec<(PathBuf, String)>,
}

/// Where Ollama's API listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OllamaListener {
    /// The address (Ollama's own default, 127.0.0.1:11434, unless configured).
    pub addr: SocketAddr,
    /// Set when the address was configured: failing to bind it stops ultd. The default address is
    /// often held by Ollama itself; then ultd logs a warning and serves everything else.
    pub required: bool,
}

/// `[daemon]`.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// TCP address for gRPC (None: no TCP listener).
    pub listen: Option<SocketAddr>,
    /// Unix socket for gRPC (None: none).
    pub socket: Option<PathBuf>,
    /// "cpu", "cuda:N", "metal:N" or "auto".
    pub device: String,
    /// The memory ceiling.
    pub memory_ceiling: SizeSpec,
    /// Memory kept free for the OS.
    pub headroom: SizeSpec,
    /// The most models resident at once.
    pub max_resident: Option<u32>,
    /// Default keep-alive for models that set none.
    pub keep_alive: KeepAlive,
    /// Where pins and explicit loads persist.
    pub state_file: Option<PathBuf>,
    /// How often the memory probe samples.
    pub probe_interval_ms: u64,
    /// Where samples come from.
    pub probe: ProbeSource,
    /// How long a request waits for memory or a load before RESOURCE_EXHAUSTED.
    pub load_wait_ms: u64,
    /// How long shutdown lets in-flight streams finish.
    pub shutdown_grace_ms: u64,
    /// How long memory samples must stay calm before the pressure level steps down.
    pub pressure_dwell_ms: u64,
    /// The OpenAI-compatible HTTP API and `/metrics` (None: off).
    pub http: Option<SocketAddr>,
    /// Ollama's native API on its own listener (None: off).
    pub ollama: Option<OllamaListener>,
    /// The largest request body (HTTP) or message (gRPC), in bytes.
    pub max_request_bytes: usize,
    /// A bearer token every request must carry (None: no authentication).
    pub auth_token: Option<String>,
    /// The most requests one client may have running or waiting (0: no limit).
    pub max_requests_per_client: usize,
    /// Directories every model path must lie in (empty: anywhere the operator configures).
    pub model_roots: Vec<PathBuf>,
    /// Folders scanned for models (`crate::discover`): Ollama's store, the Hugging Face cache, LM
    /// Studio's folder, or GGUF files.
    pub model_dirs: Vec<PathBuf>,
    /// Limits that keep one client's requests and connections from hurting the others.
    pub guard: Guard,
    /// Where `headroom` is written (for errors found once the pool's size is known).
    pub headroom_line: usize,
}

impl Config {
    /// Checks the ceiling and the headroom against the governed pool's size (known only at run time, or
    /// from the machine for `--check`): a headroom the pool cannot leave free, or one at least as large as
    /// the ceiling, would refuse every load, so ultd refuses to start with it.
    pub fn check_memory(&self, pool_bytes: u64) -> Result<(u64, u64), ConfigError> {
        let d = &self.daemon;
        let ceiling = d.memory_ceiling.resolve(pool_bytes);
        let headroom = d.headroom.resolve(pool_bytes);
        let error = |message: String| ConfigError {
            file: self.file.clone(),
            line: d.headroom_line,
            key: "daemon.headroom".into(),
            message,
        };
        let b = ult_policy::format_bytes;
        if pool_bytes > 0 && headroom >= pool_bytes {
            return Err(error(format!(
                "headroom {} is not less than the whole governed pool ({}): every load would be refused",
                b(headroom),
                b(pool_bytes)
            )));
        }
        if headroom > 0 && headroom >= ceiling {
            return Err(error(format!(
                "headroom {} is not less than the memory ceiling {}: lower it (or raise memory_ceiling)",
                b(headroom),
                b(ceiling)
            )));
        }
        Ok((ceiling, headroom))
    }
}

/// Limits on request memory, slow readers and connections (`[daemon]` keys of the same names).
#[derive(Debug, Clone, PartialEq)]
pub struct Guard {
    /// Transient memory all requests being prepared (templated, tokenized) may hold at once, in bytes.
    pub request_memory: u64,
    /// Threads that template and tokenize requests (off the async runtime).
    pub request_threads: usize,
    /// How long a stream may wait for a client that does not read before it is cancelled.
    pub write_timeout_ms: u64,
    /// Connections each TCP front door holds at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Connections one client address may hold on a TCP front door.
    pub max_connections_per_client: usize,
    /// How long an HTTP connection may take to send a request's headers (idle keep-alive included).
    pub header_timeout_ms: u64,
    /// A connection that sends nothing (not even an HTTP/2 ping's answer) for this long is closed.
    pub idle_timeout_ms: u64,
    /// How often HTTP/2 connections are pinged.
    pub keepalive_interval_ms: u64,
}

/// `[models.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The name.
    pub name: String,
    /// What it is for.
    pub kind: ModelKind,
    /// A GGUF file, or a BERT directory; relative paths are relative to models.toml.
    pub path: PathBuf,
    /// Context window in tokens (None: the engine's default for the model).
    pub context: Option<usize>,
    /// Other names for it.
    pub aliases: Vec<String>,
    /// Idle time before unloading.
    pub keep_alive: KeepAlive,
    /// Pinned at boot.
    pub pinned: bool,
    /// Eviction priority multiplier.
    pub priority: f64,
    /// Loaded at boot.
    pub preload: bool,
    /// Sequences served at once.
    pub max_sequences: u32,
    /// The smallest KV budget shedding may shrink it to, in tokens.
    pub min_context: Option<usize>,
    /// A chat template replacing the file's.
    pub chat_template: Option<String>,
    /// Keep full KV blocks for later requests with the same prompt prefix (default on).
    pub prefix_cache: bool,
    /// Where it came from: `models.toml`, or the store a `model_dirs` scan found it in (with
    /// ", refined in models.toml" when a table of its name sets more).
    pub origin: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
    #[serde(default)]
    routes: BTreeMap<String, RawRoute>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    listen: Option<String>,
    socket: Option<String>,
    device: Option<String>,
    memory_ceiling: Option<SizeValue>,
    headroom: Option<SizeValue>,
    max_resident: Option<u32>,
    keep_alive: Option<SizeValue>,
    state_file: Option<String>,
    probe_interval: Option<SizeValue>,
    probe: Option<RawProbe>,
    load_wait: Option<SizeValue>,
    shutdown_grace: Option<SizeValue>,
    pressure_dwell: Option<SizeValue>,
    http: Option<String>,
    ollama: Option<String>,
    max_request_bytes: Option<SizeValue>,
    auth_token: Option<String>,
    auth_token_file: Option<String>,
    max_requests_per_client: Option<u32>,
    #[serde(default)]
    model_roots: Vec<String>,
    #[serde(default)]
    model_dirs: Vec<String>,
    request_memory: Option<SizeValue>,
    request_threads: Option<u32>,
    write_timeout: Option<SizeValue>,
    max_connections: Option<u32>,
    max_connections_per_client: Option<u32>,
    header_timeout: Option<SizeValue>,
    idle_timeout: Option<SizeValue>,
    keepalive_interval: Option<SizeValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    source: String,
    path: Option<String>,
}

#[derive(Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawModel {
    /// None: a model a `model_dirs` scan found, refined here.
    path: Option<String>,
    /// None: Chat (for a discovered model).
    kind: Option<ModelKind>,
    context: Option<u32>,
    #[serde(default)]
    aliases: Vec<String>,
    keep_alive: Option<SizeValue>,
    #[serde(default)]
    pin: bool,
    priority: Option<f64>,
    #[serde(default)]
    preload: bool,
    max_sequences: Option<u32>,
    min_context: Option<u32>,
    chat_template: Option<String>,
    prefix_cache: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    models: Vec<String>,
    strategy: Option<String>,
}

/// Sizes and durations may be written as strings ("4GiB", "30m") or plain numbers (bytes, seconds).
#[derive(Deserialize, PartialEq)]
#[serde(untagged)]
enum SizeValue {
    Int(i64),
    Text(String),
}

impl SizeValue {
    fn text(&self) -> String {
        match self {
            Self::Int(i) => i.to_string(),
            Self::Text(t) => t.clone(),
        }
    }
}

impl DaemonConfig {
    /// The settings only a restart applies (everything but `model_dirs` and `model_roots`), in a form
    /// two configurations compare by.
    pub fn restart_settings(&self) -> String {
        let mut c = self.clone();
        c.model_dirs.clear();
        c.model_roots.clear();
        format!("{c:?}")
    }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            key: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Validates `text` as if read from `path` (relative model paths resolve against its directory).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let locator = Locator::new(path, text);
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            let key = locator.key_at(offset);
            let message = e.message().trim().to_string();
            locator.error_at(offset, key, message)
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let daemon = parse_daemon(&locator, &raw.daemon, &base)?;
        let mut scan = crate::discover::scan(&daemon.model_dirs);
        // A discovered file outside model_roots is left out, as a configured one is refused.
        let (inside, outside): (Vec<_>, Vec<_>) = scan
            .models
            .drain(..)
            .partition(|d| within_roots(&d.path, &daemon.model_roots).is_ok());
        scan.skipped.extend(
            outside
                .into_iter()
                .map(|d| (d.path, "outside [daemon] model_roots".to_string())),
        );
        if raw.models.is_empty() && inside.is_empty() {
            return Err(locator.error(
                &["models"],
                if daemon.model_dirs.is_empty() {
                    "no models are configured; add a [models.NAME] table"
                } else {
                    "no models are configured and [daemon] model_dirs holds none ult can load"
                },
            ));
        }
        let mut models = Vec::new();
        for (name, m) in &raw.models {
            let found = inside.iter().find(|d| &d.name == name);
            models.push(parse_model(&locator, name, m, found, &daemon, &base)?);
        }
        // Discovered models that models.toml does not name, with the defaults.
        for d in inside.iter().filter(|d| !raw.models.contains_key(&d.name)) {
            let defaults = RawModel::default();
            models.push(parse_model(
                &locator,
                &d.name,
                &defaults,
                Some(d),
                &daemon,
                &base,
            )?);
        }
        let mut routes = Vec::new();
        for (name, r) in &raw.routes {
            let strategy = match r.strategy.as_deref() {
                None => RouteStrategy::PreferResident,
                Some(s) => RouteStrategy::parse(s).ok_or_else(|| {
                    locator.error(
                        &["routes", name, "strategy"],
                        &format!(
                            "unknown strategy {s:?}; expected \"prefer-resident\" or \"ordered\""
                        ),
                    )
                })?,
            };
            routes.push(Route {
                name: name.clone(),
                models: r.models.clone(),
                strategy,
            });
        }
        let config = Self {
            file: path.to_path_buf(),
            daemon,
            models,
            routes,
            skipped: scan.skipped,
        };
        // Names, aliases and routes must resolve and not collide.
        config.router().map_err(|e| {
            let key = match &e {
                ult_policy::RouterError::UnknownTarget { name, .. }
                | ult_policy::RouterError::RepeatedTarget { name, .. }
                | ult_policy::RouterError::EmptyRoute(name) => {
                    if raw.routes.contains_key(name) {
                        vec!["routes".to_string(), name.clone(), "models".to_string()]
                    } else {
                        let owner = raw
                            .models
                            .iter()
                            .find(|(_, m)| m.aliases.contains(name))
                            .map(|(n, _)| n.clone());
                        vec!["models".into(), owner.unwrap_or_default(), "aliases".into()]
                    }
                }
                ult_policy::RouterError::DuplicateName(name) => {
                    if raw.routes.contains_key(name) {
                        vec!["routes".to_string(), name.clone()]
                    } else {
                        let owner = raw
                            .models
                            .iter()
                            .find(|(_, m)| m.aliases.contains(name))
                            .map(|(n, _)| n.clone());
                        vec![
                            "models".into(),
                            owner.unwrap_or_else(|| name.clone()),
                            "aliases".into(),
                        ]
                    }
                }
            };
            let key: Vec<&str> = key.iter().map(String::as_str).collect();
            locator.error(&key, &e.to_string())
        })?;
        Ok(config)
    }

    /// The router over these models, aliases and routes.
    pub fn router(&self) -> Result<Router, ult_policy::RouterError> {
        Router::try_new(
            self.models.iter().map(|m| m.name.clone()),
            self.models
                .iter()
                .flat_map(|m| m.aliases.iter().map(|a| (a.clone(), m.name.clone()))),
            self.routes.iter().cloned(),
        )
    }
}

fn parse_daemon(l: &Locator<'_>, d: &RawDaemon, base: &Path) -> Result<DaemonConfig, ConfigError> {
    let listen = match d.listen.as_deref() {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 50051))),
        Some("" | "none" | "off") => None,
        Some(s) => Some(s.parse().map_err(|_| {
            l.error(
                &["daemon", "listen"],
                &format!("{s:?} is not an address like \"127.0.0.1:50051\""),
            )
        })?),
    };
    let socket = match d.socket.as_deref() {
        None => Some(default_state_dir().join("ultd.sock")),
        Some("" | "none" | "off") => None,
        Some(s) => Some(resolve(base, s)),
    };
    if listen.is_none() && socket.is_none() {
        return Err(l.error(
            &["daemon", "listen"],
            "both listen and socket are off; ultd would be unreachable",
        ));
    }
    let size = |key: &str, v: &Option<SizeValue>, default: &str| -> Result<SizeSpec, ConfigError> {
        let text = v
            .as_ref()
            .map_or_else(|| default.to_string(), SizeValue::text);
        let spec = SizeSpec::parse(&text).map_err(|e| l.error(&["daemon", key], &e.to_string()))?;
        if spec == SizeSpec::Bytes(0) {
            return Err(l.error(&["daemon", key], "must be greater than 0"));
        }
        Ok(spec)
    };
    let duration =
        |key: &str, v: &Option<SizeValue>, default_ms: u64| -> Result<u64, ConfigError> {
            match v {
                None => Ok(default_ms),
                Some(v) => parse_duration_ms(&v.text())
                    .map_err(|e| l.error(&["daemon", key], &e.to_string())),
            }
        };
    let memory_ceiling = size("memory_ceiling", &d.memory_ceiling, "85%")?;
    let headroom = match &d.headroom {
        Some(SizeValue::Int(0)) => SizeSpec::Bytes(0),
        Some(SizeValue::Text(t)) if t.trim() == "0" => SizeSpec::Bytes(0),
        other => size("headroom", other, "2GiB")?,
    };
    let keep_alive = match &d.keep_alive {
        None => KeepAlive::DEFAULT,
        Some(v) => KeepAlive::parse(&v.text())
            .map_err(|e| l.error(&["daemon", "keep_alive"], &e.to_string()))?,
    };
    let probe_interval_ms = duration("probe_interval", &d.probe_interval, 500)?;
    if probe_interval_ms == 0 {
        return Err(l.error(&["daemon", "probe_interval"], "must be greater than 0"));
    }
    let probe = match &d.probe {
        None => ProbeSource::Os,
        Some(p) => {
            match (p.source.as_str(), &p.path) {
                ("os", _) => ProbeSource::Os,
                ("file", Some(path)) => ProbeSource::File(resolve(base, path)),
                ("file", None) => {
                    return Err(l.error(&["daemon", "probe", "path"], "a file probe needs a path"));
                }
                (other, _) => {
                    return Err(l.error(
                    &["daemon", "probe", "source"],
                    &format!("unknown probe source {other:?}; expected \"os\" or \"file\" (tests only)"),
                ));
                }
            }
        }
    };
    if d.max_resident == Some(0) {
        return Err(l.error(&["daemon", "max_resident"], "must be at least 1"));
    }
    let http = match d.http.as_deref() {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
        Some("" | "none" | "off") => None,
        Some(s) => Some(s.parse().map_err(|_| {
            l.error(
                &["daemon", "http"],
                &format!("{s:?} is not an address like \"127.0.0.1:8080\""),
            )
        })?),
    };
    let ollama = match d.ollama.as_deref() {
        None => Some(OllamaListener {
            addr: SocketAddr::from(([127, 0, 0, 1], 11434)),
            required: false,
        }),
        Some("" | "none" | "off") => None,
        Some(s) => Some(OllamaListener {
            addr: s.parse().map_err(|_| {
                l.error(
                    &["daemon", "ollama"],
                    &format!("{s:?} is not an address like \"127.0.0.1:11434\""),
                )
            })?,
            required: true,
        }),
    };
    let max_request_bytes = match &d.max_request_bytes {
        None => 4 << 20,
        Some(v) => {
            let b = ult_policy::parse_size(&v.text())
                .map_err(|e| l.error(&["daemon", "max_request_bytes"], &e.to_string()))?;
            if !(1024..=1 << 30).contains(&b) {
                return Err(l.error(
                    &["daemon", "max_request_bytes"],
                    "must be between 1KiB and 1GiB",
                ));
            }
            b as usize
        }
    };
    let auth_token = match (&d.auth_token, &d.auth_token_file) {
        (Some(_), Some(_)) => {
            return Err(l.error(
                &["daemon", "auth_token_file"],
                "set auth_token or auth_token_file, not both",
            ));
        }
        (Some(t), None) => Some(t.clone()),
        (None, Some(f)) => {
            let path = resolve(base, f);
            let t = std::fs::read_to_string(&path).map_err(|e| {
                l.error(
                    &["daemon", "auth_token_file"],
                    &format!("cannot read {}: {e}", path.display()),
                )
            })?;
            Some(t.trim().to_string())
        }
        (None, None) => None,
    };
    if auth_token
        .as_deref()
        .is_some_and(|t| t.len() < 16 || t.chars().any(char::is_whitespace))
    {
        return Err(l.error(
            &["daemon", "auth_token"],
            "a token needs at least 16 characters and no spaces",
        ));
    }
    let positive = |key: &str, ms: u64| {
        if ms == 0 {
            Err(l.error(&["daemon", key], "must be greater than 0"))
        } else {
            Ok(ms)
        }
    };
    let count = |key: &str, v: Option<u32>, default: usize| match v {
        Some(0) => Err(l.error(&["daemon", key], "must be at least 1")),
        Some(n) => Ok(n as usize),
        None => Ok(default),
    };
    let request_memory = match &d.request_memory {
        None => 256 << 20,
        Some(v) => ult_policy::parse_size(&v.text())
            .map_err(|e| l.error(&["daemon", "request_memory"], &e.to_string()))?,
    };
    if request_memory < (max_request_bytes as u64) * 2 {
        return Err(l.error(
            &["daemon", "request_memory"],
            &format!(
                "must hold at least two of the largest requests (2 × max_request_bytes = {} bytes)",
                max_request_bytes * 2
            ),
        ));
    }
    let guard = Guard {
        request_memory,
        request_threads: count(
            "request_threads",
            d.request_threads,
            std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8)),
        )?,
        write_timeout_ms: positive(
            "write_timeout",
            duration("write_timeout", &d.write_timeout, 30_000)?,
        )?,
        max_connections: count("max_connections", d.max_connections, 1024)?,
        max_connections_per_client: count(
            "max_connections_per_client",
            d.max_connections_per_client,
            256,
        )?,
        header_timeout_ms: positive(
            "header_timeout",
            duration("header_timeout", &d.header_timeout, 10_000)?,
        )?,
        idle_timeout_ms: positive(
            "idle_timeout",
            duration("idle_timeout", &d.idle_timeout, 300_000)?,
        )?,
        keepalive_interval_ms: positive(
            "keepalive_interval",
            duration("keepalive_interval", &d.keepalive_interval, 30_000)?,
        )?,
    };
    Ok(DaemonConfig {
        listen,
        socket,
        device: d.device.clone().unwrap_or_else(|| "auto".into()),
        memory_ceiling,
        headroom,
        max_resident: d.max_resident,
        keep_alive,
        state_file: match d.state_file.as_deref() {
            None => Some(default_state_dir().join("state.json")),
            Some("" | "none" | "off") => None,
            Some(s) => Some(resolve(base, s)),
        },
        probe_interval_ms,
        probe,
        load_wait_ms: duration("load_wait", &d.load_wait, 120_000)?,
        shutdown_grace_ms: duration("shutdown_grace", &d.shutdown_grace, 10_000)?,
        pressure_dwell_ms: duration("pressure_dwell", &d.pressure_dwell, 5_000)?,
        http,
        ollama,
        max_request_bytes,
        auth_token,
        max_requests_per_client: d.max_requests_per_client.map_or(64, |n| n as usize),
        model_roots: d
            .model_roots
            .iter()
            .map(|r| normalize(&resolve(base, r)))
            .collect(),
        model_dirs: d.model_dirs.iter().map(|r| resolve(base, r)).collect(),
        guard,
        headroom_line: l.error(&["daemon", "headroom"], "").line,
    })
}

/// `path` with every symlink followed, when it lies under one of `roots` (or `roots` is empty); else why
/// not. Checked when the configuration is read and again at every load, so a link repointed after boot
/// cannot lead out of a root; the load then opens the resolved path, not the link.
pub fn within_roots(path: &Path, roots: &[PathBuf]) -> Result<PathBuf, String> {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| normalize(path));
    if roots.is_empty()
        || roots.iter().any(|root| {
            real.starts_with(std::fs::canonicalize(root).unwrap_or_else(|_| root.clone()))
        })
    {
        return Ok(real);
    }
    Err(format!(
        "{} is outside the model roots ({})",
        real.display(),
        roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

fn parse_model(
    l: &Locator<'_>,
    name: &str,
    m: &RawModel,
    found: Option<&crate::discover::Discovered>,
    daemon: &DaemonConfig,
    base: &Path,
) -> Result<ModelConfig, ConfigError> {
    let key = |k: &'static str| ["models", name, k];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'))
    {
        return Err(l.error(
            &["models", name],
            "model names use letters, digits, '-', '_', '.', ':' and '/'",
        ));
    }
    // A table with a path is a model of its own (it replaces a discovered one of its name); one without
    // refines the discovered model of its name.
    let (path, kind, origin) = match (&m.path, found) {
        (Some(p), _) if p.trim().is_empty() => {
            return Err(l.error(&key("path"), "path is empty"));
        }
        (Some(p), _) => {
            let Some(kind) = m.kind else {
                return Err(l.error(&["models", name], "missing field `kind`"));
            };
            (resolve(base, p), kind, "models.toml".to_string())
        }
        (None, Some(d)) => {
            // A table that sets anything refines the model.
            let origin = if *m != RawModel::default() {
                format!("{}, refined in models.toml", d.origin)
            } else {
                d.origin.clone()
            };
            (
                d.path.clone(),
                m.kind.or(d.kind).unwrap_or(ModelKind::Chat),
                origin,
            )
        }
        (None, None) => {
            return Err(l.error(
                &["models", name],
                if daemon.model_dirs.is_empty() {
                    "missing field `path`"
                } else {
                    "no path, and no model of this name was found in [daemon] model_dirs"
                },
            ));
        }
    };
    // A store's own context (Ollama's num_ctx) unless models.toml sets one.
    let store_context = found
        .filter(|_| m.path.is_none())
        .and_then(|d| d.context)
        .and_then(|c| u32::try_from(c).ok());
    let context = m.context.or(store_context);
    if let Some(c) = context
        && !(16..=1 << 20).contains(&c)
    {
        return Err(l.error(
            &key("context"),
            &format!("{c} is not between 16 and 1048576 tokens"),
        ));
    }
    let keep_alive = match &m.keep_alive {
        None => daemon.keep_alive,
        Some(v) => {
            KeepAlive::parse(&v.text()).map_err(|e| l.error(&key("keep_alive"), &e.to_string()))?
        }
    };
    let priority = m.priority.unwrap_or(1.0);
    if !(priority.is_finite() && priority > 0.0) {
        return Err(l.error(
            &key("priority"),
            &format!("{priority} is not a number greater than 0"),
        ));
    }
    let max_sequences = m.max_sequences.unwrap_or(1);
    if !(1..=256).contains(&max_sequences) {
        return Err(l.error(
            &key("max_sequences"),
            &format!("{max_sequences} is not between 1 and 256"),
        ));
    }
    if let (Some(min), Some(ctx)) = (m.min_context, context)
        && min > ctx
    {
        return Err(l.error(
            &key("min_context"),
            &format!("{min} is larger than the context {ctx}"),
        ));
    }
    if let Err(reason) = within_roots(&path, &daemon.model_roots) {
        return Err(l.error(&key("path"), &reason));
    }
    let mut seen = BTreeSet::new();
    for a in &m.aliases {
        if !seen.insert(a) {
            return Err(l.error(&key("aliases"), &format!("alias {a:?} is listed twice")));
        }
    }
    Ok(ModelConfig {
        name: name.to_string(),
        kind,
        path,
        context: context.map(|c| c as usize),
        aliases: m.aliases.clone(),
        keep_alive,
        pinned: m.pin,
        priority,
        preload: m.preload,
        max_sequences,
        min_context: m.min_context.map(|c| c as usize),
        chat_template: m.chat_template.clone(),
        prefix_cache: m.prefix_cache.unwrap_or(true),
        origin,
    })
}

fn resolve(base: &Path, path: &str) -> PathBuf {
    let expanded = match path.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME")
            .map_or_else(|| PathBuf::from(path), |h| PathBuf::from(h).join(rest)),
        None => PathBuf::from(path),
    };
    if expanded.is_absolute() {
        expanded
    } else {
        base.join(expanded)
    }
}

/// Removes `.` and resolves `..` without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// `$ULT_STATE_DIR`, else `~/.cache/ult`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ULT_STATE_DIR") {
        return PathBuf::from(dir);
    }
    std::env::var_os("HOME").map_or_else(
        || PathBuf::from("/tmp/ult"),
        |h| PathBuf::from(h).join(".cache/ult"),
    )
}

/// Finds lines and keys in the TOML source for error messages.
struct Locator<'a> {
    file: &'a Path,
    text: &'a str,
    doc: Option<toml_edit::Document<String>>,
}

impl<'a> Locator<'a> {
    fn new(file: &'a Path, text: &'a str) -> Self {
        Self {
            file,
            text,
            doc: toml_edit::Document::parse(text.to_string()).ok(),
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    fn error_at(&self, offset: usize, key: String, message: String) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: self.line_of(offset),
            key,
            message,
        }
    }

    /// An error at the key `path` (or its nearest existing parent).
    fn error(&self, path: &[&str], message: &str) -> ConfigError {
        let offset = self.span_of(path).unwrap_or(0);
        self.error_at(offset, path.join("."), message.to_string())
    }

    fn span_of(&self, path: &[&str]) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut table: &dyn toml_edit::TableLike = doc.as_table();
        let mut best = None;
        for (i, part) in path.iter().enumerate() {
            let (key, item) = table.get_key_value(part)?;
            best = key.span().map(|s| s.start).or(best);
            if i + 1 == path.len() {
                break;
            }
            match item.as_table_like() {
                Some(t) => table = t,
                None => break,
            }
        }
        best
    }

    /// The dotted key at `offset`: the enclosing `[table]` header plus the key assigned on that line (or
    /// on the line where a multi-line value starts).
    fn key_at(&self, offset: usize) -> String {
        let line_no = self.line_of(offset);
        let lines: Vec<&str> = self.text.lines().collect();
        let mut key = None;
        let mut header = String::new();
        for i in (0..line_no.min(lines.len())).rev() {
            let line = lines[i].trim();
            if line.starts_with('[') {
                header = line
                    .trim_matches(|c| c == '[' || c == ']')
                    .trim()
                    .to_string();
                break;
            }
            if key.is_none()
                && let Some((k, _)) = line.split_once('=')
                && !k.trim().is_empty()
                && !k.contains('"')
            {
                key = Some(k.trim().to_string());
            }
        }
        match key {
            Some(k) if header.is_empty() => k,
            Some(k) => format!("{header}.{k}"),
            None => header,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[daemon]
listen = "127.0.0.1:0"
socket = "off"
memory_ceiling = "4GiB"
headroom = "1GiB"

[models.smollm2]
path = "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
kind = "chat"
context = 2048
aliases = ["smol"]

[models.minilm]
path = "models/minilm"
kind = "embedding"
keep_alive = "never"

[routes.chat]
models = ["smollm2"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/ult/models.toml"), text)
    }

    fn check_error(text: &str, line: usize, key: &str, message_part: &str) {
        let e = parse(text).expect_err("should fail");
        assert_eq!((e.line, e.key.as_str()), (line, key), "{e}");
        assert!(e.message.contains(message_part), "{e}");
        assert!(e.to_string().starts_with("/etc/ult/models.toml:"), "{e}");
    }

    #[test]
    fn a_good_file() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.models.len(), 2);
        assert_eq!(
            c.models[1].path,
            PathBuf::from("/etc/ult/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
        assert_eq!(c.models[0].keep_alive, KeepAlive::Forever);
        assert_eq!(c.daemon.memory_ceiling, SizeSpec::Bytes(4 << 30));
        assert_eq!(c.daemon.socket, None);
        assert!(c.router().is_ok());
    }

    #[test]
    fn a_headroom_the_pool_or_the_ceiling_cannot_hold_is_refused() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.check_memory(64 << 30), Ok((4 << 30, 1 << 30)));
        // Larger than the whole pool.
        let e = c.check_memory(1 << 30).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (6, "daemon.headroom"), "{e}");
        assert!(e.message.contains("whole governed pool"), "{e}");
        // As large as the ceiling.
        let c = parse(&GOOD.replace("headroom = \"1GiB\"", "headroom = \"4GiB\"")).unwrap();
        let e = c.check_memory(64 << 30).unwrap_err();
        assert!(
            e.message.contains("not less than the memory ceiling"),
            "{e}"
        );
        // The guard's defaults and its checks.
        assert_eq!(c.daemon.guard.write_timeout_ms, 30_000);
        check_error(
            &GOOD.replace("listen =", "write_timeout = 0\nlisten ="),
            3,
            "daemon.write_timeout",
            "greater than 0",
        );
        check_error(
            &GOOD.replace("listen =", "request_memory = \"1MiB\"\nlisten ="),
            3,
            "daemon.request_memory",
            "two of the largest requests",
        );
    }

    #[test]
    fn errors_name_file_line_and_key() {
        check_error(
            &GOOD.replace("context = 2048", "context = \"big\""),
            11,
            "models.smollm2.context",
            "invalid type",
        );
        check_error(
            &GOOD.replace("aliases = [\"smol\"]", "alias = [\"smol\"]"),
            12,
            "models.smollm2.alias",
            "unknown field `alias`",
        );
        check_error(
            &GOOD.replace("kind = \"chat\"", "kind = \"poetry\""),
            10,
            "models.smollm2.kind",
            "unknown variant",
        );
        check_error(
            &GOOD.replace("models = [\"smollm2\"]", "models = [\"gpt5\"]"),
            20,
            "routes.chat.models",
            "unknown model \"gpt5\"",
        );
        check_error(
            &GOOD.replace("\"4GiB\"", "\"0\""),
            5,
            "daemon.memory_ceiling",
            "greater than 0",
        );
        check_error(
            &GOOD.replace("\"4GiB\"", "\"four gigs\""),
            5,
            "daemon.memory_ceiling",
            "cannot parse",
        );
        check_error(
            &GOOD.replace("\"1GiB\"", "\"12 parsecs\""),
            6,
            "daemon.headroom",
            "cannot parse",
        );
        check_error(
            &GOOD.replace("listen = \"127.0.0.1:0\"", "listen = \"localhost\""),
            3,
            "daemon.listen",
            "not an address",
        );
        check_error(
            &GOOD.replace("aliases = [\"smol\"]", "aliases = [\"minilm\"]"),
            12,
            "models.smollm2.aliases",
            "used more than once",
        );
        check_error(
            &GOOD.replace("keep_alive = \"never\"", "keep_alive = \"soon\""),
            17,
            "models.minilm.keep_alive",
            "cannot parse",
        );
        check_error(
            &GOOD.replace("[models.minilm]", "[models.smollm2]"),
            14,
            "models.smollm2",
            "duplicate",
        );
        check_error(
            "[daemon]\nlisten = \"127.0.0.1:0\"\n",
            1,
            "models",
            "no models",
        );
        check_error(
            &format!("{GOOD}\n[nonsense]\nx = 1\n"),
            22,
            "nonsense",
            "unknown field `nonsense`",
        );
        let roots = |root: &str, minilm: &str| {
            GOOD.replace(
                "headroom = \"1GiB\"",
                &format!("headroom = \"1GiB\"\nmodel_roots = [\"{root}\"]"),
            )
            .replace("\"models/minilm\"", &format!("\"{minilm}\""))
        };
        check_error(
            &roots("/srv/models", "models/minilm"),
            16,
            "models.minilm.path",
            "outside the model roots",
        );
        check_error(
            &roots("/etc/ult/models", "models/../../secrets"),
            16,
            "models.minilm.path",
            "/etc/secrets is outside",
        );
        assert!(parse(&roots("/etc/ult/models", "models/minilm")).is_ok());
    }
}
