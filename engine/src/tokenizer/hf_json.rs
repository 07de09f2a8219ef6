//! Byte-level BPE vocabularies from a Hugging Face `tokenizer.json` (with `tokenizer_config.json`,
//! `config.json` and `generation_config.json` beside it), as the same plain [`GgufVocab`] a GGUF file
//! gives: the pieces and merges, the added tokens (special ones as control tokens, others matched whole),
//! the pre-tokenizer's split patterns, NFC normalisation, `ignore_merges`, and the BOS/EOS/stop ids.

use std::path::Path;

use serde_json::Value;

use super::pretokenize::GPT2;
use super::{GgufVocab, TokenizerError, token_type};

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    let err = |reason: String| TokenizerError::Read {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err(e.to_string())),
    }
}

/// The split patterns of a `pre_tokenizer` object, in order; `Err` names what ult does not implement.
fn split_patterns(pre: &Value, out: &mut Vec<String>) -> Result<(), String> {
    match pre["type"].as_str() {
        None if pre.is_null() => Ok(()),
        Some("Sequence") => {
            for p in pre["pretokenizers"].as_array().into_iter().flatten() {
                split_patterns(p, out)?;
            }
            Ok(())
        }
        Some("Split") => {
            if pre["behavior"].as_str() != Some("Isolated") || pre["invert"].as_bool() == Some(true)
            {
                return Err(format!(
                    "a Split pre-tokenizer with behavior {} (ult splits Isolated)",
                    pre["behavior"]
                ));
            }
            let pattern = &pre["pattern"];
            let regex = match (pattern["Regex"].as_str(), pattern["String"].as_str()) {
                (Some(r), _) => r.to_string(),
                (None, Some(s)) => fancy_regex::escape(s).into_owned(),
                _ => return Err(format!("a Split pre-tokenizer with pattern {pattern}")),
            };
            out.push(regex);
            Ok(())
        }
        Some("ByteLevel") => {
            if pre["add_prefix_space"].as_bool() == Some(true) {
                return Err("a ByteLevel pre-tokenizer with add_prefix_space".into());
            }
            if pre["use_regex"].as_bool().unwrap_or(true) {
                out.push(GPT2.to_string());
            }
            Ok(())
        }
        Some("Digits") => {
            out.push(if pre["individual_digits"].as_bool() == Some(true) {
                r"\p{N}".into()
            } else {
                r"\p{N}+".into()
            });
            Ok(())
        }
        other => Err(format!(
            "the pre-tokenizer {}",
            other.unwrap_or("(untyped)")
        )),
    }
}

/// Whether the normalizer is NFC (alone or in a sequence); `Err` for any other normalizer.
fn nfc_normalizer(norm: &Value) -> Result<bool, String> {
    match norm["type"].as_str() {
        None if norm.is_null() => Ok(false),
        Some("NFC") => Ok(true),
        Some("Sequence") => {
            let mut nfc = false;
            for n in norm["normalizers"].as_array().into_iter().flatten() {
                nfc |= nfc_normalizer(n)?;
            }
            Ok(nfc)
        }
        other => Err(format!("the normalizer {}", other.unwrap_or("(untyped)"))),
    }
}

/// A token named in tokenizer_config.json: a string or an `{"content": …}` object.
fn token_text(v: &Value) -> Option<&str> {
    v.as_str().or_else(|| v["content"].as_str())
}

/// Ids in `v`: one integer or a list of them.
fn ids(v: &Value) -> Vec<u32> {
    match v {
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64().and_then(|i| u32::try_from(i).ok()))
            .collect(),
        other => other
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .into_iter()
            .collect(),
    }
}

/// Reads the byte-level BPE tokenizer of the model folder `dir`.
pub(crate) fn vocab_from_dir(dir: &Path) -> Result<GgufVocab, TokenizerError> {
    let path = dir.join("tokenizer.json");
    let invalid = |reason: String| TokenizerError::Read {
        path: path.display().to_string(),
        reason,
    };
    let json = read_json(&path)?.ok_or_else(|| invalid("no such file".into()))?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(TokenizerError::UnsupportedModel(format!(
            "{} in {}",
            model["type"],
            path.display()
        )));
    }
    let unsupported = |what: String| {
        TokenizerError::UnsupportedModel(format!(
            "{what} in {} (ult reads byte-level BPE tokenizer.json files)",
            path.display()
        ))
    };
    if model["byte_fallback"].as_bool() == Some(true) {
        return Err(unsupported(
            "a SentencePiece-style BPE with byte fallback".into(),
        ));
    }
    let mut patterns = Vec::new();
    split_patterns(&json["pre_tokenizer"], &mut patterns).map_err(unsupported)?;
    if patterns.is_empty() {
        return Err(unsupported("no byte-level pre-tokenizer".into()));
    }
    let nfc = nfc_normalizer(&json["normalizer"]).map_err(unsupported)?;
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| invalid("model.vocab is not an object".into()))?;
    let mut entries: Vec<(u32, String, i32)> = Vec::with_capacity(vocab.len());
    for (piece, id) in vocab {
        let id = id
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| invalid(format!("the id of {piece:?} is not a token id")))?;
        entries.push((id, piece.clone(), token_type::NORMAL));
    }
    for t in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(content), Some(id)) = (
            t["content"].as_str(),
            t["id"].as_u64().and_then(|i| u32::try_from(i).ok()),
        ) else {
            return Err(invalid(format!(
                "an added token without content or id: {t}"
            )));
        };
        let ty = if t["special"].as_bool() == Some(true) {
            token_type::CONTROL
        } else {
            token_type::USER_DEFINED
        };
        entries.push((id, content.to_string(), ty));
    }
    let n = entries.iter().map(|e| e.0 as usize + 1).max().unwrap_or(0);
    if n > 4_000_000 {
        return Err(invalid(format!("a vocabulary of {n} ids")));
    }
    let mut tokens = vec![String::new(); n];
    let mut token_types = vec![token_type::UNUSED; n];
    for (id, piece, ty) in entries {
        // An added token may restate a vocabulary piece; its type wins.
        tokens[id as usize] = piece;
        token_types[id as usize] = ty;
    }
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| invalid("model.merges is not a list".into()))?
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) => match (pair.first(), pair.get(1)) {
                (Some(Value::String(a)), Some(Value::String(b))) if pair.len() == 2 => {
                    Ok(format!("{a} {b}"))
                }
                _ => Err(invalid(format!("merge {m} is not a pair of pieces"))),
            },
            _ => Err(invalid(format!("merge {m} is not a pair of pieces"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let model_config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
    let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
    let id_of = |text: &str| tokens.iter().position(|t| t == text).map(|i| i as u32);
    // BOS: what the post-processor puts before a single sequence, else the configured one.
    let template_bos = json["post_processor"]["single"]
        .as_array()
        .and_then(|s| s.first())
        .and_then(|first| first["SpecialToken"]["id"].as_str())
        .and_then(id_of)
        .or_else(|| {
            json["post_processor"]["processors"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|p| p["single"].as_array()?.first()?["SpecialToken"]["id"].as_str())
                .and_then(id_of)
        });
    let bos = template_bos
        .or_else(|| token_text(&config["bos_token"]).and_then(id_of))
        .or_else(|| ids(&model_config["bos_token_id"]).first().copied());
    let add_bos = config["add_bos_token"]
        .as_bool()
        .unwrap_or(template_bos.is_some());
    let mut stops: Vec<u32> = token_text(&config["eos_token"])
        .and_then(id_of)
        .into_iter()
        .collect();
    for id in ids(&model_config["eos_token_id"])
        .into_iter()
        .chain(ids(&generation["eos_token_id"]))
    {
        if (id as usize) < n && !stops.contains(&id) {
            stops.push(id);
        }
    }
    Ok(GgufVocab {
        model: "gpt2".into(),
        pre: None,
        pre_patterns: patterns,
        nfc,
        ignore_merges: model["ignore_merges"].as_bool() == Some(true),
        tokens,
        token_types,
        scores: Vec::new(),
        merges,
        bos,
        eos: stops.first().copied(),
        eot: None,
        unk: None,
        add_bos: Some(add_bos),
        add_space_prefix: None,
        stops,
    })
}

/// The chat template of the model folder `dir`: `chat_template.jinja`, else tokenizer_config.json's
/// `chat_template` (a string, or a list of named templates whose "default" is taken).
pub(crate) fn chat_template_from_dir(dir: &Path) -> Result<Option<String>, TokenizerError> {
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(text) => return Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(TokenizerError::Read {
                path: jinja.display().to_string(),
                reason: e.to_string(),
            });
        }
    }
    let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    Ok(match &config["chat_template"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .or_else(|| named.first())
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_tokenizers_become_split_patterns() {
        let mut out = Vec::new();
        let smollm: Value = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}]});
        split_patterns(&smollm, &mut out).unwrap();
        assert_eq!(out, [r"\p{N}".to_string(), GPT2.to_string()]);
        out.clear();
        let qwen: Value = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "a+"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]});
        split_patterns(&qwen, &mut out).unwrap();
        assert_eq!(out, ["a+".to_string()]);
        let removed: Value = serde_json::json!({"type": "Split", "pattern": {"Regex": "a"},
            "behavior": "Removed"});
        assert!(split_patterns(&removed, &mut out).is_err());
        let metaspace: Value = serde_json::json!({"type": "Metaspace"});
        assert!(
            split_patterns(&metaspace, &mut out)
                .unwrap_err()
                .contains("Metaspace")
        );
    }

    #[test]
    fn normalizers() {
        assert!(!nfc_normalizer(&Value::Null).unwrap());
        assert!(nfc_normalizer(&serde_json::json!({"type": "NFC"})).unwrap());
        assert!(nfc_normalizer(&serde_json::json!({"type": "Lowercase"})).is_err());
    }
}
