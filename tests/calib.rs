//! Calibration windows: seeded determinism, real substrings of the token stream, the BOS option,
//! the perplexity protocol's windows, and one test per error case. Text is written to a tempdir
//! by the tests themselves; the tokenizer is the tiny model's.

use std::path::{Path, PathBuf};
use wgpress::calib::{CalibOptions, eval_windows, sample_windows};
use wgpress::model::tokenizer::Tokenizer;

const TEXT_A: &str = "To be, or not to be, that is the question:\n\
Whether 'tis nobler in the mind to suffer\n\
The slings and arrows of outrageous fortune,\n\
Or to take arms against a sea of troubles,\n\
And by opposing end them? To die: to sleep;\n\
No more; and by a sleep to say we end\n\
The heart-ache and the thousand natural shocks\n\
That flesh is heir to, 'tis a consummation\n\
Devoutly to be wish'd. To die, to sleep;\n";

const TEXT_B: &str = "Now is the winter of our discontent\n\
Made glorious summer by this sun of York;\n\
And all the clouds that lour'd upon our house\n\
In the deep bosom of the ocean buried.\n";

fn tok() -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny");
    Tokenizer::load(&dir, 2048).expect("tiny tokenizer")
}

/// Writes `texts` into a fresh tempdir as a0.txt, a1.txt, ...
fn files(texts: &[&str]) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let p = dir.path().join(format!("a{i}.txt"));
            std::fs::write(&p, t).expect("write");
            p
        })
        .collect();
    (dir, paths)
}

fn opts(files: Vec<PathBuf>, nsamples: usize, seqlen: usize, seed: u64) -> CalibOptions {
    CalibOptions {
        files,
        nsamples,
        seqlen,
        seed,
        bos: false,
    }
}

fn is_substring(stream: &[u32], w: &[u32]) -> bool {
    stream.windows(w.len()).any(|s| s == w)
}

#[test]
fn same_seed_same_windows() {
    let t = tok();
    let (_d, f) = files(&[TEXT_A]);
    let a = sample_windows(&t, &opts(f.clone(), 16, 12, 7)).expect("sample");
    let b = sample_windows(&t, &opts(f, 16, 12, 7)).expect("sample");
    assert_eq!(a, b);
    assert_eq!(a.len(), 16);
    assert!(a.iter().all(|w| w.len() == 12));
}

#[test]
fn seeded_windows_are_stable_across_platforms() {
    // Pins the sampling recipe (Rng::new(seed), rng.below(starts), in order): a change here
    // changes every calibration set, so it must be deliberate.
    let t = tok();
    let (_d, f) = files(&[TEXT_A]);
    let stream = t.encode(TEXT_A).expect("encode");
    let w = sample_windows(&t, &opts(f, 3, 10, 42)).expect("sample");
    let mut rng = wgpress::rng::Rng::new(42);
    for win in &w {
        let s = rng.below((stream.len() - 10 + 1) as u64) as usize;
        assert_eq!(win.as_slice(), &stream[s..s + 10]);
    }
}

#[test]
fn different_seeds_differ() {
    let t = tok();
    let (_d, f) = files(&[TEXT_A]);
    let a = sample_windows(&t, &opts(f.clone(), 16, 12, 1)).expect("sample");
    let b = sample_windows(&t, &opts(f, 16, 12, 2)).expect("sample");
    assert_ne!(a, b);
}

#[test]
fn windows_are_substrings_of_the_stream() {
    let t = tok();
    let (_d, f) = files(&[TEXT_A, TEXT_B]);
    let mut stream = t.encode(TEXT_A).expect("encode");
    stream.extend(t.encode("\n\n").expect("encode"));
    stream.extend(t.encode(TEXT_B).expect("encode"));
    let w = sample_windows(&t, &opts(f, 64, 20, 3)).expect("sample");
    for win in &w {
        assert!(is_substring(&stream, win), "window {win:?} not in stream");
    }
    // 64 draws reach windows wholly inside each file.
    let a = t.encode(TEXT_A).expect("encode");
    let b = t.encode(TEXT_B).expect("encode");
    assert!(w.iter().any(|win| is_substring(&a, win)));
    assert!(w.iter().any(|win| is_substring(&b, win)));
}

#[test]
fn window_as_long_as_the_text_is_the_text() {
    let t = tok();
    let (_d, f) = files(&[TEXT_B]);
    let stream = t.encode(TEXT_B).expect("encode");
    let w = sample_windows(&t, &opts(f, 3, stream.len(), 9)).expect("sample");
    assert!(w.iter().all(|win| win == &stream));
}

#[test]
fn bos_option_prepends_bos() {
    let t = tok();
    let (_d, f) = files(&[TEXT_A]);
    let stream = t.encode(TEXT_A).expect("encode");
    let mut o = opts(f, 8, 12, 5);
    o.bos = true;
    let w = sample_windows(&t, &o).expect("sample");
    for win in &w {
        assert_eq!(win.len(), 12);
        assert_eq!(win[0], 1, "BOS first");
        assert!(is_substring(&stream, &win[1..]));
    }
    // With BOS a text one token shorter than seqlen still fills a window.
    let mut o2 = o.clone();
    o2.seqlen = stream.len() + 1;
    let w = sample_windows(&t, &o2).expect("sample");
    assert_eq!(&w[0][1..], stream.as_slice());
}

#[test]
fn err_text_shorter_than_window() {
    let t = tok();
    let (_d, f) = files(&["Short text."]);
    let n = t.encode("Short text.").expect("encode").len();
    let err = sample_windows(&t, &opts(f.clone(), 1, 64, 0))
        .expect_err("too short")
        .to_string();
    assert!(err.contains("a0.txt"), "{err}");
    assert!(
        err.contains(&format!("has {n} tokens, fewer than one window of 64")),
        "{err}"
    );
}

#[test]
fn err_empty_file_list() {
    let err = sample_windows(&tok(), &opts(vec![], 1, 8, 0))
        .expect_err("no files")
        .to_string();
    assert!(err.contains("no text files"), "{err}");
}

#[test]
fn err_missing_file_is_named() {
    let (d, mut f) = files(&[TEXT_A]);
    f.push(d.path().join("nope.txt"));
    let err = sample_windows(&tok(), &opts(f, 1, 8, 0))
        .expect_err("missing")
        .to_string();
    assert!(err.contains("nope.txt"), "{err}");
}

#[test]
fn err_non_utf8_file_is_named() {
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path().join("latin1.txt");
    std::fs::write(&p, b"caf\xe9 au lait, and more text here").expect("write");
    let err = sample_windows(&tok(), &opts(vec![p], 1, 4, 0))
        .expect_err("not utf-8")
        .to_string();
    assert!(err.contains("latin1.txt") && err.contains("UTF-8"), "{err}");
}

#[test]
fn err_nsamples_zero() {
    let (_d, f) = files(&[TEXT_A]);
    let err = sample_windows(&tok(), &opts(f, 0, 8, 0))
        .expect_err("nsamples 0")
        .to_string();
    assert!(err.contains("nsamples"), "{err}");
}

#[test]
fn err_seqlen_zero() {
    let (_d, f) = files(&[TEXT_A]);
    let err = sample_windows(&tok(), &opts(f, 1, 0, 0))
        .expect_err("seqlen 0")
        .to_string();
    assert!(err.contains("seqlen"), "{err}");
}

#[test]
fn eval_windows_protocol() {
    let ids: Vec<u32> = (0..10).collect();
    let w = eval_windows(&ids, 3, None).expect("windows");
    assert_eq!(
        w,
        vec![&ids[0..3], &ids[3..6], &ids[6..9]],
        "partial window dropped"
    );
    let w = eval_windows(&ids, 3, Some(7)).expect("windows");
    assert_eq!(w, vec![&ids[0..3], &ids[3..6]], "first 7 tokens, then cut");
    let w = eval_windows(&ids, 5, Some(100)).expect("windows");
    assert_eq!(w.len(), 2, "max_tokens beyond the stream takes it all");
    let w = eval_windows(&ids, 10, None).expect("windows");
    assert_eq!(w, vec![&ids[..]]);
}

#[test]
fn eval_windows_errors() {
    let ids: Vec<u32> = (0..10).collect();
    let err = eval_windows(&ids, 0, None)
        .expect_err("seq_len 0")
        .to_string();
    assert!(err.contains("seq_len"), "{err}");
    let err = eval_windows(&ids, 11, None).expect_err("short").to_string();
    assert!(
        err.contains("10 tokens, fewer than one window of 11"),
        "{err}"
    );
    let err = eval_windows(&ids, 4, Some(3))
        .expect_err("short after cut")
        .to_string();
    assert!(
        err.contains("3 tokens, fewer than one window of 4"),
        "{err}"
    );
    let err = eval_windows(&ids, 4, Some(0))
        .expect_err("max 0")
        .to_string();
    assert!(err.contains("max_tokens"), "{err}");
}
