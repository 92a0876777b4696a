//! Next-token sampling: temperature, top-k, top-p, seeded. Temperature 0 is greedy.

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
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed: 42,
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
        Ok(())
    }
}

/// Draws token ids from logits; owns the RNG so a seed fixes the whole sequence.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            rng: Rng::new(params.seed),
            params,
            candidates: Vec::new(),
        })
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let greedy = || crate::math::argmax(logits) as u32;
        if self.params.temperature == 0.0 {
            return greedy();
        }
        let inv_t = 1.0 / self.params.temperature;
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &v)| (v * inv_t, i as u32)),
        );
        let order = |a: &(f32, u32), b: &(f32, u32)| {
            b.0.partial_cmp(&a.0)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.1.cmp(&b.1))
        };
        // Only the candidates that can be drawn are ever sorted: the top k (a partial selection,
        // not a sort of the whole vocabulary), and of those only a prefix that holds top_p of
        // the mass, found by doubling.
        let k = if self.params.top_k > 0 {
            self.params.top_k.min(c.len())
        } else {
            c.len()
        };
        if k < c.len() {
            c.select_nth_unstable_by(k - 1, order);
            c.truncate(k);
        }
        let max = c.iter().map(|e| e.0).fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f32;
        for e in c.iter_mut() {
            e.0 = (e.0 - max).exp();
            total += e.0;
        }
        let by_prob = |a: &(f32, u32), b: &(f32, u32)| {
            b.0.partial_cmp(&a.0)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.1.cmp(&b.1))
        };
        let keep = if self.params.top_p >= 1.0 {
            c.len()
        } else {
            let mut m = c.len().min(64);
            loop {
                if m < c.len() {
                    c.select_nth_unstable_by(m - 1, by_prob);
                }
                c[..m].sort_unstable_by(by_prob);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_topk_topp_and_seed() {
        let logits = [0.1, 3.0, 2.9, -1.0, 0.0];
        let p = |temperature, top_k, top_p, seed| SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
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
}
