//! Compression for Itera-Lite models: which tensor gets which storage type (a `Plan`), writing
//! the quantized model as one GGUF, measuring each tensor's sensitivity to each type, and choosing
//! a mixed-precision plan from those measurements. The kernels that run the result live in
//! `itera_core::kernels`. Also expert pruning (`prune`): the other way to make a model smaller.

pub mod gptq;
mod linalg;
pub mod plan;
pub mod prune;
pub mod sensitivity;

pub use plan::{Plan, Scheme};
pub use sensitivity::{SensitivityReport, TensorSensitivity};
