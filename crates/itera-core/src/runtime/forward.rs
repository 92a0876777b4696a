//! The forward over rows that serves every inference path (decode: one row; batched decode: one
//! row per stream; prefill and evaluation: the tokens of one or more sequences in time order per
//! stream). Read top to bottom it is the model: embed, then per layer `x += mixer(norm(x))` and
//! `x += moe(norm(x))`, then the final norm and the tied LM head. This file also decides, once per
//! call, which threads the call may use (`Par`) and whether its streams are split between threads.

use rayon::prelude::*;

use super::moe::{ffn_rows, moe_rows};
use super::phases::{mark, Phase};
use super::state::{grow, Scratch, State};
use super::{mixer::mixer_rows, Runtime};
use crate::error::{Error, Result};
use crate::exec::Par;
use crate::math::{rms_norm, rms_norm_rows};

/// Rows from which a call on a machine with more than two threads runs on the pool rather than
/// splitting with the pair helper.
const POOL_ROWS: usize = 64;

/// Calls of this many rows over at least two streams per thread run whole streams per thread
/// (`forward_split`): 64-stream decode 1.4x, prefill of 16 x 128 tokens 1.4x; 8 streams were
/// slower that way (alternated `itera bench` runs).
const SPLIT_FROM_ROWS: usize = 32;

/// One thread's share of a split call: its tokens, their streams (local to its range) and the
/// rows whose logits are wanted.
type Job = (Vec<u32>, Vec<usize>, Vec<usize>);

/// What a call ends with: logits of the requested rows (into the given slice, else
/// `s.logits`), or the final-norm hidden state of every row (in `s.h`).
enum Head<'a> {
    Logits(Option<&'a mut [f32]>),
    Hidden,
}

impl Runtime {
    /// The general forward: row i is token `tokens[i]` of stream `streams[i]` (rows of one stream in
    /// time order); `logit_rows` lists the rows whose logits are wanted, in the order returned in
    /// `s.logits`.
    pub fn forward_rows(
        &self,
        tokens: &[u32],
        streams: &[usize],
        states: &mut [State],
        logit_rows: &[usize],
        s: &mut Scratch,
    ) -> Result<()> {
        self.check_rows(tokens, streams, states, logit_rows)?;
        let rows = tokens.len();
        let threads = rayon::current_num_threads();
        let on_pool = rayon::current_thread_index().is_some();
        // Routing statistics are gathered in this scratch only, so such calls are not split.
        if threads > 1
            && rows >= SPLIT_FROM_ROWS
            && states.len() >= 2 * threads
            && s.routing.is_none()
        {
            let mut per_stream = vec![0usize; states.len()];
            streams.iter().for_each(|&st| per_stream[st] += 1);
            if per_stream.iter().filter(|&&c| c > 0).count() >= 2 * threads {
                self.forward_split(
                    tokens,
                    streams,
                    states,
                    logit_rows,
                    s,
                    &per_stream,
                    threads,
                    on_pool,
                );
                return Ok(());
            }
        }
        self.run_here(tokens, streams, states, logit_rows, s, Head::Logits(None));
        Ok(())
    }

    /// Like `forward_rows`, but stops before the LM head: returns the final-norm hidden state of
    /// every row ([rows, d_model]), e.g. a distillation teacher's, whose logits `lm_head` then
    /// computes a chunk at a time.
    pub fn final_hidden<'s>(
        &self,
        tokens: &[u32],
        streams: &[usize],
        states: &mut [State],
        s: &'s mut Scratch,
    ) -> Result<&'s [f32]> {
        self.check_rows(tokens, streams, states, &[])?;
        self.run_here(tokens, streams, states, &[], s, Head::Hidden);
        Ok(&s.h[..tokens.len() * self.cfg.d_model])
    }

    /// The tied LM head: logits [rows, vocab] of hidden states `h` [rows, d_model].
    pub fn lm_head(&self, h: &[f32], out: &mut [f32], s: &mut Scratch) -> Result<()> {
        let (d, v) = (self.cfg.d_model, self.cfg.vocab_size);
        if !h.len().is_multiple_of(d) || out.len() != h.len() / d * v {
            return Err(Error::Argument(format!(
                "lm_head: {} hidden values and {} outputs for d_model {d}, vocab {v}",
                h.len(),
                out.len()
            )));
        }
        let (par, _) = Self::par_for(h.len() / d);
        self.embed.matmul(h, out, &mut s.q, par);
        Ok(())
    }

    fn check_rows(
        &self,
        tokens: &[u32],
        streams: &[usize],
        states: &[State],
        logit_rows: &[usize],
    ) -> Result<()> {
        let c = &self.cfg;
        let rows = tokens.len();
        if streams.len() != rows {
            return Err(Error::Argument(
                "one stream index per token is needed".into(),
            ));
        }
        if let Some(&bad) = streams.iter().find(|&&st| st >= states.len()) {
            return Err(Error::Argument(format!(
                "stream {bad} out of range for {} states",
                states.len()
            )));
        }
        if let Some(&bad) = logit_rows.iter().find(|&&i| i >= rows) {
            return Err(Error::Argument(format!("logit row {bad} out of range")));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::Argument(format!(
                "token id {bad} out of range for vocab {}",
                c.vocab_size
            )));
        }
        states.iter().try_for_each(|st| self.check_state(st))
    }

    /// The threads a call of `rows` rows on this thread may use, and whether it is a pool thread.
    fn par_for(rows: usize) -> (Par, bool) {
        let threads = rayon::current_num_threads();
        let on_pool = rayon::current_thread_index().is_some();
        // Small calls (a decode step, a few streams, a short prompt), and every call when there
        // are just two threads, split their matmuls, conv and scan with the pair helper's second
        // core: small ones are bound by reading the weights or too short to wake the pool for,
        // and with two threads the helper gives the same parallelism without a wake-up per pass
        // (one-stream evaluation in chunks of 256: 1.25x over the pool). A pool thread never
        // uses the helper: it has its own share of the work.
        let par = if threads == 1 {
            Par::Serial
        } else if (rows < POOL_ROWS || threads == 2) && !on_pool {
            Par::Pair
        } else {
            Par::Pool(threads)
        };
        (par, on_pool)
    }

    /// `run` on the threads `par_for` allows, all streams together.
    fn run_here(
        &self,
        tokens: &[u32],
        streams: &[usize],
        states: &mut [State],
        logit_rows: &[usize],
        s: &mut Scratch,
        head: Head,
    ) {
        let (par, on_pool) = Self::par_for(tokens.len());
        // Other big calls run on a pool thread: the caller then sleeps once per call instead of
        // once per parallel pass, and the pool's idle threads do not spin against its serial work
        // (prefill 1.13x; small calls stay here, where one hop would cost more than it saves).
        if matches!(par, Par::Pool(_)) && !on_pool {
            crate::exec::pair::rest();
            rayon::scope(|_| self.run(tokens, streams, states, logit_rows, s, head, par));
        } else {
            self.run(tokens, streams, states, logit_rows, s, head, par);
        }
    }

    /// The model over validated rows, on the threads `par` allows; logits into `out`
    /// ([logit_rows, vocab]) when given, else into `s.logits`.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        tokens: &[u32],
        streams: &[usize],
        states: &mut [State],
        logit_rows: &[usize],
        s: &mut Scratch,
        head: Head,
        par: Par,
    ) {
        let c = &self.cfg;
        let (d, rows) = (c.d_model, tokens.len());
        if let (1, Some(p)) = (rows, &mut s.phases) {
            p.start();
        }
        let x = grow(&mut s.x, rows * d);
        for (xr, &t) in x.chunks_exact_mut(d).zip(tokens) {
            self.embed.row_into(t as usize, xr);
        }
        mark(&mut s.phases, Phase::Embed);
        for (li, layer) in self.layers.iter().enumerate() {
            let h = grow(&mut s.h, rows * d);
            rms_norm_rows(&s.x, &layer.norm, c.norm_eps, h);
            mark(&mut s.phases, Phase::Norm);
            mixer_rows(layer, li, c, streams, states, s, par);
            for (a, b) in s.x.iter_mut().zip(s.out.iter()) {
                *a += b;
            }
            mark(&mut s.phases, Phase::Residual);
            if let Some(moe) = &layer.moe {
                moe_rows(moe, li, c, rows, s, par);
            } else if let Some(ffn) = &layer.ffn {
                ffn_rows(ffn, c, rows, s, par);
            }
        }
        for st in streams {
            states[*st].position += 1;
        }
        let out = match head {
            Head::Hidden => {
                rms_norm_rows(&s.x, &self.norm_f, c.norm_eps, grow(&mut s.h, rows * d));
                if let Some(p) = &mut s.phases {
                    p.finish();
                }
                return;
            }
            Head::Logits(out) => out,
        };
        let h = grow(&mut s.h, logit_rows.len() * d);
        for (hr, &i) in h.chunks_exact_mut(d).zip(logit_rows) {
            rms_norm(&s.x[i * d..(i + 1) * d], &self.norm_f, c.norm_eps, hr);
        }
        mark(&mut s.phases, Phase::FinalNorm);
        let logits = match out {
            Some(o) => o,
            None => s.logits.grow(logit_rows.len() * c.vocab_size),
        };
        self.embed.matmul(h, logits, &mut s.q, par);
        if let Some(p) = &mut s.phases {
            p.mark(Phase::LmHead);
            p.finish();
        }
    }

    /// Several streams: each thread runs whole streams (a contiguous range of stream indices
    /// with about equal rows) through every layer on its own, so a call has one parallel region
    /// instead of one per matmul, conv and scan, and each thread's logits go straight into its
    /// block of the output. Each thread reads all the weights, which costs less than the
    /// per-pass synchronisation it saves. `per_stream`: rows of each stream.
    #[allow(clippy::too_many_arguments)]
    fn forward_split(
        &self,
        tokens: &[u32],
        streams: &[usize],
        states: &mut [State],
        logit_rows: &[usize],
        s: &mut Scratch,
        per_stream: &[usize],
        threads: usize,
        on_pool: bool,
    ) {
        // Stream ranges [bounds[g], bounds[g + 1]) holding about rows / threads rows each.
        let mut bounds = vec![0];
        let mut acc = 0;
        for (st, &count) in per_stream.iter().enumerate() {
            acc += count;
            if bounds.len() < threads && acc * threads >= tokens.len() * bounds.len() {
                bounds.push(st + 1);
            }
        }
        bounds.push(states.len());
        bounds.dedup();
        let groups = bounds.len() - 1;
        let group_of = |st: usize| bounds.partition_point(|&b| b <= st) - 1;
        // Each group's rows (in order), and where each requested logit row lands.
        let mut jobs: Vec<Job> = vec![Default::default(); groups];
        let mut local = vec![0usize; tokens.len()];
        for (i, (&t, &st)) in tokens.iter().zip(streams).enumerate() {
            let g = group_of(st);
            local[i] = jobs[g].0.len();
            jobs[g].0.push(t);
            jobs[g].1.push(st - bounds[g]);
        }
        let mut placed = Vec::with_capacity(logit_rows.len());
        for &i in logit_rows {
            let g = group_of(streams[i]);
            placed.push((g, jobs[g].2.len()));
            jobs[g].2.push(local[i]);
        }
        s.groups.resize_with(groups, Scratch::default);
        let mut parts = Vec::with_capacity(groups);
        let mut rest = states;
        for g in 0..groups {
            let (mine, tail) = rest.split_at_mut(bounds[g + 1] - bounds[g]);
            parts.push(mine);
            rest = tail;
        }
        let v = self.cfg.vocab_size;
        // Logits requested group after group (as in step_batch and batched prefill): each group
        // writes its block of the output directly; otherwise they are gathered afterwards.
        let mut start = 0;
        let starts: Vec<usize> = jobs
            .iter()
            .map(|job| {
                start += job.2.len();
                start - job.2.len()
            })
            .collect();
        let in_order = placed
            .iter()
            .enumerate()
            .all(|(k, &(g, j))| k == starts[g] + j);
        let mut outs: Vec<Option<&mut [f32]>> = Vec::with_capacity(groups);
        let all = s.logits.grow(logit_rows.len() * v);
        if in_order {
            let mut rest = all;
            for job in &jobs {
                let (mine, tail) = rest.split_at_mut(job.2.len() * v);
                outs.push(Some(mine));
                rest = tail;
            }
        } else {
            outs.resize_with(groups, || None);
        }
        let run = |st: &mut [State], sc: &mut Scratch, job: &Job, out: Option<&mut [f32]>| {
            let (toks, owners, wanted) = job;
            if toks.is_empty() {
                return;
            }
            self.run(toks, owners, st, wanted, sc, Head::Logits(out), Par::Serial)
        };
        if groups == 2 && !on_pool {
            // Two groups: the caller runs one and the spinning pair helper the other, with no
            // pool wake-up per call.
            type Part<'a, 'b> = (
                &'a mut [State],
                &'a mut Scratch,
                &'a Job,
                Option<&'b mut [f32]>,
            );
            let cells: Vec<std::sync::Mutex<Option<Part>>> = parts
                .into_iter()
                .zip(s.groups.iter_mut())
                .zip(jobs.iter().zip(outs))
                .map(|((st, sc), (job, out))| std::sync::Mutex::new(Some((st, sc, job, out))))
                .collect();
            crate::exec::pair::both(|g| {
                let (st, sc, job, out) = cells[g].lock().unwrap().take().expect("one use");
                run(st, sc, job, out);
            });
        } else {
            crate::exec::pair::rest();
            parts
                .into_par_iter()
                .zip(s.groups.par_iter_mut())
                .zip(jobs.par_iter().zip(outs))
                .for_each(|((st, sc), (job, out))| run(st, sc, job, out));
        }
        if !in_order {
            let out = s.logits.grow(logit_rows.len() * v);
            for (k, &(g, j)) in placed.iter().enumerate() {
                out[k * v..(k + 1) * v].copy_from_slice(&s.groups[g].logits[j * v..(j + 1) * v]);
            }
        }
    }
}
