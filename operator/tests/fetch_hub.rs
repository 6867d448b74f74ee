//! The download step against a local server that serves a tiny model in the hub's URL layout:
//! a public repository, a gated one that needs the token, and a transfer that breaks halfway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use finetune_operator::fetch::{FetchError, RetryPolicy, download, download_hf_repo, sha256_file};
use sha2::{Digest, Sha256};

const TOKEN: &str = "hf_sentinel_TOKEN_do_not_log";
/// The commit the fake hub resolves every revision to.
const COMMIT: &str = "4b2a0c9e1d7f3a5b6c8d0e2f4a6b8c0d1e3f5a7b";

struct Hub {
    endpoint: String,
    weight_requests: Arc<AtomicUsize>,
}

fn weights() -> Vec<u8> {
    (0..200_000u32).map(|i| (i % 251) as u8).collect()
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn serve(mut stream: TcpStream, weight_requests: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (mut auth, mut range) = (None, None);
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("authorization:") {
            auth = Some(line[14..].trim().to_string());
        }
        if lower.starts_with("range: bytes=") {
            range = line.trim()[13..]
                .trim_end_matches('-')
                .parse::<usize>()
                .ok();
        }
    }
    let w = weights();
    // The Hub's shape: LFS checksums only with `blobs=true`, the resolved commit as `sha`.
    let listing = |repo: &str, blobs: bool| {
        let lfs = format!(r#","lfs":{{"sha256":"{}","size":{}}}"#, hex(&w), w.len());
        format!(
            r#"{{"id":"{repo}","sha":"{COMMIT}","siblings":[{{"rfilename":"config.json"}},{{"rfilename":"tokenizer.json"}},{{"rfilename":"README.md"}},{{"rfilename":"model.safetensors"{}}}]}}"#,
            if blobs { lfs.as_str() } else { "" }
        )
    };
    if path.contains("/resolve/") && !path.contains(&format!("/resolve/{COMMIT}/")) {
        // Only the resolved commit is served: a download by branch name would fail here.
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    }
    let gated = path.contains("/org/gated") || path.starts_with("/org/gated");
    if gated && auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
        let _ = stream.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        return;
    }
    let body: Vec<u8> = match path.as_str() {
        p if p.starts_with("/api/models/org/") => {
            // `org/mirror` stands for a mirror that never lists checksums.
            let repo = p.split('/').nth(4).unwrap_or("");
            listing(repo, p.contains("blobs=true") && repo != "mirror").into_bytes()
        }
        p if p.ends_with("/config.json") => br#"{"hidden_size":64}"#.to_vec(),
        p if p.ends_with("/tokenizer.json") => br#"{"model":{}}"#.to_vec(),
        p if p.ends_with("/model.safetensors") => {
            let n = weight_requests.fetch_add(1, Ordering::SeqCst);
            if n == 0 {
                // Announce the whole file, send half, then drop the connection.
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    w.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&w[..w.len() / 2]);
                let _ = stream.flush();
                return;
            }
            if let Some(from) = range {
                let rest = &w[from..];
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\nConnection: close\r\n\r\n",
                    rest.len(),
                    w.len() - 1,
                    w.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(rest);
                return;
            }
            w.clone()
        }
        _ => {
            let _ = stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            return;
        }
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
}

fn hub() -> Hub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let weight_requests = Arc::new(AtomicUsize::new(0));
    let counter = weight_requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            serve(stream, &counter);
        }
    });
    Hub {
        endpoint,
        weight_requests,
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        attempts: 4,
        initial_delay: Duration::from_millis(50),
        timeout: Duration::from_secs(30),
        ca_bundle: None,
    }
}

#[test]
fn a_broken_transfer_resumes_and_verifies() {
    let hub = hub();
    let dir = tempdir();
    let snapshot =
        download_hf_repo(&hub.endpoint, "org/tiny", "main", &dir, None, &policy()).unwrap();
    assert_eq!(
        snapshot.files,
        vec!["config.json", "tokenizer.json", "model.safetensors"],
        "README is skipped"
    );
    assert_eq!(
        snapshot.commit, COMMIT,
        "the revision resolved to its commit"
    );
    let source: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(finetune_api::ModelSource::FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(
        source,
        serde_json::json!({"repo": "org/tiny", "revision": "main", "commit": COMMIT})
    );
    assert_eq!(
        sha256_file(&dir.join("model.safetensors")).unwrap(),
        hex(&weights())
    );
    assert_eq!(
        hub.weight_requests.load(Ordering::SeqCst),
        2,
        "one broken transfer, one resumed"
    );
    assert!(!dir.join("model.safetensors.part").exists());
}

#[test]
fn a_gated_model_needs_the_token_and_never_prints_it() {
    let hub = hub();
    let dir = tempdir();
    let err =
        download_hf_repo(&hub.endpoint, "org/gated", "main", &dir, None, &policy()).unwrap_err();
    assert!(
        matches!(err, FetchError::Unauthorized { status: 401, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("tokenSecretRef"), "{err}");
    let wrong = download_hf_repo(
        &hub.endpoint,
        "org/gated",
        "main",
        &dir,
        Some("wrong"),
        &policy(),
    )
    .unwrap_err();
    assert!(!wrong.to_string().contains("wrong"));
    let files = download_hf_repo(
        &hub.endpoint,
        "org/gated",
        "main",
        &dir,
        Some(TOKEN),
        &policy(),
    )
    .unwrap();
    assert_eq!(files.files.len(), 3);
}

#[test]
fn weights_without_a_listed_checksum_are_not_downloaded() {
    let hub = hub();
    let dir = tempdir();
    let err =
        download_hf_repo(&hub.endpoint, "org/mirror", "main", &dir, None, &policy()).unwrap_err();
    assert!(
        matches!(err, FetchError::Listing(_)) && err.to_string().contains("lfs.sha256"),
        "{err}"
    );
    assert_eq!(hub.weight_requests.load(Ordering::SeqCst), 0);
    assert!(!dir.join("model.safetensors").exists());
}

#[test]
fn a_checksum_mismatch_is_refused() {
    let hub = hub();
    let dir = tempdir();
    let url = format!("{}/org/tiny/resolve/{COMMIT}/config.json", hub.endpoint);
    let err = download(
        &url,
        &dir.join("config.json"),
        Some(&"0".repeat(64)),
        None,
        &policy(),
    )
    .unwrap_err();
    assert!(matches!(err, FetchError::Checksum { .. }), "{err}");
    assert!(
        !dir.join("config.json").exists(),
        "nothing half-verified is left behind"
    );
}

#[test]
fn a_missing_revision_is_named() {
    let hub = hub();
    let url = format!("{}/org/tiny/resolve/{COMMIT}/nope.bin", hub.endpoint);
    let err = download(&url, &tempdir().join("x"), None, None, &policy()).unwrap_err();
    assert!(matches!(err, FetchError::NotFound { .. }), "{err}");
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "finetune-fetch-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
