//! Bounded line reading with clear errors for input that is not UTF-8 text.

use std::io::{BufRead, Read};

/// Longest physical line accepted.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// Why a line could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// Reason, naming the byte and column where possible.
    pub reason: String,
    /// Whether reading cannot go on (binary data, UTF-16, I/O error, a line over the limit).
    pub fatal: bool,
}

/// Reads UTF-8 lines (with their terminator) from a byte stream, rejecting binary data and UTF-16
/// on the first offending line, and reporting invalid UTF-8 (e.g. Latin-1) per line.
#[derive(Debug)]
pub struct LineReader<R> {
    inner: R,
    line: usize,
    buf: Vec<u8>,
    done: bool,
}

impl<R: BufRead> LineReader<R> {
    /// Reads lines from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            line: 0,
            buf: Vec::new(),
            done: false,
        }
    }

    /// Number of the last line read (1-based; 0 before the first).
    pub fn line(&self) -> usize {
        self.line
    }

    /// The next line, `None` at the end. After a fatal error, always `None`.
    pub fn next_line(&mut self) -> Option<Result<String, LineError>> {
        if self.done {
            return None;
        }
        self.buf.clear();
        let limit = MAX_LINE_BYTES as u64 + 1;
        let read = (&mut self.inner)
            .take(limit)
            .read_until(b'\n', &mut self.buf);
        let n = match read {
            Ok(n) => n,
            Err(e) => {
                self.done = true;
                return Some(Err(LineError {
                    line: self.line + 1,
                    reason: format!("read error: {e}"),
                    fatal: true,
                }));
            }
        };
        if n == 0 {
            self.done = true;
            return None;
        }
        self.line += 1;
        if self.buf.len() > MAX_LINE_BYTES {
            self.done = true;
            return Some(Err(LineError {
                line: self.line,
                reason: format!(
                    "line longer than {} MiB (binary file or missing line breaks?)",
                    MAX_LINE_BYTES >> 20
                ),
                fatal: true,
            }));
        }
        let first = self.line == 1;
        Some(decode_line(&self.buf, self.line, first).inspect_err(|e| {
            if e.fatal {
                self.done = true;
            }
        }))
    }
}

/// Decodes one physical line. The first line may start with a UTF-8 byte-order mark (removed).
pub fn decode_line(bytes: &[u8], line: usize, first: bool) -> Result<String, LineError> {
    let err = |reason: String, fatal: bool| LineError {
        line,
        reason,
        fatal,
    };
    if first && (bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff])) {
        return Err(err(
            "UTF-16 encoded (byte-order mark at the start): convert the file to UTF-8".into(),
            true,
        ));
    }
    if let Some(col) = bytes.iter().position(|&b| b == 0) {
        return Err(err(
            format!(
                "binary data (NUL byte at column {}): not a UTF-8 text dataset (UTF-16 without byte-order mark?)",
                col + 1
            ),
            true,
        ));
    }
    let bytes = if first {
        bytes.strip_prefix(&[0xef, 0xbb, 0xbf]).unwrap_or(bytes)
    } else {
        bytes
    };
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_string()),
        Err(e) => {
            let at = e.valid_up_to();
            let byte = bytes.get(at).copied().unwrap_or(0);
            let col = std::str::from_utf8(&bytes[..at]).map_or(at, |s| s.chars().count()) + 1;
            Err(err(
                format!(
                    "not valid UTF-8 (byte 0x{byte:02x} at column {col}): the file must be UTF-8 (Latin-1 or Windows-1252?)"
                ),
                false,
            ))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn all(bytes: &[u8]) -> Vec<Result<String, LineError>> {
        let mut r = LineReader::new(bytes);
        std::iter::from_fn(|| r.next_line()).collect()
    }

    #[test]
    fn bom_is_removed_latin1_is_per_line_binary_and_utf16_stop() {
        let l = all(b"\xef\xbb\xbfa,b\ncaf\xe9,1\nok,2");
        assert_eq!(l[0].as_deref().unwrap(), "a,b\n");
        let e = l[1].as_ref().unwrap_err();
        assert_eq!((e.line, e.fatal), (2, false));
        assert!(e.reason.contains("0xe9 at column 4"), "{}", e.reason);
        assert_eq!(l[2].as_deref().unwrap(), "ok,2");
        let l = all(b"\xff\xfea\x00,\x00b\x00\n\x00");
        assert_eq!(l.len(), 1);
        assert!(l[0].as_ref().unwrap_err().reason.contains("UTF-16"));
        let l = all(b"text,label\n\x7fELF\x02\x01\x00\x00\nmore\n");
        assert_eq!(l.len(), 2);
        let e = l[1].as_ref().unwrap_err();
        assert!(e.fatal && e.line == 2 && e.reason.contains("NUL byte at column 7"));
    }
}
