//! Token streams for training: text files -> token ids (in parallel chunks), held-out split,
//! seeded random batches and fixed validation windows.

use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use itera_core::rng::Rng;
use itera_core::Tokenizer;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Reads text files, or every `.txt` file under a folder, in sorted order.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    Ok(expand_sources(inputs)?.into_iter().flatten().collect())
}

/// `expand_inputs`, keeping each input's files apart (a folder is one source).
pub fn expand_sources(inputs: &[PathBuf]) -> Result<Vec<Vec<PathBuf>>> {
    if inputs.is_empty() {
        return Err(Error::Data("no input text given".into()));
    }
    inputs
        .iter()
        .map(|p| {
            if p.is_dir() {
                let mut found: Vec<PathBuf> = walk(p)?
                    .into_iter()
                    .filter(|f| f.extension().is_some_and(|e| e == "txt"))
                    .collect();
                if found.is_empty() {
                    return Err(Error::file(p, "folder holds no .txt files"));
                }
                found.sort();
                Ok(found)
            } else if p.is_file() {
                Ok(vec![p.clone()])
            } else {
                Err(Error::file(p, "no such file or folder"))
            }
        })
        .collect()
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::file(dir, e))? {
        let p = e.map_err(|e| Error::file(dir, e))?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| Error::file(path, format!("not valid UTF-8 ({e})")))?;
    if text.trim().is_empty() {
        return Err(Error::file(path, "is empty"));
    }
    Ok(text)
}

/// Tokenises a large text in line-aligned chunks on all cores (byte-level BPE never merges across
/// a newline boundary's pre-token split, so chunking at newlines does not change the ids).
pub fn encode_large(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + (1 << 16)).min(text.len());
        while end < text.len() && !text.is_char_boundary(end) {
            end += 1;
        }
        if let Some(nl) = text[end..].find('\n') {
            end += nl + 1;
        } else {
            end = text.len();
        }
        chunks.push(&text[start..end]);
        start = end;
    }
    let parts: Vec<Vec<u32>> = chunks
        .par_iter()
        .map(|c| tok.encode(c))
        .collect::<itera_core::Result<_>>()?;
    Ok(parts.concat())
}

/// Training and validation token streams, plus bytes per token of the validation text.
pub struct Corpus {
    pub train: Vec<u32>,
    /// Each training input (a file, or a folder of files) as it was named, and its tokens' range
    /// in `train`.
    pub sources: Vec<(String, Range<usize>)>,
    pub valid: Vec<u32>,
    pub valid_bytes_per_token: f64,
    /// The held-out text of each training file (file name, text) when no valid files are given.
    pub heldout: Vec<(String, String)>,
}

impl Corpus {
    /// Without `valid` files, the last `holdout` fraction of each training file is held out.
    pub fn load(
        tok: &Tokenizer,
        train: &[PathBuf],
        valid: &[PathBuf],
        holdout: f64,
    ) -> Result<Self> {
        let (mut tr, mut va, mut va_bytes) = (Vec::new(), Vec::new(), 0usize);
        let (mut heldout, mut sources) = (Vec::new(), Vec::new());
        for (input, files) in train.iter().zip(expand_sources(train)?) {
            let start = tr.len();
            for f in files {
                let text = read_text(&f)?;
                if valid.is_empty() {
                    let cut = heldout_cut(&text, holdout);
                    tr.extend(encode_large(tok, &text[..cut])?);
                    va.extend(encode_large(tok, &text[cut..])?);
                    va_bytes += text.len() - cut;
                    let name = f
                        .file_name()
                        .map_or_else(|| "text".into(), |n| n.to_string_lossy().to_string());
                    heldout.push((name, text[cut..].to_string()));
                } else {
                    tr.extend(encode_large(tok, &text)?);
                }
            }
            sources.push((input.display().to_string(), start..tr.len()));
        }
        if !valid.is_empty() {
            for f in expand_inputs(valid)? {
                let text = read_text(&f)?;
                va.extend(encode_large(tok, &text)?);
                va_bytes += text.len();
            }
        }
        Ok(Self {
            valid_bytes_per_token: va_bytes as f64 / va.len().max(1) as f64,
            train: tr,
            sources,
            valid: va,
            heldout,
        })
    }

    /// Checks per-source sampling weights (one per training input, see `train_offsets`) and
    /// returns each source's expected share of the training windows.
    pub fn window_shares(&self, weights: &[f64], seq_len: usize) -> Result<Vec<f64>> {
        if weights.is_empty() {
            let len = self.train.len() as f64;
            return Ok(self
                .sources
                .iter()
                .map(|(_, r)| r.len() as f64 / len)
                .collect());
        }
        if weights.len() != self.sources.len() {
            return Err(Error::Data(format!(
                "{} source weights for {} training inputs (one weight per --data argument)",
                weights.len(),
                self.sources.len()
            )));
        }
        for ((name, r), &w) in self.sources.iter().zip(weights) {
            if w > 0.0 && r.len() <= seq_len {
                return Err(Error::Data(format!(
                    "{name} has {} training tokens, fewer than one window of {}, but weight {w}",
                    r.len(),
                    seq_len + 1
                )));
            }
        }
        let mass = self.source_mass(weights, seq_len);
        let total: f64 = mass.iter().sum();
        Ok(mass.iter().map(|m| m / total).collect())
    }

    /// weight x the number of windows that fit in each source.
    fn source_mass(&self, weights: &[f64], seq_len: usize) -> Vec<f64> {
        self.sources
            .iter()
            .zip(weights)
            .map(|((_, r), &w)| w * r.len().saturating_sub(seq_len) as f64)
            .collect()
    }
}

/// Source weights that change nothing: none given, or all equal (sampling in proportion to size).
fn uniform(weights: &[f64]) -> bool {
    weights.windows(2).all(|w| w[0] == w[1])
}

/// Where a training file's held-out tail starts: after the last newline before the last
/// `holdout` fraction of its bytes (the tokenizer of the run is trained on the part before it).
pub fn heldout_cut(text: &str, holdout: f64) -> usize {
    let cut = floor_char_boundary(text, ((1.0 - holdout) * text.len() as f64) as usize);
    text[..cut].rfind('\n').map_or(cut, |i| i + 1)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// (inputs, targets) u32 [B, T] from windows starting at `offsets`.
pub fn batch_at(tokens: &[u32], offsets: &[usize], seq_len: usize) -> Result<(Tensor, Tensor)> {
    let mut x = Vec::with_capacity(offsets.len() * seq_len);
    let mut y = Vec::with_capacity(offsets.len() * seq_len);
    for &o in offsets {
        x.extend_from_slice(&tokens[o..o + seq_len]);
        y.extend_from_slice(&tokens[o + 1..o + seq_len + 1]);
    }
    let shape = (offsets.len(), seq_len);
    Ok((
        Tensor::from_vec(x, shape, &Device::Cpu)?,
        Tensor::from_vec(y, shape, &Device::Cpu)?,
    ))
}

/// The random training windows of one step: a function of (seed, step) alone, so resuming is exact.
/// Without source weights (or with equal ones) a window starts anywhere in the training tokens, so
/// each source is seen in proportion to its size; with them, a window starts in source i with
/// probability proportional to weight_i x the windows that fit in it, and stays inside it.
/// `weights` must have passed `Corpus::window_shares`.
pub fn train_offsets(
    corpus: &Corpus,
    weights: &[f64],
    seq_len: usize,
    batch: usize,
    seed: u64,
    step: usize,
) -> Vec<usize> {
    let mut rng = Rng::derive(seed, step as u64);
    if uniform(weights) {
        let len = corpus.train.len();
        return (0..batch).map(|_| rng.below(len - seq_len)).collect();
    }
    // Source i owns [cum[i - 1], cum[i]) of the total mass; sources of weight 0 own nothing.
    let mass = corpus.source_mass(weights, seq_len);
    let cum: Vec<f64> = mass
        .iter()
        .scan(0.0, |acc, m| {
            *acc += m;
            Some(*acc)
        })
        .collect();
    let last = mass
        .iter()
        .rposition(|&m| m > 0.0)
        .expect("a weighted source");
    (0..batch)
        .map(|_| {
            let u = rng.uniform() * cum[cum.len() - 1];
            let r = &corpus.sources[cum.partition_point(|&c| c <= u).min(last)].1;
            r.start + rng.below(r.len() - seq_len)
        })
        .collect()
}

/// Up to `max_windows` evenly spaced, non-overlapping validation windows.
pub fn valid_offsets(len: usize, seq_len: usize, max_windows: usize) -> Vec<usize> {
    let available = len.saturating_sub(1) / seq_len;
    let n = available.min(max_windows);
    let stride = available.checked_div(n).unwrap_or(0);
    (0..n).map(|i| i * stride * seq_len).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sources of 1,000 and 3,000 tokens.
    fn two_sources() -> Corpus {
        Corpus {
            train: (0..4000).collect(),
            sources: vec![("a".into(), 0..1000), ("b".into(), 1000..4000)],
            valid: Vec::new(),
            valid_bytes_per_token: 1.0,
            heldout: Vec::new(),
        }
    }

    fn share_of_a(c: &Corpus, weights: &[f64], seq: usize) -> f64 {
        let offs: Vec<usize> = (0..200)
            .flat_map(|step| train_offsets(c, weights, seq, 50, 7, step))
            .collect();
        offs.iter().filter(|&&o| o < 1000).count() as f64 / offs.len() as f64
    }

    #[test]
    fn source_weights_set_each_sources_share_of_windows() {
        let (c, seq) = (two_sources(), 100);
        // Equal weights change nothing: the same offsets as none.
        assert_eq!(
            train_offsets(&c, &[], seq, 16, 3, 5),
            train_offsets(&c, &[2.0, 2.0], seq, 16, 3, 5)
        );
        // Weighted: a's mass is 3 x 900 against b's 1 x 2,900.
        let w = [3.0, 1.0];
        let want = c.window_shares(&w, seq).unwrap()[0];
        assert!((want - 2700.0 / 5600.0).abs() < 1e-12);
        assert!((share_of_a(&c, &w, seq) - want).abs() < 0.02);
        assert_eq!(share_of_a(&c, &[0.0, 1.0], seq), 0.0);
        assert_eq!(share_of_a(&c, &[1.0, 0.0], seq), 1.0);
        // A weighted window never crosses into the next source.
        for step in 0..100 {
            for o in train_offsets(&c, &w, seq, 50, 1, step) {
                assert!(o + seq < 1000 || (o >= 1000 && o + seq < 4000), "{o}");
            }
        }
    }

    #[test]
    fn bad_source_weights_are_refused_by_name() {
        let c = two_sources();
        let e = c.window_shares(&[1.0], 100).unwrap_err().to_string();
        assert!(e.contains("1 source weights for 2"), "{e}");
        let e = c.window_shares(&[1.0, 1.0], 1000).unwrap_err().to_string();
        assert!(e.contains("a has 1000 training tokens"), "{e}");
        // A source too short for a window is fine when it is not sampled.
        assert_eq!(c.window_shares(&[0.0, 1.0], 1000).unwrap(), vec![0.0, 1.0]);
    }
}
