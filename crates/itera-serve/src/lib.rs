//! `itera serve`: OpenAI-style completions over HTTP (axum + tokio), streamed as Server-Sent
//! Events, with one continuous-batching decode loop (`engine`), a prompt-state cache (`cache`),
//! Prometheus metrics and a browser playground. Every invalid request gets a 4xx JSON error in
//! OpenAI's shape; the server never answers 500 for a bad request.

mod api;
pub mod cache;
pub mod chat;
mod completions;
pub mod connections;
pub mod engine;
pub mod metrics;
pub mod sessions;
mod tokenize;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use itera_core::generate::Generator;
use serde_json::json;
use tokio::sync::mpsc;

use api::{error, now};
use engine::{EngineConfig, Job};
pub use metrics::Metrics;

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
    /// Longest prompt accepted, in tokens (longer ones get 413).
    pub max_prompt_tokens: usize,
    /// Read timeouts and the connection limit.
    pub limits: connections::Limits,
    /// Named sessions kept at most, and their bytes at most.
    pub max_sessions: usize,
    pub session_bytes: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            model: itera_core::format::model_dir::default_model_path(),
            model_name: "itera-lite-tiny".into(),
            api_key: None,
            max_batch: 64,
            queue: 256,
            max_tokens_cap: 4096,
            cache_bytes: 64 << 20,
            body_limit: 1 << 20,
            max_prompt_tokens: 16_384,
            limits: connections::Limits::default(),
            max_sessions: 256,
            session_bytes: 64 << 20,
        }
    }
}

pub(crate) struct Ready {
    pub(crate) generator: Arc<Generator>,
    pub(crate) jobs: mpsc::Sender<Job>,
}

pub(crate) struct AppState {
    pub(crate) cfg: ServeConfig,
    pub(crate) ready: OnceLock<Ready>,
    pub(crate) metrics: Arc<Metrics>,
}

pub(crate) type Shared = Arc<AppState>;

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
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    connections::accept_loop(listener, app(state.clone()), state, shutdown).await;
    Ok(())
}

/// Loads the model and starts the engine thread; a load failure ends the process with a message.
fn load(state: Shared) {
    let cfg = &state.cfg;
    let generator = match Generator::load(&cfg.model) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            tracing::error!("loading model {}: {e}", cfg.model.display());
            eprintln!("error: loading model {}: {e}", cfg.model.display());
            std::process::exit(1);
        }
    };
    let (tx, rx) = mpsc::channel(cfg.queue.max(1));
    let (g, m) = (generator.clone(), state.metrics.clone());
    let ecfg = EngineConfig {
        max_batch: cfg.max_batch.max(1),
        cache_bytes: cfg.cache_bytes,
        max_sessions: cfg.max_sessions,
        session_bytes: cfg.session_bytes,
    };
    std::thread::Builder::new()
        .name("itera-engine".into())
        .spawn(move || engine::run(g, rx, m, ecfg))
        .expect("engine thread starts");
    let _ = state.ready.set(Ready {
        generator,
        jobs: tx,
    });
    tracing::info!("model loaded: {}", cfg.model.display());
}

fn app(state: Shared) -> Router {
    use connections::{auth, log_request, read_body};
    Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(models))
        .route("/", get(playground))
        .route("/health", get(health))
        .route("/metrics", get(metrics::metrics))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such endpoint",
                "invalid_request_error",
            )
        })
        .layer(DefaultBodyLimit::max(state.cfg.body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
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

async fn playground() -> Html<&'static str> {
    Html(include_str!("playground.html"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;

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
        let r = completions::completions(State(state.clone()), body).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            metrics::metrics(State(state)).await.status(),
            StatusCode::OK
        );
    }
}
