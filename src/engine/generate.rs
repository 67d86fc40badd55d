//! The state of one generating sequence: sampling, streaming text, stop strings, limits.
//!
//! The model actor keeps one [`SequenceState`] per running job; the command line uses the same
//! type for one-off generation. Nothing here runs the model.

use serde::{Deserialize, Serialize};

use super::reasoning::{Channel, ReasoningSplitter};
use super::sampler::{Sampler, SamplingParams};
use super::tokenizer::{StreamDecoder, Tokenizer};

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// Max tokens or the end of the context.
    Length,
    Cancelled,
    Error,
}

/// When to stop.
#[derive(Debug, Clone, Default)]
pub struct StopCondition {
    pub max_tokens: usize,
    pub stop_strings: Vec<String>,
    pub end_tokens: Vec<u32>,
}

/// What one sampled token produced.
#[derive(Debug, Default)]
pub struct TokenOutput {
    /// Text that is now certain, by channel (reasoning or answer).
    pub pieces: Vec<(Channel, String)>,
    pub finished: Option<FinishReason>,
}

pub struct SequenceState {
    sampler: Sampler,
    decoder: StreamDecoder,
    splitter: ReasoningSplitter,
    stop: StopCondition,
    /// Text decoded but held back because it may begin a stop string.
    held: String,
    /// Prompt followed by the generated tokens.
    pub history: Vec<u32>,
    pub prompt_len: usize,
}

impl SequenceState {
    pub fn new(
        tok: &Tokenizer,
        prompt: Vec<u32>,
        params: SamplingParams,
        stop: StopCondition,
        starts_in_reasoning: bool,
    ) -> Self {
        Self {
            sampler: Sampler::new(params),
            decoder: StreamDecoder::default(),
            splitter: ReasoningSplitter::new(tok, starts_in_reasoning),
            stop,
            held: String::new(),
            prompt_len: prompt.len(),
            history: prompt,
        }
    }

    pub fn generated(&self) -> &[u32] {
        &self.history[self.prompt_len..]
    }

    /// See [`Sampler::is_greedy`].
    pub fn is_greedy(&self) -> bool {
        self.sampler.is_greedy()
    }

    /// Samples the next token from `logits`.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.sampler.sample(logits, &self.history)
    }

    /// Records a sampled token; says what text it completes and whether the sequence is done.
    pub fn accept(&mut self, tok: &Tokenizer, id: u32) -> TokenOutput {
        self.history.push(id);
        let mut out = TokenOutput::default();
        if self.stop.end_tokens.contains(&id) {
            self.held.push_str(&self.decoder.finish());
            let rest = std::mem::take(&mut self.held);
            out.pieces = self.split(u32::MAX, &rest);
            out.pieces.extend(self.splitter.flush());
            out.finished = Some(FinishReason::Stop);
            return out;
        }
        let text = self.decoder.push(tok, id);
        self.held.push_str(&text);
        // A stop string ends the answer; the text before it is kept, the stop string is not.
        if let Some(at) = self
            .stop
            .stop_strings
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let before = self.held[..at].to_owned();
            self.held.clear();
            out.pieces = self.split(id, &before);
            out.pieces.extend(self.splitter.flush());
            out.finished = Some(FinishReason::Stop);
            return out;
        }
        let keep = self
            .stop
            .stop_strings
            .iter()
            .map(|s| partial_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let emit: String = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..self.held.len() - keep);
        out.pieces = self.split(id, &emit);
        if self.generated().len() >= self.stop.max_tokens {
            let rest = std::mem::take(&mut self.held) + &self.decoder.finish();
            out.pieces.extend(self.split(u32::MAX, &rest));
            out.pieces.extend(self.splitter.flush());
            out.finished = Some(FinishReason::Length);
        }
        out
    }

    fn split(&mut self, id: u32, text: &str) -> Vec<(Channel, String)> {
        let mut v = self.splitter.push(id, text);
        v.retain(|(_, s)| !s.is_empty());
        v
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop
                    .as_bytes()
                    .starts_with(&text.as_bytes()[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::partial_suffix;

    #[test]
    fn partial_stop_suffix() {
        assert_eq!(partial_suffix("hello wor", "world"), 3);
        assert_eq!(partial_suffix("hello", "world"), 0);
        assert_eq!(partial_suffix("w", "world"), 1);
    }
}
