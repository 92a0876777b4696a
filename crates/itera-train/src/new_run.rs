//! The rules that turn what a user asks for (a preset or config file, the shared-state switch, a
//! tokenizer or none, a training window) into a consistent new run: the tokenizer is trained when
//! none is given, the model's vocabulary shrinks to the tokenizer's, and an attention model's
//! training window may not exceed its learned positions. The CLI only passes the flags on.

use std::path::{Path, PathBuf};

use itera_core::config::{Mixer, ModelConfig};
use itera_core::Tokenizer;

use crate::data::expand_inputs;
use crate::error::{Error, Result};
use crate::trainer::{Run, TrainOptions};

/// What a new run is made from.
#[derive(Clone, Debug)]
pub struct NewRun {
    /// Preset name, used when `config` is None.
    pub preset: String,
    /// A config.json overriding the preset.
    pub config: Option<PathBuf>,
    /// Use the original's shared-state SSM instead of per-channel states.
    pub shared_state: bool,
    /// tokenizer.json; None trains a BPE of the model's vocabulary size on the training data.
    pub tokenizer: Option<PathBuf>,
    /// Training window; None uses the config's context.
    pub seq_len: Option<usize>,
    /// Everything else (its `seq_len` is overwritten by the rule above).
    pub options: TrainOptions,
}

impl NewRun {
    /// The model config this run trains.
    pub fn config(&self) -> Result<ModelConfig> {
        let mut config = match &self.config {
            Some(p) => {
                let text = itera_core::format::read_text_file(p)?;
                ModelConfig::from_json(&text, &p.display().to_string())?
            }
            None => ModelConfig::preset(&self.preset)?,
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
        Ok(config)
    }

    /// Creates the run in `dir`; `note` receives what was decided on the user's behalf.
    pub fn create(self, dir: &Path, note: &mut dyn FnMut(String)) -> Result<Run> {
        if self.options.train_files.is_empty() {
            return Err(Error::Train(
                "no training data given (text files or folders)".into(),
            ));
        }
        let mut config = self.config()?;
        let tokenizer = match &self.tokenizer {
            Some(p) => Tokenizer::from_file(p)?,
            None => {
                note(format!(
                    "training a {}-token BPE on the training data...",
                    config.vocab_size
                ));
                let files: Vec<String> = expand_inputs(&self.options.train_files)?
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                Tokenizer::train(&files, config.vocab_size)?
            }
        };
        if tokenizer.vocab_size() == 0 {
            return Err(Error::Train("the tokenizer has an empty vocabulary".into()));
        }
        if tokenizer.vocab_size() < config.vocab_size {
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
        Run::create(dir, config, tokenizer, options)
    }
}
