//! The training side of the model, on candle: the reference model (`model`) and the fused ops
//! it is built from, each with a hand-written backward checked against finite differences or
//! candle's own autograd (`scan`: the SSM core; `conv_norm`: causal conv + SiLU and RMSNorm;
//! `swiglu`: the experts' gate silu(g) * u; `lm_head_loss`: the tied LM head fused with
//! cross-entropy, over `gemm`; `distill_loss`: the
//! same head fused with the distillation loss against a teacher), plus the windowed
//! evaluation of models with a bounded context (`windowed`). Inference never uses any of this:
//! itera-core's runtime must agree with `model` (`tests/parity.rs`).

pub mod conv_norm;
pub mod distill_loss;
pub mod gemm;
pub mod lm_head_loss;
pub mod model;
pub mod scan;
pub mod swiglu;
pub mod windowed;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use itera_core::tensors::{HostTensor, Weights};

pub use model::{ForwardOutput, Model};

use crate::error::{Error, Result};

/// A model's tensors as candle tensors by name: plain for evaluation, `Var`-backed for training.
#[derive(Clone, Debug)]
pub struct Params {
    pub tensors: BTreeMap<String, Tensor>,
}

impl Params {
    /// Host f32 weights as candle tensors on the CPU.
    pub fn from_weights(w: &Weights) -> Result<Self> {
        let tensors = w
            .tensors
            .iter()
            .map(|(k, t)| {
                let tensor = Tensor::from_slice(&t.data, t.shape.as_slice(), &Device::Cpu)?;
                Ok((k.clone(), tensor))
            })
            .collect::<Result<_>>()?;
        Ok(Self { tensors })
    }

    /// Back to host f32 weights (for saving, and for the inference runtime).
    pub fn to_weights(&self) -> Result<Weights> {
        let tensors = self
            .tensors
            .iter()
            .map(|(k, t)| {
                let data = t.flatten_all()?.to_vec1::<f32>()?;
                Ok((k.clone(), HostTensor::new(t.dims().to_vec(), data)))
            })
            .collect::<Result<_>>()?;
        Ok(Weights { tensors })
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::Train(format!("tensor `{name}` missing")))
    }

    pub fn parameter_count(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
    }
}
