//! `itera tokenizer train`: a byte-level BPE from text files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use clap::Subcommand;
use itera_core::Tokenizer;
use itera_train::data::expand_inputs;

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE on text files and write tokenizer.json
    Train {
        /// Text files or folders of .txt files
        #[arg(long, required = true, num_args = 1..)]
        data: Vec<PathBuf>,
        /// Vocabulary size, special tokens included
        #[arg(long, default_value_t = 8000)]
        vocab: usize,
        /// Where to write the tokenizer (folders created as needed)
        #[arg(long, default_value = "tokenizer.json")]
        out: PathBuf,
    },
}

pub fn run(c: TokenizerCommand) -> Result<()> {
    match c {
        TokenizerCommand::Train { data, vocab, out } => train(&data, vocab, &out),
    }
}

fn train(data: &[PathBuf], vocab: usize, out: &Path) -> Result<()> {
    let files = expand_inputs(data)?;
    for f in &files {
        // Refuses empty and non-UTF-8 files by name (training on them yields no merges).
        itera_train::data::read_text(f)?;
    }
    let t0 = Instant::now();
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let tok = Tokenizer::train(&names, vocab)?;
    tok.save(out)?;
    println!(
        "trained a {}-token byte-level BPE on {} file(s) in {:.1}s -> {}",
        tok.vocab_size(),
        files.len(),
        t0.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}
