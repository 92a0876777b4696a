//! Prompt-state cache: the model is recurrent, so the whole meaning of a processed prompt is its
//! state (a few KB) plus the next-token logits. Entries are kept least-recently-used first out,
//! bounded in bytes; a new prompt continues from the longest cached prefix of its tokens.

use itera_core::runtime::State;

struct Entry {
    tokens: Vec<u32>,
    state: State,
    logits: Vec<f32>,
    last_used: u64,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.state.bytes() + 4 * (self.logits.len() + self.tokens.len())
    }
}

pub struct PromptCache {
    entries: Vec<Entry>,
    capacity: usize,
    used: usize,
    clock: u64,
}

impl PromptCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::new(),
            capacity,
            used: 0,
            clock: 0,
        }
    }

    /// The longest cached prefix of `tokens`: (state after it, its logits, its length).
    pub fn lookup(&mut self, tokens: &[u32]) -> Option<(State, Vec<f32>, usize)> {
        self.clock += 1;
        let clock = self.clock;
        let best = self
            .entries
            .iter_mut()
            .filter(|e| e.tokens.len() <= tokens.len() && tokens.starts_with(&e.tokens))
            .max_by_key(|e| e.tokens.len())?;
        best.last_used = clock;
        Some((best.state.clone(), best.logits.clone(), best.tokens.len()))
    }

    pub fn insert(&mut self, tokens: Vec<u32>, state: State, logits: Vec<f32>) {
        if let Some(i) = self.entries.iter().position(|e| e.tokens == tokens) {
            let old = self.entries.swap_remove(i);
            self.used -= old.bytes();
        }
        self.clock += 1;
        let e = Entry {
            tokens,
            state,
            logits,
            last_used: self.clock,
        };
        if e.bytes() > self.capacity {
            return;
        }
        self.used += e.bytes();
        self.entries.push(e);
        while self.used > self.capacity {
            let (i, _) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .expect("over capacity means non-empty");
            let old = self.entries.swap_remove(i);
            self.used -= old.bytes();
        }
    }

    pub fn bytes(&self) -> usize {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(v: f32) -> State {
        State {
            layers: vec![itera_core::runtime::LayerState {
                conv: vec![v; 4],
                ssm: vec![v; 4],
            }],
            position: 0,
        }
    }

    #[test]
    fn longest_prefix_wins_and_capacity_is_respected() {
        let entry_bytes = 4 * 8 + 4 * 2 + 4 * 3;
        let mut c = PromptCache::new(2 * entry_bytes + 8);
        c.insert(vec![1, 2], state(1.0), vec![0.0; 2]);
        c.insert(vec![1, 2, 3], state(2.0), vec![0.0; 2]);
        let (s, _, n) = c.lookup(&[1, 2, 3, 4]).unwrap();
        assert_eq!((n, s.layers[0].conv[0]), (3, 2.0));
        assert!(c.lookup(&[9]).is_none());
        // A third entry evicts the least recently used ([1, 2]).
        c.insert(vec![5, 6, 7], state(3.0), vec![0.0; 2]);
        assert!(c.bytes() <= 2 * entry_bytes + 8);
        assert_eq!(c.lookup(&[1, 2, 9]).map(|x| x.2), None);
        assert_eq!(c.lookup(&[1, 2, 3]).map(|x| x.2), Some(3));
    }
}
