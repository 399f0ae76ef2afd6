//! The checkpoint's `tokenizer.json`, loaded with Hugging Face's `tokenizers` crate, and checked
//! against the config's `vocab_size` so every id it produces indexes the embedding table.
//!
//! `encode` never adds special tokens: the perplexity protocol (DESIGN.md section 1) tokenizes the
//! whole text as one stream without BOS, and calibration adds BOS itself when asked. Long texts
//! are encoded in pieces on several threads where the result is provably the same as one pass
//! (see [`Tokenizer::splits_exactly`]); a 4.5 MB calibration text took 3 s on one thread. This module
//! must not guess at chat templates, truncation or padding, and must not download anything: a
//! tokenizer comes only from the model directory.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// File name of the tokenizer inside a Hugging Face checkpoint directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Token names tried for BOS when neither `tokenizer_config.json` nor `config.json` names it,
/// in order: Llama 1/2 and Mistral use `<s>`, Llama 3 `<|begin_of_text|>`.
const BOS_FALLBACK_NAMES: [&str; 2] = ["<s>", "<|begin_of_text|>"];

/// A loaded tokenizer whose ids are all below the model's `vocab_size`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos: Option<u32>,
    /// Number of ids the tokenizer can produce (base vocabulary plus added tokens).
    vocab_size: usize,
    /// See [`Tokenizer::splits_exactly`].
    splits_exactly: bool,
}

/// Smallest piece worth a thread of its own.
const MIN_PIECE: usize = 64 * 1024;

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `model_dir/tokenizer.json` and checks it against the config's `vocab_size`: a
    /// tokenizer with any id (added tokens included) `>= vocab_size` belongs to another model,
    /// and would index past the embedding table. A `vocab_size` larger than the tokenizer is fine
    /// (checkpoints often pad the embedding to a multiple of 64).
    pub fn load(model_dir: &Path, vocab_size: usize) -> Result<Self> {
        let path = model_dir.join(TOKENIZER_FILE);
        // Read the file ourselves so a missing file is an I/O error naming it, not the crate's
        // unnamed message.
        let json = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| Error::format(&path, format!("not a valid tokenizer.json: {e}")))?;

        let vocab = inner.get_vocab(true);
        let largest = vocab.iter().max_by_key(|(_, id)| **id);
        let Some((largest_name, &largest_id)) = largest else {
            return Err(Error::format(&path, "tokenizer has an empty vocabulary"));
        };
        if largest_id as usize >= vocab_size {
            return Err(Error::format(
                &path,
                format!(
                    "tokenizer inconsistent with vocab_size: token {largest_name:?} has id \
                     {largest_id} but config.json vocab_size is {vocab_size}"
                ),
            ));
        }
        let bos = find_bos(model_dir, &inner);
        let splits_exactly = serde_json::from_str::<serde_json::Value>(&json)
            .map(|v| splits_exactly(&v))
            .unwrap_or(false);
        Ok(Tokenizer {
            vocab_size: largest_id as usize + 1,
            inner,
            path,
            bos,
            splits_exactly,
        })
    }

    /// Whether long texts may be encoded in pieces: true for byte-level BPE with GPT-2's
    /// pre-tokenizer regex, no normalizer, no prefix space, no truncation or padding and no
    /// added token containing a newline. Its regex always ends a pre-token after a lone "\n" between two non-whitespace
    /// characters (no alternative spans whitespace and a non-space character, except " ?" with
    /// a plain space), and the text before such a point ends in the same pre-token ("\n") as in
    /// the whole text, so encoding the two sides apart gives the same ids. Other tokenizers
    /// (normalizers, Metaspace, other regexes) are encoded in one piece.
    pub fn splits_exactly(&self) -> bool {
        self.splits_exactly
    }

    /// Token ids of `text`, with no special tokens added (no BOS, no EOS); long texts on every
    /// core where [`Tokenizer::splits_exactly`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.encode_with(text, threads)
    }

    /// [`Tokenizer::encode`] on at most `threads` threads (the same ids for any count).
    pub fn encode_with(&self, text: &str, threads: usize) -> Result<Vec<u32>> {
        let pieces = (text.len() / MIN_PIECE).min(threads);
        if !self.splits_exactly || pieces < 2 {
            return self.encode_one(text);
        }
        let cuts = split_points(text, pieces);
        let parts: Vec<&str> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
        let ids = std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .iter()
                .map(|part| scope.spawn(move || self.encode_one(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::format(&self.path, "a tokenizer thread panicked"))
                    })
                })
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(ids.concat())
    }

    fn encode_one(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| {
            Error::format(
                &self.path,
                format!("encoding {} chars failed: {e}", text.len()),
            )
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included, so `decode(encode(t)) == t` for byte-level BPE.
    /// Ids outside the vocabulary are an error rather than silently dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary of {} ({} ids)",
                self.path.display(),
                self.vocab_size
            )));
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::format(&self.path, format!("decoding failed: {e}")))
    }

    /// The beginning-of-sequence id, when the checkpoint names one (see `find_bos`).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Number of ids this tokenizer can produce (largest id + 1, added tokens included); at most
    /// the config's `vocab_size`.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The `tokenizer.json` this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// See [`Tokenizer::splits_exactly`]; `v` is the parsed tokenizer.json.
fn splits_exactly(v: &serde_json::Value) -> bool {
    let absent = |k: &str| v.get(k).is_none_or(|x| x.is_null());
    let Some(pre) = v.get("pre_tokenizer") else {
        return false;
    };
    let flag = |k: &str, default: bool| pre.get(k).and_then(|x| x.as_bool()).unwrap_or(default);
    let newline_token = v
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .is_some_and(|a| {
            a.iter().any(|t| {
                t.get("content")
                    .and_then(|c| c.as_str())
                    .is_none_or(|c| c.contains('\n'))
            })
        });
    // Truncation or padding would apply to each piece.
    absent("normalizer")
        && absent("truncation")
        && absent("padding")
        && pre.get("type").and_then(|t| t.as_str()) == Some("ByteLevel")
        && flag("use_regex", true)
        && !flag("add_prefix_space", true)
        && !newline_token
}

/// Byte offsets 0 = c0 < c1 < ... < text.len() cutting `text` into about `pieces` parts, each cut
/// just after a lone "\n" whose neighbours are not whitespace (see [`Tokenizer::splits_exactly`]);
/// a part with no such point before the next target runs on to the one after.
fn split_points(text: &str, pieces: usize) -> Vec<usize> {
    let b = text.as_bytes();
    let mut cuts = vec![0];
    let is_ws = |i: usize| -> bool {
        // The char at byte i (a char boundary).
        text[i..].chars().next().is_some_and(char::is_whitespace)
    };
    let before_ws = |i: usize| -> bool {
        text[..i]
            .chars()
            .next_back()
            .is_none_or(char::is_whitespace)
    };
    for k in 1..pieces {
        let target = text.len() * k / pieces;
        let from = target.max(cuts[cuts.len() - 1] + 1);
        let cut = (from..b.len())
            .find(|&p| p >= 2 && b[p - 1] == b'\n' && !before_ws(p - 1) && !is_ws(p));
        match cut {
            Some(p) => cuts.push(p),
            None => break,
        }
    }
    cuts.push(text.len());
    cuts.dedup();
    cuts
}

/// BOS id, from the most specific source present: `tokenizer_config.json`'s `bos_token` (a string
/// or an `{"content": ...}` object, as transformers writes it), else `config.json`'s
/// `bos_token_id`, else a conventional BOS name in the vocabulary. Those files are optional and
/// a malformed one only means "unknown": BOS matters only for the calibration option that asks for
/// it, and that option reports the absence.
fn find_bos(model_dir: &Path, tok: &tokenizers::Tokenizer) -> Option<u32> {
    let read_json = |name: &str| -> Option<serde_json::Value> {
        let s = std::fs::read_to_string(model_dir.join(name)).ok()?;
        serde_json::from_str(&s).ok()
    };
    if let Some(cfg) = read_json("tokenizer_config.json") {
        let name = match cfg.get("bos_token") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        if let Some(id) = name.and_then(|n| tok.token_to_id(&n)) {
            return Some(id);
        }
    }
    if let Some(cfg) = read_json("config.json") {
        // A config may list several ids; the first is the one prepended.
        let id = match cfg.get("bos_token_id") {
            Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_u64()),
            Some(v) => v.as_u64(),
            None => None,
        };
        if let Some(id) = id.and_then(|i| u32::try_from(i).ok())
            && tok.id_to_token(id).is_some()
        {
            return Some(id);
        }
    }
    BOS_FALLBACK_NAMES.iter().find_map(|n| tok.token_to_id(n))
}
