//! Text generation over the recurrent step: the prompt is processed once, then O(1) per token.

use std::path::Path;

use crate::checkpoint::{ModelDir, CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::kernels::Matrix;
use crate::quant::DType;
use crate::runtime::{expected_shape, Runtime, Scratch, State, TensorSource};
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
        if path.is_file() {
            let file = GgufFile::read(path)?;
            let config = file.config().map_err(|e| Error::file(path, e))?;
            let tok = file
                .get_str("tokenizer.huggingface.json")
                .map_err(|e| Error::file(path, e))?;
            let tokenizer = Tokenizer::from_bytes(tok.as_bytes(), &path.display().to_string())?;
            let runtime = Runtime::from_source(&config, &file).map_err(|e| Error::file(path, e))?;
            return Self::checked(runtime, tokenizer, path);
        }
        if !path.is_dir() {
            return Err(Error::file(
                path,
                "no such model (expected a model directory or a .gguf file)",
            ));
        }
        let cfg_path = path.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::file(&cfg_path, e))?;
        let config = ModelConfig::from_json(&text, &cfg_path.display().to_string())?;
        let w_path = path.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&w_path).map_err(|e| Error::file(&w_path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            Error::file(
                &w_path,
                format!("not a readable safetensors file (truncated or corrupt?): {e}"),
            )
        })?;
        let runtime = Runtime::from_source(&config, &SafetensorsSource(st))
            .map_err(|e| Error::file(&w_path, e))?;
        drop(bytes);
        let tokenizer = Tokenizer::from_file(&path.join(TOKENIZER_FILE))?;
        Self::checked(runtime, tokenizer, path)
    }

    fn checked(runtime: Runtime, tokenizer: Tokenizer, path: &Path) -> Result<Self> {
        if tokenizer.vocab_size() > runtime.cfg.vocab_size {
            return Err(Error::file(
                path,
                format!(
                    "the tokenizer has {} tokens but the model's vocab_size is {}",
                    tokenizer.vocab_size(),
                    runtime.cfg.vocab_size
                ),
            ));
        }
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
        let sampler = Sampler::new(params)?;
        let ids = self.tokenizer.encode(prompt)?;
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

/// Tensors straight from safetensors bytes (f32, f16 or bf16), without building candle tensors.
struct SafetensorsSource<'a>(safetensors::SafeTensors<'a>);

impl TensorSource for SafetensorsSource<'_> {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let err = |message: String| Error::Tensor {
            name: name.into(),
            message,
        };
        let t = self.0.tensor(name).map_err(|_| err("missing".into()))?;
        let n: usize = t.shape().iter().product();
        if n != rows * cols || (rows > 1 && t.shape().last() != Some(&cols)) {
            return Err(err(format!(
                "shape {:?}, expected {}",
                t.shape(),
                expected_shape(rows, cols)
            )));
        }
        let dtype = match t.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => return Err(err(format!("unsupported dtype {other:?}"))),
        };
        Matrix::from_ggml(dtype, rows, cols, t.data()).map_err(|e| err(e.to_string()))
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
