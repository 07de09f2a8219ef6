//! The bad-input catalogue: every row is one kind of bad input, answered with a typed error and no effect
//! on other clients. Three tables: model files (one daemon configured with all of them beside a healthy
//! model), models.toml errors (file, line and key), and requests (sent while another client streams).
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::Path;

use futures::StreamExt;
use ult_client::{Client, ClientError, GenerateEvent, GenerateRequest, ModelState, Sampling};
use ult_tests::{daemon_table, model_tables, models_dir, start_in};
use ultd::config::Config;

ult_tests::install_allocator!();

fn smollm2_bytes() -> Vec<u8> {
    std::fs::read(models_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap()
}

/// Writes a broken copy of a model and returns its path.
fn broken(dir: &Path, name: &str, make: impl FnOnce(&Path)) -> String {
    let path = dir.join(name);
    make(&path);
    path.display().to_string()
}

fn patched(path: &Path, patch: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = smollm2_bytes();
    patch(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

fn find(bytes: &[u8], needle: &[u8]) -> usize {
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
}

fn copy_minilm(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(models_dir().join("minilm").join(f), to.join(f)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_model_files_fail_alone_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // (model name, kind, path, expected reason)
    let rows: Vec<(&str, &str, String, &str)> = vec![
        (
            "truncated",
            "chat",
            broken(d, "truncated.gguf", |p| {
                let b = smollm2_bytes();
                std::fs::write(p, &b[..b.len() / 3]).unwrap();
            }),
            "truncated",
        ),
        (
            "bad_magic",
            "chat",
            broken(d, "magic.gguf", |p| {
                patched(p, |b| b[..4].copy_from_slice(b"GGXX"))
            }),
            "corrupt model file",
        ),
        (
            "bad_version",
            "chat",
            broken(d, "version.gguf", |p| {
                patched(p, |b| b[4..8].copy_from_slice(&99u32.to_le_bytes()))
            }),
            "corrupt model file",
        ),
        (
            "absurd_tensor_count",
            "chat",
            broken(d, "count.gguf", |p| {
                patched(p, |b| b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes()))
            }),
            "exceeds",
        ),
        (
            "offset_past_end",
            "chat",
            broken(d, "offset.gguf", |p| {
                patched(p, |b| {
                    // token_embd.weight's info: name, n_dims (u32), two dims (u64), dtype (u32), then its offset.
                    let at = find(b, b"token_embd.weight") + "token_embd.weight".len() + 4 + 16 + 4;
                    b[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                })
            }),
            "ends at byte",
        ),
        (
            "unsupported_arch",
            "chat",
            broken(d, "arch.gguf", |p| {
                patched(p, |b| {
                    let at =
                        find(b, b"general.architecture") + "general.architecture".len() + 4 + 8;
                    b[at..at + 5].copy_from_slice(b"mamba");
                })
            }),
            "unsupported architecture \"mamba\"",
        ),
        (
            "empty_file",
            "completion",
            broken(d, "empty.gguf", |p| std::fs::write(p, b"").unwrap()),
            "corrupt model file",
        ),
        (
            "missing_file",
            "completion",
            d.join("nowhere.gguf").display().to_string(),
            "cannot read",
        ),
        (
            "lying_safetensors",
            "embedding",
            broken(d, "lying", |p| {
                copy_minilm(p);
                let st = p.join("model.safetensors");
                let mut b = std::fs::read(&st).unwrap();
                // The header claims more bytes for a tensor than its shape holds.
                let at = find(&b, b"\"data_offsets\":[0,");
                b[at + 18] = b'9';
                std::fs::write(st, b).unwrap();
            }),
            "do not hold",
        ),
        (
            "missing_tokenizer",
            "embedding",
            broken(d, "notok", |p| {
                copy_minilm(p);
                std::fs::remove_file(p.join("tokenizer.json")).unwrap();
            }),
            "tokenizer.json",
        ),
        (
            "not_bert",
            "embedding",
            broken(d, "notbert", |p| {
                copy_minilm(p);
                let c = p.join("config.json");
                let text = std::fs::read_to_string(&c)
                    .unwrap()
                    .replace("\"model_type\": \"bert\"", "\"model_type\": \"t5\"");
                std::fs::write(c, text).unwrap();
            }),
            "unsupported architecture \"t5\"",
        ),
    ];
    let mut more = String::new();
    for (name, kind, path, _) in &rows {
        more.push_str(&format!(
            "\n[models.{name}]\npath = \"{path}\"\nkind = \"{kind}\"\n"
        ));
    }
    let text = format!("{}{}{more}", daemon_table(d, ""), model_tables());
    let daemon = start_in(dir, &text).await;
    let mut c = daemon.client().await;
    let status = c.status().await.unwrap();
    for (name, kind, _, reason) in &rows {
        let m = status.model(name).unwrap();
        assert_eq!(m.state, ModelState::Failed, "{name}");
        let failure = m.failure.as_deref().unwrap();
        assert!(
            failure.contains(reason),
            "{name}: {failure:?} lacks {reason:?}"
        );
        // Requests for it are typed and name the reason.
        let e = match *kind {
            "embedding" => c.embed(name, vec!["x".into()]).await.unwrap_err(),
            _ => c
                .generate_text(GenerateRequest {
                    model: name.to_string(),
                    prompt: "x".into(),
                    max_tokens: Some(1),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        };
        assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{name}: {e}");
        assert!(e.to_string().contains(reason), "{name}: {e}");
    }
    // The healthy models serve.
    let (text, _) = c
        .generate_text(ult_tests::paris_request("smollm2"))
        .await
        .unwrap();
    assert!(text.contains("Paris"));
    assert_eq!(
        c.embed("minilm", vec!["ok".into()])
            .await
            .unwrap()
            .embeddings
            .len(),
        1
    );
}

#[test]
fn configuration_errors_name_file_line_and_key() {
    let base =
        "[daemon]\nlisten = \"127.0.0.1:0\"\n\n[models.a]\npath = \"a.gguf\"\nkind = \"chat\"\n";
    // (change to the base file, line, key, message fragment)
    let rows: Vec<(String, usize, &str, &str)> = vec![
        (
            base.replace("kind = \"chat\"", "kind = \"chat\"\ncolour = \"blue\""),
            7,
            "models.a.colour",
            "unknown field `colour`",
        ),
        (
            base.replace("kind = \"chat\"", "kind = \"chat\"\ncontext = \"long\""),
            7,
            "models.a.context",
            "invalid type",
        ),
        (
            base.replace("kind = \"chat\"", "kind = \"poem\""),
            6,
            "models.a.kind",
            "unknown variant",
        ),
        (
            format!("{base}\n[models.a]\npath = \"b.gguf\"\nkind = \"chat\"\n"),
            8,
            "models.a",
            "duplicate",
        ),
        (
            format!("{base}\n[routes.r]\nmodels = [\"ghost\"]\n"),
            9,
            "routes.r.models",
            "unknown model \"ghost\"",
        ),
        (
            format!("{base}\n[routes.r]\nmodels = [\"a\"]\nstrategy = \"random\"\n"),
            10,
            "routes.r.strategy",
            "unknown strategy",
        ),
        (
            format!("{base}\n[routes.r]\nmodels = []\n"),
            9,
            "routes.r.models",
            "has no models",
        ),
        (
            format!("{base}\n[routes.r]\nmodels = [\"a\", \"a\"]\n"),
            9,
            "routes.r.models",
            "more than once",
        ),
        (
            base.replace("listen", "memory_ceiling = \"0\"\nlisten"),
            2,
            "daemon.memory_ceiling",
            "greater than 0",
        ),
        (
            base.replace("listen", "memory_ceiling = \"lots\"\nlisten"),
            2,
            "daemon.memory_ceiling",
            "cannot parse",
        ),
        (
            base.replace("listen", "memory_ceiling = \"120%\"\nlisten"),
            2,
            "daemon.memory_ceiling",
            "not a percentage",
        ),
        (
            base.replace("listen", "headroom = \"2 GB of RAM\"\nlisten"),
            2,
            "daemon.headroom",
            "cannot parse",
        ),
        (
            base.replace("listen", "keep_alive = \"forever-ish\"\nlisten"),
            2,
            "daemon.keep_alive",
            "cannot parse",
        ),
        (
            base.replace("\"127.0.0.1:0\"", "\"localhost:http\""),
            2,
            "daemon.listen",
            "not an address",
        ),
        (
            base.replace("listen", "max_resident = 0\nlisten"),
            2,
            "daemon.max_resident",
            "at least 1",
        ),
        (
            base.replace("listen", "auth_token = \"short\"\nlisten"),
            2,
            "daemon.auth_token",
            "at least 16",
        ),
        (
            base.replace("listen", "max_request_bytes = \"10\"\nlisten"),
            2,
            "daemon.max_request_bytes",
            "between",
        ),
        (
            base.replace("kind = \"chat\"", "kind = \"chat\"\npriority = -2.0"),
            7,
            "models.a.priority",
            "greater than 0",
        ),
        (
            base.replace("kind = \"chat\"", "kind = \"chat\"\naliases = [\"a\"]"),
            7,
            "models.a.aliases",
            "used more than once",
        ),
        (
            base.replace("listen", "model_roots = [\"/srv/models\"]\nlisten"),
            6,
            "models.a.path",
            "outside the model roots",
        ),
        (
            "[daemon]\nlisten = \"127.0.0.1:0\"\n".to_string(),
            1,
            "models",
            "no models",
        ),
        ("this is = not [toml".to_string(), 1, "this is", "expected"),
    ];
    for (text, line, key, fragment) in rows {
        let e = Config::parse(Path::new("/etc/ult/models.toml"), &text).expect_err(&text);
        assert_eq!((e.line, e.key.as_str()), (line, key), "{e}\n{text}");
        assert!(e.message.contains(fragment), "{e} lacks {fragment:?}");
        assert!(e.to_string().starts_with("/etc/ult/models.toml:"), "{e}");
    }
}

/// A Generate call whose prompt is whatever bytes are given (the generated client only sends strings).
async fn raw_generate(addr: &str, prompt: &[u8]) -> tonic::Status {
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawGenerate {
        #[prost(string, tag = "1")]
        model: String,
        #[prost(bytes = "vec", tag = "2")]
        prompt: Vec<u8>,
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let request = tonic::Request::new(RawGenerate {
        model: "smollm2".into(),
        prompt: prompt.to_vec(),
    });
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/ult.v1.Ult/Generate");
    let codec =
        ult_proto::codec::UltCodec::<RawGenerate, ult_proto::v1::GenerateResponse>::default();
    match grpc.server_streaming(request, path, codec).await {
        Err(status) => status,
        Ok(mut stream) => stream.get_mut().message().await.unwrap_err(),
    }
}

fn req(model: &str, prompt: &str) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        prompt: prompt.into(),
        max_tokens: Some(2),
        ..Default::default()
    }
}

fn sampling(f: impl FnOnce(&mut Sampling)) -> GenerateRequest {
    let mut r = req("smollm2", "Hello");
    f(&mut r.sampling);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_typed_errors_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}{}",
        daemon_table(dir.path(), "max_request_bytes = \"256KiB\"\n"),
        model_tables()
    );
    let d = start_in(dir, &text).await;
    let mut c = d.client().await;
    c.load("smollm2", |_, _| {}).await.unwrap();
    // Another client streams throughout.
    let mut other = d.client().await;
    let bystander = tokio::spawn(async move {
        let mut s = other
            .generate(GenerateRequest {
                model: "gemma3".into(),
                prompt: "Once upon a time".into(),
                max_tokens: Some(120),
                ignore_eos: true,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut n = 0;
        while let Some(e) = s.next().await {
            match e.unwrap() {
                GenerateEvent::Delta(_) => n += 1,
                GenerateEvent::Done(stats) => return (n, stats.completion_tokens),
            }
        }
        panic!("no final message")
    });
    let messages = |role: &str| GenerateRequest {
        model: "smollm2".into(),
        messages: vec![(role.into(), "hi".into())],
        max_tokens: Some(2),
        ..Default::default()
    };
    type Row = (&'static str, GenerateRequest, tonic::Code, &'static str);
    let generate_rows: Vec<Row> = vec![
        (
            "unknown model",
            req("gpt-9", "x"),
            tonic::Code::NotFound,
            "known models",
        ),
        (
            "a file path as the model",
            req("/etc/passwd", "x"),
            tonic::Code::PermissionDenied,
            "looks like a file path",
        ),
        (
            "empty prompt",
            req("smollm2", ""),
            tonic::Code::InvalidArgument,
            "empty",
        ),
        (
            "prompt over the context",
            req("smollm2", &"word ".repeat(3000)),
            tonic::Code::InvalidArgument,
            "holds 2048",
        ),
        (
            "max_tokens 0",
            GenerateRequest {
                max_tokens: Some(0),
                ..req("smollm2", "x")
            },
            tonic::Code::InvalidArgument,
            "max_tokens",
        ),
        (
            "max_tokens huge",
            GenerateRequest {
                max_tokens: Some(u32::MAX),
                ..req("smollm2", "x")
            },
            tonic::Code::InvalidArgument,
            "exceeds",
        ),
        (
            "temperature negative",
            sampling(|s| s.temperature = Some(-0.5)),
            tonic::Code::InvalidArgument,
            "temperature",
        ),
        (
            "temperature NaN",
            sampling(|s| s.temperature = Some(f32::NAN)),
            tonic::Code::InvalidArgument,
            "temperature",
        ),
        (
            "top_p zero",
            sampling(|s| s.top_p = Some(0.0)),
            tonic::Code::InvalidArgument,
            "top_p",
        ),
        (
            "top_p above one",
            sampling(|s| s.top_p = Some(1.5)),
            tonic::Code::InvalidArgument,
            "top_p",
        ),
        (
            "repetition penalty zero",
            sampling(|s| s.repetition_penalty = Some(0.0)),
            tonic::Code::InvalidArgument,
            "repetition_penalty",
        ),
        (
            "empty stop sequence",
            GenerateRequest {
                stop: vec![String::new()],
                ..req("smollm2", "x")
            },
            tonic::Code::InvalidArgument,
            "stop",
        ),
        (
            "too many stop sequences",
            GenerateRequest {
                stop: (0..17).map(|i| i.to_string()).collect(),
                ..req("smollm2", "x")
            },
            tonic::Code::InvalidArgument,
            "at most 16",
        ),
        (
            "stop sequence too long",
            GenerateRequest {
                stop: vec!["y".repeat(300)],
                ..req("smollm2", "x")
            },
            tonic::Code::InvalidArgument,
            "1 to 256 bytes",
        ),
        (
            "generation from an embedding model",
            req("minilm", "x"),
            tonic::Code::FailedPrecondition,
            "embedding model",
        ),
        (
            "chat to a completion-only model",
            GenerateRequest {
                model: "gemma3".into(),
                ..messages("user")
            },
            tonic::Code::FailedPrecondition,
            "no chat template",
        ),
        (
            "unknown chat role",
            messages("wizard"),
            tonic::Code::InvalidArgument,
            "unknown role",
        ),
        (
            "huge request body",
            req("smollm2", &"z".repeat(400_000)),
            tonic::Code::OutOfRange,
            "",
        ),
    ];
    let mut rows = 0;
    for (what, request, code, fragment) in generate_rows {
        let e = c.generate_text(request).await.unwrap_err();
        assert_eq!(e.code(), Some(code), "{what}: {e}");
        assert!(
            e.to_string().contains(fragment),
            "{what}: {e} lacks {fragment:?}"
        );
        rows += 1;
    }
    let embed_rows: Vec<(&str, &str, Vec<String>, tonic::Code, &str)> = vec![
        (
            "embedding from a chat model",
            "smollm2",
            vec!["x".into()],
            tonic::Code::FailedPrecondition,
            "chat model",
        ),
        (
            "no inputs",
            "minilm",
            vec![],
            tonic::Code::InvalidArgument,
            "no inputs",
        ),
        (
            "an empty input",
            "minilm",
            vec![String::new()],
            tonic::Code::InvalidArgument,
            "empty",
        ),
        (
            "too many inputs",
            "minilm",
            vec!["x".into(); 257],
            tonic::Code::InvalidArgument,
            "at most 256",
        ),
        (
            "an input over the context",
            "minilm",
            vec!["word ".repeat(400)],
            tonic::Code::InvalidArgument,
            "holds 256",
        ),
    ];
    for (what, model, inputs, code, fragment) in embed_rows {
        let e = c.embed(model, inputs).await.unwrap_err();
        assert_eq!(e.code(), Some(code), "{what}: {e}");
        assert!(
            e.to_string().contains(fragment),
            "{what}: {e} lacks {fragment:?}"
        );
        rows += 1;
    }
    let admin: Vec<(&str, Result<(), ClientError>, tonic::Code)> = vec![
        (
            "unload an unknown model",
            c.unload("ghost").await.map(drop),
            tonic::Code::NotFound,
        ),
        (
            "pin an unknown model",
            c.pin("ghost").await.map(drop),
            tonic::Code::NotFound,
        ),
        (
            "lease an unknown model",
            c.lease("ghost", None).await.map(drop),
            tonic::Code::NotFound,
        ),
        (
            "lease for u64::MAX milliseconds",
            c.lease("smollm2", Some(std::time::Duration::from_millis(u64::MAX)))
                .await
                .map(drop),
            tonic::Code::InvalidArgument,
        ),
        (
            "load a path",
            c.load("../models/x.gguf", |_, _| {}).await.map(drop),
            tonic::Code::PermissionDenied,
        ),
    ];
    for (what, result, code) in admin {
        assert_eq!(result.unwrap_err().code(), Some(code), "{what}");
        rows += 1;
    }
    assert!(
        !c.release(987_654).await.unwrap(),
        "releasing an unknown lease is a negative answer"
    );
    rows += 1;
    // A prompt that is not UTF-8 (sent as raw protobuf bytes): the client's INVALID_ARGUMENT.
    let e = raw_generate(&d.addr, b"caf\xe9 au lait").await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("UTF-8"), "{e:?}");
    rows += 1;
    // Bodies of the wrong JSON shape: 400 in JSON's words, no Rust type names.
    for body in [
        r#"{"model": "smollm2", "prompt": "x", "max_tokens": "ten"}"#,
        r#"{"model": "smollm2", "prompt": "x", "temperature": [1]}"#,
        r#"{"model": "smollm2", "prompt": 7}"#,
    ] {
        let (status, text) = ult_tests::http_post(&d.http, "/v1/completions", body).await;
        assert_eq!(status, 400, "{body}: {text}");
        for rust in ["u32", "f32", "f64", "usize", "Option<", "struct "] {
            assert!(!text.contains(rust), "{body}: {text}");
        }
        rows += 1;
    }
    assert!(rows >= 25, "{rows} request rows");
    // Nothing disturbed the bystander, and the daemon still answers.
    let (deltas, tokens) = bystander.await.unwrap();
    assert_eq!(tokens, 120);
    assert!(deltas > 0);
    let (text, _) = c
        .generate_text(ult_tests::paris_request("smollm2"))
        .await
        .unwrap();
    assert!(text.contains("Paris"));
    let s = c.status().await.unwrap();
    assert!(
        s.models.iter().all(|m| m.failed == 0),
        "no request failed inside the engine"
    );
    let _ = Client::connect(&d.addr).await.unwrap();
}
