//! Held-out evaluation: mean NLL per token, perplexity, bits per byte, PTB word-level perplexity.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::math::log_sum_exp;
use crate::runtime::Runtime;
use crate::tokenizer::Tokenizer;

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub tokens: usize,
    pub bytes: usize,
    pub words: usize,
    pub lines: usize,
    /// Mean negative log-likelihood per token, in nats.
    pub mean_nll: f64,
    pub token_perplexity: f64,
    pub bits_per_byte: f64,
    /// exp(total NLL / (words + lines)): PTB's convention, one end-of-sentence per line.
    pub word_perplexity: f64,
}

/// Tokens per prefill call during evaluation (and prompt scoring): the logits of every position
/// of a chunk are held at once ([chunk, vocab], 8 MB for `tiny`).
pub const EVAL_CHUNK: usize = 256;

/// One token's log-probability under the model, with the most likely alternatives there.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenScore {
    pub logprob: f32,
    /// (token id, log-probability), most likely first.
    pub top: Vec<(u32, f32)>,
}

/// log softmax(row)[id] and the `k` largest log-probabilities of the row (most likely first,
/// ties to the lower id).
pub fn score_row(row: &[f32], id: u32, k: usize) -> TokenScore {
    let lse = log_sum_exp(row);
    let mut top = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        let order = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, order);
            idx.truncate(k);
        }
        idx.sort_by(order);
        top = idx
            .into_iter()
            .map(|i| (i, row[i as usize] - lse))
            .collect();
    }
    TokenScore {
        logprob: row[id as usize] - lse,
        top,
    }
}

/// Scores `tokens` after `state` (whose next-token logits are `first`, or None when nothing has
/// been read yet: the first token then gets no score). Runs in chunks, so memory stays bounded;
/// leaves `state` after the last token and returns one entry per token plus the logits after
/// the last one.
pub fn score_tokens(
    runtime: &Runtime,
    state: &mut crate::runtime::State,
    first: Option<&[f32]>,
    tokens: &[u32],
    top: usize,
) -> Result<(Vec<Option<TokenScore>>, Vec<f32>)> {
    let mut scratch = runtime.new_scratch();
    let mut next = first.map(<[f32]>::to_vec);
    let mut out = Vec::with_capacity(tokens.len());
    walk_scored(
        runtime,
        state,
        &mut scratch,
        &mut next,
        tokens,
        EVAL_CHUNK,
        |row, id| {
            out.push(row.map(|r| score_row(r, id, top)));
        },
    )?;
    Ok((out, next.unwrap_or_default()))
}

/// Mean NLL (nats) of `tokens[1..]`, each given every token before it: the recurrent protocol of
/// `evaluate` on token ids (the trainer's validation).
pub fn mean_nll(runtime: &Runtime, tokens: &[u32]) -> Result<f64> {
    if tokens.len() < 2 {
        return Err(Error::Argument(format!(
            "{} token(s) to score: need at least two",
            tokens.len()
        )));
    }
    let (mut state, mut scratch) = (runtime.new_state(), runtime.new_scratch());
    let (mut next, mut total) = (None, 0.0f64);
    walk_scored(
        runtime,
        &mut state,
        &mut scratch,
        &mut next,
        tokens,
        EVAL_CHUNK,
        |row, id| {
            if let Some(row) = row {
                total += (log_sum_exp(row) - row[id as usize]) as f64;
            }
        },
    )?;
    Ok(total / (tokens.len() - 1) as f64)
}

/// Runs `tokens` through `state` in chunks of `rows` and calls `f(logits that predict it, id)`
/// for each token; `next` holds the logits that predict the first token (None: nothing read yet)
/// and is left holding those after the last.
#[allow(clippy::too_many_arguments)]
fn walk_scored(
    runtime: &Runtime,
    state: &mut crate::runtime::State,
    scratch: &mut crate::runtime::Scratch,
    next: &mut Option<Vec<f32>>,
    tokens: &[u32],
    rows: usize,
    mut f: impl FnMut(Option<&[f32]>, u32),
) -> Result<()> {
    let vocab = runtime.cfg.vocab_size;
    for chunk in tokens.chunks(rows.max(1)) {
        runtime.prefill_all(chunk, state, scratch)?;
        for (j, &id) in chunk.iter().enumerate() {
            match j {
                0 => f(next.as_deref(), id),
                _ => f(Some(&scratch.logits[(j - 1) * vocab..j * vocab]), id),
            }
        }
        let last = chunk.len() - 1;
        *next = Some(scratch.logits[last * vocab..(last + 1) * vocab].to_vec());
    }
    Ok(())
}

/// Scores every token of `text` with the full preceding context (the recurrent state carries it
/// all). The first token is conditioned on a newline, the boundary every line of a corpus
/// follows. `progress(bytes done, bytes)`.
pub fn evaluate(
    runtime: &Runtime,
    tokenizer: &Tokenizer,
    text: &str,
    progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    evaluate_in(runtime, tokenizer, text, EVAL_CHUNK, progress)
}

/// `evaluate` reading `rows` tokens per forward pass. With 1 every token goes through the
/// kernels of a decode step (`Runtime::step`), which for block formats are not always the ones
/// a prefill of many rows uses (int8 activations against the codes, where a prefill of 32 rows
/// or more decodes the weights, except in the lines layout): the score of the model as `itera
/// generate` runs it.
pub fn evaluate_in(
    runtime: &Runtime,
    tokenizer: &Tokenizer,
    text: &str,
    rows: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    if text.trim().is_empty() {
        return Err(Error::Argument("evaluation text is empty".into()));
    }
    let start = tokenizer.encode("\n")?;
    let (mut state, mut scratch) = (runtime.new_state(), runtime.new_scratch());
    runtime.prefill(&start, &mut state, &mut scratch)?;
    let mut next = Some(scratch.logits[..runtime.cfg.vocab_size].to_vec());
    let (mut total, mut tokens, mut done) = (0.0f64, 0usize, 0usize);
    for piece in crate::tokenizer::segments(text) {
        let ids = tokenizer.encode(piece)?;
        tokens += ids.len();
        walk_scored(
            runtime,
            &mut state,
            &mut scratch,
            &mut next,
            &ids,
            rows,
            |row, id| {
                let row = row.expect("the first token follows the newline");
                total += (log_sum_exp(row) - row[id as usize]) as f64;
            },
        )?;
        done += piece.len();
        progress(done, text.len());
    }
    Ok(report(text, tokens, total))
}

/// The text's tokens (an error for empty text).
pub fn text_tokens(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    if text.trim().is_empty() {
        return Err(Error::Argument("evaluation text is empty".into()));
    }
    tokenizer.encode(text)
}

/// The report for `tokens` tokens of `text` with total NLL `total` (nats).
pub fn report(text: &str, tokens: usize, total: f64) -> EvalReport {
    let words = text.split_whitespace().count();
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
    EvalReport::from_counts(tokens, text.len(), words, lines, total)
}

impl EvalReport {
    /// The measures of a total NLL `total` (nats) over these counts.
    fn from_counts(tokens: usize, bytes: usize, words: usize, lines: usize, total: f64) -> Self {
        let mean_nll = total / tokens as f64;
        EvalReport {
            tokens,
            bytes,
            words,
            lines,
            mean_nll,
            token_perplexity: mean_nll.exp(),
            bits_per_byte: total / (bytes as f64 * std::f64::consts::LN_2),
            word_perplexity: (total / (words + lines) as f64).exp(),
        }
    }

    /// Total NLL in nats.
    pub fn total_nll(&self) -> f64 {
        self.mean_nll * self.tokens as f64
    }

    /// Several texts scored separately, as one: their counts and NLLs summed, so bits per byte
    /// weighs each text by its bytes (not the mean of the texts' figures). None for no parts.
    pub fn combine(parts: &[EvalReport]) -> Option<Self> {
        let sum = |f: fn(&EvalReport) -> usize| parts.iter().map(f).sum::<usize>();
        (!parts.is_empty()).then(|| {
            Self::from_counts(
                sum(|r| r.tokens),
                sum(|r| r.bytes),
                sum(|r| r.words),
                sum(|r| r.lines),
                parts.iter().map(EvalReport::total_nll).sum(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{report, EvalReport};

    /// Combining two texts' reports gives the report of their summed counts and NLLs: bits per
    /// byte weighted by bytes, not the mean of the two.
    #[test]
    fn combined_reports_sum_counts_and_nll() {
        let a = report("one two three\nfour\n", 6, 6.0);
        let b = report("five six\n", 2, 4.0);
        let c = EvalReport::combine(&[a.clone(), b.clone()]).unwrap();
        assert_eq!((c.tokens, c.bytes, c.words, c.lines), (8, 28, 6, 3));
        assert!((c.total_nll() - 10.0).abs() < 1e-12);
        assert!((c.mean_nll - 1.25).abs() < 1e-12);
        let bpb = 10.0 / (28.0 * std::f64::consts::LN_2);
        assert!((c.bits_per_byte - bpb).abs() < 1e-12);
        assert!((c.bits_per_byte - (a.bits_per_byte + b.bits_per_byte) / 2.0).abs() > 0.01);
        assert!((c.word_perplexity - (10.0f64 / 9.0).exp()).abs() < 1e-12);
        assert!(EvalReport::combine(&[]).is_none());
    }

    /// Segments cut only after newlines and cover the text; scoring by segments sees exactly
    /// the tokens of the whole text.
    #[test]
    fn segments_cover_the_text_at_line_ends() {
        let line = "the cat sat on the mat, héllo — naïve café.\n";
        let mut text = line.repeat(5000);
        // And one line of 200 KB, cut between words.
        text.push_str(&"a cat  sat on the mat, héllo — naïve café. ".repeat(5000));
        text.push('\n');
        let pieces: Vec<&str> = crate::tokenizer::segments(&text).collect();
        assert!(pieces.len() > 2);
        assert_eq!(pieces.concat(), text);
        assert!(pieces[..pieces.len() - 1]
            .iter()
            .all(|p| p.ends_with('\n') || !p.ends_with(' ')));
        let tok = crate::tokenizer::tests::fixture_tokenizer(300);
        let whole = tok.encode(&text).unwrap();
        let by_piece: Vec<u32> = pieces.iter().flat_map(|p| tok.encode(p).unwrap()).collect();
        assert_eq!(whole, by_piece);
    }
}
