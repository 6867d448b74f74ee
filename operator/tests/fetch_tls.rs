//! Downloads over TLS from a server whose certificate a private CA signed (a mirror inside a
//! company network): trusted with the CA bundle (`finetune-fetch --ca-bundle`, which the
//! operator's `--ca-bundle-config-map` mounts into the download steps), refused without it, and a
//! bundle without a certificate is named. The certificates come from the `openssl` CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use finetune_operator::fetch::{FetchError, RetryPolicy, download};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const BODY: &[u8] = b"ReviewText,SentimentLabel\ngreat,positive\n";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a `localhost` server certificate it signed, in `dir`.
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=finetune test CA",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}

/// An https server on localhost with `dir`'s server certificate; its URL.
fn serve(dir: &Path) -> String {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.crt"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(conn, stream);
            let mut reader = BufReader::new(&mut tls);
            let mut line = String::new();
            // A client that refuses the certificate ends the handshake here.
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                BODY.len()
            );
            let _ = tls.write_all(head.as_bytes());
            let _ = tls.write_all(BODY);
            let _ = tls.flush();
        }
    });
    format!("https://localhost:{port}/data/reviews.csv")
}

fn policy(ca_bundle: Option<PathBuf>) -> RetryPolicy {
    RetryPolicy {
        attempts: 1,
        initial_delay: Duration::from_millis(10),
        timeout: Duration::from_secs(20),
        ca_bundle,
    }
}

#[test]
fn a_private_ca_is_trusted_only_through_the_bundle() {
    let dir = std::env::temp_dir().join(format!("finetune-fetch-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    certificates(&dir);
    let url = serve(&dir);

    let dest = dir.join("trusted.csv");
    let bytes = download(&url, &dest, None, None, &policy(Some(dir.join("ca.crt")))).unwrap();
    assert_eq!(bytes, BODY.len() as u64);
    assert_eq!(std::fs::read(&dest).unwrap(), BODY);

    // The public roots do not know the private CA.
    let err = download(&url, &dir.join("public.csv"), None, None, &policy(None)).unwrap_err();
    assert!(
        matches!(err, FetchError::Transport { .. }) && err.to_string().contains("ertificate"),
        "{err}"
    );
    assert!(!dir.join("public.csv").exists());

    // A bundle without a certificate is named, before any connection.
    std::fs::write(dir.join("empty.pem"), "no certificate here\n").unwrap();
    let err = download(
        &url,
        &dir.join("x.csv"),
        None,
        None,
        &policy(Some(dir.join("empty.pem"))),
    )
    .unwrap_err();
    assert!(
        matches!(err, FetchError::CaBundle { .. }) && err.to_string().contains("empty.pem"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
