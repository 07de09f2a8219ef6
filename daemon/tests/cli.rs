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

#[test]
fn starts_prints_its_address_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    // A model whose file is missing: ultd still starts and reports it as failed.
    std::fs::write(
        dir.path().join("models.toml"),
        "[models.a]\npath = \"missing.gguf\"\nkind = \"chat\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ultd"))
        .args([
            "--config",
            &dir.path().join("models.toml").display().to_string(),
        ])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--socket",
            &dir.path().join("ultd.sock").display().to_string(),
            "--state-file",
            "off",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ultd listening on 127.0.0.1:"), "{line}");
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
