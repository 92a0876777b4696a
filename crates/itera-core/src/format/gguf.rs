//! GGUF (version 3) reading and writing: one self-describing file with the architecture metadata,
//! the full config, the tokenizer and every tensor in its storage type. Our own reader and writer
//! (a few hundred lines) because the runtime needs the raw ggml blocks to repack for its kernels,
//! and because every malformed file must give a clear error, never a panic.
//!
//! Tensor names are the checkpoint's (`layers.0.mixer.in_proj.weight`); dimensions are stored in
//! ggml order (innermost first), so a [rows, cols] matrix is written as [cols, rows].

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::format::dtype::DType;
use crate::kernels::Matrix;
use crate::runtime::TensorSource;
use crate::tensors::{ModelSpec, Spec};

pub const ARCHITECTURE: &str = "itera-lite";
const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
const ALIGNMENT: usize = 32;

/// A metadata value (the GGUF types we write and read).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    /// Any other scalar type, kept as raw bytes so unknown keys can be skipped.
    Other(u32),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::F64(_) => 12,
            Value::Other(t) => *t,
        }
    }
}

/// One tensor: name, shape as [rows, cols] (or [len] for 1-D), type and ggml bytes.
#[derive(Clone, Debug)]
pub struct TensorData {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub bytes: Vec<u8>,
}

impl TensorData {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A whole GGUF file in memory.
#[derive(Clone, Debug, Default)]
pub struct GgufFile {
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorData>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::Str(s) => put_str(out, s),
        Value::Array(items) => {
            let t = items.first().map_or(4, Value::type_id);
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| put_value(out, i));
        }
        Value::Other(_) => unreachable!("unknown values are never written"),
    }
}

impl GgufFile {
    /// Serialises to GGUF v3 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&t.dtype.ggml_id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += t.bytes.len().next_multiple_of(ALIGNMENT);
        }
        out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        for t in &self.tensors {
            out.extend_from_slice(&t.bytes);
            out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        }
        out
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        crate::format::write_atomic(path, &self.to_bytes())
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes = crate::format::read_file(path)?;
        Self::parse(&bytes).map_err(|e| Error::file(path, e))
    }

    /// Parses GGUF bytes; every inconsistency is an error naming what is wrong.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(Error::Format("not a GGUF file (bad magic)".into()));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::Format(format!("unsupported GGUF version {version}")));
        }
        let n_tensors = r.count("tensor count")?;
        let n_kv = r.count("metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let t = r.u32()?;
            let v = r.value(t)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            Some(Value::U32(a)) if *a > 0 => *a as usize,
            _ => ALIGNMENT,
        };
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let dims = r.u32()? as usize;
            if dims == 0 || dims > 4 {
                return Err(Error::Format(format!("tensor `{name}`: {dims} dimensions")));
            }
            let mut shape = (0..dims)
                .map(|_| r.u64().map(|d| d as usize))
                .collect::<Result<Vec<_>>>()?;
            shape.reverse();
            let dtype = DType::from_ggml_id(r.u32()?)
                .map_err(|e| Error::Format(format!("tensor `{name}`: {e}")))?;
            let offset = r.u64()? as usize;
            if !offset.is_multiple_of(alignment) {
                return Err(Error::Format(format!(
                    "tensor `{name}`: data offset {offset} is not a multiple of the file's \
                     alignment {alignment}"
                )));
            }
            infos.push((name, shape, dtype, offset));
        }
        let data_start = r.pos.next_multiple_of(alignment);
        let mut tensors = Vec::with_capacity(n_tensors);
        for (name, shape, dtype, offset) in infos {
            let n = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| Error::Format(format!("tensor `{name}`: absurd shape")))?;
            let len = dtype
                .bytes_for(n)
                .map_err(|e| Error::Format(format!("tensor `{name}`: {e}")))?;
            let start = data_start.checked_add(offset);
            let data = start
                .and_then(|s| bytes.get(s..s.checked_add(len)?))
                .ok_or_else(|| {
                    Error::Format(format!(
                        "tensor `{name}` lies beyond the end of the file (truncated?)"
                    ))
                })?;
            tensors.push(TensorData {
                name,
                shape,
                dtype,
                bytes: data.to_vec(),
            });
        }
        Ok(Self { metadata, tensors })
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorData> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::Tensor {
                name: name.into(),
                message: "missing from the GGUF file".into(),
            })
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Format(format!("metadata key `{key}` missing or not a string")))
    }

    /// The model config stored in the file (checked against the architecture name).
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.get_str("general.architecture")?;
        if arch != ARCHITECTURE {
            return Err(Error::Format(format!(
                "architecture `{arch}` is not {ARCHITECTURE}"
            )));
        }
        let cfg =
            ModelConfig::from_json(self.get_str("itera-lite.config")?, "GGUF itera-lite.config")?;
        // The llama.cpp-style keys must say what the embedded config says.
        for (key, want) in size_keys(&cfg) {
            let key = format!("{ARCHITECTURE}.{key}");
            match self.metadata.get(&key) {
                None => {}
                Some(Value::U32(v)) if *v as usize == want => {}
                Some(v) => {
                    return Err(Error::Format(format!(
                        "metadata `{key}` is {v:?} but the embedded config says {want}"
                    )))
                }
            }
        }
        Ok(cfg)
    }

    /// Average bits per weight over all tensors.
    pub fn bits_per_weight(&self) -> f64 {
        let bytes: usize = self.tensors.iter().map(|t| t.bytes.len()).sum();
        let n: usize = self.tensors.iter().map(TensorData::elements).sum();
        bytes as f64 * 8.0 / n.max(1) as f64
    }
}

/// Metadata for a model: the keys llama.cpp-style tools look at plus our full config and the
/// tokenizer.json.
pub fn model_metadata(
    cfg: &ModelConfig,
    tokenizer_json: &str,
    name: &str,
) -> BTreeMap<String, Value> {
    let a = ARCHITECTURE;
    let mut m: BTreeMap<String, Value> = size_keys(cfg)
        .iter()
        .map(|(k, v)| (format!("{a}.{k}"), Value::U32(*v as u32)))
        .collect();
    let layers = cfg
        .moe_layers
        .iter()
        .map(|&l| Value::U32(l as u32))
        .collect();
    let config = serde_json::to_string(cfg).expect("config serialises");
    for (k, v) in [
        ("general.architecture".to_string(), Value::Str(a.into())),
        ("general.name".into(), Value::Str(name.into())),
        ("general.alignment".into(), Value::U32(ALIGNMENT as u32)),
        ("general.quantization_version".into(), Value::U32(2)),
        (format!("{a}.moe_layers"), Value::Array(layers)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.norm_eps as f32),
        ),
        (format!("{a}.config"), Value::Str(config)),
        ("tokenizer.ggml.model".into(), Value::Str("gpt2".into())),
        (
            "tokenizer.huggingface.json".into(),
            Value::Str(tokenizer_json.into()),
        ),
    ] {
        m.insert(k, v);
    }
    if let Some(t) = &cfg.chat_template {
        m.insert("tokenizer.chat_template".into(), Value::Str(t.clone()));
    }
    m
}

impl TensorSource for GgufFile {
    fn matrix(&self, spec: &Spec) -> Result<Matrix> {
        let t = self.tensor(&spec.name)?;
        if t.shape != spec.shape {
            return Err(Error::Tensor {
                name: spec.name.clone(),
                message: format!("shape {:?}, expected {:?}", t.shape, spec.shape),
            });
        }
        let (rows, cols) = spec.rows_cols();
        Matrix::from_ggml(t.dtype, rows, cols, &t.bytes).map_err(|e| Error::Tensor {
            name: spec.name.clone(),
            message: e.to_string(),
        })
    }
}

/// The llama.cpp-style size keys (under the architecture's prefix) and their values.
fn size_keys(cfg: &ModelConfig) -> [(&'static str, usize); 11] {
    [
        ("context_length", cfg.context),
        ("embedding_length", cfg.d_model),
        ("block_count", cfg.n_layers),
        ("vocab_size", cfg.vocab_size),
        ("ssm.conv_kernel", cfg.d_conv),
        ("ssm.inner_size", cfg.d_inner()),
        ("ssm.state_size", cfg.d_state),
        ("ssm.time_step_rank", cfg.dt_rank),
        ("expert_count", cfg.n_experts),
        ("expert_used_count", cfg.top_k),
        ("expert_feed_forward_length", cfg.expert_hidden),
    ]
}

/// A model as one GGUF file: metadata, config, tokenizer and every tensor of the table in its
/// storage type (`dtype_of` picks it per tensor; `values` gives the f32 values by name), the block
/// types rounded as `rounding` says.
pub fn model_file(
    cfg: &ModelConfig,
    tokenizer_json: &str,
    name: &str,
    values: impl Fn(&str) -> Result<Vec<f32>>,
    dtype_of: impl Fn(&Spec) -> DType,
    rounding: crate::format::dtype::Rounding,
) -> Result<GgufFile> {
    let mut tensors = Vec::new();
    for spec in ModelSpec::new(cfg).all() {
        let dtype = dtype_of(spec);
        let bytes = crate::format::dtype::quantize_with(dtype, &values(&spec.name)?, rounding)
            .map_err(|e| Error::Tensor {
                name: spec.name.clone(),
                message: e.to_string(),
            })?;
        tensors.push(TensorData {
            name: spec.name.clone(),
            shape: spec.shape.clone(),
            dtype,
            bytes,
        });
    }
    Ok(GgufFile {
        metadata: model_metadata(cfg, tokenizer_json, name),
        tensors,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| {
            Error::Format(format!(
                "file ends at byte {} while reading the header (truncated?)",
                self.bytes.len()
            ))
        })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    /// A count that must be plausible for the file's size (guards huge allocations).
    fn count(&mut self, what: &str) -> Result<usize> {
        let n = self.u64()?;
        if n > self.bytes.len() as u64 {
            return Err(Error::Format(format!(
                "{what} {n} is impossible for this file"
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.count("string length")?;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| Error::Format("a string is not valid UTF-8".into()))
    }

    fn value(&mut self, t: u32) -> Result<Value> {
        Ok(match t {
            0 | 1 | 7 => {
                let b = self.take(1)?[0];
                if t == 7 {
                    Value::Bool(b != 0)
                } else {
                    Value::Other(t)
                }
            }
            2 | 3 => {
                self.take(2)?;
                Value::Other(t)
            }
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            8 => Value::Str(self.string()?),
            9 => {
                let et = self.u32()?;
                let n = self.count("array length")?;
                Value::Array((0..n).map(|_| self.value(et)).collect::<Result<_>>()?)
            }
            10 => Value::U64(self.u64()?),
            11 => {
                self.u64()?;
                Value::Other(t)
            }
            12 => Value::F64(f64::from_bits(self.u64()?)),
            _ => return Err(Error::Format(format!("unknown metadata value type {t}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GgufFile {
        let cfg = ModelConfig::preset("micro").unwrap();
        let w: Vec<f32> = (0..64 * 32).map(|i| (i as f32 * 0.37).sin()).collect();
        GgufFile {
            metadata: model_metadata(&cfg, "{}", "test"),
            tensors: vec![
                TensorData {
                    name: "a".into(),
                    shape: vec![64, 32],
                    dtype: DType::Q4_0,
                    bytes: crate::format::dtype::quantize(DType::Q4_0, &w).unwrap(),
                },
                TensorData {
                    name: "b".into(),
                    shape: vec![3],
                    dtype: DType::F32,
                    bytes: crate::format::dtype::quantize(DType::F32, &[1.0, 2.0, 3.0]).unwrap(),
                },
            ],
        }
    }

    #[test]
    fn round_trips_and_reports_truncation() {
        let f = sample();
        let bytes = f.to_bytes();
        let g = GgufFile::parse(&bytes).unwrap();
        assert_eq!(g.metadata, f.metadata);
        assert_eq!(g.config().unwrap(), ModelConfig::preset("micro").unwrap());
        for (a, b) in f.tensors.iter().zip(&g.tensors) {
            assert_eq!(
                (&a.name, &a.shape, a.dtype, &a.bytes),
                (&b.name, &b.shape, b.dtype, &b.bytes)
            );
        }
        let spec = |name: &str, shape: &[usize]| Spec {
            name: name.into(),
            shape: shape.to_vec(),
            init: crate::tensors::Init::Zeros,
            role: crate::tensors::Role::Projection,
        };
        let m = g.matrix(&spec("a", &[64, 32])).unwrap();
        assert_eq!(m.dtype, DType::Q4_0);
        assert!(g.matrix(&spec("a", &[32, 64])).is_err());
        assert!(g.matrix(&spec("zz", &[1])).is_err());
        // Every truncation point gives an error, never a panic.
        for cut in (0..bytes.len()).step_by(97) {
            assert!(GgufFile::parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(GgufFile::parse(b"PK\x03\x04 not gguf at all").is_err());
    }

    #[test]
    fn unknown_tensor_type_is_an_error() {
        let mut bytes = sample().to_bytes();
        // Patch tensor `a`'s type id (after its name, dim count and two dims) to 12 (Q4_K).
        let name_at = bytes
            .windows(9)
            .position(|w| w == b"\x01\0\0\0\0\0\0\0a")
            .unwrap();
        let type_at = name_at + 9 + 4 + 16;
        bytes[type_at..type_at + 4].copy_from_slice(&12u32.to_le_bytes());
        let err = GgufFile::parse(&bytes).unwrap_err().to_string();
        assert!(err.contains("tensor `a`") && err.contains("12"), "{err}");
    }
}
