//! Saved recurrent state: a stream's conv buffers and SSM states (every layer), the token count,
//! the logits that predict the next token, and optionally the sampler's RNG and history and
//! the tokens held back mid-character, so that a text continues exactly where it stopped
//! (session files, prompt caching, chunked stateful inference). One safetensors file: tensors
//! `layers.L.conv` and `layers.L.ssm` and `logits`, metadata naming the format, its version,
//! and the hash of the model's config, so a state from another model is refused.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::format::safetensors as st;
use crate::runtime::{LayerState, Runtime, State};
use crate::sample::SamplerState;
use crate::tensors::HostTensor;

const FORMAT: &str = "itera-state";
const VERSION: &str = "1";

/// A stream, saved.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedState {
    pub state: State,
    /// The logits after the last token read: what the next token is drawn from.
    pub logits: Vec<f32>,
    pub sampler: Option<SamplerState>,
    /// Generated tokens whose text is not complete yet (part of a UTF-8 character).
    pub pending: Vec<u32>,
}

/// FNV-1a of the config's JSON: which model a state belongs to.
pub fn config_hash(cfg: &ModelConfig) -> String {
    let json = serde_json::to_string(cfg).expect("config serialises");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in json.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Writes `saved` for a model of `runtime`'s config, atomically.
pub fn save(path: &Path, runtime: &Runtime, saved: &SavedState) -> Result<()> {
    runtime.check_state(&saved.state)?;
    let mut tensors = BTreeMap::new();
    for (l, layer) in saved.state.layers.iter().enumerate() {
        tensors.insert(
            format!("layers.{l}.conv"),
            HostTensor::new(vec![layer.conv.len()], layer.conv.clone()),
        );
        tensors.insert(
            format!("layers.{l}.ssm"),
            HostTensor::new(vec![layer.ssm.len()], layer.ssm.clone()),
        );
    }
    tensors.insert(
        "logits".into(),
        HostTensor::new(vec![saved.logits.len()], saved.logits.clone()),
    );
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("version".to_string(), VERSION.to_string());
    meta.insert("config_hash".to_string(), config_hash(&runtime.cfg));
    meta.insert("position".to_string(), saved.state.position.to_string());
    meta.insert(
        "pending".to_string(),
        serde_json::to_string(&saved.pending).expect("ids serialise"),
    );
    if let Some(s) = &saved.sampler {
        meta.insert(
            "sampler".to_string(),
            serde_json::to_string(s).expect("sampler state serialises"),
        );
    }
    st::write(path, &tensors, meta)
}

/// Reads a state saved for the model of `runtime`; another model's state, a truncated file or
/// a file of another format is an error naming the problem.
pub fn load(path: &Path, runtime: &Runtime) -> Result<SavedState> {
    let (mut tensors, meta) = st::read(path)?;
    let bad = |m: String| Error::file(path, m);
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(
            "is not a saved Itera-Lite state (no `itera-state` format tag)".into(),
        ));
    }
    if meta.get("version").map(String::as_str) != Some(VERSION) {
        return Err(bad(format!(
            "state format version {:?}, this build reads {VERSION}",
            meta.get("version")
        )));
    }
    let want = config_hash(&runtime.cfg);
    if meta.get("config_hash") != Some(&want) {
        return Err(bad(format!(
            "was saved for another model (config hash {}, this model's is {want})",
            meta.get("config_hash").map_or("missing", String::as_str)
        )));
    }
    let position = meta
        .get("position")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| bad("has no valid `position`".into()))?;
    let mut take = |name: &str| {
        tensors
            .remove(name)
            .map(|t| t.data)
            .ok_or_else(|| bad(format!("has no tensor `{name}`")))
    };
    let layers = (0..runtime.cfg.n_layers)
        .map(|l| {
            Ok(LayerState {
                conv: take(&format!("layers.{l}.conv"))?,
                ssm: take(&format!("layers.{l}.ssm"))?,
            })
        })
        .collect::<Result<_>>()?;
    let logits = take("logits")?;
    let state = State { layers, position };
    runtime
        .check_state(&state)
        .map_err(|e| bad(e.to_string()))?;
    if logits.len() != runtime.cfg.vocab_size {
        return Err(bad(format!(
            "has {} logits, the model's vocabulary is {}",
            logits.len(),
            runtime.cfg.vocab_size
        )));
    }
    fn parse<T: serde::de::DeserializeOwned>(
        meta: &HashMap<String, String>,
        key: &str,
        path: &Path,
    ) -> Result<Option<T>> {
        meta.get(key)
            .map(|v| {
                serde_json::from_str(v).map_err(|e| Error::file(path, format!("`{key}`: {e}")))
            })
            .transpose()
    }
    let sampler: Option<SamplerState> = parse(&meta, "sampler", path)?;
    let pending: Vec<u32> = parse(&meta, "pending", path)?.unwrap_or_default();
    if let Some(&id) = pending
        .iter()
        .find(|&&id| id as usize >= runtime.cfg.vocab_size)
    {
        return Err(bad(format!("holds token id {id}, beyond the vocabulary")));
    }
    Ok(SavedState {
        state,
        logits,
        sampler,
        pending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Weights;

    #[test]
    fn states_round_trip_and_other_models_states_are_refused() {
        let cfg = ModelConfig::preset("micro").unwrap();
        let rt = Runtime::new(&cfg, &Weights::init(&cfg, 1).unwrap()).unwrap();
        let (mut state, mut sc) = (rt.new_state(), rt.new_scratch());
        rt.prefill(&[1, 2, 3], &mut state, &mut sc).unwrap();
        let saved = SavedState {
            state,
            logits: sc.logits.to_vec(),
            sampler: Some(SamplerState {
                rng: 7,
                generated: vec![(3, 2)],
                prompt: vec![1, 2],
            }),
            pending: vec![5],
        };
        let dir = std::env::temp_dir().join(format!("itera-state-{}", std::process::id()));
        let path = dir.join("s.safetensors");
        save(&path, &rt, &saved).unwrap();
        assert_eq!(load(&path, &rt).unwrap(), saved);
        // Another model (one more layer): refused by its config hash.
        let mut other = cfg.clone();
        other.n_layers = 3;
        other.moe_layers = vec![1];
        let rt2 = Runtime::new(&other, &Weights::init(&other, 1).unwrap()).unwrap();
        let err = load(&path, &rt2).unwrap_err().to_string();
        assert!(err.contains("another model"), "{err}");
        // Truncated: a clear error naming the file.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = load(&path, &rt).unwrap_err().to_string();
        assert!(err.contains("s.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
