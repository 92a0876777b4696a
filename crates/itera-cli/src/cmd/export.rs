//! `itera export`: the model in an interchange format (ONNX: the recurrent step and a prefill
//! graph, with the tokenizer and a config beside them).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use super::ModelArg;

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Interchange format: onnx (step.onnx + prefill.onnx; from a Q8_0 GGUF, Q8_0 weights are
    /// written as int8 with blocked DequantizeLinear)
    #[arg(long, default_value = "onnx")]
    pub format: String,
    /// Output directory (created if needed)
    #[arg(long)]
    pub out: PathBuf,
    /// Print the files written (path and bytes) as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ExportArgs) -> Result<()> {
    if a.format != "onnx" {
        bail!(
            "--format {}: only `onnx` is supported (GGUF is written by `itera quantize`)",
            a.format
        );
    }
    let path = a.model.path();
    let report = itera_export::export_onnx(&path, &a.out)
        .with_context(|| format!("exporting {} to ONNX", path.display()))?;
    if a.json {
        let files: Vec<_> = report
            .files
            .iter()
            .map(|(p, n)| json!({"path": p.display().to_string(), "bytes": n}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"files": files, "opset": report.opset, "quantized_tensors": report.quantized_tensors})
            )?
        );
    } else {
        for (p, n) in &report.files {
            println!("{}  {n} bytes", p.display());
        }
        println!(
            "opset {}; {} matrices as int8 + scales (QDQ)",
            report.opset, report.quantized_tensors
        );
    }
    Ok(())
}
