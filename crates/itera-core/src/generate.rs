//! Text generation over the recurrent step: the prompt is processed once, then O(1) per token.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::model_dir::{load_runtime, ModelDir};
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
    ) -> Result<TokenStream<'_>> {
        if prompt.is_empty() {
            return Err(Error::Argument("prompt is empty".into()));
        }
        if max_tokens > MAX_NEW_TOKENS {
            return Err(Error::Argument(format!(
                "max_tokens {max_tokens} exceeds the limit of {MAX_NEW_TOKENS}"
            )));
        }
        let mut sampler = Sampler::new(params)?;
        let ids = self.tokenizer.encode(prompt)?;
        sampler.observe_prompt(&ids);
        let (mut state, mut scratch) = (self.runtime.new_state(), self.runtime.new_scratch());
        self.runtime.prefill(&ids, &mut state, &mut scratch)?;
        Ok(TokenStream {
            generator: self,
            state,
            scratch,
            sampler,
            decoder: StreamDecoder::new(&self.tokenizer),
            remaining: max_tokens,
            end_id: self.tokenizer.token_id(END_OF_TEXT),
            prompt_tokens: ids.len(),
            generated: 0,
            done: false,
        })
    }
}

/// Iterator over generated text pieces.
pub struct TokenStream<'a> {
    generator: &'a Generator,
    state: State,
    scratch: Scratch,
    sampler: Sampler,
    decoder: StreamDecoder<'a>,
    remaining: usize,
    end_id: Option<u32>,
    pub prompt_tokens: usize,
    pub generated: usize,
    done: bool,
}

impl TokenStream<'_> {
    /// Samples one token and advances the state; None at the end.
    fn next_piece(&mut self) -> Result<Option<String>> {
        loop {
            if self.done {
                return Ok(None);
            }
            if self.remaining == 0 {
                self.done = true;
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

impl Iterator for TokenStream<'_> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_piece().transpose()
    }
}
