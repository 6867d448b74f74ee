//! A counting TCP proxy to put in front of the API server: every client connection is forwarded
//! byte for byte (TLS passes through untouched) and its time of arrival recorded, so a test can
//! measure how hard a client (the operator) knocks while the API server is down or frozen.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};

use crate::{Error, Result};

#[derive(Debug, Default)]
struct Log {
    accepted: Vec<Instant>,
    upstream_failed: Vec<Instant>,
}

/// A running proxy; dropping it stops accepting (open connections end with their peers).
#[derive(Debug)]
pub struct CountingProxy {
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::io("bind proxy", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("proxy address", e))?;
        let log = Arc::new(Mutex::new(Log::default()));
        let task_log = log.clone();
        let task = tokio::spawn(async move {
            loop {
                // An accept error (e.g. out of file descriptors) must not end the proxy: every
                // later connection would hang in its TLS handshake, which reads as an operator
                // that cannot reconnect.
                let mut client = match listener.accept().await {
                    Ok((client, _)) => client,
                    Err(_) => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                lock(&task_log).accepted.push(Instant::now());
                let log = task_log.clone();
                tokio::spawn(async move {
                    match TcpStream::connect(upstream).await {
                        Ok(mut server) => {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                        Err(_) => lock(&log).upstream_failed.push(Instant::now()),
                    }
                });
            }
        });
        Ok(CountingProxy { addr, log, task })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted in `[from, to)`.
    pub fn accepted_between(&self, from: Instant, to: Instant) -> usize {
        lock(&self.log)
            .accepted
            .iter()
            .filter(|t| **t >= from && **t < to)
            .count()
    }

    /// Connections in `[from, to)` whose upstream connect failed (the API server was down).
    pub fn refused_between(&self, from: Instant, to: Instant) -> usize {
        lock(&self.log)
            .upstream_failed
            .iter()
            .filter(|t| **t >= from && **t < to)
            .count()
    }

    /// Every connection accepted so far.
    pub fn accepted(&self) -> usize {
        lock(&self.log).accepted.len()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    log.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
