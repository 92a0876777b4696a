//! Shared by the CLI's end-to-end tests: running the binary, a server on a free port, and a
//! micro model trained once per test binary from the committed fixture.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn itera(args: &[&str]) -> Output {
    itera_with(&[], args)
}

/// The binary with these environment variables set.
pub fn itera_with(env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_itera"))
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("binary runs")
}

pub fn ok(args: &[&str]) -> String {
    ok_with(&[], args)
}

/// `ok` with these environment variables set.
pub fn ok_with(env: &[(&str, &str)], args: &[&str]) -> String {
    let out = itera_with(env, args);
    assert!(
        out.status.success(),
        "itera {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its error message.
pub fn fails(args: &[&str]) -> String {
    let out = itera(args);
    assert!(!out.status.success(), "itera {args:?} should have failed");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "itera {args:?} panicked: {err}");
    err
}

pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/english.txt")
}

pub fn tmp() -> PathBuf {
    let d = std::env::temp_dir().join(format!("itera-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A micro model trained for a few steps, shared by the tests of this file.
pub fn model() -> &'static PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = tmp();
        let tok = dir.join("tok.json");
        let run = dir.join("run");
        let _ = std::fs::remove_dir_all(&run);
        let f = fixture();
        ok(&[
            "tokenizer",
            "train",
            "--data",
            f.to_str().unwrap(),
            "--vocab",
            "400",
            "--out",
            tok.to_str().unwrap(),
        ]);
        let out = ok(&[
            "train",
            "--preset",
            "micro",
            "--data",
            f.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--steps",
            "12",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--warmup",
            "2",
            "--eval-every",
            "6",
            "--eval-windows",
            "8",
            "--holdout",
            "0.1",
            "--run",
            run.to_str().unwrap(),
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["step"], 12);
        // FLOPs per token: 6 x the multiply-adds of the weight matmuls (micro, vocab 400).
        let speed = &v["speed"];
        assert!(speed["flops_per_token"].as_f64().unwrap() > 6.0 * 400.0 * 32.0);
        assert!(speed["fraction_of_peak"].as_f64().unwrap() > 0.0);
        assert!(speed["cpu_utilisation"].as_f64().unwrap() > 0.0);
        assert!(run.join("metrics.jsonl").is_file() && run.join("loss.png").is_file());
        run.join("checkpoint")
    })
}

/// `itera serve` on a free port, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Server {
    /// Starts `itera serve --port 0 ARGS...` and waits until /health answers.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_itera"))
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The bound address from the log line `listening on http://ADDR`.
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let addr = loop {
            let mut line = String::new();
            assert!(
                std::io::BufRead::read_line(&mut err, &mut line).unwrap() > 0,
                "server exited"
            );
            if let Some(a) = line.split("http://").nth(1) {
                break a.trim().to_string();
            }
        };
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        let server = Self { child, addr };
        let t0 = Instant::now();
        while server.request("GET", "/health", "").0 != 200 {
            assert!(t0.elapsed() < Duration::from_secs(30), "server never ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// One request on a fresh connection: (status, whole response text).
    pub fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(body.as_bytes()).unwrap();
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        let status = r
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, r)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
