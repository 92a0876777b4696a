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

/// The fraction of each training file a run holds out when it has no validation files
/// (`TrainOptions::holdout`'s default): the tail it evaluates on.
pub const DEFAULT_HOLDOUT: f64 = 0.02;

/// Where `calibration_tokens` reads each file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalibrationFrom {
    /// The start of each file, one piece.
    Start,
    /// Pieces of `CALIBRATION_PIECE` tokens spread evenly over the part of each file that
    /// training keeps (before its `DEFAULT_HOLDOUT` tail).
    Spread,
}

/// Tokens per piece of `CalibrationFrom::Spread`.
pub const CALIBRATION_PIECE: usize = 512;

/// `tokens` tokens of calibration text (what `itera prune` and `itera quantize --gptq` fit to):
/// an equal share from each file, so every source of a mixed corpus is represented, read as
/// `from` says. Spread pieces see a whole source where the start of a file is one book or one
/// era: measured on the default English model's merged drop 1 (docs/compression.md), 16,384
/// spread tokens did better than 131,072 from the files' starts. Spread never reads a file's
/// held-out tail, so it stays off the text a run with the default holdout reports on.
pub fn calibration_tokens(
    tok: &Tokenizer,
    files: &[PathBuf],
    tokens: usize,
    from: CalibrationFrom,
) -> Result<Vec<u32>> {
    if tokens < 2 {
        return Err(Error::Data(format!(
            "calibration needs at least 2 tokens, got {tokens}"
        )));
    }
    let paths = expand_inputs(files)?;
    let share = tokens.div_ceil(paths.len().max(1));
    let mut ids = Vec::new();
    for path in &paths {
        let text = read_text(path)?;
        let (text, pieces) = match from {
            CalibrationFrom::Start => (&text[..], 1),
            CalibrationFrom::Spread => (
                &text[..heldout_cut(&text, DEFAULT_HOLDOUT)],
                share.div_ceil(CALIBRATION_PIECE),
            ),
        };
        let per = share.div_ceil(pieces);
        // Piece p reads from the first line start at or after p / pieces of the text, and no
        // further than where the next piece starts (the starts never decrease).
        let line_start = |at: usize| match floor_char_boundary(text, at) {
            0 => 0,
            at => text[at..].find('\n').map_or(text.len(), |i| at + i + 1),
        };
        let bounds: Vec<usize> = (0..pieces)
            .map(|p| line_start(text.len() / pieces * p))
            .chain([text.len()])
            .collect();
        let mut got = Vec::with_capacity(share);
        for b in bounds.windows(2) {
            got.extend(tokens_from(tok, &text[b[0]..b[1]], per)?);
        }
        got.truncate(share);
        ids.extend(got);
    }
    ids.truncate(tokens);
    if ids.len() < 2 {
        return Err(Error::Data(
            "the calibration text holds fewer than 2 tokens".into(),
        ));
    }
    Ok(ids)
}

/// The first `want` tokens of `text` (all of them if it holds fewer), encoding only about as
/// much of it as that needs: about 4 bytes per token on English, so twice that is read, cut at
/// a line end, and doubled while it falls short.
fn tokens_from(tok: &Tokenizer, text: &str, want: usize) -> Result<Vec<u32>> {
    let mut bytes = want.saturating_mul(8);
    loop {
        let mut cut = floor_char_boundary(text, bytes.min(text.len()));
        if cut < text.len() {
            cut = text[..cut].rfind('\n').map_or(cut, |i| i + 1);
        }
        let mut ids = tok.encode(&text[..cut])?;
        if ids.len() >= want || cut == text.len() {
            ids.truncate(want);
            return Ok(ids);
        }
        bytes = bytes.saturating_mul(2);
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

    /// Spread calibration takes an equal share of each file in pieces from its start to its
    /// training part's end and never reads the held-out tail; `Start` is the first tokens of
    /// each file; too few tokens is an error, not a panic.
    #[test]
    fn calibration_spreads_over_each_files_training_part_only() {
        let tok = crate::test_support::fixture_tokenizer(300);
        let dir = std::env::temp_dir().join(format!("itera-calib-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (lines, files) = (400, ["a", "b"]);
        let paths: Vec<PathBuf> = files
            .iter()
            .map(|f| {
                let p = dir.join(format!("{f}.txt"));
                let text: String = (0..lines)
                    .map(|i| format!("{f}{i:03} the cat sat\n"))
                    .collect();
                std::fs::write(&p, text).unwrap();
                p
            })
            .collect();
        let ids = calibration_tokens(&tok, &paths, 2 * 1500, CalibrationFrom::Spread).unwrap();
        assert_eq!(ids.len(), 3000);
        let text = tok.decode(&ids).unwrap();
        // The held-out tail: the last 2% of each file's bytes, from a line start (lines 392..).
        let tail = lines - lines * 2 / 100;
        for f in files {
            let seen: Vec<usize> = (0..lines)
                .filter(|i| text.contains(&format!("{f}{i:03} ")))
                .collect();
            assert!(seen.len() > 100, "{f}: {} lines", seen.len());
            // 1,500 tokens a file: three pieces, the last from two thirds of the training part.
            assert!(
                seen[0] == 0 && seen[seen.len() - 1] > tail * 2 / 3,
                "{f}: {seen:?}"
            );
            assert!(
                seen.iter().all(|&i| i < tail),
                "{f} read its held-out tail: {seen:?}"
            );
        }
        // Asked for more than the files hold: every training line once, no held-out line.
        let all = calibration_tokens(&tok, &paths, 2 * 100_000, CalibrationFrom::Spread).unwrap();
        let text = tok.decode(&all).unwrap();
        for f in files {
            for i in 0..lines {
                let n = text.matches(&format!("{f}{i:03} ")).count();
                assert_eq!(n, usize::from(i < tail), "{f}{i:03}");
            }
        }
        let start = calibration_tokens(&tok, &paths, 2 * 1500, CalibrationFrom::Start).unwrap();
        let whole = tok
            .encode(&std::fs::read_to_string(&paths[0]).unwrap())
            .unwrap();
        assert_eq!(start[..1500], whole[..1500]);
        let e = calibration_tokens(&tok, &paths, 1, CalibrationFrom::Spread).unwrap_err();
        assert!(e.to_string().contains("at least 2 tokens"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
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
