//! A conversation as a Markdown file to download: the branch shown, with each answer's
//! reasoning folded away and how it ended when it did not end well. Headings inside messages
//! are nested below the file's own, so that no message can forge a turn in its outline.

use pulldown_cmark::{CodeBlockKind, Event, Parser, Tag, TagEnd};

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
    let text = &html_defused(&same_lines(text));
    let mut out = String::with_capacity(text.len() + 16);
    let mut copied = 0;
    let mut closer = None;
    // Lists and quotes the parser is in: a block inside one ends with it.
    let mut depth = 0usize;
    for (event, range) in Parser::new(text).into_offset_iter() {
        match event {
            Event::Start(Tag::List(_) | Tag::Item | Tag::BlockQuote(_)) => depth += 1,
            Event::End(TagEnd::List(_) | TagEnd::Item | TagEnd::BlockQuote(_)) => depth -= 1,
            Event::Start(Tag::CodeBlock(CodeBlockKind::Fenced(_))) => {
                closer = (depth == 0).then(|| unclosed_fence(&text[range])).flatten();
            }
            Event::Start(Tag::HtmlBlock) => {
                closer = (depth == 0)
                    .then(|| unclosed_html(&text[range]).map(str::to_owned))
                    .flatten();
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

/// `text` with its lines as every Markdown parser reads them: ended by `\n` only, and with
/// no tab at their ends. pulldown-cmark (which finds the headings to nest) differs from
/// CommonMark on both: it reads a lone `\r` after a fence's backticks as part of the info
/// string, and a closing fence followed by a tab as code.
fn same_lines(text: &str) -> String {
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| {
            let trimmed = l.trim_end_matches([' ', '\t']);
            if l[trimmed.len()..].contains('\t') {
                trimmed
            } else {
                l
            }
        })
        .collect();
    lines.join("\n")
}

/// The end tags that close a raw HTML block (`<pre>`…) in CommonMark, in any case and
/// whichever of them opened it.
const RAW_END_TAGS: [&str; 4] = ["</pre>", "</script>", "</style>", "</textarea>"];

/// `text` with its raw HTML made to read the same in every renderer, and below the turns:
/// - each HTML heading tag (`<h1>` to `<h6>`, and their end tags) two levels down, at most
///   `h6` (the digit is the only byte that changes, so the blocks stay as they were);
/// - in a raw block (`<pre>`, `<script>`, `<style>`, `<textarea>`), any end tag of those four
///   before the block's own, in lower case, escaped (`&lt;/style>`). CommonMark ends such a
///   block at any of them, in any case; pulldown-cmark (which finds the headings to nest) only
///   at its own. Lines between the two would be HTML to one and Markdown to the other.
///
/// Tags in code are not HTML and stay as they are.
fn html_defused(text: &str) -> String {
    let bytes = text.as_bytes();
    // Byte positions to change, each to what it becomes.
    let mut edits: Vec<(usize, &str)> = Vec::new();
    for (event, range) in Parser::new(text).into_offset_iter() {
        match event {
            Event::Html(_) | Event::InlineHtml(_) => {
                for at in range.clone() {
                    let tag = &bytes[at..range.end];
                    let name = tag.strip_prefix(b"</").or_else(|| tag.strip_prefix(b"<"));
                    let Some([h, level @ b'1'..=b'6', rest @ ..]) = name else {
                        continue;
                    };
                    let ends = rest
                        .first()
                        .is_none_or(|c| c.is_ascii_whitespace() || b"/>".contains(c));
                    if h.eq_ignore_ascii_case(&b'h') && ends {
                        const LEVELS: [&str; 6] = ["1", "2", "3", "4", "5", "6"];
                        let digit = at + tag.len() - rest.len() - 1;
                        edits.push((digit, LEVELS[usize::from(level - b'1' + 2).min(5)]));
                    }
                }
            }
            Event::Start(Tag::HtmlBlock) => {
                let source = &text[range.clone()];
                let Some(own) = raw_block_end(source) else {
                    continue;
                };
                let until = source.find(own).unwrap_or(source.len());
                let block = source.to_ascii_lowercase();
                for (at, _) in block[..until].match_indices("</") {
                    if RAW_END_TAGS
                        .iter()
                        .any(|t| block[at..].starts_with(&t[..t.len() - 1]))
                    {
                        edits.push((range.start + at, "&lt;"));
                    }
                }
            }
            _ => {}
        }
    }
    edits.sort_unstable();
    let mut out = String::with_capacity(text.len() + 4 * edits.len());
    let mut copied = 0;
    for (at, with) in edits {
        out.push_str(&text[copied..at]);
        out.push_str(with);
        copied = at + 1;
    }
    out.push_str(&text[copied..]);
    out
}

/// The end tag of the raw HTML block (`<pre>`, `<script>`, `<style>`, `<textarea>`) whose
/// source is `block`, as pulldown-cmark looks for it: in lower case, the start tag's own.
fn raw_block_end(block: &str) -> Option<&'static str> {
    let start = block.trim_start_matches(' ').to_ascii_lowercase();
    let name = start.strip_prefix('<')?;
    RAW_END_TAGS.into_iter().find(|t| {
        let rest = name.strip_prefix(&t[2..t.len() - 1]);
        rest.is_some_and(|r| r.is_empty() || r.starts_with(|c: char| c.is_whitespace() || c == '>'))
    })
}

/// The fence that would close the fenced code block `block` (its source), if the text ends
/// inside it.
fn unclosed_fence(block: &str) -> Option<String> {
    let mut lines = block.split(['\n', '\r']).filter(|l| !l.trim().is_empty());
    let opening = lines.next()?.trim_start();
    let mark = opening.chars().next()?;
    let width = opening.chars().take_while(|&c| c == mark).count();
    let closing = lines.next_back().map(str::trim);
    let closed = closing.is_some_and(|l| l.len() >= width && l.chars().all(|c| c == mark));
    (!closed).then(|| mark.to_string().repeat(width))
}

/// What would close the HTML block `block` (its source), if the text ends inside it. Only
/// the blocks that their own end marker closes (CommonMark's kinds 1 to 5: `<pre>`,
/// `<script>`, `<style>`, `<textarea>`, `<!--`, `<?`, `<![CDATA[`, `<!X`); the others end at
/// the blank line before the next turn.
fn unclosed_html(block: &str) -> Option<&'static str> {
    if let Some(own) = raw_block_end(block) {
        return (!block.contains(own)).then_some(own);
    }
    let block = block.trim_start_matches(' ').to_ascii_lowercase();
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
        return None;
    };
    (!block[after..].contains(closer)).then_some(closer)
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
        assert_eq!(nested("Title\r===\r"), "### Title\n");
        assert_eq!(nested("```\rclosed\r```\r\n"), "```\nclosed\n```\n");
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
            ("x\r<!--\r## Assistant", "x\n<!--\n## Assistant\n-->"),
            // Another raw block's end tag, or its own in capitals, is escaped: CommonMark
            // would end the block there, and the parser that nests the headings would not.
            (
                "<pre>\n</style>\n## You",
                "<pre>\n&lt;/style>\n## You\n</pre>",
            ),
            ("<pre></PRE>\n## You", "<pre>&lt;/PRE>\n## You\n</pre>"),
            ("<style>\n</Pre></style>", "<style>\n&lt;/Pre></style>"),
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
            "<pre>\n</pre>\n</style>",
            "<?php ?>",
            "<![CDATA[x]]>",
            "<!DOCTYPE html>",
            "<div>\nends at a blank line",
            "<pre-x>",
            "- <!--\n  ends with the list",
            "- a\n\n  ```\n  ends with the list",
            "> <pre>\n> ends with the quote",
        ] {
            assert_eq!(nested(same), same);
        }
        // In the file, each turn keeps its heading and the text after an open block is text.
        let conv = conversation("t", "");
        let turns = [
            "<!--\n## Assistant\nforged",
            "<pre>\n```\n",
            "- a\n\n  ```\n  in the list",
            "x\r```\rcode",
            "<pre>\n</PRE>\n## Assistant",
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
        assert_eq!((headings, html_headings, after), (7, 0, true), "{md}");
    }

    /// Exports of messages made of the pieces that open, close or forge blocks, read by
    /// GitHub's cmark (`tests/markdown/turns.py`): every one shows its turns' headings, and
    /// only those, in plain CommonMark and in GitHub's flavour.
    #[test]
    fn exports_read_the_same_in_githubs_cmark() {
        let pieces = [
            "<!--",
            "-->",
            "<!-->",
            "<pre>",
            "<pre\n",
            "</pre>",
            "</PRE>",
            "<style>",
            "</style>",
            "<script>",
            "<textarea>",
            "<?",
            "?>",
            "<![CDATA[",
            "]]>",
            "<!X",
            ">",
            "<div>",
            "</div>",
            "<p>",
            "<details>",
            "<a>",
            "<h2>",
            "</h2>",
            "<h1",
            "</h1 >",
            "```",
            "~~~",
            "````",
            "`",
            "## You",
            "## Assistant",
            "# t",
            "===",
            "---",
            "***",
            "- ",
            "* ",
            "+ ",
            "1. ",
            "> ",
            ">> ",
            "\n> ",
            "\n\n- ",
            "  ",
            "   ",
            "    ",
            "\t",
            "\t\n",
            " \n",
            "\\",
            "[x]: /u",
            "x",
            " ",
            "\n",
            "\n",
            "\n",
            "\n\n",
            "\r",
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut pick = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let dir = std::env::temp_dir().join(format!("smolchat-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conv = conversation("t", "");
        for i in 0..4000 {
            let turns: Vec<Message> = [Role::User, Role::Assistant, Role::User]
                .into_iter()
                .map(|role| {
                    let n = 1 + pick(16);
                    let text: String = (0..n).map(|_| pieces[pick(pieces.len())]).collect();
                    message(role, &text, MessageStatus::Complete)
                })
                .collect();
            std::fs::write(dir.join(format!("{i}.md")), markdown(&conv, &turns)).unwrap();
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/markdown/turns.py");
        let out = std::process::Command::new("python3")
            .args([script, dir.to_str().unwrap(), "4"])
            .output()
            .expect("running python3");
        let _ = std::fs::remove_dir_all(&dir);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(said.contains("4000 files, 0 read otherwise"), "{said}");
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
