//! The eviction score and the choice of victims.
//!
//! A model's score is `priority · F · C / S`: its expected reuse `F` (a use count that halves every
//! `half_life_ms` of disuse), times its reload cost `C` in milliseconds (measured: the last load's wall
//! time; before any load, bytes ÷ an assumed bandwidth), divided by the bytes `S` evicting it frees — the
//! Greedy-Dual-Size-Frequency family (Cao & Irani 1997; Cherkasova 1998). GDSF ages stale popularity with an
//! inflation clock; ult ages it with the explicit decay of `F`, which has the same effect and keeps the
//! score a plain number in time.
//!
//! Victims are not simply the lowest scores: to free `need` bytes ult picks the set of models with the least
//! total expected reload cost (`Σ score · S = Σ priority · F · C`) that frees enough — a minimum-cost cover
//! solved exactly by dynamic programming. Greedy score order can evict a 140 GB model where two 8 GB ones
//! would do, or the reverse; the cover does not.

/// Score parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Gdsf {
    /// Frequency halves after this much disuse.
    pub half_life_ms: u64,
}

impl Default for Gdsf {
    fn default() -> Self {
        Self {
            half_life_ms: 6 * 60 * 60 * 1000,
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

    /// The expected cost of reloading a model used with (decayed) `frequency` and reload cost `cost_ms`:
    /// what evicting it risks.
    pub fn eviction_cost(&self, priority: f64, frequency: f64, cost_ms: f64) -> f64 {
        sanitize(priority) * sanitize(frequency) * sanitize(cost_ms)
    }

    /// The score per GiB freed (higher stays longer).
    pub fn score(&self, priority: f64, frequency: f64, cost_ms: f64, bytes: u64) -> f64 {
        self.eviction_cost(priority, frequency, cost_ms) / bytes.max(1) as f64 * (1u64 << 30) as f64
    }
}

fn sanitize(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 { x } else { 0.0 }
}

/// The cheapest set of items that frees at least `need_bytes` and counts at least `need_count` items, by
/// total cost. `items` are `(bytes, cost)`; the answer lists indices in ascending order, or `None` when
/// even all of them are not enough. Exact up to rounding sizes down to 1/1024 of `need_bytes` (so the set
/// always frees at least what is needed). Ties go to fewer bytes freed, then to lower indices.
pub fn cheapest_cover(
    items: &[(u64, f64)],
    need_bytes: u64,
    need_count: usize,
) -> Option<Vec<usize>> {
    let total: u64 = items.iter().map(|i| i.0).fold(0, u64::saturating_add);
    if total < need_bytes || items.len() < need_count {
        return None;
    }
    if need_bytes == 0 && need_count == 0 {
        return Some(Vec::new());
    }
    const BUCKETS: u64 = 1024;
    let unit = need_bytes.div_ceil(BUCKETS).max(1);
    let need_units = need_bytes.div_ceil(unit) as usize;
    let width = need_units + 1;
    let counts = need_count + 1;
    let cell = |u: usize, c: usize| c * width + u;
    // best[(units, count)] = (cost, bytes, chosen item bitset as a sorted list index chain)
    let mut best: Vec<Option<(f64, u64)>> = vec![None; width * counts];
    let mut choice: Vec<Vec<Option<usize>>> = Vec::with_capacity(items.len());
    best[cell(0, 0)] = Some((0.0, 0));
    for &(bytes, cost) in items {
        let add = (bytes / unit) as usize;
        let cost = if cost.is_finite() && cost >= 0.0 {
            cost
        } else {
            0.0
        };
        let mut next = best.clone();
        let mut took = vec![None; width * counts];
        for c in 0..counts {
            for u in 0..width {
                let Some((base_cost, base_bytes)) = best[cell(u, c)] else {
                    continue;
                };
                let (nu, nc) = ((u + add).min(need_units), (c + 1).min(need_count));
                let candidate = (base_cost + cost, base_bytes.saturating_add(bytes));
                let better = match next[cell(nu, nc)] {
                    None => true,
                    Some((bc, bb)) => candidate.0 < bc || (candidate.0 == bc && candidate.1 < bb),
                };
                if better {
                    next[cell(nu, nc)] = Some(candidate);
                    took[cell(nu, nc)] = Some(cell(u, c));
                }
            }
        }
        best = next;
        choice.push(took);
    }
    // Walk back from the full cell.
    let mut at = cell(need_units, need_count);
    best[at]?;
    let mut chosen = Vec::new();
    for i in (0..items.len()).rev() {
        if let Some(from) = choice[i][at] {
            chosen.push(i);
            at = from;
        }
    }
    chosen.reverse();
    Some(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequency_halves_per_half_life() {
        let g = Gdsf { half_life_ms: 1000 };
        assert!((g.decayed(8.0, 0, 1000) - 4.0).abs() < 1e-9);
        assert!((g.decayed(8.0, 0, 3000) - 1.0).abs() < 1e-9);
        assert_eq!(g.decayed(8.0, 5000, 1000), 8.0);
    }

    #[test]
    fn scores_are_per_byte_and_never_nan() {
        let g = Gdsf::default();
        // Same reuse and cost, twice the bytes: half the score.
        let small = g.score(1.0, 1.0, 100.0, 1 << 30);
        let big = g.score(1.0, 1.0, 100.0, 2 << 30);
        assert!((small - 2.0 * big).abs() < 1e-9);
        assert!(g.score(2.0, 1.0, 10.0, 1 << 20) > g.score(1.0, 1.0, 10.0, 1 << 20));
        assert_eq!(g.score(f64::NAN, -1.0, f64::INFINITY, 0), 0.0);
    }

    fn check(items: &[(u64, f64)], need: u64, count: usize, expected: Option<&[usize]>) {
        assert_eq!(
            cheapest_cover(items, need, count).as_deref(),
            expected,
            "{items:?} need {need} count {count}"
        );
    }

    #[test]
    fn covers() {
        // Two cheap small models beat one expensive big one, and vice versa.
        check(&[(140, 50.0), (8, 1.0), (8, 1.0)], 16, 0, Some(&[1, 2]));
        check(&[(140, 1.0), (8, 10.0), (8, 10.0)], 16, 0, Some(&[0]));
        // Exact fits and impossible covers.
        check(&[(5, 1.0), (5, 1.0)], 10, 0, Some(&[0, 1]));
        check(&[(5, 1.0), (4, 1.0)], 10, 0, None);
        // A count requirement with nothing to free: the cheapest single model.
        check(&[(5, 3.0), (9, 2.0)], 0, 1, Some(&[1]));
        check(&[], 0, 0, Some(&[]));
        // Equal cost: fewer bytes.
        check(&[(100, 1.0), (10, 1.0)], 10, 0, Some(&[1]));
    }
}
