//! The real server on a free loopback port, with a temporary data directory and the real
//! default model, spoken to like a browser would: HTTP with a cookie, and a WebSocket.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use smolchat::actors::SchedulerConfig;
use smolchat::engine::Engine;
use smolchat::server::{Limits, RunningServer, ServerConfig};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn engine() -> Arc<Engine> {
    static E: std::sync::OnceLock<Arc<Engine>> = std::sync::OnceLock::new();
    E.get_or_init(|| Arc::new(Engine::load(&common::default_model_path()).unwrap()))
        .clone()
}

fn data_dir(name: &str) -> std::path::PathBuf {
    common::scratch_root().join(format!("server-{name}"))
}

fn config(name: &str, scheduler: SchedulerConfig, limits: Limits) -> ServerConfig {
    let dir = data_dir(name);
    let _ = std::fs::remove_dir_all(&dir);
    ServerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir,
        engine: engine(),
        scheduler,
        limits,
        allowed_origins: vec![],
        session_idle: Duration::from_secs(30),
        trust_forwarded_for: false,
        metrics_token: None,
    }
}

async fn server(name: &str, scheduler: SchedulerConfig, limits: Limits) -> RunningServer {
    smolchat::server::start(config(name, scheduler, limits))
        .await
        .unwrap()
}

/// A browser: GET / gives it a cookie.
async fn visitor(addr: SocketAddr) -> String {
    let r = reqwest::get(format!("http://{addr}/")).await.unwrap();
    assert!(r.status().is_success());
    let cookie = r
        .headers()
        .get("set-cookie")
        .expect("a cookie on first visit")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    cookie.split(';').next().unwrap().to_owned()
}

async fn connect(addr: SocketAddr, cookie: &str) -> Ws {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    req.headers_mut()
        .insert("origin", format!("http://{addr}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let hello = next(&mut ws).await;
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["protocol"], 1);
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next JSON event (skipping pings); panics on close or after 60 s.
async fn next(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("an event in time");
        match m {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Close(c))) => panic!("closed: {c:?}"),
            Some(Ok(_)) => continue,
            other => panic!("socket ended: {other:?}"),
        }
    }
}

async fn until(ws: &mut Ws, ty: &str) -> Value {
    loop {
        let v = next(ws).await;
        if v["type"] == ty {
            return v;
        }
    }
}

/// Collects delta text until `message_done`; returns (text, done message).
async fn until_done(ws: &mut Ws) -> (String, Value) {
    let mut text = String::new();
    loop {
        let v = next(ws).await;
        match v["type"].as_str().unwrap() {
            "delta" => text.push_str(v["text"].as_str().unwrap()),
            "message_done" => return (text, v["message"].clone()),
            "error" => panic!("error: {v}"),
            _ => {}
        }
    }
}

async fn create(ws: &mut Ws, max_tokens: usize) -> String {
    send(ws, json!({"type":"create","request_id":"c1","settings":{"temperature":0.0,"max_tokens":max_tokens}})).await;
    let v = until(ws, "conversation_created").await;
    assert_eq!(v["request_id"], "c1");
    let id = v["conversation"]["id"].as_str().unwrap().to_owned();
    send(ws, json!({"type":"open","conversation_id":id})).await;
    until(ws, "snapshot").await;
    id
}

fn limits() -> Limits {
    Limits {
        messages_per_minute: 1000,
        concurrent_generations: 8,
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_turn_streams_and_is_listed_by_the_api() {
    let srv = server("turn", SchedulerConfig::cpu(), limits()).await;
    let cookie = visitor(srv.addr).await;
    let mut ws = connect(srv.addr, &cookie).await;
    let id = create(&mut ws, 24).await;
    send(&mut ws, json!({"type":"send","request_id":"s1","conversation_id":id,"content":"What is the capital of France?"})).await;
    let (text, done) = until_done(&mut ws).await;
    assert_eq!(done["content"], text);
    assert_eq!(done["status"], "complete");
    assert!(
        done["tokens_per_second"].as_f64().unwrap() > 0.0
            && done["ttft_ms"].as_f64().unwrap() > 0.0
    );

    let http = reqwest::Client::new();
    let list: Value = get_json(
        &http,
        format!("http://{}/api/conversations", srv.addr),
        &cookie,
    )
    .await;
    assert_eq!(list["conversations"][0]["id"], id.as_str());
    assert_eq!(
        list["conversations"][0]["title"],
        "What is the capital of France?"
    );
    let one: Value = get_json(
        &http,
        format!("http://{}/api/conversations/{id}", srv.addr),
        &cookie,
    )
    .await;
    let msgs = one["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        (msgs[0]["role"].as_str(), msgs[0]["status"].as_str()),
        (Some("user"), Some("complete"))
    );
    assert_eq!(msgs[1]["content"], text);
    let found: Value = get_json(
        &http,
        format!("http://{}/api/conversations?q=capital", srv.addr),
        &cookie,
    )
    .await;
    assert_eq!(found["results"][0]["conversation_id"], id.as_str());
    // The export: the branch as a Markdown file, its title the file's name; only its owner's.
    let export = format!("http://{}/api/conversations/{id}/export", srv.addr);
    let r = http
        .get(&export)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let header = |name: &str| r.headers()[name].to_str().unwrap().to_owned();
    assert_eq!(header("content-type"), "text/markdown; charset=utf-8");
    assert!(
        header("content-disposition").contains("filename=\"What-is-the-capital-of-France.md\""),
        "{}",
        header("content-disposition")
    );
    let md = r.text().await.unwrap();
    let expected = format!(
        "# What is the capital of France?\n\n## You\n\nWhat is the capital of France?\n\n\
         ## Assistant\n\n{}\n",
        text.trim_end()
    );
    assert_eq!(md, expected);
    let stranger = visitor(srv.addr).await;
    let r = http
        .get(&export)
        .header("cookie", &stranger)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "someone else's conversation is not there");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_gets_the_snapshot_and_two_tabs_see_the_same_answer() {
    let srv = server("reload", SchedulerConfig::cpu(), limits()).await;
    let cookie = visitor(srv.addr).await;
    let mut a = connect(srv.addr, &cookie).await;
    let id = create(&mut a, 80).await;
    send(
        &mut a,
        json!({"type":"send","conversation_id":id,"content":"Tell me a story about a lighthouse."}),
    )
    .await;
    let mut seen = String::new();
    while seen.len() < 20 {
        let v = next(&mut a).await;
        if v["type"] == "delta" {
            seen.push_str(v["text"].as_str().unwrap());
        }
    }
    // A reload: a new socket with the same cookie.
    let mut b = connect(srv.addr, &cookie).await;
    send(&mut b, json!({"type":"open","conversation_id":id})).await;
    let snap = until(&mut b, "snapshot").await;
    let partial = snap["streaming"]["content"].as_str().unwrap().to_owned();
    assert!(
        partial.starts_with(&seen),
        "the snapshot holds what was streamed"
    );
    let (rest_b, done_b) = until_done(&mut b).await;
    let (rest_a, done_a) = until_done(&mut a).await;
    assert_eq!(
        format!("{partial}{rest_b}"),
        done_b["content"].as_str().unwrap()
    );
    assert_eq!(
        format!("{seen}{rest_a}"),
        done_a["content"].as_str().unwrap()
    );
    assert_eq!(done_a, done_b);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_cannot_see_or_touch_each_others_conversations() {
    let srv = server("users", SchedulerConfig::cpu(), limits()).await;
    let (alice, mallory) = (visitor(srv.addr).await, visitor(srv.addr).await);
    assert_ne!(alice, mallory);
    let mut a = connect(srv.addr, &alice).await;
    let id = create(&mut a, 8).await;
    send(
        &mut a,
        json!({"type":"rename","conversation_id":id,"title":"alice's"}),
    )
    .await;
    until(&mut a, "renamed").await;

    let mut m = connect(srv.addr, &mallory).await;
    let missing = uuid::Uuid::new_v4().to_string();
    for (i, msg) in [
        json!({"type":"open","conversation_id":id}),
        json!({"type":"send","conversation_id":id,"content":"hi"}),
        json!({"type":"stop","conversation_id":id}),
        json!({"type":"regenerate","conversation_id":id}),
        json!({"type":"rename","conversation_id":id,"title":"mine"}),
        json!({"type":"delete","conversation_id":id}),
        json!({"type":"open","conversation_id":missing}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut msg = msg;
        msg["request_id"] = json!(format!("m{i}"));
        send(&mut m, msg).await;
        let v = next(&mut m).await;
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str()),
            (Some("error"), Some("not_found")),
            "{i}: {v}"
        );
        assert_eq!(v["request_id"], format!("m{i}"));
    }
    let http = reqwest::Client::new();
    let base = format!("http://{}/api/conversations", srv.addr);
    let s = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        s(http
            .get(format!("{base}/{id}"))
            .header("cookie", &mallory)
            .send()
            .await
            .unwrap()),
        404
    );
    assert_eq!(
        s(http
            .get(format!("{base}/{missing}"))
            .header("cookie", &mallory)
            .send()
            .await
            .unwrap()),
        404
    );
    assert_eq!(
        s(http
            .patch(format!("{base}/{id}"))
            .header("cookie", &mallory)
            .body(r#"{"title":"x"}"#)
            .send()
            .await
            .unwrap()),
        404
    );
    assert_eq!(
        s(http
            .delete(format!("{base}/{id}"))
            .header("cookie", &mallory)
            .send()
            .await
            .unwrap()),
        404
    );
    let list: Value = get_json(&http, &base, &mallory).await;
    assert_eq!(list["conversations"], json!([]));
    assert_eq!(
        s(http.get(&base).send().await.unwrap()),
        401,
        "no token, no data"
    );
    let mine: Value = get_json(&http, format!("{base}/{id}"), &alice).await;
    assert_eq!(mine["conversation"]["title"], "alice's", "nothing changed");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_the_answer() {
    let srv = server("stop", SchedulerConfig::cpu(), limits()).await;
    let cookie = visitor(srv.addr).await;
    let mut ws = connect(srv.addr, &cookie).await;
    let id = create(&mut ws, 500).await;
    send(
        &mut ws,
        json!({"type":"send","conversation_id":id,"content":"Write a long essay about bread."}),
    )
    .await;
    until(&mut ws, "delta").await;
    send(&mut ws, json!({"type":"stop","conversation_id":id})).await;
    let (_, done) = until_done(&mut ws).await;
    assert_eq!(done["finish_reason"], "stopped");
    assert!(done["completion_tokens"].as_i64().unwrap() < 500);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_documented_errors_and_changes_nothing() {
    let lim = Limits {
        messages_per_minute: 3,
        max_bad_frames: 6,
        subscriptions_per_socket: 2,
        ..Limits::default()
    };
    let srv = server("bad", SchedulerConfig::cpu(), lim).await;
    let cookie = visitor(srv.addr).await;
    let mut ws = connect(srv.addr, &cookie).await;
    let id = create(&mut ws, 4).await;
    let cases = [
        ("{not json", "invalid_json"),
        (r#"{"type":"launch"}"#, "unknown_type"),
        (
            r#"{"type":"send","conversation_id":42,"content":"hi"}"#,
            "invalid_message",
        ),
        (
            r#"{"type":"send","conversation_id":"not-a-uuid","content":"hi"}"#,
            "invalid_message",
        ),
    ];
    for (frame, code) in cases {
        ws.send(Message::Text(frame.into())).await.unwrap();
        let v = next(&mut ws).await;
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str()),
            (Some("error"), Some(code)),
            "{frame}: {v}"
        );
    }
    // NUL bytes never reach the store.
    send(
        &mut ws,
        json!({"type":"send","conversation_id":id,"content":"a\u{0}b"}),
    )
    .await;
    assert_eq!(until(&mut ws, "error").await["code"], "invalid_request");
    // Too long a message.
    send(
        &mut ws,
        json!({"type":"send","conversation_id":id,"content":"x".repeat(20_000)}),
    )
    .await;
    assert_eq!(until(&mut ws, "error").await["code"], "message_too_long");
    // The socket still works, and a flood meets the rate limit.
    let mut codes = Vec::new();
    for i in 0..5 {
        send(
            &mut ws,
            json!({"type":"send","request_id":format!("f{i}"),"conversation_id":id,"content":"hi"}),
        )
        .await;
        loop {
            let v = next(&mut ws).await;
            if v["request_id"] == format!("f{i}") {
                codes.push(v["code"].as_str().unwrap_or("ok").to_owned());
                break;
            }
        }
    }
    assert!(codes.contains(&"rate_limited".to_owned()), "{codes:?}");
    let http = reqwest::Client::new();
    let conv: Value = get_json(
        &http,
        format!("http://{}/api/conversations/{id}", srv.addr),
        &cookie,
    )
    .await;
    // Only the accepted messages were stored: no trace of the refused ones.
    let questions: Vec<&str> = conv["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    let accepted = codes.iter().filter(|c| *c == "ok").count();
    assert!(accepted >= 1, "{codes:?}");
    assert_eq!(questions, vec!["hi"; accepted], "{conv}");

    // A path or query the API cannot read gets its JSON error, as every other refusal.
    for (path, status, code) in [
        ("/api/conversations/%ff", 404, "not_found"),
        ("/api/conversations?q=a&q=b", 400, "invalid_request"),
    ] {
        let r = http
            .get(format!("http://{}{path}", srv.addr))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], code, "{path}: {v}");
    }

    // One socket follows so many conversations at once, then is asked to close one.
    let mut more = Vec::new();
    for _ in 0..2 {
        let r = http
            .post(format!("http://{}/api/conversations", srv.addr))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        more.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    send(&mut ws, json!({"type":"open","conversation_id":more[0]})).await;
    until(&mut ws, "snapshot").await;
    send(
        &mut ws,
        json!({"type":"open","request_id":"o3","conversation_id":more[1]}),
    )
    .await;
    let v = until(&mut ws, "error").await;
    assert_eq!(v["code"], "too_many_subscriptions", "{v}");
    send(&mut ws, json!({"type":"close","conversation_id":id})).await;
    send(&mut ws, json!({"type":"open","conversation_id":more[1]})).await;
    assert_eq!(
        until(&mut ws, "snapshot").await["conversation"]["id"],
        more[1].as_str()
    );

    // Repeated abuse closes with 1008.
    let mut abuser = connect(srv.addr, &cookie).await;
    let mut closed = None;
    for _ in 0..10 {
        if abuser.send(Message::Text("nope".into())).await.is_err() {
            break;
        }
    }
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), abuser.next()).await {
        if let Ok(Message::Close(c)) = m {
            closed = c.map(|c| u16::from(c.code));
            break;
        }
    }
    assert_eq!(closed, Some(1008));

    // An oversized frame closes with 1009.
    let mut big = connect(srv.addr, &cookie).await;
    let _ = big.send(Message::Text("x".repeat(300 * 1024).into())).await;
    let mut code = None;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), big.next()).await {
        if let Ok(Message::Close(c)) = m {
            code = c.map(|c| u16::from(c.code));
            break;
        }
    }
    assert_eq!(code, Some(1009));

    // An abrupt disconnect mid-stream: the server goes on serving, the answer is stored.
    // (Another user: this one has used up its messages for the minute.)
    let cookie = visitor(srv.addr).await;
    let mut quitter = connect(srv.addr, &cookie).await;
    let id2 = create(&mut quitter, 16).await;
    send(
        &mut quitter,
        json!({"type":"send","conversation_id":id2,"content":"Hi there"}),
    )
    .await;
    until(&mut quitter, "delta").await;
    drop(quitter);
    let mut again = connect(srv.addr, &cookie).await;
    send(&mut again, json!({"type":"open","conversation_id":id2})).await;
    let snap = until(&mut again, "snapshot").await;
    assert_eq!(snap["messages"][0]["content"], "Hi there");
    assert_eq!(
        reqwest::get(format!("http://{}/healthz", srv.addr))
            .await
            .unwrap()
            .status(),
        200
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_origin_page_can_neither_open_the_socket_nor_change_conversations() {
    let srv = server("origin", SchedulerConfig::cpu(), limits()).await;
    let cookie = visitor(srv.addr).await;
    let mut req = format!("ws://{}/ws", srv.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    req.headers_mut()
        .insert("origin", "http://evil.example".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    // Nor may a page of that origin change anything with the visitor's cookie (a form can
    // POST cross-origin without asking), while reading stays the visitor's own business.
    let http = reqwest::Client::new();
    let api = format!("http://{}/api/conversations", srv.addr);
    let forged = http
        .post(&api)
        .header("cookie", &cookie)
        .header("origin", "http://evil.example")
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let own = http
        .post(&api)
        .header("cookie", &cookie)
        .header("origin", format!("http://{}", srv.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 201);
    let id = own.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for forged in [
        http.patch(format!("{api}/{id}"))
            .body(r#"{"title":"pwned"}"#),
        http.delete(format!("{api}/{id}")),
    ] {
        let r = forged
            .header("cookie", &cookie)
            .header("origin", "http://evil.example")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    }
    let listed: Value = get_json(&http, &api, &cookie).await;
    let listed = &listed["conversations"];
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["title"], "", "{listed}");
    let req = format!("ws://{}/ws", srv.addr)
        .into_client_request()
        .unwrap();
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("401"), "no token: {err}");
    // A program with a bearer token (no Origin) is let in, and so is the REST API.
    let user = srv.store.create_user().await.unwrap();
    let token = srv.store.create_login(user).await.unwrap();
    let mut req = format!("ws://{}/ws", srv.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(next(&mut ws).await["user_id"], user.to_string());
    let r = reqwest::Client::new()
        .get(format!("http://{}/api/conversations", srv.addr))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    srv.shutdown().await;
}

/// The value of a Prometheus sample line `name value` (0 when absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_only_their_token_when_one_is_set() {
    let srv = smolchat::server::start(ServerConfig {
        metrics_token: Some("scrape-s3cret".into()),
        ..config("metrics-token", SchedulerConfig::cpu(), limits())
    })
    .await
    .unwrap();
    let user = visitor(srv.addr).await;
    let user_token = user.trim_start_matches("smolchat_token=").to_owned();
    let client = reqwest::Client::new();
    let get = |auth: Option<String>| {
        let mut r = client.get(format!("http://{}/metrics", srv.addr));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    for auth in [
        None,
        Some("Bearer wrong".to_owned()),
        Some("Bearer scrape-s3cre".to_owned()),
        Some(format!("Bearer {user_token}")),
        Some("Basic c2NyYXBlLXMzY3JldA==".to_owned()),
    ] {
        let r = get(auth.clone()).await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized");
    }
    let r = get(Some("Bearer scrape-s3cret".into())).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    // The rest of the server does not ask for it.
    let r = reqwest::get(format!("http://{}/healthz", srv.addr))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_goes_503_while_the_queue_is_full_and_metrics_count() {
    let sched = SchedulerConfig {
        max_running: 1,
        max_queue: 1,
        ..SchedulerConfig::cpu()
    };
    let srv = server("ready", sched, limits()).await;
    let url = |p: &str| format!("http://{}{p}", srv.addr);
    let metrics = || async {
        reqwest::get(url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // Counters are process-wide and other tests move them too: compare increases.
    let before = metrics().await;
    assert_eq!(reqwest::get(url("/readyz")).await.unwrap().status(), 200);
    let cookie = visitor(srv.addr).await;
    let mut ws = connect(srv.addr, &cookie).await;
    let a = create(&mut ws, 400).await;
    let b = create(&mut ws, 400).await;
    send(
        &mut ws,
        json!({"type":"send","conversation_id":a,"content":"Write a long story."}),
    )
    .await;
    for _ in 0..3 {
        until(&mut ws, "delta").await;
    }
    send(
        &mut ws,
        json!({"type":"send","conversation_id":b,"content":"Write another long story."}),
    )
    .await;
    let mut deltas = 3;
    loop {
        match next(&mut ws).await["type"].as_str() {
            Some("delta") => deltas += 1,
            Some("message_started") => break,
            _ => {}
        }
    }
    // b's answer waits behind a's, and the page is told so.
    loop {
        let v = next(&mut ws).await;
        match v["type"].as_str() {
            Some("delta") => deltas += 1,
            Some("queued") => {
                assert_eq!(v["conversation_id"], json!(b), "{v}");
                assert_eq!(v["ahead"], 0, "{v}");
                break;
            }
            _ => {}
        }
    }
    // A tab opened now learns it from the snapshot.
    let mut tab = connect(srv.addr, &cookie).await;
    send(&mut tab, json!({"type":"open","conversation_id":b})).await;
    let snap = until(&mut tab, "snapshot").await;
    assert_eq!(snap["streaming"]["ahead"], 0, "{snap}");
    assert_eq!(reqwest::get(url("/readyz")).await.unwrap().status(), 503);
    ws.send(Message::Text("{oops".into())).await.unwrap();
    until(&mut ws, "error").await;
    send(&mut ws, json!({"type":"stop","conversation_id":a})).await;
    send(&mut ws, json!({"type":"stop","conversation_id":b})).await;

    let text = metrics().await;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (name, value) = line.rsplit_once(' ').expect("name value");
        assert!(value.parse::<f64>().is_ok(), "not a number: {line}");
        assert!(name.chars().next().unwrap().is_ascii_alphabetic(), "{line}");
    }
    let grew = |name: &str| metric(&text, name) - metric(&before, name);
    assert!(grew("smolchat_ws_messages_total") >= 5.0, "{text}");
    assert!(
        grew("smolchat_errors_total{code=\"invalid_json\"}") >= 1.0,
        "{text}"
    );
    assert!(
        // The first token comes from the prefill step.
        grew("smolchat_model_decode_tokens_total") >= (deltas - 1) as f64,
        "{deltas} deltas seen: {text}"
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sockets_with_1001_and_keeps_the_partial_answer() {
    let srv = server("shutdown", SchedulerConfig::cpu(), limits()).await;
    let cookie = visitor(srv.addr).await;
    let mut ws = connect(srv.addr, &cookie).await;
    let id = create(&mut ws, 2000).await;
    send(
        &mut ws,
        json!({"type":"send","conversation_id":id,"content":"Write a very long story."}),
    )
    .await;
    let mut streamed = String::new();
    for _ in 0..5 {
        streamed.push_str(until(&mut ws, "delta").await["text"].as_str().unwrap());
    }
    let store = srv.store.clone();
    let started = std::time::Instant::now();
    srv.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let mut code = None;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        if let Ok(Message::Close(c)) = m {
            code = c.map(|c| u16::from(c.code));
            break;
        }
    }
    assert_eq!(code, Some(1001));
    // The answer so far is stored, marked interrupted (the session's own last write: it holds
    // at least what was streamed).
    let user = store
        .user_for_token(cookie.split_once('=').unwrap().1)
        .await
        .unwrap()
        .expect("the visitor's user");
    let branch = store.branch(user, id.parse().unwrap(), None).await.unwrap();
    assert_eq!(branch.len(), 2);
    let answer = &branch[1];
    assert_eq!(answer.status, smolchat::store::MessageStatus::Interrupted);
    assert!(
        !streamed.is_empty() && answer.content.starts_with(&streamed),
        "stored {:?}, streamed {streamed:?}",
        answer.content
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxys_basic_auth_leaves_the_cookie_to_speak_and_dropped_upgrades_give_their_sockets_back(
) {
    let srv = server(
        "proxy",
        SchedulerConfig::cpu(),
        Limits {
            sockets_per_user: 2,
            ..limits()
        },
    )
    .await;
    let cookie = visitor(srv.addr).await;
    // Behind a proxy with basic auth every request carries `Authorization: Basic`: the cookie
    // still says who it is (no second identity, no new cookie).
    let basic = "Basic dXNlcjpwYXNzd29yZA==";
    let http = reqwest::Client::new();
    let r = http
        .get(format!("http://{}/", srv.addr))
        .header("cookie", &cookie)
        .header("authorization", basic)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert!(r.headers().get("set-cookie").is_none(), "the same visitor");
    let listed = http
        .get(format!("http://{}/api/conversations", srv.addr))
        .header("cookie", &cookie)
        .header("authorization", basic)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    let hello_user = |mut ws: Ws| async move {
        let hello = next(&mut ws).await;
        (hello["user_id"].as_str().unwrap().to_owned(), ws)
    };
    let (me, first) = hello_user(connect_raw(srv.addr, &cookie, None).await).await;
    let (behind_proxy, second) =
        hello_user(connect_raw(srv.addr, &cookie, Some(basic)).await).await;
    assert_eq!(me, behind_proxy);
    drop((first, second));

    // Clients that ask for an upgrade and reset the connection at once: whether or not the
    // upgrade completes, each socket slot comes back.
    for _ in 0..6 {
        use tokio::io::AsyncWriteExt;
        let mut tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {0}\r\nOrigin: http://{0}\r\nCookie: {cookie}\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            srv.addr
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        tcp.set_zero_linger().unwrap();
        drop(tcp); // RST
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a = connect(srv.addr, &cookie).await;
    let b = connect(srv.addr, &cookie).await;
    let mut req = format!("ws://{}/ws", srv.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(
        err.to_string().contains("429"),
        "the limit still holds: {err}"
    );
    drop((a, b));
    srv.shutdown().await;
}

/// A socket with the cookie (and `authorization`, if given), before its `hello` is read.
async fn connect_raw(addr: SocketAddr, cookie: &str, authorization: Option<&str>) -> Ws {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    if let Some(a) = authorization {
        req.headers_mut()
            .insert("authorization", a.parse().unwrap());
    }
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws
}

/// GET `url` with the visitor's cookie, as JSON.
async fn get_json(http: &reqwest::Client, url: impl reqwest::IntoUrl, cookie: &str) -> Value {
    http.get(url)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_gives_its_socket_back() {
    use smolchat::store::{MessageStatus, Role, Settings};
    let srv = server(
        "deaf",
        SchedulerConfig::cpu(),
        Limits {
            sockets_per_user: 1,
            write_timeout: Duration::from_secs(1),
            ..limits()
        },
    )
    .await;
    // A conversation whose snapshot is 8 MB: a few of them fill any socket buffer.
    let user = srv.store.create_user().await.unwrap();
    let token = srv.store.create_login(user).await.unwrap();
    let conv = srv
        .store
        .create_conversation(user, "big", "", &Settings::default(), false)
        .await
        .unwrap()
        .id;
    let mut parent = None;
    for i in 0..8 {
        let role = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        let text = "x".repeat(1 << 20);
        let m = srv
            .store
            .add_message(user, conv, parent, role, &text, MessageStatus::Complete)
            .await
            .unwrap();
        parent = Some(m.id);
    }
    let request = || {
        let mut req = format!("ws://{}/ws", srv.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        req
    };
    // A client with a small receive buffer that asks for the snapshot again and again and
    // never reads.
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(4096).unwrap();
    let stream = tcp.connect(srv.addr).await.unwrap();
    let (mut deaf, _) = tokio_tungstenite::client_async(request(), stream)
        .await
        .unwrap();
    let open = json!({"type":"open","conversation_id":conv}).to_string();
    for _ in 0..4 {
        if deaf.send(Message::Text(open.clone().into())).await.is_err() {
            break;
        }
    }
    // Its one socket slot is taken meanwhile; once the server gives up writing to it, the slot
    // comes back and the same user gets in again.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (mut again, _) = loop {
        match tokio_tungstenite::connect_async(request()).await {
            Ok(ws) => break ws,
            Err(e) => {
                assert!(e.to_string().contains("429"), "{e}");
                assert!(
                    std::time::Instant::now() < deadline,
                    "the deaf socket was never dropped"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(next(&mut again).await["type"], "hello");
    drop(deaf);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_from_two_sockets_at_once_are_held_to_the_generation_limit_together() {
    let (srv, mut a, mut b) = one_user_two_sockets(
        "together",
        Limits {
            concurrent_generations: 1,
            ..limits()
        },
    )
    .await;
    let (ca, cb) = (create(&mut a, 6).await, create(&mut b, 6).await);
    for round in 0..6 {
        let ask = |conv: &str| {
            json!({"type":"send","request_id":format!("r{round}"),
                "conversation_id":conv,"content":"Say one word."})
        };
        tokio::join!(send(&mut a, ask(&ca)), send(&mut b, ask(&cb)));
        let rid = format!("r{round}");
        let (ra, rb) = (reply_to(&mut a, &rid).await, reply_to(&mut b, &rid).await);
        let started = [&ra, &rb].iter().filter(|c| c.as_str() == "ok").count();
        assert!(
            started <= 1,
            "round {round}: {ra} and {rb} at a limit of one"
        );
        for (ws, r) in [(&mut a, &ra), (&mut b, &rb)] {
            if r == "ok" {
                until_done(ws).await;
            } else {
                assert_eq!(r, "too_many_generations");
            }
        }
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_refused_at_the_generation_limit_uses_up_no_message_of_the_minute() {
    let (srv, mut a, mut b) = one_user_two_sockets(
        "refused-free",
        Limits {
            concurrent_generations: 1,
            messages_per_minute: 3,
            ..limits()
        },
    )
    .await;
    let (ca, cb) = (create(&mut a, 2000).await, create(&mut b, 8).await);
    let ask = |conv: &str, rid: &str| {
        json!({"type":"send","request_id":rid,"conversation_id":conv,
            "content":"Count from 1 to 1000, separated by commas."})
    };
    send(&mut a, ask(&ca, "long")).await;
    assert_eq!(reply_to(&mut a, "long").await, "ok");
    // Three refusals while the long answer runs, with two messages of the minute left: were
    // refusals counted, the third would be rate_limited.
    for i in 0..3 {
        let rid = format!("r{i}");
        send(&mut b, ask(&cb, &rid)).await;
        assert_eq!(reply_to(&mut b, &rid).await, "too_many_generations");
    }
    send(&mut a, json!({"type":"stop","conversation_id":ca})).await;
    until_done(&mut a).await;
    send(&mut b, ask(&cb, "after")).await;
    assert_eq!(reply_to(&mut b, "after").await, "ok");
    until_done(&mut b).await;
    // And the limit still holds: two sent, the third of the minute goes, the fourth not.
    send(&mut b, ask(&cb, "third")).await;
    assert_eq!(reply_to(&mut b, "third").await, "ok");
    until_done(&mut b).await;
    send(&mut b, ask(&cb, "fourth")).await;
    assert_eq!(reply_to(&mut b, "fourth").await, "rate_limited");
    srv.shutdown().await;
}

/// A CPU server with `limits`, and two sockets of one visitor on it.
async fn one_user_two_sockets(name: &str, limits: Limits) -> (RunningServer, Ws, Ws) {
    let srv = server(name, SchedulerConfig::cpu(), limits).await;
    let cookie = visitor(srv.addr).await;
    let (a, b) = (
        connect(srv.addr, &cookie).await,
        connect(srv.addr, &cookie).await,
    );
    (srv, a, b)
}

/// The code of the answer to request `rid` ("ok" for an ack).
async fn reply_to(ws: &mut Ws, rid: &str) -> String {
    loop {
        let v = next(ws).await;
        if v["request_id"] == rid {
            return v["code"].as_str().unwrap_or("ok").to_owned();
        }
    }
}

/// Rows of `table` in a server's database file.
async fn rows(name: &str, table: &str) -> i64 {
    common::rows_in(&data_dir(name).join("smolchat.db"), table).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_views_store_nothing_and_a_user_keeps_at_most_so_many_conversations() {
    let srv = server(
        "visitors",
        SchedulerConfig::cpu(),
        Limits {
            conversations_per_user: 2,
            ..limits()
        },
    )
    .await;
    // A crawler: fifty page views, fifty cookies, no rows.
    let mut cookies = Vec::new();
    for _ in 0..50 {
        cookies.push(visitor(srv.addr).await);
    }
    let cookie = cookies.pop().unwrap();
    assert_eq!(rows("visitors", "users").await, 0);
    assert_eq!(rows("visitors", "login_sessions").await, 0);
    // The visitor is someone all the same: the socket greets them, the list is theirs (empty).
    let mut ws = connect(srv.addr, &cookie).await;
    let http = reqwest::Client::new();
    let api = format!("http://{}/api/conversations", srv.addr);
    let listed = get_json(&http, &api, &cookie).await;
    assert_eq!(listed["conversations"], json!([]), "{listed}");
    assert_eq!(rows("visitors", "users").await, 0);
    // The first conversation stores the user.
    create(&mut ws, 8).await;
    assert_eq!(rows("visitors", "users").await, 1);
    assert_eq!(
        rows("visitors", "login_sessions").await,
        1,
        "the cookie is their login"
    );
    let post = || {
        http.post(&api)
            .header("cookie", &cookie)
            .header("origin", format!("http://{}", srv.addr))
            .send()
    };
    assert_eq!(post().await.unwrap().status(), 201);
    let refused = post().await.unwrap();
    assert_eq!(refused.status(), 409);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "too_many_conversations", "{body}");
    send(&mut ws, json!({"type":"create","request_id":"c3"})).await;
    let v = until(&mut ws, "error").await;
    assert_eq!(v["code"], "too_many_conversations", "{v}");
    assert_eq!(v["request_id"], "c3", "{v}");
    assert_eq!(rows("visitors", "conversations").await, 2);
    // A cookie with someone else's id under this visitor's signature is nobody.
    let (body, sig) = cookie.rsplit_once('.').unwrap();
    let (name, _) = body.split_once("=v1.").unwrap();
    let nonce = body.rsplit_once('.').unwrap().1;
    let forged = format!("{name}=v1.{}.{nonce}.{sig}", smolchat::store::UserId::new());
    let r = http
        .get(&api)
        .header("cookie", &forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    srv.shutdown().await;
}

/// POST /api/conversations for `cookie`, as a browser behind a proxy that wrote `forwarded`.
async fn create_from(
    srv: &RunningServer,
    cookie: &str,
    forwarded: &str,
    body: Value,
) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{}/api/conversations", srv.addr))
        .header("cookie", cookie)
        .header("origin", format!("http://{}", srv.addr))
        .header("x-forwarded-for", forwarded)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_users_are_limited_per_address_an_hour() {
    let lim = Limits {
        new_users_per_address_per_hour: 2,
        ..limits()
    };
    let srv = smolchat::server::start(ServerConfig {
        trust_forwarded_for: true,
        ..config("new-users", SchedulerConfig::cpu(), lim.clone())
    })
    .await
    .unwrap();
    let mut cookies = Vec::new();
    for _ in 0..8 {
        cookies.push(visitor(srv.addr).await);
    }
    let (a, b, c, d, e, f, g) = (
        &cookies[0],
        &cookies[1],
        &cookies[2],
        &cookies[3],
        &cookies[4],
        &cookies[5],
        &cookies[6],
    );
    let one = "198.51.100.1";
    assert_eq!(create_from(&srv, a, one, json!({})).await.0, 201);
    assert_eq!(create_from(&srv, b, one, json!({})).await.0, 201);
    let (status, body) = create_from(&srv, c, one, json!({})).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "too_many_new_users", "{body}");
    assert_eq!(
        rows("new-users", "users").await,
        2,
        "the third is not stored"
    );
    // A user stored already is not new: more conversations from the same address.
    assert_eq!(create_from(&srv, a, one, json!({})).await.0, 201);
    // Only the entry the proxy appended counts; the ones before it are the client's to write.
    let (status, _) = create_from(&srv, c, &format!("{one}, 203.0.113.9"), json!({})).await;
    assert_eq!(status, 201, "the proxy saw another address");
    let (status, _) = create_from(&srv, d, &format!("203.0.113.9, {one}"), json!({})).await;
    assert_eq!(status, 429, "the client wrote the other address itself");
    // Over the socket the same: the refusal names its code and stores no one.
    let mut req = format!("ws://{}/ws", srv.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("cookie", d.parse().unwrap());
    req.headers_mut()
        .insert("x-forwarded-for", one.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    until(&mut ws, "hello").await;
    send(&mut ws, json!({"type":"create","request_id":"n1"})).await;
    let v = until(&mut ws, "error").await;
    assert_eq!(v["code"], "too_many_new_users", "{v}");
    assert_eq!(v["request_id"], "n1", "{v}");
    assert_eq!(rows("new-users", "users").await, 3);
    // A creation refused for its own reasons gives its place back.
    let two = "2001:db8:5:6::1";
    let bad = json!({"settings":{"temperature":-1.0}});
    assert_eq!(create_from(&srv, e, two, bad).await.0, 400);
    assert_eq!(create_from(&srv, e, two, json!({})).await.0, 201);
    // Another address in the same /64 is the same subscriber.
    assert_eq!(
        create_from(&srv, f, "2001:db8:5:6::2", json!({})).await.0,
        201
    );
    assert_eq!(
        create_from(&srv, g, "2001:db8:5:6:ff::3", json!({}))
            .await
            .0,
        429
    );
    assert_eq!(rows("new-users", "users").await, 5);
    assert_eq!(rows("new-users", "conversations").await, 6);
    srv.shutdown().await;

    // Not behind a trusted proxy, the header is anyone's to write: the peer's address counts.
    let srv = smolchat::server::start(config("new-users-2", SchedulerConfig::cpu(), lim))
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for i in 0..3 {
        let cookie = visitor(srv.addr).await;
        let forwarded = format!("198.51.100.{i}");
        statuses.push(create_from(&srv, &cookie, &forwarded, json!({})).await.0);
    }
    assert_eq!(statuses, [201, 201, 429]);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_signs_another_browser_in_and_its_conversations_go_on_there() {
    let srv = server("link", SchedulerConfig::cpu(), limits()).await;
    let http = reqwest::Client::new();
    let origin = format!("http://{}", srv.addr);
    let post = |path: &str, cookie: &str, body: Value| {
        http.post(format!("http://{}{path}", srv.addr))
            .header("cookie", cookie)
            .header("origin", &origin)
            .json(&body)
            .send()
    };
    let alice = visitor(srv.addr).await;
    let carol = visitor(srv.addr).await;
    let r = post("/api/link", &alice, json!({})).await.unwrap();
    assert_eq!(r.status(), 409, "nothing to take along yet");
    let mut a = connect(srv.addr, &alice).await;
    create(&mut a, 8).await;
    // Carol chats in her browser; her conversation's session stays open for her.
    let mut c = connect(srv.addr, &carol).await;
    let hers = create(&mut c, 8).await;
    send(
        &mut c,
        json!({"type":"send","conversation_id":hers,"content":"My colour is teal."}),
    )
    .await;
    until_done(&mut c).await;

    let r = post("/api/link", &alice, json!({})).await.unwrap();
    assert_eq!(r.status(), 201);
    let code = r.json::<Value>().await.unwrap()["code"]
        .as_str()
        .unwrap()
        .to_owned();
    // Another site cannot sign Carol's browser in (nor take her conversations).
    let r = http
        .post(format!("http://{}/api/link/redeem", srv.addr))
        .header("cookie", &carol)
        .header("origin", "http://evil.example")
        .json(&json!({"code": code, "merge": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = post("/api/link/redeem", &carol, json!({"code": code}))
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "would_hide_conversations", "{body}");
    let r = post(
        "/api/link/redeem",
        &carol,
        json!({"code": code, "merge": true}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.contains("HttpOnly"), "{set}");
    let linked = set.split(';').next().unwrap().to_owned();
    assert_ne!(linked, carol);
    // Carol's socket, opened with the login this browser no longer has, is told so.
    assert_eq!(close_code(&mut c).await, 4401);
    let r = http
        .get(format!("{origin}/api/conversations"))
        .header("cookie", &carol)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the browser's old login went");

    // Alice sees both conversations, from either browser.
    for cookie in [&alice, &linked] {
        let list = get_json(&http, format!("{origin}/api/conversations"), cookie).await;
        assert_eq!(list["conversations"].as_array().unwrap().len(), 2, "{list}");
    }
    // Carol's conversation goes on in the linked browser (its old session acted for Carol,
    // who owns it no more: a new one takes over).
    let mut l = connect(srv.addr, &linked).await;
    send(&mut l, json!({"type":"open","conversation_id":hers})).await;
    let snap = until(&mut l, "snapshot").await;
    assert_eq!(snap["messages"].as_array().unwrap().len(), 2, "{snap}");
    send(
        &mut l,
        json!({"type":"send","conversation_id":hers,"content":"And yours?"}),
    )
    .await;
    let (_, done) = until_done(&mut l).await;
    assert_eq!(done["status"], "complete", "{done}");
    let one = get_json(&http, format!("{origin}/api/conversations/{hers}"), &linked).await;
    assert_eq!(one["messages"].as_array().unwrap().len(), 4, "{one}");

    // Alice signs her other browsers out: their sockets close, their cookies are nobody's.
    let r = post("/api/logins/sign-out-others", &alice, json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["signed_out"], 1, "the linked browser: {body}");
    assert_eq!(close_code(&mut l).await, 4401);
    let r = http
        .get(format!("{origin}/api/conversations"))
        .header("cookie", &linked)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    send(&mut a, json!({"type":"open","conversation_id":hers})).await;
    until(&mut a, "snapshot").await;
    let list = get_json(&http, format!("{origin}/api/conversations"), &alice).await;
    assert_eq!(list["conversations"].as_array().unwrap().len(), 2, "{list}");

    // A browser that never stored anything signs in too: its other tab, open as the visitor
    // it was, is told so (that visitor's token names no one now).
    let dave = visitor(srv.addr).await;
    let mut d = connect(srv.addr, &dave).await;
    let r = post("/api/link", &alice, json!({})).await.unwrap();
    let code = r.json::<Value>().await.unwrap()["code"].clone();
    let r = post("/api/link/redeem", &dave, json!({ "code": code }))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(close_code(&mut d).await, 4401);
    srv.shutdown().await;
}

/// A browser that redeems a link with `merge` while one of its tabs sends: the question is
/// stored with its answer, or not at all, whichever comes first; never a question on its own
/// (its conversation moved between the question's write and its answer's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_and_a_send_at_once_never_leave_a_question_without_its_answer() {
    let name = "move-race";
    let srv = server(name, SchedulerConfig::cpu(), limits()).await;
    let http = reqwest::Client::new();
    let origin = format!("http://{}", srv.addr);
    let post = |path: &str, cookie: &str, body: Value| {
        http.post(format!("{origin}{path}"))
            .header("cookie", cookie)
            .header("origin", &origin)
            .json(&body)
            .send()
    };
    let alice = visitor(srv.addr).await;
    let mut a = connect(srv.addr, &alice).await;
    create(&mut a, 4).await;
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    let both = |o: &std::collections::BTreeMap<String, usize>| {
        ["200", "409"].map(|s| o.keys().any(|k| k.starts_with(s))) == [true, true]
    };
    // 24 trials, and more (up to 96) until both ways round have been seen on a slow host.
    for n in 0..96u64 {
        if n >= 24 && both(&outcomes) {
            break;
        }
        let trial = n % 24;
        let carol = visitor(srv.addr).await;
        let mut c = connect(srv.addr, &carol).await;
        let conv = create(&mut c, 4).await;
        let r = post("/api/link", &alice, json!({})).await.unwrap();
        assert_eq!(r.status(), 201);
        let code = r.json::<Value>().await.unwrap()["code"].clone();
        let ask = json!({"type":"send","request_id":"q","conversation_id":conv,"content":"Hi!"});
        // The move starts up to 10 ms before the send, or after it: each time at another
        // point of the other's way.
        let lead = Duration::from_micros(800 * trial.abs_diff(12));
        let (_, r) = tokio::join!(
            async {
                if trial < 12 {
                    tokio::time::sleep(lead).await;
                }
                send(&mut c, ask).await
            },
            async {
                if trial >= 12 {
                    tokio::time::sleep(lead).await;
                }
                post(
                    "/api/link/redeem",
                    &carol,
                    json!({"code": code, "merge": true}),
                )
                .await
                .unwrap()
            }
        );
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        let reply = reply_or_close(&mut c, "q").await;
        match status {
            200 => {}
            409 => assert_eq!(body["code"], "already_generating", "{body}"),
            _ => panic!("trial {trial}: {status} {body}"),
        }
        *outcomes.entry(format!("{status} / {reply}")).or_default() += 1;
    }
    eprintln!("move / send outcomes: {outcomes:?}");
    // Both ways round were tried: moves that went through, and moves refused for a send.
    assert!(both(&outcomes), "{outcomes:?}");
    let alone = "messages u WHERE u.role = 'user' \
                 AND NOT EXISTS (SELECT 1 FROM messages a WHERE a.parent_id = u.id)";
    assert_eq!(rows(name, alone).await, 0, "{outcomes:?}");
    assert!(rows(name, "messages WHERE role = 'user'").await > 0);
    srv.shutdown().await;
}

/// The code of the answer to request `rid` ("ok" for an ack), or `closed …` when the socket
/// closes first.
async fn reply_or_close(ws: &mut Ws, rid: &str) -> String {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("a reply in time");
        match m {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["request_id"] == rid {
                    return v["code"].as_str().unwrap_or("ok").to_owned();
                }
            }
            Some(Ok(Message::Close(f))) => {
                return format!("closed {:?}", f.map(|f| u16::from(f.code)))
            }
            Some(Ok(_)) => continue,
            other => return format!("ended {other:?}"),
        }
    }
}

/// The close code the server ends the socket with (events before it are skipped).
async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("closed in time");
        match m {
            Some(Ok(Message::Close(Some(f)))) => return f.code.into(),
            Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket error: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conversation_list_comes_in_pages() {
    let srv = server("pages", SchedulerConfig::cpu(), limits()).await;
    let http = reqwest::Client::new();
    let api = format!("http://{}/api/conversations", srv.addr);
    let alice = visitor(srv.addr).await;
    let mallory = visitor(srv.addr).await;
    for i in 0..7 {
        let (status, _) = create_from(&srv, &alice, "", json!({"title": format!("c{i}")})).await;
        assert_eq!(status, 201);
    }
    create_from(&srv, &mallory, "", json!({"title": "mine"})).await;
    let titles = |v: &Value| -> Vec<String> {
        v["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["title"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = get_json(&http, &api, &alice).await;
    assert_eq!(all["next"], Value::Null);
    let all = titles(&all);
    assert_eq!(all.len(), 7);
    let mut paged = Vec::new();
    let mut url = format!("{api}?limit=3");
    loop {
        let page = get_json(&http, &url, &alice).await;
        assert!(titles(&page).len() <= 3, "{page}");
        paged.extend(titles(&page));
        match page["next"].as_str() {
            Some(next) => url = format!("{api}?limit=3&after={next}"),
            None => break,
        }
    }
    assert_eq!(paged, all, "pages in order, none skipped or repeated");
    // Exactly one full page: no `next` that leads nowhere.
    let seven = get_json(&http, format!("{api}?limit=7"), &alice).await;
    assert_eq!((titles(&seven).len(), &seven["next"]), (7, &Value::Null));
    // Alice's cursor shows Mallory only her own.
    let first = get_json(&http, format!("{api}?limit=1"), &alice).await;
    let next = first["next"].as_str().unwrap();
    let theirs = get_json(&http, format!("{api}?after={next}"), &mallory).await;
    assert!(titles(&theirs).iter().all(|t| t == "mine"), "{theirs}");
    // A parameter the list does not know is ignored, as before there were pages.
    let busted = get_json(&http, format!("{api}?_=12345"), &alice).await;
    assert_eq!(titles(&busted), all);
    for query in [
        "limit=0",
        "limit=5001",
        "limit=x",
        "after=nope",
        "after=1_2",
    ] {
        let r = http
            .get(format!("{api}?{query}"))
            .header("cookie", &alice)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], "invalid_request", "{query}");
    }
    srv.shutdown().await;
}
