//! The decode engine: one thread runs one batched decode loop for every active stream
//! (continuous batching). Requests wait in a bounded queue; each new request's prompt is processed
//! once (continuing from the longest cached prompt prefix), then it joins the batch; a finished or
//! cancelled stream leaves it at the next step.

use std::sync::Arc;
use std::time::Instant;

use itera_core::eval::{score_row, TokenScore};
use itera_core::generate::Generator;
use itera_core::runtime::State;
use itera_core::sample::{Sampler, SamplingParams};
use itera_core::tokenizer::{StreamDecoder, Tokenizer, END_OF_TEXT};
use tokio::sync::mpsc;

use crate::cache::PromptCache;
use crate::metrics::Metrics;
use crate::sessions::Sessions;

/// What a request asks the engine for (already validated and tokenized).
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// Log-probabilities of the generated tokens, with this many alternatives each.
    pub logprobs: Option<usize>,
    /// Also score the prompt's tokens (`echo` with `logprobs`); the prompt cache is bypassed,
    /// since every position's logits are needed.
    pub score_prompt: bool,
    /// Which choice of its request this job is; events go out tagged with it.
    pub choice: usize,
    /// Continue the named session's state (prompt read after it) and store the state reached.
    pub session: Option<String>,
    /// Shared by all choices of a request: dropping the receiver cancels them all.
    pub events: mpsc::UnboundedSender<(usize, Event)>,
}

impl Job {
    fn send(&self, e: Event) {
        let _ = self.events.send((self.choice, e));
    }
}

/// One token with its log-probability under the model (the raw distribution, before
/// temperature and penalties) and the most likely alternatives at its position.
#[derive(Clone, Debug)]
pub struct TokenInfo {
    pub id: u32,
    /// The token's own text (lossy where it is part of a UTF-8 character).
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// What the engine sends back for a job, in order: the prompt's scores (when asked), text
/// pieces with the tokens they complete, then one `Done` (or `Error`).
#[derive(Debug)]
pub enum Event {
    /// One entry per prompt token; the first has no score (nothing precedes it).
    Prompt(Vec<Option<TokenInfo>>),
    Text {
        text: String,
        /// The generated tokens whose text starts in this piece (when log-probabilities are on).
        tokens: Vec<TokenInfo>,
    },
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

pub struct EngineConfig {
    pub max_batch: usize,
    pub cache_bytes: usize,
    pub max_sessions: usize,
    pub session_bytes: usize,
}

struct Active {
    job: Job,
    sampler: Sampler,
    decoder: StreamDecoder,
    logits: Vec<f32>,
    generated: usize,
    /// Text produced so far, kept only while stop strings need checking.
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    /// Scored tokens not sent yet, with the byte offset in `text` where each one's text starts.
    pending: Vec<(usize, TokenInfo)>,
}

/// Runs the loop until the job channel closes. Call on a dedicated thread.
pub fn run(
    generator: Arc<Generator>,
    mut jobs: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
    cfg: EngineConfig,
) {
    let rt = &generator.runtime;
    let tokenizer = &generator.tokenizer;
    let vocab = rt.cfg.vocab_size;
    let end_id = tokenizer.token_id(END_OF_TEXT);
    let mut cache = PromptCache::new(cfg.cache_bytes);
    let mut sessions = Sessions::new(cfg.max_sessions, cfg.session_bytes);
    let mut active: Vec<Active> = Vec::new();
    let mut states: Vec<State> = Vec::new();
    let mut scratch = rt.new_scratch();
    let mut tokens: Vec<u32> = Vec::new();
    let (mut window_start, mut window_tokens) = (Instant::now(), 0u64);
    loop {
        // Admit queued jobs (block only when there is nothing to decode).
        while active.len() < cfg.max_batch {
            let job = if active.is_empty() {
                match jobs.blocking_recv() {
                    Some(j) => j,
                    None => return,
                }
            } else {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            };
            if job.events.is_closed() {
                metrics.cancelled.inc();
                continue;
            }
            let sampler = match Sampler::new(job.params.clone()) {
                Ok(s) => s,
                Err(e) => {
                    job.send(Event::Error(e.to_string()));
                    continue;
                }
            };
            let mut sampler = sampler.never_draw(tokenizer.placeholders());
            sampler.observe_prompt(&job.prompt);
            if job.score_prompt {
                let mut state = rt.new_state();
                let top = job.logprobs.unwrap_or(0);
                match itera_core::eval::score_tokens(rt, &mut state, None, &job.prompt, top) {
                    Ok((scores, logits)) => {
                        let infos = scores
                            .into_iter()
                            .zip(&job.prompt)
                            .map(|(sc, &id)| sc.map(|sc| token_info(tokenizer, id, &sc)))
                            .collect();
                        job.send(Event::Prompt(infos));
                        metrics.cache_misses.inc();
                        metrics.prompt_tokens.inc_by(job.prompt.len() as u64);
                        active.push(Active::new(job, sampler, tokenizer, logits));
                        states.push(state);
                    }
                    Err(e) => {
                        job.send(Event::Error(e.to_string()));
                    }
                }
                continue;
            }
            if let Some((mut state, logits)) = job.session.as_deref().and_then(|n| sessions.get(n))
            {
                // A session: its state, then the new prompt (the prompt cache does not apply).
                let logits = if job.prompt.is_empty() {
                    logits
                } else {
                    if let Err(e) = rt.prefill(&job.prompt, &mut state, &mut scratch) {
                        job.send(Event::Error(e.to_string()));
                        continue;
                    }
                    scratch.logits[..vocab].to_vec()
                };
                metrics.prompt_tokens.inc_by(job.prompt.len() as u64);
                active.push(Active::new(job, sampler, tokenizer, logits));
                states.push(state);
                continue;
            }
            let (mut state, logits, reused) = match cache.lookup(&job.prompt) {
                Some((state, logits, n)) if n == job.prompt.len() => (state, logits, n),
                Some((state, _, n)) => (state, Vec::new(), n),
                None => (rt.new_state(), Vec::new(), 0),
            };
            let logits = if reused == job.prompt.len() {
                logits
            } else {
                if let Err(e) = rt.prefill(&job.prompt[reused..], &mut state, &mut scratch) {
                    job.send(Event::Error(e.to_string()));
                    continue;
                }
                let l = scratch.logits[..vocab].to_vec();
                cache.insert(job.prompt.clone(), state.clone(), l.clone());
                l
            };
            if reused > 0 {
                metrics.cache_hits.inc();
                metrics.cached_tokens.inc_by(reused as u64);
            } else {
                metrics.cache_misses.inc();
            }
            metrics.prompt_tokens.inc_by(job.prompt.len() as u64);
            active.push(Active::new(job, sampler, tokenizer, logits));
            states.push(state);
        }
        // Sample one token per stream; finished or cancelled streams leave the batch.
        tokens.clear();
        let mut i = 0;
        while i < active.len() {
            // Asked before `advance`: once a stream has sent its last event, its client may close
            // at any moment, and a finished stream must not count as cancelled (in a 10-minute
            // soak, about 800 of 29,763 completed streams did before this).
            let gone = active[i].job.events.is_closed();
            match advance(&mut active[i], end_id) {
                Some(t) => {
                    tokens.push(t);
                    i += 1;
                }
                None => {
                    if gone {
                        metrics.cancelled.inc();
                    }
                    metrics.generated_tokens.inc_by(active[i].generated as u64);
                    let a = active.swap_remove(i);
                    let state = states.swap_remove(i);
                    if let Some(name) = &a.job.session {
                        sessions.put(name, state, a.logits);
                    }
                }
            }
        }
        metrics.active.set(active.len() as i64);
        if active.is_empty() {
            continue;
        }
        if let Err(e) = rt.step_batch(&tokens, &mut states, &mut scratch) {
            for a in active.drain(..) {
                a.job.send(Event::Error(e.to_string()));
            }
            states.clear();
            continue;
        }
        for (a, row) in active.iter_mut().zip(scratch.logits.chunks_exact(vocab)) {
            a.logits.copy_from_slice(row);
        }
        window_tokens += tokens.len() as u64;
        let elapsed = window_start.elapsed().as_secs_f64();
        if elapsed >= 1.0 {
            let rate = window_tokens as f64 / elapsed;
            metrics.tokens_per_s.set(rate);
            (window_start, window_tokens) = (Instant::now(), 0);
        }
    }
}

/// Samples the next token of one stream and sends its text. Returns the token to feed back, or
/// None when the stream is finished (its `Done` sent) or its client is gone.
fn advance(a: &mut Active, end_id: Option<u32>) -> Option<u32> {
    if a.job.events.is_closed() {
        return None;
    }
    let finish = |a: &mut Active, reason: &'static str| {
        let rest = a.decoder.finish().unwrap_or_default();
        a.text.push_str(&rest);
        flush(a, a.text.len(), true);
        a.job.send(Event::Done {
            finish_reason: reason,
            prompt_tokens: a.job.prompt.len(),
            completion_tokens: a.generated,
        });
        None
    };
    if a.generated >= a.job.max_tokens {
        return finish(a, "length");
    }
    let id = a.sampler.sample(&a.logits);
    if Some(id) == end_id {
        return finish(a, "stop");
    }
    a.generated += 1;
    if let Some(k) = a.job.logprobs {
        let info = token_info(a.decoder.tokenizer(), id, &score_row(&a.logits, id, k));
        a.pending.push((a.text.len(), info));
    }
    let piece = match a.decoder.push(id) {
        Ok(p) => p,
        Err(e) => {
            a.job.send(Event::Error(e.to_string()));
            return None;
        }
    };
    a.text.push_str(&piece);
    // A stop string can only end in the new piece, so search from just before the unsent tail.
    let longest = a.job.stop.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut from = a.sent.saturating_sub(longest);
    while !a.text.is_char_boundary(from) {
        from -= 1;
    }
    if let Some(cut) = a
        .job
        .stop
        .iter()
        .filter_map(|s| a.text[from..].find(s.as_str()))
        .min()
    {
        let cut = from + cut;
        a.text.truncate(cut);
        flush(a, cut, true);
        a.job.send(Event::Done {
            finish_reason: "stop",
            prompt_tokens: a.job.prompt.len(),
            completion_tokens: a.generated,
        });
        return None;
    }
    // Hold back a tail that could still become a stop string.
    let hold = a.job.stop.iter().map(|s| s.len() - 1).max().unwrap_or(0);
    let mut upto = a.text.len().saturating_sub(hold);
    while !a.text.is_char_boundary(upto) {
        upto -= 1;
    }
    flush(a, upto.max(a.sent), false);
    Some(id)
}

/// Sends the text up to byte `upto` with the scored tokens that start before it; `last` also
/// sends scored tokens that completed no text of their own.
fn flush(a: &mut Active, upto: usize, last: bool) {
    let n = a
        .pending
        .iter()
        .take_while(|(start, _)| *start < upto)
        .count();
    if upto > a.sent || (last && n > 0) {
        let tokens = a.pending.drain(..n).map(|(_, t)| t).collect();
        let text = a.text[a.sent..upto].to_string();
        a.job.send(Event::Text { text, tokens });
        a.sent = upto;
    }
}

/// A token's text and score as the API reports them.
fn token_info(tokenizer: &Tokenizer, id: u32, score: &TokenScore) -> TokenInfo {
    let text = |id: u32| tokenizer.decode(&[id]).unwrap_or_default();
    TokenInfo {
        id,
        text: text(id),
        logprob: score.logprob,
        top: score.top.iter().map(|&(t, lp)| (text(t), lp)).collect(),
    }
}

impl Active {
    fn new(job: Job, sampler: Sampler, tokenizer: &Tokenizer, logits: Vec<f32>) -> Self {
        Self {
            job,
            sampler,
            decoder: StreamDecoder::new(tokenizer),
            logits,
            generated: 0,
            text: String::new(),
            sent: 0,
            pending: Vec::new(),
        }
    }
}
