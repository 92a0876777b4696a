//! One module per command: its flags (clap `Args`) and a `run` that calls the libraries and
//! prints. Rules about models and training live in the libraries, not here.

pub mod bench;
pub mod data;
pub mod distill;
pub mod eval;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod progress;
pub mod prune;
pub mod quantize;
pub mod sensitivity;
pub mod serve;
pub mod tokenizer;
pub mod train;

use std::path::PathBuf;

use clap::Args;
use itera_core::format::model_dir::default_model_path;

/// The `--model` flag every inference command shares.
#[derive(Args)]
pub struct ModelArg {
    /// Model directory or .gguf file (default: the shipped models/itera-lite-tiny, or $ITERA_MODEL)
    #[arg(long)]
    pub model: Option<PathBuf>,
}

impl ModelArg {
    pub fn path(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(default_model_path)
    }
}
