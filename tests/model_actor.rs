//! The model actor with the real default model: continuous batching gives every job the tokens
//! it gets alone, admission refuses clearly, cancellation frees slots, warm conversations skip
//! their shared prefix.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ractor::{call, Actor, ActorRef};
use smolchat::actors::{
    GenerationJob, JobDone, JobError, JobEvent, ModelActor, ModelMsg, ModelStatus, SchedulerConfig,
};
use smolchat::engine::{ChatMessage, Engine, FinishReason, KvFormat, SamplingParams};
use tokio::sync::mpsc;

fn engine() -> Arc<Engine> {
    static E: std::sync::OnceLock<Arc<Engine>> = std::sync::OnceLock::new();
    E.get_or_init(|| Arc::new(Engine::load(&common::default_model_path()).unwrap()))
        .clone()
}

/// The default model with 8-bit K and V.
fn engine_q8() -> Arc<Engine> {
    static E: std::sync::OnceLock<Arc<Engine>> = std::sync::OnceLock::new();
    E.get_or_init(|| {
        let mut e = Engine::load(&common::default_model_path()).unwrap();
        e.model.set_kv_format(KvFormat::Q8).unwrap();
        Arc::new(e)
    })
    .clone()
}

async fn start(config: SchedulerConfig) -> ActorRef<ModelMsg> {
    start_on(engine(), config).await
}

async fn start_on(engine: Arc<Engine>, config: SchedulerConfig) -> ActorRef<ModelMsg> {
    let (actor, _) = Actor::spawn(None, ModelActor, (engine, config))
        .await
        .expect("spawn");
    actor
}

fn chat(text: &str) -> Vec<u32> {
    engine()
        .render_chat(&[ChatMessage::new("user", text)], true, None)
        .unwrap()
        .1
}

fn job(
    prompt: Vec<u32>,
    max_tokens: usize,
    key: Option<&str>,
) -> (GenerationJob, mpsc::Receiver<JobEvent>) {
    let (tx, rx) = mpsc::channel(64);
    let job = GenerationJob {
        prompt,
        params: SamplingParams::default(),
        max_tokens,
        stop_strings: vec![],
        reasoning: false,
        cache_key: key.map(str::to_owned),
        sink: tx,
    };
    (job, rx)
}

async fn submit(
    actor: &ActorRef<ModelMsg>,
    job: GenerationJob,
) -> Result<smolchat::actors::JobId, JobError> {
    call!(actor, ModelMsg::Submit, job).expect("actor answers")
}

/// Reads a job's events to the end: its tokens and its `Done`.
async fn collect(mut rx: mpsc::Receiver<JobEvent>) -> (Vec<u32>, JobDone) {
    let mut ids = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            JobEvent::Token { id, .. } => ids.push(id),
            JobEvent::Queued { .. } => {}
            JobEvent::Done(d) => return (ids, d),
            JobEvent::Error(e) => panic!("job failed: {e}"),
        }
    }
    panic!("the stream ended without Done");
}

async fn status(actor: &ActorRef<ModelMsg>) -> ModelStatus {
    call!(actor, ModelMsg::Status).unwrap()
}

async fn alone(actor: &ActorRef<ModelMsg>, prompt: Vec<u32>, max_tokens: usize) -> Vec<u32> {
    let (j, rx) = job(prompt, max_tokens, None);
    submit(actor, j).await.unwrap();
    collect(rx).await.0
}

fn prompts16() -> Vec<Vec<u32>> {
    let topics = [
        "rain", "the sea", "bread", "owls", "rust", "trains", "tea", "snow",
    ];
    (0..16)
        .map(|i| {
            let filler = "Please be brief. ".repeat(i * 7);
            chat(&format!(
                "{filler}Write one sentence about {}.",
                topics[i % topics.len()]
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_jobs_joining_mid_flight_get_the_tokens_they_get_alone() {
    sixteen_jobs_on(engine()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_8bit_kv_cache_too() {
    sixteen_jobs_on(engine_q8()).await;
}

async fn sixteen_jobs_on(engine: Arc<Engine>) {
    let actor = start_on(
        engine,
        SchedulerConfig {
            step_tokens: 64,
            ..SchedulerConfig::cpu()
        },
    )
    .await;
    let prompts = prompts16();
    let mut reference = Vec::new();
    for p in &prompts {
        reference.push(alone(&actor, p.clone(), 20).await);
    }
    let steps_before = status(&actor).await.steps;
    let mut handles = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        // Staggered: later jobs join a batch that is already decoding.
        tokio::time::sleep(Duration::from_millis(if i % 3 == 0 { 60 } else { 5 })).await;
        let (j, rx) = job(p.clone(), 20, None);
        submit(&actor, j).await.unwrap();
        handles.push(tokio::spawn(collect(rx)));
    }
    let mut generated = 0;
    for (i, h) in handles.into_iter().enumerate() {
        let (ids, done) = h.await.unwrap();
        assert_eq!(ids, reference[i], "job {i} differs from its solo run");
        assert_eq!(done.prompt_tokens, prompts[i].len());
        assert!(matches!(
            done.finish_reason,
            FinishReason::Length | FinishReason::Stop
        ));
        assert!(!ids.is_empty());
        assert_eq!(done.generated_tokens, ids.len());
        generated += ids.len();
    }
    // They really shared steps: far fewer steps than tokens generated.
    let steps = status(&actor).await.steps - steps_before;
    assert!(
        steps < generated as u64 / 2,
        "{steps} steps for {generated} tokens"
    );
    assert_eq!(status(&actor).await.running, 0);
    actor.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_stream_frees_the_slot_and_the_others_go_on() {
    let actor = start(SchedulerConfig::cpu()).await;
    let mut rxs = Vec::new();
    let mut ids = Vec::new();
    for t in [
        "Tell me a long story about a dragon.",
        "Describe a city at night.",
        "List ten fruits.",
    ] {
        let (j, rx) = job(chat(t), 120, None);
        ids.push(submit(&actor, j).await.unwrap());
        rxs.push(rx);
    }
    let mut first = rxs.remove(0);
    let mut seen = 0;
    while seen < 5 {
        if let Some(JobEvent::Token { .. }) = first.recv().await {
            seen += 1;
        }
    }
    assert_eq!(status(&actor).await.running, 3);
    actor.cast(ModelMsg::Cancel(ids[0])).unwrap();
    let (_, done) = collect(first).await;
    assert_eq!(done.finish_reason, FinishReason::Cancelled);
    assert!(done.generated_tokens < 120);
    let s = status(&actor).await;
    assert!(s.running <= 2, "the cancelled job left the batch: {s:?}");
    for rx in rxs {
        let (ids, done) = collect(rx).await;
        assert!(!ids.is_empty());
        assert_ne!(done.finish_reason, FinishReason::Cancelled);
    }
    actor.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_sink_cancels_its_job() {
    let actor = start(SchedulerConfig::cpu()).await;
    let (j, mut rx) = job(chat("Count to one hundred."), 200, None);
    submit(&actor, j).await.unwrap();
    for _ in 0..3 {
        rx.recv().await.expect("a token");
    }
    assert_eq!(status(&actor).await.running, 1);
    drop(rx); // the reader went away mid-stream
    for _ in 0..200 {
        let s = status(&actor).await;
        if s.running == 0 && s.waiting == 0 {
            actor.stop(None);
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the job kept running: {:?}", status(&actor).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_refused_at_once_with_its_length() {
    let actor = start(SchedulerConfig {
        max_running: 1,
        max_queue: 1,
        ..SchedulerConfig::cpu()
    })
    .await;
    let (a, rx_a) = job(chat("Tell me a long story."), 200, None);
    submit(&actor, a).await.unwrap();
    while status(&actor).await.running < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (b, _rx_b) = job(chat("Hi"), 10, None);
    submit(&actor, b).await.unwrap();
    let (c, _rx_c) = job(chat("Hello"), 10, None);
    let started = std::time::Instant::now();
    assert_eq!(
        submit(&actor, c).await,
        Err(JobError::Busy { queue_len: 1 })
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    drop(rx_a);
    actor.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_that_cannot_fit_gets_both_numbers() {
    let actor = start(SchedulerConfig::cpu()).await;
    let context = engine().model.cfg.context_length;
    let prompt = chat("Hi");
    let n = prompt.len();
    let (j, _rx) = job(prompt, context, None);
    let err = submit(&actor, j).await.unwrap_err();
    assert_eq!(
        err,
        JobError::ContextOverflow {
            prompt_tokens: n,
            max_tokens: context,
            context
        }
    );
    let text = err.to_string();
    assert!(
        text.contains(&n.to_string()) && text.contains(&context.to_string()),
        "{text}"
    );
    actor.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_turn_reuses_the_warm_cache_of_its_own_conversation_only() {
    let actor = start(SchedulerConfig::cpu()).await;
    let e = engine();
    let mut history = vec![ChatMessage::new("user", "What is the capital of France?")];
    let turn1 = e.render_chat(&history, true, None).unwrap().1;
    let (j, rx) = job(turn1.clone(), 16, Some("conv-a"));
    submit(&actor, j).await.unwrap();
    let (ids1, done1) = collect(rx).await;
    assert_eq!(done1.cached_tokens, 0);
    history.push(ChatMessage::new("assistant", &e.tokenizer.decode(&ids1)));
    history.push(ChatMessage::new("user", "And of Italy?"));
    let turn2 = e.render_chat(&history, true, None).unwrap().1;

    let cold = alone(&actor, turn2.clone(), 16).await;

    // Another conversation's key never sees conv-a's cache.
    let (j, rx) = job(turn2.clone(), 16, Some("conv-b"));
    submit(&actor, j).await.unwrap();
    let (other, done_b) = collect(rx).await;
    assert_eq!(done_b.cached_tokens, 0);
    assert_eq!(other, cold);

    let (j, rx) = job(turn2.clone(), 16, Some("conv-a"));
    submit(&actor, j).await.unwrap();
    let (warm, done2) = collect(rx).await;
    assert_eq!(
        warm, cold,
        "a warm turn gives the same tokens as a cold one"
    );
    // The first turn's prompt (and its answer, up to where the template differs) was reused.
    assert!(
        done2.cached_tokens >= turn1.len(),
        "cached {} of {}",
        done2.cached_tokens,
        turn2.len()
    );
    assert!(done2.prompt_tokens - done2.cached_tokens < turn2.len() - turn1.len() + 1);
    assert!(status(&actor).await.warm_entries >= 2);
    actor.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_jobs_are_told_how_many_wait_ahead_of_them() {
    let actor = start(SchedulerConfig {
        max_running: 1,
        ..SchedulerConfig::cpu()
    })
    .await;
    let mut rxs = Vec::new();
    for t in ["Count to twenty.", "Name three colours.", "Say hello."] {
        let (j, rx) = job(chat(t), 24, None);
        submit(&actor, j).await.unwrap();
        rxs.push(rx);
    }
    // One at a time: each job's places, all told before its first token.
    let mut places = Vec::new();
    for mut rx in rxs {
        let (mut told, mut tokens) = (Vec::new(), 0);
        while let Some(ev) = rx.recv().await {
            match ev {
                JobEvent::Queued { ahead } => {
                    assert_eq!(tokens, 0, "a place told after a token");
                    told.push(ahead);
                }
                JobEvent::Token { .. } => tokens += 1,
                JobEvent::Done(_) => break,
                JobEvent::Error(e) => panic!("job failed: {e}"),
            }
        }
        assert!(tokens > 0);
        places.push(told);
    }
    assert_eq!(places, vec![vec![], vec![0], vec![1, 0]]);
}
