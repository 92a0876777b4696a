//! `GET /metrics`: the server's counters and gauges in the Prometheus / OpenMetrics text format,
//! through `prometheus-client`. The engine thread and the handlers update them; a scrape encodes.

use std::sync::atomic::AtomicU64;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::Shared;

/// Every metric, registered under the `itera_` prefix (counters get OpenMetrics' `_total`).
pub struct Metrics {
    registry: Registry,
    pub requests: Counter,
    pub rejected: Counter,
    pub cancelled: Counter,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cached_tokens: Counter,
    /// Connections closed at once because `--max-connections` were open.
    pub connections_refused: Counter,
    /// Requests waiting for a place in the decode batch (set at scrape time).
    pub queue_depth: Gauge,
    /// Streams in the decode batch.
    pub active: Gauge,
    /// Generated tokens per second over the last second.
    pub tokens_per_s: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("itera");
        let m = Self {
            requests: Counter::default(),
            rejected: Counter::default(),
            cancelled: Counter::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cached_tokens: Counter::default(),
            connections_refused: Counter::default(),
            queue_depth: Gauge::default(),
            active: Gauge::default(),
            tokens_per_s: Gauge::default(),
            registry: Registry::default(),
        };
        #[rustfmt::skip]
        let counters = [
            ("requests", "Completion requests accepted into the queue or rejected.", &m.requests),
            ("requests_rejected", "Requests refused with 503 because the queue was full.", &m.rejected),
            ("requests_cancelled", "Streams cancelled because the client went away.", &m.cancelled),
            ("prompt_tokens", "Prompt tokens processed or taken from the cache.", &m.prompt_tokens),
            ("generated_tokens", "Tokens generated.", &m.generated_tokens),
            ("prompt_cache_hits", "Prompts that continued from a cached prefix state.", &m.cache_hits),
            ("prompt_cache_misses", "Prompts processed from the start.", &m.cache_misses),
            ("prompt_cache_tokens", "Prompt tokens not recomputed thanks to the cache.", &m.cached_tokens),
            ("connections_refused", "Connections closed at once because the connection limit was reached.", &m.connections_refused),
        ];
        for (name, help, c) in counters {
            registry.register(name, help, c.clone());
        }
        registry.register(
            "queue_depth",
            "Requests waiting for a place in the decode batch.",
            m.queue_depth.clone(),
        );
        registry.register(
            "active_streams",
            "Streams in the decode batch.",
            m.active.clone(),
        );
        registry.register(
            "tokens_per_second",
            "Generated tokens per second over the last second.",
            m.tokens_per_s.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

pub(crate) async fn metrics(State(s): State<Shared>) -> Response {
    let queue = s
        .ready
        .get()
        .map_or(0, |r| s.cfg.queue.max(1) - r.jobs.capacity());
    s.metrics.queue_depth.set(queue as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}
