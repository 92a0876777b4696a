//! `itera eval`: NLL, perplexity and bits per byte of held-out text (recurrent, stepwise or
//! windowed).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use itera_core::eval::{evaluate_in, EvalReport, EVAL_CHUNK};
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
    /// Held-out text file(s); several are scored one by one (each from a fresh state) and then
    /// together, as one text of their summed tokens and bytes
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Also report word-level perplexity (PTB convention: words + one end-of-sentence per line)
    #[arg(long)]
    pub word_level: bool,
    /// Score with sliding windows of the model's training context (half a context of stride)
    /// instead of carrying the recurrent state through the whole text; attention models always
    /// are. Needs a model directory.
    #[arg(long)]
    pub windowed: bool,
    /// Read the text one token per forward pass, as `itera generate` decodes: a quantized model
    /// then runs its decode kernels (int8 activations against the codes) instead of prefill's,
    /// so this is its quality as generation sees it. Slower (the default reads 256 at a time)
    #[arg(long, conflicts_with = "windowed")]
    pub stepwise: bool,
    /// Print the scores as one JSON object
    #[arg(long)]
    pub json: bool,
}

/// The loaded model, scored the way its kind (or `--windowed`) asks.
enum Scorer {
    /// The recurrent runtime, reading this many tokens per forward pass.
    Recurrent(Box<Generator>, usize),
    Windowed(Box<ModelDir>),
}

impl Scorer {
    fn protocol(&self) -> &'static str {
        match self {
            Scorer::Recurrent(_, 1) => "stepwise",
            Scorer::Recurrent(..) => "recurrent",
            Scorer::Windowed(_) => "windowed",
        }
    }

    fn score(&self, text: &str, progress: impl FnMut(usize, usize)) -> Result<EvalReport> {
        Ok(match self {
            Scorer::Recurrent(m, rows) => {
                evaluate_in(&m.runtime, &m.tokenizer, text, *rows, progress)?
            }
            Scorer::Windowed(m) => {
                evaluate_windowed(&m.config, &m.weights, &m.tokenizer, text, progress)?
            }
        })
    }
}

pub fn run(a: EvalArgs) -> Result<()> {
    let path = a.model.path();
    // Every file is read (and checked) before the model is loaded and any scoring starts.
    let texts = a
        .data
        .iter()
        .map(|f| itera_train::data::read_text(f))
        .collect::<Result<Vec<_>, _>>()?;
    let loading = || format!("loading model {}", path.display());
    // Attention models have no recurrent runtime: sliding windows over the reference forward.
    let attention = !read_config(&path)
        .with_context(loading)?
        .mixer
        .is_recurrent();
    if attention && a.stepwise {
        bail!(
            "--stepwise needs a recurrent model: attention models are scored with sliding windows"
        );
    }
    if a.windowed && !path.is_dir() {
        bail!("--windowed needs a model directory (config.json + model.safetensors), not a .gguf file");
    }
    let scorer = if attention || a.windowed {
        Scorer::Windowed(Box::new(ModelDir::load(&path).with_context(loading)?))
    } else {
        let rows = if a.stepwise { 1 } else { EVAL_CHUNK };
        Scorer::Recurrent(
            Box::new(Generator::load(&path).with_context(loading)?),
            rows,
        )
    };
    let mut reports = Vec::new();
    let t0 = Instant::now();
    for (file, text) in a.data.iter().zip(&texts) {
        let pb = bar(
            1,
            "{bar:30} {bytes}/{total_bytes} [{elapsed_precise}<{eta_precise}]",
        );
        let progress = |done: usize, total: usize| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        };
        let r = scorer
            .score(text, progress)
            .with_context(|| format!("scoring {}", file.display()))?;
        pb.finish_and_clear();
        reports.push(r);
    }
    let speed = reports.iter().map(|r| r.tokens).sum::<usize>() as f64 / t0.elapsed().as_secs_f64();
    let total = EvalReport::combine(&reports).expect("clap requires one --data file");
    if a.json {
        let report_json = |r: &EvalReport, data: Option<&PathBuf>| -> Result<serde_json::Value> {
            let mut v = serde_json::to_value(r)?;
            if let Some(f) = data {
                v["data"] = json!(f.display().to_string());
            }
            if !a.word_level {
                v.as_object_mut().unwrap().remove("word_perplexity");
            }
            Ok(v)
        };
        // One file: its report at the top level, as always; several: one per file and the total.
        let mut v = if reports.len() == 1 {
            report_json(&reports[0], Some(&a.data[0]))?
        } else {
            let files = reports
                .iter()
                .zip(&a.data)
                .map(|(r, f)| report_json(r, Some(f)))
                .collect::<Result<Vec<_>>>()?;
            json!({"files": files, "total": report_json(&total, None)?})
        };
        v["model"] = json!(path.display().to_string());
        v["tokens_per_s"] = json!(speed);
        v["protocol"] = json!(scorer.protocol());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if reports.len() == 1 {
        let r = &reports[0];
        println!("model            {}", path.display());
        println!(
            "data             {} ({} bytes, {} tokens)",
            a.data[0].display(),
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
        println!("speed            {speed:.0} tokens/s");
    } else {
        println!("model {} ({})", path.display(), scorer.protocol());
        let word = if a.word_level { "  word ppl" } else { "" };
        println!(
            "{:>10} {:>9} {:>9} {:>10} {:>10}{word}  data",
            "bytes", "tokens", "NLL", "token ppl", "bits/byte"
        );
        let names = a.data.iter().map(|f| f.display().to_string());
        for (r, name) in reports
            .iter()
            .chain([&total])
            .zip(names.chain(["all".into()]))
        {
            let word = if a.word_level {
                format!(" {:>10.2}", r.word_perplexity)
            } else {
                String::new()
            };
            println!(
                "{:>10} {:>9} {:>9.4} {:>10.3} {:>10.4}{word}  {name}",
                r.bytes, r.tokens, r.mean_nll, r.token_perplexity, r.bits_per_byte
            );
        }
        println!("speed {speed:.0} tokens/s");
    }
    Ok(())
}
