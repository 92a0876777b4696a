//! `itera quantize`: one self-describing GGUF in a uniform or sensitivity-chosen mixed format;
//! also the model loading, sensitivity measurement and plan chart `itera sensitivity` shares.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use itera_core::format::dtype::{self, DType, Rounding};
use itera_core::ModelDir;
use itera_quant::plan::CANDIDATES;
use itera_quant::{Plan, Scheme, SensitivityReport};
use serde_json::json;

use super::ModelArg;

#[derive(Args)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// f32, f16, bf16, q8_0, q5_0, q4_0, q4_1, nf4, or mixed (per-tensor types from measured sensitivity)
    #[arg(long)]
    pub scheme: String,
    /// Output .gguf file
    #[arg(long)]
    pub out: PathBuf,
    /// mixed: average bits per weight over the whole model
    #[arg(long)]
    pub bits: Option<f64>,
    /// mixed: use this plan (JSON from an earlier run) instead of choosing one
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// mixed: a report from `itera sensitivity` instead of measuring again
    #[arg(long)]
    pub sensitivity: Option<PathBuf>,
    /// mixed: validation text to measure sensitivity on
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Tokens of validation text to measure on
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// q8_0, q5_0, q4_0: give each block of 32 the scale with the least squared error instead of
    /// ggml's reference choice (same layout, readable everywhere; q4_0 lost 4-20% less quality on
    /// the models in docs/compression.md)
    #[arg(long)]
    pub fit_scales: bool,
    /// Calibration text (training text, never what you report on): quantize every q8_0, q5_0
    /// and q4_0 matrix by GPTQ with the inputs it sees on this text, so that its products change
    /// least (combines with --fit-scales; the layout is unchanged)
    #[arg(long, num_args = 1..)]
    pub gptq: Vec<PathBuf>,
    /// Tokens of --gptq calibration text (an equal share from each file)
    #[arg(long, default_value_t = 65536)]
    pub gptq_tokens: usize,
    /// Where in each --gptq file the calibration tokens come from
    #[arg(long, value_enum, default_value = "spread", requires = "gptq")]
    pub calibration: super::CalibrationArg,
    /// Print the file's sizes and bits per weight as JSON
    #[arg(long)]
    pub json: bool,
}

pub(super) fn load_model(path: &Path) -> Result<ModelDir> {
    if path.is_file() {
        bail!(
            "{}: quantization starts from an f32 model directory (config.json, model.safetensors, tokenizer.json), not a file",
            path.display()
        );
    }
    ModelDir::load(path).with_context(|| format!("loading model {}", path.display()))
}

/// Sensitivity from a saved report, or measured now on `data`.
pub(super) fn sensitivity(
    model: &ModelDir,
    saved: Option<&Path>,
    data: Option<&Path>,
    tokens: usize,
) -> Result<SensitivityReport> {
    if let Some(p) = saved {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        return serde_json::from_str(&text)
            .with_context(|| format!("{}: not a sensitivity report", p.display()));
    }
    let Some(data) = data else {
        bail!("--scheme mixed needs --plan, --sensitivity REPORT.json or --data VALID.txt to measure on");
    };
    let text = itera_train::data::read_text(data)?;
    let pb = super::progress::bar(
        1,
        "sensitivity {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
    );
    let report = itera_quant::sensitivity::measure(model, &text, tokens, &CANDIDATES, |d, t| {
        pb.set_length(t as u64);
        pb.set_position(d as u64);
    })?;
    pb.finish_and_clear();
    Ok(report)
}

const TYPE_COLOURS: [(DType, [u8; 3]); 8] = [
    (DType::F32, [120, 120, 120]),
    (DType::F16, [150, 100, 200]),
    (DType::BF16, [200, 100, 150]),
    (DType::Q8_0, [40, 100, 200]),
    (DType::Q5_0, [40, 170, 90]),
    (DType::Q4_1, [230, 160, 30]),
    (DType::Q4_0, [220, 80, 40]),
    (DType::NF4, [160, 40, 40]),
];

fn colour(d: DType) -> [u8; 3] {
    TYPE_COLOURS
        .iter()
        .find(|c| c.0 == d)
        .map_or([0, 0, 0], |c| c.1)
}

/// Writes the plan as JSON and as a bar chart (bits per weight of each tensor, coloured by type).
pub(super) fn save_plan(plan: &Plan, model: &ModelDir, stem: &Path) -> Result<(PathBuf, PathBuf)> {
    let (json_path, png_path) = (
        stem.with_extension("plan.json"),
        stem.with_extension("plan.png"),
    );
    plan.save(&json_path)?;
    let names: Vec<String> = itera_core::tensors::ModelSpec::new(&model.config)
        .all()
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let bars: Vec<(f64, [u8; 3])> = names
        .iter()
        .map(|n| plan.dtype(n))
        .map(|d| (d.bits_per_weight(), colour(d)))
        .collect();
    let mut used: Vec<DType> = names.iter().map(|n| plan.dtype(n)).collect();
    used.sort_by_key(|d| d.ggml_id());
    used.dedup();
    let legend: Vec<(&str, [u8; 3])> = used.iter().map(|d| (d.name(), colour(*d))).collect();
    itera_train::plot::plot_bars(
        &png_path,
        &bars,
        &legend,
        "bits per weight",
        "tensors in file order",
    )?;
    Ok((json_path, png_path))
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let model_path = a.model.path();
    let model = load_model(&model_path)?;
    let scheme = Scheme::parse(&a.scheme)?;
    let plan = match scheme {
        Scheme::Uniform(d) => {
            if a.bits.is_some() || a.plan.is_some() {
                bail!("--bits and --plan apply to --scheme mixed only");
            }
            Plan::uniform(&model.config, d)
        }
        Scheme::Mixed => match &a.plan {
            Some(p) => Plan::load(p)?,
            None => {
                let Some(bits) = a.bits else {
                    bail!("--scheme mixed needs --bits B (average bits per weight) or --plan PLAN.json");
                };
                if !(4.0..=32.0).contains(&bits) {
                    bail!("--bits {bits} is out of range (4 to 32)");
                }
                let report = sensitivity(
                    &model,
                    a.sensitivity.as_deref(),
                    a.data.as_deref(),
                    a.tokens,
                )?;
                let plan = report.choose_mixed(&model.config, bits)?;
                let (j, p) = save_plan(&plan, &model, &a.out)?;
                eprintln!("plan -> {} and {}", j.display(), p.display());
                plan
            }
        },
    };
    if a.out.extension().and_then(|e| e.to_str()) != Some("gguf") {
        bail!("--out must name a .gguf file, got {}", a.out.display());
    }
    let name = model_path
        .file_name()
        .map_or("itera-lite".into(), |n| n.to_string_lossy().to_string());
    if let (true, Scheme::Uniform(d)) = (a.fit_scales, &scheme) {
        if !dtype::has_fitted_scales(*d) {
            bail!(
                "--fit-scales applies to q8_0, q5_0 and q4_0 (and mixed plans using them), not {}",
                d.name()
            );
        }
    }
    let rounding = if a.fit_scales {
        Rounding::Fitted
    } else {
        Rounding::Reference
    };
    let mut file = plan.to_gguf(&model, &format!("{name}-{}", a.scheme), rounding)?;
    let mut gptq_tensors = Vec::new();
    if !a.gptq.is_empty() {
        if !plan.types.values().any(|&d| dtype::has_fitted_scales(d)) {
            bail!("--gptq applies to tensors stored as q8_0, q5_0 or q4_0; this plan has none");
        }
        let calib = super::calibration(
            &model,
            &a.gptq,
            a.gptq_tokens,
            a.calibration,
            "--gptq-tokens",
        )?;
        let runtime = itera_core::runtime::Runtime::new(&model.config, &model.weights)?;
        let pb = super::progress::bar(1, "gptq: reading the calibration text [{elapsed_precise}]");
        let grams = itera_quant::gptq::input_grams(&runtime, &calib)?;
        pb.finish_and_clear();
        let pb = super::progress::bar(1, "gptq {bar:30} {pos}/{len} tensors [{elapsed_precise}]");
        gptq_tensors = itera_quant::gptq::apply(
            &mut file,
            &model.config,
            &model.weights,
            &grams,
            rounding,
            |d, t| {
                pb.set_length(t as u64);
                pb.set_position(d as u64);
            },
        )?;
        super::progress::say(
            &pb,
            format!(
                "gptq: {} tensors rounded with the inputs of {} calibration tokens",
                gptq_tensors.len(),
                calib.len()
            ),
        );
        pb.finish_and_clear();
    }
    file.write(&a.out)?;
    let size = std::fs::metadata(&a.out)?.len();
    let f32_weights = 4 * model.weights.parameter_count();
    let weight_bytes: usize = file.tensors.iter().map(|t| t.bytes.len()).sum();
    let v = json!({
        "out": a.out.display().to_string(), "scheme": a.scheme, "file_bytes": size,
        "weight_bytes": weight_bytes, "f32_weight_bytes": f32_weights,
        "weight_ratio": f32_weights as f64 / weight_bytes as f64,
        "bits_per_weight": file.bits_per_weight(),
        "gptq_tensors": gptq_tensors.len(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: {} bytes ({:.2} bits per weight; weights {:.2}x smaller than f32)",
            a.out.display(),
            size,
            file.bits_per_weight(),
            f32_weights as f64 / weight_bytes as f64
        );
    }
    Ok(())
}
