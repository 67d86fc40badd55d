//! `smolchat session-turn` (hidden): one chat turn through the real actors and store, printing
//! every event as a JSON line. Tests use it as a child process to kill mid-answer.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use ractor::{call, Actor};
use serde_json::json;
use tokio::sync::mpsc;

use crate::actors::registry::{RegistryArgs, RegistryMsg, SessionRegistry};
use crate::actors::session::{SessionEvent, SessionMsg};
use crate::actors::{ModelActor, SchedulerConfig};
use crate::engine::Engine;
use crate::store::{Settings, Store};

pub async fn run(
    engine: Arc<Engine>,
    data_dir: &Path,
    message: &str,
    max_tokens: usize,
) -> Result<()> {
    std::fs::create_dir_all(data_dir)?;
    let store = Store::open(&data_dir.join("smolchat.db")).await?;
    let (model, _) =
        Actor::spawn(None, ModelActor, (engine.clone(), SchedulerConfig::cpu())).await?;
    let args = RegistryArgs {
        store: store.clone(),
        model,
        engine,
        idle: Duration::from_secs(60),
    };
    let (registry, _) = Actor::spawn(None, SessionRegistry, args).await?;
    let user = store.create_user().await?;
    let settings = Settings {
        temperature: 0.0,
        max_tokens,
        ..Settings::default()
    };
    let conv = store
        .create_conversation(user, "", "", &settings, false)
        .await?;
    let session = call!(registry, RegistryMsg::Open, user, conv.id)?.map_err(|e| anyhow!("{e}"))?;
    let (tx, mut rx) = mpsc::channel(1024);
    call!(session, SessionMsg::Subscribe, tx)?.map_err(|e| anyhow!("{e}"))?;
    println!("{}", json!({ "user": user, "conversation": conv.id }));
    call!(session, SessionMsg::Send, message.to_owned())?.map_err(|e| anyhow!("{e}"))?;
    while let Some(ev) = rx.recv().await {
        println!("{}", serde_json::to_string(&ev)?);
        if let SessionEvent::MessageDone { .. } | SessionEvent::Error { .. } = ev {
            break;
        }
    }
    Ok(())
}
