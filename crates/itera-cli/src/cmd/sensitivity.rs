//! `itera sensitivity`: each tensor's sensitivity to each quantized type, and optionally a mixed plan.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use itera_quant::plan::CANDIDATES;

use super::quantize::{load_model, save_plan, sensitivity};
use super::ModelArg;

#[derive(Args)]
pub struct SensitivityArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Validation text
    #[arg(long)]
    pub data: PathBuf,
    /// Tokens of validation text to measure on
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Where the JSON report goes
    #[arg(long, default_value = "sensitivity.json")]
    pub out: PathBuf,
    /// Also choose a mixed plan at this average bits per weight (saved as JSON and PNG)
    #[arg(long)]
    pub bits: Option<f64>,
    /// Also print the JSON report (the one written to --out) on stdout
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: SensitivityArgs) -> Result<()> {
    let model = load_model(&a.model.path())?;
    let report = sensitivity(&model, None, Some(&a.data), a.tokens)?;
    let text = serde_json::to_string_pretty(&report)?;
    itera_core::format::write_atomic(&a.out, text.as_bytes())?;
    if a.json {
        println!("{text}");
    } else {
        println!(
            "{} tokens, f32 NLL {:.4} nats/token; mean KL to f32 (nats/token) per tensor and type:",
            report.tokens, report.base_nll
        );
        print!("{:<40}", "tensor");
        for d in CANDIDATES {
            print!(" {:>10}", d.name());
        }
        println!();
        let mut names: Vec<&str> = report.entries.iter().map(|e| e.tensor.as_str()).collect();
        names.dedup();
        for n in names {
            print!("{n:<40}");
            for d in CANDIDATES {
                let e = report
                    .entries
                    .iter()
                    .find(|e| e.tensor == n && e.dtype == d);
                print!(" {:>10.6}", e.map_or(f64::NAN, |e| e.kl));
            }
            println!();
        }
        println!("(the report also has each entry's NLL and perplexity change on the same text)");
        println!("report -> {}", a.out.display());
    }
    if let Some(bits) = a.bits {
        let plan = report.choose_mixed(&model.config, bits)?;
        let (j, p) = save_plan(&plan, &model, &a.out)?;
        println!(
            "mixed plan at {:.2} bits per weight -> {} and {}",
            plan.bits_per_weight(&model.config),
            j.display(),
            p.display()
        );
    }
    Ok(())
}
