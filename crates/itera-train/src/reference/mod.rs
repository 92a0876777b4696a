//! The training side of the model, on candle: the reference model (`model`) and the fused ops
//! it is built from, each with a hand-written backward checked against finite differences or
//! candle's own autograd (`linear`: x · Wᵀ; `scan`: the SSM core; `mixer_block`: a whole residual
//! mixer block, norm and projections included, over the scan's and the conv's kernels; `conv_norm`: causal conv + SiLU and RMSNorm;
//! `swiglu`: the experts' gate silu(g) * u; `moe`: the MoE layer's routed experts; `lm_head_loss`: the tied LM head fused with
//! cross-entropy, over `gemm`; `distill_loss`: the
//! same head fused with the distillation loss against a teacher), plus the windowed
//! evaluation of models with a bounded context (`windowed`). Inference never uses any of this:
//! itera-core's runtime must agree with `model` (`tests/parity.rs`).

pub mod conv_norm;
pub mod distill_loss;
pub mod gemm;
pub mod linear;
pub mod lm_head_loss;
pub mod mixer_block;
pub mod model;
pub mod moe;
mod residual;
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

/// Helpers of the fused ops' tests: random variables and the fused-against-composite check.
#[cfg(test)]
mod testing {
    use candle_core::{Device, Tensor, Var};
    use itera_core::rng::Rng;

    pub fn var(shape: &[usize], seed: u64) -> Var {
        let mut rng = Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    pub fn close(a: &Tensor, b: &Tensor) {
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    /// Fused op and candle's composite autograd give the same values and gradients.
    pub fn compare(
        inputs: &[Var],
        fused: impl Fn(&[&Tensor]) -> Tensor,
        composite: impl Fn(&[&Tensor]) -> Tensor,
    ) {
        let t: Vec<&Tensor> = inputs.iter().map(|v| v.as_tensor()).collect();
        let r = var(fused(&t).dims(), 99);
        let (a, b) = (fused(&t), composite(&t));
        close(&a, &b);
        let ga = (a * r.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (b * r.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in &t {
            close(ga.get(v).unwrap(), gb.get(v).unwrap());
        }
    }
}
