//! Splits `<think>…</think>` reasoning from the answer as tokens stream.
//!
//! Where the vocabulary has the tags as single tokens, they are recognised by id (and never shown);
//! otherwise the tag strings are found in the text, holding back a possible partial tag.

use super::tokenizer::Tokenizer;

/// Which part of the output a piece of text belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Reasoning,
    Answer,
}

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

pub struct ReasoningSplitter {
    ids: Option<(u32, u32)>,
    in_reasoning: bool,
    held: String,
}

impl ReasoningSplitter {
    /// `starts_in_reasoning`: the prompt already opened a `<think>` block.
    pub fn new(tok: &Tokenizer, starts_in_reasoning: bool) -> Self {
        let ids = match (tok.token_id(OPEN), tok.token_id(CLOSE)) {
            (Some(o), Some(c)) => Some((o, c)),
            _ => None,
        };
        Self {
            ids,
            in_reasoning: starts_in_reasoning,
            held: String::new(),
        }
    }

    fn channel(&self) -> Channel {
        if self.in_reasoning {
            Channel::Reasoning
        } else {
            Channel::Answer
        }
    }

    /// Feeds one token and its text; returns the pieces that are now certain.
    pub fn push(&mut self, id: u32, text: &str) -> Vec<(Channel, String)> {
        if let Some((open, close)) = self.ids {
            if id == open || id == close {
                let mut out = self.flush();
                self.in_reasoning = id == open;
                out.retain(|(_, s)| !s.is_empty());
                return out;
            }
            return if text.is_empty() {
                vec![]
            } else {
                vec![(self.channel(), text.to_owned())]
            };
        }
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            let tag = if self.in_reasoning { CLOSE } else { OPEN };
            if let Some(i) = self.held.find(tag) {
                let before: String = self.held[..i].to_owned();
                if !before.is_empty() {
                    out.push((self.channel(), before));
                }
                self.held.drain(..i + tag.len());
                self.in_reasoning = !self.in_reasoning;
                continue;
            }
            // Keep back the longest suffix that could start the tag.
            let keep = (1..tag.len())
                .rev()
                .find(|&n| {
                    self.held.len() >= n
                        && self.held.is_char_boundary(self.held.len() - n)
                        && tag.starts_with(&self.held[self.held.len() - n..])
                })
                .unwrap_or(0);
            let emit = self.held.len() - keep;
            if emit > 0 {
                out.push((self.channel(), self.held[..emit].to_owned()));
                self.held.drain(..emit);
            }
            return out;
        }
    }

    /// Whatever is held back, at the end of the stream.
    pub fn flush(&mut self) -> Vec<(Channel, String)> {
        if self.held.is_empty() {
            return vec![];
        }
        vec![(self.channel(), std::mem::take(&mut self.held))]
    }
}
