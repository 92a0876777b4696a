//! The HTTP API's request side: errors in OpenAI's JSON shape, parsing a JSON object body into
//! 4xx errors for every malformed request, and the validation of completion requests. Handlers
//! (`completions`, `tokenize`, and the small ones in `lib.rs`) build on these.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use itera_core::generate::MAX_NEW_TOKENS;
use itera_core::sample::SamplingParams;
use serde_json::{json, Value};

use crate::{AppState, Ready};

/// An error in OpenAI's shape with its HTTP status.
pub(crate) fn error(status: StatusCode, message: impl Into<String>, kind: &str) -> Response {
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": null, "code": null}});
    (status, Json(body)).into_response()
}

pub(crate) fn bad_request(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, message, "invalid_request_error")
}

/// The loaded model and the request's JSON object, or the error response to send instead.
pub(crate) fn ready_with_body(
    s: &AppState,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(&Ready, serde_json::Map<String, Value>), Box<Response>> {
    let ready = ready(s)?;
    Ok((ready, json_body(body)?))
}

pub(crate) fn ready(s: &AppState) -> Result<&Ready, Box<Response>> {
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
pub(crate) fn json_body(
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
pub(crate) struct Completion {
    pub(crate) prompt: String,
    pub(crate) max_tokens: usize,
    pub(crate) params: SamplingParams,
    pub(crate) stop: Vec<String>,
    pub(crate) stream: bool,
}

pub(crate) fn parse_completion(
    m: &serde_json::Map<String, Value>,
    cap: usize,
) -> Result<Completion, String> {
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

pub(crate) fn completion_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    format!(
        "cmpl-{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
