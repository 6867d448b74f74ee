//! A **stand-in for the cluster DNS** (CoreDNS's `kubernetes` plugin), for the pods of the
//! simulated nodes: it answers the names of pods behind a headless Service,
//! `<hostname>.<subdomain>.<namespace>.svc.cluster.local`, as CoreDNS does from the Service's
//! endpoints: the pod must set `hostname` and `subdomain`, the Service named by `subdomain` must
//! exist and select the pod, and the pod must be ready unless the Service publishes not-ready
//! addresses. Everything else is NXDOMAIN (no upstream), and AAAA questions get no answer.
//!
//! It serves UDP on port 53 of a loopback address of its own; containers in their own mount
//! namespace see a `/etc/resolv.conf` naming it, with the search path and `ndots:5` a kubelet
//! writes for `dnsPolicy: ClusterFirst` (see [`resolv_conf`]). Binding port 53 needs root, as
//! the mount namespaces do; without root there is no cluster DNS.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::ListParams;
use kube::{Api, Client};
use tokio::net::UdpSocket;

/// The cluster domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Serves the cluster's DNS on `addr:53` until the task is dropped; `Err` when it cannot bind.
pub async fn bind(addr: Ipv4Addr) -> std::io::Result<UdpSocket> {
    UdpSocket::bind((addr, 53)).await
}

/// Answers questions on `socket` from the API server's pods and Services.
pub async fn serve(socket: UdpSocket, client: Client) {
    let mut buf = [0u8; 512];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Some(question) = Question::parse(&buf[..n]) else {
            continue;
        };
        let answers = if question.qtype == TYPE_A {
            lookup(&client, &question.name).await
        } else {
            Lookup::Found(Vec::new())
        };
        let reply = question.reply(&buf[..n], &answers);
        let _ = socket.send_to(&reply, from).await;
    }
}

/// The `/etc/resolv.conf` of a pod in `namespace` with `dnsPolicy: ClusterFirst`.
pub fn resolv_conf(nameserver: Ipv4Addr, namespace: &str) -> String {
    format!(
        "nameserver {nameserver}\nsearch {namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} \
         {CLUSTER_DOMAIN}\noptions ndots:5\n"
    )
}

const TYPE_A: u16 = 1;

/// What a name resolves to.
#[derive(Debug, PartialEq)]
enum Lookup {
    /// The name exists (possibly with no address of the asked type).
    Found(Vec<Ipv4Addr>),
    /// No such name.
    NxDomain,
}

/// A pod's A records: `<hostname>.<subdomain>.<namespace>.svc.<domain>`.
async fn lookup(client: &Client, name: &str) -> Lookup {
    let suffix = format!(".svc.{CLUSTER_DOMAIN}");
    let Some(rest) = name.strip_suffix(&suffix) else {
        return Lookup::NxDomain;
    };
    let labels: Vec<&str> = rest.split('.').collect();
    let [host, subdomain, namespace] = labels[..] else {
        return Lookup::NxDomain;
    };
    let Ok(Some(service)) = Api::<Service>::namespaced(client.clone(), namespace)
        .get_opt(subdomain)
        .await
    else {
        return Lookup::NxDomain;
    };
    let spec = service.spec.unwrap_or_default();
    let selector = spec.selector.unwrap_or_default();
    let not_ready_too = spec.publish_not_ready_addresses == Some(true);
    let Ok(pods) = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
    else {
        return Lookup::NxDomain;
    };
    let ips: Vec<Ipv4Addr> = pods
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            let s = p.spec.as_ref();
            s.and_then(|s| s.hostname.as_deref()) == Some(host)
                && s.and_then(|s| s.subdomain.as_deref()) == Some(subdomain)
        })
        .filter(|p| !selector.is_empty() && selects(&selector, p))
        .filter(|p| not_ready_too || is_ready(p))
        .filter_map(|p| p.status.as_ref()?.pod_ip.as_deref()?.parse().ok())
        .collect();
    if ips.is_empty() {
        Lookup::NxDomain
    } else {
        Lookup::Found(ips)
    }
}

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

fn is_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The question of a DNS query (RFC 1035 §4.1).
#[derive(Debug, PartialEq)]
struct Question {
    /// Lower case, without the final dot.
    name: String,
    qtype: u16,
    /// Where the question section ends in the query.
    end: usize,
}

impl Question {
    fn parse(query: &[u8]) -> Option<Self> {
        let qdcount = u16::from_be_bytes([*query.get(4)?, *query.get(5)?]);
        if query.len() < 12 || qdcount != 1 {
            return None;
        }
        let mut at = 12;
        let mut labels = Vec::new();
        loop {
            let len = usize::from(*query.get(at)?);
            at += 1;
            if len == 0 {
                break;
            }
            if len > 63 {
                return None;
            }
            labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_lowercase());
            at += len;
        }
        let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
        Some(Question {
            name: labels.join("."),
            qtype,
            end: at + 4,
        })
    }

    /// The response: the query's id and question, authoritative, with `lookup`'s A records.
    fn reply(&self, query: &[u8], lookup: &Lookup) -> Vec<u8> {
        let (rcode, ips) = match lookup {
            Lookup::Found(ips) => (0u8, ips.as_slice()),
            Lookup::NxDomain => (3u8, &[][..]),
        };
        let mut out = Vec::with_capacity(self.end + 16 * ips.len());
        out.extend_from_slice(&query[..2]);
        // QR, opcode 0, AA, RD copied; RA; rcode.
        out.push(0x84 | (query[2] & 0x01));
        out.push(0x80 | rcode);
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&(ips.len() as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&query[12..self.end]);
        for ip in ips {
            // A pointer to the question's name, type A, class IN, TTL 5 s, 4 bytes.
            out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
            out.extend_from_slice(&ip.octets());
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    #[test]
    fn a_question_is_parsed_and_answered_in_the_wire_format() {
        let q = query("Demo-Trainer-0-0.demo-metrics.ns.svc.cluster.local", TYPE_A);
        let question = Question::parse(&q).unwrap();
        assert_eq!(
            question.name,
            "demo-trainer-0-0.demo-metrics.ns.svc.cluster.local"
        );
        assert_eq!((question.qtype, question.end), (TYPE_A, q.len()));
        let ip = Ipv4Addr::new(127, 9, 0, 2);
        let reply = question.reply(&q, &Lookup::Found(vec![ip]));
        assert_eq!(&reply[..2], &[0x12, 0x34], "the query's id");
        assert_eq!(reply[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([reply[6], reply[7]]), 1, "one answer");
        assert_eq!(&reply[reply.len() - 4..], &ip.octets());
        let missing = question.reply(&q, &Lookup::NxDomain);
        assert_eq!(
            (missing[3] & 0x0f, missing.len()),
            (3, q.len()),
            "NXDOMAIN, no answer"
        );
        assert_eq!(Question::parse(&q[..10]), None);
    }

    #[test]
    fn resolv_conf_searches_the_namespace_first() {
        let conf = resolv_conf(Ipv4Addr::new(127, 3, 0, 53), "team-a");
        assert!(conf.starts_with("nameserver 127.3.0.53\nsearch team-a.svc.cluster.local "));
        assert!(conf.contains("options ndots:5"));
    }
}
