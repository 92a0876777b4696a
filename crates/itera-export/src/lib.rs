//! Interchange formats for other ecosystems: ONNX (`onnx`: the recurrent step and a prefill
//! graph, checked by onnxruntime in tests), written through prost types generated from the
//! official onnx.proto (`onnx_proto`) by a small builder (`graph`).

mod graph;
pub mod onnx;
#[allow(clippy::all, clippy::undocumented_unsafe_blocks)]
mod onnx_proto;

use std::path::{Path, PathBuf};

use itera_core::format::dtype::{self, DType};
use itera_core::format::gguf::GgufFile;
use itera_core::format::model_dir::{read_config, ModelDir, TOKENIZER_FILE};
use itera_core::format::write_atomic;
use itera_core::tensors::{Spec, Weights};
use itera_core::{ModelConfig, Tokenizer};
use prost::Message;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("export: {0}")]
    Export(String),
    #[error(transparent)]
    Core(#[from] itera_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A weight as the graph stores it.
pub enum Stored {
    F32(Vec<f32>),
    /// ggml Q8_0: int8 codes [rows, cols] and one scale per block of 32.
    Q8_0 {
        codes: Vec<i8>,
        scales: Vec<f32>,
    },
}

/// Where the exported weights come from.
pub trait WeightSource {
    fn get(&self, spec: &Spec) -> Result<Stored>;
}

impl WeightSource for Weights {
    fn get(&self, spec: &Spec) -> Result<Stored> {
        Ok(Stored::F32(self.values(&spec.name)?.to_vec()))
    }
}

/// A GGUF file: Q8_0 matrices stay quantized (QDQ), every other format is dequantized to f32.
impl WeightSource for GgufFile {
    fn get(&self, spec: &Spec) -> Result<Stored> {
        let t = self.tensor(&spec.name)?;
        if t.shape != spec.shape {
            return Err(Error::Export(format!(
                "`{}` has shape {:?}, the config expects {:?}",
                spec.name, t.shape, spec.shape
            )));
        }
        if t.dtype == DType::Q8_0 {
            let (mut codes, mut scales) = (Vec::new(), Vec::new());
            for b in t.bytes.chunks_exact(34) {
                scales.push(half_to_f32([b[0], b[1]]));
                codes.extend(b[2..].iter().map(|&c| c as i8));
            }
            return Ok(Stored::Q8_0 { codes, scales });
        }
        Ok(Stored::F32(dtype::dequantize(
            t.dtype,
            &t.bytes,
            t.elements(),
        )?))
    }
}

fn half_to_f32(b: [u8; 2]) -> f32 {
    dtype::dequantize(DType::F16, &b, 1).expect("two bytes are one f16")[0]
}

/// What `export_onnx` wrote.
#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub files: Vec<(PathBuf, u64)>,
    pub opset: i64,
    /// Matrices written as int8 + scales (QDQ).
    pub quantized_tensors: usize,
}

/// The config written beside the graphs: the model's, and how to drive the graphs.
#[derive(Serialize)]
struct GraphConfig<'a> {
    model: &'a ModelConfig,
    opset: i64,
    step: &'static str,
    prefill: &'static str,
    state: Vec<StateInfo>,
    eos_token_id: Option<u32>,
}

#[derive(Serialize)]
struct StateInfo {
    input: String,
    output: String,
    shape: [String; 3],
}

/// Writes `step.onnx`, `prefill.onnx`, `tokenizer.json` and `config.json` into `out_dir` for
/// the model at `model` (a directory, or a GGUF file: Q8_0 tensors as QDQ).
pub fn export_onnx(model: &Path, out_dir: &Path) -> Result<ExportReport> {
    let cfg = read_config(model)?;
    onnx::check(&cfg)?;
    let (source, tokenizer): (Box<dyn WeightSource>, Tokenizer) = if model.is_dir() {
        let m = ModelDir::load(model)?;
        (Box::new(m.weights), m.tokenizer)
    } else {
        let file = GgufFile::read(model)?;
        let tok = file
            .get_str("tokenizer.huggingface.json")
            .map_err(|e| Error::Export(e.to_string()))?;
        let tokenizer = Tokenizer::from_bytes(tok.as_bytes(), &model.display().to_string())?;
        (Box::new(file), tokenizer)
    };
    let quantized_tensors = itera_core::tensors::ModelSpec::new(&cfg)
        .all()
        .iter()
        .filter(|s| matches!(source.get(s), Ok(Stored::Q8_0 { .. })))
        .count();
    std::fs::create_dir_all(out_dir).map_err(|e| itera_core::Error::file(out_dir, e))?;
    let mut files = Vec::new();
    for (name, m) in [
        ("step.onnx", onnx::step_model(&cfg, source.as_ref())?),
        ("prefill.onnx", onnx::prefill_model(&cfg, source.as_ref())?),
    ] {
        let path = out_dir.join(name);
        let bytes = m.encode_to_vec();
        write_atomic(&path, &bytes)?;
        files.push((path, bytes.len() as u64));
    }
    let tok_path = out_dir.join(TOKENIZER_FILE);
    tokenizer.save(&tok_path)?;
    let (di, n, k) = (cfg.d_inner(), cfg.d_state, cfg.d_conv - 1);
    let state = (0..cfg.n_layers)
        .flat_map(|l| {
            [
                StateInfo {
                    input: format!("past.{l}.conv"),
                    output: format!("present.{l}.conv"),
                    shape: ["batch".into(), k.to_string(), di.to_string()],
                },
                StateInfo {
                    input: format!("past.{l}.ssm"),
                    output: format!("present.{l}.ssm"),
                    shape: ["batch".into(), n.to_string(), di.to_string()],
                },
            ]
        })
        .collect();
    let gc = GraphConfig {
        model: &cfg,
        opset: graph::OPSET,
        step: "step.onnx: token [batch] int64 + past.* -> logits [batch, vocab] + present.*",
        prefill: "prefill.onnx: tokens [batch, time] int64 + past.* -> logits [batch, time, vocab] + present.*",
        state,
        eos_token_id: tokenizer.token_id(itera_core::tokenizer::END_OF_TEXT),
    };
    let cfg_path = out_dir.join("config.json");
    write_atomic(
        &cfg_path,
        serde_json::to_string_pretty(&gc)
            .expect("serialises")
            .as_bytes(),
    )?;
    files.push((
        tok_path.clone(),
        std::fs::metadata(&tok_path).map_or(0, |m| m.len()),
    ));
    files.push((
        cfg_path.clone(),
        std::fs::metadata(&cfg_path).map_or(0, |m| m.len()),
    ));
    Ok(ExportReport {
        files,
        opset: graph::OPSET,
        quantized_tensors,
    })
}
