//! Load benchmark and soak for a running `itera serve`: N concurrent clients, each sending
//! streaming completions back to back for a fixed time. Reports generated tokens/s (SSE pieces),
//! time to first token p50/p99, errors, and (with --pid, from /proc) the server's RSS after the
//! first tenth of the run and at its end, and its peak. `--cancel N` then opens N streams that
//! hang up after their first piece and reports what /metrics says afterwards (cancelled streams
//! counted, none left active).
//!
//! cargo run --release -p itera-serve --example load -- --addr 127.0.0.1:8000 --clients 64 \
//!     --seconds 60 --max-tokens 128 [--pid SERVER_PID] [--cancel 100]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// One streaming request: (time to first piece, pieces) or an error.
fn one(addr: &str, prompt: &str, max_tokens: usize) -> Result<(Duration, u64), String> {
    let t0 = Instant::now();
    let body = format!(
        r#"{{"prompt": "{prompt}", "max_tokens": {max_tokens}, "stream": true, "temperature": 0.8}}"#
    );
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).map_err(|e| e.to_string())?;
    if !status.contains(" 200 ") {
        return Err(status.trim().to_string());
    }
    let (mut first, mut pieces, mut done) = (None, 0u64, false);
    for line in r.lines() {
        let line = line.map_err(|e| e.to_string())?;
        if let Some(data) = line.strip_prefix("data: ") {
            if data == "[DONE]" {
                done = true;
                break;
            }
            if data.contains("\"finish_reason\":null") {
                pieces += 1;
                first.get_or_insert_with(|| t0.elapsed());
            }
        }
    }
    if !done {
        return Err("stream ended without [DONE]".into());
    }
    Ok((first.unwrap_or_else(|| t0.elapsed()), pieces))
}

/// A /proc/PID/status field in MB (VmRSS: now, VmHWM: peak).
fn rss_mb(pid: &str, field: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn main() {
    let addr = arg("--addr", "127.0.0.1:8000");
    let clients: usize = arg("--clients", "64").parse().unwrap();
    let seconds: u64 = arg("--seconds", "60").parse().unwrap();
    let max_tokens: usize = arg("--max-tokens", "128").parse().unwrap();
    let pid = arg("--pid", "");
    let stop = Arc::new(AtomicBool::new(false));
    let (pieces, errors, requests) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let ttft = Arc::new(Mutex::new(Vec::<f64>::new()));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let (addr, stop, pieces, errors, requests, ttft) = (
                addr.clone(),
                stop.clone(),
                pieces.clone(),
                errors.clone(),
                requests.clone(),
                ttft.clone(),
            );
            std::thread::spawn(move || {
                let prompts = [
                    "Once upon a time",
                    "The President said",
                    "It was a dark night",
                    "My dear sister",
                ];
                let mut k = i;
                while !stop.load(Ordering::Relaxed) {
                    match one(&addr, prompts[k % prompts.len()], max_tokens) {
                        Ok((first, n)) => {
                            pieces.fetch_add(n, Ordering::Relaxed);
                            ttft.lock().unwrap().push(first.as_secs_f64() * 1e3);
                        }
                        Err(e) => {
                            if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("error: {e}");
                            }
                        }
                    }
                    requests.fetch_add(1, Ordering::Relaxed);
                    k += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds as f64 / 10.0));
    let rss_start = rss_mb(&pid, "VmRSS:");
    std::thread::sleep(Duration::from_secs_f64(seconds as f64 * 0.9));
    let rss_end = rss_mb(&pid, "VmRSS:");
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut t = ttft.lock().unwrap().clone();
    t.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        if t.is_empty() {
            f64::NAN
        } else {
            t[((t.len() as f64 * q).ceil() as usize).clamp(1, t.len()) - 1]
        }
    };
    let mb = |v: Option<f64>| v.map_or("null".to_string(), |m| format!("{m:.1}"));
    let cancels: usize = arg("--cancel", "0").parse().unwrap();
    let cancelled = (cancels > 0).then(|| cancel(&addr, cancels));
    let report = format!(
        r#"{{"clients": {clients}, "seconds": {secs:.1}, "requests": {}, "errors": {}, "generated_tokens": {}, "tokens_per_s": {:.1}, "ttft_p50_ms": {:.1}, "ttft_p99_ms": {:.1}, "server_rss_start_mb": {}, "server_rss_end_mb": {}, "server_peak_rss_mb": {}, "cancellations": {}}}"#,
        requests.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        pieces.load(Ordering::Relaxed),
        pieces.load(Ordering::Relaxed) as f64 / secs,
        pct(0.5),
        pct(0.99),
        mb(rss_start),
        mb(rss_end),
        mb(rss_mb(&pid, "VmHWM:")),
        cancelled.unwrap_or_else(|| "null".into()),
    );
    println!("{report}");
}

/// Opens `n` streams that hang up after their first piece; then reads /metrics: returns a JSON
/// object with the streams opened, the server's cancelled-stream counter and its active streams.
fn cancel(addr: &str, n: usize) -> String {
    let body = r#"{"prompt": "Once upon a time", "max_tokens": 500, "stream": true}"#;
    let mut opened = 0;
    for _ in 0..n {
        let Ok(mut s) = TcpStream::connect(addr) else {
            continue;
        };
        let _ = write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut r = BufReader::new(s);
        for line in (&mut r).lines() {
            match line {
                Ok(l) if l.starts_with("data: ") => {
                    opened += 1;
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        drop(r);
    }
    // Let the decode loop notice the closed sockets.
    std::thread::sleep(Duration::from_secs(2));
    let metric = |text: &str, name: &str| -> String {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("null")
            .to_string()
    };
    let text = TcpStream::connect(addr)
        .and_then(|mut s| {
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )?;
            let mut t = String::new();
            std::io::Read::read_to_string(&mut s, &mut t)?;
            Ok(t)
        })
        .unwrap_or_default();
    format!(
        r#"{{"opened": {opened}, "server_cancelled_total": {}, "server_active_streams": {}}}"#,
        metric(&text, "itera_requests_cancelled_total"),
        metric(&text, "itera_active_streams")
    )
}
