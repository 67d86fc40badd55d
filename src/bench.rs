//! `smolchat bench`: prefill and decode speed of the engine, single and packed, and peak memory.
//!
//! Figures are printed, never asserted: speed targets live here, not in timed tests.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::engine::kv::BLOCK_LEN;
use crate::engine::{KvCache, Logits, Model, SeqInput, StepOutput};

#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// Where it ran ("cpu", "cuda:0 (NVIDIA H100 80GB HBM3)", …).
    pub device: String,
    /// Prompt tokens per second, one 128-token prompt in one step.
    pub prefill_128: f64,
    pub prefill_512: f64,
    /// Tokens per second of one stream decoding after a 128-token prompt.
    pub decode_1: f64,
    /// Aggregate tokens per second with B sequences at different positions in one packed step.
    pub decode_batch: BTreeMap<usize, f64>,
    /// Aggregate decode tokens/s with 16 sequences of 1,000 tokens each.
    pub decode_16_at_1000: f64,
    /// One stream at 4,000 tokens (0 when the context is shorter): on a GPU, where a single
    /// long cache is split among thread blocks.
    pub decode_1_at_4000: f64,
    /// Peak resident memory of the process (after the 16 × 1,000 case), MB.
    pub peak_rss_mb: f64,
    /// GPU memory in use at the end (weights, KV slabs, candle's buffers) and in all, MB.
    pub gpu_memory_mb: Option<(f64, f64)>,
    pub threads: usize,
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

fn prefill_rate(model: &Model, n: usize) -> f64 {
    let ids = tokens(n, model.cfg.vocab_size, n as u64);
    let mut best = 0f64;
    for _ in 0..2 {
        let mut cache = model.new_cache();
        let t = Instant::now();
        if let Err(e) = model.forward(&mut [SeqInput {
            tokens: &ids,
            cache: &mut cache,
            logits: Logits::Last,
        }]) {
            tracing::error!(error = %e, "bench prefill failed");
            return 0.0;
        }
        best = best.max(n as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// Aggregate decode tokens/s of `caches` (already at their positions) over `steps` steps.
fn decode_rate(model: &Model, caches: &mut [KvCache], steps: usize) -> f64 {
    let vocab = model.cfg.vocab_size;
    let mut next: Vec<[u32; 1]> = (0..caches.len())
        .map(|i| [(i * 31 % vocab) as u32])
        .collect();
    let t = Instant::now();
    for _ in 0..steps {
        let mut batch: Vec<SeqInput> = caches
            .iter_mut()
            .zip(&next)
            .map(|(c, tok)| SeqInput {
                tokens: tok,
                cache: c,
                logits: Logits::Greedy,
            })
            .collect();
        let out = match model.step(&mut batch) {
            Ok(out) => out,
            Err(e) => {
                tracing::error!(error = %e, "bench step failed");
                return 0.0;
            }
        };
        for (n, o) in next.iter_mut().zip(out) {
            n[0] = match o {
                StepOutput::Token(id) => id,
                StepOutput::Logits(row) => crate::engine::sampler::argmax(&row),
            };
        }
    }
    (caches.len() * steps) as f64 / t.elapsed().as_secs_f64()
}

/// Measures `model`; `batches` are the packed decode batch sizes.
/// Caches at the given positions (with room for the bench's decode steps), or `None` with a
/// warning when a device's KV pool cannot hold them.
fn filled(model: &Model, lens: &[usize]) -> Option<Vec<KvCache>> {
    if let Some(pool) = model.block_pool() {
        let need: usize = lens.iter().map(|&n| (n + 64).div_ceil(BLOCK_LEN)).sum();
        if need > pool.free_blocks() {
            tracing::warn!(
                need,
                free = pool.free_blocks(),
                "the KV budget is too small for this case (raise --kv-budget-mb); skipped"
            );
            return None;
        }
    }
    Some(
        lens.iter()
            .map(|&n| {
                let mut c = model.new_cache();
                c.fill_synthetic(n);
                c
            })
            .collect(),
    )
}

pub fn run(model: &Model, batches: &[usize]) -> BenchReport {
    // Warm the pool and the caches.
    let _ = prefill_rate(model, 16);
    let prefill_128 = prefill_rate(model, 128);
    tracing::info!(prefill_128, "bench");
    let prefill_512 = prefill_rate(model, 512);
    tracing::info!(prefill_512, "bench");

    let decode_1 = match filled(model, &[128]) {
        Some(mut one) => decode_rate(model, &mut one, 64),
        None => 0.0,
    };
    tracing::info!(decode_1, "bench");

    let mut decode_batch = BTreeMap::new();
    for &b in batches {
        // Different positions, 64 to 619.
        let lens: Vec<usize> = (0..b).map(|i| 64 + 37 * (i % 16)).collect();
        let rate = match filled(model, &lens) {
            Some(mut caches) => decode_rate(model, &mut caches, 32),
            None => 0.0,
        };
        tracing::info!(batch = b, rate, "bench");
        decode_batch.insert(b, rate);
    }

    let decode_16_at_1000 = match filled(model, &[1000; 16]) {
        Some(mut long) => decode_rate(model, &mut long, 8),
        None => 0.0,
    };
    tracing::info!(decode_16_at_1000, "bench");
    let fits = model.cfg.context_length >= 4000 + 64;
    let decode_1_at_4000 = match filled(model, &[4000]).filter(|_| fits) {
        Some(mut long) => decode_rate(model, &mut long, 16),
        None => 0.0,
    };
    tracing::info!(decode_1_at_4000, "bench");
    BenchReport {
        device: model.device_name(),
        gpu_memory_mb: model
            .device_memory()
            .map(|(used, total)| (used as f64 / 1048576.0, total as f64 / 1048576.0)),
        prefill_128,
        prefill_512,
        decode_1,
        decode_batch,
        decode_16_at_1000,
        decode_1_at_4000,
        peak_rss_mb: peak_rss_mb(),
        threads: crate::engine::pool::global().threads(),
    }
}

/// Peak resident set size of this process in MB (Linux; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

impl BenchReport {
    pub fn table(&self) -> String {
        let mut s = format!("| measure ({}) | tokens/s |\n|---|---|\n", self.device);
        s += &format!("| prefill, 128-token prompt | {:.0} |\n", self.prefill_128);
        s += &format!("| prefill, 512-token prompt | {:.0} |\n", self.prefill_512);
        s += &format!("| decode, 1 stream | {:.1} |\n", self.decode_1);
        for (b, r) in &self.decode_batch {
            s += &format!("| decode, {b} sequences (aggregate) | {r:.1} |\n");
        }
        s += &format!(
            "| decode, 16 sequences at 1,000 tokens (aggregate) | {:.1} |\n",
            self.decode_16_at_1000
        );
        s += &format!(
            "| decode, 1 stream at 4,000 tokens | {:.1} |\n",
            self.decode_1_at_4000
        );
        s += &format!("| peak RSS | {:.0} MB |\n", self.peak_rss_mb);
        if let Some((used, total)) = self.gpu_memory_mb {
            s += &format!("| GPU memory in use | {used:.0} of {total:.0} MB |\n");
        }
        s
    }
}
