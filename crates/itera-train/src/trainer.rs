//! The training loop: batches -> forward -> CE (or the distillation loss) + aux loss ->
//! backward -> clipped AdamW over the trainable tensors, with periodic validation, metrics.jsonl,
//! loss.png and atomic checkpoints that resume exactly.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::Var;
use itera_core::format::safetensors as st;
use itera_core::format::write_atomic;
use itera_core::rng::Rng;
use itera_core::tensors::ModelSpec;
use itera_core::{ModelConfig, ModelDir, Tokenizer, Weights};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::{batch_at, train_offsets, valid_offsets, Corpus};
use crate::distill::Teacher;
use crate::error::{Error, Result};
use crate::optim::{learning_rate, AdamW};
pub use crate::options::{TrainOnly, TrainOptions};
use crate::plot::plot_losses;
use crate::reference::{Model, Params};

/// Mixed into the run's seed for the dropout masks (independent of the batch sampling).
const DROPOUT_STREAM: u64 = 0xD40D_0D40;

/// Windows per validation when `eval_windows` is 0 but the mixer carries no state to walk the
/// whole text with (attention).
const STATELESS_EVAL_WINDOWS: usize = 64;

/// Saved beside the weights so `--resume` knows where it stands.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainState {
    step: usize,
    options: TrainOptions,
    best_val_loss: Option<f64>,
    elapsed_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub ce: f64,
    /// The KL term (distillation runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    pub aux: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalMetrics {
    pub step: usize,
    pub val_loss: f64,
    pub val_bpb: f64,
}

pub enum TrainEvent<'a> {
    Start {
        start_step: usize,
        total_steps: usize,
        train_tokens: usize,
        valid_tokens: usize,
        parameters: usize,
    },
    Step(&'a StepMetrics),
    Eval(&'a EvalMetrics),
    Saved(&'a Path),
}

/// One core's share of a training step: the forward and backward of some of the batch's windows
/// as a graph of its own. A batch runs as one shard per core, side by side, and the gradients are
/// averaged by rows: with the whole batch in one graph, the cores took turns through candle's
/// serial parts (its gradient sums, allocations, element-wise ops) and 1.5 of 2 were busy. The
/// MoE load-balancing loss is taken per shard (a product of two means, so not a plain mean over
/// tokens); with one core there is one shard and the step is exactly the one-graph step.
struct Shard {
    rows: usize,
    grads: GradStore,
    loss: f64,
    ce: f64,
    kl: Option<f64>,
    aux: f64,
}

pub const CHECKPOINT_DIR: &str = "checkpoint";
pub const BEST_DIR: &str = "best";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const EMA_FILE: &str = "ema.safetensors";
const STATE_FILE: &str = "train_state.json";
const METRICS_FILE: &str = "metrics.jsonl";

pub struct Run {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub options: TrainOptions,
    params: Params,
    opt: AdamW,
    step: usize,
    best_val_loss: Option<f64>,
    elapsed_s: f64,
    /// The moving average of the weights (`options.ema` > 0, from `ema_start` on).
    ema: Option<Weights>,
    teacher: Option<Teacher>,
}

/// Trainable copies of the weights (`o.train_only` of them; the rest plain tensors), and the
/// optimizer over them (AdamW decays what the tensor table says decays).
fn trainable(cfg: &ModelConfig, weights: &Weights, o: &TrainOptions) -> Result<(Params, AdamW)> {
    let spec = ModelSpec::new(cfg);
    let mut vars = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    for (name, t) in &Params::from_weights(weights)?.tensors {
        if !o.train_only.trains(spec.get(name).map(|s| s.role)) {
            tensors.insert(name.clone(), t.clone());
            continue;
        }
        let v = Var::from_tensor(t)?;
        tensors.insert(name.clone(), v.as_tensor().clone());
        vars.insert(name.clone(), v);
    }
    let decays = |name: &str, _: &[usize]| spec.get(name).is_none_or(|s| s.decays());
    let opt = AdamW::new(o.optimizer.clone(), &vars, decays);
    Ok((Params { tensors }, opt))
}

impl Run {
    /// A new run in `dir` (which must not hold a checkpoint already) from fresh weights.
    pub fn create(
        dir: &Path,
        config: ModelConfig,
        tokenizer: Tokenizer,
        options: TrainOptions,
    ) -> Result<Self> {
        let init = Weights::init(&config, options.seed)?;
        Self::create_from(dir, config, tokenizer, options, &init)
    }

    /// A new run in `dir` that starts from `weights` (fine-tuning, healing a pruned model).
    pub fn create_from(
        dir: &Path,
        config: ModelConfig,
        tokenizer: Tokenizer,
        options: TrainOptions,
        weights: &Weights,
    ) -> Result<Self> {
        options.validate()?;
        if dir.join(CHECKPOINT_DIR).exists() {
            return Err(Error::file(dir, "already holds a checkpoint; use --resume to continue it or choose another run name"));
        }
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(Error::Train(format!(
                "tokenizer has {} tokens, the model only {}",
                tokenizer.vocab_size(),
                config.vocab_size
            )));
        }
        let teacher = match &options.distill {
            Some(d) => Some(Teacher::load(d, &config, &tokenizer)?),
            None => None,
        };
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        let (params, opt) = trainable(&config, weights, &options)?;
        let _ = std::fs::remove_file(dir.join(METRICS_FILE));
        Ok(Self {
            dir: dir.into(),
            config,
            tokenizer,
            options,
            params,
            opt,
            step: 0,
            best_val_loss: None,
            elapsed_s: 0.0,
            ema: None,
            teacher,
        })
    }

    /// Continues the run in `dir` from its last checkpoint; `steps` may extend the total.
    pub fn resume(dir: &Path, steps: Option<usize>) -> Result<Self> {
        let ck = checkpoint_path(dir)?;
        let model = ModelDir::load(&ck)?;
        let state_path = ck.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::file(&state_path, e))?;
        let state: TrainState = serde_json::from_str(&text)
            .map_err(|e| Error::file(&state_path, format!("corrupt: {e}")))?;
        let mut options = state.options;
        if let Some(s) = steps {
            options.steps = s;
        }
        if options.steps <= state.step {
            return Err(Error::Train(format!(
                "run is already at step {} of {}; pass a larger --steps",
                state.step, options.steps
            )));
        }
        options
            .validate()
            .map_err(|e| Error::file(&state_path, e))?;
        let teacher = match &options.distill {
            Some(d) => Some(Teacher::load(d, &model.config, &model.tokenizer)?),
            None => None,
        };
        let (params, mut opt) = trainable(&model.config, &model.weights, &options)?;
        let opt_path = ck.join(OPTIMIZER_FILE);
        opt.load_state(
            &st::read(&opt_path)?.0,
            state.step as u64,
            &opt_path.display().to_string(),
        )?;
        let mut run = Self {
            dir: dir.into(),
            config: model.config,
            tokenizer: model.tokenizer,
            options,
            params,
            opt,
            step: state.step,
            best_val_loss: state.best_val_loss,
            elapsed_s: state.elapsed_s,
            ema: None,
            teacher,
        };
        let ema_path = ck.join(EMA_FILE);
        if ema_path.is_file() {
            let (tensors, _) = st::read(&ema_path)?;
            let ema_origin = ema_path.display().to_string();
            run.ema = Some(Weights::from_tensors(&run.config, tensors, &ema_origin)?);
        }
        run.truncate_metrics()?;
        Ok(run)
    }

    pub fn step(&self) -> usize {
        self.step
    }

    /// Tokenizes the run's training and validation text. Without validation files, the
    /// held-out slice of each training file is kept under `heldout/`, so each source can be
    /// evaluated later with `itera eval`.
    pub fn load_corpus(&self) -> Result<Corpus> {
        let o = &self.options;
        let corpus = Corpus::load(&self.tokenizer, &o.train_files, &o.valid_files, o.holdout)?;
        for (name, text) in &corpus.heldout {
            write_atomic(&self.dir.join("heldout").join(name), text.as_bytes())?;
        }
        Ok(corpus)
    }

    /// Sets the total steps to `epochs` passes over the corpus's training tokens.
    pub fn set_epochs(&mut self, epochs: f64, corpus: &Corpus) {
        let o = &self.options;
        let per_step = (o.batch_size * o.seq_len) as f64;
        self.options.steps = ((epochs * corpus.train.len() as f64) / per_step)
            .ceil()
            .max(1.0) as usize;
    }

    /// Drops metric lines past the checkpoint so a resumed run's log has no duplicates.
    fn truncate_metrics(&self) -> Result<()> {
        let path = self.dir.join(METRICS_FILE);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= self.step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&path, kept.as_bytes())?;
        Ok(())
    }

    fn log(&self, value: &impl Serialize) -> Result<()> {
        let path = self.dir.join(METRICS_FILE);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::file(&path, e))?;
        writeln!(
            f,
            "{}",
            serde_json::to_string(value).expect("metrics serialise")
        )
        .map_err(|e| Error::file(&path, e))
    }

    /// Mean validation cross-entropy (no gradients): over the whole text through the inference
    /// runtime, or over fixed windows (`TrainOptions::eval_windows`).
    pub fn validate(&self, corpus: &Corpus) -> Result<EvalMetrics> {
        let o = &self.options;
        let metrics = |val_loss: f64| EvalMetrics {
            step: self.step,
            val_loss,
            val_bpb: val_loss / (corpus.valid_bytes_per_token * std::f64::consts::LN_2),
        };
        if o.eval_windows == 0 && self.config.mixer.is_recurrent() {
            let runtime = itera_core::Runtime::new(&self.config, &self.measured_weights()?)?;
            return Ok(metrics(itera_core::eval::mean_nll(
                &runtime,
                &corpus.valid,
            )?));
        }
        let windows = if o.eval_windows == 0 {
            STATELESS_EVAL_WINDOWS
        } else {
            o.eval_windows
        };
        let offsets = valid_offsets(corpus.valid.len(), o.seq_len, windows);
        if offsets.is_empty() {
            return Err(Error::Train(format!(
                "validation text has {} tokens, fewer than one window of {}",
                corpus.valid.len(),
                o.seq_len + 1
            )));
        }
        let detached = match &self.ema {
            Some(w) => Params::from_weights(w)?,
            None => Params {
                tensors: self
                    .params
                    .tensors
                    .iter()
                    .map(|(k, t)| (k.clone(), t.detach()))
                    .collect(),
            },
        };
        let model = Model::new(&self.config, &detached);
        let mut total = 0.0;
        for chunk in offsets.chunks(o.batch_size) {
            let (x, y) = batch_at(&corpus.valid, chunk, o.seq_len)?;
            let (ce, _) = model.loss(&x, &y)?;
            total += ce.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        }
        Ok(metrics(total / offsets.len() as f64))
    }

    /// Trains until `options.steps`, reporting through `on_event`; returns the final validation.
    pub fn train(
        &mut self,
        corpus: &Corpus,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<EvalMetrics> {
        self.train_until(corpus, self.options.steps, on_event)
    }

    /// Trains up to `stop_at` (at most `options.steps`) and checkpoints there, as an interrupted
    /// run would; the schedule still spans `options.steps`, so a resume continues exactly.
    pub fn train_until(
        &mut self,
        corpus: &Corpus,
        stop_at: usize,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<EvalMetrics> {
        let o = self.options.clone();
        let stop_at = stop_at.min(o.steps);
        if corpus.train.len() <= o.window() + 1 {
            return Err(Error::Train(format!(
                "training text has {} tokens, fewer than one window of {}",
                corpus.train.len(),
                o.window() + 1
            )));
        }
        corpus.window_shares(&o.source_weights, o.window())?;
        if let Some(&bad) = corpus
            .train
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(Error::Train(format!(
                "token id {bad} is outside the model's vocab of {}",
                self.config.vocab_size
            )));
        }
        on_event(TrainEvent::Start {
            start_step: self.step,
            total_steps: o.steps,
            train_tokens: corpus.train.len(),
            valid_tokens: corpus.valid.len(),
            parameters: self.params.parameter_count(),
        });
        let started = Instant::now();
        let base_elapsed = self.elapsed_s;
        let mut last = None;
        while self.step < stop_at {
            let t0 = Instant::now();
            let offsets = train_offsets(
                corpus,
                &o.source_weights,
                o.window(),
                o.batch_size,
                o.seed,
                self.step,
            );
            let noise = Rng::derive(o.seed ^ DROPOUT_STREAM, self.step as u64).next_u64();
            // One shard per core (see `Shard`); the first shard keeps the step's dropout seed.
            let per = o.batch_size.div_ceil(rayon::current_num_threads().max(1));
            let shards = offsets
                .par_chunks(per)
                .enumerate()
                .map(|(i, offs)| {
                    let noise = if i == 0 {
                        noise
                    } else {
                        Rng::derive(noise, i as u64).next_u64()
                    };
                    self.shard(&corpus.train, offs, noise)
                })
                .collect::<Result<Vec<Shard>>>()?;
            let share = |s: &Shard| s.rows as f64 / o.batch_size as f64;
            let mean = |f: &dyn Fn(&Shard) -> f64| shards.iter().map(|s| share(s) * f(s)).sum();
            let grads: Vec<_> = shards.iter().map(|s| (share(s) as f32, &s.grads)).collect();
            let lr = learning_rate(self.step, o.steps, o.warmup, o.lr, o.min_lr_ratio);
            let grad_norm = self.opt.step(&grads, lr)?;
            self.step += 1;
            self.update_ema()?;
            self.elapsed_s = base_elapsed + started.elapsed().as_secs_f64();
            let m = StepMetrics {
                step: self.step,
                loss: mean(&|s| s.loss),
                ce: mean(&|s| s.ce),
                kl: shards[0].kl.map(|_| mean(&|s| s.kl.unwrap_or(0.0))),
                aux: mean(&|s| s.aux),
                lr,
                grad_norm,
                tokens_per_s: (o.batch_size * o.seq_len) as f64 / t0.elapsed().as_secs_f64(),
                elapsed_s: self.elapsed_s,
            };
            if !m.loss.is_finite() {
                return Err(Error::Train(format!(
                    "loss became {} at step {}; lower the learning rate",
                    m.loss, self.step
                )));
            }
            self.log(&m)?;
            on_event(TrainEvent::Step(&m));
            let at_end = self.step == stop_at;
            if self.step.is_multiple_of(o.eval_every) || at_end {
                let e = self.validate(corpus)?;
                self.log(&e)?;
                on_event(TrainEvent::Eval(&e));
                if self.best_val_loss.is_none_or(|b| e.val_loss < b) {
                    self.best_val_loss = Some(e.val_loss);
                    self.save_model_to(BEST_DIR, false)?;
                }
                self.plot()?;
                last = Some(e);
            }
            if self.step.is_multiple_of(o.save_every) || at_end {
                let path = self.save_model_to(CHECKPOINT_DIR, true)?;
                on_event(TrainEvent::Saved(&path));
            }
        }
        last.map_or_else(|| self.validate(corpus), Ok)
    }

    /// Forward and backward of the windows at `offsets`: its losses and gradients.
    fn shard(&self, tokens: &[u32], offsets: &[usize], noise: u64) -> Result<Shard> {
        let o = &self.options;
        let (x, y) = batch_at(tokens, offsets, o.window())?;
        let model = Model::training(&self.config, &self.params, noise);
        let (main, aux, ce, kl) = match (&self.teacher, &o.distill) {
            (Some(teacher), Some(d)) => {
                let rows = teacher.rows(&x.flatten_all()?.to_vec1()?, x.dim(0)?, x.dim(1)?)?;
                let parts = Default::default();
                let (l, aux) = model.distill_loss(&x, &y, rows, d.loss, Arc::clone(&parts))?;
                let (ce, kl) = *parts.lock().expect("not poisoned");
                (l, aux, ce, Some(kl))
            }
            _ => {
                let (ce, aux) = model.loss_after(&x, &y, o.burn_in)?;
                let value = ce.to_scalar::<f32>()? as f64;
                (ce, aux, value, None)
            }
        };
        let loss = (&main + (&aux * o.aux_weight)?)?;
        Ok(Shard {
            rows: offsets.len(),
            grads: loss.backward()?,
            loss: loss.to_scalar::<f32>()? as f64,
            ce,
            kl,
            aux: aux.to_scalar::<f32>()? as f64,
        })
    }

    /// Writes a model directory (plus optimizer and run state when `full`) under a temporary
    /// name, then swaps it in: a crash leaves the previous one intact.
    fn save_model_to(&self, name: &str, full: bool) -> Result<PathBuf> {
        let final_dir = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let old = self.dir.join(format!("{name}.old"));
        let _ = std::fs::remove_dir_all(&tmp);
        // The best model is what validation measured; a checkpoint keeps the raw weights.
        let weights = if full {
            self.weights()?
        } else {
            self.measured_weights()?
        };
        ModelDir::save(&tmp, &self.config, &weights, &self.tokenizer)?;
        if full {
            let path = tmp.join(OPTIMIZER_FILE);
            st::write(&path, &self.opt.state_tensors(), Default::default())?;
            if let Some(ema) = &self.ema {
                st::write(&tmp.join(EMA_FILE), &ema.tensors, Default::default())?;
            }
            let state = TrainState {
                step: self.step,
                options: self.options.clone(),
                best_val_loss: self.best_val_loss,
                elapsed_s: self.elapsed_s,
            };
            write_atomic(
                &tmp.join(STATE_FILE),
                serde_json::to_string_pretty(&state)
                    .expect("state serialises")
                    .as_bytes(),
            )?;
        }
        let _ = std::fs::remove_dir_all(&old);
        if final_dir.exists() {
            std::fs::rename(&final_dir, &old).map_err(|e| Error::file(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| Error::file(&tmp, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(final_dir)
    }

    /// Redraws loss.png from metrics.jsonl.
    pub fn plot(&self) -> Result<()> {
        let text = std::fs::read_to_string(self.dir.join(METRICS_FILE)).unwrap_or_default();
        let (mut train, mut valid) = (Vec::new(), Vec::new());
        for v in text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            let step = v["step"].as_f64().unwrap_or(0.0);
            if let Some(l) = v["ce"].as_f64() {
                train.push((step, l));
            }
            if let Some(l) = v["val_loss"].as_f64() {
                valid.push((step, l));
            }
        }
        // Smooth the noisy per-step loss over a window of ~1% of the run.
        let w = (train.len() / 100).max(1);
        let smooth: Vec<(f64, f64)> = train
            .chunks(w)
            .map(|c| {
                (
                    c[c.len() - 1].0,
                    c.iter().map(|p| p.1).sum::<f64>() / c.len() as f64,
                )
            })
            .collect();
        plot_losses(
            &self.dir.join("loss.png"),
            &[
                ("train", [31, 119, 180], smooth),
                ("valid", [214, 39, 40], valid),
            ],
        )
    }

    /// Folds the current weights into the moving average (from `ema_start` on).
    fn update_ema(&mut self) -> Result<()> {
        let o = &self.options;
        if o.ema == 0.0 || self.step < o.ema_start.max(1) {
            return Ok(());
        }
        let now = self.weights()?;
        match &mut self.ema {
            None => self.ema = Some(now),
            Some(avg) => {
                let d = o.ema as f32;
                for (k, t) in &mut avg.tensors {
                    let cur = &now.tensors[k].data;
                    for (a, &w) in t.data.iter_mut().zip(cur) {
                        *a = d * *a + (1.0 - d) * w;
                    }
                }
            }
        }
        Ok(())
    }

    /// Snapshot of the current weights (e.g. for a test, a checkpoint or an export).
    pub fn weights(&self) -> Result<Weights> {
        self.params.to_weights()
    }

    /// The weights validation measures and `best/` holds: the average when there is one.
    pub fn measured_weights(&self) -> Result<Weights> {
        match &self.ema {
            Some(ema) => Ok(ema.clone()),
            None => self.weights(),
        }
    }
}

/// The run's checkpoint directory, falling back to the previous one if a swap was interrupted.
pub fn checkpoint_path(dir: &Path) -> Result<PathBuf> {
    for name in [CHECKPOINT_DIR.to_string(), format!("{CHECKPOINT_DIR}.old")] {
        let p = dir.join(name);
        if p.join(STATE_FILE).is_file() {
            return Ok(p);
        }
    }
    Err(Error::file(
        dir,
        "holds no checkpoint to resume (expected checkpoint/train_state.json)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::DistillOptions;
    use itera_core::tensors::Role;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/english.txt")
    }

    fn setup(dir: &Path) -> (ModelConfig, Tokenizer, TrainOptions) {
        let _ = std::fs::remove_dir_all(dir);
        let tok = Tokenizer::train(&[fixture().display().to_string()], 400).unwrap();
        let mut cfg = ModelConfig::preset("micro").unwrap();
        cfg.vocab_size = tok.vocab_size();
        let mut o = TrainOptions::new(vec![fixture()], 20);
        (
            o.batch_size,
            o.seq_len,
            o.warmup,
            o.eval_every,
            o.save_every,
            o.eval_windows,
        ) = (4, 32, 5, 10, 10, 8);
        o.holdout = 0.1;
        (cfg, tok, o)
    }

    fn losses(dir: &Path) -> Vec<f64> {
        std::fs::read_to_string(dir.join(METRICS_FILE))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["ce"].as_f64())
            .collect()
    }

    #[test]
    fn loss_decreases_and_resume_matches_a_straight_run() {
        let tmp = std::env::temp_dir().join(format!("itera-train-{}", std::process::id()));
        let (a_dir, b_dir) = (tmp.join("a"), tmp.join("b"));
        let (cfg, tok, o) = setup(&a_dir);
        let corpus = Corpus::load(&tok, &o.train_files, &[], o.holdout).unwrap();
        let mut a = Run::create(&a_dir, cfg.clone(), tok.clone(), o.clone()).unwrap();
        let first_val = a.validate(&corpus).unwrap().val_loss;
        let last_val = a.train(&corpus, &mut |_| {}).unwrap().val_loss;
        assert!(
            last_val < first_val - 0.25,
            "validation loss {first_val} -> {last_val}"
        );

        let _ = std::fs::remove_dir_all(&b_dir);
        let mut b = Run::create(&b_dir, cfg, tok, o).unwrap();
        b.train_until(&corpus, 10, &mut |_| {}).unwrap();
        drop(b);
        let mut b = Run::resume(&b_dir, None).unwrap();
        assert_eq!(b.step(), 10);
        b.train(&corpus, &mut |_| {}).unwrap();
        let (la, lb) = (losses(&a_dir), losses(&b_dir));
        assert_eq!(la.len(), 20);
        assert_eq!(lb.len(), 20);
        for (i, (x, y)) in la.iter().zip(&lb).enumerate() {
            assert!(
                (x - y).abs() < 1e-5,
                "step {}: straight {x} vs resumed {y}",
                i + 1
            );
        }
        assert!(dir_has_model(&a_dir.join(CHECKPOINT_DIR)) && dir_has_model(&a_dir.join(BEST_DIR)));
        assert!(a_dir.join("loss.png").is_file());
        // A finished run refuses to resume without more steps; a second create refuses to overwrite.
        assert!(Run::resume(&a_dir, None).is_err());
        let (cfg, tok, o) = (a.config.clone(), a.tokenizer.clone(), a.options.clone());
        assert!(Run::create(&a_dir, cfg, tok, o).is_err());
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    /// With `eval_windows` 0, validation scores the whole held-out text through the inference
    /// runtime with the state carried through it: the mean of the per-token scores
    /// `itera_core::eval::score_tokens` gives for the run's weights, not the windowed loss.
    #[test]
    fn whole_text_validation_is_the_runtime_protocol() {
        let dir = std::env::temp_dir().join(format!("itera-val-{}", std::process::id()));
        let (cfg, tok, mut o) = setup(&dir);
        o.eval_windows = 0;
        let corpus = Corpus::load(&tok, &o.train_files, &[], o.holdout).unwrap();
        let mut run = Run::create(&dir, cfg.clone(), tok, o).unwrap();
        run.train_until(&corpus, 5, &mut |_| {}).unwrap();
        let whole = run.validate(&corpus).unwrap().val_loss;
        let rt = itera_core::Runtime::new(&cfg, &run.weights().unwrap()).unwrap();
        let mut state = rt.new_state();
        let (scores, _) =
            itera_core::eval::score_tokens(&rt, &mut state, None, &corpus.valid, 0).unwrap();
        let nll: f64 = scores.iter().flatten().map(|s| -s.logprob as f64).sum();
        let want = nll / (corpus.valid.len() - 1) as f64;
        assert!((whole - want).abs() < 1e-4 * want, "{whole} vs {want}");
        run.options.eval_windows = 8;
        let windowed = run.validate(&corpus).unwrap().val_loss;
        assert!(
            windowed.is_finite() && (whole - windowed).abs() > 1e-4,
            "{whole} {windowed}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A step's shards (one per core) average to the one-graph gradient of the whole batch when
    /// nothing but the cross-entropy is trained (the load-balancing loss is per shard).
    #[test]
    fn shard_gradients_average_to_the_whole_batch() {
        let dir = std::env::temp_dir().join(format!("itera-shards-{}", std::process::id()));
        let (cfg, tok, mut o) = setup(&dir);
        o.aux_weight = 0.0;
        let corpus = Corpus::load(&tok, &o.train_files, &[], o.holdout).unwrap();
        let run = Run::create(&dir, cfg, tok, o).unwrap();
        let offsets = train_offsets(&corpus, &[], 32, 4, 1, 0);
        let whole = run.shard(&corpus.train, &offsets, 7).unwrap();
        let halves =
            [&offsets[..2], &offsets[2..]].map(|offs| run.shard(&corpus.train, offs, 7).unwrap());
        assert_eq!(halves[0].rows, 2);
        assert!((whole.ce - (halves[0].ce + halves[1].ce) / 2.0).abs() < 1e-5);
        let flat = |s: &Shard, t: &candle_core::Tensor| {
            s.grads
                .get(t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let mut compared = 0;
        for t in run.params.tensors.values() {
            if whole.grads.get(t).is_none() {
                continue;
            }
            let (g, a, b) = (flat(&whole, t), flat(&halves[0], t), flat(&halves[1], t));
            let scale = g.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
            for ((g, a), b) in g.iter().zip(&a).zip(&b) {
                assert!(
                    (g - (a + b) / 2.0).abs() <= 1e-4 * scale,
                    "{g} vs {a} / {b}"
                );
            }
            compared += 1;
        }
        assert!(compared > 10, "only {compared} gradients compared");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn healing_trains_only_what_it_names_and_distillation_logs_its_kl() {
        let tmp = std::env::temp_dir().join(format!("itera-heal-{}", std::process::id()));
        let (cfg, tok, mut o) = setup(&tmp.join("teacher"));
        o.steps = 10;
        let corpus = Corpus::load(&tok, &o.train_files, &[], o.holdout).unwrap();
        let mut t = Run::create(&tmp.join("teacher"), cfg.clone(), tok.clone(), o.clone()).unwrap();
        t.train(&corpus, &mut |_| {}).unwrap();
        let start = t.weights().unwrap();

        let spec = ModelSpec::new(&cfg);
        let all = spec.all();
        for (only, learns) in [
            (TrainOnly::RouterAndNorms, &[Role::Router, Role::Norm][..]),
            (
                TrainOnly::Moe,
                &[Role::Router, Role::Expert, Role::Norm][..],
            ),
        ] {
            let mut heal = o.clone();
            heal.train_only = only;
            let dir = tmp.join(format!("heal-{only:?}"));
            let mut h = Run::create_from(&dir, cfg.clone(), tok.clone(), heal, &start).unwrap();
            h.train(&corpus, &mut |_| {}).unwrap();
            let end = h.weights().unwrap();
            let moved = |name: &str| start.values(name).unwrap() != end.values(name).unwrap();
            for s in all.iter().filter(|s| !learns.contains(&s.role)) {
                assert!(
                    !moved(&s.name),
                    "{} changed while healing with {only:?}",
                    s.name
                );
            }
            // Every role it may train moved somewhere.
            for role in learns {
                assert!(
                    all.iter().any(|s| s.role == *role && moved(&s.name)),
                    "{only:?} left every {role:?} tensor as it was"
                );
            }
        }

        let mut d = o.clone();
        let teacher = tmp.join("teacher").join(BEST_DIR);
        d.distill = Some(DistillOptions {
            teachers: vec![teacher.clone()],
            loss: crate::reference::distill_loss::DistillLossSpec {
                temperature: 2.0,
                alpha: 0.5,
                kl: crate::reference::distill_loss::Kl::Forward,
            },
        });
        let mut small = cfg.clone();
        small.expert_hidden /= 2;
        let student = tmp.join("student");
        let mut s = Run::create(&student, small.clone(), tok.clone(), d.clone()).unwrap();
        s.train_until(&corpus, 5, &mut |_| {}).unwrap();
        drop(s);
        let mut s = Run::resume(&student, None).unwrap();
        s.train(&corpus, &mut |_| {}).unwrap();
        let text = std::fs::read_to_string(student.join(METRICS_FILE)).unwrap();
        let kls: Vec<f64> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kl"].as_f64())
            .collect();
        assert_eq!(kls.len(), 10, "one KL per step, also after the resume");
        assert!(kls.iter().all(|k| k.is_finite() && *k >= 0.0), "{kls:?}");

        // Refusals: a larger student, another tokenizer, a bad temperature or alpha.
        let mut big = cfg.clone();
        big.expert_hidden *= 2;
        let e = Run::create(&tmp.join("x1"), big, tok.clone(), d.clone())
            .err()
            .unwrap();
        assert!(e.to_string().contains("larger than its teacher"), "{e}");
        let other = Tokenizer::train(&[fixture().display().to_string()], 300).unwrap();
        let mut c = small.clone();
        c.vocab_size = other.vocab_size();
        let e = Run::create(&tmp.join("x2"), c, other, d.clone())
            .err()
            .unwrap();
        assert!(e.to_string().contains("different tokenizer"), "{e}");
        for (t, a, what) in [(0.0, 0.5, "temperature"), (1.0, 1.5, "alpha")] {
            let mut bad = d.clone();
            let l = &mut bad.distill.as_mut().unwrap().loss;
            (l.temperature, l.alpha) = (t, a);
            let e = Run::create(&tmp.join("x3"), small.clone(), tok.clone(), bad)
                .err()
                .unwrap();
            assert!(e.to_string().contains(what), "{e}");
        }
        assert!(!tmp.join("x1").exists() && !tmp.join("x3").exists());
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    fn dir_has_model(p: &Path) -> bool {
        ModelDir::load(p).is_ok()
    }
}
