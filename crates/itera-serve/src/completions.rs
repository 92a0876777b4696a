//! `POST /v1/completions`: validated prompts (text or token ids, one or many) become one engine
//! job per choice (n per prompt, choice index = prompt * n + j, seed + j); their events come
//! back as one JSON response or as Server-Sent Events, in OpenAI's legacy shape, with
//! `logprobs` (tokens, token_logprobs, top_logprobs, text_offset) and `echo`. The submission
//! and collection of choices is shared with `chat`.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::api::{bad_request, completion_id, error, now, parse_completion, ready_with_body};
use crate::api::{Completion, Prompt};
use crate::engine::{Event, Job, TokenInfo};
use crate::{AppState, Ready, Shared};

/// A text prompt's tokens, or 413 when it has more than `--max-prompt-tokens` (found without
/// tokenizing all of a huge prompt).
pub(crate) fn tokenize_prompt(
    s: &AppState,
    ready: &Ready,
    text: &str,
) -> Result<Vec<u32>, Box<Response>> {
    let limit = s.cfg.max_prompt_tokens;
    match ready.generator.tokenizer.encode_limited(text, limit) {
        Ok(Ok(ids)) => Ok(ids),
        Ok(Err(n)) => Err(Box::new(too_long(n, limit, "at least "))),
        Err(e) => Err(Box::new(bad_request(e.to_string()))),
    }
}

fn too_long(n: usize, limit: usize, at_least: &str) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the prompt has {at_least}{n} tokens; this server accepts at most {limit} \
             (--max-prompt-tokens)"
        ),
        "invalid_request_error",
    )
}

/// The request's choices, submitted to the engine: one receiver for all of them.
pub(crate) struct Submitted {
    pub(crate) rx: mpsc::UnboundedReceiver<(usize, Event)>,
    pub(crate) choices: usize,
    /// Prompt tokens of each prompt.
    pub(crate) prompt_tokens: Vec<usize>,
}

/// Tokenizes the prompts and queues `n` jobs per prompt; a full queue is a 503 with Retry-After.
pub(crate) fn submit(
    s: &AppState,
    ready: &Ready,
    req: &Completion,
    prompts: Vec<Vec<u32>>,
) -> Result<Submitted, Box<Response>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let score_prompt = req.echo && req.logprobs.is_some();
    let mut prompt_tokens = Vec::new();
    for (p, prompt) in prompts.into_iter().enumerate() {
        if prompt.is_empty() {
            return Err(Box::new(bad_request("`prompt` has no tokens")));
        }
        if prompt.len() > s.cfg.max_prompt_tokens {
            return Err(Box::new(too_long(
                prompt.len(),
                s.cfg.max_prompt_tokens,
                "",
            )));
        }
        prompt_tokens.push(prompt.len());
        for j in 0..req.n {
            let mut params = req.params.clone();
            params.seed = params.seed.wrapping_add(j as u64);
            let job = Job {
                prompt: prompt.clone(),
                max_tokens: req.max_tokens,
                params,
                stop: req.stop.clone(),
                logprobs: req.logprobs,
                score_prompt,
                choice: p * req.n + j,
                session: req.session.clone(),
                events: tx.clone(),
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
                return Err(Box::new(r));
            }
        }
    }
    Ok(Submitted {
        rx,
        choices: prompt_tokens.len() * req.n,
        prompt_tokens,
    })
}

/// Everything one choice produced.
#[derive(Default)]
pub(crate) struct Choice {
    pub(crate) text: String,
    pub(crate) tokens: Vec<TokenInfo>,
    pub(crate) prompt_scores: Option<Vec<Option<TokenInfo>>>,
    pub(crate) finish_reason: &'static str,
    pub(crate) completion_tokens: usize,
}

/// Waits for every choice to finish.
pub(crate) async fn collect(sub: &mut Submitted) -> Result<Vec<Choice>, String> {
    let mut choices: Vec<Choice> = (0..sub.choices).map(|_| Choice::default()).collect();
    let mut open = sub.choices;
    while open > 0 {
        let Some((i, ev)) = sub.rx.recv().await else {
            return Err("the engine stopped".into());
        };
        let c = &mut choices[i];
        match ev {
            Event::Prompt(scores) => c.prompt_scores = Some(scores),
            Event::Text { text, tokens } => {
                c.text.push_str(&text);
                c.tokens.extend(tokens);
            }
            Event::Done {
                finish_reason,
                completion_tokens,
                ..
            } => {
                c.finish_reason = finish_reason;
                c.completion_tokens = completion_tokens;
                open -= 1;
            }
            Event::Error(e) => return Err(e),
        }
    }
    Ok(choices)
}

/// Streams the choices' events as Server-Sent Events: `render` turns each event into JSON
/// chunks; when every choice is done, `finish(completion tokens)` gives the closing chunks
/// (usage); then `[DONE]`. A task forwards the events, so a client that goes away drops the
/// request's receiver and the engine cancels its choices at the next step.
pub(crate) fn sse(
    mut sub: Submitted,
    mut render: impl FnMut(usize, Event) -> Vec<Value> + Send + 'static,
    finish: impl FnOnce(usize) -> Vec<Value> + Send + 'static,
) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let (mut open, mut generated) = (sub.choices, 0);
        while open > 0 {
            let next = tokio::select! {
                ev = sub.rx.recv() => ev,
                _ = tx.closed() => return,
            };
            let Some((i, ev)) = next else {
                break;
            };
            match &ev {
                Event::Done {
                    completion_tokens, ..
                } => {
                    open -= 1;
                    generated += completion_tokens;
                }
                Event::Error(_) => open = 0,
                _ => {}
            }
            for c in render(i, ev) {
                if tx.send(c.to_string()).is_err() {
                    return;
                }
            }
        }
        for c in finish(generated) {
            let _ = tx.send(c.to_string());
        }
        let _ = tx.send("[DONE]".to_string());
    });
    let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
        .map(|d| Ok::<_, Infallible>(SseEvent::default().data(d)));
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// The `finish` of `sse` for both endpoints: with `stream_options.include_usage`, one last chunk
/// (`closing`, without choices) that carries the usage; otherwise nothing.
pub(crate) fn usage_chunk(
    mut closing: Value,
    include_usage: bool,
    prompt: usize,
) -> impl FnOnce(usize) -> Vec<Value> + Send + 'static {
    move |generated| {
        if !include_usage {
            return vec![];
        }
        closing["choices"] = json!([]);
        closing["usage"] = usage(prompt, generated);
        vec![closing]
    }
}

/// OpenAI's usage object.
pub(crate) fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

/// Legacy logprobs: parallel lists over (echoed prompt tokens, then) generated tokens; offsets
/// count bytes of the returned text from `offset`.
fn legacy_logprobs(
    prompt: Option<&[Option<TokenInfo>]>,
    tokens: &[TokenInfo],
    offset: usize,
) -> Value {
    let (mut toks, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
    let mut at = offset;
    let top = |t: &TokenInfo| -> Value {
        Value::Object(t.top.iter().map(|(s, lp)| (s.clone(), json!(lp))).collect())
    };
    for p in prompt.unwrap_or_default() {
        // A prompt token's text is in the (echoed) prompt whatever its score.
        match p {
            Some(t) => {
                toks.push(json!(t.text));
                lps.push(json!(t.logprob));
                tops.push(top(t));
                offs.push(json!(at));
                at += t.text.len();
            }
            None => {
                toks.push(Value::Null);
                lps.push(Value::Null);
                tops.push(Value::Null);
                offs.push(json!(at));
            }
        }
    }
    for t in tokens {
        toks.push(json!(t.text));
        lps.push(json!(t.logprob));
        tops.push(top(t));
        offs.push(json!(at));
        at += t.text.len();
    }
    json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
}

pub(crate) async fn completions(
    State(s): State<Shared>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let (ready, m) = match ready_with_body(&s, body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let vocab = ready.generator.runtime.cfg.vocab_size;
    let req = match parse_completion(&m, s.cfg.max_tokens_cap, vocab) {
        Ok(r) => r,
        Err(e) => return e.response(),
    };
    let tok = &ready.generator.tokenizer;
    let mut prompts = Vec::new();
    let mut texts = Vec::new();
    for p in &req.prompts {
        let (ids, text) = match p {
            Prompt::Text(t) => match tokenize_prompt(&s, ready, t) {
                Ok(ids) => (ids, t.clone()),
                Err(r) => return *r,
            },
            Prompt::Tokens(ids) => (ids.clone(), tok.decode(ids).unwrap_or_default()),
        };
        prompts.push(ids);
        texts.push(text);
    }
    let mut sub = match submit(&s, ready, &req, prompts) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let (id, created, model) = (completion_id(), now(), s.cfg.model_name.clone());
    let logprobs = req.logprobs.is_some();
    if req.stream {
        let (n, echo, include_usage) = (req.n, req.echo, req.include_usage);
        let prompt_total: usize = sub.prompt_tokens.iter().sum();
        let mut offsets = vec![0usize; sub.choices];
        let mut first = vec![true; sub.choices];
        let head =
            json!({"id": id, "object": "text_completion", "created": created, "model": model});
        let chunk = move |i: usize, text: &str, lp: Value, finish: Option<&str>| {
            let mut c = head.clone();
            c["choices"] =
                json!([{"text": text, "index": i, "logprobs": lp, "finish_reason": finish}]);
            if include_usage {
                c["usage"] = Value::Null;
            }
            c
        };
        let closing = chunk(0, "", Value::Null, None);
        let render = move |i: usize, ev: Event| -> Vec<Value> {
            let c = match ev {
                Event::Prompt(scores) => {
                    let text = &texts[i / n];
                    offsets[i] = text.len();
                    first[i] = false;
                    chunk(i, text, legacy_logprobs(Some(&scores), &[], 0), None)
                }
                Event::Text { text, tokens } => {
                    let mut out = String::new();
                    if echo && std::mem::take(&mut first[i]) {
                        out.push_str(&texts[i / n]);
                        offsets[i] = out.len();
                    }
                    out.push_str(&text);
                    let lp = if logprobs {
                        let v = legacy_logprobs(None, &tokens, offsets[i]);
                        offsets[i] += tokens.iter().map(|t| t.text.len()).sum::<usize>();
                        v
                    } else {
                        Value::Null
                    };
                    chunk(i, &out, lp, None)
                }
                Event::Done { finish_reason, .. } => {
                    let text = if echo && first[i] {
                        texts[i / n].clone()
                    } else {
                        String::new()
                    };
                    chunk(i, &text, Value::Null, Some(finish_reason))
                }
                Event::Error(e) => json!({"error": {"message": e, "type": "server_error"}}),
            };
            vec![c]
        };
        let finish = usage_chunk(closing, include_usage, prompt_total);
        return sse(sub, render, finish);
    }
    let choices = match collect(&mut sub).await {
        Ok(c) => c,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e, "server_error"),
    };
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let out: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let prompt_text = &texts[i / req.n];
            let (text, offset) = if req.echo {
                (format!("{prompt_text}{}", c.text), prompt_text.len())
            } else {
                (c.text, 0)
            };
            let lp = if logprobs {
                legacy_logprobs(
                    c.prompt_scores.as_deref(),
                    &c.tokens,
                    if c.prompt_scores.is_some() { 0 } else { offset },
                )
            } else {
                Value::Null
            };
            json!({"text": text, "index": i, "logprobs": lp, "finish_reason": c.finish_reason})
        })
        .collect();
    let prompt: usize = sub.prompt_tokens.iter().sum();
    Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": out, "usage": usage(prompt, completion),
    }))
    .into_response()
}
