//! A streaming CSV reader: RFC 4180 quoting (doubled quotes, embedded newlines), UTF-8 BOM, CRLF,
//! spaces after the separator, and typographic quotes (`“…”`) as a quoting pair, so that a line
//! written by a person such as `“I love this product, it works great!”, Positive` reads as two
//! fields.

use std::io::BufRead;

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
    /// 1-based line number of the record's first line.
    pub line: usize,
    /// Reason.
    pub reason: String,
}

/// Iterator over the records of a CSV stream.
#[derive(Debug)]
pub struct CsvReader<R> {
    inner: R,
    line: usize,
    first: bool,
    done: bool,
}

impl<R: BufRead> CsvReader<R> {
    /// Reads records from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            line: 0,
            first: true,
            done: false,
        }
    }

    fn read_line(&mut self, buf: &mut String) -> std::io::Result<bool> {
        let n = self.inner.read_line(buf)?;
        if n == 0 {
            return Ok(false);
        }
        self.line += 1;
        Ok(true)
    }
}

/// State of the field parser.
#[derive(PartialEq, Eq, Clone, Copy)]
enum Quote {
    None,
    Ascii,
    Typographic,
}

/// Parses one logical record. Returns `Ok(None)` when a quoted field is still open at the end.
pub fn parse_record(text: &str) -> Result<Option<Vec<String>>, String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quote = Quote::None;
    let mut was_quoted = false;
    let mut after_quote = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Quote::Ascii => {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        cur.push('"');
                        chars.next();
                    } else {
                        quote = Quote::None;
                        after_quote = true;
                    }
                } else {
                    cur.push(c);
                }
            }
            Quote::Typographic => {
                if c == '”' {
                    quote = Quote::None;
                    after_quote = true;
                } else {
                    cur.push(c);
                }
            }
            Quote::None => match c {
                ',' => {
                    fields.push(finish(&cur, was_quoted));
                    cur.clear();
                    was_quoted = false;
                    after_quote = false;
                }
                '"' | '“' if cur.trim().is_empty() && !was_quoted => {
                    cur.clear();
                    was_quoted = true;
                    quote = if c == '"' {
                        Quote::Ascii
                    } else {
                        Quote::Typographic
                    };
                }
                '\r' | '\n' => {}
                _ if after_quote => {
                    if !c.is_whitespace() {
                        return Err(format!("unexpected character {c:?} after closing quote"));
                    }
                }
                _ => cur.push(c),
            },
        }
    }
    if quote != Quote::None {
        return Ok(None);
    }
    fields.push(finish(&cur, was_quoted));
    Ok(Some(fields))
}

fn finish(cur: &str, quoted: bool) -> String {
    if quoted {
        cur.to_string()
    } else {
        cur.trim().to_string()
    }
}

/// Longest logical record accepted (guards against an unterminated quote swallowing the file).
const MAX_RECORD_BYTES: usize = 1 << 20;

impl<R: BufRead> Iterator for CsvReader<R> {
    type Item = Result<Record, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut buf = String::new();
        loop {
            buf.clear();
            match self.read_line(&mut buf) {
                Ok(false) => {
                    self.done = true;
                    return None;
                }
                Ok(true) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(RecordError {
                        line: self.line + 1,
                        reason: e.to_string(),
                    }));
                }
            }
            if self.first {
                self.first = false;
                if let Some(rest) = buf.strip_prefix('\u{feff}') {
                    buf = rest.to_string();
                }
            }
            if !buf.trim().is_empty() {
                break;
            }
        }
        let start = self.line;
        loop {
            match parse_record(&buf) {
                Ok(Some(fields)) => {
                    return Some(Ok(Record {
                        line: start,
                        fields,
                    }));
                }
                Err(reason) => {
                    return Some(Err(RecordError {
                        line: start,
                        reason,
                    }));
                }
                Ok(None) => {
                    if buf.len() > MAX_RECORD_BYTES {
                        self.done = true;
                        return Some(Err(RecordError {
                            line: start,
                            reason: "unterminated quoted field".into(),
                        }));
                    }
                    match self.read_line(&mut buf) {
                        Ok(true) => {}
                        Ok(false) => {
                            self.done = true;
                            return Some(Err(RecordError {
                                line: start,
                                reason: "unterminated quoted field at end of file".into(),
                            }));
                        }
                        Err(e) => {
                            self.done = true;
                            return Some(Err(RecordError {
                                line: start,
                                reason: e.to_string(),
                            }));
                        }
                    }
                }
            }
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
