//! The playground page in a real browser: headless Chromium driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`, installed here with apt-get when missing) loads `/`,
//! types a prompt, clicks Generate, and watches the streamed text arrive.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{http, server};
use serde_json::{json, Value};

fn ensure_installed() {
    if Path::new("/usr/bin/chromium").exists() && Path::new("/usr/bin/chromedriver").exists() {
        return;
    }
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let pkgs = ["install", "-y", "-q", "chromium", "chromium-driver"];
    if !apt(&pkgs) {
        assert!(
            apt(&["update", "-q"]),
            "apt-get update failed (this test needs Debian's chromium)"
        );
        assert!(
            apt(&pkgs),
            "apt-get install chromium chromium-driver failed"
        );
    }
}

struct Driver {
    child: Child,
    addr: SocketAddr,
    session: String,
}

impl Driver {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let t0 = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium", "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]}}}});
        let mut d = Self {
            child,
            addr,
            session: String::new(),
        };
        let v = d.call("POST", "/session", caps);
        d.session = v["value"]["sessionId"]
            .as_str()
            .expect("a WebDriver session")
            .to_string();
        d
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let (status, _, text) = http(self.addr, method, path, &[], &body);
        assert_eq!(status, 200, "WebDriver {method} {path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    fn session(&self, method: &str, path: &str, body: Value) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn element(&self, css: &str) -> String {
        let v = self.session(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        v["value"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(
                self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                &[],
                "",
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn playground_streams_text_in_headless_chromium() {
    ensure_installed();
    let addr = server();
    let d = Driver::start();
    d.session("POST", "/url", json!({"url": format!("http://{addr}/")}));
    let prompt = d.element("#prompt");
    d.session("POST", &format!("/element/{prompt}/clear"), json!({}));
    d.session(
        "POST",
        &format!("/element/{prompt}/value"),
        json!({"text": "Once upon a time"}),
    );
    let max = d.element("#max_tokens");
    d.session("POST", &format!("/element/{max}/clear"), json!({}));
    d.session(
        "POST",
        &format!("/element/{max}/value"),
        json!({"text": "400"}),
    );
    let go = d.element("#go");
    d.session("POST", &format!("/element/{go}/click"), json!({}));
    let script = json!({"script": "return [document.body.dataset.done || '', document.getElementById('generated') ? document.getElementById('generated').textContent : '', document.getElementById('stats').textContent];", "args": []});
    let (mut partial, t0) = (Vec::new(), Instant::now());
    let last = loop {
        let v = d.session("POST", "/execute/sync", script.clone())["value"].clone();
        let (done, text) = (
            v[0].as_str().unwrap() == "1",
            v[1].as_str().unwrap().to_string(),
        );
        if done {
            break v;
        }
        if !text.is_empty() {
            partial.push(text.len());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "generation never finished: {v}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let text = last[1].as_str().unwrap();
    let stats = last[2].as_str().unwrap();
    assert!(
        text.split_whitespace().count() >= 20,
        "too little text: {text:?} ({stats})"
    );
    // One piece per token, except a token that ends inside a UTF-8 character, whose bytes come
    // with the next piece (the sampling seed is random: 399 pieces were seen).
    let pieces: usize = stats
        .split(" pieces")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no piece count: {stats}"));
    assert!(
        (350..=400).contains(&pieces)
            && stats.contains("tokens/s")
            && stats.contains("finish: length"),
        "{stats}"
    );
    // Streamed: the page showed a partial text before the end.
    assert!(
        partial.iter().any(|&n| n > 0 && n < text.len()),
        "no partial text seen: {partial:?}"
    );
}
