//! `itera`: a thin command line over itera-core and itera-train.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use itera_core::checkpoint::{default_model_path, CONFIG_FILE};
use itera_core::config::Mixer;
use itera_core::eval::{evaluate, evaluate_windowed};
use itera_core::{Generator, ModelConfig, ModelDir, SamplingParams, Tokenizer};
use itera_train::corpora::{self, Event};
use itera_train::data::{expand_inputs, Corpus};
use itera_train::{Run, TrainEvent, TrainOptions};
use serde_json::json;

mod bench;
mod compress;

#[derive(Parser)]
#[command(
    name = "itera",
    version,
    about = "Train, evaluate and run small selective-SSM + MoE language models on a CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download and prepare the English corpora (PTB, Brown, SOTU, Shakespeare, Austen) into a folder
    Data(DataArgs),
    /// Byte-level BPE tokenizer commands
    Tokenizer {
        #[command(subcommand)]
        command: TokenizerCommand,
    },
    /// Train a model from scratch, or resume a run
    Train(Box<TrainArgs>),
    /// Generate text from a prompt (streams to stdout)
    Generate(GenerateArgs),
    /// Evaluate a model on held-out text: NLL, perplexity, bits per byte
    Eval(EvalArgs),
    /// Measure inference speed (prefill, decode, batched decode), start-up time and memory
    Bench(BenchArgs),
    /// Serve the model over HTTP: OpenAI-style /v1/completions (streaming), /health, /metrics, playground at /
    Serve(ServeArgs),
    /// Write a quantized model as one GGUF file (f16, bf16, q8_0, q5_0, q4_0, q4_1, nf4 or a mix)
    Quantize(QuantizeArgs),
    /// Measure each tensor's sensitivity to each quantized type (KL to f32 on validation text)
    Sensitivity(SensitivityArgs),
    /// Show a model's, GGUF file's or preset's configuration, tensor types and parameter counts
    Inspect(InspectArgs),
}

#[derive(Args)]
struct DataArgs {
    /// Where the text files go
    #[arg(long, default_value = "data")]
    dir: PathBuf,
    /// Only these corpora (ptb, brown, sotu, shakespeare, austen); default all
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Print the manifest as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE on text files and write tokenizer.json
    Train {
        /// Text files or folders of .txt files
        #[arg(long, required = true, num_args = 1..)]
        data: Vec<PathBuf>,
        /// Vocabulary size, special tokens included
        #[arg(long, default_value_t = 8000)]
        vocab: usize,
        #[arg(long, default_value = "tokenizer.json")]
        out: PathBuf,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// Architecture preset: tiny, micro, small, medium, or the baseline transformer-tiny
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// A config.json overriding the preset
    #[arg(long)]
    config: Option<PathBuf>,
    /// Use the shared-state SSM (one N-dimensional state per layer for all channels, as in the
    /// original Itera-Lite) instead of Mamba's per-channel states
    #[arg(long)]
    shared_state: bool,
    /// Training text files or folders (several allowed)
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Validation text; without it the last --holdout of each training file is held out
    #[arg(long, num_args = 1..)]
    valid: Vec<PathBuf>,
    #[arg(long, default_value_t = 0.02)]
    holdout: f64,
    /// tokenizer.json to use; without it a BPE of the model's vocab size is trained on --data
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Total optimizer steps
    #[arg(long)]
    steps: Option<usize>,
    /// Alternatively, passes over the training tokens
    #[arg(long, conflicts_with = "steps")]
    epochs: Option<f64>,
    /// Run directory (checkpoints, metrics.jsonl, loss.png); default runs/<preset>
    #[arg(long)]
    run: Option<PathBuf>,
    /// Continue the run in this directory from its last checkpoint
    #[arg(long, conflicts_with_all = ["preset", "config", "tokenizer", "epochs"])]
    resume: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Training context in tokens (default: the config's context)
    #[arg(long)]
    seq_len: Option<usize>,
    /// Peak learning rate
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Weight of the MoE load-balancing loss
    #[arg(long, default_value_t = 0.01)]
    aux_weight: f64,
    #[arg(long, default_value_t = 200)]
    eval_every: usize,
    #[arg(long, default_value_t = 64)]
    eval_windows: usize,
    #[arg(long, default_value_t = 500)]
    save_every: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the final validation as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ModelArg {
    /// Model directory or .gguf file (default: the shipped models/itera-lite-tiny)
    #[arg(long)]
    model: Option<PathBuf>,
}

impl ModelArg {
    fn path(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(default_model_path)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// 0 = greedy
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the k most likely tokens (0 = all)
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Keep the smallest set of tokens with this much probability
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print one JSON object instead of streaming text
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Held-out text file
    #[arg(long)]
    data: PathBuf,
    /// Also report word-level perplexity (PTB convention: words + one end-of-sentence per line)
    #[arg(long)]
    word_level: bool,
    /// Score with sliding windows of the model's training context (half a context of stride)
    /// instead of carrying the recurrent state through the whole text; attention models always
    /// are. Needs a model directory.
    #[arg(long)]
    windowed: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Short runs with one repeat (a smoke test, not a measurement)
    #[arg(long)]
    quick: bool,
    /// Only these measurements: peak, prefill, eval, decode, batched, startup (comma-separated)
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Also time decode and prefill against this model, alternating runs, and report the ratios
    #[arg(long)]
    baseline: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Address to listen on (loopback by default; use 0.0.0.0 to accept other machines)
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (or set ITERA_API_KEY)
    #[arg(long, env = "ITERA_API_KEY")]
    api_key: Option<String>,
    /// Streams decoded together at most (continuous batching)
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Requests that may wait for the batch; beyond it the server answers 503 with Retry-After
    #[arg(long, default_value_t = 256)]
    queue: usize,
    /// Largest max_tokens a request may ask for
    #[arg(long, default_value_t = 4096)]
    max_tokens_cap: usize,
    /// Prompt-state cache size in MB
    #[arg(long, default_value_t = 64)]
    cache_mb: usize,
    /// Largest request body in KB
    #[arg(long, default_value_t = 1024)]
    body_limit_kb: usize,
}

#[derive(Args)]
struct QuantizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// f32, f16, bf16, q8_0, q5_0, q4_0, q4_1, nf4, or mixed (per-tensor types from measured sensitivity)
    #[arg(long)]
    scheme: String,
    /// Output .gguf file
    #[arg(long)]
    out: PathBuf,
    /// mixed: average bits per weight over the whole model
    #[arg(long)]
    bits: Option<f64>,
    /// mixed: use this plan (JSON from an earlier run) instead of choosing one
    #[arg(long)]
    plan: Option<PathBuf>,
    /// mixed: a report from `itera sensitivity` instead of measuring again
    #[arg(long)]
    sensitivity: Option<PathBuf>,
    /// mixed: validation text to measure sensitivity on
    #[arg(long)]
    data: Option<PathBuf>,
    /// Tokens of validation text to measure on
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SensitivityArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Validation text
    #[arg(long)]
    data: PathBuf,
    /// Tokens of validation text to measure on
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Where the JSON report goes
    #[arg(long, default_value = "sensitivity.json")]
    out: PathBuf,
    /// Also choose a mixed plan at this average bits per weight (saved as JSON and PNG)
    #[arg(long)]
    bits: Option<f64>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InspectArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Inspect a preset instead of a model
    #[arg(long, conflicts_with = "model")]
    preset: Option<String>,
    #[arg(long)]
    json: bool,
}

/// Keeps large training buffers in the heap for reuse: by default glibc returns every block over
/// 128 KiB to the kernel, and re-faulting those pages cost ~12% of a training step.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only adjusts allocator tuning parameters; called before any threads start.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 256 << 20);
            mallopt(M_TRIM_THRESHOLD, 512 << 20);
        }
    }
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Data(a) => cmd_data(a),
        Command::Tokenizer {
            command: TokenizerCommand::Train { data, vocab, out },
        } => cmd_tokenizer_train(&data, vocab, &out),
        Command::Train(a) => cmd_train(*a),
        Command::Generate(a) => cmd_generate(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Bench(a) => bench::run(
            &a.model.path(),
            bench::Options {
                json: a.json,
                quick: a.quick,
                only: a.only,
                baseline: a.baseline,
            },
        ),
        Command::Serve(a) => cmd_serve(a),
        Command::Quantize(a) => compress::quantize(compress::QuantizeArgs {
            model: a.model.path(),
            scheme: a.scheme,
            out: a.out,
            bits: a.bits,
            plan: a.plan,
            sensitivity: a.sensitivity,
            data: a.data,
            tokens: a.tokens,
            json: a.json,
        }),
        Command::Sensitivity(a) => compress::sensitivity_cmd(compress::SensitivityArgs {
            model: a.model.path(),
            data: a.data,
            tokens: a.tokens,
            out: a.out,
            bits: a.bits,
            json: a.json,
        }),
        Command::Inspect(a) => cmd_inspect(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

/// A progress line that survives when stderr is not a terminal (indicatif then hides the bar).
fn say(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

fn cmd_data(a: DataArgs) -> Result<()> {
    let pb = bar(corpora::CORPORA.len() as u64, "{bar:30} {pos}/{len} {msg}");
    let manifest = corpora::prepare(&a.dir, &a.only, |e| match e {
        Event::Skipped(c) => {
            say(&pb, format!("{:<12} already prepared", c.name));
            pb.inc(1);
        }
        Event::Downloading(c) => pb.set_message(format!(
            "{}: downloading {} `{}`",
            c.name, c.registry, c.package
        )),
        Event::Extracting(c) => pb.set_message(format!("{}: extracting", c.name)),
        Event::Done(c, files) => {
            for (f, s) in files {
                say(
                    &pb,
                    format!(
                        "{:<12} {f}: {} bytes, {} words, {} lines",
                        c.name, s.bytes, s.words, s.lines
                    ),
                );
            }
            pb.inc(1);
        }
    })?;
    pb.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
    } else {
        println!("corpora ready in {}", a.dir.display());
    }
    Ok(())
}

fn as_strings(files: &[PathBuf]) -> Vec<String> {
    files.iter().map(|p| p.display().to_string()).collect()
}

fn cmd_tokenizer_train(data: &[PathBuf], vocab: usize, out: &Path) -> Result<()> {
    let files = expand_inputs(data)?;
    let t0 = Instant::now();
    let tok = Tokenizer::train(&as_strings(&files), vocab)?;
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

fn cmd_train(a: TrainArgs) -> Result<()> {
    let mut run = if let Some(dir) = &a.resume {
        let run =
            Run::resume(dir, a.steps).with_context(|| format!("resuming {}", dir.display()))?;
        eprintln!(
            "resuming {} at step {} of {}",
            dir.display(),
            run.step(),
            run.options.steps
        );
        run
    } else {
        if a.data.is_empty() {
            bail!("--data is required (text files or folders to train on)");
        }
        let mut config = match &a.config {
            Some(p) => ModelConfig::from_json(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
                &p.display().to_string(),
            )?,
            None => ModelConfig::preset(&a.preset)?,
        };
        if a.shared_state {
            if !config.mixer.is_recurrent() {
                bail!(
                    "--shared-state applies to SSM models, not `{}`",
                    config.preset
                );
            }
            config.mixer = Mixer::SharedState;
        }
        let tokenizer = match &a.tokenizer {
            Some(p) => Tokenizer::from_file(p)?,
            None => {
                eprintln!(
                    "training a {}-token BPE on the training data...",
                    config.vocab_size
                );
                Tokenizer::train(&as_strings(&expand_inputs(&a.data)?), config.vocab_size)?
            }
        };
        if tokenizer.vocab_size() < config.vocab_size {
            eprintln!(
                "note: the tokenizer has {} tokens; the model's vocab shrinks to match",
                tokenizer.vocab_size()
            );
            config.vocab_size = tokenizer.vocab_size();
        }
        let mut o = TrainOptions::new(a.data.clone(), a.steps.unwrap_or(1000));
        o.valid_files = a.valid.clone();
        o.holdout = a.holdout;
        o.batch_size = a.batch_size;
        o.seq_len = a.seq_len.unwrap_or(config.context);
        if !config.mixer.is_recurrent() && o.seq_len > config.context {
            bail!(
                "--seq-len {} exceeds the attention model's context of {} (its learned positions)",
                o.seq_len,
                config.context
            );
        }
        o.lr = a.lr;
        o.warmup = a.warmup;
        o.optimizer.weight_decay = a.weight_decay;
        o.optimizer.grad_clip = a.grad_clip;
        o.aux_weight = a.aux_weight;
        o.eval_every = a.eval_every;
        o.eval_windows = a.eval_windows;
        o.save_every = a.save_every;
        o.seed = a.seed;
        let dir = a
            .run
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&config.preset));
        Run::create(&dir, config, tokenizer, o)?
    };
    eprintln!("tokenizing the training data...");
    let o = run.options.clone();
    let corpus = Corpus::load(&run.tokenizer, &o.train_files, &o.valid_files, o.holdout)?;
    if !corpus.heldout.is_empty() {
        // Keep the exact held-out slices so each source can be evaluated later with `itera eval`.
        let dir = run.dir.join("heldout");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, text) in &corpus.heldout {
            itera_core::checkpoint::write_atomic(&dir.join(name), text.as_bytes())?;
        }
    }
    if let Some(epochs) = a.epochs {
        run.options.steps = ((epochs * corpus.train.len() as f64)
            / (o.batch_size * o.seq_len) as f64)
            .ceil()
            .max(1.0) as usize;
    }
    let pb = bar(
        run.options.steps as u64,
        "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    );
    pb.set_position(run.step() as u64);
    let mut speeds = Vec::new();
    let final_eval = run.train(&corpus, &mut |e| match e {
        TrainEvent::Start { start_step, total_steps, train_tokens, valid_tokens, parameters } => say(&pb, format!(
            "{parameters} parameters; {train_tokens} training / {valid_tokens} validation tokens; steps {start_step}..{total_steps}"
        )),
        TrainEvent::Step(m) => {
            speeds.push(m.tokens_per_s);
            pb.set_position(m.step as u64);
            pb.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s", m.ce, m.lr, m.tokens_per_s));
        }
        TrainEvent::Eval(e) => say(&pb, format!("step {:>6}  val loss {:.4}  val bpb {:.4}", e.step, e.val_loss, e.val_bpb)),
        TrainEvent::Saved(p) => say(&pb, format!("step {:>6}  checkpoint -> {}", run_step_hint(p), p.display())),
    })?;
    pb.finish_and_clear();
    // Median over the steps of this invocation, skipping the first few (allocation warm-up).
    let mut steady: Vec<f64> = speeds.iter().skip(speeds.len().min(5)).copied().collect();
    steady.sort_by(|a, b| a.total_cmp(b));
    let median_speed = steady.get(steady.len() / 2).copied().unwrap_or(0.0);
    if a.json {
        let mut v = serde_json::to_value(&final_eval)?;
        v["train_tokens_per_s_median"] = json!(median_speed);
        v["threads"] = json!(std::thread::available_parallelism().map_or(1, |n| n.get()));
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "training speed: median {median_speed:.0} tokens/s over {} steps",
            steady.len()
        );
        println!(
            "done: step {} val loss {:.4} val bpb {:.4}; model in {}/checkpoint (best in {}/best)",
            final_eval.step,
            final_eval.val_loss,
            final_eval.val_bpb,
            run.dir.display(),
            run.dir.display()
        );
    }
    Ok(())
}

fn run_step_hint(p: &Path) -> String {
    std::fs::read_to_string(p.join("train_state.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["step"].as_u64())
        .map_or_else(|| "?".into(), |s| s.to_string())
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let path = a.model.path();
    let generator =
        Generator::load(&path).with_context(|| format!("loading model {}", path.display()))?;
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    let t0 = Instant::now();
    let mut stream = generator.stream(&a.prompt, a.max_tokens, params)?;
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
    if a.json {
        let v = json!({"prompt": a.prompt, "text": text, "prompt_tokens": stream.prompt_tokens, "generated_tokens": stream.generated, "seconds": secs});
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let path = a.model.path();
    let text = itera_train::data::read_text(&a.data)?;
    let pb = bar(
        1,
        "{bar:30} {pos}/{len} tokens [{elapsed_precise}<{eta_precise}]",
    );
    let progress = |done: usize, total: usize| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    };
    let loading = || format!("loading model {}", path.display());
    let t0 = Instant::now();
    // Attention models have no recurrent runtime: sliding windows over the reference forward.
    let attention = path.is_dir()
        && std::fs::read_to_string(path.join(CONFIG_FILE))
            .ok()
            .and_then(|t| ModelConfig::from_json(&t, CONFIG_FILE).ok())
            .is_some_and(|c| !c.mixer.is_recurrent());
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

fn cmd_serve(a: ServeArgs) -> Result<()> {
    let model = a.model.path();
    let addr: std::net::SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .with_context(|| format!("invalid --host/--port {}:{}", a.host, a.port))?;
    let name = model
        .file_stem()
        .map_or("itera-lite".into(), |n| n.to_string_lossy().to_string());
    let cfg = itera_serve::ServeConfig {
        model,
        model_name: name,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        max_batch: a.max_batch,
        queue: a.queue,
        max_tokens_cap: a.max_tokens_cap,
        cache_bytes: a.cache_mb << 20,
        body_limit: a.body_limit_kb << 10,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(itera_serve::serve(addr, cfg, |bound| {
        eprintln!("listening on http://{bound}");
    }))
    .with_context(|| format!("serving on {addr}"))
}

fn cmd_inspect(a: InspectArgs) -> Result<()> {
    if a.preset.is_none() && a.model.path().is_file() {
        return compress::inspect_gguf(&a.model.path(), a.json);
    }
    let (config, source, actual) = match &a.preset {
        Some(p) => (ModelConfig::preset(p)?, format!("preset {p}"), None),
        None => {
            let path = a.model.path();
            let m = ModelDir::load(&path)
                .with_context(|| format!("loading model {}", path.display()))?;
            let n = m.weights.parameter_count();
            (m.config, path.display().to_string(), Some(n))
        }
    };
    let groups = config.parameter_groups();
    let total = actual.unwrap_or_else(|| config.parameter_count());
    if a.json {
        let g: serde_json::Map<String, serde_json::Value> =
            groups.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"source": source, "config": config, "parameters": total, "groups": g})
            )?
        );
        return Ok(());
    }
    println!("{source}");
    match config.mixer {
        Mixer::Attention => println!(
            "  attention: d_model {}  layers {}  heads {}  vocab {}  context {}",
            config.d_model, config.n_layers, config.n_heads, config.vocab_size, config.context
        ),
        mixer => println!(
            "  {} SSM: d_model {}  layers {}  d_inner {}  d_state {}  dt_rank {}  conv {}  vocab {}  context {}",
            if mixer == Mixer::SharedState { "shared-state" } else { "selective" },
            config.d_model, config.n_layers, config.d_inner(), config.d_state, config.dt_rank, config.d_conv, config.vocab_size, config.context
        ),
    }
    if config.ffn_hidden > 0 {
        println!(
            "  dense SwiGLU feed-forward of width {} on the other layers",
            config.ffn_hidden
        );
    }
    println!(
        "  MoE on layers {:?}: {} experts, top-{}, hidden {}",
        config.moe_layers, config.n_experts, config.top_k, config.expert_hidden
    );
    for (name, n) in &groups {
        println!(
            "  {name:<28} {n:>10}  {:>5.1}%",
            100.0 * *n as f64 / total as f64
        );
    }
    println!("  {:<28} {total:>10}", "total");
    Ok(())
}
