//! `itera export --format onnx` checked by an independent runtime: `onnx.checker` accepts both
//! graphs, and onnxruntime (installed from PyPI into a test venv) gives our runtime's logits:
//! the prefill graph over two 64-token sequences, and a 64-token walk through the step graph
//! feeding `present.*` back as `past.*`, to 1e-4 for f32 models (the shipped model, `micro`, and the
//! shipped model pruned to 3, 2, 4 and 2 experts with dynamic skipping at beta 0.6). From a Q8_0
//! GGUF (int8 weights with blocked DequantizeLinear) the graphs are the dequantized model
//! exactly: 1e-4 against our f32 runtime over the same dequantized weights. Against our Q8_0
//! runtime, whose integer kernels round the activations to int8 per block of 32 (decode, and
//! expert calls under 32 rows in prefill), the bounds are 10% of the largest logit magnitude for
//! any one logit and 1% for the mean difference (measured with the shipped EN8 model over random
//! tokens: 5.4% at one position of a 64-token walk, a mean of 0.18%, 0.4% for its prefill; the
//! previous `tiny` model, two MoE layers instead of four, gave 1.8% and 0.6%).

mod common;
#[path = "../../../tests/support/python.rs"]
mod python;

use std::path::Path;

use common::*;
use itera_core::format::dtype;
use itera_core::format::gguf::GgufFile;
use itera_core::tensors::HostTensor;
use itera_core::{Generator, ModelDir, Tokenizer, Weights};

const SCRIPT: &str = r#"
import sys, json
import numpy as np
import onnx, onnxruntime as ort
d, data = sys.argv[1], sys.argv[2]
for f in ["step", "prefill"]:
    onnx.checker.check_model(onnx.load(f"{d}/{f}.onnx"), full_check=True)
cfg = json.load(open(f"{d}/config.json"))
raw = np.fromfile(data, dtype="<f4")
b, t, v = 2, 64, cfg["model"]["vocab_size"]
tokens = raw[: b * t].astype(np.int64).reshape(b, t)
ours_step = raw[b * t : b * t * (1 + v)].reshape(b, t, v)
ours_prefill = raw[b * t * (1 + v) :].reshape(b, t, v)
zeros = {s["input"]: np.zeros([b] + [int(x) for x in s["shape"][1:]], np.float32) for s in cfg["state"]}
prefill = ort.InferenceSession(f"{d}/prefill.onnx").run(["logits"], {"tokens": tokens, **zeros})[0]
step = ort.InferenceSession(f"{d}/step.onnx")
names = [o.name for o in step.get_outputs()]
state, walk = dict(zeros), []
for i in range(t):
    out = step.run(None, {"token": tokens[:, i], **state})
    walk.append(out[names.index("logits")])
    state = {s["input"]: out[names.index(s["output"])] for s in cfg["state"]}
walk = np.stack(walk, axis=1)
print(json.dumps({"prefill": float(np.abs(prefill - ours_prefill).max()),
                  "step": float(np.abs(walk - ours_step).max()), "scale": float(np.abs(ours_step).max()),
                  "step_mean": float(np.abs(walk - ours_step).mean())}))
"#;

/// Exports `model`, runs the script against our runtime's logits for `ours` (the same model,
/// or the same weights in another form); returns the largest (prefill, step) differences, the
/// largest logit magnitude, and the mean step difference.
fn compare(model: &Path, ours: &Path, name: &str) -> (f64, f64, f64, f64) {
    let out = tmp().join(format!("onnx-{name}"));
    ok(&[
        "export",
        "--model",
        model.to_str().unwrap(),
        "--format",
        "onnx",
        "--out",
        out.to_str().unwrap(),
    ]);
    let g = Generator::load(ours).unwrap();
    let rt = &g.runtime;
    let v = rt.cfg.vocab_size;
    let mut rng = itera_core::rng::Rng::new(9);
    let seqs: Vec<Vec<u32>> = (0..2)
        .map(|_| (0..64).map(|_| rng.below(v) as u32).collect())
        .collect();
    let mut raw: Vec<f32> = seqs.iter().flatten().map(|&t| t as f32).collect();
    for seq in &seqs {
        let (mut st, mut sc) = (rt.new_state(), rt.new_scratch());
        // One token at a time: the decode path (what the step graph is compared with).
        for &t in seq {
            rt.step(t, &mut st, &mut sc).unwrap();
            raw.extend_from_slice(&sc.logits);
        }
    }
    for seq in &seqs {
        // All 64 at once: the prefill path (compared with the prefill graph).
        let (mut st, mut sc) = (rt.new_state(), rt.new_scratch());
        rt.prefill_all(seq, &mut st, &mut sc).unwrap();
        raw.extend_from_slice(&sc.logits);
    }
    let data = out.join("ours.f32");
    std::fs::write(
        &data,
        raw.iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let py = python::venv("onnx", &["onnxruntime>=1.20", "onnx>=1.17", "numpy<3"]);
    let report = python::run(
        &py,
        SCRIPT,
        &[out.to_str().unwrap(), data.to_str().unwrap()],
    );
    let r: serde_json::Value = serde_json::from_str(&report).unwrap();
    (
        r["prefill"].as_f64().unwrap(),
        r["step"].as_f64().unwrap(),
        r["scale"].as_f64().unwrap(),
        r["step_mean"].as_f64().unwrap(),
    )
}

#[test]
fn onnxruntime_runs_the_exported_graphs_like_our_runtime() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/itera-lite-tiny");
    // A pruned model: uneven expert counts and dynamic expert skipping.
    let pruned = tmp().join("pruned-for-onnx");
    let _ = std::fs::remove_dir_all(&pruned);
    ok(&[
        "prune",
        "--model",
        shipped.to_str().unwrap(),
        "--data",
        fixture().to_str().unwrap(),
        "--tokens",
        "1000",
        "--keep-per-layer",
        "3,2,4,2",
        "--skip-beta",
        "0.6",
        "--out",
        pruned.to_str().unwrap(),
    ]);
    for (model, name) in [
        (shipped.clone(), "tiny"),
        (model().clone(), "micro"),
        (pruned, "pruned"),
    ] {
        let (prefill, step, scale, _) = compare(&model, &model, name);
        eprintln!("{name}: prefill {prefill}, step {step}, logits up to {scale}");
        assert!(
            prefill < 1e-4 && step < 1e-4,
            "{name}: prefill {prefill}, step {step} (logits up to {scale})"
        );
    }
    let gguf = tmp().join("onnx-q8_0.gguf");
    ok(&[
        "quantize",
        "--model",
        shipped.to_str().unwrap(),
        "--scheme",
        "q8_0",
        "--out",
        gguf.to_str().unwrap(),
    ]);
    // The QDQ graph is the dequantized model exactly: against our f32 runtime over the
    // GGUF's weights as dequantized (written as a model directory), 1e-4 again.
    let file = GgufFile::read(&gguf).unwrap();
    let cfg = file.config().unwrap();
    let tensors = file
        .tensors
        .iter()
        .map(|t| {
            let v = dtype::dequantize(t.dtype, &t.bytes, t.elements()).unwrap();
            (t.name.clone(), HostTensor::new(t.shape.clone(), v))
        })
        .collect();
    let dequantized = tmp().join("onnx-q8_0-dequantized");
    let tok = Tokenizer::from_bytes(
        file.get_str("tokenizer.huggingface.json")
            .unwrap()
            .as_bytes(),
        "gguf",
    )
    .unwrap();
    ModelDir::save(
        &dequantized,
        &cfg,
        &Weights::from_tensors(&cfg, tensors, "gguf").unwrap(),
        &tok,
    )
    .unwrap();
    let (prefill, step, scale, _) = compare(&gguf, &dequantized, "q8_0-exact");
    eprintln!(
        "q8_0 vs its dequantized weights: prefill {prefill}, step {step}, logits up to {scale}"
    );
    assert!(
        prefill < 1e-4 && step < 1e-4,
        "q8_0 exact: prefill {prefill}, step {step}"
    );
    // Against our Q8_0 runtime itself, whose integer kernels round activations to int8.
    let (prefill, step, scale, mean) = compare(&gguf, &gguf, "q8_0");
    eprintln!("q8_0: prefill {prefill}, step {step} (mean {mean}), logits up to {scale}");
    assert!(
        prefill < 0.1 * scale && step < 0.1 * scale && mean < 0.01 * scale,
        "q8_0: prefill {prefill}, step {step} (mean {mean}; logits up to {scale})"
    );
    // The attention baseline has no recurrent step: refused with a reason.
    let cfg = tmp().join("attention.json");
    let mut c = itera_core::ModelConfig::preset("transformer-tiny").unwrap();
    c.vocab_size = 400;
    std::fs::write(&cfg, serde_json::to_string(&c).unwrap()).unwrap();
    let dir = tmp().join("attention-model");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&cfg, dir.join("config.json")).unwrap();
    let err = fails(&[
        "export",
        "--model",
        dir.to_str().unwrap(),
        "--out",
        tmp().join("x").to_str().unwrap(),
    ]);
    assert!(
        err.contains("attention") && err.contains("no recurrent step"),
        "{err}"
    );
}
