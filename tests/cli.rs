//! The command line as scripts use it: one JSON object on the last line of stdout, and clear
//! errors (never a panic) for missing or broken model files.

mod common;

use std::process::{Command, Output};

use serde_json::Value;

fn smolchat(args: &[&str]) -> Output {
    let model = common::default_model_path();
    Command::new(env!("CARGO_BIN_EXE_smolchat"))
        .arg("--model")
        .arg(&model)
        .args(args)
        .output()
        .expect("run smolchat")
}

fn last_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("a line")).expect("JSON on the last line")
}

#[test]
fn tokenize_with_and_without_special_tokens() {
    let with = last_json(&smolchat(&["tokenize", "--", "<|im_start|>user 2024"]));
    let ids: Vec<u64> = with["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(ids[0], 1, "<|im_start|> is one special token");
    assert_eq!(
        ids.iter().filter(|&&i| (32..42).contains(&i)).count(),
        4,
        "digits one by one: {ids:?}"
    );
    let plain = last_json(&smolchat(&[
        "tokenize",
        "--no-special",
        "--",
        "<|im_start|>user 2024",
    ]));
    assert_ne!(plain["ids"][0], 1);
}

#[test]
fn render_logits_and_generate_agree() {
    let dir = tempdir();
    let file = dir.join("messages.json");
    std::fs::write(&file, r#"[{"role":"user","content":"What is 2+2?"}]"#).unwrap();
    let r = last_json(&smolchat(&["render", "--messages", file.to_str().unwrap()]));
    let text = r["text"].as_str().unwrap();
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
    let ids: Vec<String> = r["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let ids = ids.join(",");

    let logits = last_json(&smolchat(&["logits", "--ids", &ids, "--top", "3"]));
    let positions = logits["positions"].as_array().unwrap();
    assert_eq!(positions.len(), r["ids"].as_array().unwrap().len());
    let top = &positions.last().unwrap()["top"];
    assert_eq!(top.as_array().unwrap().len(), 3);
    assert!(
        top[0][1].as_f64().unwrap() >= top[1][1].as_f64().unwrap(),
        "best first"
    );

    let g = last_json(&smolchat(&[
        "generate",
        "--ids",
        &ids,
        "--max-tokens",
        "8",
        "--json",
    ]));
    // Greedy: the first generated token is the top logit at the last prompt position.
    assert_eq!(g["ids"][0], top[0][0]);
    assert!(g["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(!g["text"].as_str().unwrap().is_empty());
}

#[test]
fn generate_is_reproducible_with_a_seed() {
    let args = [
        "generate",
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "12",
        "--temperature",
        "1.0",
        "--seed",
        "7",
        "--json",
    ];
    let a = last_json(&smolchat(&args));
    let b = last_json(&smolchat(&args));
    assert_eq!(a["ids"], b["ids"]);
    assert_eq!(a["ids"].as_array().unwrap().len(), 12);
}

#[test]
fn perplexity_of_plain_english_is_sane() {
    let dir = tempdir();
    let file = dir.join("text.txt");
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    std::fs::write(&file, text).unwrap();
    let p = last_json(&smolchat(&[
        "perplexity",
        "--file",
        file.to_str().unwrap(),
        "--ctx",
        "128",
    ]));
    let ppl = p["perplexity"].as_f64().unwrap();
    // A repeated sentence is easy to predict from its second half on.
    assert!(ppl > 1.0 && ppl < 3.0, "perplexity {ppl}");
    assert!(p["tokens"].as_u64().unwrap() > 0);
    // The same with 8-bit keys and values: close, and not the same computation.
    let args = [
        "perplexity",
        "--file",
        file.to_str().unwrap(),
        "--ctx",
        "128",
    ];
    // And with 4-bit values.
    for format in ["q8", "k8v4"] {
        let q = last_json(&smolchat(&[&["--kv-cache", format], &args[..]].concat()));
        let pq = q["perplexity"].as_f64().unwrap();
        assert!(
            pq != ppl && (pq / ppl - 1.0).abs() < 0.05,
            "{format}: {pq} vs {ppl}"
        );
    }
    let bad = smolchat(&[&["--kv-cache", "q4"], &args[..]].concat());
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("possible values: f16, q8, k8v4"));
}

#[test]
fn missing_and_broken_models_get_clear_errors() {
    let dir = tempdir();
    let missing = dir.join("nope.gguf");
    let out = Command::new(env!("CARGO_BIN_EXE_smolchat"))
        .args(["--model", missing.to_str().unwrap(), "tokenize", "--", "hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fetch-model") && !err.contains("panicked"),
        "{err}"
    );

    // A truncated copy of a real model.
    let real = std::fs::read(common::data("tiny-smollm3/tiny-smollm3-q8_0.gguf")).unwrap();
    for cut in [3usize, 100, 5000, real.len() / 2, real.len() - 1] {
        let broken = dir.join(format!("broken-{cut}.gguf"));
        std::fs::write(&broken, &real[..cut]).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_smolchat"))
            .args(["--model", broken.to_str().unwrap(), "tokenize", "--", "hi"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "cut at {cut}: {err}");
        assert!(
            err.contains("cannot be read") && !err.contains("panicked"),
            "cut at {cut}: {err}"
        );
    }
}

fn tempdir() -> std::path::PathBuf {
    common::scratch(&format!("cli-{:?}", std::thread::current().id()))
}

/// `smolchat load --json`'s rows, checked for `users × turns` finished turns and no failure.
fn load_rows(out: &Output, users: u64, turns: u64, max_tokens: u64) {
    let rows = last_json(out);
    let rows = rows.as_array().expect("a list of rows");
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r["users"], users);
    assert_eq!(r["turns_done"], users * turns, "{r}");
    assert_eq!(r["turns_failed"], 0, "{r}");
    let tokens = r["tokens"].as_u64().unwrap();
    assert!(tokens > 0 && tokens <= users * turns * max_tokens, "{r}");
    assert!(r["ttft_p50_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert!(
        r["aggregate_tokens_per_second"].as_f64().unwrap() > 0.0,
        "{r}"
    );
}

#[test]
fn load_chats_as_several_users_over_the_websocket_of_its_own_server() {
    let out = smolchat(&[
        "load",
        "--users",
        "3",
        "--turns",
        "2",
        "--max-tokens",
        "8",
        "--json",
    ]);
    load_rows(&out, 3, 2, 8);
}

#[test]
fn load_reaches_a_server_running_elsewhere_and_refuses_what_it_cannot_reach() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = common::scratch("cli-load");
    /// The `serve` process, stopped however the test ends.
    struct Server(std::process::Child, std::path::PathBuf);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let log = dir.with_extension("log");
    let server = Server(
        Command::new(env!("CARGO_BIN_EXE_smolchat"))
            .args(["--model", common::default_model_path().to_str().unwrap()])
            .args(["serve", "--port", &port.to_string(), "--data-dir"])
            .arg(&dir)
            // One answer at a time and one waiting: the rest are refused with `busy`.
            .args(["--max-running", "1", "--max-queue", "1"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the server"),
        dir,
    );
    let up = (0..1200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let url = format!("http://127.0.0.1:{port}");
    assert!(
        up,
        "the server listened within 120 s: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let load = |users: &str, turns: &str, max_tokens: &str| {
        smolchat(&[
            "load",
            "--url",
            &url,
            "--users",
            users,
            "--turns",
            turns,
            "--max-tokens",
            max_tokens,
            "--json",
        ])
    };
    load_rows(&load("1", "2", "8"), 1, 2, 8);
    // Four at once against one slot and one place in the queue: some are answered, the others
    // refused, and every turn is counted once.
    let out = load("4", "1", "64");
    let row = &last_json(&out)[0];
    let done = row["turns_done"].as_u64().unwrap();
    let failed = row["turns_failed"].as_u64().unwrap();
    assert!(done >= 1 && failed >= 1 && done + failed == 4, "{row}");
    drop(server);
    let _ = std::fs::remove_file(&log);

    let tls = smolchat(&["load", "--url", "https://example.org"]);
    assert!(!tls.status.success());
    assert!(String::from_utf8_lossy(&tls.stderr).contains("TLS"));
    let bad = smolchat(&["load", "--users", "0"]);
    assert!(!bad.status.success(), "no users is refused");
    let nobody = smolchat(&["load", "--url", &url, "--users", "1"]);
    assert!(!nobody.status.success(), "nothing listens there any more");
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("connecting to"));
}

fn ids_of(text: &str) -> String {
    let t = last_json(&smolchat(&["tokenize", "--no-special", "--", text]));
    let ids: Vec<String> = t["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    ids.join(",")
}

#[test]
fn several_prompts_generate_together_with_each_ones_own_tokens() {
    // One prompt longer than a prefill chunk (512), so its second chunk shares steps with the
    // others' decode rows.
    let prompts = [
        ids_of("The capital of France is"),
        ids_of(&"Count with me: one, two, three, four. ".repeat(60)),
        ids_of("Here is a short poem about the sea:"),
    ];
    assert!(prompts[1].split(',').count() > 512);
    let run = |ps: &[&String]| {
        let mut args = vec!["generate", "--max-tokens", "8", "--ignore-eos", "--json"];
        for p in ps {
            args.extend(["--ids", p.as_str()]);
        }
        last_json(&smolchat(&args))
    };
    let together = run(&prompts.iter().collect::<Vec<_>>());
    let seqs = together["sequences"].as_array().expect("one result each");
    assert_eq!(seqs.len(), 3);
    assert!(together["tokens_per_second"].as_f64().unwrap() > 0.0);
    for (p, packed) in prompts.iter().zip(seqs) {
        let alone = run(&[p]);
        // The CPU engine's packed rows compute exactly what a solo run does.
        assert_eq!(packed["ids"], alone["ids"], "prompt {p:.40}");
        assert_eq!(packed["ids"].as_array().unwrap().len(), 8);
        assert_eq!(packed["finish_reason"], "length");
        assert_eq!(packed["text"], alone["text"]);
    }

    // A bad prompt among good ones is refused before anything runs.
    let out = smolchat(&["generate", "--ids", &prompts[0], "--ids", " ", "--json"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("prompt 2 is empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = smolchat(&["generate", "--ids", "1,2,99999999"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("99999999"));
}

#[test]
fn backup_writes_a_new_file_and_never_overwrites_one() {
    let dir = common::scratch("cli-backup");
    let data = dir.join("data");
    let data = data.to_str().unwrap();
    let out = smolchat(&["token", "--data-dir", data]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copy = dir.join("copy.db");
    let copy = copy.to_str().unwrap();
    let out = smolchat(&["backup", "--data-dir", data, copy]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let size = std::fs::metadata(copy).unwrap().len();
    assert!(size > 0);
    let out = smolchat(&["backup", "--data-dir", data, copy]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("exists already"),
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(copy).unwrap().len(),
        size,
        "the copy was left as it was"
    );
}
