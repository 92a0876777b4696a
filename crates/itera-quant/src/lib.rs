//! Compression for Itera-Lite models: which tensor gets which storage type (a `Plan`), writing
//! the quantized model as one GGUF, measuring each tensor's sensitivity to each type, and choosing
//! a mixed-precision plan from those measurements, and GPTQ (`gptq`: rounding that compensates
//! each error with calibration inputs). The kernels that run the result live in
//! `itera_core::kernels`. Also expert pruning (`prune`): the other way to make a model smaller.

pub mod gptq;
mod linalg;
pub mod plan;
pub mod prune;
pub mod sensitivity;

pub use plan::{Plan, Scheme};
pub use sensitivity::{SensitivityReport, TensorSensitivity};

/// What the unit tests share: a small MoE model and a token stream for it.
#[cfg(test)]
pub(crate) mod testing {
    use itera_core::tensors::Weights;
    use itera_core::ModelConfig;

    /// `micro` with experts on both layers (4, top 2) and a 64-token vocabulary.
    pub fn tiny() -> (ModelConfig, Weights) {
        let mut cfg = ModelConfig::preset("micro").unwrap();
        cfg.vocab_size = 64;
        cfg.n_experts = 4;
        cfg.top_k = 2;
        cfg.moe_layers = vec![0, 1];
        cfg.validate().unwrap();
        let w = Weights::init(&cfg, 3).unwrap();
        (cfg, w)
    }

    /// `n` tokens of a fixed pattern over the 64-token vocabulary.
    pub fn tokens(n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| (i * 7 + i / 3) % 64).collect()
    }
}
