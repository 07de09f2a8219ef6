//! ultd under attack, on real sockets: huge prompts (one, and eight at once) are refused quickly with bounded
//! memory while Status keeps answering; a gRPC client with a tiny flow-control window and an HTTP SSE client
//! that never read are paused out of the batch and then cancelled, while another client is served; and a
//! flood of idle TCP connections on both front doors leaves the Unix socket answering. The daemons that
//! are measured or flooded run in their own process, so their memory and descriptors are the OS's numbers.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ult_client::Client;
use ult_tests::soak::{rss_bytes, spawn_until_line};
use ult_tests::{daemon_table, http_post, model_tables, paris_request};

ult_tests::install_allocator!();

/// Run as a child by the tests below: serves the models.toml it is given until killed.
#[test]
fn attack_daemon_child() {
    ult_tests::serve_as_child("ULT_ATTACK_CONFIG");
}

/// A daemon in its own process; killed on drop.
struct Child {
    child: std::process::Child,
    grpc: String,
    http: String,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_child(daemon_extra: &str) -> Child {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ultd.sock");
    let table = daemon_table(dir.path(), daemon_extra).replace(
        "socket = \"off\"",
        &format!("socket = \"{}\"", socket.display()),
    );
    // A corrupt model: the real file cut in half (its header is whole, its tensors are not).
    let real = ult_tests::models_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let bytes = std::fs::read(&real).unwrap();
    let broken = dir.path().join("broken.gguf");
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).unwrap();
    let path = dir.path().join("models.toml");
    std::fs::write(
        &path,
        format!(
            "{table}{}\n[models.broken]\npath = \"{}\"\nkind = \"chat\"\ncontext = 512\n",
            model_tables(),
            broken.display()
        ),
    )
    .unwrap();
    // With backtraces on, as a developer's shell may have them: clients must still get messages only.
    let (child, line) = spawn_until_line(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "attack_daemon_child", "--nocapture"])
            .env("RUST_BACKTRACE", "1")
            .env("ULT_ATTACK_CONFIG", &path),
        "listening ",
    )
    .unwrap();
    let mut parts = line.split_whitespace();
    let grpc = parts.next().unwrap().to_string();
    let http = parts.next().unwrap().to_string();
    Child {
        child,
        grpc,
        http,
        socket,
        _dir: dir,
    }
}

fn chat(model: &str, content: String, max_tokens: u32) -> ult_client::GenerateRequest {
    ult_client::GenerateRequest {
        model: model.into(),
        messages: vec![("user".into(), content)],
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

/// The bound this test states before running: eight 3 MB prompts at once may grow ultd's anonymous memory
/// by at most this much (their bytes as received and decoded, never their tokenization: a text too long for
/// the context is refused from its length). Before this was governed, one such prompt alone cost ~340 MiB.
const EIGHT_HUGE_PROMPTS_MAX_GROWTH: u64 = 80 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_prompts_are_refused_quickly_with_bounded_memory_while_status_answers() {
    let d = spawn_child("memory_ceiling = \"1GiB\"\nheadroom = 0\n");
    let pid = d.child.id();
    let mut c = Client::connect(&d.grpc).await.unwrap();
    // The model is resident first, so what grows after is the requests' memory alone.
    c.generate_text(paris_request("smollm2")).await.unwrap();
    let baseline = rss_bytes(pid).unwrap();

    // RSS is sampled throughout; Status is timed throughout.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        })
    };
    let status_times = {
        let stop = stop.clone();
        let addr = d.grpc.clone();
        tokio::spawn(async move {
            let mut c = Client::connect(&addr).await.unwrap();
            let mut worst = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                c.status().await.unwrap();
                worst = worst.max(t.elapsed());
            }
            worst
        })
    };

    let huge = "lorem ipsum dolor sit amet ".repeat(3_000_000 / 27);
    let t = Instant::now();
    let e = c
        .generate_text(chat("smollm2", huge.clone(), 4))
        .await
        .unwrap_err();
    let one = t.elapsed();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    assert!(e.to_string().contains("more than 2047 tokens"), "{e}");

    let t = Instant::now();
    let mut all = Vec::new();
    for i in 0..8 {
        let addr = d.grpc.clone();
        let mut request = chat("smollm2", huge.clone(), 4);
        if i % 2 == 1 {
            // Half as a raw prompt to a completion model: the same bound before the kind check.
            request = ult_client::GenerateRequest {
                model: "gemma3".into(),
                prompt: huge.clone(),
                max_tokens: Some(4),
                ..Default::default()
            };
        }
        all.push(tokio::spawn(async move {
            let mut c = Client::connect(&addr).await.unwrap();
            c.generate_text(request).await.unwrap_err()
        }));
    }
    for h in all {
        let e = h.await.unwrap();
        assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    }
    let eight = t.elapsed();
    // The HTTP front door too: 400 with the OpenAI error code.
    let body = serde_json::json!({
        "model": "smollm2", "messages": [{"role": "user", "content": huge}], "max_tokens": 4,
    })
    .to_string();
    let (status, text) = http_post(&d.http, "/v1/chat/completions", &body).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("context_length_exceeded"), "{text}");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    let worst_status = status_times.await.unwrap();
    let growth = peak.saturating_sub(baseline);
    println!(
        "one 3 MB prompt refused in {one:?}; eight in {eight:?}; RSS growth {} MiB (bound {} MiB); slowest Status {worst_status:?}",
        growth >> 20,
        EIGHT_HUGE_PROMPTS_MAX_GROWTH >> 20
    );
    assert!(
        growth < EIGHT_HUGE_PROMPTS_MAX_GROWTH,
        "RSS grew {growth} bytes"
    );
    // A liveness bound, not a speed figure: the runtime was never blocked by request work (it used to
    // take 22.7 s; BENCHMARKS.md has the measured figures).
    assert!(worst_status < Duration::from_secs(5), "{worst_status:?}");
    // Still serving.
    let (text, _) = c.generate_text(paris_request("smollm2")).await.unwrap();
    assert!(text.contains("Paris"), "{text}");
    // The corrupt model fails alone, with a message and no backtrace, though the daemon captures them.
    let e = c
        .generate_text(chat("broken", "hi".into(), 2))
        .await
        .unwrap_err();
    let shown = e.to_string();
    println!("corrupt model: {shown}");
    assert!(
        !shown.contains("\n") && !shown.contains(" 0: ") && !shown.contains("backtrace"),
        "{shown}"
    );
    let s = c.status().await.unwrap();
    let failure = format!("{:?}", s.model("broken").unwrap().failure);
    assert!(!failure.contains("0: "), "{failure}");
    assert!(d_alive(&d));
}

fn d_alive(d: &Child) -> bool {
    rss_bytes(d.child.id()).is_some()
}

async fn smollm2(c: &mut Client) -> ult_client::ModelInfo {
    c.status().await.unwrap().model("smollm2").unwrap().clone()
}

/// Polls Status (with the watch stream as the wake-up) until `cond` holds.
async fn until(c: &mut Client, what: &str, cond: impl Fn(&ult_client::ModelInfo) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = smollm2(c).await;
        if cond(&m) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_stop_reading_are_paused_then_cancelled_while_others_are_served() {
    // The timeout leaves a stalled stream 30 s to fill its 64-delta backlog and pause first (2 tokens/s,
    // however loaded the machine); which comes first is otherwise a matter of speed.
    let d = ult_tests::start("write_timeout = \"30s\"\n", "").await;
    let mut c = d.client().await;
    // gRPC with a 1 KiB stream window, never read.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", d.addr))
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .connect()
        .await
        .unwrap();
    let mut raw = ult_proto::v1::ult_client::UltClient::new(channel);
    let stalled_grpc = raw
        .generate(ult_proto::v1::GenerateRequest {
            model: "smollm2".into(),
            input: Some(ult_proto::v1::generate_request::Input::Messages(
                ult_proto::v1::Messages {
                    messages: vec![ult_proto::v1::ChatMessage {
                        role: "user".into(),
                        content: "Tell me a very long story.".into(),
                    }],
                },
            )),
            max_tokens: Some(1900),
            ignore_eos: true,
            ..Default::default()
        })
        .await
        .unwrap();
    // HTTP SSE with a tiny receive buffer, never read. It also advertises a small MSS: on loopback (MSS
    // 64 KiB) the kernel sizes ultd's send buffer from it to over a megabyte, which would swallow this
    // whole stream; real networks have their ordinary MSS.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    {
        use std::os::fd::AsRawFd;
        let mss: libc::c_int = 536;
        // SAFETY: a plain setsockopt on a socket this test owns, with a c_int option value.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_MAXSEG,
                (&raw const mss).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "TCP_MAXSEG");
    }
    let mut stalled_http = socket.connect(d.http.parse().unwrap()).await.unwrap();
    let body = serde_json::json!({
        "model": "smollm2", "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 1900, "stream": true, "ignore_eos": true,
    })
    .to_string();
    stalled_http
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();

    // A stalled stream leaves the batch once its backlog is full (with one sequence allowed at a time, that
    // is also what lets the other stalled stream in).
    let t0 = Instant::now();
    until(&mut c, "a stalled stream paused", |m| {
        m.paused_sequences >= 1
    })
    .await;
    println!("paused after {:?}", t0.elapsed());
    // Another client on the same model is served meanwhile, start to end.
    let (text, done) = c.generate_text(paris_request("smollm2")).await.unwrap();
    println!("served after {:?}", t0.elapsed());
    assert!(text.contains("Paris"), "{text}");
    assert!(done.completion_tokens > 0);
    // After the write timeout both are cancelled: nothing runs, nothing is paused, no blocks are held.
    until(&mut c, "both stalled streams cancelled", |m| {
        m.paused_sequences == 0 && m.running_sequences == 0 && m.cancelled >= 2
    })
    .await;
    println!("cancelled after {:?}", t0.elapsed());
    let m = smollm2(&mut c).await;
    assert_eq!(m.kv_blocks_used, 0, "{m:?}");
    // The model is idle again: it can be unloaded.
    c.unload("smollm2").await.unwrap();
    let metrics = {
        let mut s = tokio::net::TcpStream::connect(&d.http).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let stalled: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("ult_requests_total") && l.contains("outcome=\"stalled\""))
        .collect();
    assert!(!stalled.is_empty(), "{metrics}");
    drop(stalled_grpc);
    drop(stalled_http);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_flood_on_both_tcp_doors_leaves_the_unix_socket_answering() {
    let d = spawn_child("header_timeout = \"60s\"\n");
    // This test process holds 4,000 sockets.
    assert!(ultd::conn::raise_fd_limit().is_some_and(|n| n > 4_500));
    let mut flood = Vec::new();
    for addr in [&d.grpc, &d.http] {
        for _ in 0..2000 {
            flood.push(tokio::net::TcpStream::connect(addr.as_str()).await.unwrap());
        }
    }
    // The socket still answers Status at once.
    let mut c = Client::connect(&format!("unix://{}", d.socket.display()))
        .await
        .unwrap();
    let s = tokio::time::timeout(Duration::from_secs(10), c.status())
        .await
        .expect("Status over the Unix socket")
        .unwrap();
    assert!(s.model("smollm2").is_some());
    // The connections past the per-client cap (256 per door by default) were closed by ultd.
    let mut closed = 0;
    for s in flood.iter_mut().rev().take(100) {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 100, "the last connections of the flood are closed");
    // With the flood gone, TCP serves again.
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut tcp) = Client::connect(&d.grpc).await
            && tcp.status().await.is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "TCP did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(d_alive(&d));
}
