//! The `ModelActor`: one per device, owning the engine.
//!
//! The actor is the front door: it validates and admits jobs (bounded: a full queue answers
//! [`JobError::Busy`] at once, a prompt that cannot fit answers [`JobError::ContextOverflow`]),
//! and forwards them to the [`scheduler`](super::scheduler) thread, which runs the engine's steps
//! on its own OS thread and drains its queue between steps. Events go back to each job's bounded
//! sink; dropping the sink cancels the job.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Serialize;
use tokio::sync::mpsc as tmpsc;

use super::scheduler::{self, Command, Shared};
use crate::engine::reasoning::Channel;
use crate::engine::{Engine, FinishReason, SamplingParams};

/// Identifies a job inside one model actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct JobId(pub u64);

/// A generation request.
#[derive(Debug)]
pub struct GenerationJob {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop_strings: Vec<String>,
    /// The prompt ends inside an open `<think>` block (reasoning on).
    pub reasoning: bool,
    /// The conversation id: a finished job's KV cache stays warm under this key, and the next
    /// job with the same key reuses the longest shared prefix. Never used across keys.
    pub cache_key: Option<String>,
    /// Where events go. Bounded; dropping the receiver cancels the job.
    pub sink: tmpsc::Sender<JobEvent>,
}

/// What a job streams back: tokens, then exactly one `Done` or one `Error`; before its first
/// token, while it waits for a slot, how many wait ahead of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobEvent {
    /// The job waits for a place in the batch with `ahead` jobs before it (sent when that
    /// number changes; a job that starts at once gets none).
    Queued {
        ahead: usize,
    },
    Token {
        id: u32,
        /// Text this token completed, by channel (often one piece; empty while a UTF-8
        /// character or a possible stop string is incomplete).
        pieces: Vec<(Channel, String)>,
    },
    Done(JobDone),
    Error(JobError),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobDone {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the conversation's warm cache (not recomputed).
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    /// From admission to the first generated token.
    pub time_to_first_token_ms: f64,
    pub decode_tokens_per_second: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum JobError {
    #[error("the server is busy: {queue_len} requests are waiting")]
    Busy { queue_len: usize },
    #[error("the prompt has {prompt_tokens} tokens and asks for {max_tokens} more, but the context holds {context}")]
    ContextOverflow {
        prompt_tokens: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("the request needs {needed_mb} MB of KV cache but the budget is {budget_mb} MB")]
    TooLarge { needed_mb: usize, budget_mb: usize },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the model failed: {0}")]
    Engine(String),
    #[error("the model actor has stopped")]
    Stopped,
}

impl JobError {
    /// A stable machine code for the wire.
    pub fn code(&self) -> &'static str {
        match self {
            JobError::Busy { .. } => "busy",
            JobError::ContextOverflow { .. } => "context_overflow",
            JobError::TooLarge { .. } => "too_large",
            JobError::Invalid(_) => "invalid_request",
            JobError::Engine(_) => "engine_error",
            JobError::Stopped => "unavailable",
        }
    }
}

/// Limits of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences in the running batch at most.
    pub max_running: usize,
    /// Jobs waiting for a slot at most; beyond, `Busy`.
    pub max_queue: usize,
    /// Tokens per step: one decode row per running sequence, then prompt chunks.
    pub step_tokens: usize,
    /// Bytes all KV caches may hold together (running and warm).
    pub kv_budget_bytes: usize,
    /// Events a job may have waiting on a full sink before it is cancelled as too slow.
    pub max_backlog: usize,
}

impl SchedulerConfig {
    /// Sensible limits for a CPU of a few cores.
    pub fn cpu() -> Self {
        Self {
            max_running: 16,
            max_queue: 64,
            step_tokens: 256,
            kv_budget_bytes: 1 << 30,
            max_backlog: 4096,
        }
    }

    /// Limits for a GPU: wider batches and steps.
    pub fn gpu() -> Self {
        Self {
            max_running: 128,
            max_queue: 512,
            step_tokens: 2048,
            kv_budget_bytes: 16 << 30,
            max_backlog: 4096,
        }
    }
}

/// A snapshot of the scheduler.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModelStatus {
    pub running: usize,
    pub waiting: usize,
    pub warm_entries: usize,
    pub kv_bytes: usize,
    pub steps: u64,
    pub max_queue: usize,
}

pub enum ModelMsg {
    Submit(GenerationJob, RpcReplyPort<Result<JobId, JobError>>),
    Cancel(JobId),
    Status(RpcReplyPort<ModelStatus>),
}

pub struct ModelActor;

pub struct ModelState {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    context: usize,
    config: SchedulerConfig,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Actor for ModelActor {
    type Msg = ModelMsg;
    type State = ModelState;
    type Arguments = (Arc<Engine>, SchedulerConfig);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (engine, config): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut config = config;
        if let Some(pool) = engine.model.kv_pool_bytes() {
            // A device's KV blocks are allocated up front (and may be fewer than asked).
            config.kv_budget_bytes = config.kv_budget_bytes.min(pool);
        }
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel();
        let context = engine.model.cfg.context_length;
        let thread = scheduler::spawn(engine, config.clone(), rx, shared.clone())?;
        Ok(ModelState {
            commands: tx,
            shared,
            next_id: AtomicU64::new(1),
            context,
            config,
            thread: Some(thread),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _ = state.commands.send(Command::Shutdown);
        if let Some(t) = state.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ModelMsg::Submit(job, reply) => {
                let result = state.admit(job);
                if let Err(e) = &result {
                    metrics::counter!("smolchat_model_refusals_total", "reason" => e.code())
                        .increment(1);
                }
                let _ = reply.send(result);
            }
            ModelMsg::Cancel(id) => {
                let _ = state.commands.send(Command::Cancel(id));
            }
            ModelMsg::Status(reply) => {
                let _ = reply.send(state.shared.status(state.config.max_queue));
            }
        }
        Ok(())
    }
}

impl ModelState {
    fn admit(&self, job: GenerationJob) -> Result<JobId, JobError> {
        if job.prompt.is_empty() {
            return Err(JobError::Invalid("the prompt is empty".into()));
        }
        if job.max_tokens == 0 {
            return Err(JobError::Invalid("max_tokens must be at least 1".into()));
        }
        job.params
            .validate()
            .map_err(|e| JobError::Invalid(e.to_string()))?;
        if job.prompt.len() + job.max_tokens > self.context {
            return Err(JobError::ContextOverflow {
                prompt_tokens: job.prompt.len(),
                max_tokens: job.max_tokens,
                context: self.context,
            });
        }
        let waiting = self.shared.waiting.load(Ordering::SeqCst);
        if waiting >= self.config.max_queue {
            return Err(JobError::Busy { queue_len: waiting });
        }
        let id = JobId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        if self
            .commands
            .send(Command::Submit(id, job, std::time::Instant::now()))
            .is_err()
        {
            // The scheduler thread is gone: the job never waits anywhere.
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(JobError::Stopped);
        }
        Ok(id)
    }
}
