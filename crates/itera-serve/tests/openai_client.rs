//! The server as OpenAI's own Python client (`openai`, installed from PyPI into a test venv)
//! sees it: models, completions (plain, streamed, prompt lists, n > 1, logprobs + echo), chat
//! (plain and streamed), and OpenAI-shaped errors for bad requests. Plus the exactness of the
//! log-probabilities: echoed prompt scores sum to `itera eval`'s total NLL of the same tokens.

mod common;
#[path = "../../../tests/support/python.rs"]
mod python;

use common::{http, server, shipped_model, shipped_token_count};
use itera_core::eval::evaluate;
use itera_core::Generator;
use serde_json::{json, Value};

const CLIENT_SCRIPT: &str = r#"
import sys, json
import openai
from openai import OpenAI
c = OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
out = {}
out["models"] = [m.id for m in c.models.list().data]
r = c.completions.create(model="m", prompt="Once upon a time", max_tokens=12, temperature=0, seed=1)
out["plain"] = r.choices[0].text
out["plain_usage"] = [r.usage.prompt_tokens, r.usage.completion_tokens]
s = c.completions.create(model="m", prompt="Once upon a time", max_tokens=12, temperature=0, seed=1, stream=True)
out["streamed"] = "".join(ch.choices[0].text for ch in s if ch.choices)
r = c.completions.create(model="m", prompt=["It was", "The king"], max_tokens=5, n=2, temperature=0.9, seed=7)
out["list"] = sorted((ch.index, ch.finish_reason) for ch in r.choices)
r = c.completions.create(model="m", prompt="The cat sat", max_tokens=3, logprobs=2, echo=True, temperature=0)
lp = r.choices[0].logprobs
out["echo"] = {"text": r.choices[0].text, "tokens": lp.tokens, "token_logprobs": lp.token_logprobs,
               "top": [None if t is None else len(t) for t in lp.top_logprobs], "offsets": lp.text_offset}
r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me a story."}], max_completion_tokens=10, temperature=0, seed=2)
out["chat"] = [r.object, r.choices[0].message.role, r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens]
s = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=10, temperature=0, seed=2, stream=True, stream_options={"include_usage": True})
chunks = list(s)
out["chat_streamed"] = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
out["chat_stream_usage"] = [ch.usage.completion_tokens for ch in chunks if ch.usage][-1]
errors = {}
for name, kwargs in {
    "temperature": dict(model="m", prompt="x", temperature=5),
    "unknown": dict(model="m", prompt="x", extra_body={"frobnicate": 1}),
    "empty": dict(model="m", prompt=""),
}.items():
    try:
        c.completions.create(**kwargs)
        errors[name] = "accepted"
    except openai.BadRequestError as e:
        errors[name] = [e.status_code, e.body.get("type"), e.body.get("param"), e.body.get("message")]
out["errors"] = errors
print(json.dumps(out))
"#;

#[test]
fn the_official_openai_client_works_against_the_server() {
    let addr = server();
    let python = python::venv("openai", &["openai>=1.40,<3"]);
    let out = python::run(&python, CLIENT_SCRIPT, &[&format!("http://{addr}/v1")]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["models"], json!(["itera-lite-tiny"]));
    assert!(!v["plain"].as_str().unwrap().is_empty());
    assert_eq!(
        v["plain"], v["streamed"],
        "plain and streamed greedy text agree"
    );
    assert_eq!(
        v["plain_usage"],
        json!([shipped_token_count("Once upon a time"), 12])
    );
    // Two prompts x n = 2: four choices, indexed prompt * n + j.
    assert_eq!(
        v["list"],
        json!([[0, "length"], [1, "length"], [2, "length"], [3, "length"]])
    );
    let echo = &v["echo"];
    assert!(echo["text"].as_str().unwrap().starts_with("The cat sat"));
    let lps = echo["token_logprobs"].as_array().unwrap();
    assert!(lps[0].is_null(), "the first prompt token has no score");
    assert!(lps[1..].iter().all(|x| x.as_f64().unwrap() <= 0.0));
    assert_eq!(echo["top"][0], Value::Null);
    assert!(echo["top"].as_array().unwrap()[1..].iter().all(|t| t == 2));
    let offsets: Vec<u64> = echo["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    let chat = &v["chat"];
    assert_eq!(chat[0], "chat.completion");
    assert_eq!(chat[1], "assistant");
    assert_eq!(chat[2], v["chat_streamed"], "plain and streamed chat agree");
    assert_eq!(v["chat_stream_usage"], chat[4]);
    let errors = &v["errors"];
    assert_eq!(errors["temperature"][0], 400);
    assert_eq!(errors["temperature"][1], "invalid_request_error");
    assert_eq!(errors["temperature"][2], "temperature");
    assert!(errors["unknown"][3]
        .as_str()
        .unwrap()
        .contains("frobnicate"));
    assert_eq!(errors["empty"][2], "prompt");
}

/// Echoed prompt log-probabilities are the model's: their sum over a text equals `itera
/// eval`'s total log-likelihood of the same tokens (both condition the first on a newline).
#[test]
fn echo_logprobs_sum_to_the_evaluation_nll() {
    let addr = server();
    let g = Generator::load(&shipped_model()).unwrap();
    let text = "It is a truth universally acknowledged, that a single man in possession of a good \
                fortune, must be in want of a wife.\n";
    let start = g.tokenizer.encode("\n").unwrap();
    let ids = g.tokenizer.encode(text).unwrap();
    let report = evaluate(&g.runtime, &g.tokenizer, text, |_, _| {}).unwrap();
    let total_nll = report.mean_nll * report.tokens as f64;
    let prompt: Vec<u32> = start.iter().chain(&ids).copied().collect();
    let body = json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 0});
    let (status, _, text_out) = http(addr, "POST", "/v1/completions", &[], &body.to_string());
    assert_eq!(status, 200, "{text_out}");
    let v: Value = serde_json::from_str(&text_out).unwrap();
    let lps = v["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(lps.len(), prompt.len());
    let sum: f64 = lps[start.len()..].iter().map(|x| x.as_f64().unwrap()).sum();
    assert!(
        (sum + total_nll).abs() < 1e-4,
        "echo log-probabilities sum to {sum}, eval's total NLL is {total_nll}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 0);
}

/// A session continues where the previous request with its name stopped: the same text as one
/// request over the concatenated tokens.
#[test]
fn sessions_continue_from_the_state_a_request_ended_in() {
    let addr = server();
    let post = |body: Value| -> Value {
        let (status, _, text) = http(addr, "POST", "/v1/completions", &[], &body.to_string());
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    };
    let (p1, p2) = (vec![100, 200, 300], vec![400, 500]);
    // One forced token (logit bias) ends the first request: the session holds p1 + [42].
    post(
        json!({"prompt": p1, "max_tokens": 1, "temperature": 0, "logit_bias": {"42": 100}, "session": "s1"}),
    );
    let continued =
        post(json!({"prompt": p2, "max_tokens": 12, "temperature": 0, "session": "s1"}));
    let all: Vec<u32> = p1.iter().chain(&[42]).chain(&p2).copied().collect();
    let whole = post(json!({"prompt": all, "max_tokens": 12, "temperature": 0}));
    assert_eq!(continued["choices"][0]["text"], whole["choices"][0]["text"]);
    let (status, _, text) = http(
        addr,
        "POST",
        "/v1/completions",
        &[],
        &json!({"prompt": "x", "session": "bad name!"}).to_string(),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("session"));
}
