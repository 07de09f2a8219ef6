//! The ultd binary: an invalid models.toml is reported with file, line and key and exits 64 before any
//! socket is bound; `--check` validates; the startup line carries the bound address.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn ultd(dir: &std::path::Path, toml: &str, args: &[&str]) -> std::process::Output {
    let path = dir.join("models.toml");
    std::fs::write(&path, toml).unwrap();
    Command::new(env!("CARGO_BIN_EXE_ultd"))
        .arg("--config")
        .arg(&path)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn invalid_configuration_exits_64_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let toml = "[daemon]\nlisten = \"127.0.0.1:0\"\n\n[models.a]\npath = \"x.gguf\"\nkind = \"chat\"\ncontext = \"big\"\n";
    let out = ultd(dir.path(), toml, &[]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "{}:7: models.a.context: invalid type",
        dir.path().join("models.toml").display()
    );
    assert!(err.contains(&expected), "{err}");
    assert!(out.stdout.is_empty(), "nothing was bound or printed");
    let missing = Command::new(env!("CARGO_BIN_EXE_ultd"))
        .args(["--config", "/nonexistent/models.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(64));
}

#[test]
fn check_validates_without_serving() {
    let dir = tempfile::tempdir().unwrap();
    let out = ultd(
        dir.path(),
        "[models.a]\npath = \"x.gguf\"\nkind = \"completion\"\n",
        &["--check"],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 models, 0 routes)"));
}

/// Starts ultd on `config` (TCP on an ephemeral port, the Unix socket at `socket` or "off", no state file,
/// every log line at info on `stderr`) and reads its startup line.
fn serve(config: &std::path::Path, socket: &str, stderr: Stdio) -> std::process::Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ultd"))
        .arg("--config")
        .arg(config)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--socket",
            socket,
            "--state-file",
            "off",
        ])
        .env("ULT_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ultd listening on 127.0.0.1:"), "{line}");
    child
}

#[test]
fn starts_prints_its_address_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    // A model whose file is missing: ultd still starts and reports it as failed.
    std::fs::write(
        dir.path().join("models.toml"),
        "[models.a]\npath = \"missing.gguf\"\nkind = \"chat\"\n",
    )
    .unwrap();
    let socket = dir.path().join("ultd.sock").display().to_string();
    let mut child = serve(&dir.path().join("models.toml"), &socket, Stdio::null());
    let socket = dir.path().join("ultd.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the socket is private to its owner");
    // SAFETY: sending SIGTERM to a child we spawned.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "the socket is removed on exit");
}

/// SIGHUP reloads models.toml: a model added to the file appears (the log says so), a bad edit is refused
/// with its file, line and key, and the daemon keeps running until SIGTERM.
#[test]
fn sighup_reloads_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("models.toml");
    std::fs::write(&toml, "[models.a]\npath = \"a.gguf\"\nkind = \"chat\"\n").unwrap();
    let mut child = serve(&toml, "off", Stdio::piped());
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    // Reads the log until a line containing `what`, returning it.
    let mut until = |what: &str| -> String {
        for l in log.by_ref() {
            let l = l.unwrap();
            if l.contains(what) {
                return l;
            }
        }
        panic!("the log ended before {what:?}");
    };
    let hup = |pid: u32| {
        // SAFETY: sending SIGHUP to a child we spawned.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        assert_eq!(rc, 0);
    };
    std::fs::write(
        &toml,
        "[models.a]\npath = \"a.gguf\"\nkind = \"chat\"\n\n[models.b]\npath = \"b.gguf\"\nkind = \"completion\"\n",
    )
    .unwrap();
    hup(child.id());
    let reloaded = until("configuration reloaded");
    assert!(reloaded.contains("added=[\"b\"]"), "{reloaded}");
    std::fs::write(
        &toml,
        "[models.a]\npath = \"a.gguf\"\nkind = \"chat\"\nnope = 1\n",
    )
    .unwrap();
    hup(child.id());
    let refused = until("reload refused");
    assert!(
        refused.contains(&format!("{}:4", toml.display())) && refused.contains("models.a.nope"),
        "{refused}"
    );
    // SAFETY: sending SIGTERM to a child we spawned.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    assert!(child.wait().unwrap().success());
}
