//! The command-line subcommands: each prints human text, or with `--json` one JSON object on
//! the last line of stdout, which scripts and tests rely on.

pub mod generate;
pub mod inspect;
pub mod session_turn;

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::engine::{Engine, LoadOptions};

/// Loads the model at `path` onto `opts`' device, with a progress bar and a clear error that
/// says what to run when it is missing.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Engine> {
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let engine = Engine::load_with(path, opts, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let engine = engine?;
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model ready"
    );
    Ok(engine)
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
