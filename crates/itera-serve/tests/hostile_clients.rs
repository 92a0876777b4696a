//! Clients that try to hold the server's resources: a key is needed everywhere but /health and
//! the playground; a request head or body trickled too slowly, or a keep-alive connection left
//! idle, is closed; connections beyond the limit are closed at once.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{http, shipped_model, start};
use itera_serve::connections::Limits;
use itera_serve::ServeConfig;

fn strict_server(max_connections: usize) -> SocketAddr {
    start(ServeConfig {
        model: shipped_model(),
        api_key: Some("sekrit".into()),
        limits: Limits {
            header_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            max_connections,
        },
        ..ServeConfig::default()
    })
}

/// Seconds until the server closes `s` (reads return 0 or fail), at most `limit`.
fn closed_after(s: &mut TcpStream, limit: Duration) -> Option<f64> {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed().as_secs_f64()),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(t0.elapsed().as_secs_f64()),
        }
    }
    None
}

#[test]
fn every_route_but_health_and_the_playground_needs_the_key() {
    let addr = strict_server(64);
    let key = [("Authorization", "Bearer sekrit")];
    let wrong = [("Authorization", "Bearer sekrix")];
    for (method, path, body) in [
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "Hi", "max_tokens": 1}"#,
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}"#,
        ),
        ("GET", "/v1/models", ""),
        ("POST", "/tokenize", r#"{"content": "Hi"}"#),
        ("POST", "/detokenize", r#"{"tokens": [1, 2]}"#),
        ("GET", "/metrics", ""),
    ] {
        assert_eq!(
            http(addr, method, path, &[], body).0,
            401,
            "{path} without a key"
        );
        assert_eq!(
            http(addr, method, path, &wrong, body).0,
            401,
            "{path} with a wrong key"
        );
        assert_eq!(
            http(addr, method, path, &key, body).0,
            200,
            "{path} with the key"
        );
    }
    assert_eq!(http(addr, "GET", "/health", &[], "").0, 200);
    assert_eq!(http(addr, "GET", "/", &[], "").0, 200);
}

#[test]
fn slow_heads_slow_bodies_and_idle_connections_are_closed() {
    let addr = strict_server(64);
    // Slowloris: a request head that never ends.
    let mut loris: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect();
    for s in &mut loris {
        let t = closed_after(s, Duration::from_secs(5)).expect("a trickled head is cut off");
        assert!(t < 3.0, "closed after {t} s");
    }
    // A body that never arrives: 408.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekrit\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"content\"").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = [0u8; 64];
    let n = s.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    // An idle keep-alive connection after a complete request.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let t = closed_after(&mut s, Duration::from_secs(5)).expect("an idle connection is closed");
    assert!(t < 3.0, "idle connection closed after {t} s");
}

#[test]
fn connections_beyond_the_limit_are_closed_at_once() {
    let addr = strict_server(4);
    // Wait until the readiness polls' connections are gone.
    std::thread::sleep(Duration::from_millis(300));
    let mut held: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(addr).unwrap();
    let t = closed_after(&mut extra, Duration::from_secs(2)).expect("the fifth is closed");
    assert!(t < 0.5, "closed after {t} s");
    // The held ones still work.
    held[0]
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut r = String::new();
    held[0].read_to_string(&mut r).unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    held.clear();
    // Room again once they are closed.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(http(addr, "GET", "/health", &[], "").0, 200);
}
