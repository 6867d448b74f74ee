//! Command-line flags of the operator; every flag can also be set from the environment.

use std::net::SocketAddr;
use std::time::Duration;

/// Flags of `finetune-operator`.
#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "finetune-operator",
    version,
    about = "Reconciles FineTuneJobs into trainer pods"
)]
pub struct Args {
    /// Namespace to watch; all namespaces when empty.
    #[arg(long, env = "WATCH_NAMESPACE", default_value = "")]
    pub watch_namespace: String,
    /// Address of the /metrics, /healthz and /readyz server.
    #[arg(long, env = "METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    pub metrics_address: SocketAddr,
    /// Trainer image for CPU jobs.
    #[arg(long, env = "TRAINER_IMAGE", default_value = crate::build::DEFAULT_TRAINER_IMAGE)]
    pub trainer_image: String,
    /// Trainer image for GPU jobs (the CUDA build).
    #[arg(long, env = "TRAINER_CUDA_IMAGE", default_value = crate::build::DEFAULT_TRAINER_CUDA_IMAGE)]
    pub trainer_cuda_image: String,
    /// Image of the download init steps (model and dataset fetch).
    #[arg(long, env = "FETCH_IMAGE", default_value = crate::build::DEFAULT_FETCH_IMAGE)]
    pub fetch_image: String,
    /// Hugging Face endpoint used by the model download step (as `HF_ENDPOINT` for the hub's
    /// own clients).
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    pub hf_endpoint: String,
    /// `name` or `name/key` (key `ca.crt` by default) of a ConfigMap in each job's namespace with
    /// the PEM certificates the download steps trust instead of the public roots: the CA of a
    /// private hub mirror or object store (trust-manager distributes such bundles). Empty: the
    /// public roots.
    #[arg(long, env = "CA_BUNDLE_CONFIG_MAP", default_value = "")]
    pub ca_bundle_config_map: String,
    /// Directory of the pretrained tiny base model inside the trainer image.
    #[arg(
        long,
        env = "TINY_MODEL_DIR",
        default_value = "/opt/finetune/tiny-base"
    )]
    pub tiny_model_dir: String,
    /// Directory of the `stories-15m` base model inside the trainer image (llama2.c's
    /// stories15M, imported into Hugging Face layout).
    #[arg(
        long,
        env = "STORIES_MODEL_DIR",
        default_value = "/opt/finetune/stories-15m"
    )]
    pub stories_model_dir: String,
    /// The Llama 2 `tokenizer.json` inside the trainer image (used by `tiny` and `stories-15m`).
    #[arg(
        long,
        env = "TINY_TOKENIZER_FILE",
        default_value = "/opt/finetune/tokenizer/tokenizer.json"
    )]
    pub tiny_tokenizer_file: String,
    /// Grace period of trainer pods: long enough to write a checkpoint on SIGTERM.
    #[arg(long, env = "TRAINER_GRACE_SECONDS", default_value_t = 120)]
    pub trainer_grace_seconds: i64,
    /// How often a running trainer's /progress is polled.
    #[arg(long, env = "PROGRESS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub progress_interval: Duration,
    /// A running job whose step has not advanced for this long gets the Stalled condition.
    #[arg(long, env = "STALL_TIMEOUT", default_value = "15m", value_parser = parse_duration)]
    pub stall_timeout: Duration,
    /// First retry delay after a trainer failure; doubles per failure up to `max_backoff`.
    #[arg(long, env = "BASE_BACKOFF", default_value = "10s", value_parser = parse_duration)]
    pub base_backoff: Duration,
    /// Longest retry delay after a trainer failure.
    #[arg(long, env = "MAX_BACKOFF", default_value = "5m", value_parser = parse_duration)]
    pub max_backoff: Duration,
    /// Disruptions (evictions, preemptions, lost nodes) a job survives before it fails with
    /// DisruptionLimitExceeded; they never count against `backoffLimit`, but a cluster that
    /// cannot keep the trainer running should not retry it forever.
    #[arg(long, env = "MAX_DISRUPTIONS", default_value_t = 20)]
    pub max_disruptions: u32,
    /// Take part in leader election on a Lease (run two replicas for high availability).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = false)]
    pub leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "LEADER_ELECTION_LEASE",
        default_value = "finetune-operator-leader"
    )]
    pub leader_election_lease: String,
    /// Namespace of the leader-election Lease (the pod's namespace in a cluster).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub leader_election_namespace: String,
    /// Identity of this replica in leader election (the pod name in a cluster).
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub identity: String,
    /// Lease duration of leader election.
    #[arg(long, env = "LEADER_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub leader_lease_duration: Duration,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "LOG_JSON", default_value_t = false)]
    pub log_json: bool,
}

/// Parses `500ms`, `10s`, `5m`, `2h` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s or 5m"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3 weeks").is_err());
    }

    #[test]
    fn defaults_parse() {
        let args = Args::try_parse_from(["finetune-operator"]).map_err(|e| e.to_string());
        let args = args.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(args.trainer_grace_seconds, 120);
        assert!(!args.leader_election);
    }
}
