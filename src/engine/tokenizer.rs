//! The tokenizer, built from the GGUF's own `tokenizer.ggml.*` metadata (or a `tokenizer.json`
//! beside the model), and a streaming detokenizer that never emits half a UTF-8 character.
//!
//! What matches llama.cpp for gpt2-style vocabularies: BPE from the GGUF tokens and merges; the
//! pre-tokenizer of the file's `pre` name (for `smollm`: digits split one by one, then the GPT-2
//! regex, then byte-level without a prefix space); control tokens (type 3) as special tokens.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use super::gguf::{GgufFile, Value};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the model file has no usable tokenizer: {0}")]
    Missing(String),
    #[error("tokenizer `{0}` is not supported (gpt2-style BPE is)")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Build(String),
}

/// Token type of llama.cpp's vocabulary: a control token such as `<|im_start|>`.
const TOKEN_TYPE_CONTROL: i64 = 3;

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct Tokenizer {
    /// Special-token strings in the text become their ids.
    with_special: HfTokenizer,
    /// Special-token strings in the text are plain text.
    plain: HfTokenizer,
    /// Bytes each token stands for (byte-level decoded; control tokens as their text).
    token_bytes: Vec<Vec<u8>>,
    special: Vec<bool>,
    pub eos_id: Option<u32>,
    pub bos_id: Option<u32>,
}

impl Tokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, TokenizerError> {
        let missing = |e: super::gguf::GgufError| TokenizerError::Missing(e.to_string());
        let model = f.get_str("tokenizer.ggml.model").map_err(missing)?;
        if model != "gpt2" {
            return Err(TokenizerError::Unsupported(model.to_owned()));
        }
        let pre = f.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let tokens: Vec<String> = f
            .get_array("tokenizer.ggml.tokens")
            .map_err(missing)?
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .collect();
        let types: Vec<i64> = f
            .get_array("tokenizer.ggml.token_type")
            .map(|a| a.iter().map(value_i64).collect())
            .unwrap_or_else(|_| vec![1; tokens.len()]);
        let merges: Vec<(String, String)> = f
            .get_array("tokenizer.ggml.merges")
            .map_err(missing)?
            .iter()
            .filter_map(|v| {
                let (a, b) = v.as_str()?.split_once(' ')?;
                Some((a.to_owned(), b.to_owned()))
            })
            .collect();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        let mut tk = HfTokenizer::new(bpe);
        tk.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
        tk.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<bool> = (0..tokens.len())
            .map(|i| types.get(i).copied().unwrap_or(1) == TOKEN_TYPE_CONTROL)
            .collect();
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&special)
            .filter(|(_, &s)| s)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        tk.add_special_tokens(&added);
        let token_bytes = tokens
            .iter()
            .zip(&special)
            .map(|(t, &s)| {
                if s {
                    t.as_bytes().to_vec()
                } else {
                    byte_level_decode(t)
                }
            })
            .collect();
        let id = |k: &str| {
            f.get_u64(k)
                .ok()
                .map(|v| v as u32)
                .filter(|&v| (v as usize) < tokens.len())
        };
        Self::finish(
            tk,
            token_bytes,
            special,
            id("tokenizer.ggml.eos_token_id"),
            id("tokenizer.ggml.bos_token_id"),
        )
    }

    /// Loads a Hugging Face `tokenizer.json` (used when one lies beside the model).
    pub fn from_file(
        path: &Path,
        eos_id: Option<u32>,
        bos_id: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        let tk = HfTokenizer::from_file(path).map_err(|e| TokenizerError::Build(e.to_string()))?;
        let n = tk.get_vocab_size(true);
        let mut special = vec![false; n];
        for (id, t) in tk.get_added_tokens_decoder() {
            if t.special && (id as usize) < n {
                special[id as usize] = true;
            }
        }
        let token_bytes = (0..n as u32)
            .map(|i| {
                let t = tk.id_to_token(i).unwrap_or_default();
                if special[i as usize] {
                    t.into_bytes()
                } else {
                    byte_level_decode(&t)
                }
            })
            .collect();
        Self::finish(tk, token_bytes, special, eos_id, bos_id)
    }

    fn finish(
        with_special: HfTokenizer,
        token_bytes: Vec<Vec<u8>>,
        special: Vec<bool>,
        eos_id: Option<u32>,
        bos_id: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        let mut plain = with_special.clone();
        plain.set_encode_special_tokens(true);
        Ok(Self {
            with_special,
            plain,
            token_bytes,
            special,
            eos_id,
            bos_id,
        })
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`.
    pub fn save_json(&self, path: &Path) -> Result<(), TokenizerError> {
        self.with_special
            .save(path, false)
            .map_err(|e| TokenizerError::Build(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Token ids of `text`; with `parse_special`, special-token strings become their ids.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let tk = if parse_special {
            &self.with_special
        } else {
            &self.plain
        };
        tk.encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Build(e.to_string()))
    }

    /// The bytes a token stands for (empty for an unknown id).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.with_special.token_to_id(text)
    }

    /// Text of `ids` (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn value_i64(v: &Value) -> i64 {
    match *v {
        Value::I32(x) => x as i64,
        Value::I64(x) => x,
        _ => v.as_u64().map(|x| x as i64).unwrap_or(1),
    }
}

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    let split = |re: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
        Split::new(
            SplitPattern::Regex(re.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map(Into::into)
        .map_err(|e| TokenizerError::Build(e.to_string()))
    };
    let byte_level = |use_regex| PreTokenizerWrapper::from(ByteLevel::new(false, true, use_regex));
    Ok(match pre {
        "smollm" => Sequence::new(vec![split(r"\p{N}")?, byte_level(true)]).into(),
        "llama-bpe" | "llama3" | "smaug-bpe" => {
            Sequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false)]).into()
        }
        // gpt2 and the unknown rest: the GPT-2 regex of the byte-level pre-tokenizer.
        _ => byte_level(true),
    })
}

/// GPT-2's byte-to-character table, inverted: maps a token's characters back to bytes.
fn byte_level_decode(token: &str) -> Vec<u8> {
    static TABLE: std::sync::OnceLock<HashMap<char, u8>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut map = HashMap::new();
        let mut n = 0u32;
        for b in 0..=255u8 {
            let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
            let c = if printable {
                char::from(b)
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap_or('?')
            };
            map.insert(c, b);
        }
        map
    });
    let mut out = Vec::with_capacity(token.len());
    for c in token.chars() {
        match table.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

/// Turns a stream of token ids into text pieces, holding back bytes of an unfinished UTF-8
/// character until the rest arrives.
#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// The text that `id` completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.pending.extend_from_slice(tok.token_bytes(id));
        self.take_valid()
    }

    fn take_valid(&mut self) -> String {
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let s = s.to_owned();
                self.pending.clear();
                s
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // An error that is not "unexpected end" means bytes that can never become valid:
                // emit them replaced instead of holding them forever.
                let end = match e.error_len() {
                    Some(bad) => valid + bad,
                    None => valid,
                };
                let s = String::from_utf8_lossy(&self.pending[..end]).into_owned();
                self.pending.drain(..end);
                if e.error_len().is_some() {
                    return s + &self.take_valid();
                }
                s
            }
        }
    }

    /// Whatever is still held back, replaced where invalid.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}
