//! Session actors with a real SQLite file and the real default model, driven directly.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{call, Actor, ActorProcessingErr, ActorRef};
use smolchat::actors::model_actor::{JobDone, JobEvent, JobId, ModelStatus};
use smolchat::actors::registry::{RegistryArgs, RegistryMsg, SessionRegistry};
use smolchat::actors::session::{SessionError, SessionEvent, SessionMsg, Snapshot};
use smolchat::actors::{ModelActor, ModelMsg, SchedulerConfig};
use smolchat::engine::generate::FinishReason;
use smolchat::engine::reasoning::Channel;
use smolchat::engine::Engine;
use smolchat::store::{ConversationId, MessageId, MessageStatus, Role, Settings, Store, UserId};
use tokio::sync::mpsc;

fn engine() -> Arc<Engine> {
    static E: std::sync::OnceLock<Arc<Engine>> = std::sync::OnceLock::new();
    E.get_or_init(|| Arc::new(Engine::load(&common::default_model_path()).unwrap()))
        .clone()
}

fn temp_dir(name: &str) -> PathBuf {
    common::scratch(&format!("sessions-{name}"))
}

struct World {
    /// The SQLite file the store has open.
    db: PathBuf,
    store: Store,
    model: ActorRef<ModelMsg>,
    registry: ActorRef<RegistryMsg>,
    user: UserId,
    conv: ConversationId,
}

async fn world(name: &str, max_tokens: usize) -> World {
    let (model, _) = Actor::spawn(None, ModelActor, (engine(), SchedulerConfig::cpu()))
        .await
        .unwrap();
    world_with(name, max_tokens, model).await
}

/// A world whose sessions ask `model`.
async fn world_with(name: &str, max_tokens: usize, model: ActorRef<ModelMsg>) -> World {
    let db = temp_dir(name).join("smolchat.db");
    let store = Store::open(&db).await.unwrap();
    let args = RegistryArgs {
        store: store.clone(),
        model: model.clone(),
        engine: engine(),
        idle: Duration::from_secs(30),
    };
    let (registry, _) = Actor::spawn(None, SessionRegistry, args).await.unwrap();
    let user = store.create_user().await.unwrap();
    let settings = Settings {
        temperature: 0.0,
        max_tokens,
        ..Settings::default()
    };
    let conv = store
        .create_conversation(user, "", "", &settings, false)
        .await
        .unwrap()
        .id;
    World {
        db,
        store,
        model,
        registry,
        user,
        conv,
    }
}

impl World {
    async fn session(&self) -> ActorRef<SessionMsg> {
        call!(self.registry, RegistryMsg::Open, self.user, self.conv)
            .unwrap()
            .unwrap()
    }

    async fn subscribe(&self, cap: usize) -> (Snapshot, mpsc::Receiver<SessionEvent>) {
        let (tx, rx) = mpsc::channel(cap);
        let (_, snap) = call!(self.session().await, SessionMsg::Subscribe, tx)
            .unwrap()
            .unwrap();
        (snap, rx)
    }

    async fn send(&self, text: &str) -> Result<(), SessionError> {
        call!(self.session().await, SessionMsg::Send, text.to_owned()).unwrap()
    }

    async fn running(&self) -> usize {
        call!(self.model, ModelMsg::Status).unwrap().running
    }
}

/// Reads events to the end of the current answer; returns the text of its deltas.
async fn until_done(rx: &mut mpsc::Receiver<SessionEvent>) -> (String, smolchat::store::Message) {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            SessionEvent::Delta { text: t, .. } => text.push_str(&t),
            SessionEvent::MessageDone { message } => return (text, message),
            SessionEvent::Error { message, .. } => panic!("error: {message}"),
            _ => {}
        }
    }
    panic!("stream ended before the answer was done");
}

/// The `siblings` of each new message (the question, then the answer) until the answer is done.
async fn versions_until_done(
    rx: &mut mpsc::Receiver<SessionEvent>,
) -> (Vec<Vec<MessageId>>, smolchat::store::Message) {
    let mut versions = vec![];
    while let Some(ev) = rx.recv().await {
        match ev {
            SessionEvent::UserMessage { siblings, .. }
            | SessionEvent::MessageStarted { siblings, .. } => versions.push(siblings),
            SessionEvent::MessageDone { message } => return (versions, message),
            SessionEvent::Error { message, .. } => panic!("error: {message}"),
            _ => {}
        }
    }
    panic!("stream ended before the answer was done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_turn_is_stored_with_its_timings() {
    let w = world("turn", 24).await;
    let (snap, mut rx) = w.subscribe(1024).await;
    assert!(snap.messages.is_empty());
    w.send("What is the capital of France?").await.unwrap();
    let (text, done) = until_done(&mut rx).await;
    assert_eq!(done.status, MessageStatus::Complete);
    assert_eq!(done.content, text);
    assert!(
        done.ttft_ms.unwrap() > 0.0
            && done.completion_tokens.unwrap() > 0
            && done.prompt_tokens.unwrap() > 0
    );
    let branch = w.store.branch(w.user, w.conv, None).await.unwrap();
    assert_eq!(branch.len(), 2);
    assert_eq!(
        (branch[0].role, branch[0].content.as_str()),
        (Role::User, "What is the capital of France?")
    );
    assert_eq!(branch[1], done);
    assert_eq!(
        w.store.conversation(w.user, w.conv).await.unwrap().title,
        "What is the capital of France?"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_subscriber_gets_the_snapshot_then_the_rest() {
    let w = world("late", 80).await;
    let (_, mut first) = w.subscribe(1024).await;
    w.send("Tell me a story about a lighthouse.").await.unwrap();
    let mut seen = 0;
    while seen < 10 {
        if let Some(SessionEvent::Delta { .. }) = first.recv().await {
            seen += 1;
        }
    }
    let (snap, mut late) = w.subscribe(1024).await;
    let partial = snap.streaming.expect("a live partial answer");
    assert!(!partial.content.is_empty());
    assert_eq!(snap.messages.last().unwrap().content, partial.content);
    let (rest, done) = until_done(&mut late).await;
    assert_eq!(
        format!("{}{rest}", partial.content),
        done.content,
        "snapshot + deltas = stored text"
    );
    let (_, done_first) = until_done(&mut first).await;
    assert_eq!(done_first.content, done.content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regenerate_makes_a_sibling_and_edit_a_new_branch() {
    let w = world("branches", 12).await;
    let (_, mut rx) = w.subscribe(1024).await;
    w.send("Name a color.").await.unwrap();
    let (versions, a1) = versions_until_done(&mut rx).await;
    let user = a1.parent_id.unwrap();
    assert_eq!(
        versions,
        vec![vec![user], vec![a1.id]],
        "no other versions yet"
    );
    let s = w.session().await;
    assert_eq!(call!(s, SessionMsg::Regenerate, None).unwrap(), Ok(()));
    let (versions, a2) = versions_until_done(&mut rx).await;
    assert_ne!(a1.id, a2.id);
    assert_eq!(
        a1.parent_id, a2.parent_id,
        "siblings under the same question"
    );
    assert_eq!(
        versions,
        vec![vec![a1.id, a2.id]],
        "the new answer comes with both versions"
    );

    assert_eq!(
        call!(s, SessionMsg::Edit, user, "Name a fruit.".to_owned()).unwrap(),
        Ok(())
    );
    let (versions, a3) = versions_until_done(&mut rx).await;
    let branch = w.store.branch(w.user, w.conv, None).await.unwrap();
    assert_eq!(branch.len(), 2);
    assert_eq!(branch[0].content, "Name a fruit.");
    assert_eq!(branch[1].id, a3.id);
    assert_eq!(
        versions,
        vec![vec![user, branch[0].id], vec![a3.id]],
        "the edit comes with both versions of the question; its answer is the only one"
    );
    let old = w.store.branch(w.user, w.conv, Some(a1.id)).await.unwrap();
    assert_eq!(
        old[0].content, "Name a color.",
        "the old branch stays readable"
    );
    // A new subscriber sees the versions of every shown message that has any.
    let (snap, _late) = w.subscribe(16).await;
    assert_eq!(snap.siblings.len(), 1, "{:?}", snap.siblings);
    assert_eq!(snap.siblings[&branch[0].id], vec![user, branch[0].id]);
    // Back on the first question, the newest answer under it is shown, with both versions.
    assert_eq!(call!(s, SessionMsg::SelectBranch, a1.id).unwrap(), Ok(()));
    let (snap, _late) = w.subscribe(16).await;
    assert_eq!(
        snap.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![user, a1.id]
    );
    assert_eq!(snap.siblings[&user], vec![user, branch[0].id]);
    assert_eq!(snap.siblings[&a1.id], vec![a1.id, a2.id]);
    // One active generation per conversation.
    w.send("And a number?").await.unwrap();
    assert_eq!(w.send("too soon").await, Err(SessionError::Generating));
    until_done(&mut rx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_the_generation_in_the_model_actor() {
    let w = world("stop", 400).await;
    let (_, mut rx) = w.subscribe(1024).await;
    w.send("Write a very long essay about the history of bread.")
        .await
        .unwrap();
    let mut seen = 0;
    while seen < 5 {
        if let Some(SessionEvent::Delta { .. }) = rx.recv().await {
            seen += 1;
        }
    }
    assert_eq!(w.running().await, 1);
    assert!(call!(w.session().await, SessionMsg::Stop).unwrap());
    let (_, done) = until_done(&mut rx).await;
    assert_eq!(done.finish_reason.as_deref(), Some("stopped"));
    assert!(done.completion_tokens.unwrap() < 400);
    assert_eq!(w.running().await, 0, "the sequence left the batch");
    let stored = w.store.message(w.user, done.id).await.unwrap();
    assert_eq!(stored.content, done.content);
    assert!(!stored.content.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_does_not_slow_a_fast_one() {
    let w = world("slow", 120).await;
    let (_, mut slow) = w.subscribe(4).await; // not read while the answer streams
    let (_, mut fast) = w.subscribe(1024).await;
    let started = Instant::now();
    w.send("Describe a busy market in detail.").await.unwrap();
    let (text, done) = until_done(&mut fast).await;
    assert_eq!(text, done.content);
    assert!(done.completion_tokens.unwrap() > 10);
    assert!(started.elapsed() < Duration::from_secs(60));
    // The slow one was dropped when its channel was full: its stream ends after exactly what
    // fit (a subscriber that was never dropped would leave this waiting, hence the timeout).
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        let mut n = 0;
        while slow.recv().await.is_some() {
            n += 1;
        }
        n
    })
    .await
    .expect("the slow subscriber was never dropped");
    assert_eq!(got, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_stops_itself_and_reopens_from_the_store() {
    let mut w = world("idle", 8).await;
    let args = RegistryArgs {
        store: w.store.clone(),
        model: w.model.clone(),
        engine: engine(),
        idle: Duration::from_millis(300),
    };
    w.registry = Actor::spawn(None, SessionRegistry, args).await.unwrap().0;
    {
        let (_, mut rx) = w.subscribe(1024).await;
        w.send("Hi!").await.unwrap();
        until_done(&mut rx).await;
    }
    assert_eq!(call!(w.registry, RegistryMsg::Count).unwrap(), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while call!(w.registry, RegistryMsg::Count).unwrap() > 0 {
        assert!(Instant::now() < deadline, "the idle session did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (snap, _rx) = w.subscribe(16).await;
    assert_eq!(
        snap.messages.len(),
        2,
        "a new session starts from the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_elses_conversation_cannot_be_opened() {
    let w = world("other", 8).await;
    let mallory = w.store.create_user().await.unwrap();
    let r = call!(w.registry, RegistryMsg::Open, mallory, w.conv).unwrap();
    assert_eq!(r.err(), Some(SessionError::NotFound));
    let r = call!(w.registry, RegistryMsg::Open, w.user, ConversationId::new()).unwrap();
    assert_eq!(r.err(), Some(SessionError::NotFound));
}

#[test]
fn a_process_killed_mid_answer_restarts_with_the_partial_answer_interrupted() {
    let dir = temp_dir("sigkill");
    let mut child = Command::new(env!("CARGO_BIN_EXE_smolchat"))
        .args([
            "--model",
            common::default_model_path().to_str().unwrap(),
            "session-turn",
            "--data-dir",
        ])
        .arg(&dir)
        .args([
            "--message",
            "Write a long story about a sailor and the sea.",
            "--max-tokens",
            "2000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let ids: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let mut printed = String::new();
    let mut deltas = 0;
    for line in lines.by_ref() {
        let ev: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if ev["type"] == "delta" {
            printed.push_str(ev["text"].as_str().unwrap());
            deltas += 1;
            if deltas == 40 {
                break;
            }
        }
    }
    // Let a checkpoint happen, then kill without warning.
    std::thread::sleep(Duration::from_millis(900));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(&dir.join("smolchat.db")).await.unwrap();
        let user: UserId = ids["user"].as_str().unwrap().parse().unwrap();
        let conv: ConversationId = ids["conversation"].as_str().unwrap().parse().unwrap();
        let branch = store.branch(user, conv, None).await.unwrap();
        assert_eq!(
            branch[0].content,
            "Write a long story about a sailor and the sea."
        );
        let answer = &branch[1];
        assert_eq!(answer.status, MessageStatus::Interrupted);
        assert!(!answer.content.is_empty(), "the checkpointed text is kept");
        assert!(
            printed.starts_with(&answer.content) || answer.content.starts_with(&printed),
            "stored text is what was streamed"
        );
    });
}

/// A conversation whose history (a long first turn) plus `max_tokens` overflows the context,
/// while the last question alone fits.
async fn overflowing(w: &World) -> (usize, String) {
    let e = engine();
    let long = "Tell me about the weather in every season. ".repeat(40);
    let u1 = w
        .store
        .add_message(
            w.user,
            w.conv,
            None,
            Role::User,
            &long,
            MessageStatus::Complete,
        )
        .await
        .unwrap();
    w.store
        .add_message(
            w.user,
            w.conv,
            Some(u1.id),
            Role::Assistant,
            &long,
            MessageStatus::Complete,
        )
        .await
        .unwrap();
    let last = "And what about tomorrow?".to_owned();
    let alone = e
        .render_chat(
            &[smolchat::engine::ChatMessage::new("user", &last)],
            true,
            Some(false),
        )
        .unwrap()
        .1
        .len();
    let context = e.model.cfg.context_length;
    let max_tokens = context - alone - 2;
    let patch = smolchat::store::ConversationPatch {
        settings: Some(Settings {
            temperature: 0.0,
            max_tokens,
            ..Settings::default()
        }),
        ..Default::default()
    };
    w.store
        .update_conversation(w.user, w.conv, &patch)
        .await
        .unwrap();
    (max_tokens, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_too_long_is_refused_by_default_and_the_question_kept() {
    let w = world("refuse", 8).await;
    let (_, last) = overflowing(&w).await;
    let (_, mut rx) = w.subscribe(64).await;
    let err = w.send(&last).await.unwrap_err();
    let context = engine().model.cfg.context_length;
    assert!(
        matches!(err, SessionError::ContextOverflow { needed, context: c } if needed > context && c == context),
        "{err:?}"
    );
    let mut saw_error = false;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        if let SessionEvent::Error { code, .. } = ev {
            assert_eq!(code, "context_overflow");
            saw_error = true;
        }
    }
    assert!(saw_error);
    let branch = w.store.branch(w.user, w.conv, None).await.unwrap();
    assert_eq!(
        branch.last().unwrap().content,
        last,
        "the question is stored, nothing was generated"
    );
    assert_eq!(w.running().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_leaves_out_whole_turns_and_says_so() {
    use smolchat::engine::ChatMessage;
    let w = world("drop", 8).await;
    // Four turns of different lengths, then a question.
    let mut turns = vec![];
    let mut parent = None;
    for (i, n) in [30, 5, 60, 12].into_iter().enumerate() {
        for (role, text) in [
            (
                Role::User,
                format!("Question {i}: {}", "why is the sky blue? ".repeat(n)),
            ),
            (
                Role::Assistant,
                format!("Answer {i}: {}", "because of light. ".repeat(n)),
            ),
        ] {
            let m = w
                .store
                .add_message(w.user, w.conv, parent, role, &text, MessageStatus::Complete)
                .await
                .unwrap();
            parent = Some(m.id);
            turns.push(ChatMessage::new(role.as_str(), &text));
        }
    }
    let last = "And what about tomorrow?";
    // The prompt's length without the `k` oldest turns.
    let e = engine();
    let without = |k: usize| {
        let mut msgs = turns[2 * k..].to_vec();
        msgs.push(ChatMessage::new("user", last));
        e.render_chat(&msgs, true, Some(false)).unwrap().1.len()
    };
    // Room for the answer such that exactly the two oldest turns must go.
    let max_tokens = e.model.cfg.context_length - without(2);
    assert!(without(1) + max_tokens > e.model.cfg.context_length);
    let patch = smolchat::store::ConversationPatch {
        overflow_policy: Some(smolchat::store::OverflowPolicy::DropOldest),
        settings: Some(Settings {
            temperature: 0.0,
            max_tokens,
            ..Settings::default()
        }),
        ..Default::default()
    };
    w.store
        .update_conversation(w.user, w.conv, &patch)
        .await
        .unwrap();
    let (_, mut rx) = w.subscribe(1024).await;
    w.send(last).await.unwrap();
    let mut notice = None;
    loop {
        match rx.recv().await.unwrap() {
            SessionEvent::Notice { text } => notice = Some(text),
            SessionEvent::Delta { .. } => break,
            _ => {}
        }
    }
    let notice = notice.expect("a notice");
    assert!(notice.starts_with("2 earlier turn"), "{notice}");
    assert!(call!(w.session().await, SessionMsg::Stop).unwrap());
    let (_, done) = until_done(&mut rx).await;
    assert_eq!(done.finish_reason.as_deref(), Some("stopped"));
    assert_eq!(
        done.prompt_tokens,
        Some(without(2) as i64),
        "the prompt is exactly the last two whole turns and the question"
    );
    // Nothing is deleted: the stored history keeps every turn.
    let branch = w.store.branch(w.user, w.conv, None).await.unwrap();
    assert_eq!(branch.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_session_is_restarted_from_the_store_with_its_answer_interrupted() {
    let w = world("fault", 400).await;
    let (_, mut rx) = w.subscribe(1024).await;
    w.send("Write a long story about a fox.").await.unwrap();
    let mut streamed = String::new();
    while streamed.len() < 30 {
        if let Some(SessionEvent::Delta { text, .. }) = rx.recv().await {
            streamed.push_str(&text);
        }
    }
    tokio::time::sleep(Duration::from_millis(600)).await; // let a checkpoint land
    let failing = w.session().await;
    failing.cast(SessionMsg::InjectFault).unwrap();
    // The subscriber's stream ends with the actor.
    while rx.recv().await.is_some() {}
    // The model stops generating for it (its event sink went away with the session).
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.running().await > 0 {
        assert!(Instant::now() < deadline, "the orphaned job kept running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new session starts from the store: the question intact, the answer interrupted.
    let (snap, _rx) = w.subscribe(64).await;
    assert_ne!(
        w.session().await.get_id(),
        failing.get_id(),
        "a fresh actor"
    );
    assert_eq!(snap.messages.len(), 2);
    assert_eq!(snap.messages[0].content, "Write a long story about a fox.");
    assert_eq!(snap.messages[1].status, MessageStatus::Interrupted);
    assert!(
        !snap.messages[1].content.is_empty()
            && streamed
                .starts_with(&snap.messages[1].content[..10.min(snap.messages[1].content.len())])
    );
    assert!(snap.streaming.is_none());
    // And the conversation goes on.
    let (_, mut rx2) = w.subscribe(1024).await;
    call!(w.session().await, SessionMsg::Stop).unwrap();
    w.send("Shorter, please.").await.unwrap();
    call!(w.session().await, SessionMsg::Stop).unwrap();
    let (_, done) = until_done(&mut rx2).await;
    assert_eq!(done.status, MessageStatus::Complete);
}

/// Every write of an answer's text fails, through a trigger put into the real SQLite file from
/// a connection of its own, until the trigger is dropped.
async fn failing_answer_writes(db: &std::path::Path) -> sqlx::SqliteConnection {
    use sqlx::{ConnectOptions, Executor};
    let mut c = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .connect()
        .await
        .unwrap();
    c.execute(
        "CREATE TRIGGER injected_fault BEFORE UPDATE OF content ON messages \
         WHEN NEW.role = 'assistant' BEGIN SELECT RAISE(ABORT, 'injected fault'); END",
    )
    .await
    .unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_store_refuses_to_write_streams_on_and_is_stored_once_it_can_be() {
    use sqlx::Executor;
    let w = world("store-fault", 48).await;
    let (_, mut rx) = w.subscribe(1024).await;
    let mut fault = failing_answer_writes(&w.db).await;
    let session = w.session().await;
    w.send("Tell me about foxes.").await.unwrap();
    // The whole answer streams although no checkpoint (nor the final write) lands: the model
    // is done when nothing has come for a while.
    let mut streamed = String::new();
    let mut answer = None;
    while let Ok(ev) = tokio::time::timeout(Duration::from_secs(4), rx.recv()).await {
        match ev.expect("the session keeps its subscribers") {
            SessionEvent::MessageStarted { message, .. } => answer = Some(message.id),
            SessionEvent::Delta { text, .. } => streamed.push_str(&text),
            SessionEvent::MessageDone { .. } => panic!("done although nothing was stored"),
            _ => {}
        }
    }
    assert!(!streamed.is_empty());
    let answer = answer.expect("the answer started");
    assert_eq!(
        w.session().await.get_id(),
        session.get_id(),
        "the same actor"
    );
    assert!(
        call!(session, SessionMsg::IsGenerating).unwrap(),
        "an answer not yet stored is still the active one"
    );
    assert!(matches!(
        w.send("Another question?").await,
        Err(SessionError::Generating)
    ));
    let stored = w.store.message(w.user, answer).await.unwrap();
    assert_eq!(stored.status, MessageStatus::Streaming);
    assert_eq!(stored.content, "", "no write got through");

    // The store recovers: the next tick writes the answer whole, and only then is it done.
    fault.execute("DROP TRIGGER injected_fault").await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match rx.recv().await.expect("still subscribed") {
                SessionEvent::MessageDone { message } => return message,
                SessionEvent::Delta { .. } => panic!("a delta after the answer ended"),
                _ => {}
            }
        }
    })
    .await
    .expect("the answer is stored once the store takes writes again");
    assert_eq!(done.id, answer);
    assert_eq!(done.status, MessageStatus::Complete);
    assert_eq!(done.content, streamed);
    assert_eq!(
        w.store.message(w.user, answer).await.unwrap().content,
        streamed
    );
    assert!(!call!(session, SessionMsg::IsGenerating).unwrap());
}

/// How [`FaultyModel`] misbehaves.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Every answer is `a`, a NUL byte, `b` (a byte-level token can decode to NUL), then done.
    Nul,
    /// The same text, then the job's sink is dropped without `Done` or `Error`, as a model
    /// actor that fails mid-job leaves it.
    Vanish,
    /// More text than the store keeps in one message (1 MiB), then done.
    Huge,
}

/// A model actor that misbehaves on purpose (fault injection at the session's other end).
struct FaultyModel;

impl Actor for FaultyModel {
    type Msg = ModelMsg;
    type State = (Fault, u64);
    type Arguments = Fault;

    async fn pre_start(
        &self,
        _: ActorRef<ModelMsg>,
        fault: Fault,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok((fault, 0))
    }

    async fn handle(
        &self,
        _: ActorRef<ModelMsg>,
        msg: ModelMsg,
        (fault, jobs): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ModelMsg::Submit(job, reply) => {
                *jobs += 1;
                let fault = *fault;
                let prompt_tokens = job.prompt.len();
                tokio::spawn(async move {
                    let text = match fault {
                        Fault::Huge => "x".repeat((1 << 20) + 1),
                        _ => "a\0b".to_owned(),
                    };
                    let piece = (Channel::Answer, text);
                    let token = JobEvent::Token {
                        id: 0,
                        pieces: vec![piece],
                    };
                    let _ = job.sink.send(token).await;
                    if let Fault::Nul | Fault::Huge = fault {
                        let done = JobDone {
                            finish_reason: FinishReason::Stop,
                            prompt_tokens,
                            cached_tokens: 0,
                            generated_tokens: 1,
                            time_to_first_token_ms: 1.0,
                            decode_tokens_per_second: 1.0,
                        };
                        let _ = job.sink.send(JobEvent::Done(done)).await;
                    }
                });
                let _ = reply.send(Ok(JobId(*jobs)));
            }
            ModelMsg::Cancel(_) => {}
            ModelMsg::Status(reply) => {
                let _ = reply.send(ModelStatus::default());
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_from_the_model_is_stored_as_a_replacement_and_a_job_that_vanishes_ends_as_an_error()
{
    for fault in [Fault::Nul, Fault::Vanish] {
        let (model, _) = Actor::spawn(None, FaultyModel, fault).await.unwrap();
        let w = world_with(&format!("faulty-{fault:?}"), 16, model).await;
        let (_, mut rx) = w.subscribe(64).await;
        let session = w.session().await;
        w.send("Hello?").await.unwrap();
        let (mut streamed, mut error) = (String::new(), None);
        let done = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match rx.recv().await.expect("the session keeps its subscribers") {
                    SessionEvent::Delta { text, .. } => streamed.push_str(&text),
                    SessionEvent::Error { code, .. } => error = Some(code),
                    SessionEvent::MessageDone { message } => return message,
                    _ => {}
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{fault:?}: the answer never ended"));
        assert_eq!(
            streamed, "a\u{FFFD}b",
            "{fault:?}: what the subscribers saw"
        );
        assert_eq!(done.content, streamed, "{fault:?}: what was stored");
        match fault {
            Fault::Nul => {
                assert_eq!(done.status, MessageStatus::Complete);
                assert_eq!(error, None);
            }
            Fault::Vanish => {
                assert_eq!(done.status, MessageStatus::Error);
                assert_eq!(error.as_deref(), Some("unavailable"));
            }
            Fault::Huge => unreachable!(),
        }
        assert_eq!(
            w.session().await.get_id(),
            session.get_id(),
            "the same actor"
        );
        // The conversation goes on.
        w.send("Again?").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_store_can_never_take_ends_as_an_error_and_the_session_goes_on() {
    let (model, _) = Actor::spawn(None, FaultyModel, Fault::Huge).await.unwrap();
    let w = world_with("faulty-huge", 16, model).await;
    let (_, mut rx) = w.subscribe(64).await;
    let session = w.session().await;
    w.send("Hello?").await.unwrap();
    let code = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.recv().await.expect("the session keeps its subscribers") {
                SessionEvent::Error { code, .. } => return code,
                SessionEvent::MessageDone { .. } => panic!("stored although too long"),
                _ => {}
            }
        }
    })
    .await
    .expect("the answer ended");
    assert_eq!(code, "invalid_request");
    assert!(!call!(session, SessionMsg::IsGenerating).unwrap());
    let branch = w.store.branch(w.user, w.conv, None).await.unwrap();
    assert_eq!(branch.len(), 2);
    assert_eq!(branch[1].status, MessageStatus::Error, "not left streaming");
    assert_eq!(branch[1].content, "");
    assert_eq!(
        w.session().await.get_id(),
        session.get_id(),
        "the same actor"
    );
}
