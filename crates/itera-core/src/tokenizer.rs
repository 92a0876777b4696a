//! Byte-level BPE (the `tokenizers` crate, standard tokenizer.json): loading, training, and a
//! streaming decoder that never emits half a UTF-8 character.

use std::path::Path;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use crate::error::{Error, Result};

/// Marks the end of a document; never produced from ordinary text.
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// PTB's unknown-word marker, kept as one token.
pub const UNK: &str = "<unk>";

#[derive(Clone)]
pub struct Tokenizer {
    /// Shared: cloning a tokenizer (one per decoder, stream, thread) is cheap.
    inner: std::sync::Arc<tokenizers::Tokenizer>,
    /// Characters of the longest token (each byte-level character is one byte of text).
    longest: usize,
}

impl Tokenizer {
    fn wrap(inner: tokenizers::Tokenizer) -> Self {
        let longest = inner
            .get_vocab(true)
            .keys()
            .map(|k| k.chars().count())
            .max()
            .unwrap_or(1)
            .max(1);
        Self {
            inner: std::sync::Arc::new(inner),
            longest,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::format::read_file(path)?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let bad = |e: &dyn std::fmt::Display| {
            Error::Tokenizer(format!("{origin}: not a valid tokenizer.json: {e}"))
        };
        // The JSON must parse on its own first: `tokenizers` panics (instead of returning an
        // error) on some malformed JSON inside its `decoder` entry (found by tests/fuzz_files.rs).
        serde_json::from_slice::<serde_json::Value>(bytes).map_err(|e| bad(&e))?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| bad(&e))?;
        Ok(Self::wrap(inner))
    }

    /// Trains a byte-level BPE of `vocab_size` tokens (specials included) on text files.
    pub fn train(files: &[String], vocab_size: usize) -> Result<Self> {
        let (mut inner, mut trainer) = untrained_bpe(vocab_size)?;
        inner
            .train_from_files(&mut trainer, files.to_vec())
            .map_err(|e| Error::Tokenizer(format!("training on {files:?} failed: {e}")))?;
        Ok(Self::wrap(inner))
    }

    /// As `train`, on texts in memory, line by line as `train` reads files (a run trains its
    /// tokenizer on the training split only, the held-out tail of each file left out).
    pub fn train_on_texts(texts: &[&str], vocab_size: usize) -> Result<Self> {
        let (mut inner, mut trainer) = untrained_bpe(vocab_size)?;
        inner
            .train(
                &mut trainer,
                texts.iter().flat_map(|t| t.split_inclusive('\n')),
            )
            .map_err(|e| {
                Error::Tokenizer(format!("training on {} texts failed: {e}", texts.len()))
            })?;
        Ok(Self::wrap(inner))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        crate::format::write_atomic(path, json.as_bytes())
    }

    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokens that stand for removed text rather than text (PTB's `<unk>`): generation never
    /// draws them unless asked (`SamplingParams::allow_placeholders`).
    pub fn placeholders(&self) -> impl Iterator<Item = u32> {
        self.token_id(UNK).into_iter()
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("encode failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The tokens of `text` if there are at most `limit`; otherwise `Err(n)` with a lower bound
    /// `n > limit` on their number. Tokenizes segment by segment and stops as soon as the limit
    /// is passed, so a huge text costs the memory of one segment, not of its whole encoding.
    pub fn encode_limited(
        &self,
        text: &str,
        limit: usize,
    ) -> Result<std::result::Result<Vec<u32>, usize>> {
        // No token is longer than `longest` bytes, so a text this long has too many tokens.
        let at_least = text.len() / self.longest;
        if at_least > limit {
            return Ok(Err(at_least));
        }
        let mut ids = Vec::new();
        for piece in segments(text) {
            ids.extend(self.encode(piece)?);
            if ids.len() > limit {
                return Ok(Err(ids.len()));
            }
        }
        Ok(Ok(ids))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(format!("decode failed: {e}")))
    }
}

/// Bytes of text tokenized at a time by `segments` users: segments end after a newline, where the
/// byte-level BPE's pre-tokenizer always splits, so their tokens are those of the whole text,
/// and a text of any size is tokenized with the memory of one segment.
const SEGMENT_BYTES: usize = 1 << 16;

/// The text cut into pieces of about `SEGMENT_BYTES`, after a newline (or in a long line, before
/// a space between two words).
pub fn segments(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = SEGMENT_BYTES.min(rest.len());
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        let end = if end == rest.len() {
            end
        } else if let Some(nl) = rest.as_bytes()[end..(end + SEGMENT_BYTES).min(rest.len())]
            .iter()
            .position(|&c| c == b'\n')
        {
            end + nl + 1
        } else {
            // A long line: cut before a single space between two words, where the pre-tokenizer
            // splits too (the space starts the next word's pre-token).
            let b = rest.as_bytes();
            (end.max(1)..rest.len() - 1)
                .find(|&i| {
                    b[i] == b' '
                        && !b[i - 1].is_ascii_whitespace()
                        && !b[i + 1].is_ascii_whitespace()
                })
                .unwrap_or(rest.len())
        };
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

/// Turns a token stream into text pieces, holding back tokens that end inside a UTF-8 character.
pub struct StreamDecoder {
    tokenizer: Tokenizer,
    pending: Vec<u32>,
}

impl StreamDecoder {
    pub fn new(tokenizer: &Tokenizer) -> Self {
        Self {
            tokenizer: tokenizer.clone(),
            pending: Vec::new(),
        }
    }

    /// The text completed by this token, possibly empty.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.pending.push(id);
        let text = self.tokenizer.decode(&self.pending)?;
        if text.ends_with('\u{FFFD}') && self.pending.len() < 4 {
            return Ok(String::new());
        }
        self.pending.clear();
        Ok(text)
    }

    /// A decoder holding back `pending` tokens (from a saved stream).
    pub fn with_pending(tokenizer: &Tokenizer, pending: Vec<u32>) -> Self {
        Self {
            tokenizer: tokenizer.clone(),
            pending,
        }
    }

    /// Tokens held back because they end inside a UTF-8 character.
    pub fn pending(&self) -> &[u32] {
        &self.pending
    }

    /// The tokenizer this decoder uses.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Whatever is still held back (only non-empty if generation stopped mid-character).
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode(&self.pending)?;
        self.pending.clear();
        Ok(text)
    }
}

/// An empty byte-level BPE tokenizer and the trainer that fills it with `vocab_size` tokens.
fn untrained_bpe(vocab_size: usize) -> Result<(tokenizers::Tokenizer, TrainerWrapper)> {
    if vocab_size < 256 + 2 {
        return Err(Error::Argument(format!(
            "vocab size {vocab_size} is below the 256 bytes + 2 special tokens"
        )));
    }
    let mut inner = tokenizers::Tokenizer::new(ModelWrapper::BPE(BPE::default()));
    inner.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, true, true,
    ))));
    inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
        false, true, true,
    ))));
    let trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(vec![
                AddedToken::from(END_OF_TEXT, true),
                AddedToken::from(UNK, false),
            ])
            .build(),
    );
    Ok((inner, trainer))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small tokenizer trained on a fixed English snippet (shared by tests).
    pub fn fixture_tokenizer(vocab: usize) -> Tokenizer {
        let dir = std::env::temp_dir().join(format!("itera-tok-{}-{vocab}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("text.txt");
        let text =
            "the cat sat on the mat. <unk> said the dog, héllo wörld — naïve café.\n".repeat(50);
        std::fs::write(&f, text).unwrap();
        Tokenizer::train(&[f.display().to_string()], vocab).unwrap()
    }

    #[test]
    fn roundtrip_unk_and_streaming_utf8() {
        let tok = fixture_tokenizer(300);
        assert!(tok.vocab_size() <= 300);
        let text = "the cat <unk> sat. naïve café — ok\n";
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        let unk = tok.token_id(UNK).unwrap();
        assert_eq!(tok.encode("<unk>").unwrap(), vec![unk]);
        assert_eq!(tok.placeholders().collect::<Vec<_>>(), vec![unk]);
        // Unseen multi-byte characters split into byte tokens; the stream must still be valid UTF-8.
        let ids = tok.encode("日本").unwrap();
        assert!(ids.len() > 2);
        let mut dec = StreamDecoder::new(&tok);
        let mut out = String::new();
        for id in ids {
            out.push_str(&dec.push(id).unwrap());
        }
        out.push_str(&dec.finish().unwrap());
        assert_eq!(out, "日本");
    }
}
