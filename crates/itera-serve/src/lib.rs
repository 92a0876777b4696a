//! `itera serve`: OpenAI-style completions over HTTP (axum + tokio), streamed as Server-Sent
//! Events, with one continuous-batching decode loop (`engine`), a prompt-state cache (`cache`),
//! Prometheus metrics and a browser playground. Every invalid request gets a 4xx JSON error in
//! OpenAI's shape; the server never answers 500 for a bad request.

pub mod cache;
pub mod engine;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use itera_core::generate::{Generator, MAX_NEW_TOKENS};
use itera_core::sample::SamplingParams;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use engine::{EngineConfig, Event, Job, Metrics};

/// Server settings (the CLI's flags).
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub model: PathBuf,
    /// Name reported by /v1/models and in responses.
    pub model_name: String,
    pub api_key: Option<String>,
    /// Streams decoded together at most.
    pub max_batch: usize,
    /// Requests waiting beyond the batch before 503.
    pub queue: usize,
    /// Largest max_tokens accepted.
    pub max_tokens_cap: usize,
    pub cache_bytes: usize,
    pub body_limit: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            model: itera_core::checkpoint::default_model_path(),
            model_name: "itera-lite-tiny".into(),
            api_key: None,
            max_batch: 64,
            queue: 256,
            max_tokens_cap: 4096,
            cache_bytes: 64 << 20,
            body_limit: 1 << 20,
        }
    }
}

struct Ready {
    generator: Arc<Generator>,
    jobs: mpsc::Sender<Job>,
}

struct AppState {
    cfg: ServeConfig,
    ready: OnceLock<Ready>,
    metrics: Arc<Metrics>,
}

type Shared = Arc<AppState>;

/// An error in OpenAI's shape with its HTTP status.
fn error(status: StatusCode, message: impl Into<String>, kind: &str) -> Response {
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": null, "code": null}});
    (status, Json(body)).into_response()
}

fn bad_request(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, message, "invalid_request_error")
}

/// Binds, starts loading the model in the background (/health answers 503 until it is ready)
/// and serves until ctrl-c. `on_bound` receives the actual address (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    cfg: ServeConfig,
    on_bound: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    on_bound(listener.local_addr()?);
    let state: Shared = Arc::new(AppState {
        cfg,
        ready: OnceLock::new(),
        metrics: Arc::new(Metrics::default()),
    });
    let loader = state.clone();
    tokio::task::spawn_blocking(move || load(loader));
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

/// Loads the model and starts the engine thread; a load failure ends the process with a message.
fn load(state: Shared) {
    let cfg = &state.cfg;
    let generator = match Generator::load(&cfg.model) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            eprintln!("error: loading model {}: {e}", cfg.model.display());
            std::process::exit(1);
        }
    };
    let (tx, rx) = mpsc::channel(cfg.queue.max(1));
    let (g, m) = (generator.clone(), state.metrics.clone());
    let ecfg = EngineConfig {
        max_batch: cfg.max_batch.max(1),
        cache_bytes: cfg.cache_bytes,
    };
    std::thread::Builder::new()
        .name("itera-engine".into())
        .spawn(move || engine::run(g, rx, m, ecfg))
        .expect("engine thread starts");
    let _ = state.ready.set(Ready {
        generator,
        jobs: tx,
    });
    eprintln!("model loaded: {}", cfg.model.display());
}

fn app(state: Shared) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/", get(playground))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such endpoint",
                "invalid_request_error",
            )
        })
        .layer(DefaultBodyLimit::max(state.cfg.body_limit))
        .with_state(state)
}

async fn auth(State(s): State<Shared>, headers: HeaderMap, req: Request, next: Next) -> Response {
    if let Some(key) = &s.cfg.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or incorrect API key (send `Authorization: Bearer KEY`)",
                "invalid_request_error",
            );
        }
    }
    next.run(req).await
}

/// The loaded model and the request's JSON object, or the error response to send instead.
fn ready_with_body(
    s: &AppState,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(&Ready, serde_json::Map<String, Value>), Box<Response>> {
    let ready = ready(s)?;
    Ok((ready, json_body(body)?))
}

fn ready(s: &AppState) -> Result<&Ready, Box<Response>> {
    s.ready.get().ok_or_else(|| {
        Box::new(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading",
            "server_busy",
        ))
    })
}

/// Parses a JSON object body, turning every failure (too large, not JSON, not an object) into
/// a 4xx in OpenAI's shape.
fn json_body(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<serde_json::Map<String, Value>, Box<Response>> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        Box::new(error(status, e.body_text(), "invalid_request_error"))
    })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Box::new(bad_request(
            "the request body must be a JSON object",
        ))),
        Err(e) => Err(Box::new(bad_request(format!("invalid JSON: {e}")))),
    }
}

/// A validated completion request.
struct Completion {
    prompt: String,
    max_tokens: usize,
    params: SamplingParams,
    stop: Vec<String>,
    stream: bool,
}

fn parse_completion(m: &serde_json::Map<String, Value>, cap: usize) -> Result<Completion, String> {
    let prompt = match m.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap().to_string()
        }
        Some(_) => return Err("`prompt` must be a string".into()),
        None => return Err("`prompt` is required".into()),
    };
    if prompt.is_empty() {
        return Err("`prompt` is empty".into());
    }
    let uint = |k: &str, default: u64| -> Result<u64, String> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| format!("`{k}` must be a non-negative integer")),
        }
    };
    let float = |k: &str, default: f64| -> Result<f64, String> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| format!("`{k}` must be a number")),
        }
    };
    let max_tokens = uint("max_tokens", 16)? as usize;
    let cap = cap.min(MAX_NEW_TOKENS);
    if max_tokens == 0 || max_tokens > cap {
        return Err(format!(
            "`max_tokens` must be between 1 and {cap}, got {max_tokens}"
        ));
    }
    let temperature = float("temperature", 1.0)?;
    if !(0.0..=2.0).contains(&temperature) {
        return Err(format!(
            "`temperature` must be between 0 and 2, got {temperature}"
        ));
    }
    let top_p = float("top_p", 1.0)?;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(format!("`top_p` must be in (0, 1], got {top_p}"));
    }
    let top_k = uint("top_k", 0)? as usize;
    let seed = match m.get("seed") {
        None | Some(Value::Null) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        Some(v) => v.as_u64().ok_or("`seed` must be a non-negative integer")?,
    };
    let stop = match m.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => {
            a.iter().map(|v| v.as_str().unwrap().to_string()).collect()
        }
        Some(_) => return Err("`stop` must be a string or an array of at most 4 strings".into()),
    };
    if stop.iter().any(String::is_empty) {
        return Err("`stop` strings must not be empty".into());
    }
    let stream = match m.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("`stream` must be a boolean".into()),
    };
    Ok(Completion {
        prompt,
        max_tokens,
        params: SamplingParams {
            temperature: temperature as f32,
            top_k,
            top_p: top_p as f32,
            seed,
        },
        stop,
        stream,
    })
}

fn completion_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    format!("cmpl-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn completions(
    State(s): State<Shared>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let (ready, m) = match ready_with_body(&s, body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let req = match parse_completion(&m, s.cfg.max_tokens_cap) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let prompt = match ready.generator.tokenizer.encode(&req.prompt) {
        Ok(p) if !p.is_empty() => p,
        Ok(_) => return bad_request("`prompt` has no tokens"),
        Err(e) => return bad_request(e.to_string()),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt,
        max_tokens: req.max_tokens,
        params: req.params,
        stop: req.stop,
        events: tx,
    };
    s.metrics.requests.fetch_add(1, Ordering::Relaxed);
    if ready.jobs.try_send(job).is_err() {
        s.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is busy: queue full, retry shortly",
            "server_busy",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    let (id, created, model) = (completion_id(), now(), s.cfg.model_name.clone());
    if req.stream {
        let chunk = move |text: &str, finish: Option<&str>| {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]})
        };
        let events = async_events(rx).map(move |ev| {
            let data = match ev {
                Event::Text(t) => chunk(&t, None).to_string(),
                Event::Done { finish_reason, .. } => chunk("", Some(finish_reason)).to_string(),
                Event::Error(e) => {
                    json!({"error": {"message": e, "type": "server_error"}}).to_string()
                }
            };
            Ok::<_, Infallible>(SseEvent::default().data(data))
        });
        let done = tokio_stream::once(Ok::<_, Infallible>(SseEvent::default().data("[DONE]")));
        return Sse::new(events.chain(done))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response();
    }
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                return Json(json!({
                    "id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens},
                }))
                .into_response();
            }
            Event::Error(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e, "server_error"),
        }
    }
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the engine stopped",
        "server_error",
    )
}

/// The engine's events as a stream that ends after `Done` or `Error`.
fn async_events(rx: mpsc::UnboundedReceiver<Event>) -> impl tokio_stream::Stream<Item = Event> {
    let mut done = false;
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx).take_while(move |ev| {
        let keep = !done;
        done |= matches!(ev, Event::Done { .. } | Event::Error(_));
        keep
    })
}

async fn models(State(s): State<Shared>) -> Response {
    Json(json!({"object": "list", "data": [{"id": s.cfg.model_name, "object": "model", "created": now(), "owned_by": "itera-lite"}]})).into_response()
}

async fn health(State(s): State<Shared>) -> Response {
    match s.ready.get() {
        Some(_) => Json(json!({"status": "ok"})).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<Shared>) -> Response {
    let m = &s.metrics;
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let queue = s
        .ready
        .get()
        .map_or(0, |r| s.cfg.queue.max(1) - r.jobs.capacity());
    let tokens_per_s = format!("{:.1}", f64::from_bits(c(&m.tokens_per_s)));
    #[rustfmt::skip]
    let rows: [(&str, &str, &str, String); 11] = [
        ("requests_total", "counter", "Completion requests accepted into the queue or rejected.", c(&m.requests).to_string()),
        ("requests_rejected_total", "counter", "Requests refused with 503 because the queue was full.", c(&m.rejected).to_string()),
        ("requests_cancelled_total", "counter", "Streams cancelled because the client went away.", c(&m.cancelled).to_string()),
        ("prompt_tokens_total", "counter", "Prompt tokens processed or taken from the cache.", c(&m.prompt_tokens).to_string()),
        ("generated_tokens_total", "counter", "Tokens generated.", c(&m.generated_tokens).to_string()),
        ("prompt_cache_hits_total", "counter", "Prompts that continued from a cached prefix state.", c(&m.cache_hits).to_string()),
        ("prompt_cache_misses_total", "counter", "Prompts processed from the start.", c(&m.cache_misses).to_string()),
        ("prompt_cache_tokens_total", "counter", "Prompt tokens not recomputed thanks to the cache.", c(&m.cached_tokens).to_string()),
        ("queue_depth", "gauge", "Requests waiting for a place in the decode batch.", queue.to_string()),
        ("active_streams", "gauge", "Streams in the decode batch.", c(&m.active).to_string()),
        ("tokens_per_second", "gauge", "Generated tokens per second over the last second.", tokens_per_s),
    ];
    let out: String = rows
        .iter()
        .map(|(name, kind, help, value)| {
            format!(
                "# HELP itera_{name} {help}\n# TYPE itera_{name} {kind}\nitera_{name} {value}\n"
            )
        })
        .collect();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn tokenize(
    State(s): State<Shared>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let (ready, m) = match ready_with_body(&s, body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let Some(text) = m.get("content").and_then(Value::as_str) else {
        return bad_request("`content` (a string) is required");
    };
    match ready.generator.tokenizer.encode(text) {
        Ok(ids) => Json(json!({"tokens": ids})).into_response(),
        Err(e) => bad_request(e.to_string()),
    }
}

async fn detokenize(
    State(s): State<Shared>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let (ready, m) = match ready_with_body(&s, body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let vocab = ready.generator.runtime.cfg.vocab_size as u64;
    let ids: Option<Vec<u32>> = m.get("tokens").and_then(Value::as_array).and_then(|a| {
        a.iter()
            .map(|v| v.as_u64().filter(|&t| t < vocab).map(|t| t as u32))
            .collect()
    });
    let Some(ids) = ids else {
        return bad_request(format!(
            "`tokens` must be an array of token ids below {vocab}"
        ));
    };
    match ready.generator.tokenizer.decode(&ids) {
        Ok(text) => Json(json!({"content": text})).into_response(),
        Err(e) => bad_request(e.to_string()),
    }
}

async fn playground() -> Html<&'static str> {
    Html(include_str!("playground.html"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before the model is loaded: /health and the API answer 503, the rest of the server works.
    #[tokio::test]
    async fn everything_answers_503_while_loading() {
        let state: Shared = Arc::new(AppState {
            cfg: ServeConfig::default(),
            ready: OnceLock::new(),
            metrics: Arc::new(Metrics::default()),
        });
        assert_eq!(
            health(State(state.clone())).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let body = Ok(Bytes::from_static(br#"{"prompt": "x"}"#));
        let r = completions(State(state.clone()), body).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(metrics(State(state)).await.status(), StatusCode::OK);
    }
}
