//! JSON Lines rows: `text`+`label` (column names mapped), `prompt`+`completion`, or chat `messages`.

use serde_json::Value;

use crate::example::Example;

/// Column names for JSONL text+label rows and CSV columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMapping {
    /// Input text column (CSV header name or JSON key).
    pub text: String,
    /// Label / response column.
    pub label: String,
    /// JSONL key of a prompt (prompt/completion rows).
    pub prompt: String,
    /// JSONL key of a completion.
    pub completion: String,
    /// JSONL key of a chat transcript.
    pub messages: String,
}

impl Default for ColumnMapping {
    fn default() -> Self {
        Self {
            text: "text".into(),
            label: "label".into(),
            prompt: "prompt".into(),
            completion: "completion".into(),
            messages: "messages".into(),
        }
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Parses one JSONL line into an example.
pub fn parse_line(line_text: &str, line: usize, cols: &ColumnMapping) -> Result<Example, String> {
    let v: Value = serde_json::from_str(line_text).map_err(|e| format!("invalid JSON: {e}"))?;
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    if let Some(msgs) = v.get(&cols.messages).and_then(Value::as_array) {
        return parse_messages(msgs, line);
    }
    if let (Some(p), Some(c)) = (str_field(&v, &cols.prompt), str_field(&v, &cols.completion)) {
        return Ok(Example {
            system: None,
            history: vec![],
            user: p.to_string(),
            response: c.to_string(),
            label: None,
            line,
        });
    }
    let text =
        str_field(&v, &cols.text).ok_or_else(|| format!("missing string field {:?}", cols.text))?;
    let label = match v.get(&cols.label) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => return Err(format!("missing field {:?}", cols.label)),
    };
    Ok(Example {
        system: None,
        history: vec![],
        user: text.to_string(),
        response: label.clone(),
        label: Some(label),
        line,
    })
}

fn parse_messages(msgs: &[Value], line: usize) -> Result<Example, String> {
    let mut system = None;
    let mut turns: Vec<(String, String)> = Vec::new();
    for m in msgs {
        let role = str_field(m, "role").ok_or("message without role")?;
        let content = str_field(m, "content").ok_or("message without content")?;
        turns.push((role.to_string(), content.to_string()));
    }
    if let Some((r, c)) = turns.first()
        && r == "system"
    {
        system = Some(c.clone());
        turns.remove(0);
    }
    let Some((last_role, response)) = turns.pop() else {
        return Err("messages has no assistant turn".into());
    };
    if last_role != "assistant" {
        return Err("last message must be from the assistant".into());
    }
    let Some((user_role, user)) = turns.pop() else {
        return Err("messages has no user turn".into());
    };
    if user_role != "user" {
        return Err("the assistant must answer a user message".into());
    }
    if !turns.len().is_multiple_of(2) {
        return Err("messages must alternate user/assistant".into());
    }
    let mut history = Vec::new();
    for pair in turns.chunks(2) {
        match pair {
            [(ru, u), (ra, a)] if ru == "user" && ra == "assistant" => {
                history.push((u.clone(), a.clone()))
            }
            _ => return Err("messages must alternate user/assistant".into()),
        }
    }
    Ok(Example {
        system,
        history,
        user,
        response,
        label: None,
        line,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn three_shapes() {
        let cols = ColumnMapping {
            text: "review".into(),
            label: "sentiment".into(),
            ..Default::default()
        };
        let e = parse_line(r#"{"review":"nice","sentiment":"Positive"}"#, 1, &cols).unwrap();
        assert_eq!(
            (e.user.as_str(), e.label.as_deref()),
            ("nice", Some("Positive"))
        );
        let e = parse_line(r#"{"prompt":"2+2?","completion":"4"}"#, 2, &cols).unwrap();
        assert_eq!(
            (e.user.as_str(), e.response.as_str(), e.label),
            ("2+2?", "4", None)
        );
        let e = parse_line(
            r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":"hello"},{"role":"user","content":"bye"},{"role":"assistant","content":"ciao"}]}"#,
            3,
            &cols,
        )
        .unwrap();
        assert_eq!(e.system.as_deref(), Some("be brief"));
        assert_eq!(e.history, vec![("hi".to_string(), "hello".to_string())]);
        assert_eq!((e.user.as_str(), e.response.as_str()), ("bye", "ciao"));
        assert!(parse_line("{not json", 4, &cols).is_err());
        assert!(parse_line(r#"{"review":"x"}"#, 5, &cols).is_err());
    }
}
