//! Our ggml block formats against an independent implementation: gguf-py's own numpy
//! quantization (`gguf.quants`), installed from PyPI into a test venv. Every tensor of the
//! shipped model is written in each format we share with ggml (Q8_0, Q5_0, Q4_0, Q4_1, F16,
//! BF16) as a GGUF file by our writer; gguf-py reads the file, dequantizes each tensor, and must
//! get our dequantized values bit for bit; and it quantizes the f32 originals itself, and must
//! get our bytes (codes and scales) byte for byte. Files written with fitted scales
//! (`Rounding::Fitted`, Q8_0 / Q5_0 / Q4_0) must dequantize bit for bit too, and differ from
//! gguf-py's own quantization (the fit changes scales and codes, not the layout).

#[path = "../../../tests/support/python.rs"]
mod python;

use std::path::Path;

use itera_core::format::dtype::{self, DType, Rounding};
use itera_core::format::gguf::{self, GgufFile, TensorData};
use itera_core::ModelDir;

const SCRIPT: &str = r#"
import sys, json, os
import numpy as np
from gguf import GGUFReader
from gguf.quants import quantize, dequantize
src = {t.name: t for t in GGUFReader(sys.argv[1]).tensors}
report = {}
for q_path, deq_path in zip(sys.argv[2::2], sys.argv[3::2]):
    ours = {t.name: t for t in GGUFReader(deq_path).tensors}
    for t in GGUFReader(q_path).tensors:
        if t.tensor_type.name == "F32":
            continue
        theirs = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        mine = np.asarray(ours[t.name].data, dtype=np.float32).reshape(-1)
        deq_diff = int(np.count_nonzero(theirs.view(np.uint32) != mine.view(np.uint32)))
        rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
        original = np.asarray(src[t.name].data, dtype=np.float32).reshape(rows, -1)
        codes = np.asarray(quantize(original, t.tensor_type)).view(np.uint8).reshape(-1)
        stored = np.asarray(t.data).view(np.uint8).reshape(-1)
        byte_diff = int(np.count_nonzero(codes != stored))
        report[os.path.basename(q_path) + " " + t.tensor_type.name + " " + t.name] = [deq_diff, byte_diff, int(theirs.size)]
print(json.dumps(report))
"#;

fn f32_file(model: &ModelDir, values: impl Fn(&str) -> Vec<f32>) -> GgufFile {
    let mut file = gguf::model_file(
        &model.config,
        "{}",
        "reference",
        |n| Ok(model.weights.values(n)?.to_vec()),
        |_| DType::F32,
        Rounding::Reference,
    )
    .unwrap();
    for t in &mut file.tensors {
        t.bytes = dtype::quantize(DType::F32, &values(&t.name)).unwrap();
    }
    file
}

#[test]
fn gguf_py_dequantizes_our_files_bit_for_bit_and_quantizes_to_our_bytes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model = ModelDir::load(&root.join("models/itera-lite-tiny")).unwrap();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ggml-reference");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("f32.gguf");
    f32_file(&model, |n| model.weights.values(n).unwrap().to_vec())
        .write(&src)
        .unwrap();
    let formats = [
        DType::Q8_0,
        DType::Q5_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::F16,
        DType::BF16,
    ];
    let fitted = [DType::Q8_0, DType::Q5_0, DType::Q4_0].map(|d| (d, Rounding::Fitted));
    let mut args = vec![src.display().to_string()];
    for (dtype, rounding) in formats
        .map(|d| (d, Rounding::Reference))
        .into_iter()
        .chain(fitted)
    {
        let file = gguf::model_file(
            &model.config,
            "{}",
            "reference",
            |n| Ok(model.weights.values(n)?.to_vec()),
            |s| if s.quantizable(32) { dtype } else { DType::F32 },
            rounding,
        )
        .unwrap();
        let stem = format!("{}-{rounding:?}", dtype.name()).to_lowercase();
        let q_path = dir.join(format!("{stem}.gguf"));
        file.write(&q_path).unwrap();
        // Our own dequantization of every tensor, as f32.
        let by_name =
            |name: &str| -> &TensorData { file.tensors.iter().find(|t| t.name == name).unwrap() };
        let deq = f32_file(&model, |n| {
            let t = by_name(n);
            dtype::dequantize(t.dtype, &t.bytes, t.elements()).unwrap()
        });
        let deq_path = dir.join(format!("{stem}.deq.gguf"));
        deq.write(&deq_path).unwrap();
        args.push(q_path.display().to_string());
        args.push(deq_path.display().to_string());
    }
    let python = python::venv("gguf", &["gguf==0.17.1", "numpy<3"]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = python::run(&python, SCRIPT, &argv);
    let report: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&out).unwrap();
    let mut checked = std::collections::BTreeMap::<String, usize>::new();
    let mut differing = 0;
    for (name, v) in &report {
        let (deq_diff, byte_diff, n) = (
            v[0].as_u64().unwrap(),
            v[1].as_u64().unwrap(),
            v[2].as_u64().unwrap(),
        );
        assert_eq!(
            deq_diff, 0,
            "{name}: {deq_diff} of {n} dequantized values differ from gguf-py"
        );
        let mut key = name.split(' ');
        let (file, dtype) = (key.next().unwrap(), key.next().unwrap());
        if file.contains("fitted") {
            differing += byte_diff;
        } else {
            assert_eq!(
                byte_diff, 0,
                "{name}: {byte_diff} bytes differ from gguf-py's quantization"
            );
        }
        *checked.entry(format!("{file} {dtype}")).or_default() += n as usize;
    }
    assert!(
        differing > 100_000,
        "fitted scales changed only {differing} bytes"
    );
    for (dtype, rounding) in formats
        .map(|d| (d, Rounding::Reference))
        .into_iter()
        .chain(fitted)
    {
        let key = format!("{}-{rounding:?}.gguf {}", dtype.name(), dtype.name()).to_lowercase();
        let n = checked
            .iter()
            .find(|(k, _)| k.to_lowercase() == key)
            .map_or(0, |(_, n)| *n);
        assert!(n > 1_000_000, "{key}: only {n} values checked");
    }
}
