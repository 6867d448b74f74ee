//! Parsing of the `source` URIs used by models and datasets, with the safety checks that keep a
//! path inside its volume.
//!
//! Accepted forms:
//! - `hf://org/name[@revision]`: a Hugging Face Hub repository (models only);
//! - `pvc://claim/path/inside/the/claim`: a file or directory on an existing PersistentVolumeClaim;
//! - `configmap://name/key`: one key of a ConfigMap in the job's namespace (small datasets);
//! - `https://host/path`: a file downloaded by an init step (datasets only).

use std::fmt;

/// Longest accepted source URI.
pub const MAX_SOURCE_LEN: usize = 2048;

/// A parsed source URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A repository on the Hugging Face Hub.
    HuggingFace {
        /// Organisation or user.
        org: String,
        /// Repository name.
        name: String,
        /// Branch, tag or commit; `main` when absent.
        revision: Option<String>,
    },
    /// A path inside an existing PersistentVolumeClaim.
    Pvc {
        /// Claim name.
        claim: String,
        /// Relative path inside the claim (never absolute, never with `..`).
        path: String,
    },
    /// A key of a ConfigMap.
    ConfigMap {
        /// ConfigMap name.
        name: String,
        /// Key inside the ConfigMap.
        key: String,
    },
    /// An `https://` URL.
    Https {
        /// The whole URL.
        url: String,
    },
}

/// Why a source URI was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The URI is longer than [`MAX_SOURCE_LEN`].
    #[error("is {0} characters long; at most {MAX_SOURCE_LEN} are allowed")]
    TooLong(usize),
    /// The scheme is not one this field accepts.
    #[error("must start with one of {allowed}; got {got:?}")]
    Scheme {
        /// Schemes accepted here.
        allowed: &'static str,
        /// The start of what was given.
        got: String,
    },
    /// A component is malformed.
    #[error("{0}")]
    Malformed(String),
}

/// Which kind of object a source is for (models and datasets accept different schemes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// `spec.model.source`: `hf://` or `pvc://`.
    Model,
    /// `spec.dataset.source` and retention data: `pvc://`, `configmap://` or `https://`.
    Dataset,
}

impl SourceKind {
    fn allowed(self) -> &'static str {
        match self {
            SourceKind::Model => "hf://, pvc://",
            SourceKind::Dataset => "pvc://, configmap://, https://",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::HuggingFace {
                org,
                name,
                revision: Some(r),
            } => write!(f, "hf://{org}/{name}@{r}"),
            Source::HuggingFace {
                org,
                name,
                revision: None,
            } => write!(f, "hf://{org}/{name}"),
            Source::Pvc { claim, path } => write!(f, "pvc://{claim}/{path}"),
            Source::ConfigMap { name, key } => write!(f, "configmap://{name}/{key}"),
            Source::Https { url } => f.write_str(url),
        }
    }
}

impl Source {
    /// Parses and checks a source URI for the given kind of object.
    pub fn parse(uri: &str, kind: SourceKind) -> Result<Source, SourceError> {
        if uri.len() > MAX_SOURCE_LEN {
            return Err(SourceError::TooLong(uri.len()));
        }
        if uri.chars().any(char::is_control) {
            return Err(SourceError::Malformed(
                "contains a control character (NUL, newline, ...)".into(),
            ));
        }
        let scheme_error = || SourceError::Scheme {
            allowed: kind.allowed(),
            got: uri.chars().take(16).collect(),
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(scheme_error)?;
        match (scheme, kind) {
            ("hf", SourceKind::Model) => parse_hf(rest),
            ("pvc", _) => {
                let (claim, path) = split_name(rest, "claim name")?;
                check_relative_path(path)?;
                Ok(Source::Pvc {
                    claim: claim.into(),
                    path: path.into(),
                })
            }
            ("configmap", SourceKind::Dataset) => {
                let (name, key) = split_name(rest, "ConfigMap name")?;
                if key.is_empty()
                    || key.len() > 253
                    || !key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
                {
                    return Err(SourceError::Malformed(format!(
                        "ConfigMap key {key:?} must be 1-253 characters of [-._a-zA-Z0-9]"
                    )));
                }
                Ok(Source::ConfigMap {
                    name: name.into(),
                    key: key.into(),
                })
            }
            ("https", SourceKind::Dataset) => {
                check_https(rest)?;
                Ok(Source::Https { url: uri.into() })
            }
            _ => Err(scheme_error()),
        }
    }
}

/// Checks the part of an `https://` URL after the scheme: a DNS host name (no credentials, no IP
/// literal, no `localhost`: the fetch step must not be pointed at the node's or the cluster's
/// internal endpoints), an optional port, and a path without traversal, encoded or not.
fn check_https(rest: &str) -> Result<(), SourceError> {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        return Err(SourceError::Malformed(
            "https URL needs a host and must not carry credentials (user@host)".into(),
        ));
    }
    let (host, port) = if authority.starts_with('[') {
        return Err(SourceError::Malformed(format!(
            "https URL host {authority:?} is an IP literal; use a DNS name"
        )));
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if let Some(p) = port
        && !p.parse::<u16>().is_ok_and(|p| p != 0)
    {
        return Err(SourceError::Malformed(format!(
            "https URL port {p:?} must be a number in 1..=65535"
        )));
    }
    let lower = host.to_ascii_lowercase();
    if !is_dns_subdomain(lower.strip_suffix('.').unwrap_or(&lower)) {
        return Err(SourceError::Malformed(format!(
            "https URL host {host:?} must be a DNS name (letters, digits, '-', '.')"
        )));
    }
    if lower
        .split('.')
        .all(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(SourceError::Malformed(format!(
            "https URL host {host:?} is an IP literal; use a DNS name"
        )));
    }
    if lower == "localhost" || lower.ends_with(".localhost") {
        return Err(SourceError::Malformed(
            "https URL host must not be localhost".into(),
        ));
    }
    let path = &rest[authority.len()..];
    let path_only = path.split(['?', '#']).next().unwrap_or_default();
    if path.contains('\\') || has_encoded_traversal(path) {
        return Err(SourceError::Malformed(format!(
            "https URL path {path_only:?} must not contain backslashes or percent-encoded '.', '/', '\\', '%' or NUL"
        )));
    }
    if path_only.split('/').any(|seg| seg == "..") {
        return Err(SourceError::Malformed(format!(
            "https URL path {path_only:?} must not contain '..' segments"
        )));
    }
    Ok(())
}

/// Whether `s` holds a percent-encoded `.`, `/`, `\` or NUL (`%2e`, `%2f`, `%5c`, `%00`, any
/// case): encoded traversal that a later decoding step could turn into `..` or `/`.
fn has_encoded_traversal(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    ["%2e", "%2f", "%5c", "%00", "%25"]
        .iter()
        .any(|seq| lower.contains(seq))
}

fn parse_hf(rest: &str) -> Result<Source, SourceError> {
    let (repo, revision) = match rest.split_once('@') {
        Some((repo, rev)) => (repo, Some(rev)),
        None => (rest, None),
    };
    let (org, name) = repo.split_once('/').ok_or_else(|| {
        SourceError::Malformed(format!(
            "hf:// source must be hf://org/name[@revision]; got {rest:?}"
        ))
    })?;
    let hub_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && !s.starts_with(['.', '-'])
            && !s.contains("..")
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
    };
    if !hub_name(org) || !hub_name(name) {
        return Err(SourceError::Malformed(format!(
            "hf:// organisation and name must be 1-96 characters of [-._a-zA-Z0-9]; got {repo:?}"
        )));
    }
    if let Some(rev) = revision
        && (rev.is_empty()
            || rev.len() > 128
            || rev.contains("..")
            || !rev
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._/".contains(c)))
    {
        return Err(SourceError::Malformed(format!(
            "revision {rev:?} must be 1-128 characters of [-._/a-zA-Z0-9] without '..'"
        )));
    }
    Ok(Source::HuggingFace {
        org: org.into(),
        name: name.into(),
        revision: revision.map(Into::into),
    })
}

fn split_name<'a>(rest: &'a str, what: &str) -> Result<(&'a str, &'a str), SourceError> {
    let (name, tail) = rest.split_once('/').unwrap_or((rest, ""));
    if !is_dns_subdomain(name) {
        return Err(SourceError::Malformed(format!(
            "{what} {name:?} must be a DNS subdomain (lowercase letters, digits, '-', '.')"
        )));
    }
    Ok((name, tail))
}

/// Whether `s` is a valid Kubernetes object name (RFC 1123 subdomain).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Checks that a path stays inside the directory it is relative to: not absolute, no `..`, no
/// empty or `.` segments except a trailing slash, no control characters, no backslashes.
pub fn check_relative_path(path: &str) -> Result<(), SourceError> {
    if path.is_empty() {
        return Err(SourceError::Malformed(
            "path inside the volume is empty".into(),
        ));
    }
    if path.starts_with('/') {
        return Err(SourceError::Malformed(format!(
            "path {path:?} must be relative to the volume"
        )));
    }
    if path.contains('\\') || path.chars().any(char::is_control) {
        return Err(SourceError::Malformed(format!(
            "path {path:?} must not contain backslashes or control characters"
        )));
    }
    if has_encoded_traversal(path) {
        return Err(SourceError::Malformed(format!(
            "path {path:?} must not contain percent-encoded '.', '/', '\\' '%' or NUL (%2e, %2f, %5c, %25, %00)"
        )));
    }
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    if trimmed
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(SourceError::Malformed(format!(
            "path {path:?} must not contain '..', '.' or empty segments (it must stay inside the volume)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_forms() {
        let ok = [
            ("hf://meta-llama/Llama-2-7b-hf", SourceKind::Model),
            ("hf://meta-llama/Llama-2-7b-hf@main", SourceKind::Model),
            ("pvc://models/llama-2-7b", SourceKind::Model),
            ("pvc://datasets/amazon/reviews.csv", SourceKind::Dataset),
            ("pvc://datasets/a..b/c.d.csv", SourceKind::Dataset),
            (
                "https://Data.Example.com:8443/r.csv#frag",
                SourceKind::Dataset,
            ),
            ("configmap://reviews/reviews.csv", SourceKind::Dataset),
            (
                "https://example.com/data/reviews.csv?x=1",
                SourceKind::Dataset,
            ),
        ];
        for (uri, kind) in ok {
            let parsed = Source::parse(uri, kind);
            assert!(parsed.is_ok(), "{uri}: {parsed:?}");
            assert_eq!(parsed.map(|s| s.to_string()).ok().as_deref(), Some(uri));
        }
    }

    #[test]
    fn refuses_escapes_and_wrong_schemes() {
        let bad = [
            ("pvc://data/../etc/passwd", SourceKind::Dataset, "'..'"),
            (
                "pvc://data//etc",
                SourceKind::Dataset,
                "relative to the volume",
            ),
            ("pvc://data/a//b", SourceKind::Dataset, "empty segments"),
            ("pvc://data/a/./b", SourceKind::Dataset, "'.'"),
            ("pvc://data/a\0b", SourceKind::Dataset, "control character"),
            ("pvc://Data/x", SourceKind::Dataset, "DNS subdomain"),
            ("pvc://data", SourceKind::Dataset, "empty"),
            (
                "http://example.com/x.csv",
                SourceKind::Dataset,
                "must start with",
            ),
            (
                "https://user:pw@example.com/x.csv",
                SourceKind::Dataset,
                "credentials",
            ),
            (
                "hf://meta-llama/Llama-2-7b-hf",
                SourceKind::Dataset,
                "must start with",
            ),
            (
                "https://example.com/m",
                SourceKind::Model,
                "must start with",
            ),
            ("hf://justaname", SourceKind::Model, "hf://org/name"),
            ("hf://org/name@../x", SourceKind::Model, "revision"),
            ("file:///etc/passwd", SourceKind::Model, "must start with"),
            ("configmap://cm/", SourceKind::Dataset, "ConfigMap key"),
            (
                "pvc://data/%2e%2e/etc",
                SourceKind::Dataset,
                "percent-encoded",
            ),
            ("pvc://data/a%2Fb", SourceKind::Dataset, "percent-encoded"),
            (
                "pvc://data/%252e%252e/x",
                SourceKind::Dataset,
                "percent-encoded",
            ),
            ("pvc://data/a\\..\\b", SourceKind::Dataset, "backslashes"),
            ("pvc://data/..", SourceKind::Dataset, "'..'"),
            ("pvc://data/a/../../b", SourceKind::Dataset, "'..'"),
            (
                "https://e.com/a/../../b",
                SourceKind::Dataset,
                "'..' segments",
            ),
            (
                "https://e.com/%2e%2e/x",
                SourceKind::Dataset,
                "percent-encoded",
            ),
            ("https://e.com/a\\b", SourceKind::Dataset, "backslashes"),
            ("https://user@e.com/x", SourceKind::Dataset, "credentials"),
            (
                "https://169.254.169.254/latest",
                SourceKind::Dataset,
                "IP literal",
            ),
            ("https://10.0.0.1:8443/x", SourceKind::Dataset, "IP literal"),
            ("https://[::1]/x", SourceKind::Dataset, "IP literal"),
            ("https://localhost/x", SourceKind::Dataset, "localhost"),
            ("https://e.com:0/x", SourceKind::Dataset, "port"),
            ("https://e.com:99999/x", SourceKind::Dataset, "port"),
            ("https://e_x.com/x", SourceKind::Dataset, "DNS name"),
            ("https:///x", SourceKind::Dataset, "needs a host"),
            ("HTTPS://e.com/x", SourceKind::Dataset, "must start with"),
            ("ftp://e.com/x", SourceKind::Dataset, "must start with"),
            ("pvc://data/a\nb", SourceKind::Dataset, "control character"),
        ];
        for (uri, kind, needle) in bad {
            match Source::parse(uri, kind) {
                Ok(s) => panic!("{uri:?} was accepted as {s:?}"),
                Err(e) => assert!(e.to_string().contains(needle), "{uri:?}: {e}"),
            }
        }
        assert!(matches!(
            Source::parse(
                &format!("https://e.com/{}", "a".repeat(3000)),
                SourceKind::Dataset
            ),
            Err(SourceError::TooLong(_))
        ));
    }
}
