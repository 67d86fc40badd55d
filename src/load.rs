//! `smolchat load`: simulated users chatting with a server at once, over its real WebSocket.
//!
//! Each user is a new visitor (`GET /` gives it a cookie), opens one conversation and sends
//! `turns` messages in it, one after the other, as a person would. For each number of users it
//! reports the aggregate tokens/s, time to first token (from `send` to the first `delta`),
//! inter-token gaps, and how many turns ended otherwise (`busy`, an error, a dropped socket).
//! It measures everything between the socket and the model: sessions, the store, the actors.
//! Against a server elsewhere (`--url`), the simulated users and their conversations stay there.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::serve_sim::{percentile, ASKS};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What one number of users saw.
#[derive(Debug, Serialize)]
pub struct LoadRow {
    /// Users chatting at once.
    pub users: usize,
    /// Turns whose answer completed.
    pub turns_done: usize,
    /// Turns refused (`busy`, a limit), failed with an error, cut by a dropped socket, or never
    /// sent because their user had stopped: `turns_done + turns_failed = users × turns`.
    pub turns_failed: usize,
    /// Answer tokens, as the finished messages count them.
    pub tokens: usize,
    /// From the first user's start to the last one's end (connecting and creating included).
    pub seconds: f64,
    /// `tokens / seconds`.
    pub aggregate_tokens_per_second: f64,
    /// From `send` to the answer's first `delta`.
    pub ttft_p50_ms: f64,
    pub ttft_p95_ms: f64,
    /// Between an answer's `delta` frames (a frame carries one token's text or more).
    pub itl_p50_ms: f64,
    pub itl_p95_ms: f64,
}

#[derive(Default)]
struct UserTrace {
    ttft: Vec<f64>,
    gaps: Vec<f64>,
    tokens: usize,
    done: usize,
}

/// `host:port` of an `http://host:port` (or bare `host:port`) address.
fn host_port(url: &str) -> Result<String> {
    if url.starts_with("https://") || url.starts_with("wss://") {
        bail!("only plain http:// servers can be loaded (no TLS here): {url}");
    }
    let rest = url
        .trim_start_matches("http://")
        .trim_start_matches("ws://")
        .trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        bail!("expected http://HOST:PORT, got {url}");
    }
    Ok(rest.to_owned())
}

/// A new visitor's cookie: `GET /` over a plain socket, its `Set-Cookie` header.
async fn visit(host: &str) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to {host}"))?;
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut buf).await?;
        if n == 0 || head.len() > 64 << 10 {
            bail!("{host} sent no HTTP response head");
        }
        head.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&head[..end]);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("GET / on {host}: {status}");
    }
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
        .and_then(|(_, v)| v.split(';').next())
        .map(|c| c.trim().to_owned())
        .with_context(|| format!("{host} gave no cookie on GET /"))
}

/// The next JSON frame (pings skipped); an error if the socket ends or stays quiet for 300 s.
async fn next(ws: &mut Ws) -> Result<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(300), ws.next()).await {
            Err(_) => bail!("no event for 300 s"),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(serde_json::from_str(&t)?),
            Ok(Some(Ok(Message::Close(c)))) => bail!("closed by the server: {c:?}"),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => bail!("the socket ended"),
        }
    }
}

/// Frames up to the first of type `ty`; an error frame on the way is an error.
async fn until(ws: &mut Ws, ty: &str) -> Result<Value> {
    loop {
        let v = next(ws).await?;
        if v["type"] == ty {
            return Ok(v);
        }
        if v["type"] == "error" {
            bail!("waiting for {ty}: {v}");
        }
    }
}

async fn send(ws: &mut Ws, msg: Value) -> Result<()> {
    Ok(ws.send(Message::Text(msg.to_string().into())).await?)
}

/// One user: a conversation and `turns` messages in it, recorded into `trace` as they end.
async fn user(
    host: &str,
    u: usize,
    turns: usize,
    max_tokens: usize,
    trace: &mut UserTrace,
) -> Result<()> {
    let cookie = visit(host).await?;
    let mut req = format!("ws://{host}/ws").into_client_request()?;
    req.headers_mut().insert("cookie", cookie.parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    until(&mut ws, "hello").await?;
    send(
        &mut ws,
        json!({"type": "create", "settings": {"max_tokens": max_tokens}}),
    )
    .await?;
    let created = until(&mut ws, "conversation_created").await?;
    let id = created["conversation"]["id"].clone();
    send(&mut ws, json!({"type": "open", "conversation_id": id})).await?;
    until(&mut ws, "snapshot").await?;

    let limit = Duration::from_secs(120 + max_tokens as u64);
    for turn in 0..turns {
        let content = format!("{} (user {u}, turn {turn})", ASKS[(u + turn) % ASKS.len()]);
        let rid = format!("turn-{turn}");
        let ask =
            json!({"type": "send", "conversation_id": id, "content": content, "request_id": rid});
        let done = tokio::time::timeout(limit, one_turn(&mut ws, ask, trace))
            .await
            .map_err(|_| anyhow::anyhow!("turn {turn} took longer than {limit:?}"))??;
        trace.done += usize::from(done);
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// Sends `ask` and follows it: to the `error` that answers its request (a refusal: `busy`, a
/// limit), or to its answer's `message_done`. Frames of other conversations and answers are
/// not counted. Returns whether the answer completed.
async fn one_turn(ws: &mut Ws, ask: Value, trace: &mut UserTrace) -> Result<bool> {
    let (conversation, rid) = (ask["conversation_id"].clone(), ask["request_id"].clone());
    let t0 = Instant::now();
    send(ws, ask).await?;
    let (mut answer, mut last) = (Value::Null, None::<Instant>);
    loop {
        let v = next(ws).await?;
        if !v["conversation_id"].is_null() && v["conversation_id"] != conversation {
            continue;
        }
        let ours = !answer.is_null() && (v["message_id"] == answer || v["message"]["id"] == answer);
        match v["type"].as_str() {
            Some("error") if v["request_id"] == rid => {
                tracing::debug!(event = %v, "turn refused");
                return Ok(false);
            }
            Some("message_started") => answer = v["message"]["id"].clone(),
            Some("delta") if ours => {
                let now = Instant::now();
                match last {
                    None => trace.ttft.push((now - t0).as_secs_f64()),
                    Some(l) => trace.gaps.push((now - l).as_secs_f64()),
                }
                last = Some(now);
            }
            Some("message_done") if ours => {
                let m = &v["message"];
                trace.tokens += m["completion_tokens"].as_u64().unwrap_or(0) as usize;
                return Ok(m["status"] == "complete");
            }
            _ => {}
        }
    }
}

/// Runs `users` users at once against the server at `url`.
pub async fn run_level(
    url: &str,
    users: usize,
    turns: usize,
    max_tokens: usize,
) -> Result<LoadRow> {
    let host = host_port(url)?;
    // A server that is not there is an error, not a run of failed users.
    tokio::net::TcpStream::connect(&host)
        .await
        .with_context(|| format!("connecting to {host}"))?;
    let start = Instant::now();
    let tasks: Vec<_> = (0..users)
        .map(|u| {
            let host = host.clone();
            tokio::spawn(async move {
                let mut trace = UserTrace::default();
                if let Err(e) = user(&host, u, turns, max_tokens, &mut trace).await {
                    tracing::warn!(user = u, error = %e, "a simulated user stopped");
                }
                trace
            })
        })
        .collect();
    let (mut ttft, mut gaps) = (Vec::new(), Vec::new());
    let (mut tokens, mut done, mut failed) = (0, 0, 0);
    for t in tasks {
        // A user that stopped early (or panicked) fails the turns it did not finish.
        let tr = t.await.unwrap_or_default();
        ttft.extend(tr.ttft);
        gaps.extend(tr.gaps);
        tokens += tr.tokens;
        done += tr.done;
        failed += turns - tr.done;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(LoadRow {
        users,
        turns_done: done,
        turns_failed: failed,
        tokens,
        seconds,
        aggregate_tokens_per_second: tokens as f64 / seconds.max(1e-9),
        ttft_p50_ms: percentile(&mut ttft, 0.5),
        ttft_p95_ms: percentile(&mut ttft, 0.95),
        itl_p50_ms: percentile(&mut gaps, 0.5),
        itl_p95_ms: percentile(&mut gaps, 0.95),
    })
}

/// The report as a markdown table.
pub fn table(rows: &[LoadRow]) -> String {
    let mut s = String::from(
        "| users | turns done / failed | aggregate tokens/s | TTFT p50 / p95 ms | inter-token p50 / p95 ms |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} / {} | {:.1} | {:.0} / {:.0} | {:.0} / {:.0} |\n",
            r.users,
            r.turns_done,
            r.turns_failed,
            r.aggregate_tokens_per_second,
            r.ttft_p50_ms,
            r.ttft_p95_ms,
            r.itl_p50_ms,
            r.itl_p95_ms
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_why_not() {
        assert_eq!(
            host_port("http://127.0.0.1:3000/").unwrap(),
            "127.0.0.1:3000"
        );
        assert_eq!(host_port("localhost:8080").unwrap(), "localhost:8080");
        assert!(host_port("https://example.org")
            .unwrap_err()
            .to_string()
            .contains("TLS"));
        assert!(host_port("http://h:1/path").is_err());
    }
}
