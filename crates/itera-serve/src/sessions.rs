//! Named sessions (`"session": "NAME"` on `/v1/completions`): the recurrent state a completion
//! ended in, kept so that the next request with the same name continues from it, in the spirit
//! of llama.cpp's slot save / restore. Bounded in count and bytes; the least recently used go
//! first. Only the engine thread touches it.

use itera_core::runtime::State;

struct Session {
    name: String,
    state: State,
    /// The logits after the last token the state read.
    logits: Vec<f32>,
    last_used: u64,
}

impl Session {
    fn bytes(&self) -> usize {
        self.state.bytes() + 4 * self.logits.len() + self.name.len()
    }
}

pub struct Sessions {
    entries: Vec<Session>,
    max_count: usize,
    max_bytes: usize,
    clock: u64,
}

impl Sessions {
    pub fn new(max_count: usize, max_bytes: usize) -> Self {
        Self {
            entries: Vec::new(),
            max_count,
            max_bytes,
            clock: 0,
        }
    }

    /// The session's state and logits (a copy: the session stays until replaced).
    pub fn get(&mut self, name: &str) -> Option<(State, Vec<f32>)> {
        self.clock += 1;
        let clock = self.clock;
        let s = self.entries.iter_mut().find(|s| s.name == name)?;
        s.last_used = clock;
        Some((s.state.clone(), s.logits.clone()))
    }

    /// Stores (or replaces) a session, evicting the least recently used beyond the bounds.
    pub fn put(&mut self, name: &str, state: State, logits: Vec<f32>) {
        self.entries.retain(|s| s.name != name);
        self.clock += 1;
        self.entries.push(Session {
            name: name.to_string(),
            state,
            logits,
            last_used: self.clock,
        });
        while self.entries.len() > self.max_count
            || self.entries.iter().map(Session::bytes).sum::<usize>() > self.max_bytes
        {
            let oldest = (0..self.entries.len())
                .min_by_key(|&i| self.entries[i].last_used)
                .expect("not empty");
            self.entries.swap_remove(oldest);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(v: f32) -> State {
        State {
            layers: vec![itera_core::runtime::LayerState {
                conv: vec![v; 100],
                ssm: vec![v; 100],
            }],
            position: 1,
        }
    }

    #[test]
    fn sessions_are_bounded_and_least_recently_used_go_first() {
        let mut s = Sessions::new(2, 1 << 20);
        s.put("a", state(1.0), vec![0.0; 10]);
        s.put("b", state(2.0), vec![0.0; 10]);
        assert!(s.get("a").is_some());
        s.put("c", state(3.0), vec![0.0; 10]);
        assert_eq!(s.len(), 2);
        assert!(s.get("b").is_none(), "b was least recently used");
        assert_eq!(s.get("c").unwrap().0, state(3.0));
        // A byte bound of about one entry keeps one.
        let mut s = Sessions::new(10, 1000);
        s.put("a", state(1.0), vec![0.0; 10]);
        s.put("b", state(2.0), vec![0.0; 10]);
        assert_eq!(s.len(), 1);
        assert!(s.get("b").is_some());
    }
}
