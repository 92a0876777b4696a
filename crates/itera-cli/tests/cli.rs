//! End-to-end runs of the `itera` binary on a tiny model trained from the committed fixture.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn itera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_itera"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = itera(args);
    assert!(
        out.status.success(),
        "itera {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its error message.
fn fails(args: &[&str]) -> String {
    let out = itera(args);
    assert!(!out.status.success(), "itera {args:?} should have failed");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "itera {args:?} panicked: {err}");
    err
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/english.txt")
}

fn tmp() -> PathBuf {
    let d = std::env::temp_dir().join(format!("itera-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A micro model trained for a few steps, shared by the tests of this file.
fn model() -> &'static PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = tmp();
        let tok = dir.join("tok.json");
        let run = dir.join("run");
        let _ = std::fs::remove_dir_all(&run);
        let f = fixture();
        ok(&[
            "tokenizer",
            "train",
            "--data",
            f.to_str().unwrap(),
            "--vocab",
            "400",
            "--out",
            tok.to_str().unwrap(),
        ]);
        let out = ok(&[
            "train",
            "--preset",
            "micro",
            "--data",
            f.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--steps",
            "12",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--warmup",
            "2",
            "--eval-every",
            "6",
            "--eval-windows",
            "8",
            "--holdout",
            "0.1",
            "--run",
            run.to_str().unwrap(),
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["step"], 12);
        assert!(run.join("metrics.jsonl").is_file() && run.join("loss.png").is_file());
        run.join("checkpoint")
    })
}

#[test]
fn generate_is_deterministic_per_seed_and_greedy_at_zero_temperature() {
    let m = model().to_str().unwrap();
    let gen = |seed: &str, temp: &str| {
        ok(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "It was",
            "--max-tokens",
            "20",
            "--seed",
            seed,
            "--temperature",
            temp,
        ])
    };
    assert_eq!(gen("1", "1.0"), gen("1", "1.0"));
    assert_ne!(gen("1", "1.0"), gen("2", "1.0"));
    assert_eq!(gen("1", "0"), gen("2", "0"));
    assert!(gen("1", "0").starts_with("It was"));
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "She",
        "--max-tokens",
        "5",
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["generated_tokens"], 5);
}

#[test]
fn eval_reports_consistent_numbers() {
    let m = model().to_str().unwrap();
    let f = fixture();
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        m,
        "--data",
        f.to_str().unwrap(),
        "--word-level",
        "--json",
    ]))
    .unwrap();
    let (nll, tokens, bytes) = (
        v["mean_nll"].as_f64().unwrap(),
        v["tokens"].as_f64().unwrap(),
        v["bytes"].as_f64().unwrap(),
    );
    assert!(nll > 0.5 && nll < 7.0, "mean NLL {nll}");
    assert!((v["token_perplexity"].as_f64().unwrap() - nll.exp()).abs() < 1e-6 * nll.exp());
    let bpb = nll * tokens / (bytes * std::f64::consts::LN_2);
    assert!((v["bits_per_byte"].as_f64().unwrap() - bpb).abs() < 1e-9);
    let words = v["words"].as_f64().unwrap() + v["lines"].as_f64().unwrap();
    assert!(
        (v["word_perplexity"].as_f64().unwrap() - (nll * tokens / words).exp()).abs()
            < 1e-6 * v["word_perplexity"].as_f64().unwrap()
    );
}

#[test]
fn inspect_counts_parameters() {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", "--preset", "tiny", "--json"])).unwrap();
    let total = v["parameters"].as_u64().unwrap();
    assert!((1_500_000..=2_000_000).contains(&total));
    let groups: u64 = v["groups"]
        .as_object()
        .unwrap()
        .values()
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(groups, total);
    let text = ok(&["inspect", "--model", model().to_str().unwrap()]);
    assert!(text.contains("experts") && text.contains("total"));
}

#[test]
fn bad_input_gives_clear_errors() {
    let m = model().to_str().unwrap();
    let dir = tmp();
    assert!(
        fails(&["generate", "--model", "/nonexistent/model", "--prompt", "x"])
            .contains("/nonexistent/model")
    );
    assert!(fails(&["generate", "--model", m, "--prompt", ""]).contains("prompt is empty"));
    assert!(fails(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "x",
        "--temperature=-1"
    ])
    .contains("temperature"));
    assert!(
        fails(&["generate", "--model", m, "--prompt", "x", "--top-p", "1.5"]).contains("top_p")
    );
    assert!(fails(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "x",
        "--max-tokens",
        "99999999999"
    ])
    .contains("max_tokens"));
    // A corrupt copy of the model: truncated weights, then a config that does not match them.
    let bad = dir.join("bad-model");
    let _ = std::fs::remove_dir_all(&bad);
    std::fs::create_dir_all(&bad).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(model().join(f), bad.join(f)).unwrap();
    }
    let weights = std::fs::read(bad.join("model.safetensors")).unwrap();
    std::fs::write(bad.join("model.safetensors"), &weights[..weights.len() / 3]).unwrap();
    assert!(fails(&[
        "generate",
        "--model",
        bad.to_str().unwrap(),
        "--prompt",
        "x"
    ])
    .contains("model.safetensors"));
    std::fs::write(bad.join("model.safetensors"), &weights).unwrap();
    let cfg = std::fs::read_to_string(bad.join("config.json"))
        .unwrap()
        .replace("\"d_model\": 32", "\"d_model\": 48");
    std::fs::write(bad.join("config.json"), cfg).unwrap();
    let err = fails(&[
        "eval",
        "--model",
        bad.to_str().unwrap(),
        "--data",
        fixture().to_str().unwrap(),
    ]);
    assert!(
        err.contains("shape") && err.contains("embed.weight"),
        "{err}"
    );
    // Unreadable data: missing, invalid UTF-8, empty.
    assert!(
        fails(&["eval", "--model", m, "--data", "/nonexistent.txt"]).contains("/nonexistent.txt")
    );
    let latin1 = dir.join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait\n").unwrap();
    assert!(fails(&["eval", "--model", m, "--data", latin1.to_str().unwrap()]).contains("UTF-8"));
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    assert!(fails(&[
        "train",
        "--preset",
        "micro",
        "--data",
        empty.to_str().unwrap(),
        "--steps",
        "1"
    ])
    .contains("empty"));
    assert!(fails(&[
        "train",
        "--preset",
        "nope",
        "--data",
        fixture().to_str().unwrap()
    ])
    .contains("unknown preset"));
    assert!(fails(&["train", "--resume", dir.join("no-run").to_str().unwrap()]).contains("no-run"));
}
