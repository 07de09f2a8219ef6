//! ultctl: talk to ultd. Tables by default, `--json` for scripts. Exit codes: 0 ok, 1 a negative answer
//! (not resident, would not fit, no such lease), 2 an error. A closed stdout (`| head`) exits 0.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use ult_client::{Client, GenerateEvent, GenerateRequest, Sampling, StatusReport, human_bytes};

/// Control ult's daemon.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// ultd's address: host:port or unix:///path/to/ultd.sock.
    #[arg(
        long,
        env = "ULT_ADDR",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    addr: String,
    /// Print JSON instead of tables (documented in README.md, "ultctl --json").
    #[arg(long, global = true)]
    json: bool,
    /// A bearer token, when ultd requires one.
    #[arg(long, env = "ULT_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show memory, pressure and every model's state and ledger.
    Status,
    /// List the models: kind, state, architecture, where each came from (models.toml or a store of
    /// `[daemon] model_dirs`) and its file.
    Models,
    /// Load a model (a progress bar shows bytes as they load).
    Load {
        /// Model, alias or route.
        model: String,
    },
    /// Unload an idle, unpinned model.
    Unload {
        /// Model, alias or route.
        model: String,
    },
    /// Generate text, streaming it to stdout; statistics go to stderr.
    Generate {
        /// Model, alias or route.
        model: String,
        /// The prompt (with --chat, the user message).
        prompt: String,
        /// Use the model's chat template.
        #[arg(long)]
        chat: bool,
        /// A system message (implies --chat).
        #[arg(long)]
        system: Option<String>,
        /// Most new tokens (0: until the context is full or a stop).
        #[arg(long, default_value_t = 256)]
        max_tokens: u32,
        /// Sampling temperature (0: greedy).
        #[arg(long)]
        temperature: Option<f32>,
        /// Top-k.
        #[arg(long)]
        top_k: Option<u32>,
        /// Top-p.
        #[arg(long)]
        top_p: Option<f32>,
        /// Repetition penalty.
        #[arg(long)]
        repetition_penalty: Option<f32>,
        /// Seed (same seed, same text).
        #[arg(long)]
        seed: Option<u64>,
        /// Stop sequence (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Keep generating past end-of-sequence tokens (benchmarks).
        #[arg(long)]
        ignore_eos: bool,
        /// The answer must be JSON valid against the JSON schema in this file.
        #[arg(long, value_name = "FILE")]
        json_schema: Option<std::path::PathBuf>,
        /// The answer must be a JSON object.
        #[arg(long, conflicts_with = "json_schema")]
        json_object: bool,
    },
    /// Embed texts.
    Embed {
        /// Model, alias or route.
        model: String,
        /// Texts.
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Pin a model: load it and never evict it.
    Pin {
        /// Model, alias or route.
        model: String,
    },
    /// Remove a pin.
    Unpin {
        /// Model, alias or route.
        model: String,
    },
    /// Hold a model against eviction for a while.
    Lease {
        /// Model, alias or route.
        model: String,
        /// Seconds (default 300).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Release a lease.
    Release {
        /// The lease id.
        lease_id: u64,
    },
    /// Show what loading a model would evict, without doing it.
    PlanLoad {
        /// Model, alias or route.
        model: String,
    },
    /// Re-read models.toml and rescan model_dirs (as SIGHUP does): new models appear, removed ones
    /// unload once idle, changed ones reload on next use; an invalid file is refused and nothing changes.
    Reload,
    /// Stream state changes: loads, evictions with reasons, pressure.
    Watch,
    /// Run ultd as a per-user service: a launchd agent (macOS) or a systemd user unit (Linux).
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// A live view of memory and models, refreshed every interval (Ctrl-C to quit).
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many refreshes (for scripts).
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum ServiceAction {
    /// Write the agent (or unit) and start it, now and at every login.
    Install {
        /// models.toml for the service.
        #[arg(long)]
        config: std::path::PathBuf,
        /// The ultd binary (default: the one beside ultctl).
        #[arg(long)]
        ultd: Option<std::path::PathBuf>,
    },
    /// Stop the service and remove its file.
    Uninstall,
    /// Whether it is installed and running, and where its logs are.
    Status,
    /// Print the file `install` would write (for this platform, or --platform systemd|launchd).
    Print {
        /// models.toml for the service.
        #[arg(long)]
        config: std::path::PathBuf,
        /// The ultd binary (default: the one beside ultctl).
        #[arg(long)]
        ultd: Option<std::path::PathBuf>,
        /// systemd or launchd.
        #[arg(long)]
        platform: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ultctl: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ultctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `ultctl models`: one row per model.
fn print_models(out: &mut impl Write, s: &StatusReport) -> anyhow::Result<()> {
    let rows: Vec<[String; 6]> = s
        .models
        .iter()
        .map(|m| {
            [
                m.name.clone(),
                m.kind.clone(),
                format!("{:?}", m.state).to_lowercase(),
                m.architecture.clone(),
                m.origin.clone(),
                m.path.clone(),
            ]
        })
        .collect();
    let head = ["NAME", "KIND", "STATE", "ARCH", "ORIGIN", "PATH"];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([head[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..head.len()).map(width).collect();
    let line = |cells: &[&str]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(&head))?;
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        writeln!(out, "{}", line(&cells))?;
    }
    Ok(())
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Service { action } = cli.command {
        return service(action);
    }
    let mut client = Client::connect_with_token(&cli.addr, cli.token.as_deref()).await?;
    let mut out = std::io::stdout().lock();
    let json = cli.json;
    match cli.command {
        Command::Status => {
            let s = client.status().await?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
            } else {
                print_status(&mut out, &s)?;
            }
        }
        Command::Models => {
            let s = client.status().await?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&s.models)?)?;
            } else {
                print_models(&mut out, &s)?;
            }
        }
        Command::Load { model } => {
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let outcome = client
                .load(&model, |loaded, total| {
                    if tty && total > 0 {
                        let width = 30;
                        let filled = (loaded.min(total) * width / total) as usize;
                        eprint!(
                            "\r{model} [{}{}] {:>3}% {} / {}",
                            "#".repeat(filled),
                            " ".repeat(width as usize - filled),
                            loaded * 100 / total,
                            human_bytes(loaded),
                            human_bytes(total)
                        );
                    }
                })
                .await;
            if tty {
                eprint!("\r\x1b[2K");
            }
            let o = outcome?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&o)?)?;
            } else if o.loaded_now {
                writeln!(
                    out,
                    "loaded {} in {} ms: measured {} (predicted {}){}",
                    o.model,
                    o.load_ms,
                    human_bytes(o.measured_bytes),
                    human_bytes(o.predicted_bytes),
                    if o.evicted.is_empty() {
                        String::new()
                    } else {
                        format!("; evicted {}", o.evicted.join(", "))
                    }
                )?;
            } else {
                writeln!(out, "{} is already resident", o.model)?;
            }
        }
        Command::Unload { model } => {
            let o = client.unload(&model).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&o)?)?;
            } else if o.unloaded {
                writeln!(
                    out,
                    "unloaded {} ({} freed)",
                    o.model,
                    human_bytes(o.freed_bytes)
                )?;
            } else {
                writeln!(out, "{} was not resident", o.model)?;
            }
            if !o.unloaded {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Generate {
            model,
            prompt,
            chat,
            system,
            max_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            stop,
            ignore_eos,
            json_schema,
            json_object,
        } => {
            let json_schema = match json_schema {
                None => None,
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading the schema {}", path.display()))?;
                    serde_json::from_str::<serde_json::Value>(&text)
                        .with_context(|| format!("{} is not JSON", path.display()))?;
                    Some(text)
                }
            };
            let messages = if chat || system.is_some() {
                let mut m = Vec::new();
                if let Some(s) = system {
                    m.push(("system".to_string(), s));
                }
                m.push(("user".to_string(), prompt.clone()));
                m
            } else {
                Vec::new()
            };
            let req = GenerateRequest {
                model,
                prompt,
                messages,
                max_tokens: (max_tokens > 0).then_some(max_tokens),
                sampling: Sampling {
                    temperature,
                    top_k,
                    top_p,
                    repetition_penalty,
                    seed,
                },
                stop,
                ignore_eos,
                json_schema,
                json_object,
            };
            let stream = client.generate(req).await?;
            futures::pin_mut!(stream);
            let mut text = String::new();
            while let Some(event) = stream.next().await {
                match event? {
                    GenerateEvent::Delta(t) => {
                        if json {
                            text.push_str(&t);
                        } else {
                            out.write_all(t.as_bytes())?;
                            out.flush()?;
                        }
                    }
                    GenerateEvent::Done(stats) => {
                        if json {
                            let v = serde_json::json!({ "text": text, "stats": stats });
                            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
                        } else {
                            writeln!(out)?;
                            eprintln!(
                                "[{}] {} prompt ({} cached) + {} generated tokens, finish {}; prompt {:.1} tok/s, decode {:.1} tok/s, first token {} ms{}",
                                stats.model,
                                stats.prompt_tokens,
                                stats.cached_tokens,
                                stats.completion_tokens,
                                stats.finish_reason,
                                stats.prompt_tokens_per_s,
                                stats.decode_tokens_per_s,
                                stats.time_to_first_token_ms,
                                stats
                                    .load_ms
                                    .map(|ms| format!(", loaded in {ms} ms"))
                                    .unwrap_or_default()
                            );
                        }
                        return Ok(ExitCode::SUCCESS);
                    }
                }
            }
            anyhow::bail!("the stream ended without final statistics");
        }
        Command::Embed { model, texts } => {
            let o = client.embed(&model, texts.clone()).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&o)?)?;
            } else {
                let rows: Vec<Vec<String>> = texts
                    .iter()
                    .zip(&o.embeddings)
                    .map(|(t, e)| {
                        let head: Vec<String> =
                            e.iter().take(4).map(|x| format!("{x:.4}")).collect();
                        vec![
                            truncate(t, 40),
                            e.len().to_string(),
                            format!("[{}, …]", head.join(", ")),
                        ]
                    })
                    .collect();
                table(&mut out, &["TEXT", "DIM", "VALUES"], &rows)?;
            }
        }
        Command::Pin { model } => {
            let m = client.pin(&model).await?;
            print_line(
                &mut out,
                json,
                &serde_json::json!({"model": m, "pinned": true}),
                &format!("pinned {m}"),
            )?;
        }
        Command::Unpin { model } => {
            let m = client.unpin(&model).await?;
            print_line(
                &mut out,
                json,
                &serde_json::json!({"model": m, "pinned": false}),
                &format!("unpinned {m}"),
            )?;
        }
        Command::Lease { model, ttl } => {
            let l = client.lease(&model, ttl.map(Duration::from_secs)).await?;
            let text = format!(
                "lease {} on {} until {} (unix ms)",
                l.lease_id, l.model, l.expires_unix_ms
            );
            print_line(&mut out, json, &serde_json::to_value(&l)?, &text)?;
        }
        Command::Release { lease_id } => {
            let released = client.release(lease_id).await?;
            let text = if released {
                format!("released lease {lease_id}")
            } else {
                format!("no lease {lease_id}")
            };
            print_line(
                &mut out,
                json,
                &serde_json::json!({"lease_id": lease_id, "released": released}),
                &text,
            )?;
            if !released {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Reload => {
            let r = client.reload().await?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
            } else {
                let rows: Vec<Vec<String>> = [
                    ("added", &r.added),
                    ("removed (unloads once idle)", &r.removed),
                    ("reloaded on next use", &r.reloaded),
                    ("settings updated", &r.updated),
                ]
                .into_iter()
                .filter(|(_, names)| !names.is_empty())
                .map(|(what, names)| vec![what.to_string(), names.join(", ")])
                .collect();
                if rows.is_empty() {
                    writeln!(out, "reloaded: nothing changed ({} models)", r.unchanged)?;
                } else {
                    table(&mut out, &["CHANGE", "MODELS"], &rows)?;
                    writeln!(out, "{} models unchanged", r.unchanged)?;
                }
            }
        }
        Command::PlanLoad { model } => {
            let p = client.plan_load(&model).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&p)?)?;
            } else if p.already_resident {
                writeln!(out, "{} is already resident", p.model)?;
            } else {
                writeln!(
                    out,
                    "{}: needs {}, {} free",
                    p.model,
                    human_bytes(p.need_bytes),
                    human_bytes(p.free_bytes)
                )?;
                match (&p.refusal, p.fits) {
                    (Some(r), _) => writeln!(out, "would not load: {r}")?,
                    (None, true) if p.evictions.is_empty() => {
                        writeln!(out, "fits without evicting anything")?
                    }
                    _ => {
                        let rows: Vec<Vec<String>> = p
                            .evictions
                            .iter()
                            .map(|(m, b, s)| vec![m.clone(), human_bytes(*b), format!("{s:.3}")])
                            .collect();
                        writeln!(out, "would evict, in order:")?;
                        table(&mut out, &["MODEL", "FREES", "SCORE"], &rows)?;
                    }
                }
            }
            if !p.fits {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Top { interval, count } => {
            let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
            let mut n = 0u64;
            loop {
                let s = client.status().await?;
                if json {
                    writeln!(out, "{}", serde_json::to_string(&s)?)?;
                } else {
                    if tty {
                        // Clear the screen and go home, then draw.
                        write!(out, "\x1b[2J\x1b[H")?;
                    }
                    print_status(&mut out, &s)?;
                    let d = &s.daemon;
                    let bar = |part: u64, whole: u64| {
                        let width = 40usize;
                        let filled = if whole == 0 {
                            0
                        } else {
                            (part.min(whole) as f64 / whole as f64 * width as f64) as usize
                        };
                        format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
                    };
                    writeln!(
                        out,
                        "\nledger {} {} / {}",
                        bar(d.used_bytes, d.ceiling_bytes),
                        human_bytes(d.used_bytes),
                        human_bytes(d.ceiling_bytes)
                    )?;
                    writeln!(
                        out,
                        "pool   {} {} in use, process {}, swap-out {}/s",
                        bar(
                            d.pool_total_bytes.saturating_sub(d.available_bytes),
                            d.pool_total_bytes
                        ),
                        human_bytes(d.pool_total_bytes.saturating_sub(d.available_bytes)),
                        human_bytes(d.process_bytes),
                        human_bytes(d.swap_out_bytes_per_s as u64)
                    )?;
                    if !tty {
                        writeln!(out)?;
                    }
                }
                out.flush()?;
                n += 1;
                if count.is_some_and(|c| n >= c) {
                    break;
                }
                tokio::time::sleep(Duration::from_secs_f64(interval.max(0.1))).await;
            }
        }
        // Answered above, before connecting.
        Command::Service { .. } => anyhow::bail!("service commands need no daemon"),
        Command::Watch => {
            let stream = client.watch().await?;
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                let item = item?;
                if json {
                    writeln!(out, "{}", serde_json::to_string(&item)?)?;
                } else {
                    writeln!(
                        out,
                        "{} {:<11} {:<12} {}",
                        item.unix_ms,
                        item.kind,
                        item.model.unwrap_or_default(),
                        item.detail
                    )?;
                }
                out.flush()?;
            }
        }
    }
    out.flush().context("writing output")?;
    Ok(ExitCode::SUCCESS)
}

fn print_line(
    out: &mut impl Write,
    json: bool,
    value: &serde_json::Value,
    text: &str,
) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{value}")?;
    } else {
        writeln!(out, "{text}")?;
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

fn duration(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{}s", ms / 1000),
        60_000..3_600_000 => format!("{}m", ms / 60_000),
        _ => format!("{}h", ms / 3_600_000),
    }
}

fn print_status(out: &mut impl Write, s: &StatusReport) -> anyhow::Result<()> {
    let d = &s.daemon;
    writeln!(
        out,
        "ultd {} on {} · ceiling {} of {} · used {} · free {} · available {} · pressure {}",
        d.version,
        d.device,
        human_bytes(d.ceiling_bytes),
        human_bytes(d.pool_total_bytes),
        human_bytes(d.used_bytes),
        human_bytes(d.free_bytes),
        human_bytes(d.available_bytes),
        d.pressure
    )?;
    if d.metal_working_set_bytes > 0 {
        writeln!(
            out,
            "Metal working set {} (Metal holds {}) · unified memory {} · {} binds",
            human_bytes(d.metal_working_set_bytes),
            human_bytes(d.metal_allocated_bytes),
            human_bytes(d.unified_memory_bytes),
            if d.metal_working_set_bytes < d.unified_memory_bytes {
                "the working set"
            } else {
                "unified memory"
            }
        )?;
    } else if d.pool_source != "machine" && !d.pool_source.is_empty() {
        writeln!(out, "pool sized by {}", d.pool_source)?;
    }
    if d.request_memory_bytes > 0 || d.requests_refused_for_memory > 0 {
        writeln!(
            out,
            "requests being prepared hold {} of {} ({} refused so far)",
            human_bytes(d.request_memory_bytes),
            human_bytes(d.request_memory_budget_bytes),
            d.requests_refused_for_memory
        )?;
    }
    if d.pressure != "normal" {
        writeln!(out, "pressure: {}", d.pressure_reason)?;
    }
    let rows: Vec<Vec<String>> = s
        .models
        .iter()
        .map(|m| {
            let state = match (&m.failure, m.state) {
                (Some(f), _) => format!("failed: {}", truncate(f, 60)),
                (None, st) => format!("{st:?}").to_lowercase(),
            };
            vec![
                m.name.clone(),
                m.kind.clone(),
                state,
                human_bytes(m.predicted_steady_bytes),
                m.measured_bytes
                    .map(human_bytes)
                    .unwrap_or_else(|| "-".into()),
                human_bytes(m.predicted_scratch_bytes),
                format!("{}", m.kv_budget_tokens),
                if m.pinned { "yes".into() } else { "".into() },
                if m.state == ult_client::ModelState::Resident && m.in_flight == 0 {
                    duration(m.idle_ms)
                } else {
                    "".into()
                },
                m.keep_alive_ms.map_or_else(|| "never".into(), duration),
                format!("{}/{}", m.in_flight, m.queued),
                if m.kv_blocks_total > 0 {
                    let paused = if m.paused_sequences > 0 {
                        format!(" ‖{}", m.paused_sequences)
                    } else {
                        String::new()
                    };
                    format!(
                        "{}/{} +{}{paused}",
                        m.running_sequences, m.max_sequences, m.waiting_sequences
                    )
                } else {
                    "".into()
                },
                if m.kv_blocks_total > 0 {
                    format!("{}/{}", m.kv_blocks_used, m.kv_blocks_total)
                } else {
                    "".into()
                },
                format!("{}", m.preemptions),
                if m.prefix_cache && m.kv_blocks_total > 0 {
                    format!(
                        "{} · {}/{} · {}",
                        m.kv_cached_blocks,
                        m.prefix_cache_hits,
                        m.prefix_cache_hits + m.prefix_cache_misses,
                        m.prefix_cached_tokens
                    )
                } else {
                    "".into()
                },
                format!("{:.2}", m.score),
            ]
        })
        .collect();
    table(
        out,
        &[
            "MODEL",
            "KIND",
            "STATE",
            "PREDICTED",
            "MEASURED",
            "+SCRATCH",
            "KV TOKENS",
            "PIN",
            "IDLE",
            "KEEP-ALIVE",
            "REQ/WAIT",
            "BATCH",
            "KV BLOCKS",
            "PREEMPT",
            "CACHE BLK · HITS · SAVED",
            "SCORE",
        ],
        &rows,
    )?;
    if !s.routes.is_empty() {
        writeln!(out)?;
        let rows: Vec<Vec<String>> = s
            .routes
            .iter()
            .map(|r| vec![r.name.clone(), r.strategy.clone(), r.models.join(" → ")])
            .collect();
        table(out, &["ROUTE", "STRATEGY", "MODELS"], &rows)?;
    }
    for m in s.models.iter().filter(|m| m.unload_fell_short) {
        writeln!(
            out,
            "warning: {}'s last unload freed {} on the device of the {} its load took",
            m.name,
            human_bytes(m.last_unload_freed_bytes),
            human_bytes(m.last_unload_load_bytes)
        )?;
    }
    Ok(())
}

/// A plain left-aligned table.
fn table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// `ultctl service …`: runs no RPC, only files and the platform's service manager.
fn service(action: ServiceAction) -> anyhow::Result<ExitCode> {
    use ult_client::service::{LAUNCHD_LABEL, Platform, SYSTEMD_UNIT, ServiceSpec};
    let home = std::path::PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?);
    let xdg = std::env::var_os("XDG_CONFIG_HOME").map(std::path::PathBuf::from);
    let platform = Platform::current();
    let file = platform.file(&home, xdg.as_deref());
    let log = home.join("Library/Logs/ult/ultd.log");
    let spec = |config: &std::path::Path,
                ultd: Option<std::path::PathBuf>|
     -> anyhow::Result<ServiceSpec> {
        let config = std::fs::canonicalize(config)
            .with_context(|| format!("the configuration {}", config.display()))?;
        let ultd = match ultd {
            Some(p) => p,
            None => std::env::current_exe()?
                .parent()
                .map(|d| d.join("ultd"))
                .filter(|p| p.exists())
                .context("no ultd beside ultctl; give --ultd PATH")?,
        };
        let ultd = std::fs::canonicalize(&ultd)
            .with_context(|| format!("the binary {}", ultd.display()))?;
        Ok(ServiceSpec {
            ultd,
            config,
            log: log.clone(),
        })
    };
    // Runs a service-manager command; its failure is reported, not hidden.
    let manager = |program: &str, args: &[&str]| -> Result<String, String> {
        match std::process::Command::new(program).args(args).output() {
            Ok(o) if o.status.success() => {
                Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
            }
            Ok(o) => Err(format!(
                "`{program} {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run {program}: {e}")),
        }
    };
    let uid = || manager("id", &["-u"]).unwrap_or_else(|_| "501".into());
    let mut out = std::io::stdout().lock();
    match action {
        ServiceAction::Print {
            config,
            ultd,
            platform: p,
        } => {
            let p = match p.as_deref() {
                None => platform,
                Some("systemd") => Platform::Systemd,
                Some("launchd") => Platform::Launchd,
                Some(other) => anyhow::bail!("unknown platform {other:?}: systemd or launchd"),
            };
            write!(out, "{}", p.render(&spec(&config, ultd)?))?;
            Ok(ExitCode::SUCCESS)
        }
        ServiceAction::Install { config, ultd } => {
            let spec = spec(&config, ultd)?;
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(&file, platform.render(&spec))
                .with_context(|| format!("writing {}", file.display()))?;
            writeln!(out, "wrote {}", file.display())?;
            let started = match platform {
                Platform::Systemd => {
                    manager("systemctl", &["--user", "daemon-reload"]).and_then(|_| {
                        manager("systemctl", &["--user", "enable", "--now", SYSTEMD_UNIT])
                    })
                }
                Platform::Launchd => {
                    if let Some(dir) = spec.log.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    let domain = format!("gui/{}", uid());
                    let _ = manager(
                        "launchctl",
                        &["bootout", &format!("{domain}/{LAUNCHD_LABEL}")],
                    );
                    manager(
                        "launchctl",
                        &["bootstrap", &domain, &file.display().to_string()],
                    )
                }
            };
            match started {
                Ok(_) => {
                    let logs = match platform {
                        Platform::Systemd => "journalctl --user -u ultd -f".to_string(),
                        Platform::Launchd => format!("tail -f {}", spec.log.display()),
                    };
                    writeln!(
                        out,
                        "ultd runs as a service now and at every login; logs: {logs}"
                    )?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!(
                        "ultctl: {e}\nthe file is written but the service is not running{}",
                        if platform == Platform::Systemd {
                            " (no user session manager? log in normally, or `loginctl enable-linger $USER`)"
                        } else {
                            ""
                        }
                    );
                    Ok(ExitCode::from(2))
                }
            }
        }
        ServiceAction::Uninstall => {
            let stopped = match platform {
                Platform::Systemd => {
                    manager("systemctl", &["--user", "disable", "--now", SYSTEMD_UNIT])
                }
                Platform::Launchd => manager(
                    "launchctl",
                    &["bootout", &format!("gui/{}/{LAUNCHD_LABEL}", uid())],
                ),
            };
            if let Err(e) = &stopped {
                eprintln!("ultctl: {e} (removing the file anyway)");
            }
            match std::fs::remove_file(&file) {
                Ok(()) => writeln!(out, "removed {}", file.display())?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    writeln!(out, "not installed ({} does not exist)", file.display())?;
                    return Ok(ExitCode::from(1));
                }
                Err(e) => return Err(e).with_context(|| format!("removing {}", file.display())),
            }
            if platform == Platform::Systemd {
                let _ = manager("systemctl", &["--user", "daemon-reload"]);
            }
            Ok(ExitCode::SUCCESS)
        }
        ServiceAction::Status => {
            if !file.exists() {
                writeln!(out, "not installed ({} does not exist)", file.display())?;
                return Ok(ExitCode::from(1));
            }
            let state = match platform {
                Platform::Systemd => manager("systemctl", &["--user", "is-active", SYSTEMD_UNIT]),
                Platform::Launchd => manager(
                    "launchctl",
                    &["print", &format!("gui/{}/{LAUNCHD_LABEL}", uid())],
                )
                .map(|_| "loaded".to_string()),
            };
            let logs = match platform {
                Platform::Systemd => "journalctl --user -u ultd".to_string(),
                Platform::Launchd => log.display().to_string(),
            };
            match state {
                Ok(s) => {
                    writeln!(out, "installed at {}: {s}; logs: {logs}", file.display())?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    writeln!(
                        out,
                        "installed at {} but not running: {e}; logs: {logs}",
                        file.display()
                    )?;
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}
