//! `tokenize`, `render`, `logits` and `perplexity`: look inside the model.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::engine::{ChatMessage, Engine, Logits, SeqInput};

pub fn tokenize(engine: &Engine, text: &str, no_special: bool) -> Result<()> {
    let ids = engine.tokenizer.encode(text, !no_special)?;
    super::print_json(&json!({ "ids": ids }));
    Ok(())
}

pub fn render(
    engine: &Engine,
    messages: &Path,
    generation_prompt: bool,
    thinking: Option<bool>,
) -> Result<()> {
    let raw = std::fs::read_to_string(messages)
        .with_context(|| format!("reading {}", messages.display()))?;
    let messages: Vec<ChatMessage> = serde_json::from_str(&raw)
        .context("the messages file must be a JSON list of {\"role\",\"content\"}")?;
    let (text, ids) = engine.render_chat(&messages, generation_prompt, thinking)?;
    super::print_json(&json!({ "text": text, "ids": ids }));
    Ok(())
}

pub fn logits(engine: &Engine, ids: &[u32], top: usize) -> Result<()> {
    if ids.is_empty() {
        bail!("--ids needs at least one token id");
    }
    let mut cache = engine.model.new_cache();
    let rows = engine
        .model
        .forward(&mut [SeqInput {
            tokens: ids,
            cache: &mut cache,
            logits: Logits::All,
        }])?
        .pop()
        .unwrap_or_default();
    let vocab = engine.model.cfg.vocab_size;
    let positions: Vec<_> = rows
        .chunks_exact(vocab)
        .map(|row| {
            let mut idx: Vec<u32> = (0..vocab as u32).collect();
            let k = top.clamp(1, vocab);
            idx.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
            idx.truncate(k);
            idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            let top: Vec<_> = idx.iter().map(|&i| json!([i, row[i as usize]])).collect();
            json!({ "top": top })
        })
        .collect();
    super::print_json(&json!({ "positions": positions }));
    Ok(())
}

/// Perplexity as llama.cpp's `llama-perplexity` computes it: non-overlapping windows of `ctx`
/// tokens, each scored on its second half.
pub fn perplexity(engine: &Engine, file: &Path, ctx: usize) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let tokens = engine.tokenizer.encode(&text, false)?;
    let ctx = ctx.min(engine.model.cfg.context_length);
    if ctx < 4 || tokens.len() < ctx {
        bail!(
            "the text has {} tokens; at least one window of --ctx {ctx} (≥ 4) is needed",
            tokens.len()
        );
    }
    let vocab = engine.model.cfg.vocab_size;
    let (mut nll, mut count) = (0f64, 0usize);
    let started = std::time::Instant::now();
    let windows = tokens.len() / ctx;
    for w in 0..windows {
        let win = &tokens[w * ctx..(w + 1) * ctx];
        let mut cache = engine.model.new_cache();
        let rows = engine
            .model
            .forward(&mut [SeqInput {
                tokens: win,
                cache: &mut cache,
                logits: Logits::All,
            }])?
            .pop()
            .unwrap_or_default();
        for j in ctx / 2..ctx - 1 {
            let row = &rows[j * vocab..(j + 1) * vocab];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let lse = max as f64
                + row
                    .iter()
                    .map(|&v| ((v - max) as f64).exp())
                    .sum::<f64>()
                    .ln();
            nll += lse - row[win[j + 1] as usize] as f64;
            count += 1;
        }
        tracing::info!(
            window = w + 1,
            of = windows,
            ppl = (nll / count as f64).exp(),
            "perplexity"
        );
    }
    let ppl = (nll / count as f64).exp();
    super::print_json(&json!({
        "perplexity": ppl,
        "tokens": count,
        "windows": windows,
        "seconds": started.elapsed().as_secs_f64(),
    }));
    Ok(())
}
