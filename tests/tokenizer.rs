//! Tokenizer: the tiny model's tokenizer.json reproduces the ids transformers stored in the logits
//! fixture, decodes back to the text, and each kind of broken input is an error naming the file.

use std::path::{Path, PathBuf};
use wgpress::model::safetensors::SafetensorsSet;
use wgpress::model::tokenizer::Tokenizer;

/// The fixture's 64 ids decoded (assets/README.md, "Logits fixture").
const FIXTURE_TEXT: &str = "\nAJAX.\nMistress Thersites!\n\nTHERSITES.\nThou shouldst strike him.\n\nAJAX.\nCobloaf!\n\nTHERSITES.\nHe would pun thee into s";

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny")
}

fn fixture_ids() -> Vec<u32> {
    let st = SafetensorsSet::open_file(&tiny().join("logits_fixture.safetensors"))
        .expect("open fixture");
    let bytes = st.bytes("input_ids").expect("input_ids");
    assert_eq!(bytes.len(), 64 * 8, "input_ids is i64 [64]");
    bytes
        .chunks_exact(8)
        .map(|c| {
            let v = i64::from_le_bytes(c.try_into().expect("8 bytes"));
            u32::try_from(v).expect("id fits u32")
        })
        .collect()
}

#[test]
fn encode_matches_fixture_ids() {
    let tok = Tokenizer::load(&tiny(), 2048).expect("load");
    let ids = tok.encode(FIXTURE_TEXT).expect("encode");
    assert_eq!(ids, fixture_ids());
    // The README lists the same ids: a cheap check that the fixture is the one documented.
    assert_eq!(&ids[..8], &[201, 35, 44, 35, 58, 16, 201, 47]);
}

#[test]
fn decode_round_trip() {
    let tok = Tokenizer::load(&tiny(), 2048).expect("load");
    assert_eq!(tok.decode(&fixture_ids()).expect("decode"), FIXTURE_TEXT);
    let text = "O, swear not by the moon, th' inconstant moon!\n\tÆ ünïcödé — 🎭 bytes\n";
    let ids = tok.encode(text).expect("encode");
    assert_eq!(tok.decode(&ids).expect("decode"), text);
    assert!(tok.encode("").expect("encode empty").is_empty());
}

#[test]
fn no_special_tokens_added_and_bos_known() {
    let tok = Tokenizer::load(&tiny(), 2048).expect("load");
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.vocab_size(), 2048);
    let ids = tok.encode("Hello").expect("encode");
    assert!(
        !ids.contains(&1) && !ids.contains(&2),
        "no BOS/EOS: {ids:?}"
    );
}

#[test]
fn decode_refuses_out_of_vocab_id() {
    let tok = Tokenizer::load(&tiny(), 2048).expect("load");
    let err = tok
        .decode(&[35, 2048])
        .expect_err("id 2048 is out of vocab")
        .to_string();
    assert!(err.contains("2048"), "{err}");
}

#[test]
fn larger_config_vocab_is_fine() {
    // Checkpoints pad embeddings; the tokenizer only has to fit inside.
    let tok = Tokenizer::load(&tiny(), 2112).expect("load");
    assert_eq!(tok.vocab_size(), 2048);
}

#[test]
fn missing_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = Tokenizer::load(dir.path(), 2048)
        .expect_err("missing")
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn garbage_json_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").expect("write");
    let err = Tokenizer::load(dir.path(), 2048)
        .expect_err("garbage")
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    // Valid JSON that is not a tokenizer is refused too.
    std::fs::write(dir.path().join("tokenizer.json"), r#"{"hello": 1}"#).expect("write");
    let err = Tokenizer::load(dir.path(), 2048)
        .expect_err("not a tokenizer")
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn vocab_smaller_than_tokenizer_is_refused() {
    let err = Tokenizer::load(&tiny(), 2047)
        .expect_err("inconsistent")
        .to_string();
    assert!(
        err.contains("tokenizer inconsistent with vocab_size"),
        "{err}"
    );
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn added_token_beyond_vocab_is_refused() {
    // An added token past the base vocabulary counts: its id would index past the embedding.
    let dir = tempfile::tempdir().expect("tempdir");
    let src = std::fs::read_to_string(tiny().join("tokenizer.json")).expect("read");
    let mut json: serde_json::Value = serde_json::from_str(&src).expect("json");
    json["added_tokens"]
        .as_array_mut()
        .expect("added_tokens array")
        .push(serde_json::json!({
            "id": 2048, "content": "<pad>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).expect("write");
    let err = Tokenizer::load(dir.path(), 2048)
        .expect_err("inconsistent")
        .to_string();
    assert!(
        err.contains("tokenizer inconsistent with vocab_size"),
        "{err}"
    );
    assert!(err.contains("<pad>"), "{err}");
    let tok = Tokenizer::load(dir.path(), 2049).expect("fits with 2049");
    assert_eq!(tok.vocab_size(), 2049);
    // No tokenizer_config.json or config.json here: BOS falls back to the `<s>` name.
    assert_eq!(tok.bos_id(), Some(1));
}

/// A long text encoded in pieces on several threads gives exactly the one-pass ids: text built
/// to stress the cut rule (blank lines, spaces and tabs before newlines, "\r\n", newlines before
/// spaces, digits and punctuation, non-ASCII letters, a newline before an apostrophe), long
/// enough for 2-7 pieces; and a tokenizer the rule does not cover (a normalizer added) is
/// encoded in one piece, with the same ids as before the change.
#[test]
fn long_texts_encode_in_parallel_pieces_with_identical_ids() {
    let tok = Tokenizer::load(&tiny(), 2048).expect("load");
    assert!(tok.splits_exactly(), "the tiny tokenizer is byte-level BPE");
    // Mostly newlines where a cut would change the ids (runs, whitespace on either side), so
    // the first newline past a piece's target is usually one the rule must skip.
    let lines = [
        "KING HENRY.\n\n\nWhat say'st thou?\n\n",
        "  Enter   GLOUCESTER, \n\tattended.\r\nCome,\n\n\n come!\n\n",
        "1601: twenty-three (23) ducats; \n'tis so. \nÉlan — naïve café.\n\n\n",
        "x\n\n\ny\n\n\nz \nw\t\nv\n\n",
        FIXTURE_TEXT,
    ];
    let mut text = String::new();
    let mut i = 0usize;
    while text.len() < 600 * 1024 {
        text.push_str(lines[i % lines.len()]);
        text.push_str(&format!("{} ", i % 97));
        i += 1;
    }
    let serial = tok.encode_with(&text, 1).expect("encode");
    for threads in [2, 3, 7] {
        assert_eq!(
            tok.encode_with(&text, threads).expect("encode"),
            serial,
            "{threads} threads"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("tokenizer.json")).unwrap())
            .unwrap();
    json["normalizer"] = serde_json::json!({"type": "NFC"});
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    let nfc = Tokenizer::load(dir.path(), 2048).expect("load");
    assert!(!nfc.splits_exactly());
    assert_eq!(nfc.encode_with(&text, 7).expect("encode"), serial);
    // Padding (or truncation) would apply to every piece: such a tokenizer is not split either.
    json["normalizer"] = serde_json::Value::Null;
    json["padding"] = serde_json::json!({"strategy": "BatchLongest", "direction": "Right",
        "pad_to_multiple_of": 8, "pad_id": 0, "pad_type_id": 0, "pad_token": "<unk>"});
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    let padded = Tokenizer::load(dir.path(), 2048).expect("load");
    assert!(!padded.splits_exactly());
}
