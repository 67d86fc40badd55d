//! The wire protocol: every JSON frame between the page (or a script) and the server.
//!
//! Frames are JSON text, tagged by `type`. Client messages may carry a `request_id` (a short
//! string) that the server echoes in the `ack` or `error` that answers them. Documented with an
//! example session in `docs/PROTOCOL.md`; this file is the one source of truth.

use serde::{Deserialize, Serialize};

use crate::actors::session::{Partial, SessionEvent};
use crate::store::{Conversation, ConversationId, Message, MessageId, Settings};

pub const PROTOCOL_VERSION: u32 = 1;

/// What a client may send.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Starts a new conversation; answered by `conversation_created`.
    Create {
        #[serde(default)]
        request_id: Option<String>,
        #[serde(default)]
        title: Option<String>,
        #[serde(default)]
        system_prompt: Option<String>,
        #[serde(default)]
        settings: Option<Settings>,
        #[serde(default)]
        reasoning: Option<bool>,
    },
    /// Subscribes to a conversation; answered by `snapshot`, then its live events.
    Open {
        #[serde(default)]
        request_id: Option<String>,
        conversation_id: ConversationId,
    },
    /// Stops following a conversation.
    Close {
        #[serde(default)]
        request_id: Option<String>,
        conversation_id: ConversationId,
    },
    Send {
        #[serde(default)]
        request_id: Option<String>,
        conversation_id: ConversationId,
        content: String,
    },
    Stop {
        #[serde(default)]
        request_id: Option<String>,
        conversation_id: ConversationId,
    },
    Regenerate {
        #[serde(default)]
        request_id: Option<String>,
        conversation_id: ConversationId,
        #[serde(default)]
        message_id: Option<MessageId>,
    },
    Edit {
        #[serde(default)]
        request_id: Option<String>,
        conversation_id: ConversationId,
        message_id: MessageId,
        content: String,
    },
    Rename {
        #[serde(default)]
        request_id: Option<String>,
        conversation_id: ConversationId,
        title: String,
    },
    /// Shows the branch through `message_id` (a sibling answer or edit); answered by a new
    /// `snapshot` (and `branch_changed` to other tabs).
    SelectBranch {
        #[serde(default)]
        request_id: Option<String>,
        conversation_id: ConversationId,
        message_id: MessageId,
    },
    Delete {
        #[serde(default)]
        request_id: Option<String>,
        conversation_id: ConversationId,
    },
}

impl ClientMessage {
    pub fn request_id(&self) -> Option<&str> {
        match self {
            ClientMessage::Create { request_id, .. }
            | ClientMessage::Open { request_id, .. }
            | ClientMessage::Close { request_id, .. }
            | ClientMessage::Send { request_id, .. }
            | ClientMessage::Stop { request_id, .. }
            | ClientMessage::Regenerate { request_id, .. }
            | ClientMessage::Edit { request_id, .. }
            | ClientMessage::Rename { request_id, .. }
            | ClientMessage::SelectBranch { request_id, .. }
            | ClientMessage::Delete { request_id, .. } => request_id.as_deref(),
        }
    }
}

/// What the server sends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    Hello {
        protocol: u32,
        user_id: String,
    },
    /// The request with this id was accepted.
    Ack {
        request_id: Option<String>,
    },
    ConversationCreated {
        request_id: Option<String>,
        conversation: Conversation,
    },
    Snapshot {
        conversation: Conversation,
        messages: Vec<Message>,
        streaming: Option<Partial>,
        siblings: std::collections::HashMap<MessageId, Vec<MessageId>>,
    },
    Renamed {
        conversation: Conversation,
    },
    Deleted {
        conversation_id: ConversationId,
    },
    Error {
        code: String,
        message: String,
        request_id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        conversation_id: Option<ConversationId>,
    },
    /// A conversation's live event (`user_message`, `message_started`, `delta`, `message_done`,
    /// `busy`, `notice`, `branch_changed`): the session's event as it is, with the conversation's
    /// id beside its fields.
    #[serde(untagged)]
    Conversation {
        conversation_id: ConversationId,
        #[serde(flatten)]
        event: SessionEvent,
    },
}

impl ServerEvent {
    pub fn error(code: &str, message: impl Into<String>, request_id: Option<&str>) -> Self {
        ServerEvent::Error {
            code: code.to_owned(),
            message: message.into(),
            request_id: request_id.map(str::to_owned),
            conversation_id: None,
        }
    }

    /// A session's event, as the wire says it.
    pub fn from_session(conversation_id: ConversationId, event: SessionEvent) -> Self {
        match event {
            SessionEvent::Error { code, message } => ServerEvent::Error {
                code,
                message,
                request_id: None,
                conversation_id: Some(conversation_id),
            },
            event => ServerEvent::Conversation {
                conversation_id,
                event,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_client_messages_and_rejects_unknown_ones() {
        let m: ClientMessage = serde_json::from_str(
            r#"{"type":"send","request_id":"r1","conversation_id":"6f1c1f2e-3d4e-4b5a-9c8d-7e6f5a4b3c2d","content":"hi"}"#,
        )
        .unwrap();
        assert_eq!(m.request_id(), Some("r1"));
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"launch_missiles"}"#).is_err());
        assert!(serde_json::from_str::<ClientMessage>(
            r#"{"type":"send","conversation_id":"nope","content":"hi"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<ClientMessage>(
            r#"{"type":"open","conversation_id":"6f1c1f2e-3d4e-4b5a-9c8d-7e6f5a4b3c2d","x":1}"#
        )
        .is_err());
    }

    #[test]
    fn a_sessions_event_goes_out_tagged_with_its_conversation() {
        let conv = ConversationId::new();
        let message_id = MessageId::new();
        let json = |ev| serde_json::to_value(ServerEvent::from_session(conv, ev)).unwrap();
        assert_eq!(
            json(SessionEvent::Delta {
                message_id,
                channel: crate::engine::reasoning::Channel::Answer,
                text: "hi".into(),
            }),
            serde_json::json!({"type": "delta", "conversation_id": conv, "message_id": message_id,
                               "channel": "answer", "text": "hi"})
        );
        assert_eq!(
            json(SessionEvent::BranchChanged),
            serde_json::json!({"type": "branch_changed", "conversation_id": conv})
        );
        assert_eq!(
            json(SessionEvent::Error {
                code: "busy".into(),
                message: "later".into()
            }),
            serde_json::json!({"type": "error", "code": "busy", "message": "later",
                               "request_id": null, "conversation_id": conv})
        );
    }
}
