//! `itera inspect`: a model's, GGUF file's or preset's architecture and parameter counts.

use std::path::Path;

use anyhow::{Context, Result};
use clap::Args;
use itera_core::config::Mixer;
use itera_core::format::gguf::GgufFile;
use itera_core::{ModelConfig, ModelDir};
use serde_json::json;

use super::ModelArg;

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Inspect a preset instead of a model
    #[arg(long, conflicts_with = "model")]
    pub preset: Option<String>,
    /// Print the config and its parameter counts as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: InspectArgs) -> Result<()> {
    if a.preset.is_none() && a.model.path().is_file() {
        return inspect_gguf(&a.model.path(), a.json);
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
        "  MoE on layers {:?}: {}, hidden {}",
        config.moe_layers,
        experts(&config),
        config.expert_hidden
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

/// "4 experts, top-2", or per layer after uneven pruning, and the skipping threshold if set.
fn experts(cfg: &itera_core::ModelConfig) -> String {
    let mut s = if cfg.expert_counts.is_empty() {
        format!("{} experts, top-{}", cfg.n_experts, cfg.top_k)
    } else {
        format!(
            "experts per layer {:?}, top-{}",
            cfg.expert_counts, cfg.top_k
        )
    };
    if cfg.moe_skip_beta > 0.0 {
        s += &format!(
            ", second expert skipped below {:.3} x the first",
            cfg.moe_skip_beta
        );
    }
    s
}

/// `itera inspect X.gguf`: metadata summary, each tensor's type, and the average bits per weight.
pub(super) fn inspect_gguf(path: &Path, json: bool) -> Result<()> {
    let file = GgufFile::read(path)?;
    let cfg = file.config()?;
    let params: usize = file.tensors.iter().map(|t| t.elements()).sum();
    if json {
        let tensors: Vec<_> = file
            .tensors
            .iter()
            .map(|t| json!({"name": t.name, "shape": t.shape, "type": t.dtype.name(), "bytes": t.bytes.len()}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "source": path.display().to_string(), "config": cfg, "parameters": params,
                "bits_per_weight": file.bits_per_weight(), "tensors": tensors,
                "file_bytes": std::fs::metadata(path)?.len(),
            }))?
        );
        return Ok(());
    }
    println!(
        "{} (GGUF, architecture {})",
        path.display(),
        itera_core::format::gguf::ARCHITECTURE
    );
    println!(
        "  d_model {}  layers {}  d_state {}  vocab {}  MoE layers {:?}, {}",
        cfg.d_model,
        cfg.n_layers,
        cfg.d_state,
        cfg.vocab_size,
        cfg.moe_layers,
        experts(&cfg)
    );
    for t in &file.tensors {
        println!(
            "  {:<40} {:>6} {:>14} {:>9} bytes",
            t.name,
            t.dtype.name(),
            format!("{:?}", t.shape),
            t.bytes.len()
        );
    }
    println!(
        "  {} parameters, {:.3} bits per weight on average",
        params,
        file.bits_per_weight()
    );
    Ok(())
}
