//! The CPU backend: weights in GGUF blocks (interleaved where a kernel wants it), 8-bit
//! activations, attention per sequence over its host KV blocks, the thread pool for everything
//! wide.

use super::config::ModelConfig;
use super::kv::{KvCache, KvRows};
use super::matmul::{matmul, matmul_many, QMatrix, QuantizedRows};
use super::model::{rope_tables, Logits, RawMatrix, SeqInput, StepOutput, Weights};
use super::simd;

pub(super) struct CpuWeights {
    w: Weights<QMatrix, Vec<f32>>,
    inv_freq: Vec<f32>,
}

impl std::ops::Deref for CpuWeights {
    type Target = Weights<QMatrix, Vec<f32>>;
    fn deref(&self) -> &Self::Target {
        &self.w
    }
}

/// A matrix in its GGUF blocks, with an interleaved copy where a kernel wants one (then the
/// mapped pages are given back to the OS: they are read again only if a portable or precise
/// path needs them).
pub(super) fn matrix(raw: RawMatrix) -> QMatrix {
    let mut m = QMatrix::new(raw.ty, raw.rows, raw.cols, raw.bytes, raw.start);
    if m.interleave() {
        match raw.release {
            Some(release) => release(),
            None => {
                m.drop_plain_copy();
            }
        }
    }
    m
}

impl CpuWeights {
    pub fn new(w: Weights<QMatrix, Vec<f32>>, cfg: &ModelConfig) -> Self {
        Self {
            w,
            inv_freq: super::model::inv_freq(cfg),
        }
    }

    /// Whether some matrix is read from the loaded file (no interleaved copy of it).
    pub fn borrows_the_file(&self) -> bool {
        let w = &self.w;
        let per_layer = w
            .layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]);
        [&w.embed, &w.output]
            .into_iter()
            .chain(per_layer)
            .any(|m| m.borrows_its_bytes())
    }

    /// Runs one packed step over a checked batch (see [`super::model::Model::forward`]).
    pub fn forward(
        &self,
        cfg: &ModelConfig,
        precise: bool,
        batch: &mut [SeqInput],
    ) -> Vec<StepOutput> {
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let (nh, nkv) = (cfg.n_heads, cfg.n_kv_heads);
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
        let (cos, sin) = rope_tables(&self.inv_freq, &positions);

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
            let xq = QuantizedRows::new(&xn, h, precise);
            matmul_many(
                &xq,
                &[&layer.wq, &layer.wk, &layer.wv],
                &mut [&mut q, &mut k, &mut v],
            );
            if cfg.use_rope[li] {
                self.apply_rope(cfg, &mut q, nh, &cos, &sin);
                self.apply_rope(cfg, &mut k, nkv, &cos, &sin);
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
                &QuantizedRows::new(&attn, nh * hd, precise),
                &layer.wo,
                &mut o,
            );
            add_into(&mut x, &o);

            rms_norm_rows(&x, &layer.ffn_norm, cfg.rms_eps, &mut xn, h);
            let xq = QuantizedRows::new(&xn, h, precise);
            matmul_many(
                &xq,
                &[&layer.w_gate, &layer.w_up],
                &mut [&mut gate, &mut up],
            );
            simd::silu_mul(&mut gate, &up);
            matmul(
                &QuantizedRows::new(&gate, cfg.intermediate, precise),
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
                Logits::Last | Logits::Greedy => wanted.push(r0 + n - 1),
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
                &QuantizedRows::new(&sel, h, precise),
                &self.output,
                &mut logits,
            );
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut at = 0;
        for (s, &(_, n, _)) in batch.iter().zip(&spans) {
            let rows = match s.logits {
                Logits::None => 0,
                Logits::Last | Logits::Greedy => 1,
                Logits::All => n,
            };
            let these = &logits[at * vocab..(at + rows) * vocab];
            out.push(match s.logits {
                Logits::Greedy => StepOutput::Token(super::sampler::argmax(these)),
                _ => StepOutput::Logits(these.to_vec()),
            });
            at += rows;
        }
        out
    }

    /// RoPE on adjacent pairs (ggml's "normal" mode; the GGUF converter permuted Q and K for it).
    fn apply_rope(&self, cfg: &ModelConfig, x: &mut [f32], heads: usize, cos: &[f32], sin: &[f32]) {
        let hd = cfg.head_dim;
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
            // `scores` holds one row of `upto` per head; each block of keys fills its columns.
            let mut p0 = 0;
            for blk in cache.rows(layer, kvh, false, upto) {
                let out = &mut scores[p0..];
                match blk {
                    KvRows::F16(k) => simd::scores_f16(k, qrow, (group, hd), scale, out, upto),
                    KvRows::Q8(q, d) => {
                        simd::scores_q8((q, d), qrow, (group, hd), scale, out, upto)
                    }
                    KvRows::Q4(..) => unreachable!("keys are never stored in 4 bits"),
                }
                p0 += blk.values() / hd;
            }
            for h in 0..group {
                simd::softmax(&mut scores[h * upto..(h + 1) * upto]);
            }
            let dst = &mut res[(i - i0) * group * hd..(i - i0 + 1) * group * hd];
            let mut p0 = 0;
            for blk in cache.rows(layer, kvh, true, upto) {
                let w = &scores[p0..];
                match blk {
                    KvRows::F16(v) => simd::weighted_sum_f16(v, w, (group, hd), upto, dst),
                    KvRows::Q8(q, d) => simd::weighted_sum_q8((q, d), w, (group, hd), upto, dst),
                    KvRows::Q4(q, d) => simd::weighted_sum_q4((q, d), w, (group, hd), upto, dst),
                }
                p0 += blk.values() / hd;
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
