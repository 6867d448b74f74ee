//! Rotary position embeddings as a Hugging Face config describes them: the base frequency and
//! the scaling (`default`, `linear`, `dynamic`, `llama3`), read from either layout
//! (`rope_theta` + `rope_scaling`, or transformers 5's `rope_parameters`). Anything else
//! (`yarn`, `longrope`, …) is refused by name rather than silently trained as `default`.
//!
//! The inverse frequencies follow the published formulas (transformers'
//! `modeling_rope_utils.py`); the tables are built once per sequence length by the model.

use serde::{Deserialize, Serialize};

use crate::{Result, TrainerError};

/// The rotary base frequency when a config names none.
pub const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// One `rope_scaling` or `rope_parameters` object of `config.json`; unknown keys are kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    /// The scaling kind (`default`, `linear`, `dynamic`, `llama3`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// The older spelling of `rope_type`, still written beside it by transformers.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub legacy_type: Option<String>,
    /// The base frequency (transformers 5 keeps it here only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// The context extension factor (`linear`, `dynamic`, `llama3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// `llama3`: wavelengths longer than `original / low_freq_factor` are divided by `factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    /// `llama3`: wavelengths shorter than `original / high_freq_factor` are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    /// The context length the model was pretrained with (`llama3`, `dynamic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// Everything else, preserved on write.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// How the inverse frequencies are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `1 / θ^(2i/d)`.
    Default,
    /// Positions divided by `factor` (equivalently, frequencies).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Dynamic NTK: for sequences longer than `original`, θ grows with the length.
    Dynamic {
        /// The extension factor.
        factor: f64,
        /// The pretraining context length.
        original: usize,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        /// The divisor of low frequencies.
        factor: f64,
        /// See [`RopeParameters::low_freq_factor`].
        low_freq_factor: f64,
        /// See [`RopeParameters::high_freq_factor`].
        high_freq_factor: f64,
        /// The pretraining context length.
        original: usize,
    },
}

/// The resolved rotary embedding of a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// Base frequency θ.
    pub theta: f64,
    /// Rotated dimensions per head.
    pub head_dim: usize,
    /// The scaling.
    pub scaling: RopeScaling,
}

fn field<T>(value: Option<T>, kind: &str, name: &str) -> Result<T> {
    value.ok_or_else(|| {
        TrainerError::Config(format!("config.json: rope scaling `{kind}` needs `{name}`"))
    })
}

impl Rope {
    /// Resolves the config's fields: `rope_theta` and `rope_scaling` (the classic layout) or
    /// `rope_parameters` (transformers 5); both layouts at once must agree on θ.
    pub fn resolve(
        rope_theta: Option<f64>,
        rope_scaling: Option<&RopeParameters>,
        rope_parameters: Option<&RopeParameters>,
        head_dim: usize,
        max_position_embeddings: usize,
    ) -> Result<Self> {
        if let (Some(a), Some(b)) = (rope_theta, rope_parameters.and_then(|p| p.rope_theta))
            && a != b
        {
            return Err(TrainerError::Config(format!(
                "config.json: rope_theta {a} disagrees with rope_parameters.rope_theta {b}"
            )));
        }
        if rope_scaling.is_some() && rope_parameters.is_some() {
            return Err(TrainerError::Config(
                "config.json: both rope_scaling and rope_parameters are set; keep one".into(),
            ));
        }
        let theta = rope_theta
            .or(rope_parameters.and_then(|p| p.rope_theta))
            .unwrap_or(DEFAULT_ROPE_THETA);
        if !(theta.is_finite() && theta > 1.0) {
            return Err(TrainerError::Config(format!(
                "config.json: rope_theta {theta} must be a finite number above 1"
            )));
        }
        let scaling = match rope_scaling.or(rope_parameters) {
            None => RopeScaling::Default,
            Some(p) => Self::scaling(p, max_position_embeddings)?,
        };
        Ok(Self {
            theta,
            head_dim,
            scaling,
        })
    }

    fn scaling(p: &RopeParameters, max_position_embeddings: usize) -> Result<RopeScaling> {
        let kind = p
            .rope_type
            .as_deref()
            .or(p.legacy_type.as_deref())
            .unwrap_or("default");
        let factor = |k: &str| -> Result<f64> {
            let f = field(p.factor, k, "factor")?;
            if f.is_finite() && f >= 1.0 {
                Ok(f)
            } else {
                Err(TrainerError::Config(format!(
                    "config.json: rope scaling `{k}` factor {f} must be at least 1"
                )))
            }
        };
        let original = p
            .original_max_position_embeddings
            .unwrap_or(max_position_embeddings);
        Ok(match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: factor(kind)?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: factor(kind)?,
                original,
            },
            "llama3" => {
                let low = field(p.low_freq_factor, kind, "low_freq_factor")?;
                let high = field(p.high_freq_factor, kind, "high_freq_factor")?;
                if !(high > low && low > 0.0) {
                    return Err(TrainerError::Config(format!(
                        "config.json: llama3 rope scaling needs high_freq_factor ({high}) > \
                         low_freq_factor ({low}) > 0"
                    )));
                }
                RopeScaling::Llama3 {
                    factor: factor(kind)?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original: field(
                        p.original_max_position_embeddings,
                        kind,
                        "original_max_position_embeddings",
                    )?,
                }
            }
            other => {
                return Err(TrainerError::Config(format!(
                    "config.json: rope scaling `{other}` is not supported (supported: default, \
                     linear, dynamic, llama3)"
                )));
            }
        })
    }

    /// The `head_dim / 2` inverse frequencies for sequences of `seq_len` tokens (only `dynamic`
    /// depends on the length).
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base = match self.scaling {
            RopeScaling::Dynamic { factor, original } if seq_len > original => {
                let grow = factor * seq_len as f64 / original as f64 - (factor - 1.0);
                self.theta * grow.powf(d / (d - 2.0))
            }
            _ => self.theta,
        };
        (0..self.head_dim / 2)
            .map(|i| {
                let f = 1.0 / base.powf((2 * i) as f64 / d);
                match self.scaling {
                    RopeScaling::Linear { factor } => f / factor,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original,
                    } => {
                        let original = original as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < original / high_freq_factor {
                            f
                        } else if wavelen > original / low_freq_factor {
                            f / factor
                        } else {
                            let smooth = (original / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                    RopeScaling::Default | RopeScaling::Dynamic { .. } => f,
                }
            })
            .collect()
    }

    /// `(cos, sin)` rows for positions `0..seq_len`, each `head_dim` wide in the `rotate_half`
    /// layout (the half-width angles repeated twice), row-major.
    pub fn tables(&self, seq_len: usize) -> (Vec<f32>, Vec<f32>) {
        let inv = self.inv_freq(seq_len);
        let mut cos = Vec::with_capacity(seq_len * self.head_dim);
        let mut sin = Vec::with_capacity(seq_len * self.head_dim);
        for pos in 0..seq_len {
            for _copy in 0..2 {
                for f in &inv {
                    let a = pos as f64 * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        (cos, sin)
    }
}
