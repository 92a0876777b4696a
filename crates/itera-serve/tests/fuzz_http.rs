//! Property-based fuzzing of the HTTP API: random methods, paths, headers and JSON bodies built
//! from the parameters the server knows, values of every kind, and random bytes. Every request
//! must get a 2xx or a 4xx in OpenAI's error shape (never a 5xx, a panic or a dropped
//! connection), and the server must stay healthy. Seeded; `ITERA_FUZZ_CASES=N` runs more.

mod common;

use common::{http, shipped_model, start};
use itera_serve::ServeConfig;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Value};

fn cases() -> u32 {
    std::env::var("ITERA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

const KEYS: &[&str] = &[
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "logprobs",
    "top_logprobs",
    "echo",
    "stream",
    "stream_options",
    "stop",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "allow_placeholders",
    "logit_bias",
    "seed",
    "suffix",
    "best_of",
    "user",
    "model",
    "content",
    "tokens",
    "role",
    "include_usage",
    "frobnicate",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..40).prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN", |v| v.is_finite())
            .prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::from),
        prop::sample::select(vec![
            "user",
            "system",
            "assistant",
            "Hello",
            "",
            "\u{0}",
            "日本"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS.to_vec()), inner), 0..6).prop_map(
                |kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            ),
        ]
    })
}

/// A valid request of one endpoint with up to three fields set to random values: the shape that
/// gets deepest into the handlers (sampling options, penalties, logprobs, stops, streaming).
fn valid_with_edits() -> impl Strategy<Value = String> {
    let base = prop::sample::select(vec![
        json!({"prompt": "Once upon a time", "max_tokens": 4}),
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        json!({"content": "Hello there"}),
        json!({"tokens": [1, 2, 3]}),
    ]);
    let edits = prop::collection::vec((prop::sample::select(KEYS.to_vec()), json_value()), 0..4);
    (base, edits).prop_map(|(mut b, edits)| {
        for (k, v) in edits {
            b[k] = v;
        }
        b.to_string()
    })
}

fn body() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => valid_with_edits(),
        // A request object of known keys (the likely shape, to get past the first checks).
        2 => prop::collection::vec((prop::sample::select(KEYS.to_vec()), json_value()), 0..8).prop_map(
            |kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()).to_string()
            }
        ),
        1 => json_value().prop_map(|v| v.to_string()),
        1 => "\\PC{0,64}",
        1 => prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

#[test]
fn random_requests_get_2xx_or_openai_shaped_4xx() {
    let addr = start(ServeConfig {
        model: shipped_model(),
        max_tokens_cap: 16,
        ..ServeConfig::default()
    });
    // Mostly POSTs to the handlers that parse bodies, so most cases get past routing.
    let handlers = vec![
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/detokenize",
    ];
    let others = vec![
        "/v1/models",
        "/health",
        "/metrics",
        "/",
        "/v1/nope",
        "/v1/completions/",
        "//v1//completions",
    ];
    let strategy = (
        prop_oneof![
            6 => Just("POST"),
            1 => prop::sample::select(vec!["GET", "PUT", "DELETE", "OPTIONS"]),
        ],
        prop_oneof![
            6 => prop::sample::select(handlers),
            1 => prop::sample::select(others),
        ],
        body(),
        prop::sample::select(vec![
            "application/json",
            "text/plain",
            "application/x-www-form-urlencoded",
            "",
        ]),
    );
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: cases(),
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let statuses = std::cell::RefCell::new(std::collections::BTreeMap::<u16, usize>::new());
    runner
        .run(&strategy, |(method, path, body, ctype)| {
            let headers: Vec<(&str, &str)> = if ctype.is_empty() {
                vec![]
            } else {
                vec![("Content-Type", ctype)]
            };
            let (status, _, text) = http(addr, method, path, &headers, &body);
            *statuses.borrow_mut().entry(status).or_default() += 1;
            prop_assert!(status < 500, "{method} {path} {body:?} -> {status}: {text}");
            if status >= 400 && status != 405 {
                let v: Value = serde_json::from_str(&text).unwrap_or(json!({}));
                prop_assert!(
                    v["error"]["message"].is_string(),
                    "{method} {path} {body:?} -> {status}: {text}"
                );
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(http(addr, "GET", "/health", &[], "").0, 200);
    // The fuzzing reached the handlers, not only the front door.
    let statuses = statuses.into_inner();
    eprintln!("{} requests by status: {statuses:?}", cases());
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > 10,
        "{statuses:?}"
    );
    assert!(
        statuses.get(&400).copied().unwrap_or(0) > 10,
        "{statuses:?}"
    );
}
