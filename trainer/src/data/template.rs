//! Prompt templates. The default is the Llama 2 chat format:
//! `<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>` (`[INST]` is plain text).

use serde::{Deserialize, Serialize};

use super::example::Example;

/// How a prompt is rendered before the response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromptTemplate {
    /// Llama 2 chat, with an optional default system prompt (used when the row has none).
    Llama2Chat {
        /// Default system prompt.
        system: Option<String>,
        /// Text placed before each row's text.
        instruction: Option<String>,
    },
    /// `{instruction}{text}\n{response}`.
    Plain {
        /// Text placed before each row's text.
        instruction: Option<String>,
    },
}

impl Default for PromptTemplate {
    fn default() -> Self {
        Self::Llama2Chat {
            system: None,
            instruction: None,
        }
    }
}

/// A rendered prompt split around the user text, so that the user text alone can be truncated.
/// Earlier chat turns are complete `(prompt, answer)` segments, each framed by BOS/EOS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedPrompt {
    /// Completed earlier turns: text of `[INST] u [/INST] a` without BOS/EOS.
    pub history: Vec<String>,
    /// Text before the user text.
    pub prefix: String,
    /// The user text.
    pub user: String,
    /// Text after the user text (e.g. ` [/INST]`).
    pub suffix: String,
}

impl PromptTemplate {
    /// Renders an example's prompt.
    pub fn render(&self, ex: &Example) -> RenderedPrompt {
        match self {
            Self::Llama2Chat {
                system,
                instruction,
            } => {
                let sys = ex.system.as_ref().or(system.as_ref());
                let sys_block = |s: Option<&String>| match s {
                    Some(s) if !s.trim().is_empty() => {
                        format!("<<SYS>>\n{}\n<</SYS>>\n\n", s.trim())
                    }
                    _ => String::new(),
                };
                let mut history = Vec::new();
                let mut first = true;
                for (u, a) in &ex.history {
                    let block = if first { sys_block(sys) } else { String::new() };
                    history.push(format!("[INST] {block}{} [/INST] {}", u.trim(), a.trim()));
                    first = false;
                }
                let block = if first { sys_block(sys) } else { String::new() };
                let instr = instruction.clone().unwrap_or_default();
                RenderedPrompt {
                    history,
                    prefix: format!("[INST] {block}{instr}"),
                    user: ex.user.trim().to_string(),
                    suffix: " [/INST]".to_string(),
                }
            }
            Self::Plain { instruction } => RenderedPrompt {
                history: ex
                    .history
                    .iter()
                    .map(|(u, a)| {
                        format!("{}{}\n{}", instruction.clone().unwrap_or_default(), u, a)
                    })
                    .collect(),
                prefix: instruction.clone().unwrap_or_default(),
                user: ex.user.trim().to_string(),
                suffix: "\n".to_string(),
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn llama2_chat_layout() {
        let ex = Example {
            system: Some("Classify.".into()),
            history: vec![],
            user: "great".into(),
            response: "Positive".into(),
            label: Some("Positive".into()),
            line: 1,
        };
        let r = PromptTemplate::default().render(&ex);
        let full = format!("{}{}{}", r.prefix, r.user, r.suffix);
        assert_eq!(full, "[INST] <<SYS>>\nClassify.\n<</SYS>>\n\ngreat [/INST]");
        let c = PromptTemplate::Plain {
            instruction: Some("Review: ".into()),
        }
        .render(&ex);
        assert_eq!(
            (c.prefix.as_str(), c.user.as_str(), c.suffix.as_str()),
            ("Review: ", "great", "\n")
        );
        let i = PromptTemplate::Llama2Chat {
            system: None,
            instruction: Some("Sentiment of: ".into()),
        }
        .render(&Example { system: None, ..ex });
        assert_eq!(
            format!("{}{}{}", i.prefix, i.user, i.suffix),
            "[INST] Sentiment of: great [/INST]"
        );
    }
}
