//! One training example after parsing.

use serde::{Deserialize, Serialize};

/// A parsed example: the user input (plus optional system prompt and earlier chat turns) and the
/// response the model is trained to produce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// System prompt, if any.
    pub system: Option<String>,
    /// Earlier (user, assistant) turns of a chat, not trained on.
    pub history: Vec<(String, String)>,
    /// The user message (e.g. the review text).
    pub user: String,
    /// The response (e.g. the label word).
    pub response: String,
    /// The class label for classification datasets (text + label).
    pub label: Option<String>,
    /// 1-based line where the row starts in its file.
    pub line: usize,
}
