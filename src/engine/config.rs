//! [`ModelConfig`]: the shape of a model, read from GGUF metadata.

use super::gguf::{GgufError, GgufFile};

/// Transformer architectures this engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    /// Llama with "NoPE" layers: every fourth layer skips RoPE.
    Smollm3,
}

impl Architecture {
    /// Which of `n_layers` layers apply RoPE. SmolLM3 skips it on every fourth layer (3, 7,
    /// 11, …): llama.cpp's rule; the GGUF carries no key for it.
    pub fn rope_layers(self, n_layers: usize) -> Vec<bool> {
        (0..n_layers)
            .map(|i| match self {
                Architecture::Llama => true,
                Architecture::Smollm3 => (i + 1) % 4 != 0,
            })
            .collect()
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub n_layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Dimensions of each head that RoPE rotates (usually all of them).
    pub rope_dims: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
    /// No `output.weight`: logits come from `token_embd.weight`.
    pub tied_embeddings: bool,
    /// `use_rope[i]`: whether layer `i` applies RoPE.
    pub use_rope: Vec<bool>,
}

/// Bounds that keep a hostile file from asking for absurd buffers.
const MAX_DIM: u64 = 1 << 17;
const MAX_LAYERS: u64 = 1024;

impl ModelConfig {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, GgufError> {
        let arch_name = f.get_str("general.architecture")?;
        let arch = match arch_name {
            "llama" => Architecture::Llama,
            "smollm3" => Architecture::Smollm3,
            other => {
                return Err(GgufError::Implausible(format!(
                    "architecture `{other}` is not supported (llama and smollm3 are)"
                )))
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let bounded = |k: &str, max: u64| -> Result<usize, GgufError> {
            let v = f.get_u64(&key(k))?;
            if v == 0 || v > max {
                return Err(GgufError::Implausible(format!("{k} = {v}")));
            }
            Ok(v as usize)
        };
        let n_layers = bounded("block_count", MAX_LAYERS)?;
        let hidden = bounded("embedding_length", MAX_DIM)?;
        let intermediate = bounded("feed_forward_length", MAX_DIM * 4)?;
        let n_heads = bounded("attention.head_count", 1024)?;
        let n_kv_heads = match f.get_u64(&key("attention.head_count_kv")) {
            Ok(_) => bounded("attention.head_count_kv", 1024)?,
            Err(_) => n_heads,
        };
        if hidden % n_heads != 0 || n_heads % n_kv_heads != 0 {
            return Err(GgufError::Implausible(format!(
                "{hidden} hidden, {n_heads} heads, {n_kv_heads} kv heads"
            )));
        }
        let head_dim = hidden / n_heads;
        let rope_dims = match f.get_u64(&key("rope.dimension_count")) {
            Ok(v) if v as usize <= head_dim && v % 2 == 0 && v > 0 => v as usize,
            Ok(v) => return Err(GgufError::Implausible(format!("rope dimensions {v}"))),
            Err(_) => head_dim,
        };
        let rope_base = f.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0) as f32;
        let rms_eps = f.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32;
        let context_length = f
            .get_u64(&key("context_length"))
            .unwrap_or(4096)
            .clamp(1, 1 << 20) as usize;
        let embd = f.tensor("token_embd.weight")?;
        let vocab_size = embd.n_rows();
        if embd.row_len() != hidden {
            return Err(GgufError::Implausible(format!(
                "token_embd rows are {} long, the model is {hidden} wide",
                embd.row_len()
            )));
        }
        let tied_embeddings = !f.tensors.contains_key("output.weight");
        let use_rope = arch.rope_layers(n_layers);
        Ok(Self {
            arch,
            n_layers,
            hidden,
            intermediate,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dims,
            rope_base,
            rms_eps,
            context_length,
            vocab_size,
            tied_embeddings,
            use_rope,
        })
    }

    /// Bytes of K and V that one token occupies in an f16 cache.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim * 2
    }
}
