//! Tokenisation: `<s>` + prompt tokens (masked out of the loss) + response tokens + `</s>`
//! (in the loss), with truncation of the user text to the maximum sequence length.
//!
//! Prompt and response are tokenised separately and concatenated, so the loss mask is exact even
//! where SentencePiece would merge across the boundary.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokenizers::Tokenizer;

use super::example::Example;
use super::template::PromptTemplate;
use crate::{Result, TrainerError};

/// Token ids of one example with its loss mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids, starting with BOS.
    pub ids: Vec<u32>,
    /// 1 where the token is a training target (response tokens and EOS).
    pub target: Vec<u8>,
    /// Class label, if any.
    pub label: Option<String>,
    /// Whether the user text was truncated.
    pub truncated: bool,
    /// Number of prompt tokens (including BOS), i.e. where the response starts.
    pub prompt_len: usize,
}

impl Encoded {
    /// A language-modelling example: every token after the first (BOS) is a target.
    pub fn language_modelling(ids: Vec<u32>) -> Self {
        let mut target = vec![1u8; ids.len()];
        if let Some(first) = target.first_mut() {
            *first = 0;
        }
        Self {
            ids,
            target,
            label: None,
            truncated: false,
            prompt_len: 1,
        }
    }
}

/// Wraps a tokenizer with the template and special ids.
#[derive(Debug, Clone)]
pub struct Encoder {
    tokenizer: Tokenizer,
    /// BOS id.
    pub bos: u32,
    /// EOS id.
    pub eos: u32,
    /// Template.
    pub template: PromptTemplate,
    /// Maximum sequence length (tokens).
    pub max_len: usize,
    /// Token ids of the short strings every row repeats (template parts, label words).
    cache: Arc<Mutex<HashMap<String, Vec<u32>>>>,
}

/// Strings up to this length are memoised (template prefixes/suffixes and label words).
const CACHE_MAX_CHARS: usize = 64;

impl Encoder {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path, template: PromptTemplate, max_len: usize) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| TrainerError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::new(tokenizer, template, max_len))
    }

    /// Wraps a loaded tokenizer; BOS/EOS are looked up as `<s>`/`</s>` (default 1/2).
    pub fn new(tokenizer: Tokenizer, template: PromptTemplate, max_len: usize) -> Self {
        let bos = tokenizer.token_to_id("<s>").unwrap_or(1);
        let eos = tokenizer.token_to_id("</s>").unwrap_or(2);
        Self {
            tokenizer,
            bos,
            eos,
            template,
            max_len,
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Like [`Encoder::tokens`], memoised for short repeated strings.
    fn tokens_cached(&self, text: &str) -> Result<Vec<u32>> {
        if text.len() > CACHE_MAX_CHARS {
            return self.tokens(text);
        }
        if let Ok(c) = self.cache.lock()
            && let Some(ids) = c.get(text)
        {
            return Ok(ids.clone());
        }
        let ids = self.tokens(text)?;
        if let Ok(mut c) = self.cache.lock()
            && c.len() < 4096
        {
            c.insert(text.to_string(), ids.clone());
        }
        Ok(ids)
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Tokenises text without special tokens.
    pub fn tokens(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(vec![]);
        }
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TrainerError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| TrainerError::Tokenizer(e.to_string()))
    }

    /// Prompt ids (BOS + history + prompt), with the user text cut to `budget` tokens if needed.
    fn prompt_ids(&self, ex: &Example, reserve: usize) -> Result<(Vec<u32>, bool)> {
        let r = self.template.render(ex);
        let mut ids = Vec::new();
        for h in &r.history {
            ids.push(self.bos);
            ids.extend(self.tokens(h)?);
            ids.push(self.eos);
        }
        ids.push(self.bos);
        ids.extend(self.tokens_cached(&r.prefix)?);
        let mut user = self.tokens(&r.user)?;
        let suffix = self.tokens_cached(&r.suffix)?;
        let fixed = ids.len() + suffix.len() + reserve;
        let budget = self.max_len.saturating_sub(fixed);
        let truncated = user.len() > budget;
        user.truncate(budget);
        ids.extend(user);
        ids.extend(suffix);
        Ok((ids, truncated))
    }

    /// Encodes a training example.
    pub fn encode(&self, ex: &Example) -> Result<Encoded> {
        let mut resp = self.tokens_cached(&ex.response)?;
        resp.push(self.eos);
        resp.truncate(self.max_len.saturating_sub(2).max(1));
        let (mut ids, truncated) = self.prompt_ids(ex, resp.len())?;
        let prompt_len = ids.len();
        let mut target = vec![0u8; ids.len()];
        ids.extend(&resp);
        target.extend(std::iter::repeat_n(1u8, resp.len()));
        ids.truncate(self.max_len);
        target.truncate(self.max_len);
        Ok(Encoded {
            ids,
            target,
            label: ex.label.clone(),
            truncated,
            prompt_len,
        })
    }

    /// Encodes many examples (in parallel threads) preserving order.
    pub fn encode_all(&self, examples: &[Example]) -> Result<Vec<Encoded>> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = examples.len().div_ceil(threads.max(1)).max(1);
        let results: Vec<Result<Vec<Encoded>>> = std::thread::scope(|s| {
            let handles: Vec<_> = examples
                .chunks(chunk)
                .map(|c| {
                    s.spawn(move || c.iter().map(|e| self.encode(e)).collect::<Result<Vec<_>>>())
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(TrainerError::Data("encoder thread panicked".into()))
                    })
                })
                .collect()
        });
        let mut out = Vec::with_capacity(examples.len());
        for r in results {
            out.extend(r?);
        }
        Ok(out)
    }

    /// The distinct token ids of every supervised answer token: those that spell `labels` as
    /// responses, in order of first appearance, then the `</s>` that ends each answer. These are
    /// the `lm_head` rows `trainLabelTokens` trains; `</s>` is among them because a base that
    /// never ends a text with it (one pretrained on stories separated by `<s>` only) would
    /// otherwise pay its whole loss on that token.
    pub fn label_token_ids(&self, labels: &[String]) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = Vec::new();
        for label in labels {
            for id in self.tokens_cached(label)? {
                if id != self.bos && id != self.eos && !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids.push(self.eos);
        Ok(ids)
    }

    /// Encodes the same example with each candidate label as the response (for classification).
    pub fn encode_candidates(&self, ex: &Example, labels: &[String]) -> Result<Vec<Encoded>> {
        labels
            .iter()
            .map(|l| {
                let mut e = ex.clone();
                e.response = l.clone();
                self.encode(&e)
            })
            .collect()
    }
}
