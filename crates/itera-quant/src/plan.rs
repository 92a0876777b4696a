//! Quantization plans: a storage type per tensor, and the GGUF file they produce.

use std::collections::BTreeMap;
use std::path::Path;

use itera_core::format::dtype::{DType, Rounding, BLOCK};
use itera_core::format::gguf::{self, GgufFile};
use itera_core::kernels::Matrix;
use itera_core::runtime::TensorSource;
use itera_core::tensors::{ModelSpec, Spec};
use itera_core::{Error, ModelConfig, ModelDir, Result, Weights};
use serde::{Deserialize, Serialize};

/// The block types a weight matrix may take, from most to fewest bits.
pub const CANDIDATES: [DType; 5] = [
    DType::Q8_0,
    DType::Q5_0,
    DType::Q4_1,
    DType::Q4_0,
    DType::NF4,
];

/// What `itera quantize --scheme` names: one type for every quantizable matrix, or a mix.
#[derive(Clone, Debug, PartialEq)]
pub enum Scheme {
    Uniform(DType),
    Mixed,
}

impl Scheme {
    pub fn parse(s: &str) -> Result<Self> {
        if s.eq_ignore_ascii_case("mixed") {
            return Ok(Scheme::Mixed);
        }
        DType::parse(s).map(Scheme::Uniform).map_err(|_| {
            Error::Argument(format!(
                "unknown scheme `{s}` (expected f32, f16, bf16, q8_0, q5_0, q4_0, q4_1, nf4 or mixed)"
            ))
        })
    }
}

/// Whether a tensor may leave f32: the tensor table's weight matrices with whole blocks per row.
/// Norms, biases, A_log, D, the conv kernel, dt_proj and the MoE router stay f32, as llama.cpp
/// does for Mamba's small tensors and routers.
pub fn quantizable(spec: &Spec) -> bool {
    spec.quantizable(BLOCK)
}

/// A storage type per tensor name (tensors not listed stay f32).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub types: BTreeMap<String, DType>,
}

impl Plan {
    /// Every quantizable tensor of a model of `cfg` in `dtype`.
    pub fn uniform(cfg: &ModelConfig, dtype: DType) -> Self {
        let types = ModelSpec::new(cfg)
            .all()
            .into_iter()
            .filter(|s| quantizable(s))
            .map(|s| (s.name.clone(), dtype))
            .collect();
        Self { types }
    }

    pub fn dtype(&self, name: &str) -> DType {
        self.types.get(name).copied().unwrap_or(DType::F32)
    }

    /// Checks that every named tensor exists and can take its type.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let spec = ModelSpec::new(cfg);
        for (name, &dtype) in &self.types {
            let t = spec.get(name).ok_or_else(|| Error::Tensor {
                name: name.clone(),
                message: "named in the plan but not in the model".into(),
            })?;
            if dtype != DType::F32 && dtype.block_len() > 1 && !quantizable(t) {
                return Err(Error::Tensor {
                    name: name.clone(),
                    message: format!("cannot be stored as {} (kept f32 by design)", dtype.name()),
                });
            }
        }
        Ok(())
    }

    /// Average bits per weight over every tensor of the model (f32 ones included).
    pub fn bits_per_weight(&self, cfg: &ModelConfig) -> f64 {
        let (mut bits, mut n) = (0.0, 0usize);
        for s in ModelSpec::new(cfg).all() {
            bits += self.dtype(&s.name).bits_per_weight() * s.len() as f64;
            n += s.len();
        }
        bits / n.max(1) as f64
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not a plan: {e}")))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("plan serialises");
        itera_core::format::write_atomic(path, json.as_bytes())
    }

    /// The model as one GGUF: metadata, config, tokenizer and every tensor in its planned type.
    pub fn to_gguf(&self, model: &ModelDir, name: &str, rounding: Rounding) -> Result<GgufFile> {
        self.validate(&model.config)?;
        gguf::model_file(
            &model.config,
            &model.tokenizer.to_json()?,
            name,
            |n| Ok(model.weights.values(n)?.to_vec()),
            |s| self.dtype(&s.name),
            rounding,
        )
    }
}

/// The model's f32 weights seen through a plan: each matrix quantized to its planned type when
/// the runtime asks for it (what sensitivity analysis runs, without writing files).
pub struct PlannedWeights<'a> {
    pub weights: &'a Weights,
    pub plan: &'a Plan,
}

impl TensorSource for PlannedWeights<'_> {
    fn matrix(&self, spec: &Spec) -> Result<Matrix> {
        let values = self.weights.values(&spec.name)?;
        let (rows, cols) = spec.rows_cols();
        if values.len() != rows * cols {
            return Err(Error::Tensor {
                name: spec.name.clone(),
                message: format!("{} values, expected {:?}", values.len(), spec.shape),
            });
        }
        let dtype = if rows > 1 {
            self.plan.dtype(&spec.name)
        } else {
            DType::F32
        };
        Matrix::quantize(dtype, rows, cols, values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_keep_small_tensors_f32_and_reject_bad_names() {
        let cfg = ModelConfig::preset("micro").unwrap();
        let plan = Plan::uniform(&cfg, DType::Q4_0);
        assert!(plan.types.contains_key("embed.weight"));
        assert!(plan.types.contains_key("layers.0.mixer.in_proj.weight"));
        assert!(!plan
            .types
            .keys()
            .any(|k| k.contains("router") || k.contains("norm")));
        let bits = plan.bits_per_weight(&cfg);
        assert!(bits > 4.5 && bits < 6.0, "{bits}");
        let mut bad = plan.clone();
        bad.types.insert("layers.9.nope".into(), DType::Q8_0);
        assert!(bad
            .validate(&cfg)
            .unwrap_err()
            .to_string()
            .contains("layers.9.nope"));
        let mut bad = plan.clone();
        bad.types.insert("layers.0.norm.weight".into(), DType::Q8_0);
        assert!(bad.validate(&cfg).is_err());
        assert!(Scheme::parse("q3_k").is_err());
        assert_eq!(Scheme::parse("mixed").unwrap(), Scheme::Mixed);
    }
}
