//! Token streams for training: text files -> token ids (in parallel chunks), held-out split,
//! seeded random batches and fixed validation windows.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use itera_core::rng::Rng;
use itera_core::Tokenizer;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Reads text files, or every `.txt` file under a folder, in sorted order.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = walk(p)?
                .into_iter()
                .filter(|f| f.extension().is_some_and(|e| e == "txt"))
                .collect();
            if found.is_empty() {
                return Err(Error::file(p, "folder holds no .txt files"));
            }
            found.sort();
            files.extend(found);
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            return Err(Error::file(p, "no such file or folder"));
        }
    }
    if files.is_empty() {
        return Err(Error::Data("no input text given".into()));
    }
    Ok(files)
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
        let mut heldout = Vec::new();
        for f in expand_inputs(train)? {
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
            valid: va,
            heldout,
        })
    }
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
pub fn train_offsets(
    len: usize,
    seq_len: usize,
    batch: usize,
    seed: u64,
    step: usize,
) -> Vec<usize> {
    let mut rng = Rng::derive(seed, step as u64);
    (0..batch).map(|_| rng.below(len - seq_len)).collect()
}

/// Up to `max_windows` evenly spaced, non-overlapping validation windows.
pub fn valid_offsets(len: usize, seq_len: usize, max_windows: usize) -> Vec<usize> {
    let available = len.saturating_sub(1) / seq_len;
    let n = available.min(max_windows);
    let stride = available.checked_div(n).unwrap_or(0);
    (0..n).map(|i| i * stride * seq_len).collect()
}
