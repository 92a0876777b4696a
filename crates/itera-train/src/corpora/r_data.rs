//! Reads character vectors out of an R lazy-load database (`Rdata.rdx` + `Rdata.rdb`), enough for
//! Debian's r-cran-janeaustenr, without R. Format: R's XDR serialisation, one zlib blob per object.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// A decoded R value (only the kinds these files use).
#[derive(Clone, Debug)]
enum Value {
    Null,
    Str(Option<String>),
    Sym(String),
    Strings(Vec<Option<String>>),
    List(Vec<Value>, Option<Vec<Option<String>>>),
    Pairs(Vec<(Option<String>, Value)>),
    Ints(Vec<i32>),
}

struct Reader<'a> {
    b: &'a [u8],
    p: usize,
    refs: Vec<Value>,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self {
            b,
            p: 0,
            refs: Vec::new(),
        }
    }

    fn raw(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let s = self
            .b
            .get(self.p..self.p + n)
            .ok_or("truncated R serialisation")?;
        self.p += n;
        Ok(s)
    }

    fn int(&mut self) -> std::result::Result<i32, String> {
        Ok(i32::from_be_bytes(self.raw(4)?.try_into().unwrap()))
    }

    fn header(&mut self) -> std::result::Result<(), String> {
        if self.raw(2)? != b"X\n" {
            return Err("not an XDR R serialisation".into());
        }
        let version = self.int()?;
        self.int()?;
        self.int()?;
        if version == 3 {
            let n = self.int()? as usize;
            self.raw(n)?;
        }
        Ok(())
    }

    fn count(&mut self) -> std::result::Result<usize, String> {
        let n = self.int()?;
        usize::try_from(n).map_err(|_| format!("bad length {n}"))
    }

    fn item(&mut self) -> std::result::Result<Value, String> {
        let flags = self.int()?;
        let kind = flags & 0xFF;
        let (has_attr, has_tag) = (flags & (1 << 9) != 0, flags & (1 << 10) != 0);
        let v = match kind {
            254 | 253 | 242 => return Ok(Value::Null),
            9 => {
                let n = self.int()?;
                return Ok(Value::Str(if n == -1 {
                    None
                } else {
                    Some(String::from_utf8_lossy(self.raw(n as usize)?).to_string())
                }));
            }
            255 => {
                let k = (flags >> 8) as usize;
                let idx = if k != 0 { k } else { self.int()? as usize };
                return self
                    .refs
                    .get(idx.wrapping_sub(1))
                    .cloned()
                    .ok_or("bad reference".into());
            }
            1 => {
                let name = match self.item()? {
                    Value::Str(s) => s.unwrap_or_default(),
                    _ => String::new(),
                };
                let v = Value::Sym(name);
                self.refs.push(v.clone());
                return Ok(v);
            }
            2 => {
                if has_attr {
                    self.item()?;
                }
                let tag = if has_tag { self.item()? } else { Value::Null };
                let car = self.item()?;
                let cdr = self.item()?;
                let name = match tag {
                    Value::Sym(s) => Some(s),
                    _ => None,
                };
                let mut pairs = vec![(name, car)];
                if let Value::Pairs(rest) = cdr {
                    pairs.extend(rest);
                }
                return Ok(Value::Pairs(pairs));
            }
            16 | 19 => {
                let n = self.count()?;
                let items = (0..n)
                    .map(|_| self.item())
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                if kind == 16 {
                    Value::Strings(
                        items
                            .into_iter()
                            .map(|v| if let Value::Str(s) = v { s } else { None })
                            .collect(),
                    )
                } else {
                    Value::List(items, None)
                }
            }
            13 | 10 => {
                let n = self.count()?;
                Value::Ints(
                    (0..n)
                        .map(|_| self.int())
                        .collect::<std::result::Result<_, _>>()?,
                )
            }
            14 => {
                let n = self.count()?;
                self.raw(8 * n)?; // numeric vectors are not text: skip them
                Value::Null
            }
            other => return Err(format!("unsupported R object type {other}")),
        };
        if !has_attr {
            return Ok(v);
        }
        let attrs = self.item()?;
        let names = match &attrs {
            Value::Pairs(p) => p
                .iter()
                .find(|(k, _)| k.as_deref() == Some("names"))
                .and_then(|(_, v)| match v {
                    Value::Strings(s) => Some(s.clone()),
                    _ => None,
                }),
            _ => None,
        };
        Ok(match v {
            Value::List(items, _) => Value::List(items, names),
            other => other,
        })
    }
}

fn inflate(bytes: &[u8], gzip: bool) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let res = if gzip {
        flate2::read::GzDecoder::new(bytes).read_to_end(&mut out)
    } else {
        flate2::read::ZlibDecoder::new(bytes).read_to_end(&mut out)
    };
    res.map_err(|e| format!("cannot decompress: {e}"))?;
    Ok(out)
}

/// Every character-vector object in the database (a data frame contributes its `text` column), by name.
pub fn read_lazy_load_texts(dir: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    let (rdx, rdb) = (dir.join("Rdata.rdx"), dir.join("Rdata.rdb"));
    let index_bytes = std::fs::read(&rdx).map_err(|e| Error::file(&rdx, e))?;
    let db = std::fs::read(&rdb).map_err(|e| Error::file(&rdb, e))?;
    let index_raw = inflate(&index_bytes, true).map_err(|m| Error::file(&rdx, m))?;
    let mut r = Reader::new(&index_raw);
    r.header().map_err(|m| Error::file(&rdx, m))?;
    let index = r.item().map_err(|m| Error::file(&rdx, m))?;
    let variables = match index {
        Value::List(items, Some(names)) => names
            .iter()
            .position(|n| n.as_deref() == Some("variables"))
            .map(|i| items[i].clone()),
        _ => None,
    }
    .ok_or_else(|| Error::file(&rdx, "no `variables` entry"))?;
    let Value::List(entries, Some(names)) = variables else {
        return Err(Error::file(&rdx, "`variables` is not a named list"));
    };
    let mut out = BTreeMap::new();
    for (name, entry) in names.into_iter().zip(entries) {
        let name = name.unwrap_or_default();
        let Value::Ints(pos) = entry else {
            return Err(Error::file(&rdx, format!("{name}: bad offset entry")));
        };
        let (off, len) = (pos[0] as usize, pos[1] as usize);
        let chunk = db
            .get(off..off + len)
            .ok_or_else(|| Error::file(&rdb, format!("{name}: offset out of range")))?;
        let raw = inflate(chunk.get(4..).unwrap_or(&[]), false)
            .map_err(|m| Error::file(&rdb, format!("{name}: {m}")))?;
        let mut r = Reader::new(&raw);
        r.header()
            .map_err(|m| Error::file(&rdb, format!("{name}: {m}")))?;
        let value = r
            .item()
            .map_err(|m| Error::file(&rdb, format!("{name}: {m}")))?;
        let strings = match value {
            Value::Strings(s) => s,
            Value::List(items, names) => {
                let col = names
                    .and_then(|n| n.iter().position(|x| x.as_deref() == Some("text")))
                    .unwrap_or(0);
                match items.into_iter().nth(col) {
                    Some(Value::Strings(s)) => s,
                    _ => return Err(Error::file(&rdb, format!("{name}: no text column"))),
                }
            }
            _ => return Err(Error::file(&rdb, format!("{name}: not a character vector"))),
        };
        out.insert(
            name,
            strings.into_iter().map(Option::unwrap_or_default).collect(),
        );
    }
    Ok(out)
}
