//! Property-based fuzzing of every file a user hands us: corrupted safetensors, GGUF, config,
//! tokenizer and saved-state files (mutations of valid ones: flipped and overwritten bytes, truncations,
//! insertions, absurd numbers in JSON). Each case must load or fail with an error; a panic, an
//! abort or a hang fails the test (proptest reports the smallest failing input). Seeded, so CI
//! runs the same cases every time; `ITERA_FUZZ_CASES=N` runs more (the long campaign).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use itera_core::format::gguf::{self, GgufFile};
use itera_core::format::model_dir::{load_runtime, ModelDir};
use itera_core::format::{dtype::DType, safetensors as st};
use itera_core::{ModelConfig, Tokenizer, Weights};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

fn cases() -> u32 {
    std::env::var("ITERA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

/// A seeded runner: the same cases on every run.
fn runner(seed: u8) -> TestRunner {
    TestRunner::new_with_rng(
        Config {
            cases: cases(),
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]),
    )
}

/// Outcomes of one fuzz target, printed at its end (`--nocapture`) for docs/reliability.md; and
/// a watchdog: a case that takes longer than `HANG` ends the test process with an error naming the
/// target, so a hang fails the test instead of stalling CI.
struct Tally {
    name: &'static str,
    ok: AtomicUsize,
    refused: AtomicUsize,
    last: Arc<Mutex<Instant>>,
    done: Arc<AtomicBool>,
}

const HANG: Duration = Duration::from_secs(60);

impl Tally {
    fn new(name: &'static str) -> Self {
        let (last, done) = (
            Arc::new(Mutex::new(Instant::now())),
            Arc::new(AtomicBool::new(false)),
        );
        let (l, d) = (last.clone(), done.clone());
        std::thread::spawn(move || {
            while !d.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if l.lock().unwrap().elapsed() > HANG && !d.load(Relaxed) {
                    eprintln!("{name}: a case ran for over {HANG:?}: a hang");
                    std::process::exit(3);
                }
            }
        });
        Self {
            name,
            ok: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            last,
            done,
        }
    }

    /// Counts one case by its outcome (loaded and ran, or refused with an error).
    fn count<T, E>(&self, r: &Result<T, E>) {
        *self.last.lock().unwrap() = Instant::now();
        let c = if r.is_ok() { &self.ok } else { &self.refused };
        c.fetch_add(1, Relaxed);
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.done.store(true, Relaxed);
        if std::thread::panicking() {
            return;
        }
        let (ok, refused) = (self.ok.load(Relaxed), self.refused.load(Relaxed));
        eprintln!(
            "{}: {} cases, {ok} loaded, {refused} refused with an error, no panic, none over {HANG:?}",
            self.name,
            ok + refused
        );
    }
}

/// A valid model: its directory, weights bytes, a GGUF of it, config and tokenizer JSON.
type Valid = (PathBuf, Vec<u8>, Vec<u8>, String, String);

/// Overwritten bytes, a cut, inserted bytes.
type Mutation = (Vec<(usize, u8)>, Option<usize>, Vec<(usize, Vec<u8>)>);

/// A small valid model directory (micro, vocab of the fixture tokenizer) and a GGUF of it.
fn valid() -> &'static Valid {
    static V: OnceLock<Valid> = OnceLock::new();
    V.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-valid");
        let tok = Tokenizer::train(
            &[root
                .join("tests/fixtures/english.txt")
                .display()
                .to_string()],
            300,
        )
        .unwrap();
        let mut cfg = ModelConfig::preset("micro").unwrap();
        cfg.vocab_size = tok.vocab_size();
        ModelDir::save(&dir, &cfg, &Weights::init(&cfg, 1).unwrap(), &tok).unwrap();
        let m = ModelDir::load(&dir).unwrap();
        let file = gguf::model_file(
            &cfg,
            &tok.to_json().unwrap(),
            "fuzz",
            |n| Ok(m.weights.values(n)?.to_vec()),
            |s| {
                if s.quantizable(32) {
                    DType::Q4_1
                } else {
                    DType::F32
                }
            },
            Default::default(),
        )
        .unwrap();
        let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
        let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let tokenizer = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
        (dir, weights, file.to_bytes(), config, tokenizer)
    })
}

/// A mutation of `bytes`: some positions overwritten with random bytes, then maybe cut short or
/// grown by inserted bytes.
fn mutated(len: usize) -> impl Strategy<Value = Mutation> {
    (
        prop::collection::vec((0..len, any::<u8>()), 1..8),
        prop::option::weighted(0.2, 0..len),
        prop::collection::vec((0..len, prop::collection::vec(any::<u8>(), 1..16)), 0..2),
    )
}

fn apply(bytes: &[u8], m: &Mutation) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for &(i, b) in &m.0 {
        out[i] = b;
    }
    for (i, ins) in &m.2 {
        let at = (*i).min(out.len());
        out.splice(at..at, ins.iter().copied());
    }
    if let Some(cut) = m.1 {
        out.truncate(cut);
    }
    out
}

/// Writes `name` with `bytes` into a fresh copy of the valid model directory.
fn dir_with(case: &str, name: &str, bytes: &[u8]) -> PathBuf {
    let (dir, ..) = valid();
    let d = dir.with_file_name(format!(
        "fuzz-{case}-{}",
        std::thread::current()
            .name()
            .unwrap_or("t")
            .replace("::", "-")
    ));
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(dir.join(f), d.join(f)).unwrap();
    }
    std::fs::write(d.join(name), bytes).unwrap();
    d
}

#[test]
fn corrupted_safetensors_files_load_or_fail_cleanly() {
    let (_, weights, ..) = valid();
    let tally = Tally::new("safetensors");
    runner(1)
        .run(&mutated(weights.len()), |m| {
            let d = dir_with("st", "model.safetensors", &apply(weights, &m));
            // Either path may succeed (a mutation inside a weight is a valid file) or fail.
            let _ = ModelDir::load(&d);
            let _ = st::read(&d.join("model.safetensors"));
            tally.count(&load_runtime(&d));
            Ok(())
        })
        .unwrap();
}

#[test]
fn corrupted_gguf_files_load_or_fail_cleanly() {
    let (dir, _, file, ..) = valid();
    let path = dir.with_file_name("fuzz-gguf.gguf");
    let tally = Tally::new("gguf");
    runner(2)
        .run(&mutated(file.len()), |m| {
            let bytes = apply(file, &m);
            if let Ok(g) = GgufFile::parse(&bytes) {
                let _ = g.config();
            }
            std::fs::write(&path, &bytes).unwrap();
            let loaded = load_runtime(&path);
            if let Ok((rt, tok)) = &loaded {
                // A file that loads must also run.
                let ids = tok.encode("the cat").unwrap_or_default();
                let (mut s, mut sc) = (rt.new_state(), rt.new_scratch());
                let _ = rt.prefill(&ids, &mut s, &mut sc);
            }
            tally.count(&loaded);
            Ok(())
        })
        .unwrap();
}

/// Config JSON with fields replaced by values of every kind (huge, negative, fractional,
/// strings, nulls, nested) must parse and validate, or fail naming the problem.
#[test]
fn hostile_configs_are_refused_or_accepted_without_allocating() {
    let (_, _, _, config, _) = valid();
    let base: serde_json::Value = serde_json::from_str(config).unwrap();
    let mut fields: Vec<String> = base.as_object().unwrap().keys().cloned().collect();
    // Fields a fresh config leaves out (written only when set: after pruning).
    fields.extend(["expert_counts".into(), "moe_skip_beta".into()]);
    let value = prop_oneof![
        any::<u64>().prop_map(|v| serde_json::json!(v)),
        any::<i64>().prop_map(|v| serde_json::json!(v)),
        (0u32..64).prop_map(|b| serde_json::json!(1u64 << b)),
        any::<f64>().prop_map(|v| serde_json::json!(v)),
        ".{0,12}".prop_map(|s| serde_json::json!(s)),
        Just(serde_json::Value::Null),
        prop::collection::vec(0u64..1 << 40, 0..6).prop_map(|v| serde_json::json!(v)),
    ];
    let tally = Tally::new("config");
    runner(3)
        .run(
            &(prop::sample::select(fields), value, any::<bool>()),
            |(field, v, drop)| {
                let mut c = base.clone();
                if drop {
                    c.as_object_mut().unwrap().remove(&field);
                } else {
                    c[&field] = v;
                }
                let parsed = ModelConfig::from_json(&c.to_string(), "fuzz.json");
                if let Ok(cfg) = &parsed {
                    // Accepted configs are bounded: their table builds and counts fit.
                    let _ = cfg.parameter_count();
                    let d = dir_with("cfg", "config.json", c.to_string().as_bytes());
                    tally.count(&load_runtime(&d));
                } else {
                    tally.count(&parsed);
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn corrupted_tokenizers_load_or_fail_cleanly_and_then_work() {
    let (_, _, _, _, tokenizer) = valid();
    let bytes = tokenizer.as_bytes();
    let tally = Tally::new("tokenizer");
    runner(4)
        .run(&(mutated(bytes.len()), ".{0,40}"), |(m, text)| {
            let mutated = apply(bytes, &m);
            if let Ok(t) = Tokenizer::from_bytes(&mutated, "fuzz") {
                if let Ok(ids) = t.encode(&text) {
                    let _ = t.decode(&ids);
                }
                let _ = t.encode_limited(&text, 4);
            }
            let d = dir_with("tok", "tokenizer.json", &mutated);
            tally.count(&load_runtime(&d));
            Ok(())
        })
        .unwrap();
}

/// Tokenizers that are valid JSON but wrong inside (byte mutations nearly always break the JSON
/// itself): vocabulary entries removed, renumbered to any id or renamed, merges replaced, dropped
/// or duplicated, other fields given values of the wrong kind. Each loads and then encodes and
/// decodes text, or is refused with an error.
#[test]
fn tokenizers_wrong_inside_load_or_fail_cleanly_and_then_work() {
    let (_, _, _, _, tokenizer) = valid();
    let base: serde_json::Value = serde_json::from_str(tokenizer).unwrap();
    let vocab: Vec<String> = base["model"]["vocab"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let merges = base["model"]["merges"].as_array().unwrap().len();
    let edit = prop_oneof![
        (prop::sample::select(vocab.clone())).prop_map(|k| (0u8, k, 0u64, String::new())),
        (prop::sample::select(vocab.clone()), any::<u64>()).prop_map(|(k, v)| (
            1,
            k,
            v,
            String::new()
        )),
        (prop::sample::select(vocab), ".{0,6}").prop_map(|(k, s)| (2, k, 0, s)),
        (0..merges as u64, ".{0,6}").prop_map(|(i, s)| (3, String::new(), i, s)),
        (0..merges as u64).prop_map(|i| (4, String::new(), i, String::new())),
        (0..merges as u64).prop_map(|i| (5, String::new(), i, String::new())),
        prop::sample::select(vec![
            "version",
            "added_tokens",
            "pre_tokenizer",
            "decoder",
            "model"
        ])
        .prop_map(|k| (6, k.to_string(), 0, String::new())),
    ];
    let tally = Tally::new("tokenizer (wrong inside)");
    runner(6)
        .run(
            &(prop::collection::vec(edit, 1..4), ".{0,40}"),
            |(edits, text)| {
                let mut t = base.clone();
                for (kind, key, n, s) in edits {
                    if kind < 6 && !t["model"]["vocab"].is_object() {
                        continue; // an earlier edit replaced the model or its vocabulary
                    }
                    let model = &mut t["model"];
                    match kind {
                        0 => drop(model["vocab"].as_object_mut().unwrap().remove(&key)),
                        1 => model["vocab"][&key] = serde_json::json!(n),
                        2 => {
                            let v = model["vocab"].as_object_mut().unwrap();
                            if let Some(id) = v.remove(&key) {
                                v.insert(s, id);
                            }
                        }
                        3..=5 => {
                            let m = model["merges"].as_array_mut().unwrap();
                            let i = n as usize % m.len().max(1);
                            if i < m.len() {
                                match kind {
                                    3 => m[i] = serde_json::json!([s, "e"]),
                                    4 => drop(m.remove(i)),
                                    _ => m.push(m[i].clone()),
                                }
                            }
                        }
                        _ => t[&key] = serde_json::json!(n),
                    }
                }
                let bytes = t.to_string().into_bytes();
                let parsed = Tokenizer::from_bytes(&bytes, "fuzz");
                if let Ok(tok) = &parsed {
                    if let Ok(ids) = tok.encode(&text) {
                        let _ = tok.decode(&ids);
                    }
                }
                tally.count(&parsed);
                Ok(())
            },
        )
        .unwrap();
}

/// A saved stream state (`itera generate --save-state`), corrupted: loads or fails cleanly, and a
/// state that loads can be continued.
#[test]
fn corrupted_state_files_load_or_fail_cleanly() {
    use itera_core::format::state_file::{self, SavedState};
    let (dir, ..) = valid();
    let (rt, tok) = load_runtime(dir).unwrap();
    let (mut state, mut scratch) = (rt.new_state(), rt.new_scratch());
    rt.prefill(
        &tok.encode("the cat sat").unwrap(),
        &mut state,
        &mut scratch,
    )
    .unwrap();
    let path = dir.with_file_name("fuzz-state.safetensors");
    let saved = SavedState {
        state,
        logits: scratch.logits[..rt.cfg.vocab_size].to_vec(),
        sampler: None,
        pending: Vec::new(),
    };
    state_file::save(&path, &rt, &saved).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let tally = Tally::new("state");
    runner(5)
        .run(&mutated(bytes.len()), |m| {
            std::fs::write(&path, apply(&bytes, &m)).unwrap();
            let loaded = state_file::load(&path, &rt);
            if let Ok(mut s) = loaded {
                let _ = rt.step(0, &mut s.state, &mut rt.new_scratch());
                tally.count(&Ok::<(), ()>(()));
            } else {
                tally.count(&loaded);
            }
            Ok(())
        })
        .unwrap();
}
