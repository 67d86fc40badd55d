//! `generate` and `chat`: prompts run in the terminal, one or several packed into each step.

use std::io::{BufRead, Write};
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::json;

use crate::engine::reasoning::Channel;
use crate::engine::{
    ChatMessage, Engine, FinishReason, KvCache, Logits, SamplingParams, SeqInput, SequenceState,
    StepOutput, StopCondition,
};

/// Prompt chunk for prefill.
const CHUNK: usize = 512;

pub struct Outcome {
    pub ids: Vec<u32>,
    pub answer: String,
    pub reasoning: String,
    pub finish: FinishReason,
    pub tokens_per_second: f64,
}

/// How generation stops, besides `max_tokens`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EndTokens {
    /// The model's end-of-turn tokens end an answer.
    #[default]
    Stop,
    /// Generate `max_tokens` whatever comes (for comparisons with references and for speed).
    Ignore,
}

/// Generates from `prompt`, calling `on_piece` with every piece of text as it becomes certain.
pub fn run(
    engine: &Engine,
    prompt: Vec<u32>,
    params: SamplingParams,
    max_tokens: usize,
    mut on_piece: impl FnMut(Channel, &str),
) -> Result<Outcome> {
    let mut out = run_packed(
        engine,
        vec![prompt],
        params,
        max_tokens,
        EndTokens::Stop,
        |_, ch, text| on_piece(ch, text),
    )?;
    Ok(out.pop().expect("one outcome per prompt"))
}

/// One prompt's progress in [`run_packed`].
struct Running {
    seq: SequenceState,
    cache: KvCache,
    /// Tokens still to feed: the prompt, then each sampled token.
    pending: Vec<u32>,
    /// How many of `pending` the model has seen.
    fed: usize,
    answer: String,
    reasoning: String,
    finish: Option<FinishReason>,
    first_token: Option<Instant>,
    secs: f64,
}

/// Generates from every prompt at once: each step packs every unfinished prompt's next chunk (up
/// to [`CHUNK`] tokens) or its one new token, as the server's scheduler packs its users' jobs.
/// `on_piece(i, channel, text)` gets each piece of prompt i's text as it becomes certain.
pub fn run_packed(
    engine: &Engine,
    prompts: Vec<Vec<u32>>,
    params: SamplingParams,
    max_tokens: usize,
    end: EndTokens,
    mut on_piece: impl FnMut(usize, Channel, &str),
) -> Result<Vec<Outcome>> {
    params.validate()?;
    let ctx = engine.model.cfg.context_length;
    for (i, prompt) in prompts.iter().enumerate() {
        let which = match prompts.len() {
            1 => "the prompt".to_owned(),
            _ => format!("prompt {}", i + 1),
        };
        if prompt.is_empty() {
            bail!("{which} is empty");
        }
        if prompt.len() + max_tokens > ctx {
            bail!(
                "{which} ({} tokens) plus --max-tokens {max_tokens} exceed the context of {ctx}",
                prompt.len()
            );
        }
    }
    let stop = StopCondition {
        max_tokens,
        stop_strings: vec![],
        end_tokens: match end {
            EndTokens::Stop => engine.end_of_generation.clone(),
            EndTokens::Ignore => vec![],
        },
    };
    let mut running: Vec<Running> = prompts
        .into_iter()
        .map(|prompt| Running {
            seq: SequenceState::new(
                &engine.tokenizer,
                prompt.clone(),
                params.clone(),
                stop.clone(),
                false,
            ),
            cache: engine.model.new_cache(),
            pending: prompt,
            fed: 0,
            answer: String::new(),
            reasoning: String::new(),
            finish: None,
            first_token: None,
            secs: 0.0,
        })
        .collect();
    loop {
        let live: Vec<usize> = (0..running.len())
            .filter(|&i| running[i].finish.is_none())
            .collect();
        if live.is_empty() {
            break;
        }
        let mut sizes = Vec::with_capacity(live.len());
        let outputs = {
            let mut batch = Vec::with_capacity(live.len());
            for r in running.iter_mut().filter(|r| r.finish.is_none()) {
                let rest = r.pending.len() - r.fed;
                let n = rest.min(CHUNK);
                sizes.push(n);
                batch.push(SeqInput {
                    tokens: &r.pending[r.fed..r.fed + n],
                    cache: &mut r.cache,
                    logits: match (n == rest, r.seq.is_greedy()) {
                        (false, _) => Logits::None,
                        (true, true) => Logits::Greedy,
                        (true, false) => Logits::Last,
                    },
                });
            }
            engine.model.step(&mut batch)?
        };
        for ((&i, n), output) in live.iter().zip(sizes).zip(outputs) {
            let r = &mut running[i];
            r.fed += n;
            if r.fed < r.pending.len() {
                continue;
            }
            let id = match output {
                StepOutput::Token(id) => id,
                StepOutput::Logits(mut logits) => r.seq.sample(&mut logits),
            };
            let out = r.seq.accept(&engine.tokenizer, id);
            let started = *r.first_token.get_or_insert_with(Instant::now);
            for (ch, text) in &out.pieces {
                on_piece(i, *ch, text);
                match ch {
                    Channel::Answer => r.answer.push_str(text),
                    Channel::Reasoning => r.reasoning.push_str(text),
                }
            }
            r.finish = out.finished;
            r.secs = started.elapsed().as_secs_f64();
            r.pending = vec![id];
            r.fed = 0;
        }
    }
    Ok(running
        .into_iter()
        .map(|r| {
            let n = r.seq.generated().len();
            Outcome {
                ids: r.seq.generated().to_vec(),
                answer: r.answer,
                reasoning: r.reasoning,
                finish: r.finish.expect("every prompt finished"),
                tokens_per_second: if r.secs > 0.0 { n as f64 / r.secs } else { 0.0 },
            }
        })
        .collect())
}

pub struct GenerateArgs {
    pub prompt: Option<String>,
    pub chat: bool,
    /// Token-id prompts; several run together in packed steps.
    pub ids: Vec<Vec<u32>>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub end: EndTokens,
    pub json: bool,
}

pub fn generate(engine: &Engine, a: GenerateArgs) -> Result<()> {
    let prompts = match (&a.prompt, a.ids.is_empty()) {
        (Some(_), false) => bail!("give --prompt or --ids, not both"),
        (None, true) => bail!("give --prompt TEXT or --ids 1,2,3"),
        (None, false) => a.ids.clone(),
        (Some(p), true) if a.chat => {
            vec![
                engine
                    .render_chat(&[ChatMessage::new("user", p)], true, None)?
                    .1,
            ]
        }
        (Some(p), true) => vec![engine.tokenizer.encode(p, false)?],
    };
    let (json, several) = (a.json, prompts.len() > 1);
    let started = Instant::now();
    let outs = run_packed(
        engine,
        prompts,
        a.params,
        a.max_tokens,
        a.end,
        |_, _, text| {
            if !json && !several {
                print!("{text}");
                let _ = std::io::stdout().flush();
            }
        },
    )?;
    let text = |o: &Outcome| format!("{}{}", o.reasoning, o.answer);
    let one = |o: &Outcome| {
        json!({
            "ids": o.ids,
            "text": text(o),
            "finish_reason": o.finish,
            "tokens_per_second": o.tokens_per_second,
        })
    };
    match (json, several) {
        (true, false) => super::print_json(&one(&outs[0])),
        (true, true) => {
            let tokens: usize = outs.iter().map(|o| o.ids.len()).sum();
            super::print_json(&json!({
                "sequences": outs.iter().map(one).collect::<Vec<_>>(),
                "tokens_per_second": tokens as f64 / started.elapsed().as_secs_f64(),
            }));
        }
        (false, false) => println!(),
        (false, true) => {
            for (i, o) in outs.iter().enumerate() {
                println!("--- {}\n{}", i + 1, text(o));
            }
        }
    }
    if !json {
        for o in &outs {
            tracing::info!(tokens = o.ids.len(), tokens_per_second = o.tokens_per_second, finish = ?o.finish, "done");
        }
    }
    Ok(())
}

/// A chat in the terminal: each line you type is a user turn.
pub fn chat(
    engine: &Engine,
    params: SamplingParams,
    max_tokens: usize,
    system: Option<String>,
) -> Result<()> {
    let mut history: Vec<ChatMessage> = system
        .into_iter()
        .map(|s| ChatMessage::new("system", &s))
        .collect();
    let stdin = std::io::stdin();
    eprintln!("smolchat — type a message and press Enter; an empty line or Ctrl-D ends the chat.");
    loop {
        eprint!("\n> ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        history.push(ChatMessage::new("user", line.trim_end()));
        let (_, prompt) = engine.render_chat(&history, true, None)?;
        let ctx = engine.model.cfg.context_length;
        if prompt.len() + max_tokens > ctx {
            eprintln!(
                "[the conversation no longer fits the context of {ctx} tokens; start a new chat]"
            );
            history.pop();
            continue;
        }
        let out = run(engine, prompt, params.clone(), max_tokens, |ch, text| {
            match ch {
                Channel::Reasoning => eprint!("{text}"),
                Channel::Answer => print!("{text}"),
            }
            let _ = std::io::stdout().flush();
        })?;
        println!();
        eprintln!(
            "[{} tokens, {:.1} tokens/s, {:?}]",
            out.ids.len(),
            out.tokens_per_second,
            out.finish
        );
        history.push(ChatMessage::new("assistant", &out.answer));
    }
}
