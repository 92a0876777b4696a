//! Distillation: the teacher a run learns from. Its rules (same tokenizer, a student no larger
//! than it, temperature > 0, alpha in [0, 1]) and its logits: the fast inference runtime reads
//! each training batch once (no gradients) and keeps only the final hidden states
//! ([B*T, d_teacher]); the loss asks for the logits a chunk at a time. Several models make one
//! teacher, an ensemble: the mean of their next-token distributions.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use itera_core::format::model_dir::load_runtime;
use itera_core::runtime::Runtime;
use itera_core::tensors::ModelSpec;
use itera_core::{ModelConfig, Tokenizer};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::reference::distill_loss::{DistillLossSpec, TeacherLogits};

/// How a run distils (saved with its checkpoints, so `--resume` continues the same way).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillOptions {
    /// The teacher's models (directories or GGUF files): with several, the teacher is the mean
    /// of their distributions. (Runs saved before ensembles wrote one path as `teacher`.)
    #[serde(alias = "teacher", deserialize_with = "one_or_more")]
    pub teachers: Vec<PathBuf>,
    #[serde(flatten)]
    pub loss: DistillLossSpec,
}

/// A path or a list of paths.
fn one_or_more<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMore {
        One(PathBuf),
        More(Vec<PathBuf>),
    }
    Ok(match OneOrMore::deserialize(d)? {
        OneOrMore::One(p) => vec![p],
        OneOrMore::More(v) => v,
    })
}

impl DistillOptions {
    pub fn validate(&self) -> Result<()> {
        if self.teachers.is_empty() {
            return Err(Error::Train("distillation needs a teacher model".into()));
        }
        let (t, a) = (self.loss.temperature, self.loss.alpha);
        if !(t > 0.0 && t.is_finite()) {
            return Err(Error::Train(format!(
                "the distillation temperature must be > 0, got {t}"
            )));
        }
        if !(0.0..=1.0).contains(&a) {
            return Err(Error::Train(format!(
                "alpha (the weight of the KL term) must be in [0, 1], got {a}"
            )));
        }
        Ok(())
    }
}

/// A loaded teacher: one model, or the members of an ensemble.
pub struct Teacher {
    runtimes: Vec<Arc<Runtime>>,
}

impl Teacher {
    /// Loads the teacher's models and checks that `student` may learn from each.
    pub fn load(o: &DistillOptions, student: &ModelConfig, tokenizer: &Tokenizer) -> Result<Self> {
        o.validate()?;
        let mut runtimes = Vec::with_capacity(o.teachers.len());
        for path in &o.teachers {
            runtimes.push(Arc::new(load_member(path, student, tokenizer)?));
        }
        Ok(Self { runtimes })
    }

    /// The teacher's logits source for one batch of `b` windows of `t` tokens (row-major, as
    /// the student sees them), each window read from a fresh state.
    pub fn rows(&self, tokens: &[u32], b: usize, t: usize) -> Result<Arc<dyn TeacherLogits>> {
        let streams: Vec<usize> = (0..b * t).map(|i| i / t).collect();
        let mut members = Vec::with_capacity(self.runtimes.len());
        for rt in &self.runtimes {
            let mut states: Vec<_> = (0..b).map(|_| rt.new_state()).collect();
            let mut scratch = rt.new_scratch();
            let hidden = rt
                .final_hidden(tokens, &streams, &mut states, &mut scratch)?
                .to_vec();
            members.push(Member {
                runtime: rt.clone(),
                hidden,
                scratch: Mutex::new(scratch),
            });
        }
        Ok(Arc::new(TeacherRows {
            members,
            spare: Mutex::new(Vec::new()),
        }))
    }
}

/// One model of the teacher, checked against the student.
fn load_member(path: &Path, student: &ModelConfig, tokenizer: &Tokenizer) -> Result<Runtime> {
    let (runtime, teacher_tok) = load_runtime(path)?;
    let t = &runtime.cfg;
    let origin = path.display();
    if t.vocab_size != student.vocab_size || teacher_tok.to_json()? != tokenizer.to_json()? {
        return Err(Error::Train(format!(
            "teacher {origin} has a different tokenizer (vocab {} against the student's {}): \
             a student must use its teacher's tokenizer.json",
            t.vocab_size, student.vocab_size
        )));
    }
    let (tp, sp) = (
        ModelSpec::new(t).parameter_count(),
        ModelSpec::new(student).parameter_count(),
    );
    if sp > tp {
        return Err(Error::Train(format!(
            "the student ({sp} parameters) is larger than its teacher {origin} ({tp}); \
             distillation compresses a model into a smaller one"
        )));
    }
    Ok(runtime)
}

/// One model's hidden states for a batch.
struct Member {
    runtime: Arc<Runtime>,
    hidden: Vec<f32>,
    scratch: Mutex<itera_core::runtime::Scratch>,
}

impl Member {
    fn logits(&self, r0: usize, rows: usize, out: &mut [f32]) {
        let d = self.runtime.cfg.d_model;
        let mut scratch = self.scratch.lock().expect("not poisoned");
        self.runtime
            .lm_head(&self.hidden[r0 * d..(r0 + rows) * d], out, &mut scratch)
            .expect("rows and outputs sized by the loss");
    }
}

/// One batch's teacher; logits on request through each model's LM head.
struct TeacherRows {
    members: Vec<Member>,
    /// The second and later members' logits, one chunk at a time.
    spare: Mutex<Vec<f32>>,
}

impl TeacherLogits for TeacherRows {
    /// One model's logits as they are; an ensemble's as log(mean of the members'
    /// probabilities), which the loss then tempers like any teacher's logits.
    fn logits(&self, r0: usize, rows: usize, out: &mut [f32]) {
        let (first, rest) = self.members.split_first().expect("a teacher has a model");
        first.logits(r0, rows, out);
        if rest.is_empty() {
            return;
        }
        let v = out.len() / rows;
        out.par_chunks_mut(v).for_each(log_softmax_row);
        let mut spare = self.spare.lock().expect("not poisoned");
        spare.resize(out.len(), 0.0);
        for m in rest {
            m.logits(r0, rows, &mut spare);
            out.par_chunks_mut(v)
                .zip(spare.par_chunks_mut(v))
                .for_each(|(acc, next)| {
                    log_softmax_row(next);
                    log_add_exp_row(acc, next);
                });
        }
        let ln_n = (self.members.len() as f32).ln();
        out.par_iter_mut().for_each(|z| *z -= ln_n);
    }
}

itera_core::multiversion! {
    /// A row of logits into log-probabilities.
    fn log_softmax_row(row: &mut [f32]) {
        let lse = itera_core::math::log_sum_exp(row);
        row.iter_mut().for_each(|z| *z -= lse);
    }
}

itera_core::multiversion! {
    /// acc = log(e^acc + e^next) = next + softplus(acc - next), element by element.
    fn log_add_exp_row<M>(acc: &mut [f32], next: &[f32]) {
        for (a, &b) in acc.iter_mut().zip(next) {
            *a = b + itera_core::math::softplus_with::<M>(*a - b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::distill_loss::Kl;
    use itera_core::format::model_dir::ModelDir;
    use itera_core::tensors::Weights;

    fn log_softmax(row: &[f32]) -> Vec<f64> {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
        let lse = max
            + row
                .iter()
                .map(|&z| (z as f64 - max).exp())
                .sum::<f64>()
                .ln();
        row.iter().map(|&z| z as f64 - lse).collect()
    }

    #[test]
    fn an_ensemble_teacher_is_the_mean_of_its_members_distributions() {
        let tmp = std::env::temp_dir().join(format!("itera-ensemble-{}", std::process::id()));
        let tok = crate::test_support::fixture_tokenizer(300);
        let mut cfg = ModelConfig::preset("micro").unwrap();
        cfg.vocab_size = tok.vocab_size();
        let members: Vec<PathBuf> = (1..=2)
            .map(|seed| {
                let dir = tmp.join(format!("m{seed}"));
                let w = Weights::init(&cfg, seed).unwrap();
                ModelDir::save(&dir, &cfg, &w, &tok).unwrap();
                dir
            })
            .collect();
        let (b, t, v) = (2, 8, cfg.vocab_size);
        let tokens: Vec<u32> = (0..(b * t) as u32)
            .map(|i| (i * 37 + 5) % v as u32)
            .collect();
        let logits = |teachers: Vec<PathBuf>| {
            let o = DistillOptions {
                teachers,
                loss: DistillLossSpec {
                    temperature: 1.0,
                    alpha: 0.5,
                    kl: Kl::Forward,
                },
            };
            let teacher = Teacher::load(&o, &cfg, &tok).unwrap();
            let rows = teacher.rows(&tokens, b, t).unwrap();
            // Two calls, as the loss makes them, chunk by chunk.
            let mut out = vec![0.0f32; b * t * v];
            let (first, second) = out.split_at_mut(5 * v);
            rows.logits(0, 5, first);
            rows.logits(5, b * t - 5, second);
            out
        };
        let (a, c) = (
            logits(vec![members[0].clone()]),
            logits(vec![members[1].clone()]),
        );
        assert_ne!(a, c, "the two members differ");
        let same = logits(vec![members[0].clone(), members[0].clone()]);
        let both = logits(members.clone());
        for r in 0..b * t {
            let row = r * v..(r + 1) * v;
            let (la, lc) = (log_softmax(&a[row.clone()]), log_softmax(&c[row.clone()]));
            for (i, (&x, &y)) in la.iter().zip(&lc).enumerate() {
                let mean = ((x.exp() + y.exp()) / 2.0).ln();
                let got = both[r * v + i] as f64;
                assert!(
                    (got - mean).abs() < 1e-4,
                    "row {r} token {i}: {got} vs {mean}"
                );
                let got = same[r * v + i] as f64;
                assert!(
                    (got - x).abs() < 1e-4,
                    "an ensemble of one model twice is that model"
                );
            }
        }
        // The saved form of runs made before ensembles (one path as `teacher`) still loads.
        let old = r#"{"teacher": "m1", "temperature": 2.0, "alpha": 0.5, "kl": "forward"}"#;
        let o: DistillOptions = serde_json::from_str(old).unwrap();
        assert_eq!(o.teachers, vec![PathBuf::from("m1")]);
        let o: DistillOptions = serde_json::from_str(&serde_json::to_string(&o).unwrap()).unwrap();
        assert_eq!(o.teachers, vec![PathBuf::from("m1")]);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
