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

use anyhow::{bail, Result};
use clap::Args;
use itera_core::format::model_dir::default_model_path;
use itera_core::ModelDir;

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

/// Where calibration text is read from in each file (`--calibration`).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum CalibrationArg {
    /// Pieces of 512 tokens spread over the part of each file that training keeps (before its
    /// last 2%, the tail a run holds out)
    Spread,
    /// The start of each file (how every figure before 2026-12-02's twenty-first session was
    /// calibrated)
    Start,
}

/// `tokens` tokens of calibration text, an equal share from each file, read as `from` says
/// (what `prune` and `quantize --gptq` calibrate on). `flag` names the token count's flag in
/// the error.
pub(super) fn calibration(
    model: &ModelDir,
    files: &[PathBuf],
    tokens: usize,
    from: CalibrationArg,
    flag: &str,
) -> Result<Vec<u32>> {
    if tokens < 2 {
        bail!("{flag} must be at least 2");
    }
    let from = match from {
        CalibrationArg::Spread => itera_train::data::CalibrationFrom::Spread,
        CalibrationArg::Start => itera_train::data::CalibrationFrom::Start,
    };
    Ok(itera_train::data::calibration_tokens(
        &model.tokenizer,
        files,
        tokens,
        from,
    )?)
}
