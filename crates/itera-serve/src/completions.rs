//! `POST /v1/completions`: a validated request becomes a job for the decode engine; its events
//! come back as one JSON response or as Server-Sent Events (`stream: true`), in OpenAI's shape.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::api::{bad_request, completion_id, error, now, parse_completion, ready_with_body};
use crate::engine::{Event, Job};
use crate::Shared;

pub(crate) async fn completions(
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
    s.metrics.requests.inc();
    if ready.jobs.try_send(job).is_err() {
        s.metrics.rejected.inc();
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
