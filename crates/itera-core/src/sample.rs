//! Next-token sampling: logit adjustments (repetition, presence and frequency penalties, logit
//! bias, min-p), then temperature, top-k and top-p, seeded. Temperature 0 is greedy (after the
//! adjustments). The one sampler of the CLI, the library, the server and the Python package.

use crate::error::{Error, Result};
use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    pub seed: u64,
    /// Divides the positive logits (multiplies the negative ones) of every token already in the
    /// text, prompt included, by this (CTRL, Keskar et al. 2019; llama.cpp's `repeat_penalty`).
    /// 1.0 disables it.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token generated so far (OpenAI's
    /// `presence_penalty`, -2..2; 0 disables it).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated so far (OpenAI's
    /// `frequency_penalty`, -2..2; 0 disables it).
    pub frequency_penalty: f32,
    /// Keeps only tokens with at least this fraction of the most likely token's probability
    /// (Nguyen et al. 2024, "min-p"; 0 disables it).
    pub min_p: f32,
    /// Added to the logits of these token ids (OpenAI's `logit_bias`, -100..100).
    pub logit_bias: Vec<(u32, f32)>,
    /// Lets the sampler draw the tokenizer's placeholder tokens (PTB's `<unk>`: a word the corpus
    /// removed, not text), which streams never draw otherwise (`Sampler::never_draw`).
    pub allow_placeholders: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed: 42,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            min_p: 0.0,
            logit_bias: Vec::new(),
            allow_placeholders: false,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || !(0.0..=100.0).contains(&self.temperature) {
            return Err(Error::Argument(format!(
                "temperature must be in [0, 100], got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Argument(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return Err(Error::Argument(format!(
                "repetition_penalty must be in (0, 10], got {}",
                self.repetition_penalty
            )));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::Argument(format!(
                    "{name} must be in [-2, 2], got {v}"
                )));
            }
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return Err(Error::Argument(format!(
                "min_p must be in [0, 1), got {}",
                self.min_p
            )));
        }
        if let Some((id, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(Error::Argument(format!(
                "logit_bias for token {id} must be in [-100, 100], got {b}"
            )));
        }
        Ok(())
    }

    /// Whether any logit adjustment is on (otherwise sampling reads the logits as they are).
    fn adjusts(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.min_p > 0.0
            || !self.logit_bias.is_empty()
    }
}

/// What a sampler carries between tokens besides its parameters: the RNG and the token history
/// the penalties look at. Saved with a recurrent state so that a stream continues exactly.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplerState {
    pub rng: u64,
    /// (token, times generated), sorted by token.
    pub generated: Vec<(u32, u32)>,
    /// Prompt tokens (sorted, distinct).
    pub prompt: Vec<u32>,
}

/// Draws token ids from logits; owns the RNG so a seed fixes the whole sequence.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    candidates: Vec<(f32, u32)>,
    /// Weights of the whole vocabulary when no top-k applies.
    weights: Vec<f32>,
    /// Chunk maxima for the top-k floor.
    maxima: Vec<f32>,
    /// Times each token was generated (for the presence and frequency penalties).
    generated: std::collections::HashMap<u32, u32>,
    /// Tokens of the prompt (for the repetition penalty, with the generated ones).
    prompt: std::collections::HashSet<u32>,
    /// The adjusted copy of the logits.
    adjusted: Vec<f32>,
    /// Token ids whose logits are set to -inf before anything else (`never_draw`).
    banned: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            rng: Rng::new(params.seed),
            params,
            candidates: Vec::new(),
            weights: Vec::new(),
            maxima: Vec::new(),
            generated: Default::default(),
            prompt: Default::default(),
            adjusted: Vec::new(),
            banned: Vec::new(),
        })
    }

    /// Never draws these tokens (the tokenizer's placeholders, from `Tokenizer::placeholders`),
    /// unless the parameters allow placeholders.
    pub fn never_draw(mut self, ids: impl IntoIterator<Item = u32>) -> Self {
        if !self.params.allow_placeholders {
            self.banned.extend(ids);
        }
        self
    }

    /// The RNG and history, to continue this sampler later (`restore`).
    pub fn snapshot(&self) -> SamplerState {
        let mut generated: Vec<(u32, u32)> = self.generated.iter().map(|(&k, &v)| (k, v)).collect();
        generated.sort_unstable();
        let mut prompt: Vec<u32> = self.prompt.iter().copied().collect();
        prompt.sort_unstable();
        SamplerState {
            rng: self.rng.state(),
            generated,
            prompt,
        }
    }

    /// A sampler with `params` continuing from a snapshot (its RNG and history; `params.seed`
    /// is not used).
    pub fn restore(params: SamplingParams, saved: &SamplerState) -> Result<Self> {
        let mut s = Self::new(params)?;
        s.rng = Rng::from_state(saved.rng);
        s.generated = saved.generated.iter().copied().collect();
        s.prompt = saved.prompt.iter().copied().collect();
        Ok(s)
    }

    /// Tells the sampler the prompt's tokens (the repetition penalty covers them).
    pub fn observe_prompt(&mut self, ids: &[u32]) {
        self.prompt.extend(ids);
    }

    /// The logits after the penalties, the bias and min-p (tokens under min-p at -inf), as
    /// sampling sees them.
    pub fn adjusted(&self, logits: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        self.adjust_into(logits, &mut out);
        out
    }

    fn adjust_into(&self, logits: &[f32], a: &mut Vec<f32>) {
        let p = &self.params;
        a.clear();
        a.extend_from_slice(logits);
        for &id in &self.banned {
            if let Some(v) = a.get_mut(id as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &id in self.prompt.iter().chain(self.generated.keys()) {
                if let Some(v) = a.get_mut(id as usize) {
                    let r = p.repetition_penalty;
                    *v = if *v > 0.0 { *v / r } else { *v * r };
                }
            }
        }
        for (&id, &count) in &self.generated {
            if let Some(v) = a.get_mut(id as usize) {
                *v -= p.presence_penalty + p.frequency_penalty * count as f32;
            }
        }
        for &(id, b) in &p.logit_bias {
            if let Some(v) = a.get_mut(id as usize) {
                *v += b;
            }
        }
        if p.min_p > 0.0 {
            // p_i >= min_p * p_max  <=>  logit_i >= max + T ln(min_p) (T = 1 when greedy).
            let max = a[crate::math::argmax(a)];
            let t = if p.temperature > 0.0 {
                p.temperature
            } else {
                1.0
            };
            let floor = max + t * p.min_p.ln();
            a.iter_mut()
                .filter(|v| **v < floor)
                .for_each(|v| *v = f32::NEG_INFINITY);
        }
    }

    /// Draws the next token (and counts it as generated).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        // Greedy with only the ban on: the argmax stands unless it is banned, so the adjusted
        // copy of the logits is made only then.
        let greedy_unbanned = (self.params.temperature == 0.0 && !self.params.adjusts())
            .then(|| crate::math::argmax(logits) as u32)
            .filter(|id| !self.banned.contains(id));
        let id = if let Some(id) = greedy_unbanned {
            id
        } else if self.params.adjusts() || !self.banned.is_empty() {
            let mut buf = std::mem::take(&mut self.adjusted);
            self.adjust_into(logits, &mut buf);
            let id = self.draw(&buf);
            self.adjusted = buf;
            id
        } else {
            self.draw(logits)
        };
        *self.generated.entry(id).or_default() += 1;
        id
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let greedy = || crate::math::argmax(logits) as u32;
        if self.params.temperature == 0.0 {
            return greedy();
        }
        let inv_t = 1.0 / self.params.temperature;
        let c = &mut self.candidates;
        // c: the candidates that can be drawn, as (e^(scaled logit - max), id); `total`: the sum
        // of that weight over the candidate pool (the top k, or the whole vocabulary).
        let k = self.params.top_k;
        let total = if k > 0 && k < logits.len() {
            // Only the top k are ever sorted (found without sorting the vocabulary).
            top_k_scaled(logits, k, inv_t, &mut self.maxima, c);
            // A fixed order, so that a seed gives the same draw whatever the selection did.
            c.sort_unstable_by(larger_first);
            let max = c[0].0;
            let mut total = 0.0f32;
            for e in c.iter_mut() {
                e.0 = (e.0 - max).exp();
                total += e.0;
            }
            total
        } else {
            // The whole vocabulary: every weight in one vectorised pass.
            let max = logits[greedy() as usize] * inv_t;
            let w = &mut self.weights;
            w.resize(logits.len(), 0.0);
            let total = crate::math::exp_into(logits, inv_t, max, w);
            if self.params.top_p >= 1.0 {
                return draw_all(w, self.rng.uniform() as f32 * total).unwrap_or_else(greedy);
            }
            // Tokens under (1 - top_p) / V of the mass together hold at most 1 - top_p, so the
            // smallest set reaching top_p lies among the others.
            let floor = (1.0 - self.params.top_p) / logits.len() as f32 * total;
            c.clear();
            c.extend(
                w.iter()
                    .enumerate()
                    .filter(|e| *e.1 >= floor)
                    .map(|(i, &e)| (e, i as u32)),
            );
            total
        };
        let keep = if self.params.top_p >= 1.0 {
            c.len()
        } else {
            let mut m = c.len().min(64);
            loop {
                if m < c.len() {
                    c.select_nth_unstable_by(m - 1, larger_first);
                }
                c[..m].sort_unstable_by(larger_first);
                let mut mass = 0.0;
                let found = c[..m].iter().position(|e| {
                    mass += e.0 / total;
                    mass >= self.params.top_p
                });
                match found {
                    Some(i) => break i + 1,
                    None if m == c.len() => break m,
                    None => m = (2 * m).min(c.len()),
                }
            }
        };
        c.truncate(keep);
        let kept: f32 = c.iter().map(|e| e.0).sum();
        let mut r = self.rng.uniform() as f32 * kept;
        for e in c.iter() {
            r -= e.0;
            if r <= 0.0 {
                return e.1;
            }
        }
        c.last().map(|e| e.1).unwrap_or_else(greedy)
    }
}

/// Larger value first, ties to the lower token id: the one order of candidates everywhere, so a
/// seed always gives the same draw.
fn larger_first(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.partial_cmp(&a.0)
        .unwrap_or(std::cmp::Ordering::Equal)
        .then(a.1.cmp(&b.1))
}

/// The index where the running sum of the weights `w` passes `r` (in [0, sum)): whole chunks
/// are skipped by their (vectorised) sums, so only one chunk is walked. None if rounding left
/// `r` beyond the last weight.
fn draw_all(w: &[f32], mut r: f32) -> Option<u32> {
    const CHUNK: usize = 256;
    for (ci, ch) in w.chunks(CHUNK).enumerate() {
        let s = crate::math::sum(ch);
        if r > s {
            r -= s;
            continue;
        }
        for (j, &e) in ch.iter().enumerate() {
            r -= e;
            if r <= 0.0 {
                return Some((ci * CHUNK + j) as u32);
            }
        }
    }
    None
}

/// The k largest of `logits * inv_t` with their indices (ties: the lower index), in no order.
/// The k-th largest of the maxima of 4k chunks is a floor for the k-th largest value (k distinct
/// elements reach it), so one vectorisable pass for the maxima and one filtering pass leave a
/// few times k candidates for the exact selection, instead of selecting among the whole
/// vocabulary.
fn top_k_scaled(
    logits: &[f32],
    k: usize,
    inv_t: f32,
    maxima: &mut Vec<f32>,
    out: &mut Vec<(f32, u32)>,
) {
    let chunk = logits.len().div_ceil(4 * k).max(1);
    maxima.clear();
    maxima.extend(
        logits
            .chunks(chunk)
            .map(|c| c.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * inv_t))),
    );
    out.clear();
    if maxima.len() > k {
        maxima.select_nth_unstable_by(k - 1, |a, b| {
            b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal)
        });
        let floor = maxima[k - 1];
        for (i, &v) in logits.iter().enumerate() {
            let v = v * inv_t;
            if v >= floor {
                out.push((v, i as u32));
            }
        }
    }
    if out.len() < k {
        // Too few chunks, or NaN logits defeated the floor: select among everything.
        out.clear();
        out.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &v)| (v * inv_t, i as u32)),
        );
    }
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, larger_first);
        out.truncate(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass top-k picks the same set as sorting everything, ties to the lower index.
    #[test]
    fn top_k_pass_matches_a_full_sort() {
        let mut rng = Rng::new(9);
        // Few distinct values, so that ties cross the k-th place.
        let logits: Vec<f32> = (0..5000)
            .map(|_| (rng.uniform() * 50.0).floor() as f32)
            .collect();
        for k in [1, 7, 40, 4999] {
            let mut fast = Vec::new();
            top_k_scaled(&logits, k, 1.25, &mut Vec::new(), &mut fast);
            fast.sort_unstable_by_key(|e| e.1);
            let mut all: Vec<(f32, u32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &v)| (v * 1.25, i as u32))
                .collect();
            all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            all.truncate(k);
            all.sort_unstable_by_key(|e| e.1);
            assert_eq!(fast, all, "k = {k}");
        }
    }

    /// Draw frequencies follow the (tempered, truncated) softmax: over the whole vocabulary
    /// (chunked walk), with top-p only (pre-filtered pool) and with top-k.
    #[test]
    fn draws_follow_the_distribution() {
        let mut rng = Rng::new(3);
        let logits: Vec<f32> = (0..600).map(|_| (rng.uniform() * 6.0) as f32).collect();
        for (top_k, top_p) in [(0, 1.0), (0, 0.9), (50, 1.0), (50, 0.8)] {
            let params = SamplingParams {
                temperature: 0.7,
                top_k,
                top_p,
                seed: 1,
                ..Default::default()
            };
            // The expected distribution, computed the slow way.
            let mut p: Vec<(f64, usize)> = logits
                .iter()
                .enumerate()
                .map(|(i, &v)| ((v as f64 / 0.7).exp(), i))
                .collect();
            p.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            if top_k > 0 {
                p.truncate(top_k);
            }
            let z: f64 = p.iter().map(|e| e.0).sum();
            let mut mass = 0.0;
            let keep = p.iter().position(|e| {
                mass += e.0 / z;
                mass >= top_p as f64
            });
            p.truncate(keep.map_or(p.len(), |i| i + 1));
            let z: f64 = p.iter().map(|e| e.0).sum();
            let mut want = vec![0.0; logits.len()];
            for (w, i) in p {
                want[i] = w / z;
            }
            let mut s = Sampler::new(params).unwrap();
            let draws = 200_000;
            let mut got = vec![0.0; logits.len()];
            for _ in 0..draws {
                got[s.sample(&logits) as usize] += 1.0 / draws as f64;
            }
            let tv: f64 = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>()
                / 2.0;
            assert!(
                tv < 0.03,
                "top_k {top_k} top_p {top_p}: total variation {tv}"
            );
            assert!(
                got.iter().zip(&want).all(|(&g, &w)| w > 0.0 || g == 0.0),
                "drew outside the pool"
            );
        }
    }

    #[test]
    fn greedy_topk_topp_and_seed() {
        let logits = [0.1, 3.0, 2.9, -1.0, 0.0];
        let p = |temperature, top_k, top_p, seed| SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
            ..Default::default()
        };
        assert_eq!(Sampler::new(p(0.0, 0, 1.0, 1)).unwrap().sample(&logits), 1);
        let mut s = Sampler::new(p(1.0, 2, 1.0, 3)).unwrap();
        assert!((0..200).all(|_| matches!(s.sample(&logits), 1 | 2)));
        let mut s = Sampler::new(p(1.0, 0, 0.3, 3)).unwrap();
        assert!((0..200).all(|_| s.sample(&logits) == 1));
        let draw = |seed| {
            let mut s = Sampler::new(p(1.0, 0, 1.0, seed)).unwrap();
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
        assert!(Sampler::new(p(-1.0, 0, 1.0, 0)).is_err());
        assert!(Sampler::new(p(1.0, 0, 0.0, 0)).is_err());
        assert!(Sampler::new(p(f32::NAN, 0, 1.0, 0)).is_err());
    }

    /// A placeholder is never drawn, even as the most likely token, greedy or sampled; the others
    /// keep their relative odds; `allow_placeholders` lifts the ban.
    #[test]
    fn placeholders_are_never_drawn_unless_allowed() {
        let logits = [0.5, 3.0, 0.5, 0.0];
        let p = |temperature, allow_placeholders| SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            allow_placeholders,
            ..Default::default()
        };
        let greedy = |allow| {
            Sampler::new(p(0.0, allow))
                .unwrap()
                .never_draw([1])
                .sample(&logits)
        };
        assert_eq!(greedy(false), 0);
        assert_eq!(greedy(true), 1);
        // Greedy whose argmax is not banned (the path that skips the adjusted copy).
        let mut s = Sampler::new(p(0.0, false)).unwrap().never_draw([1]);
        assert_eq!(s.sample(&[0.5, 0.0, 4.0, 3.0]), 2);
        let mut s = Sampler::new(p(1.0, false)).unwrap().never_draw([1]);
        let draws: Vec<u32> = (0..3000).map(|_| s.sample(&logits)).collect();
        assert!(!draws.contains(&1));
        // Tokens 0 and 2 have equal logits: each about e^0.5 / (2 e^0.5 + 1) = 0.384 of draws.
        let share = draws.iter().filter(|&&d| d == 2).count() as f64 / 3000.0;
        assert!((share - 0.384).abs() < 0.04, "{share}");
        let mut s = Sampler::new(p(1.0, true)).unwrap().never_draw([1]);
        assert!((0..200).any(|_| s.sample(&logits) == 1));
    }

    /// The adjustments do what they say: repetition divides positive / multiplies negative
    /// logits of every token seen (prompt too), presence subtracts once and frequency per time
    /// generated, the bias adds, min-p drops (to -inf) what is under min_p times the top
    /// token's probability; the draws then follow the adjusted softmax.
    #[test]
    fn penalties_bias_and_min_p_change_the_distribution_as_specified() {
        let logits = [2.0f32, -1.0, 0.5, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 1,
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            min_p: 0.0,
            logit_bias: vec![(4, 3.0)],
            allow_placeholders: false,
        })
        .unwrap();
        s.observe_prompt(&[1]);
        // Pretend tokens 0 (twice) and 3 (once) were generated.
        s.generated.insert(0, 2);
        s.generated.insert(3, 1);
        let a = s.adjusted(&logits);
        assert_eq!(
            a,
            vec![
                2.0 / 2.0 - 0.5 - 0.5,
                -2.0, // -1 x 2: a negative logit is multiplied
                0.5,
                1.0 / 2.0 - 0.5 - 0.25,
                3.0
            ]
        );
        // min-p: with p_i proportional to e^logit, keep p_i >= 0.2 p_max (T = 1).
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 4,
            min_p: 0.2,
            ..Default::default()
        })
        .unwrap();
        let a = s.adjusted(&logits);
        let floor = 2.0 + 0.2f32.ln();
        for (x, y) in logits.iter().zip(&a) {
            assert_eq!(*y, if *x < floor { f32::NEG_INFINITY } else { *x });
        }
        let draws = 100_000;
        let mut got = [0f64; 5];
        for _ in 0..draws {
            got[s.draw(&a) as usize] += 1.0 / draws as f64;
        }
        let kept: Vec<f64> = logits
            .iter()
            .map(|&x| if x < floor { 0.0 } else { (x as f64).exp() })
            .collect();
        let z: f64 = kept.iter().sum();
        for (g, k) in got.iter().zip(&kept) {
            assert!((g - k / z).abs() < 0.01, "{got:?} vs {kept:?}");
        }
        // A repeated token becomes less likely with a frequency penalty.
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            frequency_penalty: 2.0,
            ..Default::default()
        })
        .unwrap();
        let flat = [1.0f32, 0.9, 0.0];
        assert_eq!(s.sample(&flat), 0);
        assert_eq!(s.sample(&flat), 1, "token 0 now carries a penalty of 2");
        assert!(Sampler::new(SamplingParams {
            min_p: 1.5,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            presence_penalty: 3.0,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            logit_bias: vec![(1, 200.0)],
            ..Default::default()
        })
        .is_err());
    }
}
