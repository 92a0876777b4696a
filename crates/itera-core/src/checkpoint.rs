//! A model directory on disk: config.json + model.safetensors + tokenizer.json (+ MODEL_CARD.md).
//! Every write goes to a temporary name first and is renamed into place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Writes `bytes` to `path` via a temporary sibling and a rename, so readers never see half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_name(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::file(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::file(path, e))
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Saves named tensors as safetensors, atomically.
pub fn save_tensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = tmp_name(path);
    let map: std::collections::HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, &tmp).map_err(|e| Error::file(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::file(path, e))
}

pub fn load_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    if !path.is_file() {
        return Err(Error::file(path, "no such file"));
    }
    let map = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        Error::file(
            path,
            format!("not a readable safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    Ok(map.into_iter().collect())
}

/// A model loaded from a directory.
pub struct ModelDir {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
}

impl ModelDir {
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::file(
                dir,
                "not a model directory (expected config.json, model.safetensors, tokenizer.json)",
            ));
        }
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::file(&cfg_path, e))?;
        let config = ModelConfig::from_json(&text, &cfg_path.display().to_string())?;
        let w_path = dir.join(WEIGHTS_FILE);
        let weights = Weights::from_tensors(
            &config,
            load_tensors(&w_path)?,
            &w_path.display().to_string(),
        )?;
        let tok_path = dir.join(TOKENIZER_FILE);
        let tokenizer = Tokenizer::from_file(&tok_path)?;
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(Error::file(
                &tok_path,
                format!(
                    "has {} tokens but the model's vocab_size is {}",
                    tokenizer.vocab_size(),
                    config.vocab_size
                ),
            ));
        }
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
        save_tensors(&weights.tensors, &dir.join(WEIGHTS_FILE))?;
        tokenizer.save(&dir.join(TOKENIZER_FILE))
    }
}

/// The shipped default model: $ITERA_MODEL, else ./models/itera-lite-tiny, else the one in this source tree.
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
