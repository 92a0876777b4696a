//! `itera bench`: the runtime's speeds, each as a fraction of the machine's peak f32 FLOP/s
//! measured in the same run, plus start-up time and memory of a real `itera generate` process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use itera_core::bench::{self, median};
use itera_core::Generator;
use serde_json::{json, Value};

use super::ModelArg;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Short runs with one repeat (a smoke test, not a measurement)
    #[arg(long)]
    pub quick: bool,
    /// Only these measurements (comma-separated; an unknown name is an error, not an empty run)
    #[arg(long, value_delimiter = ',',
          value_parser = ["peak", "prefill", "eval", "decode", "phases", "batched", "startup"])]
    pub only: Vec<String>,
    /// Also time decode and prefill against this model, alternating runs, and report the ratios
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Print the measurements as one JSON object (skipped ones are null)
    #[arg(long)]
    pub json: bool,
}

/// Decode and prefill of the model against a baseline, alternating A/B three times so machine
/// drift hits both alike; medians of each and their ratios.
fn compare(rt: &itera_core::Runtime, base: &itera_core::Runtime, quick: bool) -> Result<Value> {
    let (tokens, reps) = if quick { (32, 1) } else { (256, 3) };
    let (mut a, mut b, mut pa, mut pb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        a.push(bench::decode(rt, tokens, 1)?.tokens_per_s);
        b.push(bench::decode(base, tokens, 1)?.tokens_per_s);
        pa.push(bench::prefill_tokens_per_s(rt, 8, 128, 1)?);
        pb.push(bench::prefill_tokens_per_s(base, 8, 128, 1)?);
    }
    let (a, b, pa, pb) = (median(&a), median(&b), median(&pa), median(&pb));
    Ok(
        json!({"decode_tokens_per_s": a, "baseline_decode_tokens_per_s": b, "decode_speedup": a / b,
              "prefill_tokens_per_s": pa, "baseline_prefill_tokens_per_s": pb, "prefill_speedup": pa / pb}),
    )
}

pub fn run(opts: BenchArgs) -> Result<()> {
    let model_path = opts.model.path();
    let model = model_path.as_path();
    let want = |part: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == part);
    // First, while this process is still small: a child forked from a large parent would count
    // the parent's pages in its peak RSS until it execs.
    let (first_token_ms, child_rss) = if want("startup") {
        let (ms, rss) = first_token(model, if opts.quick { 1 } else { 5 })?;
        (ms, Some(rss))
    } else {
        (f64::NAN, None)
    };
    let generator =
        Generator::load(model).with_context(|| format!("loading model {}", model.display()))?;
    let rt = &generator.runtime;
    let reps = if opts.quick { 1 } else { 5 };
    // Progress on stderr, for the parts that run.
    let note = |part: &str, what: &str| {
        if !opts.json && want(part) {
            eprintln!("measuring {what}...");
        }
    };
    note("peak", "peak FLOP/s");
    let (peak, threads, isa) = if want("peak") {
        bench::peak_flops()
    } else {
        (f64::NAN, 0, "skipped")
    };
    let flops_per_token = 2.0 * rt.macs_per_token() as f64;
    let frac = |tps: f64| tps * flops_per_token / peak;
    note("prefill", "prefill");
    let (seqs, len) = if opts.quick { (2, 128) } else { (16, 128) };
    let prefill = skip(want("prefill"), || {
        bench::prefill_tokens_per_s(rt, seqs, len, reps)
    })?;
    note("eval", "evaluation");
    let eval = skip(want("eval"), || {
        bench::eval_tokens_per_s(rt, if opts.quick { 512 } else { 4096 }, reps.min(3))
    })?;
    note("decode", "single-stream decode");
    let decode = if want("decode") {
        bench::decode(rt, if opts.quick { 32 } else { 256 }, reps)?
    } else {
        bench::DecodeReport {
            tokens_per_s: f64::NAN,
            latency_p50_us: f64::NAN,
            latency_p99_us: f64::NAN,
        }
    };
    // Decode reads every weight once per token: its bound is memory bandwidth, not FLOPs.
    let bytes_per_token = rt.weight_bytes_per_token();
    let (bandwidth, bandwidth_cores) = if want("decode") {
        note("decode", "read bandwidth of the cores decode uses");
        bench::read_bandwidth(bytes_per_token)
    } else {
        (f64::NAN, 0)
    };
    note("phases", "one decode step phase by phase");
    let phases: serde_json::Map<String, Value> = if want("phases") {
        bench::decode_phases(rt, if opts.quick { 32 } else { 1024 })?
            .into_iter()
            .map(|(name, ns)| (name.to_string(), json!(ns)))
            .collect()
    } else {
        Default::default()
    };
    let versus = match &opts.baseline {
        Some(p) => {
            if !opts.json {
                eprintln!("measuring decode and prefill against {}...", p.display());
            }
            let base =
                Generator::load(p).with_context(|| format!("loading baseline {}", p.display()))?;
            let mut v = compare(rt, &base.runtime, opts.quick)?;
            v["baseline"] = json!(p.display().to_string());
            v
        }
        None => Value::Null,
    };
    let mut batched = serde_json::Map::new();
    for streams in [1usize, 8, 64] {
        note("batched", &format!("batched decode, {streams} streams"));
        let steps = if opts.quick { 4 } else { 64 };
        let tps = skip(want("batched"), || {
            bench::batched_decode_tokens_per_s(rt, streams, steps, reps.min(3))
        })?;
        batched.insert(
            streams.to_string(),
            json!({"tokens_per_s": tps, "fraction_of_peak": frac(tps)}),
        );
    }
    let file_bytes = if model.is_dir() {
        std::fs::metadata(model.join(itera_core::format::model_dir::WEIGHTS_FILE))?.len()
    } else {
        std::fs::metadata(model)?.len()
    };
    let report = json!({
        "model": model.display().to_string(),
        "format": rt.main_dtype().name(),
        "file_bytes": file_bytes,
        "weight_bytes_in_memory": rt.weight_bytes(),
        "parameters": rt.cfg.parameter_count(),
        "threads": rayon_threads(),
        "kernels": itera_core::kernels::level(),
        "peak_flops": peak,
        "peak_threads": threads,
        "peak_isa": isa,
        "flops_per_token": flops_per_token,
        "prefill": {"sequences": seqs, "length": len, "tokens_per_s": prefill, "fraction_of_peak": frac(prefill)},
        "eval": {"tokens_per_s": eval, "fraction_of_peak": frac(eval)},
        "decode": {"tokens_per_s": decode.tokens_per_s, "latency_p50_us": decode.latency_p50_us,
                   "latency_p99_us": decode.latency_p99_us, "fraction_of_peak": frac(decode.tokens_per_s),
                   "weight_bytes_per_token": bytes_per_token, "read_bandwidth_bytes_per_s": bandwidth,
                   "read_bandwidth_cores": bandwidth_cores,
                   "fraction_of_bandwidth": decode.tokens_per_s * bytes_per_token as f64 / bandwidth},
        "decode_phases_ns": phases,
        "batched_decode": batched,
        "versus_baseline": versus,
        "start_to_first_token_ms": first_token_ms,
        "generate_peak_rss_bytes": child_rss,
        "bench_peak_rss_bytes": own_peak_rss(),
    });
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// Runs a measurement only when it was asked for (NaN otherwise: JSON null).
fn skip(wanted: bool, f: impl FnOnce() -> itera_core::Result<f64>) -> Result<f64> {
    Ok(if wanted { f()? } else { f64::NAN })
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `itera generate --max-tokens 1` as a fresh process `runs` times: median wall time from
/// spawn to exit (an upper bound on start-to-first-token), and the children's peak RSS.
fn first_token(model: &Path, runs: usize) -> Result<(f64, u64)> {
    let exe = std::env::current_exe()?;
    let mut times = Vec::new();
    for _ in 0..runs {
        let t0 = Instant::now();
        let out = Command::new(&exe)
            .args([
                "generate",
                "--prompt",
                "Once upon a time",
                "--max-tokens",
                "1",
            ])
            .arg("--model")
            .arg(model)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        if !out.status.success() {
            bail!(
                "`itera generate` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok((median(&times), children_peak_rss()))
}

/// Peak resident set of the largest child process waited for, in bytes.
fn children_peak_rss() -> u64 {
    // SAFETY: `rusage` is plain integers, for which all-zero bytes are a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct we pass, which lives for the call.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    u.ru_maxrss as u64 * 1024
}

fn own_peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn print_report(r: &Value) {
    // Skipped measurements are null in the JSON and "-" here.
    let pct = |v: &Value| {
        v.as_f64().map_or("    - of peak".into(), |x| {
            format!("{:5.1}% of peak", x * 100.0)
        })
    };
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let num = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.0}"));
    println!(
        "model                 {} ({})",
        r["model"].as_str().unwrap_or(""),
        r["format"].as_str().unwrap_or("")
    );
    println!(
        "size                  {:.2} MB file, {:.2} MB weights in memory, {} parameters",
        f(&r["file_bytes"]) / 1e6,
        f(&r["weight_bytes_in_memory"]) / 1e6,
        r["parameters"]
    );
    println!(
        "machine peak          {:.1} GFLOP/s f32 ({} threads, {}); kernels: {}",
        f(&r["peak_flops"]) / 1e9,
        r["peak_threads"],
        r["peak_isa"].as_str().unwrap_or(""),
        r["kernels"].as_str().unwrap_or("")
    );
    println!(
        "FLOPs per token       {:.2} M",
        f(&r["flops_per_token"]) / 1e6
    );
    println!(
        "prefill               {:>10} tokens/s  {}  ({} x {} tokens)",
        num(&r["prefill"]["tokens_per_s"]),
        pct(&r["prefill"]["fraction_of_peak"]),
        r["prefill"]["sequences"],
        r["prefill"]["length"]
    );
    println!(
        "eval (one stream)     {:>10} tokens/s  {}",
        num(&r["eval"]["tokens_per_s"]),
        pct(&r["eval"]["fraction_of_peak"])
    );
    println!(
        "decode, 1 stream      {:>10} tokens/s  {}  p50 {:.1} us, p99 {:.1} us per token",
        num(&r["decode"]["tokens_per_s"]),
        pct(&r["decode"]["fraction_of_peak"]),
        f(&r["decode"]["latency_p50_us"]),
        f(&r["decode"]["latency_p99_us"])
    );
    println!(
        "  memory bound        {:.2} MB of weights per token; {:.1} GB/s = {:.0}% of the read bandwidth of the {} core(s) decode uses ({:.1} GB/s over the same bytes)",
        f(&r["decode"]["weight_bytes_per_token"]) / 1e6,
        f(&r["decode"]["tokens_per_s"]) * f(&r["decode"]["weight_bytes_per_token"]) / 1e9,
        f(&r["decode"]["fraction_of_bandwidth"]) * 100.0,
        r["decode"]["read_bandwidth_cores"],
        f(&r["decode"]["read_bandwidth_bytes_per_s"]) / 1e9
    );
    if let Some(phases) = r["decode_phases_ns"].as_object().filter(|p| !p.is_empty()) {
        let total: f64 = phases.values().filter_map(Value::as_f64).sum();
        // In the model's order (the JSON object's keys are sorted).
        let parts: Vec<String> = itera_core::runtime::Phase::ALL
            .iter()
            .map(|p| {
                let ns = phases.get(p.name()).and_then(Value::as_f64).unwrap_or(0.0);
                format!("{} {:.2}", p.name(), ns / 1e3)
            })
            .collect();
        println!(
            "  phases (us/token)   {} (sum {:.1}, timed separately)",
            parts.join(", "),
            total / 1e3
        );
    }
    for s in ["1", "8", "64"] {
        let b = &r["batched_decode"][s];
        println!(
            "batched decode, {s:>2}    {:>10} tokens/s  {}",
            num(&b["tokens_per_s"]),
            pct(&b["fraction_of_peak"])
        );
    }
    if let Some(b) = r["versus_baseline"].as_object() {
        println!(
            "vs {}  decode {:.2}x ({:.0} vs {:.0} tokens/s), prefill {:.2}x (alternating A/B runs)",
            b["baseline"].as_str().unwrap_or(""),
            f(&b["decode_speedup"]),
            f(&b["decode_tokens_per_s"]),
            f(&b["baseline_decode_tokens_per_s"]),
            f(&b["prefill_speedup"])
        );
    }
    let scaled = |v: &Value, scale: f64| {
        v.as_f64()
            .map_or("-".into(), |x| format!("{:.1}", x * scale))
    };
    println!(
        "start to first token  {} ms (process spawn to exit, `itera generate --max-tokens 1`)",
        scaled(&r["start_to_first_token_ms"], 1.0)
    );
    println!(
        "peak RSS              {} MB (generate process), {} MB (this benchmark)",
        scaled(&r["generate_peak_rss_bytes"], 1e-6),
        scaled(&r["bench_peak_rss_bytes"], 1e-6)
    );
}
