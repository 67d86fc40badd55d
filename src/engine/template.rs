//! Chat templates: the GGUF's own `tokenizer.chat_template` (Jinja) rendered with minijinja the
//! way Hugging Face renders it (trim_blocks, lstrip_blocks, Python string methods,
//! `strftime_now`, `raise_exception`).

use minijinja::{context, Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the model has no chat template (tokenizer.chat_template)")]
    Missing,
    #[error("the chat template does not compile: {0}")]
    Compile(String),
    #[error("the chat template failed: {0}")]
    Render(String),
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_owned(),
            content: content.to_owned(),
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

const NAME: &str = "chat";

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            chrono::Local::now().format(&fmt).to_string()
        });
        env.add_template_owned(NAME, hf_extensions(source))
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        Ok(Self {
            env,
            bos: bos.to_owned(),
            eos: eos.to_owned(),
        })
    }

    /// Renders `messages`; `enable_thinking: None` leaves the template's own default.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        let base = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        };
        let ctx = match enable_thinking {
            Some(t) => context! { enable_thinking => t, ..base },
            None => base,
        };
        tmpl.render(ctx).map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            TemplateError::Render(msg)
        })
    }
}

/// Hugging Face's `{% generation %}…{% endgeneration %}` (it marks assistant tokens for
/// training masks; SmolLM3's template uses it) renders its body as it is: it becomes an
/// `{% if true %}…{% endif %}` with the same whitespace control.
fn hf_extensions(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else { break };
        let inner = &tag[2..end];
        let (lead, body, trail) = (
            inner.starts_with('-'),
            inner.trim_matches(|c: char| c == '-' || c.is_whitespace()),
            inner.ends_with('-'),
        );
        let replacement = match body {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str(&format!(
                    "{{%{} {r} {}%}}",
                    if lead { "-" } else { "" },
                    if trail { "-" } else { "" }
                ));
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn generation_blocks_render_their_body() {
        let t = super::ChatTemplate::new(
            "a{%- generation -%} b {%- endgeneration %}c{% if true %}d{% endif %}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(t.render(&[], false, None).unwrap(), "abcd");
    }

    use super::*;

    #[test]
    fn renders_python_methods_and_errors_clearly() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content.strip().upper() }}|{% endfor %}{% if add_generation_prompt %}GO{% endif %}",
            "",
            "",
        )
        .unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "  hi ")], true, None)
            .unwrap();
        assert_eq!(out, "HI|GO");
        let bad = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        let err = bad.render(&[], false, None).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }

    #[test]
    fn strftime_now_is_available() {
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}", "", "").unwrap();
        let y = t.render(&[], false, None).unwrap();
        assert_eq!(y.len(), 4);
    }
}
