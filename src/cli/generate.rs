//! `generate` and `chat`: one sequence at a time, in the terminal.

use std::io::{BufRead, Write};
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::json;

use crate::engine::reasoning::Channel;
use crate::engine::{
    ChatMessage, Engine, FinishReason, Logits, SamplingParams, SeqInput, SequenceState,
    StopCondition,
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

/// Generates from `prompt`, calling `on_piece` with every piece of text as it becomes certain.
pub fn run(
    engine: &Engine,
    prompt: Vec<u32>,
    params: SamplingParams,
    max_tokens: usize,
    mut on_piece: impl FnMut(Channel, &str),
) -> Result<Outcome> {
    params.validate()?;
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let ctx = engine.model.cfg.context_length;
    if prompt.len() + max_tokens > ctx {
        bail!(
            "the prompt ({} tokens) plus --max-tokens {max_tokens} exceed the context of {ctx}",
            prompt.len()
        );
    }
    let stop = StopCondition {
        max_tokens,
        stop_strings: vec![],
        end_tokens: engine.end_of_generation.clone(),
    };
    let mut cache = engine.model.new_cache();
    let mut seq = SequenceState::new(&engine.tokenizer, prompt.clone(), params, stop, false);
    let mut logits = engine.model.prefill(&mut cache, &prompt, CHUNK)?;
    let (mut answer, mut reasoning) = (String::new(), String::new());
    let decode_start = Instant::now();
    let finish = loop {
        let id = seq.sample(&mut logits);
        let out = seq.accept(&engine.tokenizer, id);
        for (ch, text) in &out.pieces {
            on_piece(*ch, text);
            match ch {
                Channel::Answer => answer.push_str(text),
                Channel::Reasoning => reasoning.push_str(text),
            }
        }
        if let Some(f) = out.finished {
            break f;
        }
        logits = engine
            .model
            .forward(&mut [SeqInput {
                tokens: &[id],
                cache: &mut cache,
                logits: Logits::Last,
            }])?
            .pop()
            .unwrap_or_default();
    };
    let n = seq.generated().len();
    let secs = decode_start.elapsed().as_secs_f64();
    Ok(Outcome {
        ids: seq.generated().to_vec(),
        answer,
        reasoning,
        finish,
        tokens_per_second: if secs > 0.0 { n as f64 / secs } else { 0.0 },
    })
}

pub struct GenerateArgs {
    pub prompt: Option<String>,
    pub chat: bool,
    pub ids: Option<Vec<u32>>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub json: bool,
}

pub fn generate(engine: &Engine, a: GenerateArgs) -> Result<()> {
    let prompt = match (&a.prompt, &a.ids) {
        (Some(_), Some(_)) => bail!("give --prompt or --ids, not both"),
        (None, None) => bail!("give --prompt TEXT or --ids 1,2,3"),
        (_, Some(ids)) => ids.clone(),
        (Some(p), None) if a.chat => {
            engine
                .render_chat(&[ChatMessage::new("user", p)], true, None)?
                .1
        }
        (Some(p), None) => engine.tokenizer.encode(p, false)?,
    };
    let json = a.json;
    let out = run(engine, prompt, a.params, a.max_tokens, |_, text| {
        if !json {
            print!("{text}");
            let _ = std::io::stdout().flush();
        }
    })?;
    if json {
        super::print_json(&json!({
            "ids": out.ids,
            "text": format!("{}{}", out.reasoning, out.answer),
            "finish_reason": out.finish,
            "tokens_per_second": out.tokens_per_second,
        }));
    } else {
        println!();
        tracing::info!(tokens = out.ids.len(), tokens_per_second = out.tokens_per_second, finish = ?out.finish, "done");
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
