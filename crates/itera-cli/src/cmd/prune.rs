//! `itera prune`: remove experts from every MoE layer (chosen by `--method` on calibration
//! text), optionally refit the kept experts by least squares and heal with a short fine-tune,
//! set dynamic expert skipping, and report the routers' load per expert. The rules live in
//! `itera_quant::prune`; this module maps flags, runs the heal through the ordinary trainer and
//! writes the result.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use itera_core::format::dtype::DType;
use itera_core::runtime::{RoutingStats, Runtime};
use itera_core::{ModelConfig, ModelDir, Weights};
use itera_quant::prune::{self, Method};
use itera_quant::Plan;
use itera_train::distill::DistillOptions;
use itera_train::reference::distill_loss::{DistillLossSpec, Kl};
use itera_train::trainer::TrainOnly;
use itera_train::{Run, TrainOptions};
use serde_json::json;

use super::progress::bar;
use super::quantize::load_model;

#[derive(Clone, Copy, ValueEnum)]
pub enum HealArg {
    /// Every tensor
    All,
    /// Only the MoE routers and the RMSNorm gains
    Router,
    /// The MoE layers (routers and experts) and the RMSNorm gains; mixers and embedding stay
    Moe,
}

#[derive(Args)]
pub struct PruneArgs {
    /// The f32 model directory to prune
    #[arg(long)]
    pub model: PathBuf,
    /// Calibration text (training text: never the text you report results on)
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Tokens of calibration text to read (an equal share from each file)
    #[arg(long, default_value_t = 16384)]
    pub tokens: usize,
    /// Where in each file the calibration tokens come from
    #[arg(long, value_enum, default_value = "spread")]
    pub calibration: super::CalibrationArg,
    /// Experts to remove from every MoE layer
    #[arg(long, conflicts_with = "keep_per_layer")]
    pub drop: Option<usize>,
    /// Experts to keep in each MoE layer, e.g. 3,2 (one count per MoE layer)
    #[arg(long, value_delimiter = ',')]
    pub keep_per_layer: Option<Vec<usize>>,
    /// random (seeded), frequency (least routed), gate (least summed routing weight), reap
    /// (least mean gate x output norm), search (every set scored on the calibration loss)
    #[arg(long, default_value = "reap")]
    pub method: String,
    /// Seed of --method random
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output: a model directory, or a .gguf file
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Storage type of a .gguf output: f32, f16, bf16, q8_0, q5_0, q4_0, q4_1, nf4
    #[arg(long, default_value = "f32")]
    pub r#type: String,
    /// After pruning, refit the kept experts' down projections by least squares so that each
    /// pruned MoE layer reproduces the unpruned layer's output on the calibration text (seconds,
    /// no gradient steps; before any --heal-steps)
    #[arg(long)]
    pub refit: bool,
    /// Ridge of --refit, relative to the mean diagonal of its Gram matrix (pulls the refit toward
    /// the old weights)
    #[arg(long, default_value_t = prune::REFIT_RIDGE)]
    pub refit_ridge: f64,
    /// Refit (implies --refit) letting each kept expert swap the hidden units it needs least for
    /// units of the removed experts (their gate and up rows move with them): the same size, more
    /// of the removed experts kept
    #[arg(long)]
    pub merge_units: bool,
    /// --method search: score each candidate set after the refit that follows (--refit or
    /// --merge-units) instead of as plainly removed (one refit per set: slower)
    #[arg(long)]
    pub score_refitted: bool,
    /// Steps of fine-tuning after pruning, on the calibration text (0: none)
    #[arg(long, default_value_t = 0)]
    pub heal_steps: usize,
    /// What the fine-tune trains
    #[arg(long, value_enum, default_value = "all")]
    pub heal: HealArg,
    /// Peak learning rate of the fine-tune (a model trained with weight averaging heals better
    /// at a low one, e.g. 2e-4: docs/compression.md)
    #[arg(long, default_value_t = 1e-3)]
    pub heal_lr: f64,
    /// Sequences per step of the fine-tune
    #[arg(long, default_value_t = 8)]
    pub heal_batch_size: usize,
    /// Training window of the fine-tune (default: the model's context)
    #[arg(long)]
    pub heal_seq_len: Option<usize>,
    /// Heal by distillation from the unpruned model: the weight of the KL term (T = 1) against
    /// the cross-entropy (0: cross-entropy only)
    #[arg(long, default_value_t = 0.0)]
    pub heal_kl: f64,
    /// Keep an exponential moving average of the healed weights with this decay (0: off), from
    /// the end of the fine-tune's warmup; the average is the result
    #[arg(long, default_value_t = 0.0)]
    pub heal_ema: f64,
    /// Run directory of the fine-tune (default: the output's name + .heal)
    #[arg(long)]
    pub heal_run: Option<PathBuf>,
    /// Dynamic expert skipping: `auto` (from the calibration routing, see --skip-quantile),
    /// a number in [0, 1], or 0 to turn it off
    #[arg(long)]
    pub skip_beta: Option<String>,
    /// --skip-beta auto: the fraction of calibration tokens that skip their second expert
    #[arg(long, default_value_t = 0.5)]
    pub skip_quantile: f64,
    /// Print each MoE layer's expert load and draw it as a PNG (beside --out, else routing.png)
    #[arg(long)]
    pub report: bool,
    /// Print the result as JSON (parameters and file size, experts kept, calibration loss before and after, expert loads)
    #[arg(long)]
    pub json: bool,
}

/// Per MoE layer: its index and each expert's share of the routed tokens, in percent.
fn shares(stats: &RoutingStats) -> Vec<(usize, Vec<f64>)> {
    stats
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.count.is_empty())
        .map(|(i, l)| {
            let total = l.count.iter().sum::<u64>().max(1) as f64;
            (
                i,
                l.count.iter().map(|&c| 100.0 * c as f64 / total).collect(),
            )
        })
        .collect()
}

/// Draws each MoE layer's expert load as a PNG bar chart; prints it unless `quiet`.
fn report(stats: &RoutingStats, png: &Path, quiet: bool) -> Result<()> {
    const COLOURS: [[u8; 3]; 6] = [
        [31, 119, 180],
        [214, 39, 40],
        [44, 160, 44],
        [148, 103, 189],
        [255, 127, 14],
        [140, 86, 75],
    ];
    let mut bars = Vec::new();
    let mut names = Vec::new();
    for (k, (layer, share)) in shares(stats).into_iter().enumerate() {
        if !quiet {
            let cells: Vec<String> = share.iter().map(|s| format!("{s:5.1}%")).collect();
            println!("layer {layer}: expert load {}", cells.join(" "));
        }
        let colour = COLOURS[k % COLOURS.len()];
        bars.extend(share.iter().map(|&s| (s, colour)));
        bars.push((0.0, [255, 255, 255]));
        names.push((format!("layer {layer}"), colour));
    }
    let legend: Vec<(&str, [u8; 3])> = names.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    if let Some(dir) = png.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    itera_train::plot::plot_bars(
        png,
        &bars,
        &legend,
        "% of routed tokens",
        "experts, layer by layer",
    )?;
    if !quiet {
        println!("routing chart -> {}", png.display());
    }
    Ok(())
}

/// Fine-tunes the pruned model through the ordinary trainer; returns its final weights (their
/// average with --heal-ema).
fn heal(a: &PruneArgs, cfg: &ModelConfig, w: &Weights, model: &ModelDir) -> Result<Weights> {
    let out = a.out.as_ref().expect("checked: healing writes a model");
    let dir = a
        .heal_run
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.heal", out.display())));
    let mut o = TrainOptions::new(a.data.clone(), a.heal_steps);
    o.lr = a.heal_lr;
    o.batch_size = a.heal_batch_size;
    o.seq_len = a.heal_seq_len.unwrap_or(cfg.context);
    o.warmup = (a.heal_steps / 10).max(1);
    o.ema = a.heal_ema;
    o.ema_start = o.warmup;
    o.eval_every = a.heal_steps;
    o.save_every = a.heal_steps;
    o.seed = a.seed;
    if a.heal_kl > 0.0 {
        o.distill = Some(DistillOptions {
            teachers: vec![a.model.clone()],
            loss: DistillLossSpec {
                temperature: 1.0,
                alpha: a.heal_kl,
                kl: Kl::Forward,
            },
        });
    }
    o.train_only = match a.heal {
        HealArg::All => TrainOnly::All,
        HealArg::Router => TrainOnly::RouterAndNorms,
        HealArg::Moe => TrainOnly::Moe,
    };
    let mut run = Run::create_from(&dir, cfg.clone(), model.tokenizer.clone(), o, w)?;
    let corpus = run.load_corpus()?;
    let pb = bar(
        a.heal_steps as u64,
        "heal {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    );
    let result = run.train(&corpus, &mut |e| {
        if let itera_train::TrainEvent::Step(m) = e {
            pb.set_position(m.step as u64);
            pb.set_message(format!("loss {:.4}", m.ce));
        }
    })?;
    pb.finish_and_clear();
    tracing::info!(
        "healed for {} steps in {}: val loss {:.4}",
        a.heal_steps,
        dir.display(),
        result.val_loss
    );
    // The moving average when --heal-ema keeps one, else the last weights.
    Ok(run.measured_weights()?)
}

pub fn run(a: PruneArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let method = Method::parse(&a.method, a.seed)?;
    let dtype = DType::parse(&a.r#type)?;
    let pruning = a.drop.is_some() || a.keep_per_layer.is_some();
    if !pruning && a.skip_beta.is_none() && !a.report {
        bail!(
            "nothing to do: give --drop K or --keep-per-layer N,N (and/or --skip-beta, --report)"
        );
    }
    let keep = if pruning {
        prune::keep_counts(&model.config, a.drop, a.keep_per_layer.as_deref())?
    } else {
        Vec::new()
    };
    match &a.out {
        Some(out) if out.exists() => bail!(
            "{} already exists; choose another --out (pruning never overwrites)",
            out.display()
        ),
        None if pruning || a.skip_beta.is_some() => {
            bail!("--out DIR or --out FILE.gguf is needed to write the pruned model")
        }
        _ => {}
    }
    if a.score_refitted && !(a.method == "search" && (a.refit || a.merge_units)) {
        bail!("--score-refitted applies to --method search with --refit or --merge-units");
    }
    if (a.heal_steps > 0 || a.refit || a.merge_units) && !pruning {
        bail!(
            "--heal-steps, --refit and --merge-units apply after pruning (--drop or --keep-per-layer)"
        );
    }
    let is_gguf = a
        .out
        .as_ref()
        .and_then(|o| o.extension())
        .is_some_and(|e| e == "gguf");
    if dtype != DType::F32 && !is_gguf {
        bail!("--type applies to a .gguf --out; a directory is written in f32");
    }
    let calib = super::calibration(&model, &a.data, a.tokens, a.calibration, "--tokens")?;
    let base_rt = Runtime::new(&model.config, &model.weights)?;
    let stats = prune::routing_stats(&base_rt, &calib)?;
    let base_loss = prune::calibration_loss(&base_rt, &calib)?;
    drop(base_rt);
    if a.report {
        let png = match &a.out {
            Some(o) if !is_gguf => o.join("routing.png"),
            Some(o) => o.with_extension("routing.png"),
            None => PathBuf::from("routing.png"),
        };
        // Written once the output exists (into it, for a directory).
        if a.out.is_none() || is_gguf {
            report(&stats, &png, a.json)?;
        }
    }
    let (mut cfg, mut weights) = (model.config.clone(), model.weights.clone());
    let mut kept = Vec::new();
    if pruning {
        let pb = bar(
            1,
            "search {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
        );
        let refit = (a.refit || a.merge_units).then_some(prune::Refit {
            ridge: a.refit_ridge,
            units: if a.merge_units {
                prune::RefitUnits::WithRemoved
            } else {
                prune::RefitUnits::Own
            },
        });
        kept = prune::choose(
            &cfg,
            &weights,
            method,
            &keep,
            &stats,
            &calib,
            refit.filter(|_| a.score_refitted),
            |d, t| {
                pb.set_length(t as u64);
                pb.set_position(d as u64);
            },
        )?;
        pb.finish_and_clear();
        if let Some(how) = refit {
            let pb = bar(1, "refit {bar:30} {pos}/{len} layers [{elapsed_precise}]");
            weights = prune::refit(&cfg, &weights, &kept, &calib, how, |d, t| {
                pb.set_length(t as u64);
                pb.set_position(d as u64);
            })?;
            pb.finish_and_clear();
        }
        (cfg, weights) = prune::prune(&cfg, &weights, &kept)?;
        if cfg.top_k < model.config.top_k {
            eprintln!(
                "note: top_k shrinks from {} to {} (the fewest experts left in a layer)",
                model.config.top_k, cfg.top_k
            );
        }
        if a.heal_steps > 0 {
            weights = heal(&a, &cfg, &weights, &model)?;
        }
    }
    if let Some(beta) = &a.skip_beta {
        cfg.moe_skip_beta = match beta.as_str() {
            "auto" => {
                let rt = Runtime::new(&cfg, &weights)?;
                prune::skip_beta(&prune::routing_stats(&rt, &calib)?, a.skip_quantile)?
            }
            v => v
                .parse()
                .with_context(|| format!("--skip-beta `{v}`: expected auto or a number"))?,
        };
        cfg.validate()?;
    }
    let Some(out) = &a.out else {
        return Ok(());
    };
    let loss = prune::calibration_loss(&Runtime::new(&cfg, &weights)?, &calib)?;
    let pruned = ModelDir {
        path: out.clone(),
        config: cfg.clone(),
        weights,
        tokenizer: model.tokenizer.clone(),
    };
    if is_gguf {
        let name = format!(
            "{}-pruned",
            a.model
                .file_name()
                .map_or("itera-lite".into(), |n| n.to_string_lossy())
        );
        Plan::uniform(&cfg, dtype)
            .to_gguf(&pruned, &name, Default::default())?
            .write(out)?;
    } else {
        ModelDir::save(out, &cfg, &pruned.weights, &pruned.tokenizer)?;
        if a.report {
            report(&stats, &out.join("routing.png"), a.json)?;
        }
    }
    let v = json!({
        "out": out.display().to_string(),
        "method": a.method,
        "kept_experts": kept,
        "experts_per_layer": (0..cfg.n_layers).filter(|&l| cfg.is_moe_layer(l)).map(|l| cfg.experts_in_layer(l)).collect::<Vec<_>>(),
        "top_k": cfg.top_k,
        "moe_skip_beta": cfg.moe_skip_beta,
        "parameters_before": model.weights.parameter_count(),
        "parameters_after": pruned.weights.parameter_count(),
        "file_bytes": std::fs::metadata(if is_gguf { out.clone() } else { out.join("model.safetensors") })?.len(),
        "calibration_tokens": calib.len(),
        "calibration_nll_before": base_loss,
        "calibration_nll_after": loss,
        "refit": (a.refit || a.merge_units).then_some(a.refit_ridge),
        "merge_units": a.merge_units,
        "heal_steps": a.heal_steps,
        "expert_load_percent": shares(&stats).into_iter().map(|(l, s)| json!({"layer": l, "share": s})).collect::<Vec<_>>(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: {} -> {} parameters; experts kept per MoE layer {:?}; top_k {}; skip beta {:.3}; \
             calibration NLL {:.4} -> {:.4}",
            out.display(),
            v["parameters_before"],
            v["parameters_after"],
            kept,
            cfg.top_k,
            cfg.moe_skip_beta,
            base_loss,
            loss
        );
    }
    Ok(())
}
