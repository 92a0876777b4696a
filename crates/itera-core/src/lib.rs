//! Itera-Lite core: model config, weights, the parallel forward (training, prefill) and the
//! recurrent step (decoding), checkpoints, tokenizer, sampling, generation and evaluation.

pub mod bench;
pub mod config;
pub mod error;
pub mod fused;
pub mod gguf;
pub mod kernels;
pub mod loss;
pub mod math;
pub mod matmul;
pub mod model;
pub mod pair;
pub mod quant;
pub mod rng;
pub mod runtime;
pub mod scan;
pub mod simd;
pub mod weights;

pub use config::ModelConfig;
pub use error::{Error, Result};
pub use model::Model;
pub use runtime::{Runtime, State};
pub use weights::Weights;
pub mod checkpoint;
pub mod eval;
pub mod generate;
pub mod sample;
pub mod tokenizer;

pub use checkpoint::ModelDir;
pub use generate::Generator;
pub use sample::SamplingParams;
pub use tokenizer::Tokenizer;
