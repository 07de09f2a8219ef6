//! BPE merging shared by the byte-level (gpt2) and SentencePiece (llama) vocabularies: a linked list of
//! symbols and a heap of candidate pairs, O(n log n) in the length of a word.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::pretokenize::{BYTE_ENCODER, PreTokenizer};

/// A symbol during merging: a byte range of the word and, once known, its token id.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    end: usize,
    id: Option<u32>,
    prev: usize,
    next: usize,
    alive: bool,
}

const NONE: usize = usize::MAX;

/// A candidate merge of `left` and its successor. Higher `priority` merges first; ties go to the
/// leftmost pair, as in SentencePiece and llama.cpp.
#[derive(Debug)]
struct Candidate {
    priority: f64,
    left: usize,
    right: usize,
    merged: u32,
    len: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .total_cmp(&other.priority)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Merges `initial` symbols of `word` while `pair` finds a merge for adjacent symbols; returns the final
/// symbols as (byte range, id).
fn merge(
    word: &str,
    initial: Vec<(usize, usize, Option<u32>)>,
    pair: impl Fn(&str, (usize, usize, Option<u32>), (usize, usize, Option<u32>)) -> Option<(f64, u32)>,
) -> Vec<(usize, usize, Option<u32>)> {
    let n = initial.len();
    let mut symbols: Vec<Symbol> = initial
        .iter()
        .enumerate()
        .map(|(i, &(start, end, id))| Symbol {
            start,
            end,
            id,
            prev: if i == 0 { NONE } else { i - 1 },
            next: if i + 1 == n { NONE } else { i + 1 },
            alive: true,
        })
        .collect();
    let mut heap = BinaryHeap::new();
    let push = |heap: &mut BinaryHeap<Candidate>, symbols: &[Symbol], left: usize| {
        let right = symbols[left].next;
        if right == NONE {
            return;
        }
        let (l, r) = (&symbols[left], &symbols[right]);
        if let Some((priority, merged)) = pair(word, (l.start, l.end, l.id), (r.start, r.end, r.id))
        {
            heap.push(Candidate {
                priority,
                left,
                right,
                merged,
                len: r.end - l.start,
            });
        }
    };
    for i in 0..n.saturating_sub(1) {
        push(&mut heap, &symbols, i);
    }
    while let Some(c) = heap.pop() {
        let (l, r) = (symbols[c.left], symbols[c.right]);
        // Stale candidates: a side was merged away or grew since this pair was pushed.
        if !l.alive || !r.alive || l.next != c.right || r.end - l.start != c.len {
            continue;
        }
        symbols[c.left].end = r.end;
        symbols[c.left].id = Some(c.merged);
        symbols[c.left].next = r.next;
        symbols[c.right].alive = false;
        if r.next != NONE {
            symbols[r.next].prev = c.left;
        }
        if l.prev != NONE {
            push(&mut heap, &symbols, l.prev);
        }
        push(&mut heap, &symbols, c.left);
    }
    let mut out = Vec::new();
    let mut i = if n == 0 { NONE } else { 0 };
    while i != NONE {
        let s = symbols[i];
        out.push((s.start, s.end, s.id));
        i = s.next;
    }
    out
}

/// What a `tokenizer.json` adds to byte-level BPE.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ByteLevelOptions {
    /// NFC-normalise text before splitting it.
    pub(super) nfc: bool,
    /// A split piece that is itself a token is that token, unmerged (Llama 3's `ignore_merges`).
    pub(super) ignore_merges: bool,
}

/// Byte-level BPE with ranked merges (GPT-2 family: SmolLM2, Llama 3, Qwen 2).
#[derive(Debug)]
pub(super) struct ByteLevelBpe {
    /// (left id, right id) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Token id of each byte's printable character.
    byte_ids: [Option<u32>; 256],
    pretokenizer: PreTokenizer,
    nfc: bool,
    /// Whole pieces by their byte-level spelling, with `ignore_merges`.
    whole: Option<HashMap<String, u32>>,
}

impl ByteLevelBpe {
    /// Builds the model from the vocabulary and "left right" merge rules in rank order.
    pub(super) fn try_new(
        token_to_id: &HashMap<String, u32>,
        merges: &[String],
        pretokenizer: PreTokenizer,
        options: ByteLevelOptions,
    ) -> Result<Self, String> {
        let mut table = HashMap::with_capacity(merges.len());
        for (rank, rule) in merges.iter().enumerate() {
            let Some((a, b)) = rule.split_once(' ') else {
                return Err(format!("merge rule {rank} ({rule:?}) has no space"));
            };
            let (Some(&ia), Some(&ib)) = (token_to_id.get(a), token_to_id.get(b)) else {
                return Err(format!(
                    "merge rule {rank} ({rule:?}) names a token not in the vocabulary"
                ));
            };
            let Some(&merged) = token_to_id.get(&format!("{a}{b}")) else {
                return Err(format!(
                    "merge rule {rank} ({rule:?}) produces a token not in the vocabulary"
                ));
            };
            table.entry((ia, ib)).or_insert((rank as u32, merged));
        }
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = token_to_id.get(&BYTE_ENCODER[b].to_string()).copied();
        }
        Ok(Self {
            merges: table,
            byte_ids,
            pretokenizer,
            nfc: options.nfc,
            whole: options.ignore_merges.then(|| token_to_id.clone()),
        })
    }

    /// Encodes text that contains no special tokens, stopping once `out` holds more than `limit` ids.
    pub(super) fn encode(&self, text: &str, unk: Option<u32>, limit: usize, out: &mut Vec<u32>) {
        use unicode_normalization::UnicodeNormalization;
        let normalized: std::borrow::Cow<'_, str> = if self.nfc
            && unicode_normalization::is_nfc_quick(text.chars())
                != unicode_normalization::IsNormalized::Yes
        {
            text.nfc().collect::<String>().into()
        } else {
            text.into()
        };
        for piece in self.pretokenizer.split(&normalized) {
            if out.len() > limit {
                return;
            }
            if let Some(whole) = &self.whole {
                let spelled: String = piece.bytes().map(|b| BYTE_ENCODER[b as usize]).collect();
                if let Some(&id) = whole.get(&spelled) {
                    out.push(id);
                    continue;
                }
            }
            // Each byte becomes one symbol; the word's "text" is only used for ranges here.
            let initial: Vec<(usize, usize, Option<u32>)> = piece
                .bytes()
                .enumerate()
                .map(|(i, b)| (i, i + 1, self.byte_ids[b as usize]))
                .collect();
            let merged = merge(piece, initial, |_, (_, _, a), (_, _, b)| {
                let (rank, id) = self.merges.get(&(a?, b?))?;
                Some((-(f64::from(*rank)), *id))
            });
            out.extend(merged.into_iter().filter_map(|(_, _, id)| id.or(unk)));
        }
    }
}

/// SentencePiece BPE: merges adjacent symbols whose concatenation is a vocabulary piece, highest score
/// first, then falls back to byte pieces (`<0xAB>`) for what is left unknown.
#[derive(Debug)]
pub(super) struct SentencePieceBpe {
    /// Pieces that merges may produce, with their scores.
    mergeable: HashMap<String, (u32, f32)>,
    /// Every piece (any type) for the final lookup.
    token_to_id: HashMap<String, u32>,
    byte_ids: [Option<u32>; 256],
    add_space_prefix: bool,
}

impl SentencePieceBpe {
    pub(super) fn new(
        pieces: &[String],
        scores: &[f32],
        mergeable: impl Fn(usize) -> bool,
        add_space_prefix: bool,
    ) -> Self {
        let mut table = HashMap::new();
        let mut token_to_id = HashMap::with_capacity(pieces.len());
        let mut byte_ids = [None; 256];
        for (id, piece) in pieces.iter().enumerate() {
            let id32 = id as u32;
            token_to_id.entry(piece.clone()).or_insert(id32);
            if mergeable(id) {
                table
                    .entry(piece.clone())
                    .or_insert((id32, scores.get(id).copied().unwrap_or(0.0)));
            }
            if let Some(byte) = parse_byte_piece(piece) {
                byte_ids[byte as usize].get_or_insert(id32);
            }
        }
        Self {
            mergeable: table,
            token_to_id,
            byte_ids,
            add_space_prefix,
        }
    }

    /// Encodes one fragment of text that contains no special tokens; `first` is true for the start of the
    /// whole input (where a dummy prefix space goes, if the model wants one).
    pub(super) fn encode(&self, text: &str, first: bool, unk: Option<u32>, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut normalized = String::with_capacity(text.len() + 3);
        if self.add_space_prefix && first {
            normalized.push('▁');
        }
        for c in text.chars() {
            normalized.push(if c == ' ' { '▁' } else { c });
        }
        let initial: Vec<(usize, usize, Option<u32>)> = normalized
            .char_indices()
            .map(|(i, c)| {
                let end = i + c.len_utf8();
                (i, end, self.token_to_id.get(&normalized[i..end]).copied())
            })
            .collect();
        let merged = merge(&normalized, initial, |word, (s, _, _), (_, e, _)| {
            let (id, score) = self.mergeable.get(&word[s..e])?;
            Some((f64::from(*score), *id))
        });
        for (start, end, id) in merged {
            match id {
                Some(id) => out.push(id),
                None => {
                    for b in normalized[start..end].bytes() {
                        if let Some(id) = self.byte_ids[b as usize].or(unk) {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }
}

/// `<0x0A>` → 0x0A.
pub(super) fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}
