//! `itera distill`: train a smaller student on a teacher's distributions as well as the text
//! (`itera_train::distill` holds the rules; this module maps flags). Everything else is a
//! training run: same progress, metrics.jsonl, loss.png, checkpoints and `--resume`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use itera_train::distill::DistillOptions;
use itera_train::reference::distill_loss::{DistillLossSpec, Kl};

use super::train::{drive, resume, TrainFlags};

#[derive(Clone, Copy, ValueEnum)]
pub enum KlArg {
    /// KL(teacher || student) (Hinton et al.)
    Forward,
    /// KL(student || teacher) (MiniLLM)
    Reverse,
}

#[derive(Args)]
pub struct DistillArgs {
    /// The teacher: a model directory or .gguf file (the student uses its tokenizer). Several
    /// (`--teacher A B`, one tokenizer) are one teacher, the mean of their distributions
    #[arg(long, num_args = 1.., required_unless_present = "resume")]
    pub teacher: Vec<PathBuf>,
    /// The student's architecture preset
    #[arg(long, default_value = "micro", conflicts_with = "init")]
    pub student_preset: String,
    /// A config.json for the student instead of a preset
    #[arg(long)]
    pub student_config: Option<PathBuf>,
    /// Softmax temperature of both distributions in the KL term
    #[arg(long, default_value_t = 2.0)]
    pub temperature: f64,
    /// Weight of the KL term: loss = alpha T^2 KL + (1 - alpha) cross-entropy
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Direction of the KL divergence
    #[arg(long, value_enum, default_value = "forward")]
    pub kl: KlArg,
    /// Continue the distillation run in this directory from its last checkpoint
    #[arg(long, conflicts_with_all = ["teacher", "student_preset", "student_config", "init", "tokenizer", "epochs"])]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub flags: TrainFlags,
}

pub fn run(a: DistillArgs) -> Result<()> {
    let run = match (&a.resume, a.teacher.is_empty()) {
        (Some(dir), _) => {
            let run = resume(dir, a.flags.steps)?;
            if run.options.distill.is_none() {
                bail!(
                    "{} is a plain training run; continue it with itera train --resume",
                    dir.display()
                );
            }
            run
        }
        (None, false) => {
            let mut new = a
                .flags
                .new_run(&a.student_preset, a.student_config.clone(), false);
            new.options.distill = Some(DistillOptions {
                teachers: a.teacher.clone(),
                loss: DistillLossSpec {
                    temperature: a.temperature,
                    alpha: a.alpha,
                    kl: match a.kl {
                        KlArg::Forward => Kl::Forward,
                        KlArg::Reverse => Kl::Reverse,
                    },
                },
            });
            // Checked before any tokenizing or file is touched.
            new.options.validate()?;
            a.flags.create(new)?
        }
        (None, true) => bail!("--teacher MODEL is required (or --resume RUN)"),
    };
    drive(run, a.flags.epochs, a.flags.json)
}
