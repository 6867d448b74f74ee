//! The checkpoint manifest (`manifest.json`, written last): the step and the SHA-256 of every
//! other file of the checkpoint.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::{Error, Result};

/// The only manifest format written and read.
pub const FORMAT: u32 = 1;
/// Largest manifest accepted (a real one is a few hundred bytes).
pub const MAX_MANIFEST_BYTES: usize = 64 << 10;
/// Most files a manifest may list.
pub const MAX_FILES: usize = 64;

/// A parsed and validated manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version ([`FORMAT`]).
    pub format: u32,
    /// Optimizer step of the checkpoint.
    pub step: usize,
    /// File name → lower-case hex SHA-256.
    pub files: BTreeMap<String, String>,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::Manifest(reason.into())
}

/// Whether `name` is a plain file name (no directory part, not `.`/`..`).
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
}

impl Manifest {
    /// Parses and validates a manifest: size, format, file names (plain names only, so a
    /// manifest can never point outside its directory) and digests (64 lower-case hex digits).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(bad(format!(
                "{} bytes, more than the {MAX_MANIFEST_BYTES} accepted",
                bytes.len()
            )));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<()> {
        if self.format != FORMAT {
            return Err(bad(format!(
                "format {} (this trainer reads format {FORMAT})",
                self.format
            )));
        }
        if self.files.is_empty() || self.files.len() > MAX_FILES {
            return Err(bad(format!(
                "{} files listed (1 to {MAX_FILES} expected)",
                self.files.len()
            )));
        }
        for (name, digest) in &self.files {
            if !is_plain_file_name(name) {
                return Err(bad(format!("file name {name:?} is not a plain file name")));
            }
            if digest.len() != 64
                || !digest
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(bad(format!(
                    "digest of {name:?} is not 64 lower-case hex digits"
                )));
            }
        }
        Ok(())
    }

    /// The digest recorded for `file`.
    pub fn digest(&self, file: &str) -> Result<&str> {
        self.files
            .get(file)
            .map(String::as_str)
            .ok_or_else(|| bad(format!("lacks {file}")))
    }

    /// Serialises the manifest (pretty JSON).
    pub fn to_json(&self) -> Result<String> {
        self.check()?;
        serde_json::to_string_pretty(self).map_err(|e| bad(e.to_string()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const D: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn roundtrip_and_refusals() {
        let m = Manifest {
            format: 1,
            step: 42,
            files: BTreeMap::from([("state.json".to_string(), D.to_string())]),
        };
        let back = Manifest::parse(m.to_json().unwrap().as_bytes()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.digest("state.json").unwrap(), D);
        assert!(
            back.digest("x")
                .unwrap_err()
                .to_string()
                .contains("lacks x")
        );
        for (text, why) in [
            (
                format!(r#"{{"format":2,"step":1,"files":{{"a":"{D}"}}}}"#),
                "format 2",
            ),
            (
                format!(r#"{{"format":1,"step":1,"files":{{"../a":"{D}"}}}}"#),
                "plain file name",
            ),
            (
                r#"{"format":1,"step":1,"files":{"a":"XYZ"}}"#.to_string(),
                "hex",
            ),
            (r#"{"format":1,"step":1,"files":{}}"#.to_string(), "0 files"),
            (
                format!(r#"{{"format":1,"step":-1,"files":{{"a":"{D}"}}}}"#),
                "invalid value",
            ),
            (
                format!(r#"{{"format":1,"step":1,"files":{{"a":"{D}"}},"x":1}}"#),
                "unknown field",
            ),
        ] {
            let e = Manifest::parse(text.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
        let huge = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(Manifest::parse(&huge).is_err());
    }
}
