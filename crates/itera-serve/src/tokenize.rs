//! `POST /tokenize` and `POST /detokenize`: the model's tokenizer over HTTP.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::api::{bad_request, ready_with_body};
use crate::Shared;

pub(crate) async fn tokenize(
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

pub(crate) async fn detokenize(
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
