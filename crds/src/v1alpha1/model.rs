use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::presets::ModelPreset;

/// The base model.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Which model family and size: `tiny` (CPU, initialised locally), `stories-15m` (CPU,
    /// llama2.c's TinyStories model, shipped in the trainer image), `llama-2-7b`,
    /// `llama-2-13b` or `llama-2-70b`. Fixes the architecture and the default GPU resources.
    pub preset: ModelPreset,
    /// Where the weights come from: `hf://org/name[@revision]` (downloaded by an init step) or
    /// `pvc://claim/path` (a directory in Hugging Face layout on an existing claim). Leave empty
    /// for `tiny` and `stories-15m`, whose weights the trainer image ships.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^(hf|pvc)://.+$"))]
    pub source: Option<String>,
    /// The Secret key holding a Hugging Face access token for gated models (`hf://` only). The
    /// token is read by the download step from the Secret; it never appears in the spec, status,
    /// events or logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
}

/// A reference to one key of a Secret in the job's namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key inside the Secret.
    #[serde(default = "default_token_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

fn default_token_key() -> String {
    "token".into()
}
