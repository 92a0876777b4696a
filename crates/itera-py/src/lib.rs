//! The native half of the `itera` Python package (`python/itera/__init__.py` is the other): a
//! loaded model (`NativeModel`) with generation, streaming, evaluation, logits, the tokenizer
//! and saved states, all over itera-core. Long work runs with the GIL released. Every
//! itera-core error becomes an `itera.IteraError` with the message the CLI would print.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use itera_core::format::state_file::{self, SavedState};
use itera_core::generate::TokenStream;
use itera_core::{Generator, SamplingParams};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

create_exception!(
    _native,
    IteraError,
    PyException,
    "An Itera-Lite error (bad model file, bad argument, ...)."
);

fn err(e: itera_core::Error) -> PyErr {
    IteraError::new_err(e.to_string())
}

/// Sampling settings as the Python API names them.
#[allow(clippy::too_many_arguments)]
fn params(
    temperature: f32,
    top_k: usize,
    top_p: f32,
    seed: u64,
    repetition_penalty: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    min_p: f32,
    allow_placeholders: bool,
) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        seed,
        repetition_penalty,
        presence_penalty,
        frequency_penalty,
        min_p,
        logit_bias: Vec::new(),
        allow_placeholders,
    }
}

/// A loaded model: a model directory or a .gguf file.
#[pyclass(frozen)]
struct NativeModel {
    generator: Arc<Generator>,
    /// The state the last `generate` / `stream` ended in, for `save_state`.
    last: Mutex<Option<SavedState>>,
    /// A state loaded by `load_state`, continued by the next `generate` / `stream`.
    next: Mutex<Option<SavedState>>,
}

/// Generated text, cut at the first stop string (which is not included).
fn cut_at_stop(text: &mut String, stop: &[String]) -> bool {
    match stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        Some(at) => {
            text.truncate(at);
            true
        }
        None => false,
    }
}

#[pymethods]
impl NativeModel {
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let generator = py
            .detach(|| Generator::load(&path))
            .map_err(|e| IteraError::new_err(format!("loading model {}: {e}", path.display())))?;
        Ok(Self {
            generator: Arc::new(generator),
            last: Mutex::new(None),
            next: Mutex::new(None),
        })
    }

    /// The model's config as JSON.
    fn config_json(&self) -> String {
        serde_json::to_string(&self.generator.runtime.cfg).expect("config serialises")
    }

    fn parameter_count(&self) -> usize {
        self.generator.runtime.cfg.parameter_count()
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (prompt, max_tokens, temperature, top_k, top_p, seed, stop, repetition_penalty, presence_penalty, frequency_penalty, min_p, allow_placeholders))]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: String,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        seed: u64,
        stop: Vec<String>,
        repetition_penalty: f32,
        presence_penalty: f32,
        frequency_penalty: f32,
        min_p: f32,
        allow_placeholders: bool,
    ) -> PyResult<String> {
        let p = params(
            temperature,
            top_k,
            top_p,
            seed,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            min_p,
            allow_placeholders,
        );
        let saved = self.next.lock().expect("not poisoned").take();
        let g = &self.generator;
        let (text, last) = py
            .detach(|| -> itera_core::Result<(String, SavedState)> {
                let mut stream = g.stream_from(saved, &prompt, max_tokens, p)?;
                let mut text = String::new();
                for piece in stream.by_ref() {
                    text.push_str(&piece?);
                    if !stop.is_empty() && cut_at_stop(&mut text, &stop) {
                        break;
                    }
                }
                Ok((text, stream.saved()))
            })
            .map_err(err)?;
        *self.last.lock().expect("not poisoned") = Some(last);
        Ok(text)
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (prompt, max_tokens, temperature, top_k, top_p, seed, repetition_penalty, presence_penalty, frequency_penalty, min_p, allow_placeholders))]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: String,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        seed: u64,
        repetition_penalty: f32,
        presence_penalty: f32,
        frequency_penalty: f32,
        min_p: f32,
        allow_placeholders: bool,
    ) -> PyResult<NativeStream> {
        let p = params(
            temperature,
            top_k,
            top_p,
            seed,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            min_p,
            allow_placeholders,
        );
        let saved = self.next.lock().expect("not poisoned").take();
        let g = self.generator.clone();
        let stream = py
            .detach(move || TokenStream::start(g, saved, &prompt, max_tokens, p))
            .map_err(err)?;
        Ok(NativeStream {
            stream: Mutex::new(Some(stream)),
        })
    }

    /// Bits per byte, perplexities and counts of `text`, as `itera eval` reports them.
    fn eval<'py>(&self, py: Python<'py>, text: String) -> PyResult<Bound<'py, PyDict>> {
        let g = &self.generator;
        let r = py
            .detach(|| itera_core::eval::evaluate(&g.runtime, &g.tokenizer, &text, |_, _| {}))
            .map_err(err)?;
        let d = PyDict::new(py);
        d.set_item("tokens", r.tokens)?;
        d.set_item("bytes", r.bytes)?;
        d.set_item("words", r.words)?;
        d.set_item("lines", r.lines)?;
        d.set_item("mean_nll", r.mean_nll)?;
        d.set_item("perplexity", r.token_perplexity)?;
        d.set_item("bits_per_byte", r.bits_per_byte)?;
        d.set_item("word_perplexity", r.word_perplexity)?;
        Ok(d)
    }

    /// The logits after every token of `ids` (read from a fresh state): little-endian f32
    /// bytes of a [len, vocab] array, and its shape.
    fn logits<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<u32>,
    ) -> PyResult<(Bound<'py, PyBytes>, usize, usize)> {
        let rt = &self.generator.runtime;
        let vocab = rt.cfg.vocab_size;
        let values = py
            .detach(|| -> itera_core::Result<Vec<f32>> {
                let (mut st, mut sc) = (rt.new_state(), rt.new_scratch());
                let mut out = Vec::with_capacity(ids.len() * vocab);
                for chunk in ids.chunks(256) {
                    rt.prefill_all(chunk, &mut st, &mut sc)?;
                    out.extend_from_slice(&sc.logits);
                }
                Ok(out)
            })
            .map_err(err)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok((PyBytes::new(py, &bytes), ids.len(), vocab))
    }

    fn encode(&self, text: &str) -> PyResult<Vec<u32>> {
        self.generator.tokenizer.encode(text).map_err(err)
    }

    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        let vocab = self.generator.runtime.cfg.vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(IteraError::new_err(format!(
                "token id {bad} out of range for vocab {vocab}"
            )));
        }
        self.generator.tokenizer.decode(&ids).map_err(err)
    }

    fn vocab_size(&self) -> usize {
        self.generator.tokenizer.vocab_size()
    }

    /// Saves the state the last generation ended in (or the one a stream reached: pass it).
    fn save_state(&self, path: PathBuf, stream: Option<&NativeStream>) -> PyResult<()> {
        let saved = match stream {
            Some(s) => s.saved()?,
            None => self
                .last
                .lock()
                .expect("not poisoned")
                .clone()
                .ok_or_else(|| IteraError::new_err("nothing to save: generate or stream first"))?,
        };
        state_file::save(&path, &self.generator.runtime, &saved).map_err(err)
    }

    /// Loads a saved state; the next `generate` or `stream` continues from it.
    fn load_state(&self, path: PathBuf) -> PyResult<()> {
        let saved = state_file::load(&path, &self.generator.runtime).map_err(err)?;
        *self.next.lock().expect("not poisoned") = Some(saved);
        Ok(())
    }
}

/// An iterator of generated text pieces (each the text one token completed).
#[pyclass]
struct NativeStream {
    stream: Mutex<Option<TokenStream<Arc<Generator>>>>,
}

impl NativeStream {
    fn saved(&self) -> PyResult<SavedState> {
        let guard = self.stream.lock().expect("not poisoned");
        let s = guard
            .as_ref()
            .ok_or_else(|| IteraError::new_err("the stream is gone"))?;
        Ok(s.saved())
    }
}

#[pymethods]
impl NativeStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let mut guard = self.stream.lock().expect("not poisoned");
        let Some(stream) = guard.as_mut() else {
            return Ok(None);
        };
        match py.detach(|| stream.next()) {
            Some(Ok(piece)) => Ok(Some(piece)),
            Some(Err(e)) => Err(err(e)),
            None => Ok(None),
        }
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeModel>()?;
    m.add_class::<NativeStream>()?;
    m.add("IteraError", m.py().get_type::<IteraError>())?;
    Ok(())
}
