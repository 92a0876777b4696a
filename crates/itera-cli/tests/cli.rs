//! End-to-end runs of the `itera` binary on a tiny model trained from the committed fixture.

mod common;
#[path = "../../../tests/support/python.rs"]
mod python;
use common::*;

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
    // Several files: each scored as on its own, and a total over their summed bytes.
    let text = std::fs::read_to_string(&f).unwrap();
    let half = &text[..=text[..text.len() / 2].rfind('\n').unwrap()];
    let g = tmp().join("eval-half.txt");
    std::fs::write(&g, half).unwrap();
    let (f, g) = (f.to_str().unwrap(), g.to_str().unwrap());
    let one = |file: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&["eval", "--model", m, "--data", file, "--json"])).unwrap()
    };
    let both: serde_json::Value =
        serde_json::from_str(&ok(&["eval", "--model", m, "--data", f, g, "--json"])).unwrap();
    let files = both["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    for (r, file) in files.iter().zip([f, g]) {
        assert_eq!(r["data"], file);
        assert_eq!(r["bits_per_byte"], one(file)["bits_per_byte"]);
    }
    let bits = |r: &serde_json::Value| r["bits_per_byte"].as_f64().unwrap();
    let bytes = |r: &serde_json::Value| r["bytes"].as_f64().unwrap();
    let total = &both["total"];
    assert_eq!(bytes(total), bytes(&files[0]) + bytes(&files[1]));
    let weighted =
        (bits(&files[0]) * bytes(&files[0]) + bits(&files[1]) * bytes(&files[1])) / bytes(total);
    assert!((bits(total) - weighted).abs() < 1e-9);
    assert!(total.get("word_perplexity").is_none());
    // A missing second file is named, before any scoring.
    assert!(
        fails(&["eval", "--model", m, "--data", f, "/nonexistent-2.txt"])
            .contains("/nonexistent-2.txt")
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
        err.contains("shape") && err.contains("tensor `") && err.contains("expected"),
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

/// Every scheme writes a GGUF that `inspect`, `eval` and `generate` accept like a model directory;
/// q8_0 stays within 1% of f32 bits per byte, read in chunks (prefill's kernels) and one token at
/// a time (decode's); broken files give clear errors.
#[test]
fn quantized_gguf_models_run_everywhere() {
    let m = model().to_str().unwrap();
    let dir = tmp();
    let f = fixture();
    let eval_env = |env: &[(&str, &str)], model: &str, extra: &[&str]| -> f64 {
        let mut args = vec![
            "eval",
            "--model",
            model,
            "--data",
            f.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(&ok_with(env, &args)).unwrap();
        let protocol = if extra.is_empty() {
            "recurrent"
        } else {
            "stepwise"
        };
        assert_eq!(v["protocol"], protocol);
        v["bits_per_byte"].as_f64().unwrap()
    };
    let eval_with = |model: &str, extra: &[&str]| eval_env(&[], model, extra);
    let eval = |model: &str| eval_with(model, &[]);
    let base = eval(m);
    for scheme in ["f32", "f16", "bf16", "q8_0", "q5_0", "q4_0", "q4_1", "nf4"] {
        let out = dir.join(format!("m-{scheme}.gguf"));
        let o = out.to_str().unwrap();
        let v: serde_json::Value = serde_json::from_str(&ok(&[
            "quantize", "--model", m, "--scheme", scheme, "--out", o, "--json",
        ]))
        .unwrap();
        let bits = v["bits_per_weight"].as_f64().unwrap();
        let info: serde_json::Value =
            serde_json::from_str(&ok(&["inspect", "--model", o, "--json"])).unwrap();
        assert!((info["bits_per_weight"].as_f64().unwrap() - bits).abs() < 1e-9);
        let types: Vec<&str> = info["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["type"].as_str().unwrap())
            .collect();
        assert!(types.contains(&scheme), "{scheme}: {types:?}");
        let bound: f64 = match scheme {
            "f32" => 1e-6,
            "f16" | "bf16" | "q8_0" => 0.01,
            _ => 0.08,
        };
        for (bpb, how) in [
            (eval(o), "chunked"),
            (eval_with(o, &["--stepwise"]), "stepwise"),
        ] {
            // f32 one token at a time runs other kernels (matvecs): the same to rounding.
            let bound = if how == "stepwise" {
                bound.max(1e-5)
            } else {
                bound
            };
            assert!(
                (bpb - base).abs() / base < bound,
                "{scheme} {how}: {bpb} vs f32 {base}"
            );
        }
        if ["q8_0", "q5_0", "q4_0"].contains(&scheme) {
            // The AVX2 kernels on the same layout (on AVX-512 machines only through this switch)
            // score as the dispatched ones do, to the activations' rounding (Q8_0 takes -63..63
            // on AVX2): one token at a time and in chunks. (On the Xeon of 2026-12-03: at most
            // 3.6e-6 apart; 1.5e-3 with the AVX2 kernel reading one half line for both.)
            let avx2 = [("ITERA_SIMD", "avx2")];
            for extra in [&[][..], &["--stepwise"][..]] {
                let (here, there) = (eval_with(o, extra), eval_env(&avx2, o, extra));
                assert!(
                    (here - there).abs() / here < 1e-4,
                    "{scheme} {extra:?}: {here} vs {there} on AVX2"
                );
            }
        }
        let text = ok(&[
            "generate",
            "--model",
            o,
            "--prompt",
            "It was",
            "--max-tokens",
            "5",
        ]);
        assert!(text.starts_with("It was"));
    }
    // Fitted scales: the same file size and within 0.5% of ggml's reference rounding on the
    // shipped (trained) model. Their weight error is never larger (`dtype.rs`), but bits per byte
    // can go either way: on this text the shipped EN11 gains (1.39891 against 1.40096, f32
    // 1.38354) and EN13, a candidate not shipped, lost (1.39963 against 1.39704, f32 1.38239);
    // only for the symmetric formats.
    let shipped =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/itera-lite-tiny");
    let s = shipped.to_str().unwrap();
    let q4 = |name: &str, extra: &[&str]| -> (u64, f64) {
        let path = dir.join(name);
        let p = path.to_str().unwrap();
        let mut args = vec!["quantize", "--model", s, "--scheme", "q4_0", "--out", p];
        args.extend_from_slice(extra);
        ok(&args);
        (std::fs::metadata(&path).unwrap().len(), eval(p))
    };
    let (reference, fitted) = (q4("s-ref.gguf", &[]), q4("s-fit.gguf", &["--fit-scales"]));
    let shipped_f32 = eval(s);
    assert_eq!(reference.0, fitted.0);
    assert!(
        (fitted.1 - reference.1).abs() < 0.005 * reference.1 && fitted.1 > shipped_f32,
        "fitted {fitted:?}, reference {reference:?}, f32 {shipped_f32}"
    );
    // GPTQ calibrated on other text (the held-out fixture): the same size again, and closer to
    // f32 than both roundings (EN11: 1.39705 against 1.39891 and 1.40096; EN13: 1.39635 against
    // 1.39963 and 1.39704).
    let held_out = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/heldout-english.txt");
    let h = held_out.to_str().unwrap();
    let gptq = q4("s-gptq.gguf", &["--fit-scales", "--gptq", h]);
    assert_eq!(gptq.0, fitted.0);
    assert!(
        gptq.1 < fitted.1.min(reference.1) && gptq.1 > shipped_f32,
        "gptq {gptq:?}, fitted {fitted:?}, reference {reference:?}, f32 {shipped_f32}"
    );
    let err = fails(&[
        "quantize", "--model", m, "--scheme", "f16", "--gptq", h, "--out", "x.gguf",
    ]);
    assert!(err.contains("--gptq") && err.contains("q4_0"), "{err}");
    // Where calibration text comes from means nothing without --gptq.
    let err = fails(&[
        "quantize",
        "--model",
        m,
        "--scheme",
        "q4_0",
        "--calibration",
        "start",
        "--out",
        "x.gguf",
    ]);
    assert!(err.contains("--gptq"), "{err}");
    let err = fails(&[
        "quantize",
        "--model",
        m,
        "--scheme",
        "q4_0",
        "--gptq",
        "no-such.txt",
        "--out",
        "x.gguf",
    ]);
    assert!(err.contains("no-such.txt"), "{err}");
    let err = fails(&[
        "quantize",
        "--model",
        m,
        "--scheme",
        "q4_1",
        "--fit-scales",
        "--out",
        "x.gguf",
    ]);
    assert!(
        err.contains("--fit-scales") && err.contains("q4_1"),
        "{err}"
    );
    // The f32 GGUF scores exactly like the directory it came from.
    assert!((eval(dir.join("m-f32.gguf").to_str().unwrap()) - base).abs() < 1e-6);
    // Truncated and foreign files.
    let bytes = std::fs::read(dir.join("m-q4_0.gguf")).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&[
        "eval",
        "--model",
        cut.to_str().unwrap(),
        "--data",
        f.to_str().unwrap(),
    ]);
    assert!(
        err.contains("cut.gguf") && err.contains("truncated"),
        "{err}"
    );
    let err = fails(&["generate", "--model", f.to_str().unwrap(), "--prompt", "x"]);
    assert!(err.contains("not a GGUF"), "{err}");
    let err = fails(&[
        "quantize", "--model", m, "--scheme", "q3_k", "--out", "x.gguf",
    ]);
    assert!(err.contains("unknown scheme"), "{err}");
    let err = fails(&[
        "quantize", "--model", m, "--scheme", "mixed", "--out", "x.gguf",
    ]);
    assert!(err.contains("--bits"), "{err}");
}

/// Sensitivity measures every quantizable tensor; a mixed plan meets its bit budget, is saved as
/// JSON and PNG, and a plan naming a missing tensor is refused.
#[test]
fn sensitivity_drives_a_mixed_plan() {
    let m = model().to_str().unwrap();
    let dir = tmp();
    let f = fixture();
    let report = dir.join("sens.json");
    ok(&[
        "sensitivity",
        "--model",
        m,
        "--data",
        f.to_str().unwrap(),
        "--tokens",
        "200",
        "--out",
        report.to_str().unwrap(),
        "--bits",
        "6",
    ]);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let entries = r["entries"].as_array().unwrap();
    assert!(entries.iter().all(|e| e["kl"].as_f64().unwrap() >= -1e-6));
    assert!(entries.iter().all(|e| {
        let (d, p) = (
            e["nll_delta"].as_f64().unwrap(),
            e["perplexity_change"].as_f64().unwrap(),
        );
        (p - (d.exp() - 1.0)).abs() < 1e-9
    }));
    // More bits, less damage: q8_0's KL is below q4_0's for the embedding.
    let kl = |t: &str| {
        entries
            .iter()
            .find(|e| e["tensor"] == "embed.weight" && e["dtype"] == t)
            .unwrap()["kl"]
            .as_f64()
            .unwrap()
    };
    assert!(kl("q8_0") < kl("q4_0"));
    assert!(dir.join("sens.plan.json").is_file() && dir.join("sens.plan.png").is_file());
    let out = dir.join("mixed.gguf");
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "quantize",
        "--model",
        m,
        "--scheme",
        "mixed",
        "--bits",
        "6",
        "--sensitivity",
        report.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert!(v["bits_per_weight"].as_f64().unwrap() <= 6.0 + 1e-9);
    let plan = dir.join("bad-plan.json");
    std::fs::write(&plan, r#"{"types": {"layers.7.nope.weight": "q8_0"}}"#).unwrap();
    let err = fails(&[
        "quantize",
        "--model",
        m,
        "--scheme",
        "mixed",
        "--plan",
        plan.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("layers.7.nope.weight"), "{err}");
}

/// An independent reader: the Python `gguf` package (installed from PyPI by this test) sees our
/// names, shapes, types and metadata.
#[test]
fn python_gguf_reads_our_files() {
    let m = model().to_str().unwrap();
    let dir = tmp();
    let out = dir.join("py-q4_0.gguf");
    ok(&[
        "quantize",
        "--model",
        m,
        "--scheme",
        "q4_0",
        "--out",
        out.to_str().unwrap(),
    ]);
    let python = python::venv("gguf", &["gguf==0.17.1", "numpy<3"]);
    let script = r#"
import sys, json
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
def field(k):
    f = r.fields[k]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0].name == "STRING" else v.tolist()[0]
print(json.dumps({
  "arch": field("general.architecture"),
  "layers": field("itera-lite.block_count"),
  "config": json.loads(field("itera-lite.config")),
  "tensors": {t.name: [t.tensor_type.name, [int(x) for x in t.shape]] for t in r.tensors},
}))
"#;
    let stdout = python::run(&python, script, &[out.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["arch"], "itera-lite");
    let cfg = &v["config"];
    assert_eq!(v["layers"], cfg["n_layers"]);
    let t = &v["tensors"];
    // gguf-py reports shapes in ggml order (innermost first).
    let (vocab, d) = (
        cfg["vocab_size"].as_u64().unwrap(),
        cfg["d_model"].as_u64().unwrap(),
    );
    assert_eq!(t["embed.weight"], serde_json::json!(["Q4_0", [d, vocab]]));
    assert_eq!(t["layers.0.mixer.A_log"][0], "F32");
    assert_eq!(t["norm_f.weight"], serde_json::json!(["F32", [d]]));
    assert_eq!(t["layers.0.mixer.in_proj.weight"][0], "Q4_0");
}

#[test]
fn bench_reports_every_measurement() {
    let m = model().to_str().unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "bench",
        "--model",
        m,
        "--quick",
        "--json",
        "--baseline",
        m,
    ]))
    .unwrap();
    for path in [
        &v["peak_flops"],
        &v["prefill"]["tokens_per_s"],
        &v["eval"]["tokens_per_s"],
        &v["decode"]["tokens_per_s"],
        &v["decode"]["latency_p99_us"],
        &v["batched_decode"]["64"]["tokens_per_s"],
        &v["start_to_first_token_ms"],
        &v["generate_peak_rss_bytes"],
        &v["versus_baseline"]["decode_speedup"],
    ] {
        assert!(path.as_f64().unwrap() > 0.0, "{v}");
    }
    assert!(v["flops_per_token"].as_f64().unwrap() > 0.0);
    // What --only skips is null, never a number (NaN or 0) that reads as a measurement.
    let only: serde_json::Value = serde_json::from_str(&ok(&[
        "bench", "--model", m, "--quick", "--json", "--only", "peak",
    ]))
    .unwrap();
    for path in [
        &only["decode"]["tokens_per_s"],
        &only["start_to_first_token_ms"],
        &only["generate_peak_rss_bytes"],
    ] {
        assert!(path.is_null(), "{only}");
    }
    assert!(only["peak_flops"].as_f64().unwrap() > 0.0);
}

/// The PTB comparison's baselines: the shared-state SSM (a switch) and the attention preset train,
/// evaluate (attention by sliding windows) and refuse what they cannot do with a reason.
#[test]
fn baseline_mixers_train_and_evaluate() {
    model(); // trains the shared tokenizer
    let dir = tmp();
    let (tok, f) = (dir.join("tok.json"), fixture());
    let train = |extra: &[&str], run: &str| -> Vec<String> {
        let mut args: Vec<String> = [
            "train",
            "--data",
            f.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--warmup",
            "1",
            "--eval-every",
            "3",
            "--eval-windows",
            "4",
            "--holdout",
            "0.1",
            "--run",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(dir.join(run).display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    for (extra, run) in [
        (
            // With a burn-in: 8 tokens warm the state before each window's 32 scored ones.
            vec![
                "--preset",
                "micro",
                "--shared-state",
                "--seq-len",
                "32",
                "--burn-in",
                "8",
            ],
            "shared",
        ),
        (
            vec!["--preset", "transformer-tiny", "--seq-len", "32"],
            "attn",
        ),
    ] {
        let args = train(&extra, run);
        ok(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let m = dir.join(run).join("checkpoint");
        let v: serde_json::Value = serde_json::from_str(&ok(&[
            "eval",
            "--model",
            m.to_str().unwrap(),
            "--data",
            f.to_str().unwrap(),
            "--word-level",
            "--json",
        ]))
        .unwrap();
        let ppl = v["word_perplexity"].as_f64().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{run}: {ppl}");
        let protocol = if run == "attn" {
            "windowed"
        } else {
            "recurrent"
        };
        assert_eq!(v["protocol"], protocol);
        let cfg = std::fs::read_to_string(m.join("config.json")).unwrap();
        let mixer = if run == "attn" {
            "attention"
        } else {
            "shared_state"
        };
        assert!(cfg.contains(&format!("\"mixer\": \"{mixer}\"")), "{cfg}");
    }
    // The SSM scored the way the attention model must be: sliding windows of its context.
    let shared = dir.join("shared").join("checkpoint");
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        shared.to_str().unwrap(),
        "--data",
        f.to_str().unwrap(),
        "--windowed",
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["protocol"], "windowed");
    assert!(v["mean_nll"].as_f64().unwrap().is_finite());
    let attn = dir.join("attn").join("checkpoint");
    let err = fails(&[
        "generate",
        "--model",
        attn.to_str().unwrap(),
        "--prompt",
        "the",
    ]);
    assert!(
        err.contains("attention") && err.contains("itera eval"),
        "{err}"
    );
    let (a, text) = (attn.to_str().unwrap(), f.to_str().unwrap());
    let err = fails(&["eval", "--model", a, "--data", text, "--stepwise"]);
    assert!(
        err.contains("--stepwise") && err.contains("recurrent"),
        "{err}"
    );
    let args = train(
        &["--preset", "transformer-tiny", "--seq-len", "256"],
        "long",
    );
    let err = fails(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(err.contains("context"), "{err}");
    let args = train(&["--preset", "transformer-tiny", "--shared-state"], "both");
    let err = fails(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(err.contains("--shared-state"), "{err}");
    let state = dir
        .join("shared")
        .join("checkpoint")
        .join("train_state.json");
    let state = std::fs::read_to_string(state).unwrap();
    assert!(state.contains("\"burn_in\": 8"), "{state}");
    let args = train(
        &[
            "--preset",
            "transformer-tiny",
            "--seq-len",
            "32",
            "--burn-in",
            "8",
        ],
        "attn-burn-in",
    );
    let err = fails(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(
        err.contains("--burn-in") && err.contains("recurrent"),
        "{err}"
    );
}

/// 50 tokens in one run equal 25, `--save-state`, then `--load-state` and 25 more (the
/// sampler's RNG and history are part of the state); a state from another model is refused.
#[test]
fn a_saved_state_continues_the_text_exactly() {
    let m = model().to_str().unwrap();
    let text = |args: &[&str]| -> String {
        let mut all = vec!["generate", "--model", m, "--json", "--temperature", "0.9"];
        all.extend_from_slice(args);
        let v: serde_json::Value = serde_json::from_str(&ok(&all)).unwrap();
        v["text"].as_str().unwrap().to_string()
    };
    let state = tmp().join("continue.safetensors");
    let whole = text(&["--prompt", "It was a", "--max-tokens", "50", "--seed", "5"]);
    let first = text(&[
        "--prompt",
        "It was a",
        "--max-tokens",
        "25",
        "--seed",
        "5",
        "--save-state",
        state.to_str().unwrap(),
    ]);
    // The seed of the second run does not matter: the RNG comes from the file.
    let second = text(&[
        "--load-state",
        state.to_str().unwrap(),
        "--max-tokens",
        "25",
        "--seed",
        "77",
    ]);
    assert_eq!(format!("{first}{second}"), whole);
    let err = fails(&[
        "generate",
        "--load-state",
        state.to_str().unwrap(),
        "--max-tokens",
        "5",
    ]);
    assert!(err.contains("another model"), "{err}");
    let bad = tmp().join("bad.safetensors");
    std::fs::write(&bad, b"not a state").unwrap();
    let err = fails(&[
        "generate",
        "--model",
        m,
        "--load-state",
        bad.to_str().unwrap(),
    ]);
    assert!(err.contains("bad.safetensors"), "{err}");
}
