//! The page in a real headless Chromium (Debian's `chromium`), driven by `playwright-core`
//! from npm, against the real server with the default model. The browser steps live in
//! `tests/e2e/chat.mjs`; screenshots land in `tests/artifacts/` (not committed).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use smolchat::actors::SchedulerConfig;
use smolchat::engine::Engine;
use smolchat::server::{Limits, ServerConfig};
use smolchat::store::{MessageOutcome, MessageStatus, Role, Settings};

fn run(cmd: &mut Command) -> bool {
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

/// Installs what the browser test needs when it is missing: Chromium from Debian, and
/// playwright-core from npm (pinned by tests/e2e/package-lock.json).
fn ensure_tools(e2e: &Path) {
    if !Path::new("/usr/bin/chromium").exists() {
        assert!(
            run(Command::new("sh").args(["-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium"])),
            "installing Debian's chromium failed (run .ci/run as root, or install it)"
        );
    }
    if !e2e.join("node_modules/playwright-core").exists() {
        assert!(
            run(Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(e2e)),
            "npm ci in tests/e2e failed"
        );
    }
}

#[test]
fn the_page_works_in_a_real_browser() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let e2e = root.join("tests/e2e");
    ensure_tools(&e2e);
    let engine = Arc::new(Engine::load(&common::default_model_path()).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = |name: &str, scheduler| {
        let dir = common::scratch(&format!("browser-{name}"));
        ServerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir,
            engine: engine.clone(),
            scheduler,
            limits: Limits {
                messages_per_minute: 100,
                ..Limits::default()
            },
            allowed_origins: vec![],
            session_idle: Duration::from_secs(60),
            trust_forwarded_for: false,
            metrics_token: None,
        }
    };
    let srv = rt
        .block_on(smolchat::server::start(config(
            "main",
            SchedulerConfig::cpu(),
        )))
        .unwrap();
    // One answer at a time, so that the next one waits in the queue.
    let one_at_a_time = SchedulerConfig {
        max_running: 1,
        ..SchedulerConfig::cpu()
    };
    let queued = rt
        .block_on(smolchat::server::start(config("queued", one_at_a_time)))
        .unwrap();
    // A conversation whose stored answer is hostile markdown, as a model might write it.
    let (token, conv) = rt.block_on(async {
        let s = &srv.store;
        let user = s.create_user().await.unwrap();
        let token = s.create_login(user).await.unwrap();
        let c = s.create_conversation(user, "hostile", "", &Settings::default(), false).await.unwrap();
        let q = s.add_message(user, c.id, None, Role::User, "show me", MessageStatus::Complete).await.unwrap();
        let a = s.add_message(user, c.id, Some(q.id), Role::Assistant, "", MessageStatus::Streaming).await.unwrap();
        let evil = "Here is a table **bold** <img src=x onerror=\"window.__pwned=true;alert(1)\">\n\n\
                    [click me](javascript:window.__pwned=true) <script>window.__pwned=true</script>\n\n\
                    <a href=\"javascript:alert(1)\" onclick=\"alert(2)\">x</a>\n\n```\ncode block\n```\n";
        let done = MessageOutcome { status: Some(MessageStatus::Complete), finish_reason: Some("stop".into()), ..Default::default() };
        let thinking = "The user wants a table. <img src=x onerror=\"window.__pwned=true\">";
        s.finish_message(user, a.id, evil, thinking, &done).await.unwrap();
        (token, c.id)
    });
    let artifacts = root.join("tests/artifacts");
    let out = Command::new("node")
        .arg(e2e.join("chat.mjs"))
        .arg(format!("http://{}", srv.addr))
        .arg(&token)
        .arg(conv.to_string())
        .arg(&artifacts)
        .arg(format!("http://{}", queued.addr))
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    rt.block_on(srv.shutdown());
    rt.block_on(queued.shutdown());
    assert!(out.status.success(), "browser checks failed:\n{stdout}");
}
