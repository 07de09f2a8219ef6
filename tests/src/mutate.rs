//! A small deterministic mutator for the fuzz smoke run on stable Rust: byte flips, interesting values,
//! truncation, duplication, insertion and splicing, seeded so every CI run executes the same inputs.
//! libFuzzer (`fuzz/`, `scripts/fuzz.sh`) is the real fuzzer; this only keeps its targets honest in CI.

/// A seeded mutator.
pub struct Mutator {
    state: u64,
}

/// Integers that break parsers: zero, one, sign and width boundaries.
const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

impl Mutator {
    /// A mutator whose sequence depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// SplitMix64.
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// One to four mutations of a randomly chosen corpus entry (`corpus` must not be empty).
    pub fn mutate(&mut self, corpus: &[Vec<u8>]) -> Vec<u8> {
        let mut v = corpus[self.below(corpus.len())].clone();
        for _ in 0..1 + self.below(4) {
            self.mutate_once(&mut v, corpus);
        }
        v
    }

    fn mutate_once(&mut self, v: &mut Vec<u8>, corpus: &[Vec<u8>]) {
        let len = v.len();
        match self.below(8) {
            // Flip a bit.
            0 if len > 0 => {
                let i = self.below(len);
                v[i] ^= 1 << self.below(8);
            }
            // Overwrite a byte.
            1 if len > 0 => {
                let i = self.below(len);
                v[i] = self.next() as u8;
            }
            // Overwrite 1, 2, 4 or 8 bytes with an interesting little-endian integer (GGUF lengths,
            // counts and dimensions are little-endian u32/u64).
            2 if len > 0 => {
                let width = 1 << self.below(4);
                let i = self.below(len);
                let value = INTERESTING[self.below(INTERESTING.len())].to_le_bytes();
                for (k, b) in value.iter().take(width).enumerate() {
                    if let Some(slot) = v.get_mut(i + k) {
                        *slot = *b;
                    }
                }
            }
            // Truncate.
            3 if len > 0 => v.truncate(self.below(len)),
            // Duplicate a chunk in place.
            4 if len > 0 => {
                let a = self.below(len);
                let b = (a + 1 + self.below(64)).min(len);
                let chunk = v[a..b].to_vec();
                let at = self.below(len);
                v.splice(at..at, chunk);
            }
            // Delete a chunk.
            5 if len > 0 => {
                let a = self.below(len);
                let b = (a + 1 + self.below(64)).min(len);
                v.drain(a..b);
            }
            // Splice in part of another corpus entry.
            6 => {
                let other = &corpus[self.below(corpus.len())];
                if !other.is_empty() {
                    let a = self.below(other.len());
                    let b = (a + 1 + self.below(256)).min(other.len());
                    let at = self.below(len + 1);
                    v.splice(at..at, other[a..b].iter().copied());
                }
            }
            // Insert random bytes.
            _ => {
                let at = self.below(len + 1);
                let n = 1 + self.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| self.next() as u8).collect();
                v.splice(at..at, bytes);
            }
        }
    }
}
