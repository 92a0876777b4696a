//! `itera prune` and `itera distill` end to end: a pruned model (uneven expert counts, top_k
//! shrunk) loads in every command and in the server; healing and distillation train through the
//! ordinary trainer; bad requests are refused without touching any file.

use std::path::Path;

mod common;
use common::*;

fn shipped() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/itera-lite-tiny")
        .display()
        .to_string()
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap()
}

#[test]
fn a_pruned_model_runs_in_every_command_and_the_server() {
    let (m, f, dir) = (shipped(), fixture(), tmp());
    let f = f.to_str().unwrap();
    let out = dir.join("pruned-3-1-2-4");
    let _ = std::fs::remove_dir_all(&out);
    let o = out.to_str().unwrap();
    let run = itera(&[
        "prune",
        "--model",
        &m,
        "--data",
        f,
        "--tokens",
        "1500",
        "--keep-per-layer",
        "3,1,2,4",
        "--method",
        "frequency",
        "--merge-units",
        "--out",
        o,
        "--report",
        "--json",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("top_k shrinks from 2 to 1"), "{err}");
    let v = json(&String::from_utf8_lossy(&run.stdout));
    assert_eq!(v["experts_per_layer"], serde_json::json!([3, 1, 2, 4]));
    assert_eq!(v["refit"], serde_json::json!(0.001));
    assert_eq!(v["merge_units"], serde_json::json!(true));
    let per_expert = 3 * 128 * 128 + 128;
    assert_eq!(
        v["parameters_before"].as_u64().unwrap() - v["parameters_after"].as_u64().unwrap(),
        6 * per_expert
    );
    assert!(out.join("routing.png").is_file());
    // The kept expert of the one-expert layer is the one routed most often.
    let kept = v["kept_experts"][1][0].as_u64().unwrap();
    assert!(kept < 4);

    let inspect = ok(&["inspect", "--model", o]);
    assert!(
        inspect.contains("experts per layer [3, 1, 2, 4], top-1"),
        "{inspect}"
    );
    let text = ok(&[
        "generate",
        "--model",
        o,
        "--prompt",
        "The",
        "--max-tokens",
        "8",
        "--seed",
        "1",
    ]);
    assert!(!text.trim().is_empty());
    let e = json(&ok(&["eval", "--model", o, "--data", f, "--json"]));
    assert!(e["bits_per_byte"].as_f64().unwrap().is_finite());
    let q = dir.join("pruned-3-1-2-4.q8_0.gguf");
    ok(&[
        "quantize",
        "--model",
        o,
        "--scheme",
        "q8_0",
        "--out",
        q.to_str().unwrap(),
    ]);
    let eq = json(&ok(&[
        "eval",
        "--model",
        q.to_str().unwrap(),
        "--data",
        f,
        "--json",
    ]));
    let (a, b) = (
        e["bits_per_byte"].as_f64().unwrap(),
        eq["bits_per_byte"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 0.01 * a, "q8_0 {b} vs f32 {a}");
    ok(&[
        "bench",
        "--model",
        q.to_str().unwrap(),
        "--quick",
        "--only",
        "decode",
    ]);
    let onnx = dir.join("pruned-onnx");
    ok(&["export", "--model", o, "--out", onnx.to_str().unwrap()]);
    assert!(onnx.join("step.onnx").is_file());
    let server = Server::start(&["--model", q.to_str().unwrap()]);
    let (status, r) = server.request(
        "POST",
        "/v1/completions",
        r#"{"prompt": "It was", "max_tokens": 5, "temperature": 0}"#,
    );
    assert_eq!(status, 200, "{r}");

    // A GGUF straight from prune, with dynamic skipping chosen from the calibration text.
    let g = dir.join("pruned-skip.q4_0.gguf");
    let _ = std::fs::remove_file(&g);
    let v = json(&ok(&[
        "prune",
        "--model",
        &m,
        "--data",
        f,
        "--tokens",
        "1500",
        "--drop",
        "1",
        "--method",
        "reap",
        "--skip-beta",
        "auto",
        "--out",
        g.to_str().unwrap(),
        "--type",
        "q4_0",
        "--json",
    ]));
    let beta = v["moe_skip_beta"].as_f64().unwrap();
    assert!(beta > 0.0 && beta < 1.0, "{beta}");
    assert_eq!(v["experts_per_layer"], serde_json::json!([3, 3, 3, 3]));
    ok(&[
        "generate",
        "--model",
        g.to_str().unwrap(),
        "--prompt",
        "The",
        "--max-tokens",
        "4",
    ]);
}

#[test]
fn healing_and_distillation_train_and_bad_requests_touch_nothing() {
    let (m, f, dir) = (shipped(), fixture(), tmp());
    let f = f.to_str().unwrap();
    let healed = dir.join("healed");
    let _ = std::fs::remove_dir_all(&healed);
    let _ = std::fs::remove_dir_all(dir.join("healed.heal"));
    let h = healed.to_str().unwrap();
    let v = json(&ok(&[
        "prune",
        "--model",
        &m,
        "--data",
        f,
        "--tokens",
        "1500",
        "--drop",
        "2",
        "--method",
        "gate",
        "--out",
        h,
        "--heal-steps",
        "3",
        "--heal",
        "router",
        "--heal-kl",
        "0.5",
        "--heal-batch-size",
        "2",
        "--heal-seq-len",
        "32",
        "--heal-ema",
        "0.5",
        "--json",
    ]));
    assert_eq!(v["experts_per_layer"], serde_json::json!([2, 2, 2, 2]));
    let metrics = std::fs::read_to_string(dir.join("healed.heal/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"kl\"")).count(), 3);
    // With --heal-ema the result is the average, which the heal run's best/ also holds, not the
    // last weights (checkpoint/).
    let score = |m: &str| {
        json(&ok(&["eval", "--model", m, "--data", f, "--json"]))["bits_per_byte"].clone()
    };
    let best = dir.join("healed.heal/best");
    let last = dir.join("healed.heal/checkpoint");
    assert_eq!(score(h), score(best.to_str().unwrap()));
    assert_ne!(score(h), score(last.to_str().unwrap()));

    // Distil the micro test model into a half-width student, then resume it.
    let teacher = model().to_str().unwrap().to_string();
    let student_cfg = dir.join("student.json");
    let mut cfg = json(&std::fs::read_to_string(model().join("config.json")).unwrap());
    cfg["expert_hidden"] = serde_json::json!(32);
    std::fs::write(&student_cfg, cfg.to_string()).unwrap();
    let run = dir.join("distil-run");
    let _ = std::fs::remove_dir_all(&run);
    let r = run.to_str().unwrap();
    let common = [
        "--data",
        f,
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--warmup",
        "1",
        "--eval-every",
        "2",
        "--eval-windows",
        "4",
        "--holdout",
        "0.1",
        "--run",
        r,
    ];
    let mut args = vec![
        "distill",
        "--teacher",
        &teacher,
        "--student-config",
        student_cfg.to_str().unwrap(),
        "--temperature",
        "2",
        "--alpha",
        "0.5",
        "--kl",
        "reverse",
    ];
    args.extend(common);
    let mut first = args.clone();
    let steps = first.iter().position(|a| *a == "4").unwrap();
    first[steps] = "2";
    ok(&first);
    let resumed = json(&ok(&["distill", "--resume", r, "--steps", "4", "--json"]));
    assert_eq!(resumed["step"], 4);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"kl\"")).count(), 4);
    assert!(run.join("loss.png").is_file());
    let before = std::fs::read(run.join("checkpoint/model.safetensors")).unwrap();

    // Bad requests: clear errors, no panic, nothing written or overwritten.
    let shipped_tok = format!("{m}/tokenizer.json");
    let out = dir.join("never");
    let o = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "prune", "--model", &m, "--data", f, "--drop", "4", "--out", o,
            ],
            "at least one must remain",
        ),
        (
            vec![
                "prune", "--model", &m, "--data", f, "--drop", "7", "--out", o,
            ],
            "cannot drop 7",
        ),
        (
            vec![
                "prune",
                "--model",
                &teacher,
                "--data",
                f,
                "--keep-per-layer",
                "1,1",
                "--out",
                o,
            ],
            "counts for",
        ),
        (
            vec![
                "prune", "--model", &m, "--data", f, "--drop", "1", "--out", h,
            ],
            "already exists",
        ),
        (
            vec![
                "prune", "--model", &m, "--data", f, "--drop", "1", "--method", "magic", "--out", o,
            ],
            "unknown pruning method",
        ),
        (
            vec![
                "prune",
                "--model",
                &m,
                "--data",
                f,
                "--drop",
                "1",
                "--method",
                "reap",
                "--score-refitted",
                "--merge-units",
                "--out",
                o,
            ],
            "--score-refitted applies to --method search",
        ),
        (
            vec![
                "distill",
                "--teacher",
                &teacher,
                "--temperature",
                "0",
                "--data",
                f,
                "--run",
                o,
            ],
            "temperature",
        ),
        (
            vec![
                "distill",
                "--teacher",
                &teacher,
                "--alpha",
                "1.5",
                "--data",
                f,
                "--run",
                o,
            ],
            "alpha",
        ),
        (
            vec![
                "distill",
                "--teacher",
                &teacher,
                "--student-preset",
                "tiny",
                "--data",
                f,
                "--run",
                o,
            ],
            "larger than its teacher",
        ),
        (
            vec![
                "distill",
                "--teacher",
                &teacher,
                "--tokenizer",
                &shipped_tok,
                "--data",
                f,
                "--run",
                o,
            ],
            "different tokenizer",
        ),
        (
            vec!["distill", "--resume", r, "--steps", "4"],
            "already at step 4",
        ),
    ];
    for (args, want) in cases {
        let err = fails(&args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A model without MoE layers has nothing to prune.
    let dense_cfg = dir.join("dense.json");
    let mut c = json(&std::fs::read_to_string(model().join("config.json")).unwrap());
    c["moe_layers"] = serde_json::json!([]);
    c["ffn_hidden"] = serde_json::json!(32);
    std::fs::write(&dense_cfg, c.to_string()).unwrap();
    let dense = dir.join("dense-run");
    let _ = std::fs::remove_dir_all(&dense);
    ok(&[
        "train",
        "--config",
        dense_cfg.to_str().unwrap(),
        "--data",
        f,
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-windows",
        "2",
        "--holdout",
        "0.1",
        "--run",
        dense.to_str().unwrap(),
    ]);
    let d = dense.join("checkpoint");
    let err = fails(&[
        "prune",
        "--model",
        d.to_str().unwrap(),
        "--data",
        f,
        "--drop",
        "1",
        "--out",
        o,
    ]);
    assert!(err.contains("no MoE layers"), "{err}");
    assert!(!out.exists());
    assert_eq!(
        std::fs::read(run.join("checkpoint/model.safetensors")).unwrap(),
        before
    );
}
