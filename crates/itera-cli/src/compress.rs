//! `itera quantize`, `itera sensitivity` and the GGUF side of `itera inspect`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use itera_core::gguf::GgufFile;
use itera_core::quant::DType;
use itera_core::ModelDir;
use itera_quant::plan::CANDIDATES;
use itera_quant::{Plan, Scheme, SensitivityReport};
use serde_json::json;

pub struct QuantizeArgs {
    pub model: PathBuf,
    pub scheme: String,
    pub out: PathBuf,
    pub bits: Option<f64>,
    pub plan: Option<PathBuf>,
    pub sensitivity: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub tokens: usize,
    pub json: bool,
}

fn load_model(path: &Path) -> Result<ModelDir> {
    if path.is_file() {
        bail!(
            "{}: quantization starts from an f32 model directory (config.json, model.safetensors, tokenizer.json), not a file",
            path.display()
        );
    }
    ModelDir::load(path).with_context(|| format!("loading model {}", path.display()))
}

/// Sensitivity from a saved report, or measured now on `data`.
fn sensitivity(
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
    let pb = crate::bar(
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
fn save_plan(plan: &Plan, model: &ModelDir, stem: &Path) -> Result<(PathBuf, PathBuf)> {
    let (json_path, png_path) = (
        stem.with_extension("plan.json"),
        stem.with_extension("plan.png"),
    );
    plan.save(&json_path)?;
    let bars: Vec<(f64, [u8; 3])> = model
        .weights
        .tensors
        .keys()
        .map(|n| plan.dtype(n))
        .map(|d| (d.bits_per_weight(), colour(d)))
        .collect();
    let mut used: Vec<DType> = model
        .weights
        .tensors
        .keys()
        .map(|n| plan.dtype(n))
        .collect();
    used.sort_by_key(|d| d.ggml_id());
    used.dedup();
    let legend: Vec<(&str, [u8; 3])> = used.iter().map(|d| (d.name(), colour(*d))).collect();
    itera_train::plot::plot_bars(&png_path, &bars, &legend, "bits per weight")?;
    Ok((json_path, png_path))
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let scheme = Scheme::parse(&a.scheme)?;
    let plan = match scheme {
        Scheme::Uniform(d) => {
            if a.bits.is_some() || a.plan.is_some() {
                bail!("--bits and --plan apply to --scheme mixed only");
            }
            Plan::uniform(&model.weights, d)
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
                let plan = report.choose_mixed(&model.weights, bits)?;
                let (j, p) = save_plan(&plan, &model, &a.out)?;
                eprintln!("plan -> {} and {}", j.display(), p.display());
                plan
            }
        },
    };
    if a.out.extension().and_then(|e| e.to_str()) != Some("gguf") {
        bail!("--out must name a .gguf file, got {}", a.out.display());
    }
    let name = a
        .model
        .file_name()
        .map_or("itera-lite".into(), |n| n.to_string_lossy().to_string());
    let file = plan.to_gguf(&model, &format!("{name}-{}", a.scheme))?;
    file.write(&a.out)?;
    let size = std::fs::metadata(&a.out)?.len();
    let f32_weights: usize = model
        .weights
        .tensors
        .values()
        .map(|t| 4 * t.elem_count())
        .sum();
    let weight_bytes: usize = file.tensors.iter().map(|t| t.bytes.len()).sum();
    let v = json!({
        "out": a.out.display().to_string(), "scheme": a.scheme, "file_bytes": size,
        "weight_bytes": weight_bytes, "f32_weight_bytes": f32_weights,
        "weight_ratio": f32_weights as f64 / weight_bytes as f64,
        "bits_per_weight": file.bits_per_weight(),
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

pub struct SensitivityArgs {
    pub model: PathBuf,
    pub data: PathBuf,
    pub tokens: usize,
    pub out: PathBuf,
    pub bits: Option<f64>,
    pub json: bool,
}

pub fn sensitivity_cmd(a: SensitivityArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let report = sensitivity(&model, None, Some(&a.data), a.tokens)?;
    let text = serde_json::to_string_pretty(&report)?;
    itera_core::checkpoint::write_atomic(&a.out, text.as_bytes())?;
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
        let plan = report.choose_mixed(&model.weights, bits)?;
        let (j, p) = save_plan(&plan, &model, &a.out)?;
        println!(
            "mixed plan at {:.2} bits per weight -> {} and {}",
            plan.bits_per_weight(&model.weights),
            j.display(),
            p.display()
        );
    }
    Ok(())
}

/// `itera inspect X.gguf`: metadata summary, each tensor's type, and the average bits per weight.
pub fn inspect_gguf(path: &Path, json: bool) -> Result<()> {
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
        itera_core::gguf::ARCHITECTURE
    );
    println!(
        "  d_model {}  layers {}  d_state {}  vocab {}  MoE layers {:?}, {} experts top-{}",
        cfg.d_model,
        cfg.n_layers,
        cfg.d_state,
        cfg.vocab_size,
        cfg.moe_layers,
        cfg.n_experts,
        cfg.top_k
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
