//! Attention over the paged KV pool for one layer of one step, for many sequences at once.
//!
//! Every query at absolute position `p` attends over keys `lo..=p` (`lo = p + 1 − window` for
//! sliding-window layers, else 0): keys before the sequence's first position in this step come from the
//! pool through its block table, the step's own keys straight from its activations (the pool is written
//! after attention, so a ring never loses a key that a query of the same step still needs).
//!
//! Two implementations with one contract: [`host`] walks the blocks in host memory with plain loops
//! (the CPU path, parallel over query rows), and [`portable`] gathers each sequence's slots with Candle
//! ops that every backend implements (`index_select`, `cat`, `matmul`, `softmax`), the path Metal and
//! CUDA take. Tests hold them to each other on real models.

use candle_core::{D, DType, Result, Tensor};
use candle_nn::ops::softmax_last_dim;
use rayon::prelude::*;

use crate::kv::{HostLayer, slot_of};
use crate::sched::BlockId;

/// One sequence's part of a step, as attention sees it.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    /// Its first row in the step's activations.
    pub row: usize,
    /// The absolute position of that row.
    pub start: usize,
    /// Rows (positions) in the step.
    pub len: usize,
    /// The block table of this layer's group.
    pub table: &'a [BlockId],
}

/// The shape of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Score scale.
    pub scale: f32,
    /// Sliding window (None: global).
    pub window: Option<usize>,
    /// Ring length in blocks, for sliding-window groups.
    pub ring: Option<usize>,
    /// Positions per block.
    pub block_tokens: usize,
}

impl AttnShape {
    /// The first key position query `p` sees.
    fn lo(&self, p: usize) -> usize {
        self.window.map_or(0, |w| (p + 1).saturating_sub(w))
    }
}

/// Attention on host memory. `q` is `(rows, n_head, head_dim)`, `k` and `v` `(rows, n_kv, head_dim)`,
/// all contiguous f32; returns `(rows, n_head · head_dim)`.
pub fn host(
    pool: &HostLayer<'_>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seqs: &[AttnSeq<'_>],
    shape: &AttnShape,
) -> Vec<f32> {
    let (nh, nkv, hd, bt) = (shape.n_head, shape.n_kv, shape.head_dim, shape.block_tokens);
    let rows: usize = seqs.iter().map(|s| s.len).sum();
    let mut out = vec![0f32; rows * nh * hd];
    // Which sequence each row belongs to.
    let mut owner = Vec::with_capacity(rows);
    for (i, s) in seqs.iter().enumerate() {
        owner.extend(std::iter::repeat_n(i, s.len));
    }
    let n_rep = nh / nkv;
    out.par_chunks_mut(nh * hd)
        .enumerate()
        .for_each(|(row, out_row)| {
            let s = &seqs[owner[row]];
            let p = s.start + (row - s.row);
            let lo = shape.lo(p);
            let n_keys = p + 1 - lo;
            let mut scores = vec![0f32; n_keys];
            // Where key position `kp`'s vector of kv head `g` starts: in the step's rows (true) or in the
            // pool (false); None when the table does not cover it.
            let key_at = |kp: usize, g: usize| -> Option<(bool, usize)> {
                if kp >= s.start {
                    let r = s.row + (kp - s.start);
                    Some((true, (r * nkv + g) * hd))
                } else {
                    let slot = slot_of(kp, s.table, shape.ring, bt)? as usize;
                    Some((false, (((slot / bt) * nkv + g) * bt + slot % bt) * hd))
                }
            };
            for h in 0..nh {
                let g = h / n_rep;
                let qv = &q[(row * nh + h) * hd..(row * nh + h + 1) * hd];
                let mut max = f32::NEG_INFINITY;
                for (j, kp) in (lo..=p).enumerate() {
                    let sc = key_at(kp, g).map_or(f32::NEG_INFINITY, |(fresh, at)| {
                        let src = if fresh { k } else { pool.k };
                        dot(qv, &src[at..at + hd]) * shape.scale
                    });
                    scores[j] = sc;
                    max = max.max(sc);
                }
                let mut sum = 0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let o = &mut out_row[h * hd..(h + 1) * hd];
                for (j, kp) in (lo..=p).enumerate() {
                    let w = scores[j] / sum;
                    if w == 0.0 {
                        continue;
                    }
                    if let Some((fresh, at)) = key_at(kp, g) {
                        let src = if fresh { v } else { pool.v };
                        axpy(w, &src[at..at + hd], o);
                    }
                }
            }
        });
    out
}

/// Key positions the portable attention lays out per row: aligned to this many, so that Candle's f32 row
/// sums (`vec_sum`, 32 lanes then a scalar tail) group a row's terms by absolute position, whatever the
/// step's other rows.
const KEY_ALIGN: usize = 32;

/// The most keys one matmul of probabilities by values sums: Candle's matmul (the `gemm` crate) splits
/// longer sums into blocks whose bounds depend on the length, so longer ones are cut at absolute
/// multiples of this and the blocks added in order.
const KEY_BLOCK: usize = 512;

/// The fewest key positions a span lays out (see [`key_span`]): above 64, a multiple of [`KEY_ALIGN`].
const MIN_KEYS: usize = 96;

/// The key positions `lo..hi` a sequence's portable attention lays out: its window's first key rounded
/// down to [`KEY_ALIGN`], its last rounded up; positions outside what it may see are masked.
fn key_span(s: &AttnSeq<'_>, shape: &AttnShape) -> (usize, usize) {
    let lo = shape.lo(s.start) / KEY_ALIGN * KEY_ALIGN;
    let hi = (s.start + s.len).div_ceil(KEY_ALIGN) * KEY_ALIGN;
    // At least MIN_KEYS: `gemm` multiplies matrices of at most 64 by 64 with another kernel, which
    // rounds the score dot products differently from the one a longer step's rows take.
    (lo, hi.max(lo + MIN_KEYS))
}

/// The pool slots each sequence's portable attention gathers: keys from its aligned span's start to
/// `start` (or to the span's end with `in_pool`, when the step's own rows were written first), as an
/// index tensor, None when there are none. Positions the sequence may not see (padding, keys a ring has
/// passed, positions not written yet) take any slot of its table: they are masked. The same for every
/// layer of a group, so a step computes it once per group, not once per layer.
pub fn gather_indices(
    seqs: &[AttnSeq<'_>],
    shape: &AttnShape,
    in_pool: bool,
    device: &candle_core::Device,
) -> Result<Vec<Option<Tensor>>> {
    seqs.iter()
        .map(|s| {
            let (lo, hi) = key_span(s, shape);
            let end = if in_pool { hi } else { s.start };
            if end <= lo {
                return Ok(None);
            }
            let visible = shape.lo(s.start)..s.start + s.len;
            let any = slot_of(visible.start, s.table, shape.ring, shape.block_tokens);
            let slots: Vec<u32> = (lo..end)
                .map(|kp| {
                    let slot = if visible.contains(&kp) {
                        slot_of(kp, s.table, shape.ring, shape.block_tokens)
                    } else {
                        any
                    };
                    slot.ok_or_else(|| {
                        candle_core::Error::Msg(format!("position {kp} is not in the block table"))
                    })
                })
                .collect::<Result<_>>()?;
            let n = slots.len();
            Tensor::from_vec(slots, n, device).map(Some)
        })
        .collect()
}

/// Attention with portable Candle ops over device tensors of the pool (`(slots, n_kv, head_dim)` each).
/// `q` is `(rows, n_head, head_dim)`, `k` and `v` `(rows, n_kv, head_dim)`; returns `(rows, n_head,
/// head_dim)` in f32. `gathers` are [`gather_indices`] of `seqs`. With `in_pool`, the step's own keys
/// and values are already in the pool (a global layer writes before it attends: one gather instead of a
/// gather and a concatenation); otherwise they come from `k` and `v`.
#[allow(clippy::too_many_arguments)]
pub fn portable(
    pool_k: &Tensor,
    pool_v: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqs: &[AttnSeq<'_>],
    gathers: &[Option<Tensor>],
    shape: &AttnShape,
    in_pool: bool,
) -> Result<Tensor> {
    let (nh, nkv, hd) = (shape.n_head, shape.n_kv, shape.head_dim);
    let n_rep = nh / nkv;
    let device = q.device();
    let mut outs = Vec::with_capacity(seqs.len());
    for (s, gather) in seqs.iter().zip(gathers) {
        // Every row's keys are laid out over the same aligned span of absolute positions, and every sum
        // over keys runs in a fixed order of absolute positions, so a row's result does not depend on
        // which rows share its step (a prefix served from the cache gives what a cold prefill gives).
        let (lo, hi) = key_span(s, shape);
        let fresh_k = k.narrow(0, s.row, s.len)?;
        let fresh_v = v.narrow(0, s.row, s.len)?;
        let pooled = |t: &Tensor, idx: &Tensor| t.index_select(idx, 0)?.to_dtype(DType::F32);
        let (keys, values) = if in_pool {
            let idx = gather
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg("no keys gathered".into()))?;
            (pooled(pool_k, idx)?, pooled(pool_v, idx)?)
        } else {
            // Cached keys, the step's own, and masked zeros up to the span's end.
            let pad = hi - (s.start + s.len);
            let zeros = Tensor::zeros((pad, nkv, hd), DType::F32, device)?;
            let mut ks = Vec::with_capacity(3);
            let mut vs = Vec::with_capacity(3);
            if let Some(idx) = gather {
                ks.push(pooled(pool_k, idx)?);
                vs.push(pooled(pool_v, idx)?);
            }
            ks.push(fresh_k.to_dtype(DType::F32)?);
            vs.push(fresh_v.to_dtype(DType::F32)?);
            if pad > 0 {
                ks.push(zeros.clone());
                vs.push(zeros);
            }
            (Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)
        };
        let n_keys = keys.dim(0)?;
        debug_assert_eq!(n_keys, hi - lo);
        // (len, nh, hd) → (nkv, n_rep·len, hd): the query heads of one KV head stacked on rows.
        let q1 = q.narrow(0, s.row, s.len)?.to_dtype(DType::F32)?;
        let qs = if s.len == 1 {
            // One row: (1, nh, hd) is already (nkv, n_rep, hd) in memory.
            q1.reshape((nkv, n_rep, hd))?
        } else {
            q1.reshape((s.len, nkv, n_rep, hd))?
                .permute((1, 2, 0, 3))?
                .contiguous()?
                .reshape((nkv, n_rep * s.len, hd))?
        };
        let kt = keys.transpose(0, 1)?.contiguous()?; // (nkv, n_keys, hd)
        let vt = values.transpose(0, 1)?.contiguous()?;
        let mut scores = (qs.matmul(&kt.t()?)? * f64::from(shape.scale))?;
        let mut m = Vec::with_capacity(s.len * n_keys);
        for i in 0..s.len {
            let p = s.start + i;
            let lo_p = shape.lo(p);
            m.extend((lo..hi).map(|kp| {
                if kp <= p && kp >= lo_p {
                    0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
        let mask = Tensor::from_vec(m, (s.len, n_keys), device)?;
        scores = scores
            .reshape((nkv, n_rep, s.len, n_keys))?
            .broadcast_add(&mask)?
            .reshape((nkv, n_rep * s.len, n_keys))?;
        let probs = softmax_last_dim(&scores)?;
        // Probabilities by values, in blocks cut at absolute multiples of KEY_BLOCK, added in order.
        let mut o: Option<Tensor> = None;
        let mut at = lo;
        while at < hi {
            let end = ((at / KEY_BLOCK + 1) * KEY_BLOCK).min(hi);
            let (a, len) = (at - lo, end - at);
            let part = if a == 0 && len == n_keys {
                probs.matmul(&vt)?
            } else {
                probs
                    .narrow(2, a, len)?
                    .contiguous()?
                    .matmul(&vt.narrow(1, a, len)?.contiguous()?)?
            };
            o = Some(match o {
                None => part,
                Some(sum) => (sum + part)?,
            });
            at = end;
        }
        let o = o.ok_or_else(|| candle_core::Error::Msg("no keys".into()))?; // (nkv, n_rep·len, hd)
        if s.len == 1 {
            outs.push(o.reshape((1, nh, hd))?);
            continue;
        }
        let o = o
            .reshape((nkv, n_rep, s.len, hd))?
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((s.len, nh, hd))?;
        outs.push(o);
    }
    let refs: Vec<&Tensor> = outs.iter().collect();
    Tensor::cat(&refs, 0)
}

/// The index of the largest value in each row of `(rows, n)` logits.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.to_vec1::<u32>()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight lanes, so the compiler vectorises without fast-math.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

fn axpy(w: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += w * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvDType, KvLayout, KvPool, SlotMap};
    use candle_core::Device;

    /// The host loops and the portable ops agree, on a grouped-query shape, for a prefill chunk that
    /// reads earlier keys from the pool and for a decode row beside it.
    #[test]
    fn host_and_portable_agree() {
        let dev = Device::Cpu;
        let (nh, nkv, hd) = (9, 3, 64);
        let layout = KvLayout::from_windows([None], nkv, hd, KvDType::F32, 4);
        let tables = vec![vec![2, 0, 1]];
        let other = vec![vec![3]];
        let mut host_pool = KvPool::new(layout.clone(), vec![4], &dev, false).unwrap();
        let mut port = KvPool::new(layout.clone(), vec![4], &dev, true).unwrap();
        let shape = AttnShape {
            n_head: nh,
            n_kv: nkv,
            head_dim: hd,
            scale: 0.3,
            window: None,
            ring: None,
            block_tokens: 4,
        };
        // Step 1: 7 positions of sequence A. Step 2: 3 more of A and 1 of B (at position 0).
        for (spans, rows) in [
            (vec![(0usize, 7usize, &tables)], 7usize),
            (vec![(7, 3, &tables), (0, 1, &other)], 4),
        ] {
            let q = Tensor::randn(0f32, 3.0, (rows, nh, hd), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (rows, nkv, hd), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (rows, nkv, hd), &dev).unwrap();
            let mut row = 0;
            let seqs: Vec<AttnSeq<'_>> = spans
                .iter()
                .map(|&(start, len, t)| {
                    let s = AttnSeq {
                        row,
                        start,
                        len,
                        table: &t[0],
                    };
                    row += len;
                    s
                })
                .collect();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let h = host(
                &host_pool.host_layer(0).unwrap(),
                &flat(&q),
                &flat(&k),
                &flat(&v),
                &seqs,
                &shape,
            );
            let (pk, pv) = port.device_layer(0).unwrap();
            let gathers = gather_indices(&seqs, &shape, false, &dev).unwrap();
            let p = flat(&portable(pk, pv, &q, &k, &v, &seqs, &gathers, &shape, false).unwrap());
            let worst = h
                .iter()
                .zip(&p)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "host and portable differ by {worst}");
            let spans_ref: Vec<(usize, usize, &[Vec<BlockId>])> = spans
                .iter()
                .map(|&(s, l, t)| (s, l, t.as_slice()))
                .collect();
            let m = SlotMap::new(&layout, &spans_ref, None).unwrap();
            host_pool.write(0, &k, &v, &m).unwrap();
            let m = SlotMap::new(&layout, &spans_ref, Some(&dev)).unwrap();
            port.write(0, &k, &v, &m).unwrap();
        }
    }

    /// Runs `chunks` of one sequence through the portable attention of a global layer (write, then
    /// attend) and a ring layer (attend, then write), as the transformer does; returns each position's
    /// output rows, global then ring.
    fn run_chunks(chunks: &[(usize, usize)], q: &Tensor, k: &Tensor, v: &Tensor) -> Vec<Vec<f32>> {
        let dev = Device::Cpu;
        let (nh, nkv, hd, bt) = (4, 1, 8, 4);
        // Layer 0 global, layer 1 a window of 40 (a ring of 11 blocks).
        let layout = KvLayout::from_windows([None, Some(40)], nkv, hd, KvDType::F32, bt);
        let ring = layout.groups[1].ring;
        let total = chunks.iter().map(|c| c.0 + c.1).max().unwrap();
        let plain: Vec<u32> = (0..total.div_ceil(bt) as u32).collect();
        let rings: Vec<u32> = (0..ring.unwrap() as u32).collect();
        let tables = vec![plain, rings];
        let blocks = vec![tables[0].len(), tables[1].len()];
        let mut pool = KvPool::new(layout.clone(), blocks, &dev, true).unwrap();
        let mut out = vec![Vec::new(); total];
        for &(start, len) in chunks {
            let (qc, kc, vc) = (
                q.narrow(0, start, len).unwrap(),
                k.narrow(0, start, len).unwrap(),
                v.narrow(0, start, len).unwrap(),
            );
            let spans = [(start, len, tables.as_slice())];
            let slots = SlotMap::new(&layout, &spans, Some(&dev)).unwrap();
            let mut rows = Vec::new();
            for (il, g) in [(0usize, 0usize), (1, 1)] {
                let group = &layout.groups[g];
                let shape = AttnShape {
                    n_head: nh,
                    n_kv: nkv,
                    head_dim: hd,
                    scale: 0.35,
                    window: group.window,
                    ring: group.ring,
                    block_tokens: bt,
                };
                let seqs = [AttnSeq {
                    row: 0,
                    start,
                    len,
                    table: &tables[g],
                }];
                let in_pool = group.ring.is_none();
                if in_pool {
                    pool.write(il, &kc, &vc, &slots).unwrap();
                }
                let gathers = gather_indices(&seqs, &shape, in_pool, &dev).unwrap();
                let (pk, pv) = pool.device_layer(il).unwrap();
                let o = portable(pk, pv, &qc, &kc, &vc, &seqs, &gathers, &shape, in_pool).unwrap();
                if !in_pool {
                    pool.write(il, &kc, &vc, &slots).unwrap();
                }
                rows.push(o.to_vec3::<f32>().unwrap());
            }
            for i in 0..len {
                out[start + i] = rows
                    .iter()
                    .flat_map(|r| r[i].iter().flatten().copied())
                    .collect();
            }
        }
        out
    }

    #[test]
    fn portable_rows_do_not_depend_on_the_chunking() {
        // 700 positions (beyond the 512 keys where Candle's own sums would regroup), in two chunkings
        // and one token at a time at the end: every position's output is bit-identical.
        let dev = Device::Cpu;
        let n = 700;
        let q = Tensor::randn(0f32, 2.0, (n, 4, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (n, 1, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (n, 1, 8), &dev).unwrap();
        let a = run_chunks(&[(0, 512), (512, 188)], &q, &k, &v);
        let mut steps = vec![(0, 300), (300, 350), (650, 40)];
        steps.extend((690..700).map(|p| (p, 1)));
        let b = run_chunks(&steps, &q, &k, &v);
        for p in 0..n {
            assert_eq!(a[p], b[p], "position {p}");
        }
    }
}
