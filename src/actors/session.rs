//! The `SessionActor`: one per open conversation, owner of its history.
//!
//! It writes the user's message before anything else, renders the prompt from the current
//! branch with the model's template, submits the job to the model actor (the conversation id is
//! the cache key), fans every delta out to its subscribers through bounded channels (a slow one
//! is dropped, never waited for), checkpoints the partial answer at least every 500 ms, and
//! writes the final message with its finish reason, counts and timings. It keeps generating when
//! nobody watches, and stops itself after an idle time with no subscriber and no generation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{call, Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Serialize;
use tokio::sync::mpsc;

use super::model_actor::{GenerationJob, JobError, JobEvent, JobId, ModelMsg};
use crate::engine::reasoning::Channel;
use crate::engine::{ChatMessage, Engine, SamplingParams};
use crate::store::{
    Conversation, ConversationId, Message, MessageId, MessageOutcome, MessageStatus,
    OverflowPolicy, Role, Store, StoreError, UserId,
};

/// Partial answers reach the database at least this often while tokens arrive (the 250 ms tick
/// covers pauses), so at most ~half a second of text is ever at risk.
const CHECKPOINT: Duration = Duration::from_millis(400);
const TICK: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum SessionError {
    #[error("conversation not found")]
    NotFound,
    #[error("an answer is already being generated in this conversation")]
    Generating,
    #[error("the server is busy: {queue_len} requests are waiting; try again in a moment")]
    Busy { queue_len: usize },
    #[error("the conversation needs {needed} tokens but the model's context holds {context}; start a new conversation or let old turns be dropped")]
    ContextOverflow { needed: usize, context: usize },
    #[error("{message}")]
    Invalid { message: String },
    #[error("at most {limit} conversations per user: delete some first")]
    TooManyConversations { limit: usize },
    #[error("{message}")]
    Internal { message: String },
}

impl SessionError {
    pub fn code(&self) -> &'static str {
        match self {
            SessionError::NotFound => "not_found",
            SessionError::Generating => "already_generating",
            SessionError::Busy { .. } => "busy",
            SessionError::ContextOverflow { .. } => "context_overflow",
            SessionError::Invalid { .. } => "invalid_request",
            SessionError::TooManyConversations { .. } => "too_many_conversations",
            SessionError::Internal { .. } => "internal_error",
        }
    }
}

impl From<StoreError> for SessionError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound | StoreError::SignedOut => SessionError::NotFound,
            StoreError::Invalid(m) => SessionError::Invalid { message: m },
            StoreError::TooManyConversations(limit) => SessionError::TooManyConversations { limit },
            StoreError::Busy => SessionError::Generating,
            e @ (StoreError::BadLinkCode
            | StoreError::WouldHide(_)
            | StoreError::TooManyLogins(_)) => SessionError::Invalid {
                message: e.to_string(),
            },
            StoreError::Db(e) => SessionError::Internal {
                message: format!("storage: {e}"),
            },
        }
    }
}

/// The answer being written right now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Partial {
    pub message_id: MessageId,
    pub content: String,
    pub reasoning: String,
    /// While it waits for the model: how many answers are ahead of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ahead: Option<usize>,
}

/// What a subscriber gets first: the stored branch and the live partial answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    pub conversation: Conversation,
    pub messages: Vec<Message>,
    pub streaming: Option<Partial>,
    /// For each shown message that has siblings (other answers, other edits): all of them,
    /// oldest first, so the page can move between branches.
    pub siblings: std::collections::HashMap<MessageId, Vec<MessageId>>,
}

/// What subscribers receive after the snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SessionEvent {
    /// A user message, and every version of it (oldest first; just itself unless it is an edit).
    UserMessage {
        message: Message,
        siblings: Vec<MessageId>,
    },
    /// An answer begins, and every version of it (oldest first; more than itself after a
    /// regenerate).
    MessageStarted {
        message: Message,
        siblings: Vec<MessageId>,
    },
    /// The answer waits for the model with `ahead` answers (anyone's) before it.
    Queued {
        message_id: MessageId,
        ahead: usize,
    },
    Delta {
        message_id: MessageId,
        channel: Channel,
        text: String,
    },
    MessageDone {
        message: Message,
    },
    Busy {
        queue_len: usize,
    },
    Notice {
        text: String,
    },
    /// Another branch is shown now: open the conversation again for its snapshot.
    BranchChanged,
    Error {
        code: String,
        message: String,
    },
}

pub type SubscriberId = u64;

pub enum SessionMsg {
    Subscribe(
        mpsc::Sender<SessionEvent>,
        RpcReplyPort<Result<(SubscriberId, Snapshot), SessionError>>,
    ),
    Unsubscribe(SubscriberId),
    Send(String, RpcReplyPort<Result<(), SessionError>>),
    /// A new answer to the user message above `message` (an assistant message; default: the
    /// current leaf).
    Regenerate(Option<MessageId>, RpcReplyPort<Result<(), SessionError>>),
    /// A new version of user message `message`, answered on its own branch.
    Edit(MessageId, String, RpcReplyPort<Result<(), SessionError>>),
    Stop(RpcReplyPort<bool>),
    /// Shows the branch through `message` (its newest descendant becomes the leaf).
    SelectBranch(MessageId, RpcReplyPort<Result<(), SessionError>>),
    /// Whether a generation is running (tests and health).
    IsGenerating(RpcReplyPort<bool>),
    /// Fault injection for tests: the actor fails as if a bug had struck mid-conversation.
    InjectFault,
    Job(u64, JobEvent),
    Tick,
}

pub struct SessionArgs {
    pub conversation: ConversationId,
    pub owner: UserId,
    pub store: Store,
    pub model: ActorRef<ModelMsg>,
    pub engine: Arc<Engine>,
    pub idle: Duration,
}

struct Active {
    gen: u64,
    job: JobId,
    message: Message,
    content: String,
    reasoning: String,
    dirty: bool,
    last_checkpoint: Instant,
    stopped: bool,
    /// How the answer ended, once it has: kept until the store has taken it (a failed write is
    /// tried again on each tick, and meanwhile the answer stays active).
    outcome: Option<MessageOutcome>,
    /// After a failed write: not before this is it tried again.
    retry_at: Option<Instant>,
    /// While the job waits for the model: how many jobs are ahead of it.
    ahead: Option<usize>,
}

pub struct SessionState {
    args: SessionArgs,
    subscribers: Vec<(SubscriberId, mpsc::Sender<SessionEvent>)>,
    next_subscriber: SubscriberId,
    active: Option<Active>,
    generations: u64,
    idle_since: Instant,
}

pub struct SessionActor;

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SessionMsg>,
        args: SessionArgs,
    ) -> Result<SessionState, ActorProcessingErr> {
        // Fails (and so is not started) when the conversation is not the owner's.
        args.store
            .conversation(args.owner, args.conversation)
            .await?;
        myself.send_interval(TICK, || SessionMsg::Tick);
        Ok(SessionState {
            args,
            subscribers: Vec::new(),
            next_subscriber: 1,
            active: None,
            generations: 0,
            idle_since: Instant::now(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SessionMsg>,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(mut a) = state.active.take() {
            state.args.model.cast(ModelMsg::Cancel(a.job))?;
            let outcome = a.outcome.take().unwrap_or(MessageOutcome {
                status: Some(MessageStatus::Interrupted),
                ..Default::default()
            });
            let s = &state.args;
            s.store
                .finish_message(s.owner, a.message.id, &a.content, &a.reasoning, &outcome)
                .await?;
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionMsg::Subscribe(tx, reply) => {
                let r = state.subscribe(tx).await;
                let _ = reply.send(r);
            }
            SessionMsg::Unsubscribe(id) => state.subscribers.retain(|(s, _)| *s != id),
            SessionMsg::Send(content, reply) => {
                let r = state.send(&myself, content).await;
                let _ = reply.send(r);
            }
            SessionMsg::Regenerate(target, reply) => {
                let r = state.regenerate(&myself, target).await;
                let _ = reply.send(r);
            }
            SessionMsg::Edit(target, content, reply) => {
                let r = state.edit(&myself, target, content).await;
                let _ = reply.send(r);
            }
            SessionMsg::Stop(reply) => {
                let stopping = match state.active.as_mut() {
                    Some(a) => {
                        a.stopped = true;
                        state.args.model.cast(ModelMsg::Cancel(a.job))?;
                        true
                    }
                    None => false,
                };
                let _ = reply.send(stopping);
            }
            SessionMsg::SelectBranch(message, reply) => {
                let r = if state.active.is_some() {
                    Err(SessionError::Generating)
                } else {
                    let s = &state.args;
                    s.store
                        .select_branch(s.owner, s.conversation, message)
                        .await
                        .map(|_| ())
                        .map_err(SessionError::from)
                };
                if r.is_ok() {
                    state.broadcast(SessionEvent::BranchChanged);
                }
                let _ = reply.send(r);
            }
            SessionMsg::IsGenerating(reply) => {
                let _ = reply.send(state.active.is_some());
            }
            SessionMsg::Job(gen, ev) => state.on_job_event(gen, ev).await,
            SessionMsg::InjectFault => return Err("injected fault".into()),
            SessionMsg::Tick => {
                state.store_answer().await;
                if state.active.is_none() && state.subscribers.iter().all(|(_, s)| s.is_closed()) {
                    state.subscribers.clear();
                    if state.idle_since.elapsed() >= state.args.idle {
                        tracing::debug!(conversation = %state.args.conversation, "session idle; stopping");
                        myself.stop(Some("idle".into()));
                    }
                } else {
                    state.idle_since = Instant::now();
                }
            }
        }
        Ok(())
    }
}

impl SessionState {
    fn broadcast(&mut self, ev: SessionEvent) {
        self.subscribers
            .retain(|(id, tx)| match tx.try_send(ev.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::info!(
                        subscriber = id,
                        "subscriber too slow; dropped (it may reopen the conversation)"
                    );
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }

    async fn subscribe(
        &mut self,
        tx: mpsc::Sender<SessionEvent>,
    ) -> Result<(SubscriberId, Snapshot), SessionError> {
        let s = &self.args;
        let conversation = s.store.conversation(s.owner, s.conversation).await?;
        let mut messages = s.store.branch(s.owner, s.conversation, None).await?;
        let streaming = self.active.as_ref().map(|a| Partial {
            message_id: a.message.id,
            content: a.content.clone(),
            reasoning: a.reasoning.clone(),
            ahead: a.ahead,
        });
        if let Some(p) = &streaming {
            for m in messages.iter_mut().filter(|m| m.id == p.message_id) {
                m.content = p.content.clone();
                m.reasoning = p.reasoning.clone();
            }
        }
        let siblings = s.store.siblings(s.owner, s.conversation, &messages).await?;
        let id = self.next_subscriber;
        self.next_subscriber += 1;
        self.subscribers.push((id, tx));
        self.idle_since = Instant::now();
        Ok((
            id,
            Snapshot {
                conversation,
                messages,
                streaming,
                siblings,
            },
        ))
    }

    /// Every version under `parent` (oldest first), for a `message` just stored there. The
    /// message is stored and may be running: a failed look-up only shortens the list shown.
    async fn versions(&self, parent: Option<MessageId>, message: MessageId) -> Vec<MessageId> {
        let s = &self.args;
        s.store
            .children(s.owner, s.conversation, parent)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "listing a message's versions failed");
                vec![message]
            })
    }

    async fn send(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        content: String,
    ) -> Result<(), SessionError> {
        if self.active.is_some() {
            return Err(SessionError::Generating);
        }
        let s = &self.args;
        let conv = s.store.conversation(s.owner, s.conversation).await?;
        let parent = conv.current_leaf_id;
        self.ask(myself, conv, parent, content).await
    }

    /// Stores a user message under `parent` — before anything else can fail — and answers it
    /// with `conv`'s settings (read once per request).
    async fn ask(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        conv: Conversation,
        parent: Option<MessageId>,
        content: String,
    ) -> Result<(), SessionError> {
        if content.trim().is_empty() {
            return Err(SessionError::Invalid {
                message: "the message is empty".into(),
            });
        }
        let s = &self.args;
        let user = s
            .store
            .add_message(
                s.owner,
                s.conversation,
                parent,
                Role::User,
                &content,
                MessageStatus::Complete,
            )
            .await?;
        let siblings = self.versions(parent, user.id).await;
        self.broadcast(SessionEvent::UserMessage {
            message: user.clone(),
            siblings,
        });
        self.generate(myself, conv, user.id).await
    }

    async fn regenerate(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        target: Option<MessageId>,
    ) -> Result<(), SessionError> {
        if self.active.is_some() {
            return Err(SessionError::Generating);
        }
        let s = &self.args;
        let conv = s.store.conversation(s.owner, s.conversation).await?;
        let target = target
            .or(conv.current_leaf_id)
            .ok_or(SessionError::NotFound)?;
        let msg = s.store.message(s.owner, target).await?;
        if msg.conversation_id != s.conversation {
            return Err(SessionError::NotFound);
        }
        // Regenerating a user message answers it again; an assistant message, its question.
        let user = match msg.role {
            Role::User => msg.id,
            _ => msg.parent_id.ok_or(SessionError::Invalid {
                message: "nothing to answer".into(),
            })?,
        };
        self.generate(myself, conv, user).await
    }

    async fn edit(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        target: MessageId,
        content: String,
    ) -> Result<(), SessionError> {
        if self.active.is_some() {
            return Err(SessionError::Generating);
        }
        let s = &self.args;
        let old = s.store.message(s.owner, target).await?;
        if old.conversation_id != s.conversation || old.role != Role::User {
            return Err(SessionError::Invalid {
                message: "only your own messages can be edited".into(),
            });
        }
        let conv = s.store.conversation(s.owner, s.conversation).await?;
        self.ask(myself, conv, old.parent_id, content).await
    }

    /// Renders the branch ending at `user` and starts answering it.
    async fn generate(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        conv: Conversation,
        user: MessageId,
    ) -> Result<(), SessionError> {
        let r = self.try_generate(myself, &conv, user).await;
        if let Err(e) = &r {
            self.broadcast(match e {
                SessionError::Busy { queue_len } => SessionEvent::Busy {
                    queue_len: *queue_len,
                },
                e => SessionEvent::Error {
                    code: e.code().into(),
                    message: e.to_string(),
                },
            });
        }
        r
    }

    async fn try_generate(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        conv: &Conversation,
        user: MessageId,
    ) -> Result<(), SessionError> {
        let s = &self.args;
        let branch = s.store.branch(s.owner, s.conversation, Some(user)).await?;
        let (prompt, dropped) = self.render(conv, &branch)?;
        if dropped > 0 {
            self.broadcast(SessionEvent::Notice {
                text: format!("{dropped} earlier turn(s) were left out so the conversation fits the model's context"),
            });
        }
        let s = &self.args;
        let (tx, mut rx) = mpsc::channel(256);
        let job = GenerationJob {
            prompt,
            params: SamplingParams {
                temperature: conv.settings.temperature,
                top_p: conv.settings.top_p,
                min_p: conv.settings.min_p,
                repetition_penalty: conv.settings.repetition_penalty,
                seed: rand_seed(),
                ..Default::default()
            },
            max_tokens: conv.settings.max_tokens,
            stop_strings: vec![],
            reasoning: false,
            cache_key: Some(s.conversation.to_string()),
            sink: tx,
        };
        let job_id = match call!(s.model, ModelMsg::Submit, job) {
            Ok(Ok(id)) => id,
            Ok(Err(JobError::Busy { queue_len })) => return Err(SessionError::Busy { queue_len }),
            Ok(Err(JobError::ContextOverflow {
                prompt_tokens,
                max_tokens,
                context,
            })) => {
                return Err(SessionError::ContextOverflow {
                    needed: prompt_tokens + max_tokens,
                    context,
                })
            }
            Ok(Err(e)) => {
                return Err(SessionError::Internal {
                    message: e.to_string(),
                })
            }
            Err(e) => {
                return Err(SessionError::Internal {
                    message: format!("model actor: {e}"),
                })
            }
        };
        let message = s
            .store
            .add_message(
                s.owner,
                s.conversation,
                Some(user),
                Role::Assistant,
                "",
                MessageStatus::Streaming,
            )
            .await?;
        self.generations += 1;
        let gen = self.generations;
        self.active = Some(Active {
            gen,
            job: job_id,
            message: message.clone(),
            content: String::new(),
            reasoning: String::new(),
            dirty: false,
            last_checkpoint: Instant::now(),
            stopped: false,
            outcome: None,
            retry_at: None,
            ahead: None,
        });
        let siblings = self.versions(Some(user), message.id).await;
        self.broadcast(SessionEvent::MessageStarted { message, siblings });
        let me = myself.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let last = matches!(ev, JobEvent::Done(_) | JobEvent::Error(_));
                if me.cast(SessionMsg::Job(gen, ev)).is_err() || last {
                    return; // the session is gone (dropping `rx` cancels the job), or done
                }
            }
            // The job's sender went without a last word (the model actor stopped or failed):
            // the answer ends as an error rather than streaming for ever.
            let _ = me.cast(SessionMsg::Job(gen, JobEvent::Error(JobError::Stopped)));
        });
        Ok(())
    }

    /// The prompt for `branch`, within the context: refused, or with the oldest whole turns
    /// dropped, as the conversation's policy says. Returns the tokens and how many turns went.
    fn render(
        &self,
        conv: &Conversation,
        branch: &[Message],
    ) -> Result<(Vec<u32>, usize), SessionError> {
        let engine = &self.args.engine;
        let turns: Vec<ChatMessage> = branch
            .iter()
            .filter(|m| !(m.role == Role::Assistant && m.content.is_empty()))
            .map(|m| ChatMessage::new(m.role.as_str(), &m.content))
            .collect();
        let context = engine.model.cfg.context_length;
        // The prompt without the turns before `cut`, and the context it needs with the answer.
        let attempt = |cut: usize| -> Result<(Vec<u32>, usize), SessionError> {
            let mut all = Vec::with_capacity(turns.len() - cut + 1);
            if !conv.system_prompt.is_empty() {
                all.push(ChatMessage::new("system", &conv.system_prompt));
            }
            all.extend(turns[cut..].iter().cloned());
            let (_, ids) = engine
                .render_chat(&all, true, Some(conv.reasoning))
                .map_err(|e| SessionError::Internal {
                    message: e.to_string(),
                })?;
            let needed = ids.len() + conv.settings.max_tokens;
            Ok((ids, needed))
        };
        let (ids, needed) = attempt(0)?;
        if needed <= context {
            return Ok((ids, 0));
        }
        // A whole turn starts at each user message; the last one (the question) always stays.
        let cuts: Vec<usize> = (0..turns.len())
            .filter(|&i| i == 0 || turns[i].role == "user")
            .collect();
        if conv.overflow_policy == OverflowPolicy::Refuse || cuts.len() <= 1 {
            return Err(SessionError::ContextOverflow { needed, context });
        }
        let (mut fits, needed) = attempt(cuts[cuts.len() - 1])?;
        if needed > context {
            return Err(SessionError::ContextOverflow { needed, context });
        }
        // The fewest oldest turns to drop: the prompt only shrinks as turns go, so bisect
        // (a long history is rendered a few times, not once per dropped turn).
        let (mut too_long, mut short_enough) = (0, cuts.len() - 1);
        while short_enough - too_long > 1 {
            let mid = (too_long + short_enough) / 2;
            let (ids, needed) = attempt(cuts[mid])?;
            if needed <= context {
                (short_enough, fits) = (mid, ids);
            } else {
                too_long = mid;
            }
        }
        Ok((fits, short_enough))
    }

    /// A store failure here does not end the session: the answer stays in memory, streaming
    /// goes on, and the next tick writes it again ([`Self::store_answer`]).
    async fn on_job_event(&mut self, gen: u64, ev: JobEvent) {
        let Some(a) = self.active.as_mut().filter(|a| a.gen == gen) else {
            return;
        };
        let id = a.message.id;
        match ev {
            JobEvent::Queued { ahead } => {
                a.ahead = Some(ahead);
                self.broadcast(SessionEvent::Queued {
                    message_id: id,
                    ahead,
                });
            }
            JobEvent::Token { mut pieces, .. } => {
                a.ahead = None;
                for (_, text) in pieces.iter_mut().filter(|(_, t)| t.contains('\0')) {
                    // The model can write a NUL byte, which the store does not keep: shown
                    // and stored as U+FFFD instead.
                    *text = text.replace('\0', "\u{FFFD}");
                }
                for (channel, text) in &pieces {
                    match channel {
                        Channel::Answer => a.content.push_str(text),
                        Channel::Reasoning => a.reasoning.push_str(text),
                    }
                    a.dirty = true;
                }
                for (channel, text) in pieces {
                    self.broadcast(SessionEvent::Delta {
                        message_id: id,
                        channel,
                        text,
                    });
                }
                self.store_answer().await;
            }
            JobEvent::Done(d) => {
                let stopped = a.stopped;
                let outcome = MessageOutcome {
                    status: Some(MessageStatus::Complete),
                    finish_reason: Some(if stopped {
                        "stopped".into()
                    } else {
                        serde_plain(&d.finish_reason)
                    }),
                    prompt_tokens: Some(d.prompt_tokens as i64),
                    cached_tokens: Some(d.cached_tokens as i64),
                    completion_tokens: Some(d.generated_tokens as i64),
                    ttft_ms: Some(d.time_to_first_token_ms),
                    tokens_per_second: Some(d.decode_tokens_per_second),
                    ..Default::default()
                };
                self.finish(outcome).await;
            }
            JobEvent::Error(e) => {
                let outcome = MessageOutcome {
                    status: Some(MessageStatus::Error),
                    finish_reason: Some("error".into()),
                    error: Some(e.to_string()),
                    ..Default::default()
                };
                self.broadcast(SessionEvent::Error {
                    code: e.code().into(),
                    message: e.to_string(),
                });
                self.finish(outcome).await;
            }
        }
    }

    async fn finish(&mut self, outcome: MessageOutcome) {
        if let Some(a) = self.active.as_mut() {
            a.outcome = Some(outcome);
            a.dirty = true;
            self.store_answer().await;
        }
    }

    /// Writes the active answer: once it has ended, as finished (and then it is no longer
    /// active); before, as a checkpoint when it changed and the last one is old enough. A
    /// failed write is logged and tried again a checkpoint interval later (on a tick, or with
    /// a later token): the text stays here meanwhile. A write that can never succeed (the
    /// conversation is gone, or the store refuses the text) ends the answer with an error.
    async fn store_answer(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let now = Instant::now();
        if !a.dirty
            || a.retry_at.is_some_and(|t| now < t)
            || (a.outcome.is_none() && a.last_checkpoint.elapsed() < CHECKPOINT)
        {
            return;
        }
        let s = &self.args;
        let outcome = a.outcome.clone().unwrap_or_default();
        match s
            .store
            .finish_message(s.owner, a.message.id, &a.content, &a.reasoning, &outcome)
            .await
        {
            Ok(()) => {}
            Err(e @ StoreError::Db(_)) => {
                tracing::warn!(error = %e, message = %a.message.id, "storing an answer failed; trying again shortly");
                a.retry_at = Some(now + CHECKPOINT);
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, message = %a.message.id, "the answer cannot be stored; ending it");
                let _ = s.model.cast(ModelMsg::Cancel(a.job));
                // Not left streaming: stored as failed, without the text the store refuses.
                let failed = MessageOutcome {
                    status: Some(MessageStatus::Error),
                    finish_reason: Some("error".into()),
                    error: Some(e.to_string()),
                    ..Default::default()
                };
                if let Err(e) = s
                    .store
                    .finish_message(s.owner, a.message.id, "", "", &failed)
                    .await
                {
                    tracing::warn!(error = %e, "marking the answer failed did not work either");
                }
                self.active = None;
                self.broadcast(SessionEvent::Error {
                    code: e.code().into(),
                    message: e.to_string(),
                });
                return;
            }
        }
        a.dirty = false;
        a.retry_at = None;
        a.last_checkpoint = now;
        if a.outcome.is_none() {
            return;
        }
        let id = a.message.id;
        self.active = None;
        match s.store.message(s.owner, id).await {
            Ok(message) => self.broadcast(SessionEvent::MessageDone { message }),
            // Stored: a reconnecting client's snapshot has it.
            Err(e) => tracing::warn!(error = %e, "reading a finished answer back failed"),
        }
    }
}

fn serde_plain<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn rand_seed() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}
