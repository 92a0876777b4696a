//! `itera eval`: NLL, perplexity and bits per byte of held-out text (recurrent or windowed).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use itera_core::eval::evaluate;
use itera_core::format::model_dir::read_config;
use itera_core::{Generator, ModelDir};
use itera_train::reference::windowed::evaluate_windowed;
use serde_json::json;

use super::progress::bar;
use super::ModelArg;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Held-out text file
    #[arg(long)]
    pub data: PathBuf,
    /// Also report word-level perplexity (PTB convention: words + one end-of-sentence per line)
    #[arg(long)]
    pub word_level: bool,
    /// Score with sliding windows of the model's training context (half a context of stride)
    /// instead of carrying the recurrent state through the whole text; attention models always
    /// are. Needs a model directory.
    #[arg(long)]
    pub windowed: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let path = a.model.path();
    let text = itera_train::data::read_text(&a.data)?;
    let pb = bar(
        1,
        "{bar:30} {bytes}/{total_bytes} [{elapsed_precise}<{eta_precise}]",
    );
    let progress = |done: usize, total: usize| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    };
    let loading = || format!("loading model {}", path.display());
    let t0 = Instant::now();
    // Attention models have no recurrent runtime: sliding windows over the reference forward.
    let attention = !read_config(&path)
        .with_context(loading)?
        .mixer
        .is_recurrent();
    if a.windowed && !path.is_dir() {
        bail!("--windowed needs a model directory (config.json + model.safetensors), not a .gguf file");
    }
    let r = if attention || a.windowed {
        let m = ModelDir::load(&path).with_context(loading)?;
        evaluate_windowed(&m.config, &m.weights, &m.tokenizer, &text, progress)?
    } else {
        let m = Generator::load(&path).with_context(loading)?;
        evaluate(&m.runtime, &m.tokenizer, &text, progress)?
    };
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = json!(path.display().to_string());
        v["data"] = json!(a.data.display().to_string());
        v["tokens_per_s"] = json!(r.tokens as f64 / secs);
        v["protocol"] = json!(if attention || a.windowed {
            "windowed"
        } else {
            "recurrent"
        });
        if !a.word_level {
            v.as_object_mut().unwrap().remove("word_perplexity");
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model            {}", path.display());
        println!(
            "data             {} ({} bytes, {} tokens)",
            a.data.display(),
            r.bytes,
            r.tokens
        );
        println!("mean NLL         {:.4} nats/token", r.mean_nll);
        println!("token perplexity {:.3}", r.token_perplexity);
        println!("bits per byte    {:.4}", r.bits_per_byte);
        if a.word_level {
            println!(
                "word perplexity  {:.2}  ({} words + {} end-of-sentence)",
                r.word_perplexity, r.words, r.lines
            );
        }
        println!("speed            {:.0} tokens/s", r.tokens as f64 / secs);
    }
    Ok(())
}
