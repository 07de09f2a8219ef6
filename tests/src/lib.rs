//! Helpers for ult's end-to-end tests: start a real ultd on 127.0.0.1:0 with the real models and
//! connect a client to it. No sleeps: the server is bound before `start` returns.
#![deny(missing_docs)]

pub mod mutate;
pub mod soak;

use std::path::PathBuf;
use std::sync::Arc;

use ult_client::Client;
use ult_engine::CandleEngine;
use ultd::config::Config;
use ultd::server::Running;

/// Installs ult's counting allocator in a test binary, so loads are measured as in ultd.
#[macro_export]
macro_rules! install_allocator {
    () => {
        #[global_allocator]
        static ALLOC: ultd::alloc::Counting = ultd::alloc::Counting;
    };
}

/// The models directory: `$ULT_MODELS_DIR`, or `models/` at the repository root.
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("ULT_MODELS_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"),
        PathBuf::from,
    );
    assert!(
        dir.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").exists(),
        "models are missing from {}: run scripts/fetch-models.sh",
        dir.display()
    );
    dir
}

/// `[models.*]` tables for the three real models.
pub fn model_tables() -> String {
    let m = models_dir();
    format!(
        r#"
[models.smollm2]
path = "{m}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
kind = "chat"
context = 2048
aliases = ["smol"]

[models.gemma3]
path = "{m}/gemma3/gemma-3-270m-q4_k_m.gguf"
kind = "completion"
context = 1024

[models.minilm]
path = "{m}/minilm"
kind = "embedding"
context = 256
"#,
        m = m.display()
    )
}

/// A memory sample for the file probe: 64 GiB in all, `available_gib` available, and the kernel's
/// `psi_some_avg10` stall figure.
pub fn probe_snapshot(available_gib: f64, psi_some_avg10: f64) -> String {
    format!(
        r#"{{"total_bytes": {}, "available_bytes": {}, "process_bytes": 0, "psi_some_avg10": {psi_some_avg10}}}"#,
        64u64 << 30,
        (available_gib * (1u64 << 30) as f64) as u64
    )
}

/// `[daemon]` settings under an 8 GiB ceiling with 4 GiB of headroom, whose memory probe reads
/// [`probe_snapshot`]s a test writes to `probe` (sampled every 50 ms).
pub fn file_probe_daemon(probe: &std::path::Path) -> String {
    format!(
        "memory_ceiling = \"8GiB\"\nheadroom = \"4GiB\"\nprobe_interval = \"50ms\"\n[daemon.probe]\nsource = \"file\"\npath = \"{}\"\n",
        probe.display()
    )
}

/// A daemon running in this process, with its temporary directory.
pub struct TestDaemon {
    /// The running server.
    pub running: Running,
    /// "127.0.0.1:PORT" of the gRPC server.
    pub addr: String,
    /// "127.0.0.1:PORT" of the HTTP API.
    pub http: String,
    /// "127.0.0.1:PORT" of Ollama's API.
    pub ollama: String,
    /// The directory holding models.toml and the state file.
    pub dir: tempfile::TempDir,
}

/// `[daemon]` settings for tests: ephemeral ports for gRPC, HTTP and Ollama's API, no Unix socket, a state
/// file in `dir`.
pub fn daemon_table(dir: &std::path::Path, extra: &str) -> String {
    format!(
        "[daemon]\nlisten = \"127.0.0.1:0\"\nsocket = \"off\"\nhttp = \"127.0.0.1:0\"\nollama = \"127.0.0.1:0\"\nstate_file = \"{}\"\n{extra}\n",
        dir.join("state.json").display()
    )
}

/// Starts ultd with `[daemon]` settings `daemon_extra` and the three real models (plus `more`).
pub async fn start(daemon_extra: &str, more: &str) -> TestDaemon {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!(
        "{}{}{more}",
        daemon_table(dir.path(), daemon_extra),
        model_tables()
    );
    start_in(dir, &text).await
}

/// Starts ultd on a models.toml with exactly `text`, written into `dir`.
pub async fn start_in(dir: tempfile::TempDir, text: &str) -> TestDaemon {
    let engine = CandleEngine::new("cpu").expect("cpu engine");
    start_with(dir, text, engine).await
}

/// Starts ultd on a models.toml with exactly `text`, written into `dir`, serving with `engine`.
pub async fn start_with(dir: tempfile::TempDir, text: &str, engine: CandleEngine) -> TestDaemon {
    let path = dir.path().join("models.toml");
    std::fs::write(&path, text).expect("write models.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let engine = Arc::new(engine);
    let running = ultd::server::spawn(config, engine)
        .await
        .expect("ultd starts");
    let addr = running.tcp.expect("tcp listener").to_string();
    let http = running.http.map(|a| a.to_string()).unwrap_or_default();
    let ollama = running.ollama.map(|a| a.to_string()).unwrap_or_default();
    TestDaemon {
        running,
        addr,
        http,
        ollama,
        dir,
    }
}

impl TestDaemon {
    /// A connected client.
    pub async fn client(&self) -> Client {
        Client::connect(&self.addr).await.expect("connect to ultd")
    }

    /// Stops the daemon (for restart tests), keeping the directory.
    pub async fn stop(self) -> tempfile::TempDir {
        self.running.stop().await;
        self.dir
    }
}

/// A chat request to SmolLM2 for "What is the capital of France?", greedy.
pub fn paris_request(model: &str) -> ult_client::GenerateRequest {
    ult_client::GenerateRequest {
        model: model.into(),
        messages: vec![
            ("system".into(), "You are a helpful assistant.".into()),
            ("user".into(), "What is the capital of France?".into()),
        ],
        max_tokens: Some(24),
        ..Default::default()
    }
}

/// A greedy completion request for `prompt` of at most `max_tokens` tokens.
pub fn completion(model: &str, prompt: &str, max_tokens: u32) -> ult_client::GenerateRequest {
    ult_client::GenerateRequest {
        model: model.into(),
        prompt: prompt.into(),
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

/// Sends one HTTP/1.1 POST of a JSON `body` to `addr` and returns the status code and the whole response.
pub async fn http_post(addr: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the HTTP door");
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.expect("send");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read the response");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// The body of a test that a parent runs as a child process (`--exact NAME`): when `env` names a
/// models.toml, serves it until killed, printing "listening GRPC HTTP" once both are bound; otherwise
/// (the test run itself) returns at once.
pub fn serve_as_child(env: &str) {
    let Ok(path) = std::env::var(env) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let config = Config::load(std::path::Path::new(&path)).unwrap_or_else(|e| panic!("{e}"));
        let engine = Arc::new(CandleEngine::new("cpu").expect("cpu engine"));
        let running = ultd::server::spawn(config, engine)
            .await
            .expect("ultd starts");
        println!(
            "listening {} {}",
            running.tcp.expect("tcp"),
            running.http.expect("http")
        );
        std::future::pending::<()>().await;
    });
}
