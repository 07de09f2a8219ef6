//! The eviction score: Greedy-Dual-Size-Frequency with decaying frequency and a priority multiplier.
//!
//! `H(m) = L + priority(m) · F(m) · C(m) / S(m)`, recomputed whenever `m` is used, where `F` is a use count
//! that halves every `half_life_ms` of disuse, `C` the reload cost in milliseconds (bytes ÷ the load
//! bandwidth measured for that model, plus its fixed start cost) and `S` the bytes that evicting `m`
//! frees. The model with the lowest `H` goes first, and the clock `L` rises to the evicted `H`, so a model
//! that stops being used sinks below newer ones however popular it once was (Cao & Irani 1997;
//! Cherkasova 1998).

/// GDSF parameters and the inflation clock `L`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gdsf {
    /// The inflation value: the score of the last model evicted.
    pub clock: f64,
    /// Frequency halves after this much disuse.
    pub half_life_ms: u64,
}

impl Default for Gdsf {
    fn default() -> Self {
        Self {
            clock: 0.0,
            half_life_ms: 60 * 60 * 1000,
        }
    }
}

impl Gdsf {
    /// Decays `frequency`, last bumped at `last_ms`, to `now_ms`.
    pub fn decayed(&self, frequency: f64, last_ms: u64, now_ms: u64) -> f64 {
        if self.half_life_ms == 0 {
            return frequency;
        }
        let elapsed = now_ms.saturating_sub(last_ms) as f64;
        frequency * (-elapsed / self.half_life_ms as f64 * std::f64::consts::LN_2).exp()
    }

    /// The score of a model used with (decayed) `frequency`, reload cost `cost_ms`, `bytes` big.
    pub fn score(&self, priority: f64, frequency: f64, cost_ms: f64, bytes: u64) -> f64 {
        let bytes = bytes.max(1) as f64;
        let value = sanitize(priority) * sanitize(frequency) * sanitize(cost_ms) / bytes;
        // Scaled to "ms of reload per GiB" so scores read as plain numbers in `ultctl status`.
        self.clock + value * (1u64 << 30) as f64
    }

    /// Raises the clock to the score of an evicted model.
    pub fn on_evict(&mut self, evicted_score: f64) {
        if sanitize(evicted_score) > self.clock {
            self.clock = evicted_score;
        }
    }
}

fn sanitize(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 { x } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequency_halves_per_half_life() {
        let g = Gdsf {
            clock: 0.0,
            half_life_ms: 1000,
        };
        assert!((g.decayed(8.0, 0, 1000) - 4.0).abs() < 1e-9);
        assert!((g.decayed(8.0, 0, 3000) - 1.0).abs() < 1e-9);
        assert_eq!(g.decayed(8.0, 5000, 1000), 8.0);
    }

    #[test]
    fn cheaper_per_byte_goes_first() {
        let g = Gdsf::default();
        // Same use, same bandwidth: the bigger model frees more bytes per ms of reload, so it scores lower
        // only if its reload is relatively cheaper; here a fixed start cost favours keeping the small one.
        let small = g.score(1.0, 1.0, 100.0 + 50.0, 1 << 30);
        let big = g.score(1.0, 1.0, 100.0 * 40.0 + 50.0, 40 << 30);
        assert!(big < small);
        // Priority multiplies.
        assert!(g.score(2.0, 1.0, 10.0, 1 << 20) > g.score(1.0, 1.0, 10.0, 1 << 20));
        // NaN and negatives never poison the ordering.
        assert_eq!(g.score(f64::NAN, -1.0, f64::INFINITY, 0), 0.0);
    }

    #[test]
    fn clock_only_rises() {
        let mut g = Gdsf::default();
        g.on_evict(5.0);
        g.on_evict(3.0);
        g.on_evict(f64::NAN);
        assert_eq!(g.clock, 5.0);
    }
}
