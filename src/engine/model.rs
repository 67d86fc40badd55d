//! The quantized transformer (llama and smollm3) and its packed-batch forward.
//!
//! One call to [`Model::forward`] takes several sequences, each with its own new tokens (a
//! prompt chunk or one decode token), its own KV cache and start position. Every linear layer
//! runs once over all rows of all sequences; attention runs per sequence over that sequence's
//! cache; logits are computed only for the rows that are asked for.
//!
//! Two backends run it: the CPU engine ([`super::cpu`]) and, with the `candle` feature, candle
//! tensors on a CUDA GPU or candle's CPU device ([`super::gpu`]). Both are built from the same
//! [`Weights`] layout, so the tensor names and shapes of a GGUF file live in one place.

use std::sync::Arc;

use super::config::{Architecture, ModelConfig};
use super::cpu::CpuWeights;
use super::device::Placement;
use super::gguf::{GgufError, GgufFile, TensorInfo};
use super::kv::{BlockPool, KvCache, KvFormat, KvShape};
use super::matmul::SharedBytes;
use super::quant::{dequantize_row, GgmlType};
use super::EngineError;

/// Which rows of a sequence need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
    /// Only the last row's most likely token, worked out where the logits are: from a GPU four
    /// bytes come back instead of the whole vocabulary. Of exactly equal logits the CPU picks
    /// the first; candle's GPU argmax may pick another.
    Greedy,
}

/// What a step gives one sequence, as its [`Logits`] asked.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutput {
    /// `vocab` floats per row asked for: none, the last row's, or every row's.
    Logits(Vec<f32>),
    /// The last row's most likely token ([`Logits::Greedy`]).
    Token(u32),
}

impl StepOutput {
    /// The logits rows; none for a token.
    pub fn into_logits(self) -> Vec<f32> {
        match self {
            StepOutput::Logits(l) => l,
            StepOutput::Token(_) => Vec::new(),
        }
    }
}

/// One sequence's part of a packed batch.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    /// Holds positions `0..cache.len()`; the new tokens go after them.
    pub cache: &'a mut KvCache,
    pub logits: Logits,
}

/// The weights of one layer, whichever backend holds them.
pub(super) struct LayerWeights<M, V> {
    pub attn_norm: V,
    pub wq: M,
    pub wk: M,
    pub wv: M,
    pub wo: M,
    pub ffn_norm: V,
    pub w_gate: M,
    pub w_up: M,
    pub w_down: M,
}

/// Every weight of the model; `output` is a clone of `embed` when the embeddings are tied.
pub(super) struct Weights<M, V> {
    pub embed: M,
    pub layers: Vec<LayerWeights<M, V>>,
    pub out_norm: V,
    pub output: M,
}

/// A weight matrix in its GGUF blocks: `rows` rows of `cols` values, at `start` in `bytes`.
pub(super) struct RawMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: SharedBytes,
    pub start: usize,
    /// Gives the mapped pages back to the OS once the backend holds its own copy.
    pub release: Option<Box<dyn FnOnce() + 'a>>,
}

impl RawMatrix<'_> {
    pub fn data(&self) -> &[u8] {
        let all: &[u8] = (*self.bytes).as_ref();
        &all[self.start..self.start + self.ty.row_bytes(self.cols) * self.rows]
    }
}

/// Where weights come from: a GGUF file, or random bytes (benchmarks of shapes we can't
/// download).
pub(super) enum WeightSource<'a> {
    File {
        f: &'a GgufFile,
        progress: &'a dyn Fn(u64),
    },
    Random {
        quant: SyntheticQuant,
        n_layers: usize,
        state: u64,
    },
}

/// Weight formats of a model with random weights: one type for every matrix, or the mix that
/// llama.cpp's quantizer makes for `Q4_K_M` (the flagship's file) or `Q5_K_M`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyntheticQuant {
    All(GgmlType),
    Q4KM,
    Q5KM,
}

impl SyntheticQuant {
    /// The type of tensor `name` in a model of `n_layers`. For `Q4_K_M` and `Q5_K_M`,
    /// llama.cpp's rule: Q6_K for the output projection (the tied embedding table here) and
    /// for `attn_v` and `ffn_down` in the first and last eighth of the layers and every third
    /// layer between, Q4_K (Q5_K) for the rest.
    fn type_for(self, name: &str, n_layers: usize) -> GgmlType {
        let base = match self {
            Self::All(ty) => return ty,
            Self::Q4KM => GgmlType::Q4K,
            Self::Q5KM => GgmlType::Q5K,
        };
        let layer = name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let eighth = n_layers / 8;
        let more_bits = |i: usize| i < eighth || i >= 7 * n_layers / 8 || (i - eighth) % 3 == 2;
        match layer {
            None => GgmlType::Q6K,
            Some(i)
                if (name.contains(".attn_v.") || name.contains(".ffn_down.")) && more_bits(i) =>
            {
                GgmlType::Q6K
            }
            Some(_) => base,
        }
    }
}

impl<'a> WeightSource<'a> {
    fn matrix(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<RawMatrix<'a>, EngineError> {
        match self {
            Self::File { f, .. } => {
                let f: &'a GgufFile = f;
                let t = f.tensor(name)?;
                check_shape(t, &[cols, rows])?;
                Ok(RawMatrix {
                    ty: t.ty,
                    rows,
                    cols,
                    bytes: f.shared_bytes(),
                    start: t.start,
                    release: Some(Box::new(move || f.release(t))),
                })
            }
            Self::Random {
                quant,
                n_layers,
                state,
            } => {
                // A row that is no whole number of blocks (SmolLM2's 576 in 256-value K-quant
                // blocks) takes Q8_0, as llama.cpp's quantizer falls back too.
                let ty = quant.type_for(name, *n_layers);
                let ty = if cols.is_multiple_of(ty.block().0) {
                    ty
                } else {
                    GgmlType::Q8_0
                };
                let mut b: Vec<u8> = (0..ty.row_bytes(cols) * rows)
                    .map(|_| {
                        *state ^= *state << 13;
                        *state ^= *state >> 7;
                        *state ^= *state << 17;
                        *state as u8
                    })
                    .collect();
                super::quant::sanitize_random_scales(ty, &mut b);
                Ok(RawMatrix {
                    ty,
                    rows,
                    cols,
                    bytes: Arc::new(b),
                    start: 0,
                    release: None,
                })
            }
        }
    }

    /// Tells the progress callback that a matrix is in the backend's hands.
    fn loaded(&self, raw_bytes: usize) {
        if let Self::File { progress, .. } = self {
            progress(raw_bytes as u64);
        }
    }

    fn vector(&mut self, name: &str, n: usize) -> Result<Vec<f32>, EngineError> {
        match self {
            Self::File { f, .. } => {
                let t = f.tensor(name)?;
                check_shape(t, &[n])?;
                if !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                    return Err(bad_tensor(t, "a norm must be a float vector"));
                }
                let mut v = vec![0f32; n];
                dequantize_row(t.ty, f.bytes(t), &mut v);
                Ok(v)
            }
            Self::Random { .. } => Ok(vec![1.0; n]),
        }
    }
}

impl<M: Clone, V> Weights<M, V> {
    /// Reads every weight of `cfg`'s shape from `src`, turning matrices into the backend's own
    /// with `matrix` and norms with `vector`.
    pub fn build<'a>(
        cfg: &ModelConfig,
        src: &mut WeightSource<'a>,
        matrix: &mut dyn FnMut(RawMatrix<'a>) -> Result<M, EngineError>,
        vector: &mut dyn FnMut(Vec<f32>) -> Result<V, EngineError>,
    ) -> Result<Self, EngineError> {
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let mut mat = |src: &mut WeightSource<'a>, name: &str, rows, cols| {
            let raw = src.matrix(name, rows, cols)?;
            let n = raw.data().len();
            let m = matrix(raw)?;
            src.loaded(n);
            Ok::<M, EngineError>(m)
        };
        let embed = mat(src, "token_embd.weight", cfg.vocab_size, h)?;
        let tied = cfg.tied_embeddings || matches!(src, WeightSource::Random { .. });
        let output = if tied {
            embed.clone()
        } else {
            mat(src, "output.weight", cfg.vocab_size, h)?
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(LayerWeights {
                attn_norm: vector(src.vector(&p("attn_norm"), h)?)?,
                wq: mat(src, &p("attn_q"), cfg.n_heads * hd, h)?,
                wk: mat(src, &p("attn_k"), cfg.n_kv_heads * hd, h)?,
                wv: mat(src, &p("attn_v"), cfg.n_kv_heads * hd, h)?,
                wo: mat(src, &p("attn_output"), h, cfg.n_heads * hd)?,
                ffn_norm: vector(src.vector(&p("ffn_norm"), h)?)?,
                w_gate: mat(src, &p("ffn_gate"), cfg.intermediate, h)?,
                w_up: mat(src, &p("ffn_up"), cfg.intermediate, h)?,
                w_down: mat(src, &p("ffn_down"), h, cfg.intermediate)?,
            });
        }
        let out_norm = vector(src.vector("output_norm.weight", h)?)?;
        Ok(Self {
            embed,
            layers,
            out_norm,
            output,
        })
    }
}

enum Backend {
    Cpu(CpuWeights),
    #[cfg(feature = "candle")]
    Candle(Box<super::gpu::CandleModel>),
}

pub struct Model {
    pub cfg: ModelConfig,
    /// Float activations in every matmul instead of 8-bit ones (CPU backend; see
    /// [`super::matmul::QuantizedRows`]).
    pub precise: bool,
    kv_format: KvFormat,
    backend: Backend,
}

/// How a model is placed: the device, and how much KV cache a device backend sets aside.
#[derive(Clone)]
pub struct LoadOptions {
    pub placement: Placement,
    /// Bytes of KV blocks a device backend allocates up front (the scheduler's budget).
    pub kv_bytes: usize,
    /// How the CPU backend stores KV caches (a device keeps f16).
    pub kv_format: KvFormat,
    /// Which of the device backend's kernels to use.
    pub device_kernels: DeviceKernels,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            placement: Placement::Cpu,
            kv_bytes: 1 << 30,
            kv_format: KvFormat::F16,
            device_kernels: DeviceKernels::from_env(),
        }
    }
}

/// The device backend's kernel choices: its own kernels by default; candle's paths stay
/// selectable (`SMOLCHAT_DECODE_ATTENTION=gathered`, `SMOLCHAT_KV_WRITE=scatter`) to compare
/// against on a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceKernels {
    /// Decode rows through the paged attention kernel, straight from the KV blocks (where it
    /// serves the model's heads); otherwise gathered into padded copies, in groups.
    pub paged_decode: bool,
    /// RoPE and the new K/V rows through smolchat's kernels; otherwise candle's `rope_i` (after
    /// a contiguous copy) and `scatter_set`.
    pub kv_write_kernel: bool,
    /// Gathered decode attention: what one more group costs, in padded key rows
    /// (`SMOLCHAT_DECODE_GROUP_COST`; 64 sequences × 256 positions until measured on a GPU).
    pub decode_group_cost: usize,
}

impl DeviceKernels {
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok();
        Self {
            paged_decode: var("SMOLCHAT_DECODE_ATTENTION").as_deref() != Some("gathered"),
            kv_write_kernel: var("SMOLCHAT_KV_WRITE").as_deref() != Some("scatter"),
            decode_group_cost: var("SMOLCHAT_DECODE_GROUP_COST")
                .and_then(|v| v.parse().ok())
                .unwrap_or(16384),
        }
    }
}

impl Model {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, EngineError> {
        Self::from_gguf_with_arch(f, None)
    }

    /// Loads the model; `arch` overrides the file's architecture (tests use it to show that a
    /// smollm3 file read as llama gives different logits).
    pub fn from_gguf_with_arch(
        f: &GgufFile,
        arch: Option<Architecture>,
    ) -> Result<Self, EngineError> {
        Self::load(f, arch, &LoadOptions::default(), &|_| {})
    }

    /// Loads the model onto `opts.placement`, calling `progress` with the bytes of each weight
    /// matrix as it is ready.
    pub fn load(
        f: &GgufFile,
        arch: Option<Architecture>,
        opts: &LoadOptions,
        progress: &dyn Fn(u64),
    ) -> Result<Self, EngineError> {
        let mut cfg = ModelConfig::from_gguf(f)?;
        if let Some(a) = arch {
            cfg.arch = a;
            cfg.use_rope = a.rope_layers(cfg.n_layers);
        }
        Self::build(cfg, WeightSource::File { f, progress }, opts)
    }

    /// Builds a model of the given shape with random weights in `quant` (benchmarks).
    pub fn synthetic(cfg: ModelConfig, quant: SyntheticQuant, seed: u64) -> Self {
        Self::synthetic_on(cfg, quant, seed, &LoadOptions::default())
            .expect("random weights on the CPU cannot fail")
    }

    /// As [`Model::synthetic`], on a chosen device.
    pub fn synthetic_on(
        cfg: ModelConfig,
        quant: SyntheticQuant,
        seed: u64,
        opts: &LoadOptions,
    ) -> Result<Self, EngineError> {
        let src = WeightSource::Random {
            quant,
            n_layers: cfg.n_layers,
            state: seed | 1,
        };
        Self::build(cfg, src, opts)
    }

    fn build(
        cfg: ModelConfig,
        mut src: WeightSource,
        opts: &LoadOptions,
    ) -> Result<Self, EngineError> {
        let backend = match &opts.placement {
            Placement::Cpu => {
                let w = Weights::build(
                    &cfg,
                    &mut src,
                    &mut |raw| Ok(super::cpu::matrix(raw)),
                    &mut |v| Ok(v),
                )?;
                let cpu = CpuWeights::new(w, &cfg);
                if let WeightSource::File { f, .. } = &src {
                    // Header, norms (copied out) and tensors (each in its copy): the file's
                    // pages are needed no more.
                    if !cpu.borrows_the_file() {
                        f.release_all();
                    }
                }
                Backend::Cpu(cpu)
            }
            #[cfg(feature = "candle")]
            Placement::Candle(device) => Backend::Candle(Box::new(super::gpu::CandleModel::build(
                &cfg, &mut src, device, opts,
            )?)),
        };
        let mut model = Self {
            cfg,
            precise: false,
            kv_format: KvFormat::F16,
            backend,
        };
        model.set_kv_format(opts.kv_format)?;
        Ok(model)
    }

    /// How new caches store K and V. 8-bit needs the CPU backend and a head size that is a
    /// multiple of 32; caches made before keep their format (and no longer fit this model).
    pub fn set_kv_format(&mut self, format: KvFormat) -> Result<(), EngineError> {
        if format.is_quantized() {
            if !matches!(self.backend, Backend::Cpu(_)) {
                return Err(EngineError::Unsupported(
                    "a quantized KV cache is for the CPU backend only".into(),
                ));
            }
            if !self.cfg.head_dim.is_multiple_of(super::kv::Q8_GROUP) {
                return Err(EngineError::Unsupported(format!(
                    "a quantized KV cache needs a head size that is a multiple of 32 (this model: {})",
                    self.cfg.head_dim
                )));
            }
        }
        self.kv_format = format;
        Ok(())
    }

    /// Where the model runs, in words ("cpu", "cuda:0", …).
    pub fn device_name(&self) -> String {
        match &self.backend {
            Backend::Cpu(_) => "cpu".into(),
            #[cfg(feature = "candle")]
            Backend::Candle(m) => m.device_name(),
        }
    }

    /// Bytes of device memory in use and in all, where the device can tell (GPUs).
    pub fn device_memory(&self) -> Option<(usize, usize)> {
        match &self.backend {
            Backend::Cpu(_) => None,
            #[cfg(feature = "candle")]
            Backend::Candle(m) => m.device_memory(),
        }
    }

    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            format: self.kv_format,
            ..KvShape::of(&self.cfg)
        }
    }

    /// An empty cache for this model, on its device.
    pub fn new_cache(&self) -> KvCache {
        match self.block_pool() {
            None => KvCache::new(self.kv_shape()),
            Some(pool) => KvCache::on_device(self.kv_shape(), pool.clone()),
        }
    }

    /// Bytes the device's KV block pool holds (`None` on the CPU): no budget can be larger.
    pub fn kv_pool_bytes(&self) -> Option<usize> {
        self.block_pool()
            .map(|p| p.total() * self.kv_shape().block_bytes())
    }

    /// The device's KV block pool (`None` on the CPU, where blocks are plain memory).
    pub fn block_pool(&self) -> Option<&Arc<BlockPool>> {
        match &self.backend {
            Backend::Cpu(_) => None,
            #[cfg(feature = "candle")]
            Backend::Candle(m) => Some(m.pool()),
        }
    }

    /// Runs one packed step. Returns, per sequence, its logits rows (`vocab` floats each: none,
    /// the last row's, or every row's, as asked; none for [`Logits::Greedy`], which [`Self::step`]
    /// answers). A batch that fails the checks changes no cache.
    pub fn forward(&self, batch: &mut [SeqInput]) -> Result<Vec<Vec<f32>>, EngineError> {
        Ok(self
            .step(batch)?
            .into_iter()
            .map(StepOutput::into_logits)
            .collect())
    }

    /// [`Self::forward`], with each sequence's output as its [`Logits`] asked: logits rows, or
    /// for [`Logits::Greedy`] the chosen token.
    pub fn step(&self, batch: &mut [SeqInput]) -> Result<Vec<StepOutput>, EngineError> {
        let cfg = &self.cfg;
        let pool = self.block_pool();
        let mut blocks = 0;
        for s in batch.iter() {
            if s.tokens.is_empty() {
                return Err(EngineError::EmptyInput);
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(EngineError::TokenOutOfRange(t, cfg.vocab_size));
            }
            let same_pool = match (pool, s.cache.pool()) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            if s.cache.shape() != self.kv_shape() || !same_pool {
                return Err(EngineError::CacheShape);
            }
            let end = s.cache.len() + s.tokens.len();
            if end > cfg.context_length {
                return Err(EngineError::ContextOverflow {
                    needed: end,
                    context: cfg.context_length,
                });
            }
            blocks += s.cache.blocks_needed(s.tokens.len());
        }
        if let Some(pool) = pool {
            if blocks > pool.free_blocks() {
                return Err(EngineError::KvFull {
                    needed: blocks,
                    free: pool.free_blocks(),
                });
            }
        }
        match &self.backend {
            Backend::Cpu(w) => Ok(w.forward(cfg, self.precise, batch)),
            #[cfg(feature = "candle")]
            Backend::Candle(m) => m.forward(cfg, batch),
        }
    }

    /// Runs one sequence's tokens through the model in chunks of at most `chunk` and returns
    /// the last row's logits.
    pub fn prefill(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        chunk: usize,
    ) -> Result<Vec<f32>, EngineError> {
        let mut last = Vec::new();
        for part in tokens.chunks(chunk.max(1)) {
            let mut input = [SeqInput {
                tokens: part,
                cache: &mut *cache,
                logits: Logits::Last,
            }];
            last = self.forward(&mut input)?.pop().unwrap_or_default();
        }
        Ok(last)
    }
}

/// RoPE frequencies of the rotated dimensions (pairs).
pub(super) fn inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    (0..cfg.rope_dims / 2)
        .map(|i| cfg.rope_base.powf(-2.0 * i as f32 / cfg.rope_dims as f32))
        .collect()
}

/// cos and sin of every position times every frequency, row by row.
pub(super) fn rope_tables(inv_freq: &[f32], positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(positions.len() * inv_freq.len());
    let mut sin = Vec::with_capacity(positions.len() * inv_freq.len());
    for &p in positions {
        for &f in inv_freq {
            let (s, c) = (p as f32 * f).sin_cos();
            cos.push(c);
            sin.push(s);
        }
    }
    (cos, sin)
}

pub(super) fn check_shape(t: &TensorInfo, dims: &[usize]) -> Result<(), EngineError> {
    let mut got: Vec<usize> = t.dims.clone();
    while got.len() > dims.len() && got.last() == Some(&1) {
        got.pop();
    }
    if got != dims {
        return Err(bad_tensor(
            t,
            &format!("shape {:?}, expected {dims:?}", t.dims),
        ));
    }
    Ok(())
}

fn bad_tensor(t: &TensorInfo, why: &str) -> EngineError {
    EngineError::Gguf(GgufError::Tensor {
        name: t.name.clone(),
        why: why.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_k_quant_weights_fall_back_where_a_row_is_no_whole_block() {
        let mut src = WeightSource::Random {
            quant: SyntheticQuant::All(GgmlType::Q4K),
            n_layers: 1,
            state: 3,
        };
        // SmolLM2's 576 columns are no whole number of 256-value Q4_K blocks: Q8_0.
        let narrow = src.matrix("w", 8, 576).unwrap();
        assert_eq!(narrow.ty, GgmlType::Q8_0);
        assert_eq!(narrow.data().len(), 8 * GgmlType::Q8_0.row_bytes(576));
        // 1536 columns are 6 blocks: Q4_K as asked.
        let wide = src.matrix("w", 8, 1536).unwrap();
        assert_eq!(wide.ty, GgmlType::Q4K);
        assert_eq!(wide.data().len(), 8 * 6 * 144);
    }

    #[test]
    fn the_q4_k_m_mix_gives_q6_k_where_llama_cpp_does() {
        let ty = |name: &str| SyntheticQuant::Q4KM.type_for(name, 36);
        assert_eq!(ty("token_embd.weight"), GgmlType::Q6K);
        // 36 layers: the first 4 and last 5, and 6, 9, … between, get more bits.
        let more: Vec<usize> = (0..36)
            .filter(|i| ty(&format!("blk.{i}.ffn_down.weight")) == GgmlType::Q6K)
            .collect();
        assert_eq!(
            more,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31, 32, 33, 34, 35]
        );
        assert_eq!(ty("blk.0.attn_v.weight"), GgmlType::Q6K);
        for name in ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"] {
            assert_eq!(ty(&format!("blk.0.{name}.weight")), GgmlType::Q4K, "{name}");
        }
        assert_eq!(ty("blk.4.attn_v.weight"), GgmlType::Q4K);
        let q5 = |name: &str| SyntheticQuant::Q5KM.type_for(name, 36);
        assert_eq!(q5("blk.6.ffn_down.weight"), GgmlType::Q6K);
        assert_eq!(q5("blk.7.ffn_down.weight"), GgmlType::Q5K);
        assert_eq!(q5("token_embd.weight"), GgmlType::Q6K);
        assert_eq!(
            SyntheticQuant::All(GgmlType::Q8_0).type_for("token_embd.weight", 36),
            GgmlType::Q8_0
        );
    }
}
