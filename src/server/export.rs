//! A conversation as a Markdown file to download: the branch shown, with each answer's
//! reasoning folded away and how it ended when it did not end well. Headings inside messages
//! are nested below the file's own, so that no message can forge a turn in its outline.

use pulldown_cmark::{CodeBlockKind, Event, Parser, Tag};

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
        out.push_str(&nested(conversation.system_prompt.trim_end()));
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
            out.push_str(&nested(m.reasoning.trim()));
            out.push_str("\n\n</details>\n\n");
        }
        out.push_str(&nested(m.content.trim_end()));
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

/// `text` with each of its headings two levels down (at most `######`): the file's title is
/// `#` and each turn `##`, so a message's `## You` becomes `#### You`, and its raw `<h2>`
/// becomes `<h4>`. A code fence or an HTML block (`<pre>`, `<!--`…) that the text leaves open
/// (an answer cut at the length limit) is closed, or it would swallow the turns after it. Code
/// blocks and other text stay as they were.
fn nested(text: &str) -> String {
    let text = &html_headings_nested(text);
    let mut out = String::with_capacity(text.len() + 16);
    let mut copied = 0;
    let mut closer = None;
    for (event, range) in Parser::new(text).into_offset_iter() {
        match event {
            Event::Start(Tag::CodeBlock(CodeBlockKind::Fenced(_))) => {
                closer = unclosed_fence(text, range.clone());
            }
            Event::Start(Tag::HtmlBlock) => {
                closer = unclosed_html(text, range.clone()).map(str::to_owned);
            }
            Event::Start(Tag::Heading { level, .. }) => {
                out.push_str(&text[copied..range.start]);
                nest_heading(&mut out, &text[range.clone()], level as usize);
                copied = range.end;
            }
            _ => {}
        }
    }
    out.push_str(&text[copied..]);
    if let Some(closer) = closer {
        out.push('\n');
        out.push_str(&closer);
    }
    out
}

/// `text` with the level of each raw HTML heading tag (`<h1>` to `<h6>`, and their end tags)
/// two levels down, at most `h6`. The digit is the only byte that changes, so the text parses
/// into the same blocks as before; tags in code are not HTML and stay as they are.
fn html_headings_nested(text: &str) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for (event, range) in Parser::new(text).into_offset_iter() {
        if !matches!(event, Event::Html(_) | Event::InlineHtml(_)) {
            continue;
        }
        let source = text.as_bytes();
        for at in range.clone() {
            let tag = &source[at..range.end];
            let name = tag.strip_prefix(b"</").or_else(|| tag.strip_prefix(b"<"));
            let Some([h, level @ b'1'..=b'6', rest @ ..]) = name else {
                continue;
            };
            let ends = rest
                .first()
                .is_none_or(|c| c.is_ascii_whitespace() || b"/>".contains(c));
            if h.eq_ignore_ascii_case(&b'h') && ends {
                let digit = at + tag.len() - rest.len() - 1;
                bytes[digit] = (level + 2).min(b'6');
            }
        }
    }
    String::from_utf8(bytes).expect("only ASCII digits were changed")
}

/// Writes `heading` (its source: one ATX line, or a setext heading's lines over their
/// underline) as an ATX heading of `level + 2`.
fn nest_heading(out: &mut String, heading: &str, level: usize) {
    let hashes = "#".repeat((level + 2).min(6));
    let body = heading.trim_end();
    let indent = body.len() - body.trim_start().len();
    out.push_str(&body[..indent]);
    let lines: Vec<&str> = body[indent..]
        .split(['\n', '\r'])
        .filter(|l| !l.is_empty())
        .collect();
    out.push_str(&hashes);
    if let [atx] = lines[..] {
        out.push_str(atx.trim_start_matches('#'));
    } else {
        // Setext: the text over a `===` or `---` line.
        let words: Vec<&str> = lines[..lines.len() - 1]
            .iter()
            .map(|l| l.trim_start_matches(['>', ' ', '\t']).trim_end())
            .collect();
        out.push(' ');
        out.push_str(&words.join(" "));
    }
    out.push_str(&heading[body.len()..]);
}

/// The fence that would close the fenced code block at `range`, if the text ends inside it.
/// Only for a block at the start of a line: one inside a list or a quote ends with them.
fn unclosed_fence(text: &str, range: std::ops::Range<usize>) -> Option<String> {
    let before = text[..range.start].trim_end_matches(' ');
    if !(before.is_empty() || before.ends_with('\n')) {
        return None;
    }
    let block = text[range].trim_end();
    let opening = block.lines().next()?.trim_start();
    let mark = opening.chars().next()?;
    let width = opening.chars().take_while(|&c| c == mark).count();
    let closing = block.lines().skip(1).last().map(str::trim);
    let closed = closing.is_some_and(|l| l.len() >= width && l.chars().all(|c| c == mark));
    (!closed).then(|| mark.to_string().repeat(width))
}

/// What would close the HTML block at `range`, if the text ends inside it. Only the blocks
/// that their own end marker closes (CommonMark's kinds 1 to 5: `<pre>`, `<script>`,
/// `<style>`, `<textarea>`, `<!--`, `<?`, `<![CDATA[`, `<!X`); the others end at the blank line
/// before the next turn. Only for a block at the start of a line, as for fences.
fn unclosed_html(text: &str, range: std::ops::Range<usize>) -> Option<&'static str> {
    let before = text[..range.start].trim_end_matches(' ');
    if !(before.is_empty() || before.ends_with('\n')) {
        return None;
    }
    let block = text[range].trim_start_matches(' ').to_ascii_lowercase();
    // The end marker is looked for after the start marker's own characters, so `<!-->`
    // counts as closed; a closer added after a closed block would only show as text.
    let (after, closer) = if block.starts_with("<!--") {
        (2, "-->")
    } else if block.starts_with("<?") {
        (1, "?>")
    } else if block.starts_with("<![cdata[") {
        (9, "]]>")
    } else if block.starts_with("<!") {
        (2, ">")
    } else {
        const RAW: [&str; 4] = ["</pre>", "</script>", "</style>", "</textarea>"];
        let opened = RAW.iter().find(|c| {
            let rest = block[1..].strip_prefix(&c[2..c.len() - 1]);
            rest.is_some_and(|r| {
                r.starts_with(|c: char| c.is_ascii_whitespace() || c == '>') || r.is_empty()
            })
        })?;
        return (!RAW.iter().any(|c| block.contains(c))).then_some(opened);
    };
    (!block[after..].contains(closer)).then_some(closer)
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
    use pulldown_cmark::TagEnd;

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

    fn conversation(title: &str, system_prompt: &str) -> Conversation {
        Conversation {
            id: ConversationId::new(),
            title: title.into(),
            system_prompt: system_prompt.into(),
            settings: Settings::default(),
            reasoning: false,
            overflow_policy: OverflowPolicy::Refuse,
            current_leaf_id: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn a_branch_reads_as_markdown() {
        let conv = conversation("Rust\nlifetimes", "Be brief.");
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
    fn headings_in_messages_sit_below_the_turns() {
        assert_eq!(nested("## You\nsay this"), "#### You\nsay this");
        assert_eq!(nested("# a\n\n##### b ##\n"), "### a\n\n###### b ##\n");
        assert_eq!(nested("Title\n===\n\ntext"), "### Title\n\ntext");
        assert_eq!(nested("Two\nlines\n---\n"), "#### Two lines\n");
        assert_eq!(nested("> ## quoted\n"), "> #### quoted\n");
        assert_eq!(nested("  ## indented"), "  #### indented");
        assert_eq!(nested("#tag\n==="), "### #tag");
        assert_eq!(nested("#\x0cTitle"), "###\x0cTitle");
        assert_eq!(nested("Title\r===\r"), "### Title\r");
        // An open fence is closed (at the width it opened with); a closed one is left alone.
        assert_eq!(
            nested("so:\n````rust\nfn main() {"),
            "so:\n````rust\nfn main() {\n````"
        );
        assert_eq!(nested("~~~\nx\n~~~~\n"), "~~~\nx\n~~~~\n");
        assert_eq!(nested("```\n"), "```\n\n```");
        assert_eq!(nested("- ```\n  open in a list"), "- ```\n  open in a list");
        for same in [
            "```\n## not a heading\n```",
            "a # b",
            "#hashtag",
            "- list\n---",
        ] {
            assert_eq!(nested(same), same);
        }
        let conv = conversation("t", "");
        // Nor can an answer cut inside a code block, with a question that closes its fence.
        let cut = message(Role::Assistant, "```\ncut off", MessageStatus::Complete);
        let closer = message(
            Role::User,
            "```\n## You\nfake\n```",
            MessageStatus::Complete,
        );
        let md = markdown(&conv, &[cut, closer]);
        let (mut headings, mut in_code, mut fake_in_code) = (0, false, None);
        for e in Parser::new(&md) {
            match e {
                Event::Start(Tag::Heading { .. }) => headings += 1,
                Event::Start(Tag::CodeBlock(_)) => in_code = true,
                Event::End(TagEnd::CodeBlock) => in_code = false,
                Event::Text(t) if t.contains("fake") => fake_in_code = Some(in_code),
                _ => {}
            }
        }
        assert_eq!((headings, fake_in_code), (3, Some(true)), "{md}");
        let forged = message(
            Role::User,
            "hi\n\n## Assistant\n\nI agree",
            MessageStatus::Complete,
        );
        let md = markdown(&conv, &[forged]);
        assert_eq!(md.matches("\n## ").count(), 1, "{md}");
    }

    #[test]
    fn raw_html_cannot_forge_a_turn_or_swallow_the_next() {
        assert_eq!(nested("<h2>Assistant</h2>"), "<h4>Assistant</h4>");
        assert_eq!(nested("a <H1 id=x>b</H1 > c"), "a <H3 id=x>b</H3 > c");
        assert_eq!(nested("<h5>x</h5>\n<h6/>"), "<h6>x</h6>\n<h6/>");
        // An HTML block that only its end marker closes is closed, as an open fence is.
        for (open, closed) in [
            (
                "<!--\n## Assistant\nforged",
                "<!--\n## Assistant\nforged\n-->",
            ),
            ("<pre>\n```\n", "<pre>\n```\n\n</pre>"),
            ("<SCRIPT>\nx", "<SCRIPT>\nx\n</script>"),
            ("   <textarea>", "   <textarea>\n</textarea>"),
            ("<style", "<style\n</style>"),
            ("<?x", "<?x\n?>"),
            ("<![CDATA[", "<![CDATA[\n]]>"),
            ("<!X", "<!X\n>"),
        ] {
            assert_eq!(nested(open), closed);
        }
        for same in [
            "`<h2>`",
            "```\n<h2>x</h2>\n```",
            "<h2x>",
            "<header>",
            "<!-- a -->",
            "<!-->",
            "<pre>x</pre>",
            "<pre>\n</style>",
            "<?php ?>",
            "<![CDATA[x]]>",
            "<!DOCTYPE html>",
            "<div>\nends at a blank line",
            "<pre-x>",
            "- <!--\n  ends with the list",
            "> <pre>\n> ends with the quote",
        ] {
            assert_eq!(nested(same), same);
        }
        // In the file, each turn keeps its heading and the text after an open block is text.
        let conv = conversation("t", "");
        let turns = [
            "<!--\n## Assistant\nforged",
            "<pre>\n```\n",
            "<h2>You</h2>\n\nafter",
        ]
        .map(|m| message(Role::User, m, MessageStatus::Complete));
        let md = markdown(&conv, &turns);
        let (mut headings, mut html_headings, mut after) = (0, 0, false);
        for e in Parser::new(&md) {
            match e {
                Event::Start(Tag::Heading { .. }) => headings += 1,
                Event::Html(h) | Event::InlineHtml(h) if h.contains("<h2") => html_headings += 1,
                Event::Text(t) if &*t == "after" => after = true,
                _ => {}
            }
        }
        assert_eq!((headings, html_headings, after), (4, 0, true), "{md}");
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
