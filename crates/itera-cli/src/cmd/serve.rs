//! `itera serve`: the OpenAI-style HTTP server.

use anyhow::{Context, Result};
use clap::Args;

use super::ModelArg;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Address to listen on (loopback by default; use 0.0.0.0 to accept other machines)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (or set ITERA_API_KEY)
    #[arg(long, env = "ITERA_API_KEY")]
    pub api_key: Option<String>,
    /// Streams decoded together at most (continuous batching)
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// Requests that may wait for the batch; beyond it the server answers 503 with Retry-After
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Largest max_tokens a request may ask for
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_cap: usize,
    /// Prompt-state cache size in MB
    #[arg(long, default_value_t = 64)]
    pub cache_mb: usize,
    /// Largest request body in KB
    #[arg(long, default_value_t = 1024)]
    pub body_limit_kb: usize,
    /// Longest prompt accepted, in tokens (longer ones are answered 413)
    #[arg(long, default_value_t = 16_384)]
    pub max_prompt_tokens: usize,
    /// Seconds a client has to send a complete request head once the server waits for one
    /// (also closes idle keep-alive connections)
    #[arg(long, default_value_t = 10)]
    pub header_timeout_s: u64,
    /// Seconds a client has to send the whole request body (408 beyond)
    #[arg(long, default_value_t = 30)]
    pub body_timeout_s: u64,
    /// Open connections at most; new ones beyond are closed at once
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Named sessions (`"session"` on /v1/completions) kept at most
    #[arg(long, default_value_t = 256)]
    pub max_sessions: usize,
    /// Bytes of session state kept at most, in MB (least recently used sessions go first)
    #[arg(long, default_value_t = 64)]
    pub session_mb: usize,
    /// Log lines as `text` or `json` (one object per line, for log collectors)
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let model = a.model.path();
    let addr: std::net::SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .with_context(|| format!("invalid --host/--port {}:{}", a.host, a.port))?;
    let name = model
        .file_stem()
        .map_or("itera-lite".into(), |n| n.to_string_lossy().to_string());
    let cfg = itera_serve::ServeConfig {
        model,
        model_name: name,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        max_batch: a.max_batch,
        queue: a.queue,
        max_tokens_cap: a.max_tokens_cap,
        cache_bytes: a.cache_mb << 20,
        body_limit: a.body_limit_kb << 10,
        max_prompt_tokens: a.max_prompt_tokens,
        max_sessions: a.max_sessions,
        session_bytes: a.session_mb << 20,
        limits: itera_serve::connections::Limits {
            header_timeout: std::time::Duration::from_secs(a.header_timeout_s.max(1)),
            body_timeout: std::time::Duration::from_secs(a.body_timeout_s.max(1)),
            max_connections: a.max_connections.max(1),
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(itera_serve::serve(addr, cfg, |bound| {
        eprintln!("listening on http://{bound}");
    }))
    .with_context(|| format!("serving on {addr}"))
}
