//! `itera data`: fetches and prepares the English corpora.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use itera_train::corpora::{self, Event};

use super::progress::{bar, say};

#[derive(Args)]
pub struct DataArgs {
    /// Where the text files go
    #[arg(long, default_value = "data")]
    pub dir: PathBuf,
    /// Only these corpora (ptb, brown, sotu, shakespeare, austen); default all
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Print the manifest as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: DataArgs) -> Result<()> {
    let pb = bar(corpora::CORPORA.len() as u64, "{bar:30} {pos}/{len} {msg}");
    let manifest = corpora::prepare(&a.dir, &a.only, |e| match e {
        Event::Skipped(c) => {
            say(&pb, format!("{:<12} already prepared", c.name));
            pb.inc(1);
        }
        Event::Downloading(c) => pb.set_message(format!(
            "{}: downloading {} `{}`",
            c.name, c.registry, c.package
        )),
        Event::Extracting(c) => pb.set_message(format!("{}: extracting", c.name)),
        Event::Done(c, files) => {
            for (f, s) in files {
                say(
                    &pb,
                    format!(
                        "{:<12} {f}: {} bytes, {} words, {} lines",
                        c.name, s.bytes, s.words, s.lines
                    ),
                );
            }
            pb.inc(1);
        }
    })?;
    pb.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
    } else {
        println!("corpora ready in {}", a.dir.display());
    }
    Ok(())
}
