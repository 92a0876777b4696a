//! Shared by the server tests: start a server in-process, and a minimal HTTP/1.1 client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use itera_serve::ServeConfig;

pub fn shipped_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/itera-lite-tiny")
}

/// How many tokens the shipped model's tokenizer makes of `text` (what `usage` must report).
pub fn shipped_token_count(text: &str) -> usize {
    let path = shipped_model().join("tokenizer.json");
    let tokenizer = itera_core::Tokenizer::from_file(&path).unwrap();
    tokenizer.encode(text).unwrap().len()
}

/// Starts a server on 127.0.0.1:0 and waits until /health says ready.
pub fn start(cfg: ServeConfig) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(itera_serve::serve(
            "127.0.0.1:0".parse().unwrap(),
            cfg,
            |a| tx.send(a).unwrap(),
        ))
        .unwrap();
    });
    let addr = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let t0 = Instant::now();
    while http(addr, "GET", "/health", &[], "").0 != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "server never became ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    addr
}

pub fn server() -> SocketAddr {
    start(ServeConfig {
        model: shipped_model(),
        ..ServeConfig::default()
    })
}

/// One HTTP/1.1 request with `Connection: close`: (status, raw headers, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    // Read the head, then exactly the body (some servers keep the connection open anyway).
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before the response head");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap());
    let chunked = lower.contains("transfer-encoding: chunked");
    loop {
        let got = raw.len() - head_end;
        let complete = match length {
            Some(n) => got >= n,
            None if chunked => raw[head_end..].ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if complete {
            break;
        }
        let n = s.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&raw[head_end..]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if chunked { dechunk(&text) } else { text };
    (status, head, body)
}

pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n..];
        s = s.strip_prefix("\r\n").unwrap_or(s);
    }
    out
}
