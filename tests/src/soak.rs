//! Thrash under load: many concurrent clients across all models against a ceiling that fits only some, so
//! evictions and lazy loads happen all the time. Counts every request's fate (completed, failed by typed
//! reason, cancelled on purpose, lost), samples the daemon's memory against its ceiling, and reports
//! latency percentiles. Used by the CI-sized test (`tests/soak.rs`) and by `scripts/soak.sh` for long runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use ult_client::{Client, GenerateEvent, GenerateRequest, ModelState};

/// What a soak run does.
#[derive(Debug, Clone)]
pub struct SoakPlan {
    /// ultd's gRPC address.
    pub addr: String,
    /// Concurrent clients, each sending one request at a time.
    pub clients: usize,
    /// How long clients keep starting requests.
    pub duration: Duration,
    /// The daemon's pid, to sample its resident set from /proc (Linux); None to skip.
    pub pid: Option<u32>,
    /// Seed of the request mix.
    pub seed: u64,
    /// Attack the daemon meanwhile (its HTTP address): see [`AttackReport`].
    pub attack_http: Option<String>,
}

/// What the attackers did beside the clients, and how Status answered meanwhile. Four attackers run for
/// the whole soak: 3 MB prompts (each must be refused with INVALID_ARGUMENT), gRPC streams with a 1 KiB
/// window that are never read (held 12 s, past the daemon's write timeout), floods of 200 idle connections
/// on each TCP door (held 3 s), and a Status poller timing every answer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AttackReport {
    /// 3 MB prompts sent.
    pub huge_prompts: u64,
    /// Of those, refused with INVALID_ARGUMENT (all of them, if all is well).
    pub huge_prompts_refused: u64,
    /// Streams opened and never read.
    pub stalled_streams: u64,
    /// Idle connections opened in floods.
    pub flood_connections: u64,
    /// Attacks that got an answer other than the documented one (should be 0).
    pub unexpected: u64,
    /// Status calls timed.
    pub status_calls: u64,
    /// Median Status latency, ms.
    pub status_p50_ms: f64,
    /// 99th percentile Status latency, ms.
    pub status_p99_ms: f64,
    /// Slowest Status answer, ms.
    pub status_max_ms: f64,
}

/// What happened, in numbers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakReport {
    /// Requests started.
    pub sent: u64,
    /// Requests that ended with their final message (generation stats or embeddings).
    pub completed: u64,
    /// Requests refused or ended with a typed error, by "CODE: kind" (intentionally bad requests included).
    pub failed: BTreeMap<String, u64>,
    /// Failures of requests that were valid (should be 0).
    pub failed_valid: u64,
    /// Streams the client dropped on purpose after the first token.
    pub cancelled_by_client: u64,
    /// Requests that neither completed nor failed with a status: a stream cut without its end, a hang past
    /// the per-request limit, or a transport error (must be 0).
    pub lost: u64,
    /// Times the daemon stopped answering (must be 0).
    pub crashes: u64,
    /// Loads and evictions the daemon performed during the run.
    pub loads: u64,
    /// Evictions counted from Status.
    pub evictions: u64,
    /// The ceiling.
    pub ceiling_bytes: u64,
    /// The highest ledger charge seen (Status `used_bytes`).
    pub max_ledger_bytes: u64,
    /// The highest sum of resident models' measured bytes seen.
    pub max_measured_resident_bytes: u64,
    /// The highest resident set of the daemon process above its idle resident set (from /proc), if sampled.
    pub max_rss_above_idle_bytes: Option<u64>,
    /// Status samples taken.
    pub samples: u64,
    /// Median latency of completed requests, ms.
    pub p50_ms: f64,
    /// 99th percentile latency of completed requests, ms.
    pub p99_ms: f64,
    /// Slowest completed request, ms.
    pub max_ms: f64,
    /// The attacks, when the plan asked for them.
    pub attacks: Option<AttackReport>,
}

/// Which of the documented typed failures a request ended with.
fn reason(e: &ult_client::ClientError) -> Option<String> {
    let code = e.code()?;
    let text = e.to_string();
    let kind = [
        ("unknown model", "unknown model"),
        ("generated token must fit", "prompt longer than the context"),
        ("the prompt has", "prompt longer than the context"),
        ("request memory budget", "request memory budget"),
        ("not enough memory", "not enough memory"),
        ("memory ceiling", "larger than the ceiling"),
        ("timed out", "load wait timed out"),
        ("per-client limit", "per-client limit"),
        ("shutting down", "shutting down"),
    ]
    .into_iter()
    .find(|(needle, _)| text.contains(needle))
    .map_or("other", |(_, label)| label);
    Some(format!("{code:?}: {kind}"))
}

#[derive(Default)]
struct Tally {
    report: SoakReport,
    latencies: Vec<f64>,
}

/// xorshift64*: a reproducible request mix without a dependency.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed >> 12;
    *seed ^= *seed << 25;
    *seed ^= *seed >> 27;
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

const WORDS: [&str; 8] = [
    "lighthouse",
    "harbour",
    "keeper",
    "lamp",
    "storm",
    "ship",
    "coast",
    "beam",
];

enum Op {
    Chat(u32),
    Complete(u32),
    Embed(usize),
    CancelMidStream,
    UnknownModel,
    PromptTooLong,
}

fn pick(seed: &mut u64) -> Op {
    let r = next(seed) % 100;
    let n = 1 + (next(seed) % 16) as u32;
    match r {
        0..40 => Op::Chat(n),
        40..65 => Op::Complete(n),
        65..85 => Op::Embed(1 + (next(seed) % 4) as usize),
        85..93 => Op::CancelMidStream,
        93..97 => Op::UnknownModel,
        _ => Op::PromptTooLong,
    }
}

fn text(seed: &mut u64, words: usize) -> String {
    (0..words)
        .map(|_| WORDS[(next(seed) % WORDS.len() as u64) as usize])
        .collect::<Vec<_>>()
        .join(" ")
}

/// How one request ended.
enum Fate {
    Completed(f64),
    Failed(String, bool),
    Cancelled,
    Lost,
}

async fn one(client: &mut Client, op: Op, seed: &mut u64) -> Fate {
    let started = Instant::now();
    let (req, valid, cancel) = match op {
        Op::Embed(n) => {
            let inputs = (0..n).map(|_| text(seed, 6)).collect();
            return match client.embed("minilm", inputs).await {
                Ok(_) => Fate::Completed(started.elapsed().as_secs_f64() * 1000.0),
                Err(e) => match reason(&e) {
                    Some(r) => Fate::Failed(r, true),
                    None => Fate::Lost,
                },
            };
        }
        Op::Chat(n) => (
            GenerateRequest {
                model: "smollm2".into(),
                messages: vec![("user".into(), text(seed, 5))],
                max_tokens: Some(n),
                ..Default::default()
            },
            true,
            false,
        ),
        Op::Complete(n) => (
            GenerateRequest {
                model: "gemma3".into(),
                prompt: text(seed, 8),
                max_tokens: Some(n),
                ..Default::default()
            },
            true,
            false,
        ),
        Op::CancelMidStream => (
            GenerateRequest {
                model: "smollm2".into(),
                prompt: text(seed, 4),
                max_tokens: Some(200),
                ignore_eos: true,
                ..Default::default()
            },
            true,
            true,
        ),
        Op::UnknownModel => (
            GenerateRequest {
                model: "no-such-model".into(),
                prompt: "hello".into(),
                ..Default::default()
            },
            false,
            false,
        ),
        Op::PromptTooLong => (
            GenerateRequest {
                model: "gemma3".into(),
                prompt: text(seed, 3000),
                ..Default::default()
            },
            false,
            false,
        ),
    };
    let mut stream = match client.generate(req).await {
        Ok(s) => s,
        Err(e) => {
            return match reason(&e) {
                Some(r) => Fate::Failed(r, valid),
                None => Fate::Lost,
            };
        }
    };
    while let Some(event) = stream.next().await {
        match event {
            Ok(GenerateEvent::Delta(_)) if cancel => return Fate::Cancelled,
            Ok(GenerateEvent::Delta(_)) => {}
            Ok(GenerateEvent::Done(_)) => {
                return Fate::Completed(started.elapsed().as_secs_f64() * 1000.0);
            }
            Err(e) => {
                return match reason(&e) {
                    Some(r) => Fate::Failed(r, valid),
                    None => Fate::Lost,
                };
            }
        }
    }
    Fate::Lost
}

/// The anonymous resident memory of `pid` in bytes (Linux `RssAnon`: what the process itself holds, without
/// the page cache of the model files it maps while loading).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs the soak and returns its report. Panics only if the daemon cannot be reached at the start.
pub async fn run(plan: SoakPlan) -> SoakReport {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let deadline = Instant::now() + plan.duration;
    let idle_rss = plan.pid.and_then(rss_bytes);
    let mut status_client = Client::connect(&plan.addr).await.expect("connect to ultd");
    let before = status_client.status().await.expect("status");
    let loads_before: u64 = before.models.iter().map(|m| m.loads).sum();

    // The sampler: ledger, measured resident bytes and RSS, every 50 ms until the clients are done.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let tally = tally.clone();
        let done = done.clone();
        let addr = plan.addr.clone();
        let pid = plan.pid;
        tokio::spawn(async move {
            let Ok(mut c) = Client::connect(&addr).await else {
                return;
            };
            let mut misses = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                match c.status().await {
                    Ok(s) => {
                        misses = 0;
                        let measured = s.measured_resident_bytes();
                        let rss = pid.and_then(rss_bytes);
                        let mut t = tally.lock().expect("tally");
                        let r = &mut t.report;
                        r.samples += 1;
                        r.ceiling_bytes = s.daemon.ceiling_bytes;
                        r.max_ledger_bytes = r.max_ledger_bytes.max(s.daemon.used_bytes);
                        r.max_measured_resident_bytes = r.max_measured_resident_bytes.max(measured);
                        if let (Some(now), Some(idle)) = (rss, idle_rss) {
                            let above = now.saturating_sub(idle);
                            r.max_rss_above_idle_bytes =
                                Some(r.max_rss_above_idle_bytes.unwrap_or(0).max(above));
                        }
                    }
                    Err(_) => {
                        misses += 1;
                        if misses == 20 {
                            tally.lock().expect("tally").report.crashes += 1;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let attackers = plan
        .attack_http
        .clone()
        .map(|http| attack(plan.addr.clone(), http, deadline));

    let mut clients = Vec::new();
    for i in 0..plan.clients {
        let tally = tally.clone();
        let addr = plan.addr.clone();
        let mut seed = plan.seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1));
        clients.push(tokio::spawn(async move {
            let Ok(mut client) = Client::connect(&addr).await else {
                tally.lock().expect("tally").report.lost += 1;
                return;
            };
            while Instant::now() < deadline {
                let op = pick(&mut seed);
                tally.lock().expect("tally").report.sent += 1;
                let fate =
                    tokio::time::timeout(Duration::from_secs(120), one(&mut client, op, &mut seed))
                        .await
                        .unwrap_or(Fate::Lost);
                let mut t = tally.lock().expect("tally");
                match fate {
                    Fate::Completed(ms) => {
                        t.report.completed += 1;
                        t.latencies.push(ms);
                    }
                    Fate::Failed(r, valid) => {
                        *t.report.failed.entry(r).or_default() += 1;
                        t.report.failed_valid += u64::from(valid);
                    }
                    Fate::Cancelled => t.report.cancelled_by_client += 1,
                    Fate::Lost => t.report.lost += 1,
                }
            }
        }));
    }
    for c in clients {
        let _ = c.await;
    }
    let attacks = match attackers {
        Some(a) => Some(a.await.unwrap_or_default()),
        None => None,
    };
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.await;
    let after = status_client.status().await;
    let mut t = std::mem::take(&mut *tally.lock().expect("tally"));
    match after {
        Ok(s) => {
            t.report.loads = s.models.iter().map(|m| m.loads).sum::<u64>() - loads_before;
            t.report.evictions = t.report.loads.saturating_sub(
                s.models
                    .iter()
                    .filter(|m| m.state == ModelState::Resident)
                    .count() as u64,
            );
        }
        Err(_) => t.report.crashes += 1,
    }
    t.latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        t.latencies
            .get(((t.latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    t.report.p50_ms = pct(0.5);
    t.report.p99_ms = pct(0.99);
    t.report.max_ms = t.latencies.last().copied().unwrap_or(0.0);
    t.report.attacks = attacks;
    t.report
}

/// Runs the four attackers of [`AttackReport`] until `deadline`.
fn attack(addr: String, http: String, deadline: Instant) -> tokio::task::JoinHandle<AttackReport> {
    tokio::spawn(async move {
        let report = Arc::new(Mutex::new(AttackReport::default()));
        let huge = {
            let (report, addr) = (report.clone(), addr.clone());
            tokio::spawn(async move {
                let Ok(mut c) = Client::connect(&addr).await else {
                    report.lock().expect("report").unexpected += 1;
                    return;
                };
                let text = "lorem ipsum dolor sit amet ".repeat(3_000_000 / 27);
                while Instant::now() < deadline {
                    let r = c
                        .generate_text(GenerateRequest {
                            model: "smollm2".into(),
                            messages: vec![("user".into(), text.clone())],
                            max_tokens: Some(4),
                            ..Default::default()
                        })
                        .await;
                    {
                        let mut rep = report.lock().expect("report");
                        rep.huge_prompts += 1;
                        match r {
                            Err(e) if e.code() == Some(tonic::Code::InvalidArgument) => {
                                rep.huge_prompts_refused += 1;
                            }
                            _ => rep.unexpected += 1,
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        };
        let stall = {
            let (report, addr) = (report.clone(), addr.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let stream = async {
                        let channel =
                            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                                .ok()?
                                .initial_stream_window_size(Some(1024))
                                .connect()
                                .await
                                .ok()?;
                        let mut raw = ult_proto::v1::ult_client::UltClient::new(channel);
                        let request = ult_proto::v1::GenerateRequest {
                            model: "smollm2".into(),
                            input: Some(ult_proto::v1::generate_request::Input::Prompt(
                                "Once upon a time".into(),
                            )),
                            max_tokens: Some(1500),
                            ignore_eos: true,
                            ..Default::default()
                        };
                        raw.generate(request).await.ok()
                    }
                    .await;
                    {
                        let mut rep = report.lock().expect("report");
                        match stream {
                            Some(_) => rep.stalled_streams += 1,
                            None => rep.unexpected += 1,
                        }
                    }
                    // Held unread past the write timeout, then dropped.
                    tokio::time::sleep(Duration::from_secs(12)).await;
                    drop(stream);
                }
            })
        };
        let flood = {
            let report = report.clone();
            let (addr, http) = (addr.clone(), http.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let mut held = Vec::new();
                    for door in [&addr, &http] {
                        for _ in 0..200 {
                            if let Ok(s) = tokio::net::TcpStream::connect(door.as_str()).await {
                                held.push(s);
                            }
                        }
                    }
                    report.lock().expect("report").flood_connections += held.len() as u64;
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    drop(held);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        };
        let mut times = Vec::new();
        if let Ok(mut c) = Client::connect(&addr).await {
            while Instant::now() < deadline {
                let t = Instant::now();
                if c.status().await.is_err() {
                    report.lock().expect("report").unexpected += 1;
                }
                times.push(t.elapsed().as_secs_f64() * 1000.0);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let _ = tokio::join!(huge, stall, flood);
        times.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            times
                .get(((times.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let mut r = std::mem::take(&mut *report.lock().expect("report"));
        r.status_calls = times.len() as u64;
        r.status_p50_ms = pct(0.5);
        r.status_p99_ms = pct(0.99);
        r.status_max_ms = times.last().copied().unwrap_or(0.0);
        r
    })
}

/// Starts `command` with its stdout piped and reads that until a line starting with `prefix` (the daemon's
/// "listening" line: it is printed once the sockets are bound); returns the child and the rest of the line.
pub fn spawn_until_line(
    command: &mut std::process::Command,
    prefix: &str,
) -> std::io::Result<(std::process::Child, String)> {
    use std::io::BufRead;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout"))?;
    for line in std::io::BufReader::new(stdout).lines() {
        if let Some(rest) = line?.strip_prefix(prefix) {
            return Ok((child, rest.to_string()));
        }
    }
    let _ = child.kill();
    Err(std::io::Error::other(format!(
        "the child ended without printing {prefix:?}"
    )))
}
