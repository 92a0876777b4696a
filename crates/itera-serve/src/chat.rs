//! `POST /v1/chat/completions`: the messages are rendered into one prompt with the model's chat
//! template (a Jinja `chat_template` from its config or GGUF metadata, Hugging Face's
//! convention) or, for our base models, the plain default below; the completion then runs like
//! `/v1/completions` and answers in OpenAI's chat shape (`chat.completion`, or
//! `chat.completion.chunk` events when streamed).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::api::{error, now, parse_chat, ready_with_body, Message};
use crate::completions::{collect, sse, submit, tokenize_prompt, usage, usage_chunk};
use crate::engine::{Event, TokenInfo};
use crate::Shared;

/// The default template: one `Role: content` line per message, then `Assistant:` for the
/// model to continue. Plain text, as a base model saw in training.
pub const DEFAULT_TEMPLATE: &str = "{%- for m in messages -%}\n{{ m.role | capitalize }}: {{ m.content }}\n{% endfor -%}\n{%- if add_generation_prompt %}Assistant:{% endif -%}";

/// With the default template, the reply ends where the model starts another speaker's line.
const DEFAULT_STOPS: [&str; 2] = ["\nUser:", "\nSystem:"];

/// Renders the conversation with `template` (bounded work: a template from a model file is
/// not trusted to terminate).
pub fn render(template: &str, messages: &[(String, String)]) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_fuel(Some(200_000));
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| format!("the model's chat template does not parse: {e}"))?;
    let msgs: Vec<minijinja::Value> = messages
        .iter()
        .map(|(role, content)| {
            minijinja::Value::from_pairs([("role", role.as_str()), ("content", content.as_str())])
        })
        .collect();
    env.get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => msgs, add_generation_prompt => true, bos_token => "", eos_token => "<|endoftext|>"
            })
        })
        .map_err(|e| format!("rendering the chat template failed: {e}"))
}

fn chat_logprobs(tokens: &[TokenInfo]) -> Value {
    let entry =
        |text: &str, lp: f32| json!({"token": text, "logprob": lp, "bytes": text.as_bytes()});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(&t.text, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|(s, lp)| entry(s, *lp)).collect();
            e
        })
        .collect();
    json!({"content": content})
}

pub(crate) async fn chat_completions(
    State(s): State<Shared>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let (ready, m) = match ready_with_body(&s, body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let vocab = ready.generator.runtime.cfg.vocab_size;
    let (messages, mut req) = match parse_chat(&m, s.cfg.max_tokens_cap, vocab) {
        Ok(r) => r,
        Err(e) => return e.response(),
    };
    let template = ready.generator.runtime.cfg.chat_template.as_deref();
    let pairs: Vec<(String, String)> = messages
        .into_iter()
        .map(|Message { role, content }| (role, content))
        .collect();
    let prompt = match render(template.unwrap_or(DEFAULT_TEMPLATE), &pairs) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, e, "invalid_request_error"),
    };
    if template.is_none() {
        req.stop.extend(DEFAULT_STOPS.map(String::from));
    }
    let ids = match tokenize_prompt(&s, ready, &prompt) {
        Ok(ids) => ids,
        Err(r) => return *r,
    };
    let mut sub = match submit(&s, ready, &req, vec![ids]) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let (id, created, model) = (
        crate::api::completion_id().replacen("cmpl", "chatcmpl", 1),
        now(),
        s.cfg.model_name.clone(),
    );
    let prompt_tokens = sub.prompt_tokens[0];
    if req.stream {
        let include_usage = req.include_usage;
        let logprobs = req.logprobs.is_some();
        let mut started = vec![false; sub.choices];
        let head = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model});
        let chunk = move |i: usize, delta: Value, lp: Value, finish: Option<&str>| {
            let mut c = head.clone();
            c["choices"] =
                json!([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]);
            if include_usage {
                c["usage"] = Value::Null;
            }
            c
        };
        let closing = chunk(0, json!({}), Value::Null, None);
        let render = move |i: usize, ev: Event| -> Vec<Value> {
            let mut out = Vec::new();
            if !std::mem::replace(&mut started[i], true) {
                out.push(chunk(
                    i,
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    None,
                ));
            }
            match ev {
                Event::Text { text, tokens } => {
                    let lp = if logprobs {
                        chat_logprobs(&tokens)
                    } else {
                        Value::Null
                    };
                    out.push(chunk(i, json!({"content": text}), lp, None));
                }
                Event::Done { finish_reason, .. } => {
                    out.push(chunk(i, json!({}), Value::Null, Some(finish_reason)))
                }
                Event::Error(e) => {
                    out.push(json!({"error": {"message": e, "type": "server_error"}}))
                }
                Event::Prompt(_) => {}
            }
            out
        };
        let finish = usage_chunk(closing, include_usage, prompt_tokens);
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
            let lp = if req.logprobs.is_some() {
                chat_logprobs(&c.tokens)
            } else {
                Value::Null
            };
            json!({"index": i, "message": {"role": "assistant", "content": c.text},
                   "logprobs": lp, "finish_reason": c.finish_reason})
        })
        .collect();
    Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": out, "usage": usage(prompt_tokens, completion),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_template_renders_plain_turns_and_bad_templates_are_errors() {
        let msgs = [
            ("system".to_string(), "Be brief.".to_string()),
            ("user".to_string(), "Hello".to_string()),
        ];
        assert_eq!(
            render(DEFAULT_TEMPLATE, &msgs).unwrap(),
            "System: Be brief.\nUser: Hello\nAssistant:"
        );
        let custom = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>";
        assert_eq!(
            render(custom, &msgs).unwrap(),
            "<system>Be brief.<user>Hello<assistant>"
        );
        assert!(render("{% for %}", &msgs)
            .unwrap_err()
            .contains("does not parse"));
        assert!(render("{{ raise_exception('no system role') }}", &msgs)
            .unwrap_err()
            .contains("no system role"));
        // A template that never ends runs out of fuel instead of hanging the server.
        let endless =
            "{% for i in range(1000000) %}{% for j in range(1000000) %}x{% endfor %}{% endfor %}";
        assert!(render(endless, &msgs).is_err());
    }
}
