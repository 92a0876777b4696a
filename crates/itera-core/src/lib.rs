//! Itera-Lite core, without candle: what a model is and how it runs on a CPU.
//!
//! Read in data-flow order: `config` (presets) and `tensors` (the one table of tensor names,
//! shapes and roles) say what a model is; `format` reads and writes it (safetensors, GGUF, the
//! model directory); `kernels` multiply by its weights in any storage format, on the threads
//! `exec` allows; `runtime` runs the model over rows (decode, batches, prefill) with a recurrent
//! state per stream; `sample`, `generate`, `eval` and `bench` are what users call.

pub mod bench;
pub mod config;
pub mod error;
pub mod eval;
pub mod exec;
pub mod format;
pub mod generate;
pub mod kernels;
mod lanes16;
pub mod math;
pub mod rng;
pub mod runtime;
pub mod sample;
pub mod simd;
pub mod tensors;
pub mod tokenizer;

pub use config::ModelConfig;
pub use error::{Error, Result};
pub use format::model_dir::ModelDir;
pub use generate::Generator;
pub use runtime::{Runtime, State};
pub use sample::SamplingParams;
pub use tensors::Weights;
pub use tokenizer::Tokenizer;
