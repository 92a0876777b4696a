//! `itera generate`: streams text from a prompt.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use itera_core::{Generator, SamplingParams};
use serde_json::json;

use super::ModelArg;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// The text to continue (may be omitted with --load-state)
    #[arg(long, required_unless_present = "load_state", default_value = "")]
    pub prompt: String,
    /// Continue the stream saved in this file (by --save-state) exactly where it stopped: its
    /// state, logits, sampler RNG and history; the prompt, if any, is read first
    #[arg(long)]
    pub load_state: Option<std::path::PathBuf>,
    /// After generating, save the stream (recurrent state, logits, sampler) to this file
    #[arg(long)]
    pub save_state: Option<std::path::PathBuf>,
    /// Tokens to generate after the prompt
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// 0 = greedy
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all)
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens with this much probability
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Seed of the sampler (the same seed, prompt and flags give the same text)
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Divide the logits of tokens already in the text by this (1 = off; 1.1-1.3 curbs loops)
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Subtract this from the logit of every token generated so far (OpenAI's; -2..2)
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// Subtract this per time a token was generated so far (OpenAI's; -2..2)
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Keep only tokens with at least this fraction of the top token's probability (0 = off)
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Also draw placeholder tokens (PTB's `<unk>`, a word its corpus removed), which are
    /// otherwise never generated
    #[arg(long)]
    pub allow_unk: bool,
    /// Print one JSON object instead of streaming text
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let path = a.model.path();
    let generator =
        Generator::load(&path).with_context(|| format!("loading model {}", path.display()))?;
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        repetition_penalty: a.repetition_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        min_p: a.min_p,
        logit_bias: Vec::new(),
        allow_placeholders: a.allow_unk,
    };
    let t0 = Instant::now();
    let saved = match &a.load_state {
        Some(p) => Some(
            itera_core::format::state_file::load(p, &generator.runtime)
                .with_context(|| format!("loading state {}", p.display()))?,
        ),
        None => None,
    };
    let mut stream = generator.stream_from(saved, &a.prompt, a.max_tokens, params)?;
    if a.save_state.is_some() {
        stream.hold_pending();
    }
    let mut text = String::new();
    let mut out = std::io::stdout().lock();
    if !a.json {
        write!(out, "{}", a.prompt)?;
        out.flush()?;
    }
    for piece in stream.by_ref() {
        let piece = piece?;
        if !a.json {
            write!(out, "{piece}")?;
            out.flush()?;
        }
        text.push_str(&piece);
    }
    let secs = t0.elapsed().as_secs_f64();
    if let Some(p) = &a.save_state {
        itera_core::format::state_file::save(p, &generator.runtime, &stream.saved())
            .with_context(|| format!("saving state {}", p.display()))?;
    }
    if a.json {
        let v = json!({"prompt": a.prompt, "text": text, "prompt_tokens": stream.prompt_tokens, "generated_tokens": stream.generated, "seconds": secs});
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}
