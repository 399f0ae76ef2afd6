//! Calibration samples and evaluation windows, as GPTQ users know them.
//!
//! `sample_windows` reads text files, tokenizes each, joins them into one stream and draws
//! `nsamples` windows of `seqlen` tokens at seeded random starts (GPTQ's `get_wikitext2` /
//! `get_c4` recipe), optionally starting each window with BOS, the attention-sink remedy of
//! DESIGN.md section 4. `eval_windows` cuts a token stream into the non-overlapping windows of the
//! perplexity protocol (DESIGN.md section 1).
//!
//! Must not: depend on anything but the seed for its randomness (the `Rng` is the same on every
//! platform, so a seed reproduces the calibration set everywhere), pad or truncate a short text
//! silently, or add special tokens other than the BOS asked for.

use crate::error::{Error, Result};
use crate::model::tokenizer::Tokenizer;
use crate::rng::Rng;
use std::path::{Path, PathBuf};

/// Text placed between two calibration files before tokenizing the joint, so the last sentence
/// of one file does not run into the first of the next: a paragraph break, as between documents.
pub const FILE_SEPARATOR: &str = "\n\n";

/// What `sample_windows` draws.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalibOptions {
    /// Text files (UTF-8), concatenated in this order.
    pub files: Vec<PathBuf>,
    /// Number of windows drawn.
    pub nsamples: usize,
    /// Tokens per window, BOS included when `bos` is set.
    pub seqlen: usize,
    /// Seed of the start positions.
    pub seed: u64,
    /// Start each window with BOS followed by `seqlen - 1` text tokens.
    pub bos: bool,
}

impl Default for CalibOptions {
    /// GPTQ's defaults: 128 windows of 2048 tokens, seed 0, no BOS.
    fn default() -> Self {
        CalibOptions {
            files: Vec::new(),
            nsamples: 128,
            seqlen: 2048,
            seed: 0,
            bos: false,
        }
    }
}

/// Draws `opts.nsamples` windows of `opts.seqlen` ids from the concatenated, tokenized files.
///
/// Each window's text part is a contiguous slice of the token stream starting at
/// `rng.below(len - text_len + 1)`, drawn in order from `Rng::new(seed)`; windows may overlap
/// (as in GPTQ), and the same seed gives the same windows on every platform.
pub fn sample_windows(tok: &Tokenizer, opts: &CalibOptions) -> Result<Vec<Vec<u32>>> {
    if opts.files.is_empty() {
        return Err(Error::invalid("calibration: no text files given"));
    }
    if opts.nsamples == 0 {
        return Err(Error::invalid("calibration: nsamples must be at least 1"));
    }
    if opts.seqlen == 0 {
        return Err(Error::invalid("calibration: seqlen must be at least 1"));
    }
    let bos = if opts.bos {
        Some(tok.bos_id().ok_or_else(|| {
            Error::invalid(format!(
                "calibration: windows starting with BOS were asked for, but the tokenizer {} \
                 names no BOS token",
                tok.path().display()
            ))
        })?)
    } else {
        None
    };

    let stream = tokenize_files(tok, &opts.files)?;
    let text_len = opts.seqlen - usize::from(bos.is_some());
    if stream.len() < text_len || stream.is_empty() {
        return Err(Error::invalid(format!(
            "calibration text {} has {} tokens, fewer than one window of {}",
            describe_files(&opts.files),
            stream.len(),
            opts.seqlen
        )));
    }

    let mut rng = Rng::new(opts.seed);
    // Number of distinct start positions; >= 1 since stream.len() >= text_len.
    let starts = (stream.len() - text_len + 1) as u64;
    let windows = (0..opts.nsamples)
        .map(|_| {
            let start = rng.below(starts) as usize;
            let mut w = Vec::with_capacity(opts.seqlen);
            w.extend(bos);
            w.extend_from_slice(&stream[start..start + text_len]);
            w
        })
        .collect();
    Ok(windows)
}

/// The perplexity protocol's windows: the first `max_tokens` ids (all when `None`) cut into
/// non-overlapping windows of `seq_len`, the trailing partial window dropped.
pub fn eval_windows(ids: &[u32], seq_len: usize, max_tokens: Option<usize>) -> Result<Vec<&[u32]>> {
    if seq_len == 0 {
        return Err(Error::invalid("evaluation: seq_len must be at least 1"));
    }
    if max_tokens == Some(0) {
        return Err(Error::invalid("evaluation: max_tokens must be at least 1"));
    }
    let ids = &ids[..max_tokens.map_or(ids.len(), |m| m.min(ids.len()))];
    if ids.len() < seq_len {
        return Err(Error::invalid(format!(
            "evaluation text has {} tokens, fewer than one window of {seq_len}",
            ids.len()
        )));
    }
    Ok(ids.chunks_exact(seq_len).collect())
}

/// One evaluation window: its ids and the first position whose token is scored (predicted from the
/// position before it). Non-overlapping windows score from 1 (every token but the first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalWindow<'a> {
    pub ids: &'a [u32],
    pub score_from: usize,
}

/// The sliding-window variant (`--stride`): full windows of `seq_len` starting every `stride`
/// tokens; the first window scores every token but its first, each later one only its last
/// `stride` tokens (the ones no earlier window scored), so every token after the first is scored
/// once with up to `seq_len - stride` tokens of context. Tokens after the last full window are
/// dropped. `stride == seq_len` gives the non-overlapping protocol.
pub fn stride_windows(
    ids: &[u32],
    seq_len: usize,
    stride: usize,
    max_tokens: Option<usize>,
) -> Result<Vec<EvalWindow<'_>>> {
    if stride == 0 || stride > seq_len {
        return Err(Error::invalid(format!(
            "evaluation: stride must be in 1..={seq_len} (the window length), got {stride}"
        )));
    }
    let first = eval_windows(ids, seq_len, max_tokens)?;
    let ids = &ids[..max_tokens.map_or(ids.len(), |m| m.min(ids.len()))];
    if stride == seq_len {
        return Ok(first
            .into_iter()
            .map(|w| EvalWindow {
                ids: w,
                score_from: 1,
            })
            .collect());
    }
    let mut out = Vec::new();
    let mut begin = 0;
    while begin + seq_len <= ids.len() {
        out.push(EvalWindow {
            ids: &ids[begin..begin + seq_len],
            score_from: if begin == 0 { 1 } else { seq_len - stride },
        });
        begin += stride;
    }
    Ok(out)
}

/// Reads and tokenizes each file on its own and joins the id streams with the separator's ids.
/// Tokenizing per file (not the joined text) keeps a file's ids independent of its neighbours.
fn tokenize_files(tok: &Tokenizer, files: &[PathBuf]) -> Result<Vec<u32>> {
    let sep = tok.encode(FILE_SEPARATOR)?;
    let mut stream = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let text = read_text(file)?;
        if i > 0 {
            stream.extend_from_slice(&sep);
        }
        stream.extend(tok.encode(&text)?);
    }
    Ok(stream)
}

fn read_text(file: &Path) -> Result<String> {
    let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
    String::from_utf8(bytes).map_err(|e| {
        Error::format(
            file,
            format!(
                "calibration text is not UTF-8 (first bad byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// "a.txt" for one file, "a.txt + b.txt" for several: the text the error is about.
fn describe_files(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(" + ")
}
