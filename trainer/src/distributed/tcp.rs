//! The CPU backend of [`Collective`]: plain TCP between the ranks, rank 0 at the centre (the
//! role gloo plays for PyTorch; NCCL remains the GPU engine). Each collective costs every other
//! rank one round trip of the buffer through rank 0, which suits CPU pods and the tests; rank 0
//! adds the buffers in rank order, so the result is the same on every rank and every run.
//!
//! Rendezvous: rank 0 listens on the master port; every other rank connects, retrying until the
//! rendezvous deadline (its DNS name may not exist yet), and introduces itself with its rank, the
//! world size and the gang (job UID and attempt). Rank 0 refuses a rank of another gang — a
//! survivor of an earlier attempt — with the reason, and the refused rank exits. Every read and
//! write after that has the collective timeout, so a rank that dies or hangs makes the others
//! fail within it instead of waiting forever.
//!
//! Over 500 lines with its unit tests (about 440 without): the framing, the rendezvous and the
//! two collectives share one wire protocol and its timeouts, which one file keeps in view.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::{Collective, World};
use crate::{Result, TrainerError};

/// The first bytes of every introduction, so a stray connection is recognised.
const MAGIC: &[u8; 4] = b"FTDP";
/// The protocol version; ranks of different versions refuse each other.
const VERSION: u32 = 1;
/// The longest gang name accepted in an introduction.
const MAX_GANG_BYTES: usize = 512;
/// How long rank 0 waits for one connection's introduction.
const INTRODUCTION_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the backend waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Until every rank has joined (rank 0) or rank 0 has answered (the others).
    pub rendezvous: Duration,
    /// For each read and write of a collective.
    pub collective: Duration,
}

impl Default for Timeouts {
    /// Ten minutes each: PyTorch's default process-group timeout, long enough for rank 0 to
    /// write a checkpoint while the others wait in the next all-reduce.
    fn default() -> Self {
        Self {
            rendezvous: Duration::from_secs(600),
            collective: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Op {
    AllReduceSum = 1,
    Broadcast = 2,
}

/// A rank's connections: rank 0 holds one per other rank (index `r - 1`), every other rank one
/// to rank 0.
pub struct TcpCollective {
    rank: usize,
    world_size: usize,
    peers: Vec<TcpStream>,
    calls: u64,
    timeout: Duration,
}

impl TcpCollective {
    /// Joins the gang `world` describes: rank 0 listens on `0.0.0.0:master_port`, the others
    /// connect to `master_addr:master_port`.
    pub fn connect(world: &World, gang: &str, timeouts: Timeouts) -> Result<Self> {
        if world.rank == 0 {
            let listener = TcpListener::bind(("0.0.0.0", world.master_port)).map_err(|e| {
                fail(
                    0,
                    format!("cannot listen on port {}: {e}", world.master_port),
                )
            })?;
            Self::host(listener, world.world_size, gang, timeouts)
        } else {
            let addr = format!("{}:{}", world.master_addr, world.master_port);
            Self::join(&addr, world.rank, world.world_size, gang, timeouts)
        }
    }

    /// Rank 0: accepts ranks `1..world_size` of `gang` on `listener` until the rendezvous
    /// deadline, refusing (and logging) any other connection.
    pub fn host(
        listener: TcpListener,
        world_size: usize,
        gang: &str,
        timeouts: Timeouts,
    ) -> Result<Self> {
        let deadline = Instant::now() + timeouts.rendezvous;
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(0, format!("listener: {e}")))?;
        let mut joined: Vec<Option<TcpStream>> = (1..world_size).map(|_| None).collect();
        while joined.iter().any(Option::is_none) {
            let (mut stream, from) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = joined
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.is_none())
                            .map(|(i, _)| i + 1)
                            .collect();
                        return Err(fail(
                            0,
                            format!(
                                "ranks {missing:?} of {world_size} did not join within {} s",
                                timeouts.rendezvous.as_secs()
                            ),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(fail(0, format!("accept: {e}"))),
            };
            let verdict = introduction(&mut stream).and_then(|(rank, world, their_gang)| {
                if their_gang != gang {
                    Err(format!(
                        "rank {rank} belongs to gang {their_gang:?}, this is {gang:?} (a rank of another attempt)"
                    ))
                } else if world != world_size {
                    Err(format!("rank {rank} expects {world} ranks, this gang has {world_size}"))
                } else if rank == 0 || rank >= world_size {
                    Err(format!("rank {rank} is not in 1..{world_size}"))
                } else if joined[rank - 1].is_some() {
                    Err(format!("rank {rank} joined twice"))
                } else {
                    Ok(rank)
                }
            });
            match verdict {
                Ok(rank) => {
                    answer(&mut stream, None).map_err(|e| fail(0, format!("rank {rank}: {e}")))?;
                    tracing::info!(rank, %from, "rank joined");
                    joined[rank - 1] = Some(stream);
                }
                Err(why) => {
                    tracing::warn!(%from, reason = %why, "refused a connection");
                    // Best effort: the refused peer learns why, or sees the connection close.
                    let _ = answer(&mut stream, Some(&why));
                }
            }
        }
        let peers: Vec<TcpStream> = joined.into_iter().flatten().collect();
        for p in &peers {
            set_timeouts(p, timeouts.collective).map_err(|e| fail(0, e))?;
        }
        Ok(Self {
            rank: 0,
            world_size,
            peers,
            calls: 0,
            timeout: timeouts.collective,
        })
    }

    /// Rank `rank` of `world_size`: connects to rank 0 at `addr` (retrying until the rendezvous
    /// deadline) and introduces itself as a member of `gang`.
    pub fn join(
        addr: &str,
        rank: usize,
        world_size: usize,
        gang: &str,
        timeouts: Timeouts,
    ) -> Result<Self> {
        let deadline = Instant::now() + timeouts.rendezvous;
        let mut last_error = String::from("no attempt");
        let mut stream = loop {
            if Instant::now() >= deadline {
                return Err(fail(
                    rank,
                    format!(
                        "rank 0 at {addr} not reached within {} s: {last_error}",
                        timeouts.rendezvous.as_secs()
                    ),
                ));
            }
            match connect_once(addr) {
                Ok(s) => break s,
                Err(e) => {
                    last_error = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        set_timeouts(&stream, timeouts.rendezvous.max(INTRODUCTION_TIMEOUT))
            .map_err(|e| fail(rank, e))?;
        let mut hello = Vec::with_capacity(20 + gang.len());
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&VERSION.to_le_bytes());
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world_size as u32).to_le_bytes());
        hello.extend_from_slice(&(gang.len() as u32).to_le_bytes());
        hello.extend_from_slice(gang.as_bytes());
        stream
            .write_all(&hello)
            .map_err(|e| fail(rank, format!("introduction to {addr}: {e}")))?;
        let mut status = [0u8; 1];
        read_exact(&mut stream, &mut status).map_err(|e| fail(rank, format!("{addr}: {e}")))?;
        if status[0] != 0 {
            let reason = read_string(&mut stream).unwrap_or_else(|e| e);
            return Err(fail(rank, format!("rank 0 refused this rank: {reason}")));
        }
        set_timeouts(&stream, timeouts.collective).map_err(|e| fail(rank, e))?;
        Ok(Self {
            rank,
            world_size,
            peers: vec![stream],
            calls: 0,
            timeout: timeouts.collective,
        })
    }

    /// One collective: the other ranks send their buffer to rank 0, which combines and sends
    /// the result back.
    fn collective(&mut self, op: Op, values: &mut [f32]) -> Result<()> {
        self.calls += 1;
        let header = Header {
            op: op as u8,
            call: self.calls,
            len: values.len() as u64,
        };
        let what = format!("{op:?} #{}", self.calls);
        let timeout = self.timeout.as_secs();
        let rank = self.rank;
        let lost = |peer: usize, e: String| {
            fail(
                rank,
                format!("rank {peer} during {what}: {e} (timeout {timeout} s)"),
            )
        };
        if self.rank == 0 {
            let mut incoming = vec![0f32; values.len()];
            for (i, peer) in self.peers.iter_mut().enumerate() {
                let theirs = read_header(peer).map_err(|e| lost(i + 1, e))?;
                if theirs != header {
                    return Err(fail(
                        0,
                        format!(
                            "rank {} called {theirs:?} where rank 0 called {header:?}",
                            i + 1
                        ),
                    ));
                }
                if op == Op::AllReduceSum {
                    read_values(peer, &mut incoming).map_err(|e| lost(i + 1, e))?;
                    for (v, x) in values.iter_mut().zip(&incoming) {
                        *v += x;
                    }
                }
            }
            let message = message(&header, values);
            for (i, peer) in self.peers.iter_mut().enumerate() {
                peer.write_all(&message)
                    .map_err(|e| lost(i + 1, e.to_string()))?;
            }
        } else {
            let peer = &mut self.peers[0];
            let sent: &[f32] = if op == Op::AllReduceSum { values } else { &[] };
            peer.write_all(&message(&header, sent))
                .map_err(|e| lost(0, e.to_string()))?;
            let back = read_header(peer).map_err(|e| lost(0, e))?;
            if back != header {
                return Err(fail(
                    rank,
                    format!("rank 0 answered {back:?} to {header:?}"),
                ));
            }
            read_values(peer, values).map_err(|e| lost(0, e))?;
        }
        Ok(())
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, values: &mut [f32]) -> Result<()> {
        self.collective(Op::AllReduceSum, values)
    }

    fn broadcast(&mut self, values: &mut [f32]) -> Result<()> {
        self.collective(Op::Broadcast, values)
    }

    fn backend(&self) -> &'static str {
        "tcp"
    }
}

/// What each message of a collective starts with: which operation, which call of the run, and
/// how many values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    op: u8,
    call: u64,
    len: u64,
}

impl Header {
    fn bytes(&self) -> [u8; 17] {
        let mut b = [0u8; 17];
        b[0] = self.op;
        b[1..9].copy_from_slice(&self.call.to_le_bytes());
        b[9..17].copy_from_slice(&self.len.to_le_bytes());
        b
    }
}

/// `header` followed by `values` as little-endian f32s.
fn message(header: &Header, values: &[f32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(17 + 4 * values.len());
    m.extend_from_slice(&header.bytes());
    m.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    m
}

fn fail(rank: usize, reason: String) -> TrainerError {
    TrainerError::Collective { rank, reason }
}

fn set_timeouts(s: &TcpStream, t: Duration) -> std::result::Result<(), String> {
    s.set_read_timeout(Some(t))
        .and_then(|()| s.set_write_timeout(Some(t)))
        .and_then(|()| s.set_nodelay(true))
        .map_err(|e| format!("socket options: {e}"))
}

fn connect_once(addr: &str) -> std::result::Result<TcpStream, String> {
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolving {addr}: {e}"))?
        .collect();
    let mut last = format!("{addr} resolved to no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("connecting to {a}: {e}"),
        }
    }
    Err(last)
}

/// Reads exactly `buf.len()` bytes; a closed connection and a timeout are told apart.
fn read_exact(s: &mut TcpStream, buf: &mut [u8]) -> std::result::Result<(), String> {
    s.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "the connection closed".to_string(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            "no answer within the timeout".to_string()
        }
        _ => e.to_string(),
    })
}

fn read_u32(s: &mut TcpStream) -> std::result::Result<u32, String> {
    let mut b = [0u8; 4];
    read_exact(s, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_string(s: &mut TcpStream) -> std::result::Result<String, String> {
    let n = read_u32(s)? as usize;
    if n > MAX_GANG_BYTES {
        return Err(format!("a {n}-byte string"));
    }
    let mut b = vec![0u8; n];
    read_exact(s, &mut b)?;
    String::from_utf8(b).map_err(|_| "a string that is not UTF-8".to_string())
}

fn read_header(s: &mut TcpStream) -> std::result::Result<Header, String> {
    let mut b = [0u8; 17];
    read_exact(s, &mut b)?;
    let word = |r: std::ops::Range<usize>| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[r]);
        u64::from_le_bytes(w)
    };
    Ok(Header {
        op: b[0],
        call: word(1..9),
        len: word(9..17),
    })
}

fn read_values(s: &mut TcpStream, out: &mut [f32]) -> std::result::Result<(), String> {
    let mut bytes = vec![0u8; out.len() * 4];
    read_exact(s, &mut bytes)?;
    for (v, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

/// Reads a connecting rank's introduction: its rank, world size and gang.
fn introduction(s: &mut TcpStream) -> std::result::Result<(usize, usize, String), String> {
    s.set_nonblocking(false)
        .and_then(|()| s.set_read_timeout(Some(INTRODUCTION_TIMEOUT)))
        .map_err(|e| format!("socket options: {e}"))?;
    let mut magic = [0u8; 4];
    read_exact(s, &mut magic)?;
    if &magic != MAGIC {
        return Err("not a finetune-trainer rank".into());
    }
    let version = read_u32(s)?;
    if version != VERSION {
        return Err(format!(
            "protocol version {version}, this rank speaks {VERSION}"
        ));
    }
    let rank = read_u32(s)? as usize;
    let world = read_u32(s)? as usize;
    let gang = read_string(s)?;
    Ok((rank, world, gang))
}

/// Rank 0's answer to an introduction: accepted (`None`) or refused with the reason.
fn answer(s: &mut TcpStream, refusal: Option<&str>) -> std::io::Result<()> {
    let mut b = vec![u8::from(refusal.is_some())];
    if let Some(r) = refusal {
        let r = &r.as_bytes()[..r.len().min(MAX_GANG_BYTES)];
        b.extend_from_slice(&(r.len() as u32).to_le_bytes());
        b.extend_from_slice(r);
    }
    s.write_all(&b)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn quick() -> Timeouts {
        Timeouts {
            rendezvous: Duration::from_secs(5),
            collective: Duration::from_secs(2),
        }
    }

    /// Runs `f` on every rank of a gang of `world` over loopback; the results in rank order.
    fn gang<T: Send>(world: usize, f: impl Fn(&mut TcpCollective) -> T + Sync) -> Vec<Result<T>> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::scope(|s| {
            let f = &f;
            let host = s.spawn(move || {
                TcpCollective::host(listener, world, "job/0", quick()).map(|mut c| f(&mut c))
            });
            let others: Vec<_> = (1..world)
                .map(|r| {
                    let addr = addr.clone();
                    s.spawn(move || {
                        TcpCollective::join(&addr, r, world, "job/0", quick())
                            .map(|mut c| f(&mut c))
                    })
                })
                .collect();
            std::iter::once(host)
                .chain(others)
                .map(|h| h.join().unwrap())
                .collect()
        })
    }

    #[test]
    fn all_reduce_sums_in_rank_order_and_broadcast_copies_rank_0() {
        let out = gang(3, |c| {
            let r = c.rank() as f32;
            let mut v = vec![r, 10.0 * r, 1.0];
            c.all_reduce_sum(&mut v).unwrap();
            let mut b = vec![r + 100.0; 2];
            c.broadcast(&mut b).unwrap();
            (v, b)
        });
        for r in out {
            let (v, b) = r.unwrap();
            assert_eq!(v, vec![3.0, 30.0, 3.0]);
            assert_eq!(b, vec![100.0, 100.0]);
        }
    }

    #[test]
    fn a_rank_of_another_gang_is_refused_with_the_reason() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::scope(|s| {
            let host = s.spawn(move || TcpCollective::host(listener, 2, "job/1", quick()));
            let stale = TcpCollective::join(&addr, 1, 2, "job/0", quick())
                .err()
                .unwrap()
                .to_string();
            assert!(
                stale.contains("refused") && stale.contains("another attempt"),
                "{stale}"
            );
            // The host still waits for the right rank.
            let good = TcpCollective::join(&addr, 1, 2, "job/1", quick()).unwrap();
            assert_eq!(good.world_size(), 2);
            assert!(host.join().unwrap().is_ok());
        });
    }

    #[test]
    fn a_rank_that_leaves_fails_the_others_quickly() {
        let t0 = Instant::now();
        let out = gang(3, |c| {
            let mut v = vec![1.0f32; 4];
            c.all_reduce_sum(&mut v).unwrap();
            if c.rank() == 2 {
                return Ok(());
            }
            c.all_reduce_sum(&mut v)
        });
        let errors: Vec<String> = out
            .into_iter()
            .take(2)
            .map(|r| r.unwrap().unwrap_err().to_string())
            .collect();
        assert!(errors[0].contains("rank 2"), "{}", errors[0]);
        assert!(errors[1].contains("rank 0"), "{}", errors[1]);
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    }

    #[test]
    fn a_missing_rank_ends_the_rendezvous_at_its_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let t = Timeouts {
            rendezvous: Duration::from_millis(300),
            collective: Duration::from_secs(1),
        };
        let e = TcpCollective::host(listener, 3, "job/0", t)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("ranks [1, 2] of 3 did not join"), "{e}");
        let e = TcpCollective::join("127.0.0.1:1", 1, 2, "job/0", t)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not reached"), "{e}");
    }
}
