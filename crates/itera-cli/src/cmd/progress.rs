//! Progress for long commands: an `indicatif` bar on a terminal, and plain `tracing` log lines
//! when stderr is not one (logs, CI, pipes), so a long job always says where it is.

use indicatif::{ProgressBar, ProgressStyle};

pub fn bar(len: u64, template: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

/// A line above the bar on a terminal; a log line otherwise (indicatif then hides the bar).
pub fn say(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        tracing::info!("{line}");
    } else {
        pb.println(line);
    }
}
