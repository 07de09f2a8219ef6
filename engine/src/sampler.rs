//! Token sampling: greedy, temperature, top-k, top-p and repetition penalty, with a seeded generator so
//! the same seed gives the same text.

use super::EngineError;

/// How to pick the next token. Validated by [`SamplingParams::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (None or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set whose probability reaches `p` (None or 1: all).
    pub top_p: Option<f32>,
    /// Drop tokens less likely than `min_p` times the most likely one (None or 0: none).
    pub min_p: Option<f32>,
    /// Divides positive (multiplies negative) logits of recently seen tokens; 1 is off.
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the generator; None draws one.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks every field, naming the bad one.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |field: &'static str, reason: String| {
            Err(EngineError::InvalidParameter { field, reason })
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!("{} is not a finite number ≥ 0", self.temperature),
            );
        }
        if self.temperature > 100.0 {
            return bad(
                "temperature",
                format!("{} is above the maximum of 100", self.temperature),
            );
        }
        if let Some(p) = self.top_p
            && !(p.is_finite() && p > 0.0 && p <= 1.0)
        {
            return bad("top_p", format!("{p} is not in (0, 1]"));
        }
        if let Some(p) = self.min_p
            && !(p.is_finite() && (0.0..=1.0).contains(&p))
        {
            return bad("min_p", format!("{p} is not in [0, 1]"));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(
                "repetition_penalty",
                format!("{} is not a finite number > 0", self.repetition_penalty),
            );
        }
        if self.repeat_last_n > 1 << 20 {
            return bad(
                "repeat_last_n",
                format!("{} is too large", self.repeat_last_n),
            );
        }
        Ok(())
    }

    /// True for greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }
}

/// xoshiro256** seeded through SplitMix64: small, fast, and stable across builds.
#[derive(Debug, Clone)]
struct Rng {
    s: [u64; 4],
}

impl Rng {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A sampler for one generation.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    /// A sampler; without a seed, one is drawn from the OS's hasher keys and the clock.
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            h.finish()
        });
        Self {
            params,
            rng: Rng::new(seed),
        }
    }

    /// Picks the next token from `logits` (modified in place) given the tokens so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen: Vec<u32> = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.is_greedy() {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        if let Some(k) = p.top_k.filter(|&k| k > 0 && k < candidates.len()) {
            candidates
                .select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            candidates.truncate(k);
        }
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let max = candidates[0].1;
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|(_, l)| f64::from(l - max).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        for x in &mut probs {
            *x /= total;
        }
        if let Some(min_p) = p.min_p.filter(|&m| m > 0.0) {
            // Sorted, so the first is the most likely: keep those at least `min_p` times as likely.
            let floor = probs[0] * f64::from(min_p);
            let keep = probs.iter().take_while(|&&x| x >= floor).count().max(1);
            probs.truncate(keep);
            candidates.truncate(keep);
            let total: f64 = probs.iter().sum();
            for x in &mut probs {
                *x /= total;
            }
        }
        if let Some(top_p) = p.top_p.filter(|&t| t < 1.0) {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, x) in probs.iter().enumerate() {
                cumulative += x;
                if cumulative >= f64::from(top_p) {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            candidates.truncate(keep);
            let total: f64 = probs.iter().sum();
            for x in &mut probs {
                *x /= total;
            }
        }
        let mut r = self.rng.next_f64();
        for (i, x) in probs.iter().enumerate() {
            if r < *x {
                return candidates[i].0;
            }
            r -= x;
        }
        candidates[candidates.len() - 1].0
    }
}

/// The log-probability of `chosen` under the softmax of `logits` (the model's own distribution: before
/// penalties, temperature and any grammar), with the `top` most likely ids and theirs, most likely first.
pub fn logprobs(logits: &[f32], chosen: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| f64::from(l - max).exp())
        .sum();
    let log_z = f64::from(max) + sum.ln();
    let lp = |id: u32| {
        logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |&l| (f64::from(l) - log_z) as f32)
    };
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut all: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let k = top.min(all.len());
        if k > 0 && k < all.len() {
            all.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            all.truncate(k);
        }
        all.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        best = all.into_iter().map(|(i, _)| (i, lp(i))).collect();
    }
    (lp(chosen), best)
}

/// The index of the largest finite logit (the lowest index on ties; 0 if none is finite).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_value {
            best = i;
            best_value = l;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_and_penalty() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[]), 1);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        });
        // 3.0 / 2 = 1.5 < 2.0: the repeated token loses.
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[1]), 2);
    }

    #[test]
    fn same_seed_same_choices() {
        let logits = vec![1.0f32, 1.1, 0.9, 1.05, 0.2];
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..params(1.0)
            });
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_choice() {
        let logits = vec![5.0f32, 4.9, -10.0, -10.0];
        let mut s = Sampler::new(SamplingParams {
            top_k: Some(2),
            seed: Some(1),
            ..params(5.0)
        });
        for _ in 0..100 {
            assert!(s.sample(&mut logits.clone(), &[]) < 2);
        }
        let mut s = Sampler::new(SamplingParams {
            top_p: Some(0.01),
            seed: Some(1),
            ..params(1.0)
        });
        for _ in 0..100 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 0);
        }
        // 4.9 is e^-0.1 ≈ 0.9 times as likely as 5.0: min_p 0.95 drops it, 0.5 keeps it.
        let mut s = Sampler::new(SamplingParams {
            min_p: Some(0.95),
            seed: Some(1),
            ..params(1.0)
        });
        for _ in 0..100 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 0);
        }
        let mut s = Sampler::new(SamplingParams {
            min_p: Some(0.5),
            seed: Some(1),
            ..params(1.0)
        });
        assert!((0..100).any(|_| s.sample(&mut logits.clone(), &[]) == 1));
    }

    #[test]
    fn logprobs_are_a_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let (lp, top) = logprobs(&logits, 2, 2);
        let z: f64 = [1.0f64, 3.0, 2.0].iter().map(|x| x.exp()).sum();
        assert!((f64::from(lp) - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!(top[0].1 > top[1].1 && top[0].1 < 0.0);
        assert_eq!(logprobs(&logits, 3, 0).0, f32::NEG_INFINITY);
    }

    #[test]
    fn validation_names_the_field() {
        let check = |p: SamplingParams, field: &str| match p.validate() {
            Err(EngineError::InvalidParameter { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{other:?}"),
        };
        check(params(-1.0), "temperature");
        check(params(f32::NAN), "temperature");
        check(
            SamplingParams {
                top_p: Some(0.0),
                ..params(1.0)
            },
            "top_p",
        );
        check(
            SamplingParams {
                top_p: Some(1.5),
                ..params(1.0)
            },
            "top_p",
        );
        check(
            SamplingParams {
                repetition_penalty: 0.0,
                ..params(1.0)
            },
            "repetition_penalty",
        );
        assert!(params(0.7).validate().is_ok());
    }
}
