//! Where a forward's time goes, phase by phase: the wall time between marks set along the
//! model (embedding, each mixer and MoE step, the head), summed per phase over the calls made
//! with a scratch that collects them (`Scratch::phases`; `itera bench --only phases`). Each mark
//! reads the clock (~20 ns), so a timed call runs a little slower than an untimed one.

use std::time::Instant;

/// The phases, in the order a layer runs them (summed over layers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Embed,
    Norm,
    InProj,
    Conv,
    XProj,
    DtProj,
    Scan,
    OutProj,
    Residual,
    MoeNorm,
    Router,
    Routing,
    GateUp,
    Swiglu,
    Down,
    Combine,
    FinalNorm,
    LmHead,
}

impl Phase {
    pub const ALL: [Phase; 18] = [
        Phase::Embed,
        Phase::Norm,
        Phase::InProj,
        Phase::Conv,
        Phase::XProj,
        Phase::DtProj,
        Phase::Scan,
        Phase::OutProj,
        Phase::Residual,
        Phase::MoeNorm,
        Phase::Router,
        Phase::Routing,
        Phase::GateUp,
        Phase::Swiglu,
        Phase::Down,
        Phase::Combine,
        Phase::FinalNorm,
        Phase::LmHead,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Embed => "embed",
            Phase::Norm => "norm",
            Phase::InProj => "in_proj",
            Phase::Conv => "conv",
            Phase::XProj => "x_proj",
            Phase::DtProj => "dt_proj",
            Phase::Scan => "scan",
            Phase::OutProj => "out_proj",
            Phase::Residual => "residual",
            Phase::MoeNorm => "moe_norm",
            Phase::Router => "router",
            Phase::Routing => "routing",
            Phase::GateUp => "gate_up",
            Phase::Swiglu => "swiglu",
            Phase::Down => "down",
            Phase::Combine => "combine",
            Phase::FinalNorm => "final_norm",
            Phase::LmHead => "lm_head",
        }
    }
}

/// Nanoseconds per phase, and the forward calls they were summed over.
#[derive(Clone, Debug, Default)]
pub struct Phases {
    last: Option<Instant>,
    pub ns: [u64; Phase::ALL.len()],
    pub calls: u64,
}

impl Phases {
    /// A call starts: the first phase is timed from here.
    pub(super) fn start(&mut self) {
        self.calls += 1;
        self.last = Some(Instant::now());
    }

    /// Phase `p` ends now: the time since the last mark is its (nothing outside a started call).
    pub(super) fn mark(&mut self, p: Phase) {
        if let Some(last) = self.last {
            let now = Instant::now();
            self.ns[p as usize] += (now - last).as_nanos() as u64;
            self.last = Some(now);
        }
    }

    /// The call ends: marks until the next `start` count nothing.
    pub(super) fn finish(&mut self) {
        self.last = None;
    }

    /// Mean nanoseconds per call of each phase, in order.
    pub fn per_call(&self) -> Vec<(&'static str, f64)> {
        let calls = self.calls.max(1) as f64;
        Phase::ALL
            .iter()
            .map(|&p| (p.name(), self.ns[p as usize] as f64 / calls))
            .collect()
    }
}

/// Marks phase `p` as ended, when the scratch collects phases.
#[inline]
pub(super) fn mark(phases: &mut Option<Phases>, p: Phase) {
    if let Some(ph) = phases {
        ph.mark(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::runtime::Runtime;
    use crate::tensors::Weights;

    /// Decode steps are timed phase by phase (every phase of `micro`, whose second layer has
    /// the MoE), prompts of several rows are not, and timing changes no logit.
    #[test]
    fn decode_steps_are_timed_per_phase() {
        let cfg = ModelConfig::preset("micro").unwrap();
        let rt = Runtime::new(&cfg, &Weights::init(&cfg, 5).unwrap()).unwrap();
        let (mut a, mut sa) = (rt.new_state(), rt.new_scratch());
        let (mut b, mut sb) = (rt.new_state(), rt.new_scratch());
        sb.phases = Some(Phases::default());
        rt.prefill(&[1, 2, 3], &mut a, &mut sa).unwrap();
        rt.prefill(&[1, 2, 3], &mut b, &mut sb).unwrap();
        let p = sb.phases.as_ref().unwrap();
        assert_eq!((p.calls, p.ns.iter().sum::<u64>()), (0, 0));
        for t in [4, 5, 6] {
            rt.step(t, &mut a, &mut sa).unwrap();
            rt.step(t, &mut b, &mut sb).unwrap();
            assert_eq!(sa.logits[..], sb.logits[..]);
        }
        let p = sb.phases.unwrap();
        assert_eq!(p.calls, 3);
        for (name, ns) in p.per_call() {
            assert!(ns > 0.0, "{name} was not timed");
        }
    }
}
