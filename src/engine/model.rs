//! The quantized transformer (llama and smollm3) and its packed-batch forward.
//!
//! One call to [`Model::forward`] takes several sequences, each with its own new tokens (a
//! prompt chunk or one decode token), its own KV cache and start position. Every linear layer
//! runs once over all rows of all sequences; attention runs per sequence and head over that
//! sequence's cache; logits are computed only for the rows that are asked for.

use super::config::{Architecture, ModelConfig};
use super::gguf::{GgufError, GgufFile, TensorInfo};
use super::kv::{KvCache, KvShape};
use super::matmul::{matmul, matmul_many, QMatrix, QuantizedRows, SharedBytes};
use super::quant::{dequantize_row, GgmlType};
use super::{simd, EngineError};

struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    w_gate: QMatrix,
    w_up: QMatrix,
    w_down: QMatrix,
}

pub struct Model {
    pub cfg: ModelConfig,
    /// Float activations in every matmul instead of 8-bit ones (see [`QuantizedRows`]).
    pub precise: bool,
    embed: QMatrix,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    output: QMatrix,
    inv_freq: Vec<f32>,
}

/// Which rows of a sequence need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

/// One sequence's part of a packed batch.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    /// Holds positions `0..cache.len()`; the new tokens go after them.
    pub cache: &'a mut KvCache,
    pub logits: Logits,
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
        Self::load(f, arch, &|_| {})
    }

    /// Loads the model, calling `progress` with the bytes of each weight matrix as it is ready.
    /// Matrices that get an interleaved copy give their mapped pages back to the OS (they are
    /// read again from the page cache only if a portable or precise path needs them).
    pub fn load(
        f: &GgufFile,
        arch: Option<Architecture>,
        progress: &dyn Fn(u64),
    ) -> Result<Self, EngineError> {
        let mut cfg = ModelConfig::from_gguf(f)?;
        if let Some(a) = arch {
            cfg.arch = a;
            cfg.use_rope = a.rope_layers(cfg.n_layers);
        }
        let bytes = f.shared_bytes();
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<QMatrix, EngineError> {
            let t = f.tensor(name)?;
            check_shape(t, &[cols, rows])?;
            let mut m = QMatrix::new(t.ty, rows, cols, bytes.clone(), t.start);
            if m.interleave() {
                f.release(t);
            }
            progress(t.len as u64);
            Ok(m)
        };
        let vector = |name: &str, n: usize| -> Result<Vec<f32>, EngineError> {
            let t = f.tensor(name)?;
            check_shape(t, &[n])?;
            if !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                return Err(bad_tensor(t, "a norm must be a float vector"));
            }
            let mut v = vec![0f32; n];
            dequantize_row(t.ty, f.bytes(t), &mut v);
            Ok(v)
        };
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let embed = matrix("token_embd.weight", cfg.vocab_size, h)?;
        let output = if cfg.tied_embeddings {
            embed.clone()
        } else {
            matrix("output.weight", cfg.vocab_size, h)?
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: vector(&p("attn_norm"), h)?,
                wq: matrix(&p("attn_q"), cfg.n_heads * hd, h)?,
                wk: matrix(&p("attn_k"), cfg.n_kv_heads * hd, h)?,
                wv: matrix(&p("attn_v"), cfg.n_kv_heads * hd, h)?,
                wo: matrix(&p("attn_output"), h, cfg.n_heads * hd)?,
                ffn_norm: vector(&p("ffn_norm"), h)?,
                w_gate: matrix(&p("ffn_gate"), cfg.intermediate, h)?,
                w_up: matrix(&p("ffn_up"), cfg.intermediate, h)?,
                w_down: matrix(&p("ffn_down"), h, cfg.intermediate)?,
            });
        }
        let out_norm = vector("output_norm.weight", h)?;
        let inv_freq = (0..cfg.rope_dims / 2)
            .map(|i| cfg.rope_base.powf(-2.0 * i as f32 / cfg.rope_dims as f32))
            .collect();
        Ok(Self {
            cfg,
            precise: false,
            embed,
            layers,
            out_norm,
            output,
            inv_freq,
        })
    }

    /// Builds a model of the given shape with random weights of type `ty` (benchmarks).
    pub fn synthetic(cfg: ModelConfig, ty: GgmlType, seed: u64) -> Self {
        let mut state = seed | 1;
        let mut rand_bytes = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        };
        let mut matrix = |rows: usize, cols: usize| -> QMatrix {
            let mut b = rand_bytes(ty.row_bytes(cols) * rows);
            super::quant::sanitize_random_scales(ty, &mut b);
            let shared: SharedBytes = std::sync::Arc::new(b);
            let mut m = QMatrix::new(ty, rows, cols, shared, 0);
            m.interleave();
            m
        };
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let embed = matrix(cfg.vocab_size, h);
        let layers = (0..cfg.n_layers)
            .map(|_| Layer {
                attn_norm: vec![1.0; h],
                wq: matrix(cfg.n_heads * hd, h),
                wk: matrix(cfg.n_kv_heads * hd, h),
                wv: matrix(cfg.n_kv_heads * hd, h),
                wo: matrix(h, cfg.n_heads * hd),
                ffn_norm: vec![1.0; h],
                w_gate: matrix(cfg.intermediate, h),
                w_up: matrix(cfg.intermediate, h),
                w_down: matrix(h, cfg.intermediate),
            })
            .collect();
        let inv_freq = (0..cfg.rope_dims / 2)
            .map(|i| cfg.rope_base.powf(-2.0 * i as f32 / cfg.rope_dims as f32))
            .collect();
        Self {
            output: embed.clone(),
            embed,
            layers,
            out_norm: vec![1.0; h],
            inv_freq,
            cfg,
            precise: false,
        }
    }

    pub fn kv_shape(&self) -> KvShape {
        KvShape::of(&self.cfg)
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.kv_shape())
    }

    /// Runs one packed step. Returns, per sequence, its logits rows (`vocab` floats each: none,
    /// the last row's, or every row's, as asked).
    pub fn forward(&self, batch: &mut [SeqInput]) -> Result<Vec<Vec<f32>>, EngineError> {
        let cfg = &self.cfg;
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let (nh, nkv) = (cfg.n_heads, cfg.n_kv_heads);
        // Validate everything before touching any cache.
        for s in batch.iter() {
            if s.tokens.is_empty() {
                return Err(EngineError::EmptyInput);
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(EngineError::TokenOutOfRange(t, cfg.vocab_size));
            }
            if s.cache.shape() != self.kv_shape() {
                return Err(EngineError::CacheShape);
            }
            let end = s.cache.len() + s.tokens.len();
            if end > cfg.context_length {
                return Err(EngineError::ContextOverflow {
                    needed: end,
                    context: cfg.context_length,
                });
            }
        }
        // Row layout of the packed batch.
        let mut spans = Vec::with_capacity(batch.len()); // (first row, n rows, start position)
        let mut positions = Vec::new();
        let mut t = 0;
        for s in batch.iter_mut() {
            let n = s.tokens.len();
            let start = s.cache.grow(n);
            spans.push((t, n, start));
            positions.extend(start..start + n);
            t += n;
        }
        let (cos, sin) = self.rope_tables(&positions);

        let mut x = vec![0f32; t * h];
        let tokens = batch.iter().flat_map(|s| s.tokens.iter());
        for (row, &tok) in x.chunks_exact_mut(h).zip(tokens) {
            self.embed.dequantize_row(tok as usize, row);
        }

        let mut xn = vec![0f32; t * h];
        let (mut q, mut k, mut v) = (
            vec![0f32; t * nh * hd],
            vec![0f32; t * nkv * hd],
            vec![0f32; t * nkv * hd],
        );
        let mut attn = vec![0f32; t * nh * hd];
        let mut o = vec![0f32; t * h];
        let (mut gate, mut up) = (
            vec![0f32; t * cfg.intermediate],
            vec![0f32; t * cfg.intermediate],
        );

        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm_rows(&x, &layer.attn_norm, cfg.rms_eps, &mut xn, h);
            let xq = QuantizedRows::new(&xn, h, self.precise);
            matmul_many(
                &xq,
                &[&layer.wq, &layer.wk, &layer.wv],
                &mut [&mut q, &mut k, &mut v],
            );
            if cfg.use_rope[li] {
                self.apply_rope(&mut q, nh, &cos, &sin);
                self.apply_rope(&mut k, nkv, &cos, &sin);
            }
            for (s, &(r0, n, start)) in batch.iter_mut().zip(&spans) {
                for i in 0..n {
                    let row = (r0 + i) * nkv * hd..(r0 + i + 1) * nkv * hd;
                    s.cache.write(li, start + i, &k[row.clone()], &v[row]);
                }
            }
            let caches: Vec<&KvCache> = batch.iter().map(|s| &*s.cache).collect();
            attention(cfg, li, &caches, &spans, &q, &mut attn);
            matmul(
                &QuantizedRows::new(&attn, nh * hd, self.precise),
                &layer.wo,
                &mut o,
            );
            add_into(&mut x, &o);

            rms_norm_rows(&x, &layer.ffn_norm, cfg.rms_eps, &mut xn, h);
            let xq = QuantizedRows::new(&xn, h, self.precise);
            matmul_many(
                &xq,
                &[&layer.w_gate, &layer.w_up],
                &mut [&mut gate, &mut up],
            );
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            matmul(
                &QuantizedRows::new(&gate, cfg.intermediate, self.precise),
                &layer.w_down,
                &mut o,
            );
            add_into(&mut x, &o);
        }

        // Logits only for the rows that are sampled.
        let mut wanted = Vec::new();
        for (s, &(r0, n, _)) in batch.iter().zip(&spans) {
            match s.logits {
                Logits::None => {}
                Logits::Last => wanted.push(r0 + n - 1),
                Logits::All => wanted.extend(r0..r0 + n),
            }
        }
        let mut sel = vec![0f32; wanted.len() * h];
        for (dst, &r) in sel.chunks_exact_mut(h).zip(&wanted) {
            rms_norm(&x[r * h..(r + 1) * h], &self.out_norm, cfg.rms_eps, dst);
        }
        let vocab = cfg.vocab_size;
        let mut logits = vec![0f32; wanted.len() * vocab];
        if !wanted.is_empty() {
            matmul(
                &QuantizedRows::new(&sel, h, self.precise),
                &self.output,
                &mut logits,
            );
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut at = 0;
        for (s, &(_, n, _)) in batch.iter().zip(&spans) {
            let rows = match s.logits {
                Logits::None => 0,
                Logits::Last => 1,
                Logits::All => n,
            };
            out.push(logits[at * vocab..(at + rows) * vocab].to_vec());
            at += rows;
        }
        Ok(out)
    }

    fn rope_tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let (s, c) = (p as f32 * f).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        (cos, sin)
    }

    /// RoPE on adjacent pairs (ggml's "normal" mode; the GGUF converter permuted Q and K for it).
    fn apply_rope(&self, x: &mut [f32], heads: usize, cos: &[f32], sin: &[f32]) {
        let hd = self.cfg.head_dim;
        let half = self.inv_freq.len();
        for (r, row) in x.chunks_exact_mut(heads * hd).enumerate() {
            let (c, s) = (
                &cos[r * half..(r + 1) * half],
                &sin[r * half..(r + 1) * half],
            );
            for head in row.chunks_exact_mut(hd) {
                for i in 0..half {
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * c[i] - b * s[i];
                    head[2 * i + 1] = a * s[i] + b * c[i];
                }
            }
        }
    }
}

/// Causal attention per sequence and KV head over the sequence's cache (which already holds
/// this step's K and V). The query heads that share a KV head are done together, so each key and
/// value row is read once per group; long prompt chunks are split into row ranges.
fn attention(
    cfg: &ModelConfig,
    layer: usize,
    caches: &[&KvCache],
    spans: &[(usize, usize, usize)],
    q: &[f32],
    out: &mut [f32],
) {
    const ROWS_PER_TASK: usize = 16;
    let (nh, hd) = (cfg.n_heads, cfg.head_dim);
    let group = nh / cfg.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut tasks = Vec::new(); // (sequence, kv head, first row, rows)
    for (s, &(_, n, _)) in spans.iter().enumerate() {
        for kvh in 0..cfg.n_kv_heads {
            for i0 in (0..n).step_by(ROWS_PER_TASK) {
                tasks.push((s, kvh, i0, ROWS_PER_TASK.min(n - i0)));
            }
        }
    }
    let run = |&(s, kvh, i0, rows): &(usize, usize, usize, usize)| -> Vec<f32> {
        let (r0, _, start) = spans[s];
        let cache = caches[s];
        let mut res = vec![0f32; rows * group * hd];
        let mut scores = Vec::new();
        for i in i0..i0 + rows {
            let upto = start + i + 1;
            let qrow = &q[(r0 + i) * nh * hd + kvh * group * hd..][..group * hd];
            scores.clear();
            scores.resize(group * upto, 0.0);
            let mut p0 = 0;
            for blk in cache.rows(layer, kvh, false, upto) {
                let n = blk.len() / hd;
                let mut part = vec![0f32; group * n];
                simd::scores_f16(blk, qrow, group, hd, scale, &mut part);
                for h in 0..group {
                    scores[h * upto + p0..h * upto + p0 + n]
                        .copy_from_slice(&part[h * n..(h + 1) * n]);
                }
                p0 += n;
            }
            for h in 0..group {
                softmax(&mut scores[h * upto..(h + 1) * upto]);
            }
            let dst = &mut res[(i - i0) * group * hd..(i - i0 + 1) * group * hd];
            let mut p0 = 0;
            let mut w = Vec::new();
            for blk in cache.rows(layer, kvh, true, upto) {
                let n = blk.len() / hd;
                w.clear();
                for h in 0..group {
                    w.extend_from_slice(&scores[h * upto + p0..h * upto + p0 + n]);
                }
                simd::weighted_sum_f16(blk, &w, group, hd, dst);
                p0 += n;
            }
        }
        res
    };
    let work: usize = spans.iter().map(|&(_, n, st)| n * (st + n)).sum::<usize>() * nh;
    let results: Vec<std::sync::OnceLock<Vec<f32>>> =
        tasks.iter().map(|_| std::sync::OnceLock::new()).collect();
    let one = |i: usize| {
        let _ = results[i].set(run(&tasks[i]));
    };
    if work > 2048 {
        super::pool::global().run(tasks.len(), &one);
    } else {
        (0..tasks.len()).for_each(one);
    }
    for (&(s, kvh, i0, rows), res) in tasks.iter().zip(
        results
            .into_iter()
            .map(|r| r.into_inner().unwrap_or_default()),
    ) {
        let r0 = spans[s].0;
        for i in 0..rows {
            out[(r0 + i0 + i) * nh * hd + kvh * group * hd..][..group * hd]
                .copy_from_slice(&res[i * group * hd..(i + 1) * group * hd]);
        }
    }
}

fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss = simd::dot(x, x) / x.len() as f32;
    let r = 1.0 / (ss + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * r * g;
    }
}

fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], h: usize) {
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        rms_norm(xr, w, eps, or);
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn check_shape(t: &TensorInfo, dims: &[usize]) -> Result<(), EngineError> {
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

impl Model {
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
