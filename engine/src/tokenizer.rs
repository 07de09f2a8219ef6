//! Tokenizers built from the model files themselves: byte-level BPE for GGUF `gpt2` vocabularies,
//! SentencePiece BPE with byte fallback for GGUF `llama` vocabularies (merges derived from the scores),
//! and WordPiece for BERT's `tokenizer.json`. Special tokens (control and user-defined pieces) are
//! matched whole before any merging, so chat tags like `<|im_start|>` stay one token.

mod bpe;
pub(crate) mod hf_json;
mod pretokenize;
mod wordpiece;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::EngineError;
use crate::constraint::{GrammarEnv, LazyGrammarEnv};

use bpe::{ByteLevelBpe, SentencePieceBpe, parse_byte_piece};
use pretokenize::{PreTokenizer, byte_of};
use wordpiece::{WordPiece, WordPieceOptions};

/// Why a tokenizer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The file names a tokenizer model ult does not implement.
    #[error("unsupported tokenizer model {0:?} (ult supports gpt2, llama and BERT WordPiece)")]
    UnsupportedModel(String),
    /// The vocabulary metadata is inconsistent.
    #[error("invalid tokenizer metadata: {0}")]
    Invalid(String),
    /// A tokenizer.json could not be read.
    #[error("cannot read tokenizer {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// GGUF token types (llama.cpp's `llama_token_type`).
pub mod token_type {
    /// An ordinary piece.
    pub const NORMAL: i32 = 1;
    /// The unknown piece.
    pub const UNKNOWN: i32 = 2;
    /// A control token (BOS, EOS, chat tags): never produced from text by merging, rendered as nothing.
    pub const CONTROL: i32 = 3;
    /// A user-defined piece: matched whole in text.
    pub const USER_DEFINED: i32 = 4;
    /// An unused slot.
    pub const UNUSED: i32 = 5;
    /// A byte-fallback piece (`<0x0A>`).
    pub const BYTE: i32 = 6;
}

/// The tokenizer fields of a GGUF file, as plain data.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: "gpt2" or "llama".
    pub model: String,
    /// `tokenizer.ggml.pre`, for gpt2 vocabularies.
    pub pre: Option<String>,
    /// The pieces, by id.
    pub tokens: Vec<String>,
    /// Token types (see [`token_type`]); empty means all normal.
    pub token_types: Vec<i32>,
    /// SentencePiece scores.
    pub scores: Vec<f32>,
    /// BPE merges ("left right"), in rank order.
    pub merges: Vec<String>,
    /// Beginning-of-sequence id.
    pub bos: Option<u32>,
    /// End-of-sequence id.
    pub eos: Option<u32>,
    /// End-of-turn id, when the file names one.
    pub eot: Option<u32>,
    /// Unknown-token id.
    pub unk: Option<u32>,
    /// Whether a BOS token starts every sequence.
    pub add_bos: Option<bool>,
    /// Whether SentencePiece adds a dummy space before the text.
    pub add_space_prefix: Option<bool>,
    /// Split patterns read from a `tokenizer.json`'s pre-tokenizer, applied in order; when not empty
    /// they replace the patterns `pre` names.
    pub pre_patterns: Vec<String>,
    /// Whether text is NFC-normalised before splitting (a `tokenizer.json` NFC normalizer).
    pub nfc: bool,
    /// Whether a split piece that is itself a vocabulary token skips merging (`ignore_merges`).
    pub ignore_merges: bool,
    /// Further ids that end generation (a model folder's `eos_token_id` lists).
    pub stops: Vec<u32>,
}

#[derive(Debug)]
enum Model {
    ByteLevel(ByteLevelBpe),
    SentencePiece(SentencePieceBpe),
    WordPiece(WordPiece),
}

/// Special tokens matched whole, grouped by first character, longest first.
#[derive(Debug, Default)]
struct Specials {
    by_first: HashMap<char, Vec<(String, u32)>>,
}

impl Specials {
    fn insert(&mut self, text: &str, id: u32) {
        if let Some(c) = text.chars().next() {
            self.by_first
                .entry(c)
                .or_default()
                .push((text.to_string(), id));
        }
    }

    fn finish(&mut self) {
        for v in self.by_first.values_mut() {
            v.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        }
    }

    /// Splits text into plain fragments and special-token ids.
    fn partition<'a>(&self, text: &'a str) -> Vec<Fragment<'a>> {
        let mut out = Vec::new();
        let mut plain_start = 0;
        let mut iter = text.char_indices();
        while let Some((i, c)) = iter.next() {
            let Some(candidates) = self.by_first.get(&c) else {
                continue;
            };
            let rest = &text[i..];
            if let Some((s, id)) = candidates
                .iter()
                .find(|(s, _)| rest.starts_with(s.as_str()))
            {
                if i > plain_start {
                    out.push(Fragment::Text(&text[plain_start..i]));
                }
                out.push(Fragment::Special(*id));
                plain_start = i + s.len();
                // Skip the characters of the match.
                while iter.clone().next().is_some_and(|(j, _)| j < plain_start) {
                    iter.next();
                }
            }
        }
        if plain_start < text.len() {
            out.push(Fragment::Text(&text[plain_start..]));
        }
        out
    }
}

enum Fragment<'a> {
    Text(&'a str),
    Special(u32),
}

/// A tokenizer: text to ids and ids back to bytes.
#[derive(Debug)]
pub struct Tokenizer {
    model: Model,
    specials: Specials,
    /// Bytes each id decodes to (empty for control tokens).
    decoded: Vec<Vec<u8>>,
    unk: Option<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    /// BERT's [CLS] and [SEP].
    bert_wrap: Option<(u32, u32)>,
    stop_ids: Vec<u32>,
    kind: &'static str,
    /// The most input bytes one token covers (the longest piece or special token): a text of `n` bytes
    /// has at least `n / max_piece_bytes` tokens, so a text too long for any context is refused unread.
    max_piece_bytes: usize,
    /// The grammar index over this vocabulary, built on the first constrained request.
    grammar: LazyGrammarEnv,
}

/// A text has more tokens than the limit it was encoded against; encoding stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the text has more than {limit} tokens (at least {at_least})")]
pub struct TooManyTokens {
    /// The limit.
    pub limit: usize,
    /// Tokens known so far (a lower bound of the whole text's count).
    pub at_least: usize,
}

fn max_piece_bytes(decoded: &[Vec<u8>], specials: &Specials) -> usize {
    let pieces = decoded.iter().map(Vec::len).max().unwrap_or(1);
    let special = specials
        .by_first
        .values()
        .flatten()
        .map(|(s, _)| s.len())
        .max()
        .unwrap_or(1);
    pieces.max(special).max(1)
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(v: &GgufVocab) -> Result<Self, TokenizerError> {
        let n = v.tokens.len();
        if n == 0 {
            return Err(TokenizerError::Invalid("the vocabulary is empty".into()));
        }
        if !v.token_types.is_empty() && v.token_types.len() != n {
            return Err(TokenizerError::Invalid(format!(
                "{} token types for {n} tokens",
                v.token_types.len()
            )));
        }
        for (what, id) in [
            ("bos", v.bos),
            ("eos", v.eos),
            ("eot", v.eot),
            ("unk", v.unk),
        ] {
            if let Some(id) = id
                && id as usize >= n
            {
                return Err(TokenizerError::Invalid(format!(
                    "{what} id {id} is outside the vocabulary of {n}"
                )));
            }
        }
        let ttype = |i: usize| v.token_types.get(i).copied().unwrap_or(token_type::NORMAL);
        let mut specials = Specials::default();
        for (i, t) in v.tokens.iter().enumerate() {
            if matches!(ttype(i), token_type::CONTROL | token_type::USER_DEFINED) && !t.is_empty() {
                specials.insert(t, i as u32);
            }
        }
        specials.finish();
        let (model, kind, decoded): (Model, &str, Vec<Vec<u8>>) = match v.model.as_str() {
            "gpt2" => {
                let pre = if v.pre_patterns.is_empty() {
                    let pre_name = v.pre.as_deref().unwrap_or("default");
                    PreTokenizer::for_name(pre_name).or_else(|| {
                        tracing::warn!(
                            pre = pre_name,
                            "unknown pre-tokenizer; using GPT-2's pattern"
                        );
                        PreTokenizer::for_name("gpt2")
                    })
                } else {
                    Some(
                        PreTokenizer::from_patterns(&v.pre_patterns)
                            .map_err(TokenizerError::Invalid)?,
                    )
                };
                let pre = pre.ok_or_else(|| TokenizerError::Invalid("no pre-tokenizer".into()))?;
                let token_to_id: HashMap<String, u32> = v
                    .tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.clone(), i as u32))
                    .collect();
                let options = bpe::ByteLevelOptions {
                    nfc: v.nfc,
                    ignore_merges: v.ignore_merges,
                };
                let bpe = ByteLevelBpe::try_new(&token_to_id, &v.merges, pre, options)
                    .map_err(TokenizerError::Invalid)?;
                let decoded = v
                    .tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| match ttype(i) {
                        token_type::CONTROL => Vec::new(),
                        token_type::USER_DEFINED => t.as_bytes().to_vec(),
                        _ => byte_level_bytes(t),
                    })
                    .collect();
                (Model::ByteLevel(bpe), "gpt2", decoded)
            }
            "llama" => {
                if v.scores.len() != n {
                    return Err(TokenizerError::Invalid(format!(
                        "{} scores for {n} tokens",
                        v.scores.len()
                    )));
                }
                let spm = SentencePieceBpe::new(
                    &v.tokens,
                    &v.scores,
                    |i| matches!(ttype(i), token_type::NORMAL | token_type::USER_DEFINED),
                    v.add_space_prefix.unwrap_or(true),
                );
                let decoded = v
                    .tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| match ttype(i) {
                        token_type::CONTROL | token_type::UNKNOWN | token_type::UNUSED => {
                            Vec::new()
                        }
                        token_type::BYTE => parse_byte_piece(t).map_or_else(Vec::new, |b| vec![b]),
                        _ => t.replace('▁', " ").into_bytes(),
                    })
                    .collect();
                (Model::SentencePiece(spm), "llama", decoded)
            }
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let mut stop_ids: Vec<u32> = [v.eos, v.eot].into_iter().flatten().collect();
        for &id in &v.stops {
            if (id as usize) < n && !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        for name in [
            "<|im_end|>",
            "<end_of_turn>",
            "<|eot_id|>",
            "<|endoftext|>",
            "<|end|>",
            "<eos>",
        ] {
            if let Some(i) = v.tokens.iter().position(|t| t == name)
                && ttype(i) == token_type::CONTROL
                && !stop_ids.contains(&(i as u32))
            {
                stop_ids.push(i as u32);
            }
        }
        Ok(Self {
            model,
            unk: v.unk,
            bos: v.bos,
            eos: v.eos,
            add_bos: v.add_bos.unwrap_or(false),
            bert_wrap: None,
            stop_ids,
            kind,
            max_piece_bytes: max_piece_bytes(&decoded, &specials),
            grammar: LazyGrammarEnv::default(),
            specials,
            decoded,
        })
    }

    /// Reads the byte-level BPE `tokenizer.json` of a Hugging Face or MLX model folder (with the
    /// `tokenizer_config.json`, `config.json` and `generation_config.json` beside it).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        Self::from_gguf(&hf_json::vocab_from_dir(dir)?)
    }

    /// Reads a BERT `tokenizer.json` (WordPiece with a BertNormalizer).
    pub fn from_bert_json(path: &Path) -> Result<Self, TokenizerError> {
        let read_err = |reason: String| TokenizerError::Read {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| read_err(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| read_err(e.to_string()))?;
        let model = &json["model"];
        if model["type"] != "WordPiece" {
            return Err(TokenizerError::UnsupportedModel(model["type"].to_string()));
        }
        let vocab: HashMap<String, u32> = model["vocab"]
            .as_object()
            .ok_or_else(|| TokenizerError::Invalid("tokenizer.json has no model.vocab".into()))?
            .iter()
            .filter_map(|(k, v)| v.as_u64().map(|id| (k.clone(), id as u32)))
            .collect();
        let id_of = |name: &str| {
            vocab
                .get(name)
                .copied()
                .ok_or_else(|| TokenizerError::Invalid(format!("vocabulary lacks {name}")))
        };
        let unk_name = model["unk_token"].as_str().unwrap_or("[UNK]");
        let unk = id_of(unk_name)?;
        let cls = id_of("[CLS]")?;
        let sep = id_of("[SEP]")?;
        let norm = &json["normalizer"];
        let options = WordPieceOptions {
            unk,
            prefix: model["continuing_subword_prefix"]
                .as_str()
                .unwrap_or("##")
                .to_string(),
            max_chars_per_word: model["max_input_chars_per_word"].as_u64().unwrap_or(100) as usize,
            lowercase: norm["lowercase"].as_bool().unwrap_or(true),
            strip_accents: norm["strip_accents"].as_bool(),
            handle_chinese_chars: norm["handle_chinese_chars"].as_bool().unwrap_or(true),
            clean_text: norm["clean_text"].as_bool().unwrap_or(true),
        };
        let mut specials = Specials::default();
        if let Some(added) = json["added_tokens"].as_array() {
            for t in added {
                if let (Some(content), Some(id)) = (t["content"].as_str(), t["id"].as_u64()) {
                    specials.insert(content, id as u32);
                }
            }
        }
        specials.finish();
        let size = vocab.values().copied().max().map_or(0, |m| m as usize + 1);
        let mut decoded = vec![Vec::new(); size];
        for (piece, &id) in &vocab {
            decoded[id as usize] = piece.as_bytes().to_vec();
        }
        Ok(Self {
            model: Model::WordPiece(WordPiece::new(vocab, options)),
            max_piece_bytes: max_piece_bytes(&decoded, &specials),
            grammar: LazyGrammarEnv::default(),
            specials,
            decoded,
            unk: Some(unk),
            bos: None,
            eos: None,
            add_bos: false,
            bert_wrap: Some((cls, sep)),
            stop_ids: Vec::new(),
            kind: "wordpiece",
        })
    }

    /// Encodes `text`. Special tokens written in the text become their ids. With `add_special`, a BOS is
    /// prepended where the model wants one (BERT gets [CLS] … [SEP]).
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<u32> {
        self.encode_into(text, add_special, usize::MAX).0
    }

    /// Encodes `text` like [`encode`](Self::encode), but stops as soon as it has more than `limit`
    /// tokens, so a text far beyond a model's context costs neither the time nor the memory of its whole
    /// encoding. A text longer than `limit` × the longest piece is refused before any work.
    pub fn encode_limited(
        &self,
        text: &str,
        add_special: bool,
        limit: usize,
    ) -> Result<Vec<u32>, TooManyTokens> {
        self.fits_by_length(text.len(), limit)?;
        match self.encode_into(text, add_special, limit) {
            (ids, false) => Ok(ids),
            (ids, true) => Err(TooManyTokens {
                limit,
                at_least: ids.len(),
            }),
        }
    }

    /// Encodes `text` keeping at most its first `limit` tokens (a BERT input still ends with [SEP]):
    /// what a client that asked for truncation gets. Tokenizing stops just past the limit.
    pub fn encode_truncated(&self, text: &str, add_special: bool, limit: usize) -> Vec<u32> {
        let (mut ids, over) = self.encode_into(text, add_special, limit);
        if over {
            ids.truncate(limit);
            if add_special
                && let Some((_, sep)) = self.bert_wrap
                && let Some(last) = ids.last_mut()
            {
                *last = sep;
            }
        }
        ids
    }

    /// Refuses, from its length alone, a text of `bytes` bytes that cannot encode to `limit` tokens or
    /// fewer (no token covers more bytes than the longest piece).
    pub fn fits_by_length(&self, bytes: usize, limit: usize) -> Result<(), TooManyTokens> {
        let at_least = bytes.div_ceil(self.max_piece_bytes);
        if at_least > limit {
            return Err(TooManyTokens { limit, at_least });
        }
        Ok(())
    }

    /// The longest text, in bytes, that can fit in `tokens` tokens.
    pub fn max_bytes_for(&self, tokens: usize) -> usize {
        tokens.saturating_mul(self.max_piece_bytes)
    }

    /// Encodes until done or past `limit` tokens; true when it stopped early.
    fn encode_into(&self, text: &str, add_special: bool, limit: usize) -> (Vec<u32>, bool) {
        let mut out = Vec::with_capacity((text.len() / 3 + 2).min(limit.saturating_add(2)));
        if add_special {
            if let Some((cls, _)) = self.bert_wrap {
                out.push(cls);
            } else if self.add_bos
                && let Some(bos) = self.bos
            {
                out.push(bos);
            }
        }
        let mut first = true;
        for fragment in self.specials.partition(text) {
            match fragment {
                Fragment::Special(id) => out.push(id),
                Fragment::Text(t) => match &self.model {
                    Model::ByteLevel(m) => m.encode(t, self.unk, limit, &mut out),
                    Model::SentencePiece(m) => m.encode(t, first, self.unk, &mut out),
                    Model::WordPiece(m) => m.encode(t, limit, &mut out),
                },
            }
            first = false;
            if out.len() > limit {
                return (out, true);
            }
        }
        if add_special && let Some((_, sep)) = self.bert_wrap {
            out.push(sep);
        }
        let over = out.len() > limit;
        (out, over)
    }

    /// The bytes `id` decodes to (empty for control tokens and unknown ids).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.decoded.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Each id's bytes as the grammar index wants them: text tokens their bytes, special tokens their
    /// text behind llguidance's 0xFF marker (so no grammar can spell them as text), others nothing.
    pub fn grammar_words(&self) -> Vec<Vec<u8>> {
        let mut words = self.decoded.clone();
        for (text, id) in self.specials.by_first.values().flatten() {
            if let Some(w) = words.get_mut(*id as usize)
                && w.is_empty()
            {
                let mut marked = vec![0xff];
                marked.extend_from_slice(text.as_bytes());
                *w = marked;
            }
        }
        words
    }

    /// The grammar index over this vocabulary (built on first use, then shared).
    pub fn grammar(&self) -> Result<Arc<GrammarEnv>, EngineError> {
        self.grammar.get(self)
    }

    /// Decodes ids to text (invalid UTF-8 becomes U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.token_bytes(id).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// True for tokens that end generation (EOS, end-of-turn tags).
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// The ids that end generation.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The BOS token, if the vocabulary has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The EOS token, if the vocabulary has one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The piece text of `id` as stored in the vocabulary-derived decode table, for templates.
    pub fn piece_text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.token_bytes(id)).into_owned()
    }

    /// The number of ids.
    pub fn vocab_size(&self) -> usize {
        self.decoded.len()
    }

    /// "gpt2", "llama" or "wordpiece".
    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

/// Maps a byte-level piece back to bytes; characters outside the byte table stand for themselves.
fn byte_level_bytes(piece: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(piece.len());
    for c in piece.chars() {
        match byte_of(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_spm() -> Tokenizer {
        // A toy SentencePiece vocabulary: merges follow scores; "é" is not a piece, so it falls back to bytes.
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![
            token_type::UNKNOWN,
            token_type::CONTROL,
            token_type::CONTROL,
        ];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(token_type::BYTE);
            scores.push(0.0);
        }
        for (piece, score) in [
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -3.0),
            ("ab", -4.0),
            ("▁ab", -5.0),
            ("▁a", -9.0),
        ] {
            tokens.push(piece.into());
            types.push(token_type::NORMAL);
            scores.push(score);
        }
        Tokenizer::from_gguf(&GgufVocab {
            model: "llama".into(),
            tokens,
            token_types: types,
            scores,
            bos: Some(1),
            eos: Some(2),
            unk: Some(0),
            add_bos: Some(true),
            add_space_prefix: Some(true),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
        let t = tiny_spm();
        let ab = t.encode("ab", false);
        // "▁ab": "ab" (-4) merges before "▁a" (-9), then "▁"+"ab" → "▁ab".
        assert_eq!(t.decode(&ab), " ab");
        assert_eq!(ab.len(), 1);
        let e = t.encode("é", true);
        assert_eq!(e[0], 1, "BOS first");
        assert_eq!(e.len(), 4, "BOS, ▁, and two byte pieces: {e:?}");
        assert_eq!(t.decode(&e), " é");
        assert!(t.is_stop(2));
        assert_eq!(
            t.encode("a</s>b", false)
                .iter()
                .filter(|&&i| i == 2)
                .count(),
            1
        );
    }
}
