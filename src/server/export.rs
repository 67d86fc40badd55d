//! A conversation as a Markdown file to download: the branch shown, with each answer's
//! reasoning folded away and how it ended when it did not end well.

use crate::store::{Conversation, Message, MessageStatus, Role};

/// The shown branch of `conversation` as Markdown.
pub fn markdown(conversation: &Conversation, messages: &[Message]) -> String {
    let title = match conversation.title.trim() {
        "" => "New chat",
        t => t,
    };
    let mut out = format!("# {}\n", one_line(title));
    if !conversation.system_prompt.trim().is_empty() {
        out.push_str("\n## System\n\n");
        out.push_str(conversation.system_prompt.trim_end());
        out.push('\n');
    }
    for m in messages {
        out.push_str(match m.role {
            Role::System => "\n## System\n\n",
            Role::User => "\n## You\n\n",
            Role::Assistant => "\n## Assistant\n\n",
        });
        if !m.reasoning.trim().is_empty() {
            out.push_str("<details><summary>Reasoning</summary>\n\n");
            out.push_str(m.reasoning.trim());
            out.push_str("\n\n</details>\n\n");
        }
        out.push_str(m.content.trim_end());
        out.push('\n');
        let ending = match m.status {
            MessageStatus::Complete => None,
            MessageStatus::Streaming => Some("still being written when exported".to_owned()),
            MessageStatus::Interrupted => Some("interrupted".to_owned()),
            MessageStatus::Error => Some(match m.error.as_deref() {
                Some(e) => format!("failed: {}", one_line(e)),
                None => "failed".to_owned(),
            }),
        };
        if let Some(e) = ending {
            out.push_str(&format!("\n*({e})*\n"));
        }
    }
    out
}

/// `Content-Disposition` for the file: the title as its name, an ASCII fallback beside the
/// UTF-8 one (RFC 6266), nothing in it that could end the header value.
pub fn content_disposition(title: &str) -> String {
    let name: String = one_line(title).chars().take(80).collect();
    let name = name.trim();
    let name = if name.is_empty() {
        "conversation"
    } else {
        name
    };
    let mut ascii = String::new();
    for c in name.chars() {
        let c = if c.is_ascii_alphanumeric() || "-_.".contains(c) {
            c
        } else {
            '-'
        };
        if !(c == '-' && ascii.ends_with('-')) {
            ascii.push(c);
        }
    }
    let ascii = match ascii.trim_matches(['-', '.']) {
        "" => "conversation",
        a => a,
    };
    let mut utf8 = String::new();
    for b in format!("{name}.md").bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            utf8.push(b as char);
        } else {
            utf8.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{ascii}.md\"; filename*=UTF-8''{utf8}")
}

/// Text on one line (titles and errors are shown in a heading or a parenthesis).
fn one_line(s: &str) -> String {
    s.split(|c: char| c.is_control())
        .filter(|p| !p.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ConversationId, MessageId, OverflowPolicy, Settings};

    fn message(role: Role, content: &str, status: MessageStatus) -> Message {
        Message {
            id: MessageId::new(),
            conversation_id: ConversationId::new(),
            parent_id: None,
            role,
            content: content.into(),
            reasoning: String::new(),
            status,
            finish_reason: None,
            error: None,
            prompt_tokens: None,
            cached_tokens: None,
            completion_tokens: None,
            ttft_ms: None,
            tokens_per_second: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn a_branch_reads_as_markdown() {
        let conv = Conversation {
            id: ConversationId::new(),
            title: "Rust\nlifetimes".into(),
            system_prompt: "Be brief.".into(),
            settings: Settings::default(),
            reasoning: true,
            overflow_policy: OverflowPolicy::Refuse,
            current_leaf_id: None,
            created_at: 0,
            updated_at: 0,
        };
        let mut answer = message(
            Role::Assistant,
            "They are *scopes*.",
            MessageStatus::Complete,
        );
        answer.reasoning = "The user asks about lifetimes.".into();
        let mut failed = message(Role::Assistant, "Half", MessageStatus::Error);
        failed.error = Some("the model\nstopped".into());
        let md = markdown(
            &conv,
            &[
                message(Role::User, "What are lifetimes?", MessageStatus::Complete),
                answer,
                message(Role::User, "More?", MessageStatus::Complete),
                failed,
            ],
        );
        assert_eq!(
            md,
            "# Rust lifetimes\n\n## System\n\nBe brief.\n\n## You\n\nWhat are lifetimes?\n\n\
             ## Assistant\n\n<details><summary>Reasoning</summary>\n\nThe user asks about \
             lifetimes.\n\n</details>\n\nThey are *scopes*.\n\n## You\n\nMore?\n\n\
             ## Assistant\n\nHalf\n\n*(failed: the model stopped)*\n"
        );
    }

    #[test]
    fn file_names_are_safe_in_a_header() {
        assert_eq!(
            content_disposition("Rust lifetimes"),
            "attachment; filename=\"Rust-lifetimes.md\"; filename*=UTF-8''Rust%20lifetimes.md"
        );
        assert_eq!(
            content_disposition("\"quoted\"\r\nSet-Cookie: x=1"),
            "attachment; filename=\"quoted-Set-Cookie-x-1.md\"; \
             filename*=UTF-8''%22quoted%22%20Set-Cookie%3A%20x%3D1.md"
        );
        assert_eq!(
            content_disposition("Ünïcode ✓"),
            "attachment; filename=\"n-code.md\"; filename*=UTF-8''%C3%9Cn%C3%AFcode%20%E2%9C%93.md"
        );
        assert_eq!(
            content_disposition("  "),
            "attachment; filename=\"conversation.md\"; filename*=UTF-8''conversation.md"
        );
    }
}
