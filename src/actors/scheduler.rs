//! The scheduler: continuous batching on its own OS thread.
//!
//! Between two steps it drains its command queue, so a new job joins the running batch at the
//! next step and a cancelled one leaves it there. Each step has a token budget: one decode row
//! per running sequence first, then prompt chunks of the sequences still prefilling, first come
//! first served, so a long prompt delays the others' streams by at most one chunk. Finished
//! conversations keep their KV cache warm under their key (least recently used out first, under
//! the KV budget), and the next turn prefills only what is new.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use super::model_actor::{
    GenerationJob, JobDone, JobError, JobEvent, JobId, ModelStatus, SchedulerConfig,
};
use crate::engine::kv::KvShape;
use crate::engine::{
    Engine, FinishReason, KvCache, Logits, SeqInput, SequenceState, StepOutput, StopCondition,
};

pub enum Command {
    Submit(JobId, GenerationJob, Instant),
    Cancel(JobId),
    Shutdown,
}

/// Counters the actor reads without asking the thread.
#[derive(Default)]
pub struct Shared {
    pub waiting: AtomicUsize,
    running: AtomicUsize,
    warm: AtomicUsize,
    kv_bytes: AtomicUsize,
    steps: AtomicU64,
}

impl Shared {
    pub fn status(&self, max_queue: usize) -> ModelStatus {
        ModelStatus {
            running: self.running.load(Ordering::SeqCst),
            waiting: self.waiting.load(Ordering::SeqCst),
            warm_entries: self.warm.load(Ordering::SeqCst),
            kv_bytes: self.kv_bytes.load(Ordering::SeqCst),
            steps: self.steps.load(Ordering::SeqCst),
            max_queue,
        }
    }
}

pub fn spawn(
    engine: Arc<Engine>,
    config: SchedulerConfig,
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("smolchat-scheduler".into())
        .spawn(move || {
            let shape = engine.model.kv_shape();
            Scheduler {
                engine,
                config,
                rx,
                shared,
                shape,
                waiting: VecDeque::new(),
                running: Vec::new(),
                warm: HashMap::new(),
                outbox: Vec::new(),
                clock: 0,
            }
            .run()
        })
}

/// A job that has not started yet.
struct Pending {
    id: JobId,
    job: GenerationJob,
    submitted: Instant,
    /// How many were ahead of it when it was last told ([`JobEvent::Queued`]).
    told: Option<usize>,
}

/// A job in the running batch.
struct Running {
    id: JobId,
    sink: Sender<JobEvent>,
    backlog: VecDeque<JobEvent>,
    key: Option<String>,
    seq: SequenceState,
    cache: KvCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    cached_tokens: usize,
    /// The last sampled token, to be fed at the next step.
    next_input: Option<u32>,
    reserved: usize,
    submitted: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    done: Option<Result<FinishReason, JobError>>,
}

struct Warm {
    /// The tokens whose K and V the cache holds.
    tokens: Vec<u32>,
    cache: KvCache,
    last_used: u64,
}

struct Scheduler {
    engine: Arc<Engine>,
    config: SchedulerConfig,
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    shape: KvShape,
    waiting: VecDeque<Pending>,
    running: Vec<Running>,
    warm: HashMap<String, Warm>,
    /// Events of finished jobs still waiting for room in their sinks.
    outbox: Vec<(Sender<JobEvent>, VecDeque<JobEvent>)>,
    clock: u64,
}

/// Sends what a sink can take now; false when the receiver is gone.
fn flush(sink: &Sender<JobEvent>, backlog: &mut VecDeque<JobEvent>) -> bool {
    while let Some(ev) = backlog.pop_front() {
        match sink.try_send(ev) {
            Ok(()) => {}
            Err(TrySendError::Full(ev)) => {
                backlog.push_front(ev);
                return true;
            }
            Err(TrySendError::Closed(_)) => return false,
        }
    }
    true
}

impl Scheduler {
    fn run(mut self) {
        loop {
            let idle = self.running.is_empty() && self.waiting.is_empty();
            let first = if idle && self.outbox.is_empty() {
                match self.rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            } else if idle {
                self.rx.recv_timeout(Duration::from_millis(5)).ok()
            } else {
                None
            };
            let mut commands: Vec<Command> = first.into_iter().collect();
            commands.extend(self.rx.try_iter());
            for c in commands {
                match c {
                    Command::Submit(id, job, submitted) => self.waiting.push_back(Pending {
                        id,
                        job,
                        submitted,
                        told: None,
                    }),
                    Command::Cancel(id) => self.cancel(id),
                    Command::Shutdown => {
                        for id in self
                            .running
                            .iter()
                            .map(|r| r.id)
                            .chain(self.waiting.iter().map(|p| p.id))
                            .collect::<Vec<_>>()
                        {
                            self.cancel(id);
                        }
                        self.retire();
                        return;
                    }
                }
            }
            self.outbox
                .retain_mut(|(sink, backlog)| flush(sink, backlog) && !backlog.is_empty());
            self.admit();
            self.tell_places();
            if !self.running.is_empty() {
                self.step();
            }
            self.retire();
            self.publish();
        }
    }

    fn cancel(&mut self, id: JobId) {
        if let Some(r) = self.running.iter_mut().find(|r| r.id == id) {
            r.done.get_or_insert(Ok(FinishReason::Cancelled));
        } else if let Some(i) = self.waiting.iter().position(|p| p.id == id) {
            if let Some(p) = self.waiting.remove(i) {
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                let done = JobEvent::Done(JobDone {
                    finish_reason: FinishReason::Cancelled,
                    prompt_tokens: p.job.prompt.len(),
                    cached_tokens: 0,
                    generated_tokens: 0,
                    time_to_first_token_ms: 0.0,
                    decode_tokens_per_second: 0.0,
                });
                self.outbox.push((p.job.sink, VecDeque::from([done])));
            }
        }
    }

    /// Tells each waiting job how many wait ahead of it, when that changed. A sink with no
    /// room misses it and is told at the next pass.
    fn tell_places(&mut self) {
        for (ahead, p) in self.waiting.iter_mut().enumerate() {
            if p.told != Some(ahead) && p.job.sink.try_send(JobEvent::Queued { ahead }).is_ok() {
                p.told = Some(ahead);
            }
        }
    }

    fn kv_in_use(&self) -> usize {
        self.running.iter().map(|r| r.reserved).sum::<usize>()
            + self.warm.values().map(|w| w.cache.bytes()).sum::<usize>()
    }

    /// Evicts the least recently used warm cache (not `keep`); false when none is left.
    fn evict_one(&mut self, keep: Option<&str>) -> bool {
        let victim = self
            .warm
            .iter()
            .filter(|(k, _)| Some(k.as_str()) != keep)
            .min_by_key(|(_, w)| w.last_used)
            .map(|(k, _)| k.clone());
        match victim {
            Some(k) => {
                self.warm.remove(&k);
                metrics::counter!("smolchat_model_cache_evictions_total").increment(1);
                true
            }
            None => false,
        }
    }

    /// Moves waiting jobs into the batch while there are slots and KV budget.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_running {
            let Some(p) = self.waiting.front() else {
                return;
            };
            let need = KvCache::bytes_for(self.shape, p.job.prompt.len() + p.job.max_tokens);
            if p.job.sink.is_closed() {
                self.waiting.pop_front();
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let key = p.job.cache_key.clone();
            while self.kv_in_use() + need > self.config.kv_budget_bytes
                && self.evict_one(key.as_deref())
            {}
            if self.kv_in_use() + need > self.config.kv_budget_bytes {
                // The job's own warm entry counts too: without it, does the job fit at all?
                if self.running.is_empty() {
                    let Some(p) = self.waiting.pop_front() else {
                        return;
                    };
                    self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    if let Some(k) = &key {
                        self.warm.remove(k);
                    }
                    if need <= self.config.kv_budget_bytes {
                        self.waiting.push_front(p);
                        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    let err = JobError::TooLarge {
                        needed_mb: need >> 20,
                        budget_mb: self.config.kv_budget_bytes >> 20,
                    };
                    self.outbox
                        .push((p.job.sink, VecDeque::from([JobEvent::Error(err)])));
                }
                return;
            }
            let Some(p) = self.waiting.pop_front() else {
                return;
            };
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            self.start(p, need);
        }
    }

    fn start(&mut self, p: Pending, reserved: usize) {
        let job = p.job;
        let (mut cache, mut cached) = (self.engine.model.new_cache(), 0);
        if let Some(w) = job.cache_key.as_ref().and_then(|k| self.warm.remove(k)) {
            // Reuse the longest shared prefix, but always leave one prompt token to compute so
            // that the step yields logits.
            let shared = w
                .tokens
                .iter()
                .zip(&job.prompt)
                .take_while(|(a, b)| a == b)
                .count();
            cached = shared.min(job.prompt.len() - 1);
            cache = w.cache;
            cache.truncate(cached);
            metrics::counter!("smolchat_model_cache_hits_total").increment(1);
        }
        let stop = StopCondition {
            max_tokens: job.max_tokens,
            stop_strings: job.stop_strings,
            end_tokens: self.engine.end_of_generation.clone(),
        };
        let seq = SequenceState::new(
            &self.engine.tokenizer,
            job.prompt,
            job.params,
            stop,
            job.reasoning,
        );
        self.running.push(Running {
            id: p.id,
            sink: job.sink,
            backlog: VecDeque::new(),
            key: job.cache_key,
            seq,
            cache,
            prefilled: cached,
            cached_tokens: cached,
            next_input: None,
            reserved,
            submitted: p.submitted,
            first_token: None,
            last_token: None,
            done: None,
        });
    }

    /// One packed forward over every running sequence, under the step's token budget.
    fn step(&mut self) {
        let mut budget = self.config.step_tokens;
        // (index into running, range of prompt or None for a decode row)
        let mut plan: Vec<(usize, Option<(usize, usize)>)> = Vec::new();
        for (i, r) in self.running.iter().enumerate() {
            if r.done.is_none() && r.next_input.is_some() {
                plan.push((i, None));
                budget = budget.saturating_sub(1);
            }
        }
        for (i, r) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if r.done.is_none() && r.next_input.is_none() {
                let end = (r.prefilled + budget).min(r.seq.prompt_len);
                plan.push((i, Some((r.prefilled, end))));
                budget -= end - r.prefilled;
            }
        }
        if plan.is_empty() {
            return;
        }
        let (mut prefill, mut decode) = (0usize, 0usize);
        let mut inputs: Vec<(usize, Vec<u32>, Logits)> = Vec::with_capacity(plan.len());
        for &(i, range) in &plan {
            let r = &self.running[i];
            // A greedy sequence's token is picked where the logits are (on a GPU, they stay there).
            let last = if r.seq.is_greedy() {
                Logits::Greedy
            } else {
                Logits::Last
            };
            match range {
                None => {
                    decode += 1;
                    inputs.push((i, vec![r.next_input.unwrap_or_default()], last));
                }
                Some((a, b)) => {
                    prefill += b - a;
                    let logits = if b == r.seq.prompt_len {
                        last
                    } else {
                        Logits::None
                    };
                    inputs.push((i, r.seq.history[a..b].to_vec(), logits));
                }
            }
        }
        // Borrow each planned sequence's cache mutably, in plan order.
        let mut slots: Vec<Option<&mut Running>> = self.running.iter_mut().map(Some).collect();
        let mut batch: Vec<SeqInput> = Vec::with_capacity(inputs.len());
        let mut owners: Vec<usize> = Vec::with_capacity(inputs.len());
        for (i, tokens, logits) in &inputs {
            if let Some(r) = slots[*i].take() {
                batch.push(SeqInput {
                    tokens,
                    cache: &mut r.cache,
                    logits: *logits,
                });
                owners.push(*i);
            }
        }
        let result = self.engine.model.step(&mut batch);
        drop(batch);
        self.shared.steps.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!("smolchat_model_step_tokens").record((prefill + decode) as f64);
        metrics::counter!("smolchat_model_prefill_tokens_total").increment(prefill as u64);
        metrics::counter!("smolchat_model_decode_tokens_total").increment(decode as u64);
        let outputs = match result {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "engine step failed");
                for &i in &owners {
                    self.running[i].done = Some(Err(JobError::Engine(e.to_string())));
                }
                return;
            }
        };
        let now = Instant::now();
        for ((&i, (_, tokens, _)), output) in owners.iter().zip(&inputs).zip(outputs) {
            let r = &mut self.running[i];
            if r.next_input.is_none() {
                r.prefilled += tokens.len();
            }
            let id = match output {
                StepOutput::Token(id) => id,
                StepOutput::Logits(l) if l.is_empty() => continue,
                StepOutput::Logits(mut l) => r.seq.sample(&mut l),
            };
            let out = r.seq.accept(&self.engine.tokenizer, id);
            match r.last_token {
                None => {
                    r.first_token = Some(now);
                    metrics::histogram!("smolchat_model_time_to_first_token_seconds")
                        .record(now.duration_since(r.submitted).as_secs_f64());
                }
                Some(t) => metrics::histogram!("smolchat_model_inter_token_seconds")
                    .record(now.duration_since(t).as_secs_f64()),
            }
            r.last_token = Some(now);
            r.next_input = Some(id);
            r.backlog.push_back(JobEvent::Token {
                id,
                pieces: out.pieces,
            });
            if let Some(f) = out.finished {
                r.done = Some(Ok(f));
            }
        }
    }

    /// Sends pending events; finishes jobs that are done, whose sink is gone, or that lag too far.
    fn retire(&mut self) {
        let max_backlog = self.config.max_backlog;
        let mut finished = Vec::new();
        for (i, r) in self.running.iter_mut().enumerate() {
            if !flush(&r.sink, &mut r.backlog) {
                r.done = Some(Ok(FinishReason::Cancelled));
            } else if r.backlog.len() > max_backlog {
                tracing::warn!(job = r.id.0, "event sink too slow; cancelling the job");
                r.done = Some(Ok(FinishReason::Cancelled));
            }
            if r.done.is_some() {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            let mut r = self.running.swap_remove(i);
            let generated = r.seq.generated().len();
            // Only a job that ended well leaves its cache warm: a cancelled one frees what it
            // held, and after a failed step (on a device, possibly after the caches grew) the
            // cache cannot be trusted.
            let keep_warm = matches!(r.done, Some(Ok(reason)) if reason != FinishReason::Cancelled);
            let event = match r.done.take() {
                Some(Err(e)) => JobEvent::Error(e),
                Some(Ok(finish_reason)) => {
                    let ttft = r
                        .first_token
                        .map(|t| t.duration_since(r.submitted).as_secs_f64() * 1e3)
                        .unwrap_or(0.0);
                    let decode_secs = match (r.first_token, r.last_token) {
                        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
                        _ => 0.0,
                    };
                    JobEvent::Done(JobDone {
                        finish_reason,
                        prompt_tokens: r.seq.prompt_len,
                        cached_tokens: r.cached_tokens,
                        generated_tokens: generated,
                        time_to_first_token_ms: ttft,
                        decode_tokens_per_second: if decode_secs > 0.0 {
                            (generated.saturating_sub(1)) as f64 / decode_secs
                        } else {
                            0.0
                        },
                    })
                }
                None => continue,
            };
            if let Some(key) = r.key.take().filter(|_| keep_warm) {
                self.clock += 1;
                let len = r.cache.len();
                let tokens = r.seq.history[..len].to_vec();
                let cache = std::mem::replace(&mut r.cache, self.engine.model.new_cache());
                self.warm.insert(
                    key,
                    Warm {
                        tokens,
                        cache,
                        last_used: self.clock,
                    },
                );
                while self.kv_in_use() > self.config.kv_budget_bytes && self.evict_one(None) {}
            }
            // Counters first, so whoever reads `Done` sees the state after it.
            self.publish();
            r.backlog.push_back(event);
            if flush(&r.sink, &mut r.backlog) && !r.backlog.is_empty() {
                self.outbox
                    .push((r.sink.clone(), std::mem::take(&mut r.backlog)));
            }
        }
    }

    fn publish(&self) {
        let kv: usize = self.running.iter().map(|r| r.cache.bytes()).sum::<usize>()
            + self.warm.values().map(|w| w.cache.bytes()).sum::<usize>();
        self.shared
            .running
            .store(self.running.len(), Ordering::SeqCst);
        self.shared.warm.store(self.warm.len(), Ordering::SeqCst);
        self.shared.kv_bytes.store(kv, Ordering::SeqCst);
        metrics::gauge!("smolchat_model_running").set(self.running.len() as f64);
        metrics::gauge!("smolchat_model_queue_length")
            .set(self.shared.waiting.load(Ordering::SeqCst) as f64);
        metrics::gauge!("smolchat_model_kv_bytes").set(kv as f64);
    }
}
