//! The store's vocabulary: ids, roles, statuses, conversations and messages.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($name:ident, $what:literal) => {
        #[doc = concat!("The id of a ", $what, ".")]
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

id_type!(UserId, "user");
id_type!(ConversationId, "conversation");
id_type!(MessageId, "message");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    Streaming,
    Complete,
    Interrupted,
    Error,
}

/// What to do when a conversation's history no longer fits the model's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Refuse with a clear error (the default).
    #[default]
    Refuse,
    /// Drop the oldest whole turns, and say so.
    DropOldest,
}

macro_rules! str_enum {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),* }
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s { $($s => Ok(Self::$v),)* other => Err(format!("unknown value `{other}`")) }
            }
        }
    };
}

str_enum!(Role { System => "system", User => "user", Assistant => "assistant" });
str_enum!(MessageStatus { Streaming => "streaming", Complete => "complete", Interrupted => "interrupted", Error => "error" });
str_enum!(OverflowPolicy { Refuse => "refuse", DropOldest => "drop_oldest" });

/// Per-conversation generation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub temperature: f32,
    pub top_p: f32,
    pub min_p: f32,
    /// >1 makes recently used tokens less likely (small models loop without it).
    pub repetition_penalty: f32,
    pub max_tokens: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.1,
            max_tokens: 512,
        }
    }
}

impl Settings {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err("temperature must be between 0 and 2".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0 && (0.0..=1.0).contains(&self.min_p)) {
            return Err("top_p must be in (0, 1] and min_p in [0, 1]".into());
        }
        if !(1.0..=2.0).contains(&self.repetition_penalty) {
            return Err("repetition_penalty must be between 1 and 2".into());
        }
        if !(1..=8192).contains(&self.max_tokens) {
            return Err("max_tokens must be between 1 and 8192".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conversation {
    pub id: ConversationId,
    pub title: String,
    pub system_prompt: String,
    pub settings: Settings,
    pub reasoning: bool,
    pub overflow_policy: OverflowPolicy,
    pub current_leaf_id: Option<MessageId>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Where a page of one's conversations (newest first) goes on: just after this one. On the
/// wire `UPDATED_AT_ID`, opaque to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListCursor {
    pub updated_at: i64,
    pub id: ConversationId,
}

impl ListCursor {
    pub fn after(c: &Conversation) -> Self {
        Self {
            updated_at: c.updated_at,
            id: c.id,
        }
    }
}

impl fmt::Display for ListCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}", self.updated_at, self.id)
    }
}

/// A list cursor that is not the `next` of a page.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`after` is not the `next` of a page")]
pub struct BadCursor;

impl FromStr for ListCursor {
    type Err = BadCursor;
    fn from_str(s: &str) -> Result<Self, BadCursor> {
        let (at, id) = s.split_once('_').ok_or(BadCursor)?;
        Ok(Self {
            updated_at: at.parse().map_err(|_| BadCursor)?,
            id: id.parse().map_err(|_| BadCursor)?,
        })
    }
}

/// Changes to a conversation; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationPatch {
    pub title: Option<String>,
    pub system_prompt: Option<String>,
    pub settings: Option<Settings>,
    pub reasoning: Option<bool>,
    pub overflow_policy: Option<OverflowPolicy>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub id: MessageId,
    pub conversation_id: ConversationId,
    pub parent_id: Option<MessageId>,
    pub role: Role,
    pub content: String,
    pub reasoning: String,
    pub status: MessageStatus,
    pub finish_reason: Option<String>,
    pub error: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub ttft_ms: Option<f64>,
    pub tokens_per_second: Option<f64>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// How a generated message ended.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MessageOutcome {
    pub status: Option<MessageStatus>,
    pub finish_reason: Option<String>,
    pub error: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub ttft_ms: Option<f64>,
    pub tokens_per_second: Option<f64>,
}

/// A search hit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchHit {
    pub conversation_id: ConversationId,
    pub message_id: MessageId,
    pub title: String,
    pub snippet: String,
}
