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

/// Runs candle's own element-wise ops on the calling thread. Its barrier pool would add a second
/// set of worker threads beside rayon's (ours and gemm's); on 2 cores those spun for ~11% of the
/// CPU samples of a training step while rayon's workers waited (perf, 2026-11-30, AMD EPYC Zen 3).
/// `CANDLE_NUM_THREADS` set by the user still wins.
///
/// Also states rayon's thread count (its own default, the logical CPUs) in `RAYON_NUM_THREADS`:
/// without it candle asks `num_cpus` for the physical core count on every matmul, which parses
/// `/proc/cpuinfo` each time on machines without cpufreq data (2.3% of a training step's samples,
/// perf, 2026-11-30, AMD EPYC Zen 3 VM). rayon's pool is the same either way; candle's matmuls
/// then use the logical count, as rayon does.
fn one_candle_thread() {
    // Edition 2021: set_var is safe; this runs before any thread starts.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
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
        tune_allocator();
        one_candle_thread();
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
