//! Chat templates: the Jinja template a model ships (GGUF `tokenizer.chat_template` or
//! tokenizer_config.json) rendered with minijinja the way `transformers` renders it
//! (`trim_blocks`, `lstrip_blocks`, Python string methods, `raise_exception`).
//!
//! Templates come from model files, which adapterd treats as untrusted input: rendering has a
//! recursion limit and an output cap, and a template can only produce a string. Nothing here
//! tokenizes; the caller encodes the rendered prompt.

use std::io::{self, Write};

use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::TokenizerError;

/// The template name inside our private environment.
const NAME: &str = "chat";
/// Nested blocks/loops/macros deep enough for every real template, shallow enough that a
/// hostile one cannot blow the stack.
const RECURSION_LIMIT: usize = 100;
/// A rendered prompt larger than this is a runaway template (a loop printing the conversation
/// over and over), not a conversation; it is refused instead of filling memory.
const MAX_OUTPUT_BYTES: usize = 16 << 20;
/// Marks errors raised by the template's own `raise_exception`, to tell them apart from
/// minijinja's errors of the same kind.
const RAISED: &str = "raise_exception: ";

/// One turn of a conversation, as the OpenAI API and chat templates know it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template. `Environment<'static>` is `Send + Sync`, so one compiled copy is
/// shared by every request.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` once, so a broken template is reported when the model loads rather
    /// than on the first chat request.
    pub(crate) fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        // transformers compiles chat templates with trim_blocks and lstrip_blocks; without them
        // every `{% ... %}` line leaves a stray newline or indentation in the prompt.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_recursion_limit(RECURSION_LIMIT);
        // Templates are written for Python Jinja and call str/dict methods (`.strip()`,
        // `.items()`, `.startswith()`); pycompat provides them.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("{RAISED}{msg}"),
            ))
        });
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| {
                TokenizerError::Template(format!("the chat template does not compile: {e:#}"))
            })?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        })
    }

    pub(crate) fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        let mut out = CappedWriter {
            buf: Vec::new(),
            cap: MAX_OUTPUT_BYTES,
        };
        template.render_captured_to(ctx, &mut out).map_err(|e| {
            if let Some(msg) = e.detail().and_then(|d| d.strip_prefix(RAISED)) {
                // raise_exception: the template's own message is what the user must read
                // (e.g. "Conversation roles must alternate user/assistant/user/assistant/...").
                TokenizerError::TemplateRejected(msg.to_owned())
            } else if e.kind() == ErrorKind::WriteFailure {
                TokenizerError::Template(format!(
                    "the chat template produced more than {MAX_OUTPUT_BYTES} bytes"
                ))
            } else {
                TokenizerError::Template(format!("rendering the chat template failed: {e:#}"))
            }
        })?;
        String::from_utf8(out.buf).map_err(|_| {
            TokenizerError::Template("the chat template produced invalid UTF-8".into())
        })
    }
}

/// A `Write` that fails once `cap` bytes have been written, bounding what a template can emit.
struct CappedWriter {
    buf: Vec<u8>,
    cap: usize,
}

impl Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > self.cap {
            return Err(io::Error::other("chat template output limit reached"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, verbatim from the GGUF's tokenizer.chat_template.
    pub(crate) const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn smollm2_system_user_with_generation_prompt() {
        let t = ChatTemplate::new(SMOLLM2_TEMPLATE, None, Some("<|im_end|>".into())).unwrap();
        let out = t
            .render(
                &[msg("system", "You are terse."), msg("user", "What is 2+2?")],
                true,
            )
            .unwrap();
        // Expected string = transformers' apply_chat_template(..., tokenize=False,
        // add_generation_prompt=True) for this template.
        assert_eq!(
            out,
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_default_system_prompt_without_generation_prompt() {
        let t = ChatTemplate::new(SMOLLM2_TEMPLATE, None, None).unwrap();
        let out = t.render(&[msg("user", "Hi")], false).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn trim_blocks_and_python_methods_like_transformers() {
        // A Llama-2 style template: block tags on their own lines, `.strip()`, bos_token and
        // raise_exception, as transformers renders them.
        let src = "{% for m in messages %}\n  {% if m.role == 'user' %}\n{{ bos_token }}[INST] {{ m.content.strip() }} [/INST]\n  {% elif m.role == 'assistant' %}\n{{ m['content'] }}{{ eos_token }}\n  {% else %}\n{{ raise_exception('Only user and assistant roles are supported!') }}\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into())).unwrap();
        let out = t
            .render(&[msg("user", "  hi  "), msg("assistant", "hello")], false)
            .unwrap();
        assert_eq!(out, "<s>[INST] hi [/INST]\nhello</s>\n");
        let err = t.render(&[msg("system", "x")], false).unwrap_err();
        assert!(
            matches!(&err, TokenizerError::TemplateRejected(m) if m == "Only user and assistant roles are supported!"),
            "{err:?}"
        );
    }

    #[test]
    fn hostile_templates_fail_cleanly() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", None, None),
            Err(TokenizerError::Template(_))
        ));
        let runaway = "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'xxxxxxxxxxxxxxxx' }}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(runaway, None, None).unwrap();
        let err = t.render(&[], false).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        // A template bug is a template error, not the conversation's fault.
        let buggy = ChatTemplate::new("{{ 1 + 'a' }}", None, None).unwrap();
        assert!(matches!(
            buggy.render(&[], false),
            Err(TokenizerError::Template(_))
        ));
        let deep = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
        let t = ChatTemplate::new(deep, None, None).unwrap();
        assert!(t.render(&[], false).is_err());
    }
}
