//! The engine against reference outputs that no one here wrote: Hugging Face transformers and
//! llama.cpp's tokenizer and converter (see tests/data/FIXTURES.md).

mod common;

use common::reference::{all_logits, check_smollm2, check_variant, packed_and_alone, SMOLLM2_TOL};
use common::{data, ids, json, jsonl};
use smolchat::engine::gguf::GgufFile;
use smolchat::engine::{Architecture, ChatMessage, Engine, Model};

#[test]
fn precise_mode_matches_transformers_tightly() {
    // With float activations only the f16 KV cache and summation order differ from the
    // reference: this pins RoPE, NoPE, attention and norms far tighter than the fast path can.
    let f = GgufFile::open(&data("tiny-smollm3/tiny-smollm3-q8_0.gguf")).unwrap();
    let mut model = Model::from_gguf(&f).unwrap();
    model.precise = true;
    let r = json("tiny-smollm3/reference.json");
    let mut worst = 0f32;
    for (seq, v) in r["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .zip(r["variants"]["q8_0_nope"].as_array().unwrap())
    {
        let ours = all_logits(&model, &ids(&seq["ids"]));
        for (row, refp) in ours.iter().zip(v["positions"].as_array().unwrap()) {
            for (id, l) in ids(&refp["top_ids"])
                .iter()
                .zip(refp["top_logits"].as_array().unwrap())
            {
                worst = worst.max((row[*id as usize] - l.as_f64().unwrap() as f32).abs());
            }
        }
    }
    eprintln!("precise mode: largest logit difference {worst}");
    assert!(worst < 0.05, "largest logit difference {worst}");
}

#[test]
fn tiny_smollm3_matches_transformers_with_nope_layers() {
    let f = GgufFile::open(&data("tiny-smollm3/tiny-smollm3-q8_0.gguf")).unwrap();
    let model = Model::from_gguf(&f).unwrap();
    assert_eq!(model.cfg.arch, Architecture::Smollm3);
    let no_rope: Vec<usize> = (0..model.cfg.n_layers)
        .filter(|&i| !model.cfg.use_rope[i])
        .collect();
    assert_eq!(no_rope, vec![3, 7]);
    assert!(model.cfg.tied_embeddings);
    let worst = check_variant(&model, "q8_0_nope");
    eprintln!("tiny smollm3: largest logit difference {worst:.3}");
}

#[test]
fn tiny_llama_matches_transformers_with_rope_everywhere() {
    let f = GgufFile::open(&data("tiny-smollm3/tiny-llama-rope-all-q8_0.gguf")).unwrap();
    let model = Model::from_gguf(&f).unwrap();
    assert_eq!(model.cfg.arch, Architecture::Llama);
    let worst = check_variant(&model, "q8_0_rope_all");
    eprintln!("tiny llama: largest logit difference {worst:.3}");
}

#[test]
fn smollm3_weights_read_as_llama_give_different_logits() {
    let f = GgufFile::open(&data("tiny-smollm3/tiny-smollm3-q8_0.gguf")).unwrap();
    let as_llama = Model::from_gguf_with_arch(&f, Some(Architecture::Llama)).unwrap();
    let as_smollm3 = Model::from_gguf(&f).unwrap();
    let r = json("tiny-smollm3/reference.json");
    let seq = &r["sequences"][2];
    let tokens = ids(&seq["ids"]);
    let (a, b) = (
        all_logits(&as_llama, &tokens),
        all_logits(&as_smollm3, &tokens),
    );
    let max_diff = a
        .iter()
        .zip(&b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max);
    assert!(
        max_diff > 3.0,
        "NoPE must change the logits (max difference {max_diff})"
    );
    // Position 0 cannot tell them apart: rotation by angle zero.
    let d0 = a[0]
        .iter()
        .zip(&b[0])
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(d0 < 1e-3, "position 0 differs by {d0}");
}

#[test]
fn packed_batch_gives_each_sequence_its_own_tokens() {
    let f = GgufFile::open(&data("tiny-smollm3/tiny-smollm3-q8_0.gguf")).unwrap();
    let model = Model::from_gguf(&f).unwrap();
    let (packed, alone) = packed_and_alone(&model, 12);
    assert_eq!(packed, alone);
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp_on_every_case() {
    let engine = common::default_engine();
    for case in jsonl("smollm2/tokenizer_cases.jsonl") {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let with = engine.tokenizer.encode(text, true).unwrap();
        assert_eq!(
            with,
            ids(&case["parse_special"]["ids"]),
            "{name} (special tokens parsed)"
        );
        let without = engine.tokenizer.encode(text, false).unwrap();
        assert_eq!(
            without,
            ids(&case["no_parse_special"]["ids"]),
            "{name} (special tokens as text)"
        );
        assert_eq!(
            engine.tokenizer.decode(&with),
            case["parse_special"]["decoded"].as_str().unwrap(),
            "{name} decoded"
        );
    }
}

#[test]
fn smollm2_chat_template_matches_transformers_on_every_case() {
    let engine = common::default_engine();
    for case in jsonl("smollm2/chat_template_cases.jsonl") {
        let name = case["name"].as_str().unwrap();
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let (text, tokens) = engine.render_chat(&messages, gen, None).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{name}");
        assert_eq!(tokens, ids(&case["ids"]), "{name}");
    }
}

#[test]
fn smollm2_logits_and_greedy_tokens_match_transformers() {
    let engine: &Engine = common::default_engine();
    check_smollm2(&engine.model, SMOLLM2_TOL, 1.0);
}

#[test]
fn smollm2_precise_mode_matches_transformers_tightly() {
    // The fixtures' own rule: same greedy tokens except after a step whose gap is below 0.1.
    let mut model =
        Model::from_gguf(&GgufFile::open(&common::default_model_path()).unwrap()).unwrap();
    model.precise = true;
    check_smollm2(&model, 0.05, 0.1);
}

#[test]
fn smollm3_template_follows_enable_thinking_and_system_flags() {
    let engine = Engine::load(&data("tiny-smollm3/tiny-smollm3-q8_0.gguf")).unwrap();
    let user = [ChatMessage::new("user", "Hi")];
    let on = engine.render_chat(&user, true, Some(true)).unwrap().0;
    let off = engine.render_chat(&user, true, Some(false)).unwrap().0;
    let default = engine.render_chat(&user, true, None).unwrap().0;
    assert!(on.contains("Reasoning Mode: /think"), "{on}");
    assert!(off.contains("Reasoning Mode: /no_think"), "{off}");
    assert_eq!(default, on, "the template's own default is thinking on");
    // A `/no_think` flag in the system prompt wins over enable_thinking, and is removed.
    let flagged = [
        ChatMessage::new("system", "Be terse. /no_think"),
        ChatMessage::new("user", "Hi"),
    ];
    let text = engine.render_chat(&flagged, true, Some(true)).unwrap().0;
    assert!(
        text.contains("Reasoning Mode: /no_think")
            && text.contains("Be terse.")
            && !text.contains("terse. /no_think"),
        "{text}"
    );
    // `strftime_now` is used by the real template for the date line.
    let today = chrono::Local::now().format("%d %B %Y").to_string();
    assert!(text.contains(&format!("Today Date: {today}")), "{text}");
}

#[test]
fn a_tokenizer_json_beside_the_model_is_used_and_agrees() {
    let from_gguf = &common::default_engine().tokenizer;
    let dir = std::env::temp_dir().join(format!("smolchat-tokjson-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("model.gguf");
    let _ = std::fs::remove_file(&model);
    std::os::unix::fs::symlink(common::default_model_path(), &model).unwrap();
    from_gguf.save_json(&dir.join("tokenizer.json")).unwrap();
    let engine = Engine::load(&model).unwrap();
    for case in jsonl("smollm2/tokenizer_cases.jsonl") {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            engine.tokenizer.encode(text, true).unwrap(),
            ids(&case["parse_special"]["ids"]),
            "{text}"
        );
        assert_eq!(
            engine.tokenizer.encode(text, false).unwrap(),
            ids(&case["no_parse_special"]["ids"]),
            "{text}"
        );
    }
}

#[test]
fn the_streaming_detokenizer_never_splits_a_character_and_the_splitter_finds_think_tags() {
    use smolchat::engine::reasoning::{Channel, ReasoningSplitter};
    use smolchat::engine::tokenizer::StreamDecoder;
    let tok = &common::default_engine().tokenizer;
    let text = "Café 🦉 naïve — <think>why?</think>Answer: 42 ✓";
    let ids = tok.encode(text, false).unwrap();
    let mut dec = StreamDecoder::default();
    let mut split = ReasoningSplitter::new(tok, false);
    let (mut out, mut reasoning, mut answer) = (String::new(), String::new(), String::new());
    for &id in &ids {
        let piece = dec.push(tok, id);
        // A character cut between tokens would come out as U+FFFD.
        assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
        out.push_str(&piece);
        for (ch, t) in split.push(id, &piece) {
            match ch {
                Channel::Reasoning => reasoning.push_str(&t),
                Channel::Answer => answer.push_str(&t),
            }
        }
    }
    for (ch, t) in split.flush() {
        match ch {
            Channel::Reasoning => reasoning.push_str(&t),
            Channel::Answer => answer.push_str(&t),
        }
    }
    assert_eq!(out + &dec.finish(), text);
    assert_eq!(reasoning, "why?");
    assert_eq!(answer, "Café 🦉 naïve — Answer: 42 ✓");
}
