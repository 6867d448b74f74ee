//! `finetune-trainer init-tiny`: the tiny preset in Hugging Face layout, optionally pretrained on
//! general text, and cached: a marker file records everything that determines the weights
//! (architecture, tokenizer digest, seed, pretraining text's digest and steps), and a directory whose
//! marker matches is reused as is.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;

use super::pretrain::{PretrainSettings, pretrain};
use crate::atomic_file::sha256_file;
use crate::data::{Encoder, PromptTemplate};
use crate::model::tiny;
use crate::{Result, TrainerError};

/// What to build.
#[derive(Debug, Clone)]
pub struct InitTiny {
    /// Output model directory.
    pub out: PathBuf,
    /// `tokenizer.json` (its vocabulary size sets the model's; copied beside the weights).
    pub tokenizer: PathBuf,
    /// Text file (one passage per line) to pretrain on.
    pub pretrain_text: Option<PathBuf>,
    /// Pretraining steps.
    pub steps: usize,
    /// Seed of the initialisation and the pretraining.
    pub seed: u64,
    /// Rebuild even when a matching model is cached.
    pub force: bool,
}

/// What [`init_tiny`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum InitOutcome {
    /// A matching model was already there.
    Cached,
    /// The model was written.
    Written {
        /// Its parameter count.
        parameters: usize,
        /// Pretraining's first and last loss and its seconds, when it pretrained.
        pretrained: Option<(f32, f32, f64)>,
    },
}

/// Builds (or finds cached) the tiny model described by `req`.
pub fn init_tiny(req: &InitTiny) -> Result<InitOutcome> {
    let enc = Encoder::from_file(&req.tokenizer, PromptTemplate::default(), 64)?;
    let cfg = tiny::tiny_config(enc.vocab_size());
    // The tokenizer's digest is part of the cache key: a model pretrained on one vocabulary's ids
    // is meaningless under another of the same size.
    let text = req.pretrain_text.as_ref();
    let marker = serde_json::json!({
        "config": cfg,
        "tokenizerSha256": sha256_file(&req.tokenizer)?,
        "seed": req.seed,
        // The text's content, not its path: a file rewritten in place rebuilds the model.
        "pretrainTextSha256": text.map(|t| sha256_file(t)).transpose()?,
        "pretrainSteps": if text.is_some() { req.steps } else { 0 },
    });
    let marker_path = req.out.join("init-tiny.json");
    let cached = std::fs::read_to_string(&marker_path)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
    if !req.force && req.out.join("model.safetensors").exists() && cached.as_ref() == Some(&marker)
    {
        return Ok(InitOutcome::Cached);
    }
    let mut weights = tiny::init_weights(&cfg, req.seed, &Device::Cpu)?;
    let mut pretrained = None;
    if let Some(t) = text
        && req.steps > 0
    {
        let t0 = Instant::now();
        let s = PretrainSettings {
            steps: req.steps,
            seed: req.seed,
            ..Default::default()
        };
        let (w, first, last) = pretrain(&cfg, weights, &enc, t, &s)?;
        pretrained = Some((first, last, t0.elapsed().as_secs_f64()));
        weights = w;
    }
    tiny::write_hf_model_with_tokenizer(&req.out, &cfg, &weights, &req.tokenizer)?;
    std::fs::write(&marker_path, serde_json::to_string_pretty(&marker)?)
        .map_err(|e| TrainerError::io(&marker_path, e))?;
    Ok(InitOutcome::Written {
        parameters: cfg.num_parameters(),
        pretrained,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_cache_is_keyed_by_everything_that_makes_the_weights() {
        let dir = std::env::temp_dir().join(format!("ft-init-tiny-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tokenizer-wordlevel.json");
        let tokenizer = dir.join("tokenizer.json");
        std::fs::copy(&fixture, &tokenizer).unwrap();
        let req = InitTiny {
            out: dir.join("model"),
            tokenizer: tokenizer.clone(),
            pretrain_text: None,
            steps: 0,
            seed: 7,
            force: false,
        };
        assert!(matches!(
            init_tiny(&req).unwrap(),
            InitOutcome::Written { .. }
        ));
        assert_eq!(init_tiny(&req).unwrap(), InitOutcome::Cached);
        // Another seed, or the same vocabulary size under another tokenizer file, rebuilds.
        let reseeded = InitTiny {
            seed: 8,
            ..req.clone()
        };
        assert!(matches!(
            init_tiny(&reseeded).unwrap(),
            InitOutcome::Written { .. }
        ));
        let text = std::fs::read_to_string(&fixture).unwrap();
        std::fs::write(&tokenizer, format!("{text}\n")).unwrap();
        assert!(matches!(
            init_tiny(&reseeded).unwrap(),
            InitOutcome::Written { .. }
        ));
        assert_eq!(init_tiny(&reseeded).unwrap(), InitOutcome::Cached);
        // The pretraining text is keyed by its content: rewritten in place, it rebuilds.
        let general = dir.join("general.txt");
        std::fs::write(&general, "the cat sat on the mat\n").unwrap();
        let pretrained = InitTiny {
            pretrain_text: Some(general.clone()),
            steps: 1,
            ..reseeded.clone()
        };
        assert!(matches!(
            init_tiny(&pretrained).unwrap(),
            InitOutcome::Written { .. }
        ));
        assert_eq!(init_tiny(&pretrained).unwrap(), InitOutcome::Cached);
        std::fs::write(&general, "the mat sat on the cat\n").unwrap();
        assert!(matches!(
            init_tiny(&pretrained).unwrap(),
            InitOutcome::Written { .. }
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
