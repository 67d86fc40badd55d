//! `smolchat bench --serve-sim`: chat jobs through the model actor, as a server would send them.
//!
//! For N concurrent jobs (realistic chat prompts, 128 new tokens each) it prints aggregate
//! tokens/s, time to first token and inter-token latency percentiles, next to the same kind of
//! jobs run one after another in the same run; then the first-token time of a 5th turn with
//! ~1,500 tokens of history, warm (its conversation's cache kept) against cold.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{call, Actor, ActorRef};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::actors::{GenerationJob, JobEvent, ModelActor, ModelMsg, SchedulerConfig};
use crate::engine::{ChatMessage, Engine, SamplingParams};

const NEW_TOKENS: usize = 128;

#[derive(Debug, Serialize)]
pub struct ConcurrencyRow {
    pub concurrent: usize,
    pub aggregate_tokens_per_second: f64,
    /// Aggregate over one-at-a-time tokens/s.
    pub speedup: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p95_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p95_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct ServeSimReport {
    pub one_at_a_time_tokens_per_second: f64,
    pub rows: Vec<ConcurrencyRow>,
    pub history_tokens: usize,
    pub cold_ttft_ms: f64,
    pub warm_ttft_ms: f64,
}

struct JobTrace {
    ttft: f64,
    gaps: Vec<f64>,
    tokens: usize,
}

/// What simulated users ask.
pub(crate) const ASKS: [&str; 6] = [
    "Write a short poem about the sea.",
    "Explain how a bicycle works to a child.",
    "Give me three ideas for a rainy Sunday.",
    "What should I pack for a weekend of hiking?",
    "Describe your favourite kind of bread and why.",
    "Tell me a story about an owl who could not sleep.",
];

fn prompt(engine: &Engine, i: usize) -> Vec<u32> {
    let msg = format!("{} (request {i})", ASKS[i % ASKS.len()]);
    engine
        .render_chat(&[ChatMessage::new("user", &msg)], true, None)
        .map(|r| r.1)
        .unwrap_or_default()
}

async fn run_job(
    actor: &ActorRef<ModelMsg>,
    prompt: Vec<u32>,
    key: Option<String>,
    max_tokens: usize,
) -> JobTrace {
    let (tx, mut rx) = mpsc::channel(256);
    let job = GenerationJob {
        prompt,
        // A chat's default temperature and min-p (its top-p 0.95 and repetition penalty 1.1 are
        // left off: the README's figures were measured so), with a fixed seed so runs compare;
        // answers end at max_tokens or at the model's end of turn, as in real use.
        params: SamplingParams {
            temperature: 0.7,
            min_p: 0.05,
            seed: 1,
            ..Default::default()
        },
        max_tokens,
        stop_strings: vec![],
        reasoning: false,
        cache_key: key,
        sink: tx,
    };
    let start = Instant::now();
    let mut trace = JobTrace {
        ttft: 0.0,
        gaps: Vec::new(),
        tokens: 0,
    };
    match call!(actor, ModelMsg::Submit, job) {
        Ok(Ok(_)) => {}
        other => {
            tracing::error!(?other, "serve-sim: job refused");
            return trace;
        }
    }
    let mut last = start;
    while let Some(ev) = rx.recv().await {
        match ev {
            JobEvent::Token { .. } => {
                let now = Instant::now();
                if trace.tokens == 0 {
                    trace.ttft = now.duration_since(start).as_secs_f64();
                } else {
                    trace.gaps.push(now.duration_since(last).as_secs_f64());
                }
                last = now;
                trace.tokens += 1;
            }
            JobEvent::Queued { .. } => {}
            JobEvent::Done(_) | JobEvent::Error(_) => break,
        }
    }
    trace
}

/// The `p` quantile of `v` seconds, in ms (0 for none).
pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize] * 1e3
}

pub async fn run(engine: Arc<Engine>, levels: &[usize]) -> anyhow::Result<ServeSimReport> {
    let max = levels.iter().copied().max().unwrap_or(1);
    let mut config = SchedulerConfig {
        max_running: max,
        max_queue: max * 2,
        ..SchedulerConfig::cpu()
    };
    if let Some(pool) = engine.model.kv_pool_bytes() {
        // A device's KV slabs are allocated up front: the scheduler may use all of them.
        config.kv_budget_bytes = pool;
    }
    let (actor, _) = Actor::spawn(None, ModelActor, (engine.clone(), config)).await?;

    // One after another.
    let started = Instant::now();
    let mut tokens = 0;
    for i in 0..4 {
        tokens += run_job(&actor, prompt(&engine, i), None, NEW_TOKENS)
            .await
            .tokens;
    }
    let one_at_a_time = tokens as f64 / started.elapsed().as_secs_f64();
    tracing::info!(one_at_a_time, "serve-sim: sequential");

    let mut rows = Vec::new();
    for &n in levels {
        let started = Instant::now();
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (actor, p) = (actor.clone(), prompt(&engine, i));
                tokio::spawn(async move { run_job(&actor, p, None, NEW_TOKENS).await })
            })
            .collect();
        let mut traces = Vec::new();
        for h in handles {
            traces.push(h.await?);
        }
        let secs = started.elapsed().as_secs_f64();
        let total: usize = traces.iter().map(|t| t.tokens).sum();
        let mut ttft: Vec<f64> = traces.iter().map(|t| t.ttft).collect();
        let mut gaps: Vec<f64> = traces.iter().flat_map(|t| t.gaps.iter().copied()).collect();
        let aggregate = total as f64 / secs;
        let row = ConcurrencyRow {
            concurrent: n,
            aggregate_tokens_per_second: aggregate,
            speedup: aggregate / one_at_a_time,
            ttft_p50_ms: percentile(&mut ttft, 0.5),
            ttft_p95_ms: percentile(&mut ttft, 0.95),
            itl_p50_ms: percentile(&mut gaps, 0.5),
            itl_p95_ms: percentile(&mut gaps, 0.95),
        };
        tracing::info!(?row, "serve-sim");
        rows.push(row);
    }

    // A 5th turn after ~1,500 tokens of history: cold, then warm.
    let mut history = Vec::new();
    let long = "Here is some context about my garden, my week and my plans. ".repeat(22);
    for t in 0..4 {
        history.push(ChatMessage::new("user", &format!("Turn {t}. {long}")));
        history.push(ChatMessage::new(
            "assistant",
            &format!("Thanks for turn {t}. {long}"),
        ));
    }
    let before = engine.render_chat(&history, false, None)?.1;
    history.push(ChatMessage::new("user", "So, what should I plant first?"));
    let fifth = engine.render_chat(&history, true, None)?.1;
    let cold = run_job(&actor, fifth.clone(), Some("sim-cold".into()), 1)
        .await
        .ttft;
    // Warm the conversation as its 4th turn would have, then ask the 5th.
    run_job(&actor, before, Some("sim-warm".into()), 1).await;
    let warm = run_job(&actor, fifth.clone(), Some("sim-warm".into()), 1)
        .await
        .ttft;
    actor.stop(None);
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(ServeSimReport {
        one_at_a_time_tokens_per_second: one_at_a_time,
        rows,
        history_tokens: fifth.len(),
        cold_ttft_ms: cold * 1e3,
        warm_ttft_ms: warm * 1e3,
    })
}

impl ServeSimReport {
    pub fn table(&self) -> String {
        let mut s = format!(
            "one at a time: {:.1} tokens/s\n\n| concurrent | aggregate tokens/s | × one-at-a-time | TTFT p50 / p95 ms | inter-token p50 / p95 ms |\n|---|---|---|---|---|\n",
            self.one_at_a_time_tokens_per_second
        );
        for r in &self.rows {
            s += &format!(
                "| {} | {:.1} | {:.2} | {:.0} / {:.0} | {:.0} / {:.0} |\n",
                r.concurrent,
                r.aggregate_tokens_per_second,
                r.speedup,
                r.ttft_p50_ms,
                r.ttft_p95_ms,
                r.itl_p50_ms,
                r.itl_p95_ms
            );
        }
        s += &format!(
            "\n5th turn with {} tokens of history: first token cold {:.0} ms, warm {:.0} ms ({:.1}× sooner)\n",
            self.history_tokens,
            self.cold_ttft_ms,
            self.warm_ttft_ms,
            self.cold_ttft_ms / self.warm_ttft_ms.max(1e-3)
        );
        s
    }
}
