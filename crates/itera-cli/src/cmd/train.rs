//! `itera train`: a new run from a preset or config, or `--resume` of an existing one. The rules
//! of a new run live in `itera_train::NewRun`; this module maps flags and reports progress.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use itera_train::{NewRun, Run, TrainEvent, TrainOptions};
use serde_json::json;

use super::progress::{bar, say};

#[derive(Args)]
pub struct TrainArgs {
    /// Architecture preset: tiny, micro, small, medium, or the baseline transformer-tiny
    #[arg(long, default_value = "tiny", conflicts_with = "init")]
    pub preset: String,
    /// A config.json overriding the preset
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Use the shared-state SSM (one N-dimensional state per layer for all channels, as in the
    /// original Itera-Lite) instead of Mamba's per-channel states
    #[arg(long)]
    pub shared_state: bool,
    /// Continue the run in this directory from its last checkpoint
    #[arg(long, conflicts_with_all = ["preset", "config", "init", "tokenizer", "epochs"])]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub flags: TrainFlags,
}

/// The flags of a training run that `itera train`, `itera distill` and `itera prune
/// --heal-steps` share.
#[derive(Args)]
pub struct TrainFlags {
    /// Training text files or folders (several allowed)
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Sampling weight of each --data argument, in order, e.g. 1,1,1,1,0.25: a training window
    /// starts in source i with probability proportional to weight_i x its tokens (default: all
    /// 1, i.e. each source in proportion to its size)
    #[arg(long, value_delimiter = ',')]
    pub source_weights: Vec<f64>,
    /// Validation text; without it the last --holdout of each training file is held out
    #[arg(long, num_args = 1..)]
    pub valid: Vec<PathBuf>,
    /// Fraction of each training file's end held out for validation when --valid is not given
    #[arg(long, default_value_t = 0.02)]
    pub holdout: f64,
    /// Start from this trained model directory (its config, tokenizer and weights) instead of
    /// fresh weights: a fine-tune, or with `itera distill --teacher` the same model,
    /// self-distillation
    #[arg(long, conflicts_with = "tokenizer")]
    pub init: Option<PathBuf>,
    /// tokenizer.json to use; without it a BPE of the model's vocab size is trained on --data
    /// (a distillation student uses its teacher's)
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Total optimizer steps
    #[arg(long)]
    pub steps: Option<usize>,
    /// Alternatively, passes over the training tokens
    #[arg(long, conflicts_with = "steps")]
    pub epochs: Option<f64>,
    /// Run directory (checkpoints, metrics.jsonl, loss.png); default runs/<preset>
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Sequences per optimizer step (tokens per step = batch size x seq len)
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Training context in tokens (default: the config's context)
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Tokens read before each training window only to warm the recurrent state, with no loss
    /// on them: every scored token then has at least this much context, as when `itera eval`
    /// carries the state through a text. Costs their forward and backward (0 = off)
    #[arg(long, default_value_t = 0)]
    pub burn_in: usize,
    /// Peak learning rate (AdamW; after the warmup it follows a cosine down to a tenth of it at
    /// the last step)
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Steps of linear learning-rate warmup from zero
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// AdamW's decoupled weight decay, on the weight matrices and embedding (not on norms, biases,
    /// A_log or D)
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// Scale the gradients down when their global norm exceeds this (0 = no clipping)
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Weight of the MoE load-balancing loss
    #[arg(long, default_value_t = 0.01)]
    pub aux_weight: f64,
    /// Training-time dropout, e.g. `embed=0.1,input=0.2,residual=0.2,output=0.3,expert=0.1`
    /// (locked masks per sequence for input/residual/output; off at inference); `routing=P`
    /// leaves one random expert per MoE layer out of routing with probability P per step;
    /// `spare=P` leaves out each MoE layer's last expert, the one to prune later
    #[arg(long)]
    pub dropout: Option<String>,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.999) and
    /// validate and save the best model with it (0 = off)
    #[arg(long, default_value_t = 0.0)]
    pub ema: f64,
    /// Step from which the moving average is kept
    #[arg(long, default_value_t = 0)]
    pub ema_start: usize,
    /// Validate (and keep the best model in <run>/best) every this many steps, and at the end
    #[arg(long, default_value_t = 200)]
    pub eval_every: usize,
    /// Validation windows of seq-len tokens; 0 = the whole validation text with the state carried
    /// through it, as `itera eval` scores it (attention models: 64 windows)
    #[arg(long, default_value_t = 0)]
    pub eval_windows: usize,
    /// Write a resumable checkpoint (<run>/checkpoint) every this many steps, and at the end
    #[arg(long, default_value_t = 500)]
    pub save_every: usize,
    /// Seed of the weights' initialisation, the training windows' order and the dropout masks
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the final validation and the speed (tokens/s, FLOPs per token, fraction of the
    /// peak measured in the same run, CPU utilisation) as JSON
    #[arg(long)]
    pub json: bool,
}

impl TrainFlags {
    /// A new run of `preset` (or `config`) with these flags.
    pub fn new_run(&self, preset: &str, config: Option<PathBuf>, shared_state: bool) -> NewRun {
        let mut o = TrainOptions::new(self.data.clone(), self.steps.unwrap_or(1000));
        o.valid_files = self.valid.clone();
        o.source_weights = self.source_weights.clone();
        o.holdout = self.holdout;
        o.batch_size = self.batch_size;
        o.burn_in = self.burn_in;
        o.lr = self.lr;
        o.warmup = self.warmup;
        o.optimizer.weight_decay = self.weight_decay;
        o.optimizer.grad_clip = self.grad_clip;
        o.aux_weight = self.aux_weight;
        o.ema = self.ema;
        o.ema_start = self.ema_start;
        o.eval_every = self.eval_every;
        o.eval_windows = self.eval_windows;
        o.save_every = self.save_every;
        o.seed = self.seed;
        NewRun {
            preset: preset.into(),
            config,
            init: self.init.clone(),
            shared_state,
            tokenizer: self.tokenizer.clone(),
            seq_len: self.seq_len,
            dropout: self.dropout.clone(),
            options: o,
        }
    }

    /// Creates the run (in --run, else runs/<preset>).
    pub fn create(&self, new: NewRun) -> Result<Run> {
        let dir = match &self.run {
            Some(d) => d.clone(),
            None => PathBuf::from("runs").join(&new.config()?.preset),
        };
        Ok(new.create(&dir, &mut |line| tracing::info!("{line}"))?)
    }
}

/// Resumes the run in `dir`, optionally to a new total of steps.
pub fn resume(dir: &Path, steps: Option<usize>) -> Result<Run> {
    let run = Run::resume(dir, steps).with_context(|| format!("resuming {}", dir.display()))?;
    tracing::info!(
        "resuming {} at step {} of {}",
        dir.display(),
        run.step(),
        run.options.steps
    );
    Ok(run)
}

pub fn run(a: TrainArgs) -> Result<()> {
    let run = match &a.resume {
        Some(dir) => resume(dir, a.flags.steps)?,
        None => a
            .flags
            .create(a.flags.new_run(&a.preset, a.config.clone(), a.shared_state))?,
    };
    drive(run, a.flags.epochs, a.flags.json)
}

/// One line per training input: its tokens, weight, share of the windows and passes over it.
fn report_sources(run: &Run, corpus: &itera_train::data::Corpus) -> Result<()> {
    let o = &run.options;
    let shares = corpus.window_shares(&o.source_weights, o.window())?;
    if corpus.sources.len() < 2 {
        return Ok(());
    }
    let run_tokens = (o.steps * o.batch_size * o.seq_len) as f64;
    for (i, ((name, r), share)) in corpus.sources.iter().zip(&shares).enumerate() {
        let weight = o.source_weights.get(i).copied().unwrap_or(1.0);
        tracing::info!(
            "{name}: {} training tokens, weight {weight}, {:.1}% of the windows, {:.2} epochs over the run",
            r.len(),
            100.0 * share,
            share * run_tokens / r.len().max(1) as f64
        );
    }
    Ok(())
}

/// Steps of each invocation left out of its timing (allocation warm-up).
const WARMUP_STEPS: usize = 5;

/// Trains `run` to its end with a progress bar (plain log lines without a terminal) and prints
/// the result.
pub fn drive(mut run: Run, epochs: Option<f64>, json: bool) -> Result<()> {
    tracing::info!("tokenizing the training data...");
    let corpus = run.load_corpus()?;
    if let Some(epochs) = epochs {
        run.set_epochs(epochs, &corpus);
    }
    report_sources(&run, &corpus)?;
    let pb = bar(
        run.options.steps as u64,
        "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    );
    pb.set_position(run.step() as u64);
    // Without a terminal, a plain line every ~2% of the run.
    let log_every = (run.options.steps / 50).max(1);
    let mut speeds = Vec::new();
    let mut peak_before = 0.0;
    // (CPU seconds, wall instant) at the last warm-up step of this invocation and at the last.
    let mut clock: Vec<(f64, std::time::Instant)> = Vec::new();
    let final_eval = run.train(&corpus, &mut |e| match e {
        TrainEvent::Start {
            start_step,
            total_steps,
            train_tokens,
            valid_tokens,
            parameters,
        } => say(
            &pb,
            format!(
                "{parameters} parameters; {train_tokens} training / {valid_tokens} validation \
                 tokens; steps {start_step}..{total_steps}"
            ),
        ),
        TrainEvent::Step(m) => {
            speeds.push(m.tokens_per_s);
            if speeds.len() == WARMUP_STEPS {
                // Just before the timed steps, not before the first: that would hold back the
                // first checkpoint by the measurement's second.
                peak_before = machine_peak();
            }
            let now = (cpu_seconds(), std::time::Instant::now());
            if speeds.len() <= WARMUP_STEPS {
                clock = vec![now];
            } else if clock.len() == 1 {
                clock.push(now);
            } else {
                clock[1] = now;
            }
            pb.set_position(m.step as u64);
            let kl = m.kl.map_or(String::new(), |kl| format!(" kl {kl:.4}"));
            let line = format!(
                "loss {:.4}{kl} lr {:.2e} {:.0} tok/s",
                m.ce, m.lr, m.tokens_per_s
            );
            if pb.is_hidden() && m.step.is_multiple_of(log_every) {
                tracing::info!("step {:>6}  {line}", m.step);
            }
            pb.set_message(line);
        }
        TrainEvent::Eval(e) => say(
            &pb,
            format!(
                "step {:>6}  val loss {:.4}  val bpb {:.4}",
                e.step, e.val_loss, e.val_bpb
            ),
        ),
        TrainEvent::Saved(p) => say(
            &pb,
            format!(
                "step {:>6}  checkpoint -> {}",
                run_step_hint(p),
                p.display()
            ),
        ),
    })?;
    pb.finish_and_clear();
    // Median over the steps of this invocation after its warm-up.
    let mut steady: Vec<f64> = speeds
        .iter()
        .skip(speeds.len().min(WARMUP_STEPS))
        .copied()
        .collect();
    steady.sort_by(|a, b| a.total_cmp(b));
    let median_speed = steady.get(steady.len() / 2).copied().unwrap_or(0.0);
    let speed = TrainSpeed::measure(&run, median_speed, &clock, peak_before);
    if json {
        let mut v = serde_json::to_value(&final_eval)?;
        v["train_tokens_per_s_median"] = json!(median_speed);
        v["threads"] = json!(std::thread::available_parallelism().map_or(1, |n| n.get()));
        v["speed"] = json!({
            "flops_per_token": speed.flops_per_token,
            "flops_per_s": speed.flops_per_s,
            "peak_flops_per_s": speed.peak_flops_per_s,
            "fraction_of_peak": speed.fraction_of_peak,
            "cpu_utilisation": speed.cpu_utilisation,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if steady.is_empty() {
            println!(
                "training speed: too few steps to time (the first {WARMUP_STEPS} of a run warm up)"
            );
        } else {
            println!(
                "training speed: median {median_speed:.0} tokens/s over {} steps; {:.1} MFLOP per \
             token (3 x the forward's weight matmuls) = {:.1} GFLOP/s, {:.1}% of the {:.0} GFLOP/s \
             peak measured in this run (the larger of before and after the timed steps); {:.2} \
             cores busy",
                steady.len(),
                speed.flops_per_token / 1e6,
                speed.flops_per_s / 1e9,
                100.0 * speed.fraction_of_peak,
                speed.peak_flops_per_s / 1e9,
                speed.cpu_utilisation
            );
        }
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

/// How fast a run trained against what the machine can do.
struct TrainSpeed {
    /// Convention: 3 x the forward FLOPs (2 per multiply-add) of the weight matmuls one token
    /// passes through (LM head, projections, routers, top-k experts); recomputation, the scan,
    /// norms and element-wise work are not counted. Per scored token: with a burn-in, the
    /// blocks' share grows by (burn-in + seq_len) / seq_len (the LM head's does not).
    flops_per_token: f64,
    flops_per_s: f64,
    /// `itera bench`'s peak: FMA chains in the widest registers on every core; the CPU's widest,
    /// whatever `ITERA_SIMD` says, because `gemm`'s training matmuls pick their kernels from the
    /// CPU's flags alone. The larger of two measurements, before the timed steps and after the
    /// last: on a shared host one taken in a slow moment inflates the fraction (twentieth
    /// session, one machine: 95-196 GFLOP/s by run; the 95 made a 7,551 tokens/s run read 78%).
    peak_flops_per_s: f64,
    fraction_of_peak: f64,
    /// Process CPU time / wall time from the last warm-up step of this invocation to its last
    /// (any validation in between included).
    cpu_utilisation: f64,
}

impl TrainSpeed {
    fn measure(
        run: &Run,
        tokens_per_s: f64,
        clock: &[(f64, std::time::Instant)],
        peak_before: f64,
    ) -> Self {
        let (cfg, o) = (&run.config, &run.options);
        let spec = itera_core::tensors::ModelSpec::new(cfg);
        let (macs, head) = (spec.per_token(|s| s.len()) as f64, spec.embed.len() as f64);
        let flops_per_token = 6.0 * ((macs - head) * o.window() as f64 / o.seq_len as f64 + head);
        let peak = machine_peak().max(peak_before);
        let cpu_utilisation = match clock {
            [(c0, t0), (c1, t1)] if t1 > t0 => (c1 - c0) / (*t1 - *t0).as_secs_f64(),
            _ => 0.0,
        };
        Self {
            flops_per_token,
            flops_per_s: flops_per_token * tokens_per_s,
            peak_flops_per_s: peak,
            fraction_of_peak: flops_per_token * tokens_per_s / peak,
            cpu_utilisation,
        }
    }
}

/// The machine's peak FLOP/s now (`TrainSpeed::peak_flops_per_s`).
fn machine_peak() -> f64 {
    itera_core::bench::peak_flops_at(itera_core::simd::detected()).0
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one plain struct that we own; RUSAGE_SELF is always valid.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

fn run_step_hint(p: &Path) -> String {
    std::fs::read_to_string(p.join("train_state.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["step"].as_u64())
        .map_or_else(|| "?".into(), |s| s.to_string())
}
