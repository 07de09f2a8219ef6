//! WordPiece for BERT models (`tokenizer.json` with a BertNormalizer and BertPreTokenizer): clean,
//! split CJK characters, lowercase and strip accents, split on whitespace and punctuation, then greedy
//! longest-match with `##` continuations.

use std::collections::HashMap;

use unicode_categories::UnicodeCategories;
use unicode_normalization::UnicodeNormalization;

/// The normalizer and model of a BERT tokenizer.
#[derive(Debug)]
pub(super) struct WordPiece {
    pub(super) vocab: HashMap<String, u32>,
    unk: u32,
    prefix: String,
    max_chars_per_word: usize,
    lowercase: bool,
    strip_accents: bool,
    handle_chinese_chars: bool,
    clean_text: bool,
}

/// Options read from `tokenizer.json`.
#[derive(Debug, Clone)]
pub(super) struct WordPieceOptions {
    pub unk: u32,
    pub prefix: String,
    pub max_chars_per_word: usize,
    pub lowercase: bool,
    /// `None` in the file means "follow lowercase", as in HF's BertNormalizer.
    pub strip_accents: Option<bool>,
    pub handle_chinese_chars: bool,
    pub clean_text: bool,
}

impl WordPiece {
    pub(super) fn new(vocab: HashMap<String, u32>, o: WordPieceOptions) -> Self {
        Self {
            vocab,
            unk: o.unk,
            prefix: o.prefix,
            max_chars_per_word: o.max_chars_per_word,
            strip_accents: o.strip_accents.unwrap_or(o.lowercase),
            lowercase: o.lowercase,
            handle_chinese_chars: o.handle_chinese_chars,
            clean_text: o.clean_text,
        }
    }

    /// Encodes text (without [CLS]/[SEP]), stopping once `out` holds more than `limit` ids.
    pub(super) fn encode(&self, text: &str, limit: usize, out: &mut Vec<u32>) {
        let normalized = self.normalize(text);
        for word in split_words(&normalized) {
            if out.len() > limit {
                return;
            }
            self.word_pieces(word, out);
        }
    }

    fn normalize(&self, text: &str) -> String {
        let mut s = String::with_capacity(text.len());
        for c in text.chars() {
            if self.clean_text {
                if c == '\0' || c == '\u{FFFD}' || is_control(c) {
                    continue;
                }
                if is_whitespace(c) {
                    s.push(' ');
                    continue;
                }
            }
            if self.handle_chinese_chars && is_chinese(c) {
                s.push(' ');
                s.push(c);
                s.push(' ');
            } else {
                s.push(c);
            }
        }
        if self.strip_accents {
            s = s.nfd().filter(|c| !c.is_mark_nonspacing()).collect();
        }
        if self.lowercase {
            s = s.to_lowercase();
        }
        s
    }

    fn word_pieces(&self, word: &str, out: &mut Vec<u32>) {
        if word.chars().count() > self.max_chars_per_word {
            out.push(self.unk);
            return;
        }
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < word.len() {
            let mut end = word.len();
            let mut found = None;
            while end > start {
                let sub = &word[start..end];
                let candidate = if start > 0 {
                    format!("{}{sub}", self.prefix)
                } else {
                    sub.to_string()
                };
                if let Some(&id) = self.vocab.get(&candidate) {
                    found = Some(id);
                    break;
                }
                // Step back one character.
                end = word[..end]
                    .char_indices()
                    .next_back()
                    .map_or(start, |(i, _)| i);
            }
            match found {
                Some(id) => {
                    pieces.push(id);
                    start = end;
                }
                None => {
                    out.push(self.unk);
                    return;
                }
            }
        }
        out.extend(pieces);
    }
}

/// Splits on whitespace, and isolates every punctuation character (BertPreTokenizer).
fn split_words(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    for chunk in text.split(is_whitespace) {
        let mut start = 0;
        for (i, c) in chunk.char_indices() {
            if is_punctuation(c) {
                if i > start {
                    words.push(&chunk[start..i]);
                }
                words.push(&chunk[i..i + c.len_utf8()]);
                start = i + c.len_utf8();
            }
        }
        if start < chunk.len() {
            words.push(&chunk[start..]);
        }
    }
    words
}

fn is_whitespace(c: char) -> bool {
    c.is_whitespace()
}

fn is_control(c: char) -> bool {
    if matches!(c, '\t' | '\n' | '\r') {
        return false;
    }
    c.is_other_control() || c.is_other_format() || c.is_other_private_use()
}

fn is_punctuation(c: char) -> bool {
    let u = c as u32;
    (33..=47).contains(&u)
        || (58..=64).contains(&u)
        || (91..=96).contains(&u)
        || (123..=126).contains(&u)
        || c.is_punctuation()
}

fn is_chinese(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}
