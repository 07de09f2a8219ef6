//! Tool calling: OpenAI-style function definitions put before the model, and its answer parsed back
//! into calls. Two dialects:
//!
//! - **Hermes** (templates that write `<tool_call>{json}</tool_call>`, as Qwen's do): the template renders
//!   the tools itself; the answer's `<tool_call>` blocks become calls. A required call is forced by a
//!   grammar that allows only such blocks.
//! - **Generic** (every other template, as llama.cpp's server does for them): a system message lists the
//!   tools, and a JSON-schema grammar makes the answer either `{"tool_calls": [{"name", "arguments"}]}`
//!   or `{"response": "…"}`, so even a small model's call always parses and names a real tool with
//!   arguments of its schema.

use serde_json::{Value, json};
use ult_engine::constraint::OutputFormat;
use ult_engine::template::ChatMessage;

use crate::error::ServiceError;

/// The most tools one request may define.
pub const MAX_TOOLS: usize = 128;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDef {
    /// Its name.
    pub name: String,
    /// What it does.
    pub description: Option<String>,
    /// A JSON schema of its arguments (an object).
    pub parameters: Value,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides.
    Auto,
    /// No call: the tools are not shown.
    None,
    /// At least one call.
    Required,
    /// A call of this tool.
    Named(String),
}

/// The tools of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// The definitions.
    pub defs: Vec<ToolDef>,
    /// The choice.
    pub choice: ToolChoice,
    /// Whether one answer may make several calls (OpenAI's `parallel_tool_calls`, default true).
    pub parallel: bool,
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// An id for the result to refer to.
    pub id: String,
    /// The tool.
    pub name: String,
    /// Its arguments (a JSON object).
    pub arguments: Value,
}

/// How a model's template takes tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `<tool_call>{json}</tool_call>`, rendered by the template.
    Hermes,
    /// A system message and a JSON answer.
    Generic,
}

/// How a generation's answer is read back into calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolReading {
    /// The dialect it was asked in.
    pub dialect: Dialect,
    /// Whether several calls may come back (else the first only).
    pub parallel: bool,
}

/// What a tool request turns into before tokenizing.
#[derive(Debug, Clone)]
pub struct ToolPlan {
    /// The dialect.
    pub dialect: Dialect,
    /// The messages to render (the generic dialect adds its system message).
    pub messages: Vec<ChatMessage>,
    /// The tools for the template (Hermes only), as transformers passes them.
    pub template_tools: Option<Value>,
    /// The grammar the answer keeps to.
    pub format: OutputFormat,
}

impl ToolDef {
    /// A function definition; without `parameters` it takes none (an empty object).
    pub fn new(name: String, description: Option<String>, parameters: Option<Value>) -> Self {
        Self {
            name,
            description,
            parameters: parameters.unwrap_or_else(|| json!({"type": "object", "properties": {}})),
        }
    }
}

impl Tools {
    /// Checks the definitions and the choice, naming the bad one.
    pub fn validate(&self) -> Result<(), ServiceError> {
        if self.defs.is_empty() {
            return Err(ServiceError::invalid("tools", "the list is empty"));
        }
        if self.defs.len() > MAX_TOOLS {
            return Err(ServiceError::invalid(
                "tools",
                format!("{} tools; at most {MAX_TOOLS}", self.defs.len()),
            ));
        }
        for (i, d) in self.defs.iter().enumerate() {
            if d.name.is_empty()
                || !d
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(ServiceError::invalid(
                    "tools",
                    format!(
                        "tool {i}'s name {:?} must be letters, digits, _ or -",
                        d.name
                    ),
                ));
            }
            if self.defs[..i].iter().any(|o| o.name == d.name) {
                return Err(ServiceError::invalid(
                    "tools",
                    format!("two tools are named {:?}", d.name),
                ));
            }
            if !d.parameters.is_object() {
                return Err(ServiceError::invalid(
                    "tools",
                    format!(
                        "tool {:?}'s parameters must be a JSON schema object",
                        d.name
                    ),
                ));
            }
        }
        if let ToolChoice::Named(n) = &self.choice
            && !self.defs.iter().any(|d| &d.name == n)
        {
            return Err(ServiceError::invalid(
                "tool_choice",
                format!("no tool is named {n:?}"),
            ));
        }
        Ok(())
    }

    /// The definitions as OpenAI writes them (and templates read them).
    pub fn openai_json(&self) -> Value {
        Value::Array(
            self.defs
                .iter()
                .map(|d| {
                    json!({ "type": "function", "function": {
                        "name": d.name, "description": d.description, "parameters": d.parameters,
                    }})
                })
                .collect(),
        )
    }

    /// The tools the model may call under the choice.
    fn callable(&self) -> Vec<&ToolDef> {
        match &self.choice {
            ToolChoice::Named(n) => self.defs.iter().filter(|d| &d.name == n).collect(),
            _ => self.defs.iter().collect(),
        }
    }

    fn forced(&self) -> bool {
        matches!(self.choice, ToolChoice::Required | ToolChoice::Named(_))
    }

    /// The schema of one call `{"name", "arguments"}` of any callable tool.
    fn call_schema(&self) -> Value {
        let calls: Vec<Value> = self
            .callable()
            .into_iter()
            .map(|d| {
                json!({
                    "type": "object",
                    "properties": { "name": { "const": d.name }, "arguments": d.parameters },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        if calls.len() == 1 {
            calls.into_iter().next().unwrap_or_default()
        } else {
            json!({ "anyOf": calls })
        }
    }

    /// How to ask `dialect`'s model for calls, given the conversation.
    pub fn plan(&self, dialect: Dialect, messages: Vec<ChatMessage>) -> ToolPlan {
        match dialect {
            Dialect::Hermes => {
                let format = if self.forced() {
                    OutputFormat::Lark(format!(
                        "start: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: %json {}\n",
                        self.call_schema()
                    ))
                } else {
                    OutputFormat::Text
                };
                ToolPlan {
                    dialect,
                    messages,
                    template_tools: Some(self.openai_json()),
                    format,
                }
            }
            Dialect::Generic => {
                let mut list =
                    json!({ "type": "array", "items": self.call_schema(), "minItems": 1 });
                if !self.parallel {
                    list["maxItems"] = json!(1);
                }
                let calls = json!({
                    "type": "object",
                    "properties": { "tool_calls": list },
                    "required": ["tool_calls"],
                    "additionalProperties": false,
                });
                let schema = if self.forced() {
                    calls
                } else {
                    json!({ "anyOf": [calls, {
                        "type": "object",
                        "properties": { "response": { "type": "string" } },
                        "required": ["response"],
                        "additionalProperties": false,
                    }]})
                };
                let listing = serde_json::to_string_pretty(&self.openai_json()).unwrap_or_default();
                let ask = if self.forced() {
                    "Answer with a JSON object {\"tool_calls\": [{\"name\": …, \"arguments\": {…}}]} calling the tools the request needs."
                } else {
                    "Answer with a JSON object: {\"tool_calls\": [{\"name\": …, \"arguments\": {…}}]} to call tools, or {\"response\": \"…\"} to answer the user directly."
                };
                let note = format!("You can call these tools:\n{listing}\n{ask}");
                ToolPlan {
                    dialect,
                    messages: generic_messages(messages, &note),
                    template_tools: None,
                    format: OutputFormat::JsonSchema(schema),
                }
            }
        }
    }
}

/// The conversation as a template without tool support can render it: the tool listing joins the
/// system message, an assistant's calls become the JSON it answered with, and tool results become
/// user messages that say which call they answer.
fn generic_messages(messages: Vec<ChatMessage>, note: &str) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    let mut it = messages.into_iter().peekable();
    match it.peek() {
        Some(m) if m.role == "system" => {
            if let Some(m) = it.next() {
                out.push(ChatMessage::new(
                    "system",
                    format!("{}\n\n{note}", m.content),
                ));
            }
        }
        _ => out.push(ChatMessage::new("system", note)),
    }
    for m in it {
        match m.role.as_str() {
            "assistant" if m.tool_calls.is_some() => {
                let calls: Vec<Value> = m
                    .tool_calls
                    .iter()
                    .flat_map(|v| v.as_array().cloned().unwrap_or_default())
                    .map(|c| json!({ "name": c["function"]["name"], "arguments": c["function"]["arguments"] }))
                    .collect();
                out.push(ChatMessage::new(
                    "assistant",
                    json!({ "tool_calls": calls }).to_string(),
                ));
            }
            "tool" => {
                let result = json!({ "tool_response": {
                    "name": m.name, "id": m.tool_call_id, "content": m.content,
                }});
                out.push(ChatMessage::new("user", result.to_string()));
            }
            _ => out.push(m),
        }
    }
    out
}

/// An answer split into text and calls.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    /// Text for the user.
    pub content: String,
    /// Calls, in order.
    pub calls: Vec<ToolCall>,
}

/// Splits `text` (the whole answer) into content and calls. `id_of(i)` names call `i`. Text that does
/// not parse as a call stays content: a client sees what the model wrote, never an invented call.
pub fn parse(dialect: Dialect, text: &str, id_of: impl Fn(usize) -> String) -> Parsed {
    let call = |v: &Value, i: usize| -> Option<ToolCall> {
        let name = v.get("name")?.as_str()?.to_string();
        let arguments = match v.get("arguments") {
            Some(Value::String(s)) => serde_json::from_str(s).ok()?,
            Some(a) if a.is_object() => a.clone(),
            None => json!({}),
            Some(_) => return None,
        };
        Some(ToolCall {
            id: id_of(i),
            name,
            arguments,
        })
    };
    match dialect {
        Dialect::Generic => {
            let Ok(v) = serde_json::from_str::<Value>(text.trim()) else {
                return Parsed {
                    content: text.to_string(),
                    calls: Vec::new(),
                };
            };
            if let Some(r) = v.get("response").and_then(Value::as_str) {
                return Parsed {
                    content: r.to_string(),
                    calls: Vec::new(),
                };
            }
            let calls: Option<Vec<ToolCall>> = v
                .get("tool_calls")
                .and_then(Value::as_array)
                .map(|a| a.iter().enumerate().map(|(i, c)| call(c, i)).collect())
                .unwrap_or(None);
            match calls {
                Some(calls) if !calls.is_empty() => Parsed {
                    content: String::new(),
                    calls,
                },
                _ => Parsed {
                    content: text.to_string(),
                    calls: Vec::new(),
                },
            }
        }
        Dialect::Hermes => {
            let mut content = String::new();
            let mut calls = Vec::new();
            let mut rest = text;
            while let Some(start) = rest.find("<tool_call>") {
                let after = &rest[start + "<tool_call>".len()..];
                let Some(end) = after.find("</tool_call>") else {
                    break;
                };
                let parsed = serde_json::from_str::<Value>(after[..end].trim())
                    .ok()
                    .and_then(|v| call(&v, calls.len()));
                match parsed {
                    Some(c) => {
                        content.push_str(&rest[..start]);
                        calls.push(c);
                    }
                    None => content.push_str(
                        &rest[..start + "<tool_call>".len() + end + "</tool_call>".len()],
                    ),
                }
                rest = &after[end + "</tool_call>".len()..];
            }
            content.push_str(rest);
            Parsed {
                content: content.trim().to_string(),
                calls,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tools {
        Tools {
            defs: vec![ToolDef {
                name: "get_weather".into(),
                description: Some("Weather in a city".into()),
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            }],
            choice: ToolChoice::Auto,
            parallel: true,
        }
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(weather().validate().is_ok());
        let mut t = weather();
        t.choice = ToolChoice::Named("nope".into());
        assert!(matches!(
            t.validate(),
            Err(ServiceError::InvalidArgument {
                field: "tool_choice",
                ..
            })
        ));
        let mut t = weather();
        t.defs.push(t.defs[0].clone());
        assert!(t.validate().is_err());
        let mut t = weather();
        t.defs[0].name = "has space".into();
        assert!(t.validate().is_err());
    }

    #[test]
    fn generic_answers_parse_into_calls_or_text() {
        let id = |i: usize| format!("call_{i}");
        let p = parse(
            Dialect::Generic,
            r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}"#,
            id,
        );
        assert_eq!(p.calls.len(), 1);
        assert_eq!(p.calls[0].arguments["city"], "Paris");
        assert_eq!(p.calls[0].id, "call_0");
        let p = parse(Dialect::Generic, r#"{"response": "Hi!"}"#, id);
        assert_eq!((p.content.as_str(), p.calls.len()), ("Hi!", 0));
        // Text that is not a call stays text.
        let p = parse(Dialect::Generic, "plain words", id);
        assert_eq!((p.content.as_str(), p.calls.len()), ("plain words", 0));
    }

    #[test]
    fn hermes_blocks_become_calls_and_the_rest_stays() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>{broken}</tool_call>";
        let p = parse(Dialect::Hermes, text, |i| format!("c{i}"));
        assert_eq!(p.calls.len(), 1);
        assert_eq!(p.calls[0].name, "get_weather");
        assert!(p.content.starts_with("Let me check."));
        assert!(p.content.contains("{broken}"));
    }

    #[test]
    fn generic_plan_adds_the_listing_and_rewrites_history() {
        let history = vec![
            ChatMessage::new("user", "Weather in Paris?"),
            ChatMessage {
                role: "assistant".into(),
                tool_calls: Some(
                    json!([{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]),
                ),
                ..ChatMessage::default()
            },
            ChatMessage {
                role: "tool".into(),
                content: "18 C".into(),
                tool_call_id: Some("call_0".into()),
                ..ChatMessage::default()
            },
        ];
        let plan = weather().plan(Dialect::Generic, history);
        assert_eq!(plan.messages[0].role, "system");
        assert!(plan.messages[0].content.contains("get_weather"));
        assert!(plan.messages[2].content.contains("\"tool_calls\""));
        assert_eq!(plan.messages[3].role, "user");
        assert!(plan.messages[3].content.contains("18 C"));
        assert!(
            matches!(&plan.format, OutputFormat::JsonSchema(s) if s["anyOf"][0]["properties"]["tool_calls"].get("maxItems").is_none())
        );
        let mut single = weather();
        single.parallel = false;
        let plan = single.plan(Dialect::Generic, vec![ChatMessage::new("user", "x")]);
        assert!(
            matches!(&plan.format, OutputFormat::JsonSchema(s) if s["anyOf"][0]["properties"]["tool_calls"]["maxItems"] == 1)
        );
        let mut forced = weather();
        forced.choice = ToolChoice::Required;
        let plan = forced.plan(Dialect::Hermes, vec![ChatMessage::new("user", "x")]);
        assert!(matches!(plan.format, OutputFormat::Lark(g) if g.contains("<tool_call>")));
    }
}
