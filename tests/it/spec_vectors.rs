//! The Matrix spec's test vectors (appendices: unpadded base64, canonical JSON, signing JSON,
//! signing events), reproduced byte-exactly through outpost's own functions.
//!
//! Vectors are read from `../shared/spec-vectors/` when present (the project's source of truth),
//! else from the identical copy in `tests/fixtures/`.

use std::path::PathBuf;

use outpost::{
    core::pdu::{canonical_json, event_id_of, hash_and_sign},
    identity::key_pair_from_seed,
};
use ruma::{serde::Base64, signatures::sign_json, CanonicalJsonObject, RoomVersionId};
use serde_json::Value;

fn vectors() -> Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shared = root.join("../shared/spec-vectors/matrix-spec-appendices.json");
    let path = if shared.exists() { shared } else { root.join("tests/fixtures/matrix-spec-appendices.json") };
    serde_json::from_str(&std::fs::read_to_string(&path).expect("vectors readable")).expect("vectors are JSON")
}

fn seed() -> [u8; 32] {
    let v = vectors();
    let b64 = v["signing_key"]["seed_base64"].as_str().unwrap();
    let bytes = Base64::<ruma::serde::base64::Standard, Vec<u8>>::parse(b64).expect("seed is base64").into_inner();
    bytes.try_into().expect("32-byte seed")
}

fn object(v: &Value) -> CanonicalJsonObject {
    serde_json::from_value(v.clone()).expect("canonical object")
}

#[test]
fn unpadded_base64() {
    let v = vectors();
    let cases = v["unpadded_base64"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for c in cases {
        let input = c["input"].as_str().unwrap();
        let expected = c["expected"].as_str().unwrap();
        let encoded = Base64::<ruma::serde::base64::Standard, _>::new(input.as_bytes().to_vec()).encode();
        assert_eq!(encoded, expected, "base64 of {input:?}");
    }
}

#[test]
fn canonical_json_examples() {
    let v = vectors();
    let cases = v["canonical_json"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for c in cases {
        let input: Value = serde_json::from_str(c["input_text"].as_str().unwrap()).unwrap();
        let got = canonical_json(&input).expect("canonicalises");
        assert_eq!(got, c["expected_text"].as_str().unwrap(), "input {}", c["input_text"]);
    }
}

#[test]
fn signing_json() {
    let v = vectors();
    let kp = key_pair_from_seed(&seed(), "1");
    let name = v["signing_key"]["server_name"].as_str().unwrap();
    for c in v["json_signing"].as_array().unwrap() {
        let mut obj = object(&c["input"]);
        sign_json(name, &kp, &mut obj).unwrap();
        assert_eq!(serde_json::to_value(&obj).unwrap(), c["expected"]);
    }
}

#[test]
fn signing_events() {
    let v = vectors();
    let kp = key_pair_from_seed(&seed(), "1");
    let name = v["signing_key"]["server_name"].as_str().unwrap();
    // The spec's event vectors use the room v1 event shape and redaction algorithm.
    let rules = RoomVersionId::V1.rules().unwrap();
    let cases = v["event_signing"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for c in cases {
        let mut obj = object(&c["input"]);
        hash_and_sign(name, &kp, &mut obj, &rules).unwrap();
        assert_eq!(serde_json::to_value(&obj).unwrap(), c["expected"], "{}", c["description"]);
    }
}

#[test]
fn verify_key_matches_seed() {
    let v = vectors();
    let kp = key_pair_from_seed(&seed(), "1");
    let public = Base64::<ruma::serde::base64::Standard, _>::new(kp.public_key().to_vec()).encode();
    assert_eq!(public, v["derived_not_from_spec"]["verify_key_ed25519_1_base64"].as_str().unwrap());
}

/// Cross-check only (not spec text): event ids of the first signed event under the v3–v10 and
/// v11 redaction algorithms, as computed independently by Synapse.
#[test]
fn reference_hash_cross_check() {
    let v = vectors();
    let derived = &v["derived_not_from_spec"]["event_signing[0].expected reference hash / event_id"];
    let obj = object(&v["event_signing"][0]["expected"]);
    let v10 = event_id_of(&obj, &RoomVersionId::V10.rules().unwrap()).unwrap();
    assert_eq!(v10.as_str(), derived["room_v3_to_v10_redaction"]["event_id_v4plus_urlsafe"].as_str().unwrap());
    let v11 = event_id_of(&obj, &RoomVersionId::V11.rules().unwrap()).unwrap();
    assert_eq!(v11.as_str(), derived["room_v11_redaction"]["event_id_urlsafe"].as_str().unwrap());
}
