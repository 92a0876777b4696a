//! Distillation: the teacher a run learns from. Its rules (same tokenizer, a student no larger
//! than it, temperature > 0, alpha in [0, 1]) and its logits: the fast inference runtime reads
//! each training batch once (no gradients) and keeps only the final hidden states
//! ([B*T, d_teacher]); the loss asks for the logits a chunk at a time.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use itera_core::format::model_dir::load_runtime;
use itera_core::runtime::Runtime;
use itera_core::tensors::ModelSpec;
use itera_core::{ModelConfig, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::reference::distill_loss::{DistillLossSpec, TeacherLogits};

/// How a run distils (saved with its checkpoints, so `--resume` continues the same way).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillOptions {
    /// The teacher: a model directory or GGUF file.
    pub teacher: PathBuf,
    #[serde(flatten)]
    pub loss: DistillLossSpec,
}

impl DistillOptions {
    pub fn validate(&self) -> Result<()> {
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

/// A loaded teacher.
pub struct Teacher {
    runtime: Arc<Runtime>,
}

impl Teacher {
    /// Loads the teacher and checks that `student` may learn from it.
    pub fn load(o: &DistillOptions, student: &ModelConfig, tokenizer: &Tokenizer) -> Result<Self> {
        o.validate()?;
        let (runtime, teacher_tok) = load_runtime(&o.teacher)?;
        let t = &runtime.cfg;
        let origin = o.teacher.display();
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
        Ok(Self {
            runtime: Arc::new(runtime),
        })
    }

    /// The teacher's logits source for one batch of `b` windows of `t` tokens (row-major, as
    /// the student sees them), each window read from a fresh state.
    pub fn rows(&self, tokens: &[u32], b: usize, t: usize) -> Result<Arc<dyn TeacherLogits>> {
        let rt = &self.runtime;
        let streams: Vec<usize> = (0..b * t).map(|i| i / t).collect();
        let mut states: Vec<_> = (0..b).map(|_| rt.new_state()).collect();
        let mut scratch = rt.new_scratch();
        let hidden = rt
            .final_hidden(tokens, &streams, &mut states, &mut scratch)?
            .to_vec();
        Ok(Arc::new(TeacherRows {
            runtime: self.runtime.clone(),
            hidden,
            scratch: Mutex::new(scratch),
        }))
    }
}

/// One batch's teacher hidden states; logits on request through the runtime's LM head.
struct TeacherRows {
    runtime: Arc<Runtime>,
    hidden: Vec<f32>,
    scratch: Mutex<itera_core::runtime::Scratch>,
}

impl TeacherLogits for TeacherRows {
    fn logits(&self, r0: usize, rows: usize, out: &mut [f32]) {
        let d = self.runtime.cfg.d_model;
        let mut scratch = self.scratch.lock().expect("not poisoned");
        self.runtime
            .lm_head(&self.hidden[r0 * d..(r0 + rows) * d], out, &mut scratch)
            .expect("rows and outputs sized by the loss");
    }
}
