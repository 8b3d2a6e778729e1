//! `sdctl serve` as a process: settings from a config file (flags over it), its errors, the
//! ready line, an answer over a real socket, and a clean exit on SIGTERM. The routes themselves
//! are tested in sd-server/tests/api.rs and, with real clients, tests/server/.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{scratch, sdctl_command};

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// GET `path` over a plain socket; the status line and the body.
fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn serve_reads_its_config_file_answers_and_stops_cleanly_on_sigterm() {
    let dir = scratch("serve", "config");
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::os::unix::fs::symlink(fixtures().join("models/sd1"), models.join("sd1")).unwrap();
    let cfg = dir.join("serve.toml");
    // the config says port 1 (privileged: it would fail); the flag wins with port 0
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:1\"\nmodels_dir = \"{}\"\nlora_dir = \"{}\"\nqueue_size = 3\n",
            models.display(),
            fixtures().join("loras").display()
        ),
    )
    .unwrap();
    let mut child = sdctl_command()
        .env("SDCTL_CACHE_DIR", dir.join("cache"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let t0 = Instant::now();
    let addr = loop {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "serve ended before listening"
        );
        if let Some(a) = line
            .trim()
            .strip_prefix("sdctl serve: listening on http://")
        {
            break a.to_string();
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no ready line");
    };
    let (status, body) = get(&addr, "/sdapi/v1/sd-models");
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("\"sd1 ["), "{body}");
    let (status, body) = get(&addr, "/sdapi/v1/cmd-flags");
    assert!(status.contains("200"), "{status}");
    assert!(
        body.contains("\"queue_size\":3"),
        "the config file's queue size: {body}"
    );
    let (status, body) = get(&addr, "/");
    assert!(status.contains("200") && body.contains("<html"), "{status}");

    // SIGTERM: a clean exit, code 0
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "serve ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "{status:?}: {rest}");
    assert!(rest.contains("sdctl serve: stopped"), "{rest}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn serve_settings_errors_name_the_key_or_flag() {
    let dir = scratch("serve", "errors");
    std::fs::create_dir_all(&dir).unwrap();
    let bad_key = dir.join("bad.toml");
    std::fs::write(&bad_key, "models_dri = \"x\"\n").unwrap();
    let deep = dir.join("deep.json");
    std::fs::write(
        &deep,
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
    )
    .unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![], "--models-dir is required"),
        (
            vec!["--models-dir".into(), "/no/such/dir".into()],
            "--models-dir /no/such/dir: not a folder",
        ),
        (
            vec!["--config".into(), bad_key.display().to_string()],
            "models_dri",
        ),
        (
            vec!["--config".into(), deep.display().to_string()],
            "nested more than 64 levels deep",
        ),
        (
            vec![
                "--models-dir".into(),
                dir.display().to_string(),
                "--listen".into(),
                "nowhere".into(),
            ],
            "--listen \"nowhere\"",
        ),
        (
            vec![
                "--models-dir".into(),
                dir.display().to_string(),
                "--api-auth".into(),
                "nocolon".into(),
            ],
            "--api-auth: \"nocolon\" is not user:password",
        ),
        (
            vec![
                "--models-dir".into(),
                dir.display().to_string(),
                "--queue-size".into(),
                "0".into(),
            ],
            "--queue-size must be at least 1",
        ),
        (
            vec![
                "--models-dir".into(),
                dir.display().to_string(),
                "--max-steps".into(),
                "0".into(),
            ],
            "--max-steps 0: use 1..=10000",
        ),
        (
            vec![
                "--models-dir".into(),
                dir.display().to_string(),
                "--dtype".into(),
                "f8".into(),
            ],
            "f8",
        ),
    ];
    for (args, want) in cases {
        let out = sdctl_command().arg("serve").args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {want:?} not in {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
