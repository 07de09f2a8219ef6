//! Turns generated token bytes into text deltas that never split a UTF-8 character and never show any
//! part of a stop sequence.

/// Incremental text output for one generation.
#[derive(Debug, Default)]
pub struct TextStream {
    /// Bytes not yet valid UTF-8 (a character cut between tokens).
    bytes: Vec<u8>,
    /// Text decoded but held back because it might begin a stop sequence.
    held: String,
    stops: Vec<String>,
    stopped: bool,
}

impl TextStream {
    /// A stream that ends at the first of `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    /// Adds a token's bytes; returns the text that can be shown now.
    pub fn push(&mut self, token_bytes: &[u8]) -> Option<String> {
        if self.stopped {
            return None;
        }
        self.bytes.extend_from_slice(token_bytes);
        let valid = match std::str::from_utf8(&self.bytes) {
            Ok(s) => s.len(),
            Err(e) => match e.error_len() {
                // A truly invalid sequence: replace it and keep going.
                Some(_) => {
                    let text = String::from_utf8_lossy(&self.bytes).into_owned();
                    self.bytes.clear();
                    self.held.push_str(&text);
                    return self.release();
                }
                None => e.valid_up_to(),
            },
        };
        let rest = self.bytes.split_off(valid);
        let text = std::mem::replace(&mut self.bytes, rest);
        // `text` is valid UTF-8 by construction.
        self.held.push_str(&String::from_utf8_lossy(&text));
        self.release()
    }

    /// True once a stop sequence matched.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// At the end: whatever is still held (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> Option<String> {
        if self.stopped {
            return None;
        }
        let mut text = std::mem::take(&mut self.held);
        text.push_str(&String::from_utf8_lossy(&std::mem::take(&mut self.bytes)));
        (!text.is_empty()).then_some(text)
    }

    fn release(&mut self) -> Option<String> {
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return (!out.is_empty()).then_some(out);
        }
        // Hold back the longest tail that could still grow into a stop sequence.
        let mut keep_from = self.held.len();
        for stop in &self.stops {
            for (i, _) in self.held.char_indices() {
                if i < keep_from && stop.starts_with(&self.held[i..]) {
                    keep_from = i;
                    break;
                }
            }
        }
        let out: String = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        (!out.is_empty()).then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&[u8]]) -> (Vec<String>, bool) {
        let mut s = TextStream::new(stops.iter().map(|x| x.to_string()).collect());
        let mut out: Vec<String> = pieces.iter().filter_map(|p| s.push(p)).collect();
        out.extend(s.finish());
        (out, s.stopped())
    }

    #[test]
    fn never_splits_a_character() {
        let euro = "€".as_bytes();
        let (out, _) = run(&[], &[b"a", &euro[..1], &euro[1..2], &euro[2..], b"b"]);
        assert_eq!(out, vec!["a", "€", "b"]);
        let (out, _) = run(&[], &["🙂".as_bytes()]);
        assert_eq!(out, vec!["🙂"]);
    }

    #[test]
    fn stop_sequences_are_cut_and_never_shown() {
        let (out, stopped) = run(&["\nUser:"], &[b"Hi", b" there\n", b"Us", b"er:", b" more"]);
        assert_eq!(out.concat(), "Hi there");
        assert!(stopped);
        let (out, stopped) = run(&["END"], &[b"the EN", b"igma"]);
        assert_eq!(out.concat(), "the ENigma");
        assert!(!stopped);
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let (out, _) = run(&[], &[&[0xff], b"ok"]);
        assert_eq!(out.concat(), "\u{FFFD}ok");
        let (out, _) = run(&[], &[&"€".as_bytes()[..2]]);
        assert_eq!(out.concat(), "\u{FFFD}");
    }
}
