//! The server end to end: started in-process on an ephemeral loopback port with the shipped
//! model, driven over real TCP with a minimal HTTP/1.1 client.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{http, server, shipped_model, shipped_token_count, start};
use itera_serve::ServeConfig;
use serde_json::{json, Value};

fn complete(addr: SocketAddr, body: Value) -> (u16, Value) {
    let (status, _, text) = http(addr, "POST", "/v1/completions", &[], &body.to_string());
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// SSE `data:` payloads of a streamed completion.
fn stream(addr: SocketAddr, mut body: Value) -> Vec<String> {
    body["stream"] = json!(true);
    let (status, head, text) = http(addr, "POST", "/v1/completions", &[], &body.to_string());
    assert_eq!(status, 200, "{text}");
    assert!(head.to_ascii_lowercase().contains("text/event-stream"));
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, _, text) = http(addr, "GET", "/metrics", &[], "");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("itera_{name} ")))
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
        .parse()
        .unwrap()
}

#[test]
fn plain_and_streaming_completions_agree() {
    let addr = server();
    let req = json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "seed": 3});
    let (status, v) = complete(addr, req.clone());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 24);
    assert_eq!(
        v["usage"]["prompt_tokens"],
        shipped_token_count("Once upon a time")
    );
    let text = choice["text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    // Same request, streamed: the pieces add up to the same text, then [DONE].
    let events = stream(addr, req.clone());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    // With include_usage, every chunk carries `usage: null` and one last chunk, without
    // choices, the usage of the whole completion.
    let mut with_usage = req.clone();
    with_usage["stream_options"] = json!({"include_usage": true});
    let events = stream(addr, with_usage);
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"]["prompt_tokens"],
        shipped_token_count("Once upon a time")
    );
    assert_eq!(last["usage"]["completion_tokens"], 24);
    assert_eq!(
        last["usage"]["total_tokens"],
        24 + shipped_token_count("Once upon a time")
    );
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert!(first["usage"].is_null() && first.get("usage").is_some());
    // The repeated prompt continued from the cached state.
    assert!(metric(addr, "prompt_cache_hits_total") >= 1.0);
    // A stop string ends the completion early, without the stop string.
    let cut = text.split_whitespace().nth(2).unwrap().to_string();
    let (_, v) = complete(
        addr,
        json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "stop": [cut.clone()]}),
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let stopped = v["choices"][0]["text"].as_str().unwrap();
    assert!(
        text.starts_with(stopped) && !stopped.contains(&cut),
        "{stopped:?} / {cut:?}"
    );
    // Models, tokenize and detokenize.
    let (status, _, body) = http(addr, "GET", "/v1/models", &[], "");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["data"][0]["object"],
        "model"
    );
    let (_, _, body) = http(
        addr,
        "POST",
        "/tokenize",
        &[],
        r#"{"content": "Once upon a time"}"#,
    );
    let ids = serde_json::from_str::<Value>(&body).unwrap()["tokens"].clone();
    assert_eq!(
        ids.as_array().unwrap().len(),
        shipped_token_count("Once upon a time")
    );
    let (_, _, body) = http(
        addr,
        "POST",
        "/detokenize",
        &[],
        &json!({"tokens": ids}).to_string(),
    );
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["content"],
        "Once upon a time"
    );
}

#[test]
fn thirty_two_parallel_clients_are_batched() {
    let addr = server();
    let handles: Vec<_> = (0..32)
        .map(|i| {
            std::thread::spawn(move || {
                let req = json!({"prompt": format!("Client {i} says"), "max_tokens": 16, "seed": i, "stream": i % 2 == 0});
                if i % 2 == 0 {
                    let ev = stream(addr, req);
                    assert_eq!(ev.last().unwrap(), "[DONE]");
                    ev.len()
                } else {
                    let (status, v) = complete(addr, req);
                    assert_eq!(status, 200, "{v}");
                    assert_eq!(v["usage"]["completion_tokens"], 16);
                    16
                }
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap() > 0);
    }
    assert!(metric(addr, "requests_total") >= 32.0);
    assert!(metric(addr, "generated_tokens_total") >= 16.0 * 16.0);
    assert_eq!(
        metric(addr, "requests_cancelled_total"),
        0.0,
        "finished streams were counted as cancelled"
    );
    assert_eq!(http(addr, "GET", "/health", &[], "").0, 200);
}

#[test]
fn a_client_that_disconnects_is_cancelled() {
    let addr = server();
    let before = metric(addr, "requests_cancelled_total");
    let mut s = TcpStream::connect(addr).unwrap();
    let body = json!({"prompt": "A long story", "max_tokens": 4000, "stream": true}).to_string();
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut buf = [0u8; 2048];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200"));
    drop(s);
    let t0 = Instant::now();
    while metric(addr, "requests_cancelled_total") <= before {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the stream was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(metric(addr, "generated_tokens_total") < 4000.0);
    assert_eq!(metric(addr, "active_streams"), 0.0);
}

#[test]
fn api_key_is_required_when_set() {
    let addr = start(ServeConfig {
        model: shipped_model(),
        api_key: Some("sesame".into()),
        ..ServeConfig::default()
    });
    let body = json!({"prompt": "Hi", "max_tokens": 2}).to_string();
    let (status, _, text) = http(addr, "POST", "/v1/completions", &[], &body);
    assert_eq!(status, 401);
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"]["message"].is_string());
    let wrong = [("Authorization", "Bearer nope")];
    assert_eq!(http(addr, "POST", "/v1/completions", &wrong, &body).0, 401);
    assert_eq!(http(addr, "GET", "/v1/models", &[], "").0, 401);
    let right = [("Authorization", "Bearer sesame")];
    assert_eq!(http(addr, "POST", "/v1/completions", &right, &body).0, 200);
    assert_eq!(http(addr, "GET", "/health", &[], "").0, 200);
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_stays_up() {
    let addr = start(ServeConfig {
        model: shipped_model(),
        max_tokens_cap: 100,
        body_limit: 4096,
        ..ServeConfig::default()
    });
    let cases: Vec<(&str, &str, String, u16)> = vec![
        ("POST", "/v1/completions", "{not json".into(), 400),
        ("POST", "/v1/completions", "[1, 2]".into(), 400),
        ("POST", "/v1/completions", "{}".into(), 400),
        ("POST", "/v1/completions", r#"{"prompt": ""}"#.into(), 400),
        ("POST", "/v1/completions", r#"{"prompt": 5}"#.into(), 400),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 0}"#.into(),
            400,
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 101}"#.into(),
            400,
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": -3}"#.into(),
            400,
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "x", "temperature": 9}"#.into(),
            400,
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "x", "top_p": 0}"#.into(),
            400,
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "x", "stop": 3}"#.into(),
            400,
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "x", "stream": "yes"}"#.into(),
            400,
        ),
        (
            "POST",
            "/v1/completions",
            format!(r#"{{"prompt": "{}"}}"#, "x".repeat(10_000)),
            413,
        ),
        ("POST", "/tokenize", "{}".into(), 400),
        (
            "POST",
            "/detokenize",
            r#"{"tokens": [1, 99999999]}"#.into(),
            400,
        ),
        ("GET", "/nope", String::new(), 404),
    ];
    for (method, path, body, want) in cases {
        let (status, _, text) = http(addr, method, path, &[], &body);
        assert_eq!(status, want, "{method} {path} {body:.60}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        assert!(v["error"]["message"].is_string(), "{text}");
    }
    // Invalid UTF-8 in the body.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 4\r\n\r\n\xff\xfe\xfd\xfc").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(http(addr, "GET", "/health", &[], "").0, 200);
    let (status, _) = complete(addr, json!({"prompt": "Still", "max_tokens": 3}));
    assert_eq!(status, 200);
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let addr = start(ServeConfig {
        model: shipped_model(),
        max_batch: 1,
        queue: 1,
        ..ServeConfig::default()
    });
    let handles: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                http(
                    addr,
                    "POST",
                    "/v1/completions",
                    &[],
                    &json!({"prompt": "Wait", "max_tokens": 300}).to_string(),
                )
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let busy: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert!(!busy.is_empty(), "no request was refused");
    assert!(busy
        .iter()
        .all(|r| r.1.to_ascii_lowercase().contains("retry-after: 1")));
    assert!(results.iter().any(|r| r.0 == 200));
    assert!(metric(addr, "requests_rejected_total") >= 1.0);
}

/// PTB's `<unk>` (token 1 of `models/ptb-tiny`) is never generated, even pushed to the top by
/// `logit_bias`, unless the request sets `allow_placeholders`.
#[test]
fn placeholders_are_generated_only_when_allowed() {
    let addr = start(ServeConfig {
        model: shipped_model().join("../ptb-tiny"),
        ..ServeConfig::default()
    });
    let tokens = |allow: bool| {
        let body = json!({"prompt": "the company said", "max_tokens": 4, "temperature": 0,
            "logprobs": 0, "logit_bias": {"1": 100}, "allow_placeholders": allow});
        let (status, v) = complete(addr, body);
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["logprobs"]["tokens"].clone()
    };
    assert_eq!(tokens(true), json!(vec!["<unk>"; 4]));
    let banned = tokens(false);
    assert_eq!(banned.as_array().unwrap().len(), 4);
    assert!(!banned.to_string().contains("unk"), "{banned}");
    let (status, _) = complete(
        addr,
        json!({"prompt": "x", "max_tokens": 1, "allow_placeholders": 1}),
    );
    assert_eq!(status, 400);
}
