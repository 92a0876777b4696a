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

/// `tokens` tokens of calibration text: an equal share from the start of each file, so every
/// source of a mixed corpus is represented (what `prune` and `quantize --gptq` calibrate on).
/// `flag` names the token count's flag in the error.
pub(super) fn calibration(
    model: &ModelDir,
    files: &[PathBuf],
    tokens: usize,
    flag: &str,
) -> Result<Vec<u32>> {
    if tokens < 2 {
        bail!("{flag} must be at least 2");
    }
    let paths = itera_train::data::expand_inputs(files)?;
    let share = tokens.div_ceil(paths.len().max(1));
    let mut ids = Vec::new();
    for path in &paths {
        let text = itera_train::data::read_text(path)?;
        // About 4 bytes per token on English: read twice that, cut at a line end.
        let mut cut = share.saturating_mul(8).min(text.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        if cut < text.len() {
            cut = text[..cut].rfind('\n').map_or(cut, |i| i + 1);
        }
        let mut piece = model.tokenizer.encode(&text[..cut])?;
        piece.truncate(share);
        ids.extend(piece);
    }
    ids.truncate(tokens);
    if ids.len() < 2 {
        bail!("the calibration text holds fewer than 2 tokens");
    }
    Ok(ids)
}
