//! What defines a training run besides the model (`TrainOptions`, saved with each checkpoint so a
//! resumed run continues exactly), which tensors it updates (`TrainOnly`), and their bounds.

use std::path::PathBuf;

use itera_core::tensors::Role;
use serde::{Deserialize, Serialize};

use crate::distill::DistillOptions;
use crate::error::{Error, Result};
use crate::optim::AdamWConfig;

/// Everything that defines a run besides the model; saved with each checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainOptions {
    pub steps: usize,
    pub batch_size: usize,
    /// Tokens per training window that the loss scores.
    pub seq_len: usize,
    /// Tokens read before each window only to warm the recurrent state, with no loss on them
    /// (0: off): every scored token then has at least this much context, as every token has
    /// when `itera eval` carries the state through a text.
    #[serde(default)]
    pub burn_in: usize,
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub warmup: usize,
    /// Weight of the MoE load-balancing loss.
    pub aux_weight: f64,
    /// Decay of an exponential moving average of the weights (0: off). When on, validation, the
    /// `best/` model and the run's result use the averaged weights.
    #[serde(default)]
    pub ema: f64,
    /// Step from which the average is kept (it starts as a copy of the weights then).
    #[serde(default)]
    pub ema_start: usize,
    pub eval_every: usize,
    /// Validation windows of seq_len tokens per evaluation; 0 scores the whole validation text
    /// with the recurrent state carried through it, as `itera eval` does (attention models,
    /// which have no such state, then use 64 windows). Runs saved before 0 existed keep theirs.
    pub eval_windows: usize,
    pub save_every: usize,
    pub seed: u64,
    /// Fraction of each training file held out for validation when no valid files are given.
    pub holdout: f64,
    pub train_files: Vec<PathBuf>,
    /// Sampling weight of each training input, in order (empty: in proportion to size; see
    /// `data::train_offsets`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_weights: Vec<f64>,
    pub valid_files: Vec<PathBuf>,
    pub optimizer: AdamWConfig,
    /// Which tensors learn (the others stay as they started).
    #[serde(default)]
    pub train_only: TrainOnly,
    /// Learn from a teacher's distributions as well as from the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillOptions>,
}

/// The tensors a run updates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOnly {
    #[default]
    All,
    /// MoE routers and RMSNorm gains only (healing a pruned model without moving its experts).
    RouterAndNorms,
    /// The MoE layers (routers and experts) and the RMSNorm gains: heals a pruned model where it
    /// was cut, leaving its mixers and embedding as they were trained.
    Moe,
}

impl TrainOnly {
    pub(crate) fn trains(self, role: Option<Role>) -> bool {
        match self {
            Self::All => true,
            Self::RouterAndNorms => matches!(role, Some(Role::Router | Role::Norm)),
            Self::Moe => matches!(role, Some(Role::Router | Role::Expert | Role::Norm)),
        }
    }
}

impl TrainOptions {
    pub fn new(train_files: Vec<PathBuf>, steps: usize) -> Self {
        Self {
            steps,
            batch_size: 16,
            seq_len: 128,
            burn_in: 0,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup: 100,
            aux_weight: 0.01,
            ema: 0.0,
            ema_start: 0,
            eval_every: 200,
            eval_windows: 0,
            save_every: 500,
            seed: 1,
            holdout: crate::data::DEFAULT_HOLDOUT,
            train_files,
            source_weights: Vec::new(),
            valid_files: Vec::new(),
            optimizer: AdamWConfig {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                grad_clip: 1.0,
            },
            train_only: TrainOnly::All,
            distill: None,
        }
    }

    /// Tokens a training window reads: the burn-in, then the scored tokens.
    pub fn window(&self) -> usize {
        self.burn_in + self.seq_len
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Train(m));
        if self.steps == 0 || self.batch_size == 0 || self.seq_len < 2 {
            return bad("steps and batch size must be > 0 and seq_len >= 2".into());
        }
        if !(self.lr > 0.0 && self.lr < 1.0) {
            return bad(format!("learning rate must be in (0, 1), got {}", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) || !(0.0..0.5).contains(&self.holdout) {
            return bad("min_lr_ratio must be in [0, 1] and holdout in [0, 0.5)".into());
        }
        if self.eval_every == 0 || self.save_every == 0 {
            return bad("eval_every and save_every must be > 0".into());
        }
        let w = &self.source_weights;
        if !w.is_empty() {
            if w.len() != self.train_files.len() {
                return bad(format!(
                    "{} source weights for {} training inputs (one per --data argument)",
                    w.len(),
                    self.train_files.len()
                ));
            }
            if w.iter().any(|x| !(x.is_finite() && *x >= 0.0)) || w.iter().all(|x| *x == 0.0) {
                return bad(format!(
                    "source weights must be finite, >= 0 and not all 0, got {w:?}"
                ));
            }
        }
        if !(0.0..1.0).contains(&self.ema) {
            return bad(format!("ema decay must be in [0, 1), got {}", self.ema));
        }
        if self.burn_in > 0 && self.distill.is_some() {
            return bad(
                "a burn-in is not supported with distillation (the teacher scores every \
                        token it reads)"
                    .into(),
            );
        }
        if self.burn_in > 16 * self.seq_len {
            return bad(format!(
                "a burn-in of {} tokens for windows of {} scored tokens: at most 16x seq_len",
                self.burn_in, self.seq_len
            ));
        }
        self.distill
            .as_ref()
            .map_or(Ok(()), DistillOptions::validate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_weights_are_checked_against_the_inputs() {
        let mut o = TrainOptions::new(vec!["a.txt".into(), "b.txt".into()], 10);
        o.validate().unwrap();
        for (w, says) in [
            (vec![1.0], "1 source weights for 2"),
            (vec![1.0, -1.0], "must be finite, >= 0"),
            (vec![0.0, 0.0], "not all 0"),
            (vec![1.0, f64::NAN], "must be finite"),
        ] {
            o.source_weights = w;
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
        o.source_weights = vec![1.0, 0.25];
        o.validate().unwrap();
    }

    #[test]
    fn burn_in_is_bounded_and_not_for_distillation() {
        let mut o = TrainOptions::new(vec!["a.txt".into()], 10);
        o.burn_in = 64;
        assert_eq!(o.window(), 64 + 128);
        o.validate().unwrap();
        o.burn_in = 16 * 128 + 1;
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("at most 16x seq_len"), "{e}");
        o.burn_in = 64;
        o.distill = Some(crate::distill::DistillOptions {
            teachers: vec!["teacher".into()],
            loss: crate::reference::distill_loss::DistillLossSpec {
                temperature: 1.0,
                alpha: 0.5,
                kl: crate::reference::distill_loss::Kl::Forward,
            },
        });
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("not supported with distillation"), "{e}");
    }
}
