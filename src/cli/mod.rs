//! The command-line subcommands: each prints human text, or with `--json` one JSON object on
//! the last line of stdout, which scripts and tests rely on.

pub mod generate;
pub mod inspect;
pub mod session_turn;

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::engine::Engine;

/// Loads the model at `path`, with a clear error that says what to run when it is missing.
pub fn load(path: &Path) -> Result<Engine> {
    let started = std::time::Instant::now();
    let engine = Engine::load(path)?;
    prefault(&engine);
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model ready"
    );
    Ok(engine)
}

/// Reads the mapped weights once with a progress bar, so the first request does not pay for
/// page faults and a slow disk shows as progress rather than silence.
fn prefault(engine: &Engine) {
    let total: usize = engine.file.tensors.values().map(|t| t.len).sum();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut sink = 0u8;
    for t in engine.file.tensors.values() {
        let b = engine.file.bytes(t);
        for page in b.chunks(4096) {
            sink ^= page[0];
        }
        bar.inc(t.len as u64);
    }
    std::hint::black_box(sink);
    bar.finish_and_clear();
}

/// Prints `value` as one JSON line.
pub fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

pub fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse::<u32>()
                .map_err(|e| anyhow::anyhow!("bad token id `{p}`: {e}"))
        })
        .collect()
}

pub fn default_model() -> PathBuf {
    PathBuf::from(crate::DEFAULT_MODEL)
}
