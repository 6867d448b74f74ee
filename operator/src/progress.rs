//! Polls a trainer's `/progress` document over plain HTTP on the pod IP. The trainer has no
//! Kubernetes credentials, so this is how the operator learns how far a run is.

use std::time::Duration;

use finetune_api::TrainerProgress;
use finetune_api::progress::{PROGRESS_PATH, TRAINER_METRICS_PORT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest progress document accepted.
const MAX_BODY: usize = 64 * 1024;

/// Fetches and parses `http://{ip}:{port}/progress`, with a timeout. `None` on any failure (the
/// trainer may still be loading; the caller simply tries again later).
pub async fn fetch(ip: &str, port: Option<u16>, timeout: Duration) -> Option<TrainerProgress> {
    let port = port.unwrap_or(TRAINER_METRICS_PORT);
    let body = tokio::time::timeout(timeout, get(ip, port, PROGRESS_PATH))
        .await
        .ok()??;
    serde_json::from_str(&body).ok()
}

/// A minimal HTTP/1.1 GET returning the body of a 200 response.
pub async fn get(ip: &str, port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect((ip, port)).await.ok()?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nConnection: close\r\nAccept: application/json\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    stream
        .take(MAX_BODY as u64 + 4096)
        .read_to_end(&mut buf)
        .await
        .ok()?;
    let text = String::from_utf8(buf).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status_ok = head
        .lines()
        .next()
        .is_some_and(|l| l.split_whitespace().nth(1) == Some("200"));
    if !status_ok {
        return None;
    }
    if head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    }) {
        return Some(dechunk(body));
    }
    Some(body.to_string())
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn reads_a_progress_document() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let body =
                    r#"{"phase":"training","step":5,"totalSteps":10,"epoch":1,"trainLoss":1.5}"#;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        let p = fetch("127.0.0.1", Some(port), Duration::from_secs(5)).await;
        let p = p.unwrap_or_else(|| panic!("no progress"));
        assert_eq!((p.step, p.total_steps, p.train_loss), (5, 10, Some(1.5)));
    }

    #[tokio::test]
    async fn a_closed_port_gives_none() {
        assert!(
            fetch("127.0.0.1", Some(1), Duration::from_secs(2))
                .await
                .is_none()
        );
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n"), "abcdef");
    }
}
