//! Pre-tokenization for byte-level BPE vocabularies: the GPT-2 byte-to-character table and the split
//! patterns named by GGUF's `tokenizer.ggml.pre`.

use std::sync::LazyLock;

use fancy_regex::Regex;

/// GPT-2's reversible map from bytes to printable characters.
pub(super) static BYTE_ENCODER: LazyLock<[char; 256]> = LazyLock::new(|| {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(c).unwrap_or('\u{FFFD}');
    }
    table
});

/// The inverse of [`BYTE_ENCODER`].
pub(super) fn byte_of(c: char) -> Option<u8> {
    static DECODER: LazyLock<std::collections::HashMap<char, u8>> = LazyLock::new(|| {
        BYTE_ENCODER
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect()
    });
    DECODER.get(&c).copied()
}

/// GPT-2's split pattern (also what a `tokenizer.json` `ByteLevel` pre-tokenizer with `use_regex` applies).
pub(super) const GPT2: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Split patterns applied in sequence; each splits the pieces the previous one produced, keeping both
/// matches and the text between them.
#[derive(Debug)]
pub(super) struct PreTokenizer {
    patterns: Vec<Regex>,
}

impl PreTokenizer {
    /// The pre-tokenizer for a `tokenizer.ggml.pre` name, as llama.cpp defines them; `None` for names
    /// ult does not know.
    pub(super) fn for_name(name: &str) -> Option<Self> {
        let patterns: &[&str] = match name {
            "default" | "gpt2" | "gpt-2" | "starcoder" | "refact" | "olmo" => &[GPT2],
            // SmolLM splits every digit on its own before the GPT-2 pattern.
            "smollm" | "smollm2" => &[r"\p{N}", GPT2],
            "llama-bpe" | "llama3" | "falcon3" => &[LLAMA3],
            "qwen2" | "qwen3" | "deepseek-r1-qwen" => &[QWEN2],
            _ => return None,
        };
        Self::from_patterns(patterns).ok()
    }

    /// The pre-tokenizer of split patterns (as read from a `tokenizer.json`), applied in order.
    pub(super) fn from_patterns(patterns: &[impl AsRef<str>]) -> Result<Self, String> {
        let patterns = patterns
            .iter()
            .map(|p| {
                let p = p.as_ref();
                Regex::new(p).map_err(|e| format!("split pattern {p:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { patterns })
    }

    /// Splits `text` into pieces.
    pub(super) fn split<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut pieces = vec![text];
        for re in &self.patterns {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for piece in pieces {
                let mut last = 0;
                for m in re.find_iter(piece) {
                    // A regex error here means backtracking blew its limit on hostile input: keep the rest
                    // of the piece whole rather than lose it.
                    let Ok(m) = m else { break };
                    if m.start() > last {
                        next.push(&piece[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < piece.len() {
                    next.push(&piece[last..]);
                }
            }
            pieces = next;
        }
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        for b in 0..=255u8 {
            assert_eq!(byte_of(BYTE_ENCODER[b as usize]), Some(b));
        }
        assert_eq!(BYTE_ENCODER[b' ' as usize], 'Ġ');
        assert_eq!(BYTE_ENCODER[b'\n' as usize], 'Ċ');
    }

    fn check(name: &str, text: &str, expected: &[&str]) {
        let p = PreTokenizer::for_name(name).unwrap();
        assert_eq!(p.split(text), expected, "{name}: {text:?}");
    }

    #[test]
    fn splits() {
        check("gpt2", "Hello  world!", &["Hello", " ", " world", "!"]);
        check("gpt2", "it's 2024\n\n", &["it", "'s", " 2024", "\n\n"]);
        check("smollm", "abc123 d", &["abc", "1", "2", "3", " d"]);
        check("llama-bpe", "12345 ok", &["123", "45", " ok"]);
        assert!(PreTokenizer::for_name("klingon").is_none());
    }
}
