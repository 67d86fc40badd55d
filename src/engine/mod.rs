//! The inference engine: GGUF reading, the quantized transformer with its packed-batch forward,
//! KV caches, tokenizer, chat template, sampler and reasoning splitter.
//!
//! Plain synchronous Rust: no async runtime, no actors, no SQL. The model actor drives it.

pub mod config;
mod cpu;
pub mod device;
pub mod generate;
pub mod gguf;
#[cfg(feature = "candle")]
mod gpu;
pub mod interleaved;
pub mod kv;
pub mod matmul;
pub mod model;
pub mod pool;
pub mod quant;
pub mod reasoning;
pub mod sampler;
pub mod simd;
pub mod template;
pub mod tokenizer;

use std::path::Path;

pub use config::{Architecture, ModelConfig};
pub use device::{DeviceChoice, Placement};
pub use generate::{FinishReason, SequenceState, StopCondition};
pub use kv::{KvCache, KvFormat};
pub use model::{DeviceKernels, LoadOptions, Logits, Model, SeqInput, StepOutput, SyntheticQuant};
pub use sampler::{Sampler, SamplingParams};
pub use template::{ChatMessage, ChatTemplate};
pub use tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file {path} does not exist; run `smolchat fetch-model` to get the default model, or pass --model PATH")]
    ModelMissing { path: String },
    #[error("model file {path} cannot be read: {source}")]
    ModelUnreadable {
        path: String,
        source: gguf::GgufError,
    },
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Template(#[from] template::TemplateError),
    #[error("a sequence in the batch has no tokens")]
    EmptyInput,
    #[error("token id {0} is outside the vocabulary of {1}")]
    TokenOutOfRange(u32, usize),
    #[error("the prompt needs {needed} positions but the context holds {context}")]
    ContextOverflow { needed: usize, context: usize },
    #[error("the KV cache was made for another model or device")]
    CacheShape,
    #[error("the device's KV cache is full: the step needs {needed} blocks, {free} are free")]
    KvFull { needed: usize, free: usize },
    #[error("device {device} cannot be used: {why}")]
    DeviceUnavailable { device: String, why: String },
    #[error("the device failed: {0}")]
    Device(String),
    #[error("not supported: {0}")]
    Unsupported(String),
}

/// A loaded model with everything needed to chat with it.
pub struct Engine {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// Tokens that end a generation (EOS, `<|im_end|>`, …).
    pub end_of_generation: Vec<u32>,
}

impl Engine {
    /// Opens a GGUF model; a `tokenizer.json` beside it takes the place of the GGUF vocabulary.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        Self::load_with_progress(path, &|_, _| {})
    }

    /// As [`Engine::load`], calling `progress(done, total)` in bytes of weights as they load.
    pub fn load_with_progress(
        path: &Path,
        progress: &dyn Fn(u64, u64),
    ) -> Result<Self, EngineError> {
        Self::load_with(path, &LoadOptions::default(), progress)
    }

    /// As [`Engine::load_with_progress`], onto the device `opts` names.
    pub fn load_with(
        path: &Path,
        opts: &LoadOptions,
        progress: &dyn Fn(u64, u64),
    ) -> Result<Self, EngineError> {
        if !path.exists() {
            return Err(EngineError::ModelMissing {
                path: path.display().to_string(),
            });
        }
        let file = gguf::GgufFile::open(path).map_err(|source| EngineError::ModelUnreadable {
            path: path.display().to_string(),
            source,
        })?;
        let total: u64 = file.tensors.values().map(|t| t.len as u64).sum();
        let done = std::cell::Cell::new(0u64);
        let model = Model::load(&file, None, opts, &|n| {
            done.set(done.get() + n);
            progress(done.get(), total);
        })?;
        let beside = path.with_file_name("tokenizer.json");
        let mut tokenizer = Tokenizer::from_gguf(&file);
        if beside.exists() {
            let eos = file
                .get_u64("tokenizer.ggml.eos_token_id")
                .ok()
                .map(|v| v as u32);
            let bos = file
                .get_u64("tokenizer.ggml.bos_token_id")
                .ok()
                .map(|v| v as u32);
            tokenizer = Tokenizer::from_file(&beside, eos, bos);
        }
        let tokenizer = tokenizer?;
        if tokenizer.vocab_size() < model.cfg.vocab_size {
            return Err(EngineError::Tokenizer(tokenizer::TokenizerError::Build(
                format!(
                    "the vocabulary has {} tokens, the model {}",
                    tokenizer.vocab_size(),
                    model.cfg.vocab_size
                ),
            )));
        }
        let text_of = |id: Option<u32>| id.map(|i| tokenizer.decode(&[i])).unwrap_or_default();
        let template = match file.get_str("tokenizer.chat_template") {
            Ok(src) => Some(ChatTemplate::new(
                src,
                &text_of(tokenizer.bos_id),
                &text_of(tokenizer.eos_id),
            )?),
            Err(_) => None,
        };
        let mut end_of_generation: Vec<u32> = tokenizer.eos_id.into_iter().collect();
        for name in [
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<|end_of_text|>",
        ] {
            if let Some(id) = tokenizer.token_id(name) {
                if tokenizer.is_special(id) && !end_of_generation.contains(&id) {
                    end_of_generation.push(id);
                }
            }
        }
        tracing::info!(
            path = %path.display(),
            arch = ?model.cfg.arch,
            layers = model.cfg.n_layers,
            hidden = model.cfg.hidden,
            context = model.cfg.context_length,
            device = %model.device_name(),
            "model loaded"
        );
        Ok(Self {
            model,
            tokenizer,
            template,
            end_of_generation,
        })
    }

    /// Renders a chat with the model's template and tokenizes it.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> Result<(String, Vec<u32>), EngineError> {
        let t = self
            .template
            .as_ref()
            .ok_or(template::TemplateError::Missing)?;
        let text = t.render(messages, add_generation_prompt, enable_thinking)?;
        let ids = self.tokenizer.encode(&text, true)?;
        Ok((text, ids))
    }
}
