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

/// A request's problem: the message and the parameter it is about (OpenAI's `param`).
pub(crate) struct Invalid {
    pub(crate) message: String,
    pub(crate) param: Option<&'static str>,
}

impl Invalid {
    fn at(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            param: Some(param),
        }
    }

    pub(crate) fn response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": "invalid_request_error",
                                    "param": self.param, "code": null}});
        (StatusCode::BAD_REQUEST, Json(body)).into_response()
    }
}

/// What a prompt is: text, or token ids (OpenAI's completions accept both).
pub(crate) enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// A validated `/v1/completions` or `/v1/chat/completions` request.
pub(crate) struct Completion {
    /// One choice set per prompt (chat: the rendered conversation).
    pub(crate) prompts: Vec<Prompt>,
    /// Choices per prompt.
    pub(crate) n: usize,
    pub(crate) max_tokens: usize,
    /// The sampling of choice 0; choice j uses seed + j.
    pub(crate) params: SamplingParams,
    pub(crate) stop: Vec<String>,
    pub(crate) stream: bool,
    /// Top alternatives per generated token (None: no log-probabilities).
    pub(crate) logprobs: Option<usize>,
    /// Return the prompt before the completion (with its log-probabilities when asked).
    pub(crate) echo: bool,
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub(crate) include_usage: bool,
    /// Continue this named session and store its new state (completions, one choice).
    pub(crate) session: Option<String>,
}

/// Parameters OpenAI's legacy completions accept, and chat's. Anything else is refused with
/// OpenAI's own message, as OpenAI does; accepted but unsupported values are refused where used.
const COMPLETION_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "suffix",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "echo",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "best_of",
    "logit_bias",
    "user",
    "seed",
    "top_k",
    "min_p",
    "repetition_penalty",
    "allow_placeholders",
    "session",
];
const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "seed",
    "top_k",
    "min_p",
    "repetition_penalty",
    "allow_placeholders",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "store",
    "metadata",
    "service_tier",
    "modalities",
];

/// Typed access to a request's fields, with errors that name the field.
struct Fields<'a>(&'a serde_json::Map<String, Value>);

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn only(&self, allowed: &[&str]) -> Result<(), Invalid> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(Invalid {
                message: format!("Unrecognized request argument supplied: {k}"),
                param: None,
            }),
            None => Ok(()),
        }
    }

    fn uint(&self, k: &'static str, default: u64) -> Result<u64, Invalid> {
        self.get(k).map_or(Ok(default), |v| {
            v.as_u64()
                .ok_or_else(|| Invalid::at(k, format!("`{k}` must be a non-negative integer")))
        })
    }

    fn float(&self, k: &'static str, default: f64, range: (f64, f64)) -> Result<f64, Invalid> {
        let v = self.get(k).map_or(Ok(default), |v| {
            v.as_f64()
                .ok_or_else(|| Invalid::at(k, format!("`{k}` must be a number")))
        })?;
        if !(range.0..=range.1).contains(&v) {
            return Err(Invalid::at(
                k,
                format!("`{k}` must be between {} and {}, got {v}", range.0, range.1),
            ));
        }
        Ok(v)
    }

    fn bool(&self, k: &'static str) -> Result<bool, Invalid> {
        self.get(k).map_or(Ok(false), |v| {
            v.as_bool()
                .ok_or_else(|| Invalid::at(k, format!("`{k}` must be a boolean")))
        })
    }
}

/// The sampling fields both endpoints share, plus stop, stream, n and usage options.
fn common(
    f: &Fields,
    cap: usize,
    vocab: usize,
    max_key: &'static str,
) -> Result<Completion, Invalid> {
    let max_tokens = f.uint(max_key, 16)? as usize;
    let cap = cap.min(MAX_NEW_TOKENS);
    if max_tokens > cap {
        return Err(Invalid::at(
            max_key,
            format!("`{max_key}` must be at most {cap}, got {max_tokens}"),
        ));
    }
    let n = f.uint("n", 1)? as usize;
    if !(1..=16).contains(&n) {
        return Err(Invalid::at(
            "n",
            format!("`n` must be between 1 and 16, got {n}"),
        ));
    }
    let seed = match f.get("seed") {
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| Invalid::at("seed", "`seed` must be a non-negative integer"))?,
    };
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => a
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect(),
        Some(_) => {
            return Err(Invalid::at(
                "stop",
                "`stop` must be a string or an array of at most 4 strings",
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(Invalid::at("stop", "`stop` strings must not be empty"));
    }
    let logit_bias = match f.get("logit_bias") {
        None => Vec::new(),
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| {
                let id: u32 = k
                    .parse()
                    .ok()
                    .filter(|&i: &u32| (i as usize) < vocab)
                    .ok_or_else(|| {
                        Invalid::at(
                            "logit_bias",
                            format!("`logit_bias` key `{k}` is not a token id below {vocab}"),
                        )
                    })?;
                let b = v
                    .as_f64()
                    .filter(|b| (-100.0..=100.0).contains(b))
                    .ok_or_else(|| {
                        Invalid::at(
                            "logit_bias",
                            format!("`logit_bias` for {k} must be a number in [-100, 100]"),
                        )
                    })?;
                Ok((id, b as f32))
            })
            .collect::<Result<_, Invalid>>()?,
        Some(_) => return Err(Invalid::at("logit_bias", "`logit_bias` must be an object")),
    };
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => o
            .get("include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        Some(_) => {
            return Err(Invalid::at(
                "stream_options",
                "`stream_options` must be an object",
            ))
        }
    };
    let params = SamplingParams {
        temperature: f.float("temperature", 1.0, (0.0, 2.0))? as f32,
        top_k: f.uint("top_k", 0)? as usize,
        top_p: f.float("top_p", 1.0, (0.0, 1.0))? as f32,
        seed,
        repetition_penalty: f.float("repetition_penalty", 1.0, (0.01, 10.0))? as f32,
        presence_penalty: f.float("presence_penalty", 0.0, (-2.0, 2.0))? as f32,
        frequency_penalty: f.float("frequency_penalty", 0.0, (-2.0, 2.0))? as f32,
        min_p: f.float("min_p", 0.0, (0.0, 0.99))? as f32,
        logit_bias,
        allow_placeholders: f.bool("allow_placeholders")?,
    };
    params
        .validate()
        .map_err(|e| Invalid::at("top_p", e.to_string()))?;
    Ok(Completion {
        prompts: Vec::new(),
        n,
        max_tokens,
        params,
        stop,
        stream: f.bool("stream")?,
        logprobs: None,
        echo: false,
        include_usage,
        session: None,
    })
}

/// `/v1/completions`: `prompt` as a string, a list of strings, a token-id list or a list of
/// token-id lists; `logprobs` (0-5 alternatives) and `echo`; `max_tokens` 0 only with echo.
pub(crate) fn parse_completion(
    m: &serde_json::Map<String, Value>,
    cap: usize,
    vocab: usize,
) -> Result<Completion, Invalid> {
    let f = Fields(m);
    f.only(COMPLETION_FIELDS)?;
    let tokens = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&t| (t as usize) < vocab)
                    .map(|t| t as u32)
            })
            .collect()
    };
    let bad = || {
        Invalid::at(
        "prompt",
        format!("`prompt` must be a string, a list of strings, a list of token ids below {vocab}, or a list of such lists"),
    )
    };
    let prompts = match f.get("prompt") {
        None => return Err(Invalid::at("prompt", "`prompt` is required")),
        Some(Value::String(s)) => vec![Prompt::Text(s.clone())],
        Some(Value::Array(a)) if a.is_empty() => return Err(bad()),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
            .iter()
            .map(|v| Prompt::Text(v.as_str().unwrap_or_default().to_string()))
            .collect(),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => {
            vec![Prompt::Tokens(tokens(a).ok_or_else(bad)?)]
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_array) => a
            .iter()
            .map(|v| tokens(v.as_array().map_or(&[][..], Vec::as_slice)).map(Prompt::Tokens))
            .collect::<Option<_>>()
            .ok_or_else(bad)?,
        Some(_) => return Err(bad()),
    };
    if prompts.len() > 64 {
        return Err(Invalid::at("prompt", "at most 64 prompts per request"));
    }
    if prompts.iter().any(|p| match p {
        Prompt::Text(t) => t.is_empty(),
        Prompt::Tokens(t) => t.is_empty(),
    }) {
        return Err(Invalid::at("prompt", "`prompt` is empty"));
    }
    if f.get("suffix")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
        return Err(Invalid::at(
            "suffix",
            "`suffix` is not supported by this model",
        ));
    }
    let mut c = common(&f, cap, vocab, "max_tokens")?;
    if let Some(best_of) = f.get("best_of") {
        if best_of.as_u64() != Some(c.n as u64) {
            return Err(Invalid::at(
                "best_of",
                "`best_of` other than `n` is not supported (choices are not ranked)",
            ));
        }
    }
    c.echo = f.bool("echo")?;
    c.logprobs = match f.get("logprobs") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(k) if k <= 5 => Some(k as usize),
            _ => {
                return Err(Invalid::at(
                    "logprobs",
                    "`logprobs` must be an integer from 0 to 5",
                ))
            }
        },
    };
    if c.max_tokens == 0 && !c.echo {
        return Err(Invalid::at(
            "max_tokens",
            "`max_tokens` must be at least 1 (0 is allowed only with `echo`)",
        ));
    }
    c.session = match f.get("session") {
        None => None,
        Some(Value::String(name))
            if !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)) =>
        {
            Some(name.clone())
        }
        Some(_) => {
            return Err(Invalid::at(
                "session",
                "`session` must be a name of 1 to 64 letters, digits, `-`, `_` or `.`",
            ))
        }
    };
    if c.session.is_some() && (prompts.len() * c.n > 1 || c.echo) {
        return Err(Invalid::at(
            "session",
            "a session continues one choice: use one prompt, `n` 1 and no `echo`",
        ));
    }
    if c.stream && prompts.len() * c.n > 1 && c.echo {
        return Err(Invalid::at(
            "echo",
            "`echo` with several streamed choices is not supported",
        ));
    }
    c.prompts = prompts;
    Ok(c)
}

/// One chat message.
pub(crate) struct Message {
    pub(crate) role: String,
    pub(crate) content: String,
}

/// `/v1/chat/completions`: the messages, and the completion settings (`max_completion_tokens`
/// or `max_tokens`; `logprobs: true` with `top_logprobs`).
pub(crate) fn parse_chat(
    m: &serde_json::Map<String, Value>,
    cap: usize,
    vocab: usize,
) -> Result<(Vec<Message>, Completion), Invalid> {
    let f = Fields(m);
    f.only(CHAT_FIELDS)?;
    let bad = || {
        Invalid::at(
            "messages",
            "`messages` must be a non-empty array of {role, content} objects",
        )
    };
    let list = f
        .get("messages")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(bad)?;
    let mut messages = Vec::with_capacity(list.len());
    for v in list {
        let role = v.get("role").and_then(Value::as_str).ok_or_else(bad)?;
        if !["system", "developer", "user", "assistant", "tool"].contains(&role) {
            return Err(Invalid::at(
                "messages",
                format!("unknown message role `{role}`"),
            ));
        }
        // Content: a string, or OpenAI's list of parts of which the text ones are used.
        let content = match v.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => Ok(t.to_string()),
                        _ => Err(Invalid::at(
                            "messages",
                            "only text content parts are supported",
                        )),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(""),
            None | Some(Value::Null) => String::new(),
            Some(_) => return Err(bad()),
        };
        messages.push(Message {
            role: role.to_string(),
            content,
        });
    }
    for unsupported in ["tools", "response_format"] {
        if f.get(unsupported).is_some() {
            return Err(Invalid::at(
                unsupported,
                format!("`{unsupported}` is not supported by this model"),
            ));
        }
    }
    let key = if f.get("max_completion_tokens").is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let mut c = common(&f, cap, vocab, key)?;
    if c.max_tokens == 0 {
        return Err(Invalid::at(key, format!("`{key}` must be at least 1")));
    }
    if f.bool("logprobs")? {
        let k = f.uint("top_logprobs", 0)?;
        if k > 20 {
            return Err(Invalid::at(
                "top_logprobs",
                "`top_logprobs` must be from 0 to 20",
            ));
        }
        c.logprobs = Some(k as usize);
    }
    Ok((messages, c))
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
