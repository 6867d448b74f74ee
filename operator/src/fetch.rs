//! Downloads for the init steps of trainer pods: one file from a URL, or a model repository
//! from a Hugging Face-style hub (`{endpoint}/api/models/{repo}/revision/{rev}` lists files,
//! `{endpoint}/{repo}/resolve/{rev}/{file}` serves them). Transfers resume where a broken one
//! stopped (HTTP Range), are retried with backoff, verified against SHA-256 checksums when known,
//! and land atomically (temporary file, fsync, rename). The hub token is sent only as a bearer
//! header and never appears in errors or logs.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The server refused the credentials or needs some (gated repository).
    #[error(
        "{url}: HTTP {status}: access denied; the repository may be gated: set spec.model.tokenSecretRef to a Secret holding a token that may read it"
    )]
    Unauthorized {
        /// The URL (without credentials).
        url: String,
        /// HTTP status.
        status: u16,
    },
    /// The file or revision does not exist.
    #[error("{url}: HTTP 404: not found (check the repository name and revision)")]
    NotFound {
        /// The URL.
        url: String,
    },
    /// Any other HTTP status after all retries.
    #[error("{url}: HTTP {status} after {attempts} attempts")]
    Status {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Attempts made.
        attempts: u32,
    },
    /// Network failure after all retries.
    #[error("{url}: {message} after {attempts} attempts")]
    Transport {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The downloaded bytes do not match the expected checksum.
    #[error("{path}: SHA-256 {actual} does not match the expected {expected}")]
    Checksum {
        /// The file.
        path: String,
        /// Expected digest.
        expected: String,
        /// Actual digest.
        actual: String,
    },
    /// The hub's file listing could not be understood.
    #[error("{0}")]
    Listing(String),
    /// The CA bundle to trust could not be used.
    #[error("CA bundle {path}: {message}")]
    CaBundle {
        /// The bundle file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// Local file system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// How often and how patiently to retry, and whom to trust.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts per file.
    pub attempts: u32,
    /// Delay before the second attempt; doubles afterwards.
    pub initial_delay: Duration,
    /// Limit of one whole transfer.
    pub timeout: Duration,
    /// PEM certificates trusted instead of the public roots (a private mirror's or object
    /// store's CA); the public roots when `None`.
    pub ca_bundle: Option<PathBuf>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            initial_delay: Duration::from_millis(500),
            timeout: Duration::from_secs(3600),
            ca_bundle: None,
        }
    }
}

fn agent(policy: &RetryPolicy) -> Result<ureq::Agent, FetchError> {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_global(Some(policy.timeout));
    if let Some(path) = &policy.ca_bundle {
        let roots = ureq::tls::RootCerts::new_with_certs(&ca_certificates(path)?);
        config = config.tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build());
    }
    Ok(ureq::Agent::new_with_config(config.build()))
}

/// The certificates of a PEM bundle; an error when it holds none.
fn ca_certificates(path: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>, FetchError> {
    let bad = |message: String| FetchError::CaBundle {
        path: path.display().to_string(),
        message,
    };
    let pem = fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(c) = item.map_err(|e| bad(e.to_string()))? {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn strip_credentials(url: &str) -> String {
    url.split('?').next().unwrap_or(url).to_string()
}

/// Downloads `url` to `dest`, resuming a previous partial transfer, retrying transient failures
/// and verifying `sha256` when given. Returns the file size.
pub fn download(
    url: &str,
    dest: &Path,
    sha256: Option<&str>,
    token: Option<&str>,
    policy: &RetryPolicy,
) -> Result<u64, FetchError> {
    if let (Some(expected), true) = (sha256, dest.exists())
        && sha256_file(dest)? == expected.to_ascii_lowercase()
    {
        return Ok(fs::metadata(dest).map_err(io_err(dest))?.len());
    }
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let part = PathBuf::from(format!("{}.part", dest.display()));
    let agent = agent(policy)?;
    let shown = strip_credentials(url);
    let mut delay = policy.initial_delay;
    let mut last = String::new();
    for attempt in 1..=policy.attempts {
        if attempt > 1 {
            std::thread::sleep(delay);
            delay = delay.saturating_mul(2);
        }
        let have = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        let mut req = agent.get(url);
        if have > 0 {
            req = req.header("Range", &format!("bytes={have}-"));
        }
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = match req.call() {
            Ok(r) => r,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let status = resp.status().as_u16();
        match status {
            401 | 403 => return Err(FetchError::Unauthorized { url: shown, status }),
            404 => return Err(FetchError::NotFound { url: shown }),
            200 | 206 => {}
            416 if have > 0 => {
                // The partial file is already complete (or bogus): start over unless it verifies.
                if sha256.is_none() {
                    break;
                }
                fs::remove_file(&part).map_err(io_err(&part))?;
                continue;
            }
            s if s >= 500 || s == 429 || s == 408 => {
                last = format!("HTTP {s}");
                continue;
            }
            s => {
                return Err(FetchError::Status {
                    url: shown,
                    status: s,
                    attempts: attempt,
                });
            }
        }
        let append = status == 206;
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&part)
            .map_err(io_err(&part))?;
        let already = if append { have } else { 0 };
        let length = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let name = dest
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let mut bar = finetune_api::console::ProgressBar::new(
            format!("download {name}"),
            "bytes",
            length.map_or(0, |l| l + already),
        )
        .resumed_at(already);
        let mut written = already;
        let mut reader = resp.body_mut().as_reader();
        let mut buf = vec![0u8; 1 << 16];
        let complete = loop {
            match reader.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => {
                    file.write_all(&buf[..n]).map_err(io_err(&part))?;
                    written += n as u64;
                    if length.is_some() {
                        bar.set(written, "");
                    }
                }
                Err(e) => {
                    last = format!("transfer broke: {e}");
                    break false;
                }
            }
        };
        file.sync_all().map_err(io_err(&part))?;
        if complete {
            return finish(&part, dest, sha256);
        }
    }
    if part.exists() && last.is_empty() {
        return finish(&part, dest, sha256);
    }
    Err(FetchError::Transport {
        url: shown,
        message: last,
        attempts: policy.attempts,
    })
}

fn finish(part: &Path, dest: &Path, sha256: Option<&str>) -> Result<u64, FetchError> {
    if let Some(expected) = sha256 {
        let actual = sha256_file(part)?;
        if actual != expected.to_ascii_lowercase() {
            let _ = fs::remove_file(part);
            return Err(FetchError::Checksum {
                path: dest.display().to_string(),
                expected: expected.into(),
                actual,
            });
        }
    }
    fs::rename(part, dest).map_err(io_err(dest))?;
    if let Some(dir) = dest.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(fs::metadata(dest).map_err(io_err(dest))?.len())
}

/// Files of a model repository the trainer needs.
pub fn wanted(file: &str) -> bool {
    file.ends_with(".safetensors")
        || matches!(
            file,
            "config.json"
                | "generation_config.json"
                | "tokenizer.json"
                | "tokenizer_config.json"
                | "special_tokens_map.json"
                | "model.safetensors.index.json"
        )
}

/// What [`download_hf_repo`] fetched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubSnapshot {
    /// The commit the revision resolved to (the listing's `sha`; the revision itself when a
    /// mirror does not say).
    pub commit: String,
    /// The files downloaded, in listing order.
    pub files: Vec<String>,
}

/// Downloads the files of `repo` at `revision` that the trainer needs into `dest`. The listing
/// is the Hub's `GET /api/models/{repo}/revision/{revision}?blobs=true` (only with `blobs=true`
/// does the Hub include each LFS file's SHA-256, which every weight file is verified against);
/// its `sha` is the commit the revision resolved to, and every file is fetched from that commit,
/// so a branch that moves during the download cannot mix two versions. The commit is recorded
/// beside the weights ([`finetune_api::ModelSource`]).
pub fn download_hf_repo(
    endpoint: &str,
    repo: &str,
    revision: &str,
    dest: &Path,
    token: Option<&str>,
    policy: &RetryPolicy,
) -> Result<HubSnapshot, FetchError> {
    let endpoint = endpoint.trim_end_matches('/');
    let listing_url = format!("{endpoint}/api/models/{repo}/revision/{revision}?blobs=true");
    let listing_file = dest.join(".listing.json");
    let _ = fs::remove_file(&listing_file);
    download(&listing_url, &listing_file, None, token, policy)?;
    let text = fs::read_to_string(&listing_file).map_err(io_err(&listing_file))?;
    let _ = fs::remove_file(&listing_file);
    let listing: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| FetchError::Listing(format!("{listing_url}: not JSON: {e}")))?;
    let siblings = listing["siblings"]
        .as_array()
        .ok_or_else(|| FetchError::Listing(format!("{listing_url}: no `siblings` list")))?;
    let commit = match listing["sha"].as_str() {
        Some(sha) if is_commit(sha) => sha.to_string(),
        Some(other) => {
            return Err(FetchError::Listing(format!(
                "{listing_url}: `sha` {other:?} is not a commit hash"
            )));
        }
        None => revision.to_string(),
    };
    let mut files = Vec::new();
    for s in siblings {
        let Some(name) = s["rfilename"].as_str() else {
            continue;
        };
        if !wanted(name) || name.contains("..") || name.starts_with('/') {
            continue;
        }
        let sha = s["lfs"]["sha256"].as_str();
        if name.ends_with(".safetensors") && sha.is_none() {
            return Err(FetchError::Listing(format!(
                "{listing_url}: {name} has no `lfs.sha256`: weights are only downloaded with a \
                 checksum to verify"
            )));
        }
        let url = format!("{endpoint}/{repo}/resolve/{commit}/{name}");
        download(&url, &dest.join(name), sha, token, policy)?;
        files.push(name.to_string());
    }
    if !files.iter().any(|f| f == "config.json")
        || !files.iter().any(|f| f.ends_with(".safetensors"))
    {
        return Err(FetchError::Listing(format!(
            "{repo}@{revision} has no config.json or safetensors weights (found {files:?})"
        )));
    }
    let source = finetune_api::ModelSource {
        repo: repo.into(),
        revision: revision.into(),
        commit: commit.clone(),
    };
    let path = dest.join(finetune_api::ModelSource::FILE);
    let text = serde_json::to_string(&source)
        .map_err(|e| FetchError::Listing(format!("{}: {e}", path.display())))?;
    fs::write(&path, text).map_err(io_err(&path))?;
    Ok(HubSnapshot { commit, files })
}

/// A full hexadecimal commit hash (40 characters; 64 for SHA-256 repositories).
fn is_commit(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}
