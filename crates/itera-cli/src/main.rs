//! `itera`: a thin command line over the Itera-Lite crates. This file is the dispatch; each
//! command is one module of `cmd` (its flags and what it prints).

use clap::{Parser, Subcommand};

mod cmd;

use cmd::*;

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
    Data(data::DataArgs),
    /// Byte-level BPE tokenizer commands
    Tokenizer {
        #[command(subcommand)]
        command: tokenizer::TokenizerCommand,
    },
    /// Train a model from scratch, or resume a run
    Train(Box<train::TrainArgs>),
    /// Distil a teacher model into a smaller student (KL to the teacher + cross-entropy)
    Distill(Box<distill::DistillArgs>),
    /// Remove experts from every MoE layer (chosen on calibration text), optionally heal, report routing
    Prune(Box<prune::PruneArgs>),
    /// Generate text from a prompt (streams to stdout)
    Generate(generate::GenerateArgs),
    /// Evaluate a model on held-out text: NLL, perplexity, bits per byte
    Eval(eval::EvalArgs),
    /// Measure inference speed (prefill, decode, batched decode), start-up time and memory
    Bench(bench::BenchArgs),
    /// Serve the model over HTTP: OpenAI-style /v1/completions (streaming), /health, /metrics, playground at /
    Serve(serve::ServeArgs),
    /// Write a quantized model as one GGUF file (f16, bf16, q8_0, q5_0, q4_0, q4_1, nf4 or a mix)
    Quantize(quantize::QuantizeArgs),
    /// Measure each tensor's sensitivity to each quantized type (KL to f32 on validation text)
    Sensitivity(sensitivity::SensitivityArgs),
    /// Show a model's, GGUF file's or preset's configuration, tensor types and parameter counts
    Inspect(inspect::InspectArgs),
    /// Export the model to ONNX (the recurrent step and a prefill graph) for onnxruntime
    Export(export::ExportArgs),
}

/// Dies quietly on a closed pipe (`itera inspect | head`), as other Unix tools do, instead of
/// panicking in `println!`.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any threads start.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Log lines (progress without a terminal, notes, the server's request log) on stderr;
/// `ITERA_LOG` sets the level (error, warn, info, debug, trace; default info).
fn init_logs(json: bool) {
    let level = std::env::var("ITERA_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && !json)
        .with_target(false);
    if json {
        logs.json().init();
    } else {
        logs.without_time().init();
    }
}

fn main() {
    default_sigpipe();
    let cli = Cli::parse();
    init_logs(matches!(&cli.command, Command::Serve(a) if a.log_format == "json"));
    // Only training keeps freed buffers for reuse; the server returns memory after big requests.
    if matches!(
        cli.command,
        Command::Train(_) | Command::Distill(_) | Command::Prune(_)
    ) {
        itera_train::process::prepare();
    }
    let result = match cli.command {
        Command::Data(a) => data::run(a),
        Command::Tokenizer { command } => tokenizer::run(command),
        Command::Train(a) => train::run(*a),
        Command::Distill(a) => distill::run(*a),
        Command::Prune(a) => prune::run(*a),
        Command::Generate(a) => generate::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Sensitivity(a) => sensitivity::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Export(a) => export::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
