//! The model on disk, and the one loader every command goes through. A model is either a
//! directory (config.json + model.safetensors + tokenizer.json, + MODEL_CARD.md) or one
//! self-describing GGUF file. `ModelDir` loads a directory's f32 weights for training, quantizing
//! and pruning; `load_runtime` loads either form straight into the runtime's packed weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::format::gguf::GgufFile;
use crate::format::safetensors::{self as st, SafetensorsSource};
use crate::format::{read_text_file, write_atomic};
use crate::runtime::Runtime;
use crate::tensors::Weights;
use crate::tokenizer::Tokenizer;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A model loaded from a directory, with f32 weights.
pub struct ModelDir {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
}

fn check_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        Ok(())
    } else if dir.exists() {
        Err(Error::file(
            dir,
            "is a file, not a model directory (a .gguf file can be generated from, evaluated, \
             benchmarked and served, but training, quantizing and pruning start from a directory)",
        ))
    } else {
        Err(Error::file(
            dir,
            "no such model (expected a directory with config.json, model.safetensors and \
             tokenizer.json, or a .gguf file)",
        ))
    }
}

/// The config of a model directory or GGUF file, without loading its weights.
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    if path.is_dir() {
        let cfg_path = path.join(CONFIG_FILE);
        let text = read_text_file(&cfg_path)?;
        return ModelConfig::from_json(&text, &cfg_path.display().to_string());
    }
    let file = GgufFile::read(path)?;
    file.config().map_err(|e| Error::file(path, e))
}

/// A directory's tokenizer, checked against the model's vocabulary.
fn read_tokenizer(dir: &Path, config: &ModelConfig) -> Result<Tokenizer> {
    let path = dir.join(TOKENIZER_FILE);
    let tokenizer = Tokenizer::from_file(&path)?;
    check_vocab(&tokenizer, config, &path)?;
    Ok(tokenizer)
}

/// A tokenizer must be non-empty and fit the model's vocabulary.
fn check_vocab(tokenizer: &Tokenizer, config: &ModelConfig, origin: &Path) -> Result<()> {
    if tokenizer.vocab_size() == 0 {
        return Err(Error::file(origin, "the tokenizer has an empty vocabulary"));
    }
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(Error::file(
            origin,
            format!(
                "the tokenizer has {} tokens but the model's vocab_size is {}",
                tokenizer.vocab_size(),
                config.vocab_size
            ),
        ));
    }
    Ok(())
}

impl ModelDir {
    pub fn load(dir: &Path) -> Result<Self> {
        check_dir(dir)?;
        let config = read_config(dir)?;
        let w_path = dir.join(WEIGHTS_FILE);
        let (tensors, _) = st::read(&w_path)?;
        let weights = Weights::from_tensors(&config, tensors, &w_path.display().to_string())?;
        let tokenizer = read_tokenizer(dir, &config)?;
        Ok(Self {
            path: dir.to_path_buf(),
            config,
            weights,
            tokenizer,
        })
    }

    /// Writes config, weights and tokenizer into `dir` (created if needed).
    pub fn save(
        dir: &Path,
        config: &ModelConfig,
        weights: &Weights,
        tokenizer: &Tokenizer,
    ) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        let json = serde_json::to_string_pretty(config).expect("config serialises");
        write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())?;
        st::write(&dir.join(WEIGHTS_FILE), &weights.tensors, HashMap::new())?;
        tokenizer.save(&dir.join(TOKENIZER_FILE))
    }
}

/// The tokenizer of a model directory or `.gguf` file, checked against its vocabulary.
pub fn read_model_tokenizer(path: &Path) -> Result<Tokenizer> {
    let config = read_config(path)?;
    if path.is_dir() {
        return read_tokenizer(path, &config);
    }
    let file = GgufFile::read(path)?;
    gguf_tokenizer(&file, &config, path)
}

fn gguf_tokenizer(file: &GgufFile, config: &ModelConfig, path: &Path) -> Result<Tokenizer> {
    let tok = file
        .get_str("tokenizer.huggingface.json")
        .map_err(|e| Error::file(path, e))?;
    let tokenizer = Tokenizer::from_bytes(tok.as_bytes(), &path.display().to_string())?;
    check_vocab(&tokenizer, config, path)?;
    Ok(tokenizer)
}

/// Loads a model directory or a `.gguf` file for inference: weights go straight into the
/// runtime's packed form (a directory's f16 / bf16 tensors stay half precision).
pub fn load_runtime(path: &Path) -> Result<(Runtime, Tokenizer)> {
    if path.is_dir() {
        let config = read_config(path)?;
        let w_path = path.join(WEIGHTS_FILE);
        let bytes = crate::format::read_file(&w_path)?;
        let source = SafetensorsSource(st::parse(&bytes, &w_path)?);
        let runtime =
            Runtime::from_source(&config, &source).map_err(|e| Error::file(&w_path, e))?;
        drop(bytes);
        let tokenizer = read_tokenizer(path, &config)?;
        return Ok((runtime, tokenizer));
    }
    if !path.exists() {
        check_dir(path)?;
    }
    let file = GgufFile::read(path)?;
    let config = file.config().map_err(|e| Error::file(path, e))?;
    let tokenizer = gguf_tokenizer(&file, &config, path)?;
    let runtime = Runtime::from_source(&config, &file).map_err(|e| Error::file(path, e))?;
    Ok((runtime, tokenizer))
}

/// The shipped default model: $ITERA_MODEL, else ./models/itera-lite-tiny, else the one in this
/// source tree.
pub fn default_model_path() -> PathBuf {
    if let Ok(p) = std::env::var("ITERA_MODEL") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from("models/itera-lite-tiny");
    if local.is_dir() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/itera-lite-tiny")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::fixture_tokenizer;

    #[test]
    fn save_load_roundtrip_and_corruption_is_reported() {
        let dir = std::env::temp_dir().join(format!("itera-ckpt-{}", std::process::id()));
        let mut cfg = ModelConfig::preset("micro").unwrap();
        cfg.vocab_size = 300;
        let w = Weights::init(&cfg, 1).unwrap();
        ModelDir::save(&dir, &cfg, &w, &fixture_tokenizer(300)).unwrap();
        let m = ModelDir::load(&dir).unwrap();
        assert_eq!(m.config, cfg);
        assert_eq!(
            m.weights.values("embed.weight").unwrap(),
            w.values("embed.weight").unwrap()
        );
        // Truncate the weights: a clear error naming the file.
        let wf = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&wf).unwrap();
        std::fs::write(&wf, &bytes[..bytes.len() / 2]).unwrap();
        let err = ModelDir::load(&dir).err().unwrap().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        std::fs::write(dir.join(CONFIG_FILE), "{\"vocab_size\": 1}").unwrap();
        let err = ModelDir::load(&dir).err().unwrap().to_string();
        assert!(err.contains("config.json"), "{err}");
        assert!(ModelDir::load(&dir.join("nope")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
