//! The state part of one step of the scan's backward (`scan::core_backward`), blocked over
//! channels: for 16 channels at a time every state in turn, so the per-channel sums stay in
//! registers, with the sums over channels (dL/dB_t, dL/dC_t) kept in `math::dot`'s order so the
//! gradients equal the plain loop's bit for bit (the test below holds the plain loop).

use itera_core::math::MulAdd;

/// Channels per block of `states_backward`: one AVX-512 vector.
const LANES: usize = 16;

/// What one step of the backward reads across all N states ([N][d_inner] for the states, decays
/// and A; [d_inner] for the per-channel rows; [N] for B_t and C_t).
pub(super) struct StepRows<'a> {
    pub(super) gy: &'a [f32],
    pub(super) x: &'a [f32],
    pub(super) dt: &'a [f32],
    pub(super) dx: &'a [f32],
    pub(super) h_t: &'a [f32],
    pub(super) h_prev: &'a [f32],
    pub(super) decay_t: &'a [f32],
    pub(super) a: &'a [f32],
    pub(super) bt: &'a [f32],
    pub(super) ct: &'a [f32],
}

/// What the backward carries and accumulates: dL/dh ([N][d_inner], passed back a step), dL/dA
/// (the same layout, summed over steps), and this step's dL/d(dt) and the sum over states of
/// dL/d(B x) per channel ([d_inner], written whole by every step).
pub(super) struct Carried<'a> {
    pub(super) gh: &'a mut [f32],
    pub(super) g_a: &'a mut [f32],
    pub(super) g_dt: &'a mut [f32],
    pub(super) g_x: &'a mut [f32],
}

/// One step's sums over channels, dL/dC_t[j] = sum_d gy h_t and dL/dB_t[j] = sum_d g (dt x),
/// accumulated block by block in exactly `itera_core::math::dot`'s order (lane d % 8 over the
/// whole multiples of 8, then the rest in sequence), so the gradients are those of the
/// unblocked loop bit for bit.
pub(super) struct StepDots {
    /// [N][8] lane sums and [N] tails of dL/dC_t, then of dL/dB_t.
    lanes: Vec<[f32; 8]>,
    tails: Vec<f32>,
    /// Channels below this (d_inner rounded down to 8) go to the lane sums.
    whole: usize,
}

impl StepDots {
    pub(super) fn new(n: usize, di: usize) -> StepDots {
        StepDots {
            lanes: vec![[0.0; 8]; 2 * n],
            tails: vec![-0.0; 2 * n],
            whole: di - di % 8,
        }
    }

    fn clear(&mut self) {
        self.lanes.fill([0.0; 8]);
        self.tails.fill(-0.0);
    }

    /// Adds products `p[..len]` of channels i0.. to sum `k`.
    #[inline(always)]
    fn add(&mut self, k: usize, i0: usize, p: &[f32; LANES], len: usize) {
        let lanes = &mut self.lanes[k];
        if len == LANES && i0 + LANES <= self.whole {
            for half in p.chunks_exact(8) {
                for (acc, v) in lanes.iter_mut().zip(half) {
                    *acc += v;
                }
            }
            return;
        }
        for (l, v) in p[..len].iter().enumerate() {
            if i0 + l < self.whole {
                lanes[l % 8] += v;
            } else {
                self.tails[k] += v;
            }
        }
    }

    fn add_to(&self, gc: &mut [f32], gb: &mut [f32]) {
        let n = gc.len();
        let sum = |k: usize| self.lanes[k].iter().sum::<f32>() + self.tails[k];
        for j in 0..n {
            gc[j] += sum(j);
            gb[j] += sum(n + j);
        }
    }
}

/// The state part of one step's backward for channels i0..i0 + len (len <= LANES), every state
/// n in turn, so the per-channel sums (dL/d(dt), dL/dx) stay in registers across the states
/// instead of going through memory once per state (the scan's backward was 8.4% of a training
/// step on an AMD Zen 5, 2026-12-03).
#[inline(always)]
fn states_backward<M: MulAdd>(
    s: &StepRows,
    c: &mut Carried,
    dots: &mut StepDots,
    i0: usize,
    len: usize,
) {
    let di = s.gy.len();
    // Copies into local arrays (zeros past `len`): lanes LLVM knows alias nothing, so the
    // loop below vectorises (over the slices themselves it ran scalar).
    let lanes_at = |v: &[f32], at: usize| -> [f32; LANES] {
        let mut out = [0.0; LANES];
        out[..len].copy_from_slice(&v[at..at + len]);
        out
    };
    let (gy, x) = (lanes_at(s.gy, i0), lanes_at(s.x, i0));
    let (dt, dx) = (lanes_at(s.dt, i0), lanes_at(s.dx, i0));
    let (mut g_dt, mut g_x) = ([0.0f32; LANES], [0.0f32; LANES]);
    let n = s.bt.len();
    for j in 0..n {
        let at = j * di + i0;
        let (h_now, h_old) = (lanes_at(s.h_t, at), lanes_at(s.h_prev, at));
        let (decay, a) = (lanes_at(s.decay_t, at), lanes_at(s.a, at));
        let (mut gh, mut ga) = (lanes_at(c.gh, at), lanes_at(c.g_a, at));
        let (bj, cj) = (s.bt[j], s.ct[j]);
        let (mut p_c, mut p_b) = ([0.0f32; LANES], [0.0f32; LANES]);
        for l in 0..LANES {
            p_c[l] = gy[l] * h_now[l];
            let g = M::mul_add(gy[l], cj, gh[l]);
            let g_decay = g * h_old[l] * decay[l]; // dL/d(dt*A)
            g_dt[l] = M::mul_add(g_decay, a[l], M::mul_add(g * bj, x[l], g_dt[l]));
            ga[l] = M::mul_add(g_decay, dt[l], ga[l]);
            g_x[l] = M::mul_add(g, bj, g_x[l]);
            gh[l] = g * decay[l];
            p_b[l] = g * dx[l];
        }
        c.gh[at..at + len].copy_from_slice(&gh[..len]);
        c.g_a[at..at + len].copy_from_slice(&ga[..len]);
        dots.add(j, i0, &p_c, len);
        dots.add(n + j, i0, &p_b, len);
    }
    c.g_dt[i0..i0 + len].copy_from_slice(&g_dt[..len]);
    c.g_x[i0..i0 + len].copy_from_slice(&g_x[..len]);
}

/// The state part of step t's backward over all channels, block by block: updates `c` and
/// adds dL/dC_t and dL/dB_t to `gc` and `gb` ([N] each).
#[inline(always)]
pub(super) fn states_step_backward<M: MulAdd>(
    s: &StepRows,
    c: &mut Carried,
    dots: &mut StepDots,
    gc: &mut [f32],
    gb: &mut [f32],
) {
    let di = s.gy.len();
    dots.clear();
    // Whole blocks with a constant length (so they vectorise), then the rest.
    let whole = di - di % LANES;
    for i0 in (0..whole).step_by(LANES) {
        states_backward::<M>(s, c, dots, i0, LANES);
    }
    if whole < di {
        states_backward::<M>(s, c, dots, whole, di - whole);
    }
    dots.add_to(gc, gb);
}

#[cfg(test)]
mod tests {
    use super::*;
    use itera_core::rng::Rng;

    /// The blocked state backward against the loop it replaced (one pass over all channels per
    /// state, the sums over channels by `math::dot`): equal bit for bit, in whole blocks, a
    /// partial one, and channels past the last multiple of 8.
    #[test]
    fn blocked_states_backward_equals_the_plain_loop() {
        use itera_core::math::{dot, Fused};
        for (di, n) in [(32, 8), (18, 4), (12, 3), (5, 2)] {
            let mut rng = Rng::new(di as u64);
            let mut v =
                |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal() as f32).collect() };
            let (gy, x, dt, dx) = (v(di), v(di), v(di), v(di));
            let (h_t, h_prev, decay_t, a) = (v(di * n), v(di * n), v(di * n), v(di * n));
            let (bt, ct, gh0, ga0) = (v(n), v(n), v(di * n), v(di * n));
            // The plain loop.
            let (mut gh, mut ga) = (gh0.clone(), ga0.clone());
            let (mut g_dt, mut g_x, mut g) = (vec![0.0f32; di], vec![0.0f32; di], vec![0.0; di]);
            let (mut gc, mut gb) = (vec![0.5f32; n], vec![-0.5f32; n]);
            for j in 0..n {
                let r = j * di..(j + 1) * di;
                gc[j] += dot(&gy, &h_t[r.clone()]);
                for i in 0..di {
                    let k = j * di + i;
                    g[i] = Fused::mul_add(gy[i], ct[j], gh[k]);
                    let g_decay = g[i] * h_prev[k] * decay_t[k];
                    g_dt[i] =
                        Fused::mul_add(g_decay, a[k], Fused::mul_add(g[i] * bt[j], x[i], g_dt[i]));
                    ga[k] = Fused::mul_add(g_decay, dt[i], ga[k]);
                    g_x[i] = Fused::mul_add(g[i], bt[j], g_x[i]);
                    gh[k] = g[i] * decay_t[k];
                }
                gb[j] += dot(&g, &dx);
            }
            // The blocked one.
            let step = StepRows {
                gy: &gy,
                x: &x,
                dt: &dt,
                dx: &dx,
                h_t: &h_t,
                h_prev: &h_prev,
                decay_t: &decay_t,
                a: &a,
                bt: &bt,
                ct: &ct,
            };
            let (mut gh2, mut ga2) = (gh0, ga0);
            let (mut g_dt2, mut g_x2) = (vec![f32::NAN; di], vec![f32::NAN; di]);
            let mut carried = Carried {
                gh: &mut gh2,
                g_a: &mut ga2,
                g_dt: &mut g_dt2,
                g_x: &mut g_x2,
            };
            let (mut gc2, mut gb2) = (vec![0.5f32; n], vec![-0.5f32; n]);
            let mut dots = StepDots::new(n, di);
            states_step_backward::<Fused>(&step, &mut carried, &mut dots, &mut gc2, &mut gb2);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&gh), bits(&gh2), "dL/dh, d_inner {di}");
            assert_eq!(bits(&ga), bits(&ga2), "dL/dA, d_inner {di}");
            assert_eq!(bits(&g_dt), bits(&g_dt2), "dL/d(dt), d_inner {di}");
            assert_eq!(bits(&g_x), bits(&g_x2), "dL/dx sum, d_inner {di}");
            assert_eq!(bits(&gc), bits(&gc2), "dL/dC, d_inner {di}");
            assert_eq!(bits(&gb), bits(&gb2), "dL/dB, d_inner {di}");
        }
    }
}
