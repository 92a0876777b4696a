//! Text generation over the recurrent step: the prompt is processed once, then O(1) per token.

use std::ops::Deref;
use std::path::Path;

use crate::error::{Error, Result};
use crate::format::model_dir::{load_runtime, ModelDir};
use crate::format::state_file::SavedState;
use crate::runtime::{Runtime, Scratch, State};
use crate::sample::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer, END_OF_TEXT};

/// Largest `max_tokens` accepted (absurd requests are refused, not attempted).
pub const MAX_NEW_TOKENS: usize = 1 << 20;

/// A model ready to generate: packed runtime weights plus its tokenizer.
pub struct Generator {
    pub runtime: Runtime,
    pub tokenizer: Tokenizer,
}

impl Generator {
    pub fn new(model: &ModelDir) -> Result<Self> {
        Ok(Self {
            runtime: Runtime::new(&model.config, &model.weights)?,
            tokenizer: model.tokenizer.clone(),
        })
    }

    /// Loads a model for inference: a model directory (config.json, model.safetensors,
    /// tokenizer.json) or a `.gguf` file. Weights go straight into the runtime's packed form.
    pub fn load(path: &Path) -> Result<Self> {
        let (runtime, tokenizer) = load_runtime(path)?;
        Ok(Self { runtime, tokenizer })
    }

    /// Generates up to `max_tokens` tokens after `prompt` and returns the new text.
    pub fn generate(
        &self,
        prompt: &str,
        max_tokens: usize,
        params: SamplingParams,
    ) -> Result<String> {
        self.stream(prompt, max_tokens, params)?.collect()
    }

    /// Streams the new text piece by piece; each item is the text completed by one token.
    pub fn stream(
        &self,
        prompt: &str,
        max_tokens: usize,
        params: SamplingParams,
    ) -> Result<TokenStream<&Self>> {
        TokenStream::start(self, None, prompt, max_tokens, params)
    }

    /// `stream`, continuing a saved stream when `saved` is given (its state, the logits it
    /// stopped at, its sampler's RNG and history, the tokens it held back mid-character); the
    /// prompt, which may then be empty, is read after it.
    pub fn stream_from(
        &self,
        saved: Option<SavedState>,
        prompt: &str,
        max_tokens: usize,
        params: SamplingParams,
    ) -> Result<TokenStream<&Self>> {
        TokenStream::start(self, saved, prompt, max_tokens, params)
    }
}

/// Iterator over generated text pieces. Holds its generator as `G`: a reference (`stream`), or
/// an `Arc` for a stream that must own it (the Python bindings).
pub struct TokenStream<G: Deref<Target = Generator>> {
    generator: G,
    state: State,
    scratch: Scratch,
    sampler: Sampler,
    decoder: StreamDecoder,
    remaining: usize,
    end_id: Option<u32>,
    pub prompt_tokens: usize,
    pub generated: usize,
    done: bool,
    /// At the end, keep tokens that end mid-character for a saved continuation instead of
    /// emitting them as replacement characters.
    hold_pending: bool,
}

impl<G: Deref<Target = Generator>> TokenStream<G> {
    /// Starts a stream (see `Generator::stream_from`).
    pub fn start(
        generator: G,
        saved: Option<SavedState>,
        prompt: &str,
        max_tokens: usize,
        params: SamplingParams,
    ) -> Result<Self> {
        if prompt.is_empty() && saved.is_none() {
            return Err(Error::Argument("prompt is empty".into()));
        }
        if max_tokens > MAX_NEW_TOKENS {
            return Err(Error::Argument(format!(
                "max_tokens {max_tokens} exceeds the limit of {MAX_NEW_TOKENS}"
            )));
        }
        let ids = if prompt.is_empty() {
            Vec::new()
        } else {
            generator.tokenizer.encode(prompt)?
        };
        let rt = &generator.runtime;
        let mut scratch = rt.new_scratch();
        let (mut state, sampler, pending) = match saved {
            Some(s) => {
                rt.check_state(&s.state)?;
                scratch
                    .logits
                    .grow(s.logits.len())
                    .copy_from_slice(&s.logits);
                let sampler = match &s.sampler {
                    Some(snap) => Sampler::restore(params, snap)?,
                    None => Sampler::new(params)?,
                };
                (s.state, sampler, s.pending)
            }
            None => (rt.new_state(), Sampler::new(params)?, Vec::new()),
        };
        let mut sampler = sampler.never_draw(generator.tokenizer.placeholders());
        sampler.observe_prompt(&ids);
        rt.prefill(&ids, &mut state, &mut scratch)?;
        let decoder = StreamDecoder::with_pending(&generator.tokenizer, pending);
        let end_id = generator.tokenizer.token_id(END_OF_TEXT);
        Ok(TokenStream {
            generator,
            state,
            scratch,
            sampler,
            decoder,
            remaining: max_tokens,
            end_id,
            prompt_tokens: ids.len(),
            generated: 0,
            done: false,
            hold_pending: false,
        })
    }

    /// Keep a character split across the end for `saved` (set before reading to the end).
    pub fn hold_pending(&mut self) {
        self.hold_pending = true;
    }

    /// Everything needed to continue this stream later exactly (`Generator::stream_from`).
    pub fn saved(&self) -> SavedState {
        SavedState {
            state: self.state.clone(),
            logits: self.scratch.logits.to_vec(),
            sampler: Some(self.sampler.snapshot()),
            pending: self.decoder.pending().to_vec(),
        }
    }

    /// Samples one token and advances the state; None at the end.
    fn next_piece(&mut self) -> Result<Option<String>> {
        loop {
            if self.done {
                return Ok(None);
            }
            if self.remaining == 0 {
                self.done = true;
                if self.hold_pending {
                    return Ok(None);
                }
                let rest = self.decoder.finish()?;
                return Ok(if rest.is_empty() { None } else { Some(rest) });
            }
            let id = self.sampler.sample(&self.scratch.logits);
            self.remaining -= 1;
            if Some(id) == self.end_id {
                self.remaining = 0;
                continue;
            }
            self.generated += 1;
            self.generator
                .runtime
                .step(id, &mut self.state, &mut self.scratch)?;
            let piece = self.decoder.push(id)?;
            if !piece.is_empty() {
                return Ok(Some(piece));
            }
        }
    }
}

impl<G: Deref<Target = Generator>> Iterator for TokenStream<G> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_piece().transpose()
    }
}
