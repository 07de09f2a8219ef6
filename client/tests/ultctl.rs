//! ultctl end to end: the real binary against a real ultd on a real socket — status, load, generate,
//! embed, unload, plan-load, reload; `--json` parses; exit codes 0, 1 and 2; a closed stdout exits 0.
#![allow(clippy::unwrap_used)] // tests and examples may unwrap

use std::process::{Command, Output, Stdio};

ult_tests::install_allocator!();

fn ultctl(addr: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ultctl"))
        .arg("--addr")
        .arg(addr)
        .args(args)
        .output()
        .expect("run ultctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ultctl_end_to_end() {
    let d = ult_tests::start("", "").await;
    let addr = d.addr.clone();
    // Each call blocks on a child process: run them off the runtime that serves ultd.
    let run = |args: Vec<&'static str>| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || ultctl(&addr, &args))
    };

    let status = run(vec!["status"]).await.unwrap();
    assert!(status.status.success());
    let table = stdout(&status);
    assert!(
        table.starts_with("ultd ") && table.contains("MODEL") && table.contains("smollm2"),
        "{table}"
    );

    let s = json(&run(vec!["status", "--json"]).await.unwrap());
    assert_eq!(s["models"].as_array().unwrap().len(), 3);
    assert_eq!(s["models"][2]["name"], "smollm2");
    assert_eq!(s["models"][2]["state"], "unloaded");
    assert!(s["daemon"]["ceiling_bytes"].as_u64().unwrap() > 0);

    let load = run(vec!["load", "smollm2", "--json"]).await.unwrap();
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    let l = json(&load);
    assert_eq!(
        (l["model"].as_str(), l["loaded_now"].as_bool()),
        (Some("smollm2"), Some(true))
    );
    assert!(l["measured_bytes"].as_u64().unwrap() > 50_000_000);

    let chat = run(vec![
        "generate",
        "smollm2",
        "What is the capital of France?",
        "--system",
        "You are a helpful assistant.",
    ])
    .await
    .unwrap();
    assert!(chat.status.success());
    assert!(stdout(&chat).contains("Paris"), "{}", stdout(&chat));
    let stats = String::from_utf8_lossy(&chat.stderr);
    assert!(
        stats.contains("decode") && stats.contains("tok/s"),
        "stats on stderr: {stats}"
    );

    let g = json(
        &run(vec![
            "generate",
            "gemma3",
            "The capital of France is",
            "--max-tokens",
            "5",
            "--json",
        ])
        .await
        .unwrap(),
    );
    assert_eq!(g["stats"]["completion_tokens"], 5);
    assert!(
        g["stats"]["load_ms"].as_u64().is_some(),
        "this request loaded gemma3"
    );

    let e = json(
        &run(vec!["embed", "minilm", "a cat", "a dog", "--json"])
            .await
            .unwrap(),
    );
    assert_eq!(e["embeddings"].as_array().unwrap().len(), 2);
    assert_eq!(e["embeddings"][0].as_array().unwrap().len(), 384);

    let top = run(vec!["top", "--count", "2", "--interval", "0.1"])
        .await
        .unwrap();
    assert!(top.status.success());
    let shown = stdout(&top);
    assert_eq!(shown.matches("MODEL").count(), 2, "two refreshes: {shown}");
    assert!(
        shown.contains("ledger [") && shown.contains("pool   ["),
        "{shown}"
    );
    let top_json = run(vec!["top", "--count", "2", "--interval", "0.1", "--json"])
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = stdout(&top_json)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[1]["daemon"]["used_bytes"].as_u64().unwrap() > 0);

    let plan = json(&run(vec!["plan-load", "minilm", "--json"]).await.unwrap());
    assert_eq!(plan["already_resident"], true);

    // Reload: the same file changes nothing; a new keep-alive updates in place; a bad edit exits 2 with
    // the file, line and key on stderr.
    let same = run(vec!["reload"]).await.unwrap();
    assert!(same.status.success());
    assert!(
        stdout(&same).contains("nothing changed (3 models)"),
        "{}",
        stdout(&same)
    );
    let toml = d.dir.path().join("models.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, format!("{text}keep_alive = \"9m\"\n")).unwrap();
    let r = json(&run(vec!["reload", "--json"]).await.unwrap());
    assert_eq!(r["updated"], serde_json::json!(["minilm"]), "{r}");
    assert_eq!(r["unchanged"], 2);
    std::fs::write(&toml, format!("{text}nope = 1\n")).unwrap();
    let bad = run(vec!["reload"]).await.unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr).into_owned();
    assert!(
        err.contains("models.toml:") && err.contains("models.minilm.nope"),
        "{err}"
    );
    std::fs::write(&toml, &text).unwrap();

    let unload = run(vec!["unload", "smollm2"]).await.unwrap();
    assert_eq!(unload.status.code(), Some(0), "{}", stdout(&unload));
    // Exit 1: a negative answer (it is no longer resident).
    let again = run(vec!["unload", "smollm2"]).await.unwrap();
    assert_eq!(again.status.code(), Some(1), "{}", stdout(&again));
    // Exit 2: an error, on stderr.
    let unknown = run(vec!["generate", "nope", "hi"]).await.unwrap();
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown model"));
    let unreachable = tokio::task::spawn_blocking(|| ultctl("127.0.0.1:1", &["status"]))
        .await
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(2));

    // A reader that goes away early (`| head -c 1`) is not an error.
    let addr2 = addr.clone();
    let piped = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ultctl"))
            .args([
                "--addr",
                &addr2,
                "generate",
                "gemma3",
                "Once upon a time",
                "--max-tokens",
                "200",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        child.wait().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(piped.code(), Some(0));
}

/// `ultctl service …` with HOME (and XDG_CONFIG_HOME) in a temporary directory.
fn service(home: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ultctl"))
        .arg("service")
        .args(args)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .output()
        .expect("run ultctl")
}

#[test]
fn the_service_files_are_valid_for_systemd_and_launchd() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let config = home.join("my models.toml");
    std::fs::write(&config, "").unwrap();
    let exe = env!("CARGO_BIN_EXE_ultctl");
    let args = ["--config", config.to_str().unwrap(), "--ultd", exe];
    // The systemd user unit passes `systemd-analyze verify` (which also checks that ExecStart's binary
    // exists and is executable).
    let unit = service(
        home,
        &[&["print", "--platform", "systemd"][..], &args].concat(),
    );
    assert!(unit.status.success(), "{unit:?}");
    let unit_file = home.join("ultd.service");
    std::fs::write(&unit_file, &unit.stdout).unwrap();
    if cfg!(target_os = "linux") {
        let runtime = home.join("run");
        std::fs::create_dir(&runtime).unwrap();
        let verify = Command::new("systemd-analyze")
            .args(["verify", "--user"])
            .arg(&unit_file)
            .env("XDG_RUNTIME_DIR", &runtime)
            .output()
            .expect("systemd-analyze is installed on Linux machines ult is tested on");
        assert!(
            verify.status.success() && verify.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&verify.stderr)
        );
    }
    // The launchd agent is a property list that Python's plistlib reads, with the program and arguments.
    let plist = service(
        home,
        &[&["print", "--platform", "launchd"][..], &args].concat(),
    );
    assert!(plist.status.success(), "{plist:?}");
    let mut python = Command::new("python3")
        .args([
            "-c",
            "import json, plistlib, sys; print(json.dumps(plistlib.loads(sys.stdin.buffer.read())))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    python
        .stdin
        .take()
        .unwrap()
        .write_all(&plist.stdout)
        .unwrap();
    let parsed: serde_json::Value =
        serde_json::from_slice(&python.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(parsed["Label"], "dev.ult.ultd");
    let real_config = std::fs::canonicalize(&config).unwrap();
    assert_eq!(
        parsed["ProgramArguments"],
        serde_json::json!([std::fs::canonicalize(exe).unwrap(), "--config", real_config])
    );
    assert_eq!(parsed["KeepAlive"]["SuccessfulExit"], false);
}

#[test]
fn service_install_writes_the_unit_and_uninstall_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let config = home.join("models.toml");
    std::fs::write(&config, "").unwrap();
    let exe = env!("CARGO_BIN_EXE_ultctl");
    let unit = ult_client::service::Platform::current().file(home, Some(&home.join(".config")));
    assert_eq!(
        service(home, &["status"]).status.code(),
        Some(1),
        "not installed"
    );
    let install = service(
        home,
        &[
            "install",
            "--config",
            config.to_str().unwrap(),
            "--ultd",
            exe,
        ],
    );
    assert!(unit.exists(), "{install:?}");
    match install.status.code() {
        // A user session manager ran it: status says so.
        Some(0) => assert!(service(home, &["status"]).status.success()),
        // None here (a container without a user bus): the failure is reported, not hidden.
        Some(2) => {
            let err = String::from_utf8_lossy(&install.stderr);
            assert!(err.contains("not running"), "{err}");
        }
        other => panic!("{other:?}: {install:?}"),
    }
    let uninstall = service(home, &["uninstall"]);
    assert!(uninstall.status.success(), "{uninstall:?}");
    assert!(!unit.exists());
    assert_eq!(service(home, &["uninstall"]).status.code(), Some(1));
}
