//! A streaming CSV reader: RFC 4180 quoting (doubled quotes, embedded newlines), UTF-8 BOM, CRLF,
//! spaces after the separator, and typographic quotes (`“…”`) as a quoting pair, so that a line
//! written by a person such as `“I love this product, it works great!”, Positive` reads as two
//! fields.

use std::io::BufRead;

use crate::text::LineReader;

/// One record with the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// 1-based line number of the record's first line.
    pub line: usize,
    /// Field values, unquoted.
    pub fields: Vec<String>,
}

/// Why a record could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    /// 1-based line number of the record's first line (or of the offending line).
    pub line: usize,
    /// Reason.
    pub reason: String,
    /// Whether the rest of the file cannot be read (binary data, UTF-16, I/O error).
    pub fatal: bool,
}

/// Iterator over the records of a CSV stream.
#[derive(Debug)]
pub struct CsvReader<R> {
    lines: LineReader<R>,
    done: bool,
}

impl<R: BufRead> CsvReader<R> {
    /// Reads records from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            lines: LineReader::new(inner),
            done: false,
        }
    }
}

/// State of the field parser.
#[derive(PartialEq, Eq, Clone, Copy, Debug)]
enum Quote {
    None,
    Ascii,
    Typographic,
}

/// An incremental record parser: fed line by line, so that a quoted field spanning many lines is
/// parsed in linear time (re-parsing the growing record at each line was quadratic).
#[derive(Debug)]
struct RecordParser {
    fields: Vec<String>,
    cur: String,
    quote: Quote,
    was_quoted: bool,
    after_quote: bool,
    /// Whether `cur` holds only whitespace so far (an opening quote may follow).
    blank: bool,
    bytes: usize,
    /// A `"` seen last in a chunk while quoted: doubled or closing, decided by the next chunk.
    pending_quote: bool,
}

impl RecordParser {
    fn new() -> Self {
        Self {
            fields: Vec::new(),
            cur: String::new(),
            quote: Quote::None,
            was_quoted: false,
            after_quote: false,
            blank: true,
            bytes: 0,
            pending_quote: false,
        }
    }

    fn feed(&mut self, text: &str) -> Result<(), String> {
        self.bytes += text.len();
        let mut chars = text.chars().peekable();
        if self.pending_quote {
            self.pending_quote = false;
            if chars.peek() == Some(&'"') {
                self.cur.push('"');
                chars.next();
            } else {
                self.quote = Quote::None;
                self.after_quote = true;
            }
        }
        while let Some(c) = chars.next() {
            match self.quote {
                Quote::Ascii => {
                    if c == '"' {
                        match chars.peek() {
                            Some('"') => {
                                self.cur.push('"');
                                chars.next();
                            }
                            None => self.pending_quote = true,
                            Some(_) => {
                                self.quote = Quote::None;
                                self.after_quote = true;
                            }
                        }
                    } else {
                        self.cur.push(c);
                    }
                }
                Quote::Typographic => {
                    if c == '”' {
                        self.quote = Quote::None;
                        self.after_quote = true;
                    } else {
                        self.cur.push(c);
                    }
                }
                Quote::None => match c {
                    ',' => {
                        self.fields.push(finish(&self.cur, self.was_quoted));
                        self.cur.clear();
                        self.was_quoted = false;
                        self.after_quote = false;
                        self.blank = true;
                    }
                    '"' | '“' if self.blank && !self.was_quoted => {
                        self.cur.clear();
                        self.was_quoted = true;
                        self.quote = if c == '"' {
                            Quote::Ascii
                        } else {
                            Quote::Typographic
                        };
                    }
                    '\r' | '\n' => {}
                    _ if self.after_quote => {
                        if !c.is_whitespace() {
                            return Err(format!("unexpected character {c:?} after closing quote"));
                        }
                    }
                    _ => {
                        if !c.is_whitespace() {
                            self.blank = false;
                        }
                        self.cur.push(c);
                    }
                },
            }
        }
        Ok(())
    }

    /// Whether a quoted field is still open at the end of what was fed (a `"` at the very end
    /// closes it unless more input follows).
    fn open(&self) -> bool {
        self.quote != Quote::None && !self.pending_quote
    }

    fn finish(mut self) -> Vec<String> {
        self.fields.push(finish(&self.cur, self.was_quoted));
        self.fields
    }
}

/// Parses one logical record. Returns `Ok(None)` when a quoted field is still open at the end.
pub fn parse_record(text: &str) -> Result<Option<Vec<String>>, String> {
    let mut p = RecordParser::new();
    p.feed(text)?;
    if p.open() {
        return Ok(None);
    }
    Ok(Some(p.finish()))
}

fn finish(cur: &str, quoted: bool) -> String {
    if quoted {
        cur.to_string()
    } else {
        cur.trim().to_string()
    }
}

/// Longest logical record accepted (guards against an unterminated quote swallowing the file).
pub const MAX_RECORD_BYTES: usize = 16 << 20;

impl<R: BufRead> Iterator for CsvReader<R> {
    type Item = Result<Record, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let fail = |line: usize, reason: String, fatal: bool| RecordError {
            line,
            reason,
            fatal,
        };
        // Skip blank lines.
        let first = loop {
            match self.lines.next_line() {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Err(e)) => {
                    self.done |= e.fatal;
                    return Some(Err(fail(e.line, e.reason, e.fatal)));
                }
                Some(Ok(l)) if l.trim().is_empty() => continue,
                Some(Ok(l)) => break l,
            }
        };
        let start = self.lines.line();
        let mut p = RecordParser::new();
        let mut text = first;
        loop {
            if let Err(reason) = p.feed(&text) {
                return Some(Err(fail(start, reason, false)));
            }
            if !p.open() {
                return Some(Ok(Record {
                    line: start,
                    fields: p.finish(),
                }));
            }
            if p.bytes > MAX_RECORD_BYTES {
                self.done = true;
                return Some(Err(fail(
                    start,
                    format!(
                        "quoted field longer than {} MiB (unterminated quote?)",
                        MAX_RECORD_BYTES >> 20
                    ),
                    true,
                )));
            }
            text = match self.lines.next_line() {
                Some(Ok(l)) => l,
                None => {
                    self.done = true;
                    return Some(Err(fail(
                        start,
                        "unterminated quoted field at end of file".into(),
                        false,
                    )));
                }
                Some(Err(e)) => {
                    self.done |= e.fatal;
                    return Some(Err(fail(
                        e.line,
                        format!("in the record starting on line {start}: {}", e.reason),
                        e.fatal,
                    )));
                }
            };
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn read(s: &str) -> Vec<Result<Record, RecordError>> {
        CsvReader::new(std::io::Cursor::new(s.as_bytes().to_vec())).collect()
    }

    #[test]
    fn design_example_line_with_typographic_quotes() {
        let r = parse_record("“I love this product, it works great!”, Positive")
            .unwrap()
            .unwrap();
        assert_eq!(r, vec!["I love this product, it works great!", "Positive"]);
    }

    #[test]
    fn rfc4180_bom_crlf_embedded_newline_and_doubled_quotes() {
        let text = "\u{feff}ReviewText,SentimentLabel\r\n\"Bad, \"\"really\"\" bad\r\nproduct\",Negative\r\nplain text , Positive\r\n\r\n";
        let recs: Vec<Record> = read(text).into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].fields, vec!["ReviewText", "SentimentLabel"]);
        assert_eq!(
            recs[1].fields,
            vec!["Bad, \"really\" bad\r\nproduct", "Negative"]
        );
        assert_eq!(recs[1].line, 2);
        assert_eq!(recs[2].fields, vec!["plain text", "Positive"]);
        assert_eq!(recs[2].line, 4);
    }

    #[test]
    fn garbage_after_quote_and_unterminated_quote_are_errors() {
        let recs = read("a,b\n\"x\"y,1\n\"open,2\n");
        assert!(recs[1].as_ref().is_err_and(|e| e.line == 2));
        assert!(
            recs[2]
                .as_ref()
                .is_err_and(|e| e.reason.contains("unterminated"))
        );
    }
}
