//! The HTTP/1.1 connections themselves, around the router: an accept loop with a connection
//! limit, hyper's header-read timeout (a client must send a complete request head within
//! `header_timeout` of the server waiting for one, which also closes idle keep-alive
//! connections), a body-read timeout and size limit, the API key check (every route but
//! `/health` and the playground), and one log line per request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api::error;
use crate::Shared;

/// How long each phase of reading a request may take, and how many connections may be open.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 512,
        }
    }
}

/// Accepts connections until `shutdown` resolves. Beyond `max_connections` open ones, new
/// connections are closed at once (counted in `itera_connections_refused_total`).
pub(crate) async fn accept_loop(
    listener: TcpListener,
    app: Router,
    state: Shared,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let limits = state.cfg.limits;
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait a moment rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            state.metrics.connections_refused.inc();
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Reads the whole request body within `body_timeout` (a client trickling its body gets 408),
/// at most the body limit (413), before any handler runs.
pub(crate) async fn read_body(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let limit = s.cfg.body_limit;
    let read = axum::body::to_bytes(body, limit);
    match tokio::time::timeout(s.cfg.limits.body_timeout, read).await {
        Err(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time",
            "invalid_request_error",
        ),
        Ok(Err(_)) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {limit} bytes"),
            "invalid_request_error",
        ),
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
    }
}

/// Routes that answer without a key: the health check and the playground page.
const OPEN: [&str; 2] = ["/", "/health"];

/// `Authorization: Bearer KEY` on every route but `OPEN`, compared in constant time.
pub(crate) async fn auth(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.cfg.api_key {
        if !OPEN.contains(&req.uri().path()) {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            let same: bool = given.as_bytes().ct_eq(key.as_bytes()).into();
            if !same {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "missing or incorrect API key (send `Authorization: Bearer KEY`)",
                    "invalid_request_error",
                );
            }
        }
    }
    next.run(req).await
}

/// Token counts a handler attaches to its response, for the request log.
#[derive(Clone, Copy, Debug)]
pub struct Tokens {
    pub prompt: usize,
    pub completion: usize,
}

/// One log line per request: method, path, status, tokens (when the handler knew them before
/// answering) and the time to the response head.
pub async fn log_request(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let t0 = Instant::now();
    let response = next.run(req).await;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let status = response.status().as_u16();
    match response.extensions().get::<Tokens>() {
        Some(t) => tracing::info!(
            target: "itera::request",
            %method, path, status, prompt_tokens = t.prompt, completion_tokens = t.completion,
            latency_ms = format_args!("{ms:.1}"), "request"
        ),
        None => tracing::info!(
            target: "itera::request",
            %method, path, status, latency_ms = format_args!("{ms:.1}"), "request"
        ),
    }
    response
}
