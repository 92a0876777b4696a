//! The rules that turn what a user asks for (a preset, a config file or a trained model to start
//! from, the shared-state switch, a tokenizer or none, a training window) into a consistent new
//! run: the tokenizer is the teacher's for a distillation run, the starting model's with --init,
//! and trained when none is given; the model's vocabulary shrinks to the tokenizer's (a fresh
//! model only), and an attention model's training window may not exceed its learned positions.
//! The CLI only passes the flags on.

use std::path::{Path, PathBuf};

use itera_core::config::{Dropout, Mixer, ModelConfig};
use itera_core::{ModelDir, Tokenizer};

use crate::data::{expand_inputs, heldout_cut, read_text};
use crate::error::{Error, Result};
use crate::trainer::{Run, TrainOptions};

/// What a new run is made from.
#[derive(Clone, Debug)]
pub struct NewRun {
    /// Preset name, used when `config` is None.
    pub preset: String,
    /// A config.json overriding the preset.
    pub config: Option<PathBuf>,
    /// A trained model directory to start from instead of fresh weights (a fine-tune; with its
    /// own model as the teacher, self-distillation): its config, tokenizer and weights.
    pub init: Option<PathBuf>,
    /// Use the original's shared-state SSM instead of per-channel states.
    pub shared_state: bool,
    /// tokenizer.json; None takes the teacher's (distillation) or trains a BPE of the model's
    /// vocabulary size on the training data.
    pub tokenizer: Option<PathBuf>,
    /// Training window; None uses the config's context.
    pub seq_len: Option<usize>,
    /// Dropout for this run (`embed=0.1,residual=0.2`, see `Dropout`); None keeps the config's.
    pub dropout: Option<String>,
    /// Everything else (its `seq_len` is overwritten by the rule above).
    pub options: TrainOptions,
}

impl NewRun {
    /// The model config this run trains.
    pub fn config(&self) -> Result<ModelConfig> {
        let mut config = match (&self.init, &self.config) {
            (Some(m), None) if !self.shared_state => {
                if !m.is_dir() {
                    return Err(Error::file(
                        m,
                        "--init takes a model directory (f32 weights to train), not a file",
                    ));
                }
                itera_core::format::model_dir::read_config(m)?
            }
            (Some(_), _) => {
                return Err(Error::Train(
                    "--init starts from the model's own config; --config and --shared-state do not apply"
                        .into(),
                ))
            }
            (None, Some(p)) => {
                let text = itera_core::format::read_text_file(p)?;
                ModelConfig::from_json(&text, &p.display().to_string())?
            }
            (None, None) => ModelConfig::preset(&self.preset)?,
        };
        if self.shared_state {
            if !config.mixer.is_recurrent() {
                return Err(Error::Train(format!(
                    "--shared-state applies to SSM models, not `{}`",
                    config.preset
                )));
            }
            config.mixer = Mixer::SharedState;
        }
        if let Some(spec) = &self.dropout {
            config.dropout = parse_dropout(spec)?;
            config.validate()?;
        }
        Ok(config)
    }

    /// A BPE of `vocab_size` tokens on the training text only: without validation files each
    /// file's held-out tail (the text the run reports on) is left out, as `Corpus::load` cuts it.
    fn train_tokenizer(&self, vocab_size: usize) -> Result<Tokenizer> {
        let o = &self.options;
        let texts = expand_inputs(&o.train_files)?
            .iter()
            .map(|p| read_text(p))
            .collect::<Result<Vec<_>>>()?;
        let heads: Vec<&str> = texts
            .iter()
            .map(|t| {
                if o.valid_files.is_empty() {
                    &t[..heldout_cut(t, o.holdout)]
                } else {
                    t.as_str()
                }
            })
            .collect();
        Ok(Tokenizer::train_on_texts(&heads, vocab_size)?)
    }

    /// Creates the run in `dir`; `note` receives what was decided on the user's behalf.
    pub fn create(self, dir: &Path, note: &mut dyn FnMut(String)) -> Result<Run> {
        if self.options.train_files.is_empty() {
            return Err(Error::Train(
                "no training data given (text files or folders)".into(),
            ));
        }
        let mut config = self.config()?;
        // config() checked that it is a directory.
        let init = self.init.as_deref().map(ModelDir::load).transpose()?;
        let tokenizer = match (&self.tokenizer, &self.options.distill, &init) {
            (Some(_), _, Some(_)) => {
                return Err(Error::Train(
                    "--init brings the model's own tokenizer; --tokenizer does not apply".into(),
                ))
            }
            (None, _, Some(m)) => m.tokenizer.clone(),
            (Some(p), _, None) => Tokenizer::from_file(p)?,
            // A student reads with its teacher's tokenizer.
            (None, Some(d), None) => {
                itera_core::format::model_dir::read_model_tokenizer(&d.teachers[0])?
            }
            (None, None, None) => {
                note(format!(
                    "training a {}-token BPE on the training data...",
                    config.vocab_size
                ));
                self.train_tokenizer(config.vocab_size)?
            }
        };
        if tokenizer.vocab_size() == 0 {
            return Err(Error::Train("the tokenizer has an empty vocabulary".into()));
        }
        // A trained model keeps its embedding rows (its own tokenizer fits them).
        if init.is_none() && tokenizer.vocab_size() < config.vocab_size {
            note(format!(
                "note: the tokenizer has {} tokens; the model's vocab shrinks to match",
                tokenizer.vocab_size()
            ));
            config.vocab_size = tokenizer.vocab_size();
        }
        let mut options = self.options;
        options.seq_len = self.seq_len.unwrap_or(config.context);
        if !config.mixer.is_recurrent() && options.seq_len > config.context {
            return Err(Error::Train(format!(
                "--seq-len {} exceeds the attention model's context of {} (its learned positions)",
                options.seq_len, config.context
            )));
        }
        if !config.mixer.is_recurrent() && options.burn_in > 0 {
            return Err(Error::Train(
                "--burn-in warms a recurrent state; an attention model has none".into(),
            ));
        }
        match init {
            Some(m) => Run::create_from(dir, config, tokenizer, options, &m.weights),
            None => Run::create(dir, config, tokenizer, options),
        }
    }
}

/// `embed=0.1,residual=0.2` (unnamed parts stay 0) into dropout probabilities.
pub fn parse_dropout(spec: &str) -> Result<Dropout> {
    let mut d = Dropout::default();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = part.split_once('=').ok_or_else(|| {
            Error::Train(format!(
                "--dropout `{part}`: expected NAME=P, e.g. residual=0.2"
            ))
        })?;
        let p: f64 = value
            .trim()
            .parse()
            .map_err(|_| Error::Train(format!("--dropout `{part}`: `{value}` is not a number")))?;
        let slot = match name.trim() {
            "embed" => &mut d.embed,
            "input" => &mut d.input,
            "residual" => &mut d.residual,
            "output" => &mut d.output,
            "expert" => &mut d.expert,
            "routing" => &mut d.routing,
            "spare" => &mut d.spare,
            other => {
                return Err(Error::Train(format!(
                    "--dropout: unknown part `{other}` (embed, input, residual, output, expert, routing, spare)"
                )))
            }
        };
        *slot = p;
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_specs_parse_and_bad_ones_are_named() {
        let d = parse_dropout("embed=0.1, residual=0.25,routing=0.5,spare=0.3").unwrap();
        assert_eq!((d.embed, d.residual, d.output), (0.1, 0.25, 0.0));
        assert_eq!((d.expert, d.routing, d.spare), (0.0, 0.5, 0.3));
        assert!(parse_dropout("resid=0.1")
            .unwrap_err()
            .to_string()
            .contains("resid"));
        assert!(parse_dropout("embed").is_err());
        assert!(parse_dropout("embed=x").is_err());
    }

    /// Without validation files the run's tokenizer never sees the held-out tails: a word that
    /// only the tail repeats stays in single bytes, while with a validation file (the whole
    /// training file is training text) it is merged.
    #[test]
    fn the_tokenizer_is_trained_on_the_training_split_only() {
        let dir = std::env::temp_dir().join(format!("itera-split-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (train, valid) = (dir.join("train.txt"), dir.join("valid.txt"));
        let text = "ab ba ab ba\n".repeat(200) + &"zyzzyva\n".repeat(100);
        std::fs::write(&train, &text).unwrap();
        std::fs::write(&valid, "ab ba\n").unwrap();
        let mut run = NewRun {
            preset: "micro".into(),
            config: None,
            init: None,
            shared_state: false,
            tokenizer: None,
            seq_len: None,
            dropout: None,
            options: TrainOptions {
                holdout: 0.4, // more than the tail's 800 of 3,200 bytes
                ..TrainOptions::new(vec![train], 1)
            },
        };
        let tokens = |run: &NewRun| {
            let tok = run.train_tokenizer(300).unwrap();
            tok.encode("zyzzyva").unwrap().len()
        };
        assert_eq!(tokens(&run), 7);
        run.options.valid_files = vec![valid];
        assert!(tokens(&run) < 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `--init` starts from the saved model: its weights to the bit, its config (with this run's
    /// dropout), its tokenizer; and refuses a config or tokenizer of its own.
    #[test]
    fn a_run_from_init_starts_with_the_models_weights() {
        let dir = std::env::temp_dir().join(format!("itera-init-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let train = dir.join("train.txt");
        let text = "the cat sat on the mat. ".repeat(200);
        std::fs::write(&train, &text).unwrap();
        let tok = Tokenizer::train_on_texts(&[text.as_str()], 270).unwrap();
        let mut cfg = ModelConfig::preset("micro").unwrap();
        cfg.vocab_size = tok.vocab_size() + 5; // the model keeps rows its tokenizer does not use
        let w = itera_core::tensors::Weights::init(&cfg, 7).unwrap();
        ModelDir::save(&dir.join("m"), &cfg, &w, &tok).unwrap();
        let new = |init: Option<PathBuf>, config: Option<PathBuf>| NewRun {
            preset: "tiny".into(),
            config,
            init,
            shared_state: false,
            tokenizer: None,
            seq_len: None,
            dropout: Some("embed=0.1".into()),
            options: TrainOptions::new(vec![train.clone()], 1),
        };
        let run = new(Some(dir.join("m")), None)
            .create(&dir.join("run"), &mut |_| {})
            .unwrap();
        assert_eq!(run.weights().unwrap(), w);
        assert_eq!(run.config.vocab_size, cfg.vocab_size);
        assert_eq!(run.config.d_model, cfg.d_model);
        assert_eq!(run.config.dropout.embed, 0.1);
        assert_eq!(run.tokenizer.vocab_size(), tok.vocab_size());
        let err = new(Some(dir.join("m")), Some(dir.join("m/config.json")))
            .create(&dir.join("run2"), &mut |_| {})
            .err()
            .unwrap();
        assert!(err.to_string().contains("--init"), "{err}");
        let err = new(Some(dir.join("m/model.safetensors")), None)
            .create(&dir.join("run3"), &mut |_| {})
            .err()
            .unwrap();
        assert!(err.to_string().contains("model directory"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
