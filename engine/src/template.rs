//! Chat templates from a model's `tokenizer.chat_template`, rendered with minijinja and Python-style
//! string methods, as Hugging Face's transformers renders them.

use minijinja::{Environment, Error, ErrorKind, context};
use serde::Serialize;

use super::EngineError;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct ChatMessage {
    /// "system", "user", "assistant" or "tool".
    pub role: String,
    /// The text.
    pub content: String,
    /// An assistant's tool calls, as templates receive them from transformers:
    /// `[{"type": "function", "function": {"name", "arguments": {…}}}]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A tool result's call id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A tool result's tool name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message of plain text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Whether the template renders a `tools` list (and so knows its model's tool-call format).
    renders_tools: bool,
    /// Whether it writes tool calls as `<tool_call>{json}</tool_call>` (the Hermes format Qwen uses).
    hermes_tools: bool,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are the texts templates may insert.
    pub fn new(source: &str, bos_token: String, eos_token: String) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        // transformers renders chat templates with trim_blocks and lstrip_blocks on.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| EngineError::Template {
                reason: e.to_string(),
            })?;
        env.set_syntax(syntax);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| EngineError::Template {
                reason: e.to_string(),
            })?;
        Ok(Self {
            env,
            source: source.to_string(),
            renders_tools: source.contains("tools"),
            hermes_tools: source.contains("<tool_call>"),
            bos_token,
            eos_token,
        })
    }

    /// The template's source, as the model file carries it.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template renders a `tools` list itself.
    pub fn renders_tools(&self) -> bool {
        self.renders_tools
    }

    /// Whether the template's tool calls are `<tool_call>{json}</tool_call>` blocks.
    pub fn hermes_tools(&self) -> bool {
        self.hermes_tools
    }

    /// Renders `messages`, ending with the assistant's turn opener when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Renders `messages` with `tools` (OpenAI-style function definitions, as templates receive them
    /// from transformers' `apply_chat_template(tools=...)`); None leaves `tools` undefined.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Template {
                reason: e.to_string(),
            })?;
        template
            .render(context! {
                messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                tools => tools.map(|t| minijinja::Value::from(minijinja::value::Serde(t))),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| EngineError::Template {
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml() {
        let src = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = ChatTemplate::new(src, String::new(), "<|im_end|>".into()).unwrap();
        let out = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_exceptions() {
        let src = "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::new(src, String::new(), String::new()).unwrap();
        let ok = t.render(&[ChatMessage::new("user", "  hi ")], false);
        assert_eq!(ok.unwrap(), "HI");
        let err = t.render(&[ChatMessage::new("bad", String::new())], false);
        assert!(
            matches!(err, Err(EngineError::Template { reason }) if reason.contains("no bad roles"))
        );
        assert!(ChatTemplate::new("{% for %}", String::new(), String::new()).is_err());
    }
}
