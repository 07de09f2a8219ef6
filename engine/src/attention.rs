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

/// The pool slots each sequence's portable attention gathers: keys `lo..start` (or `lo..start + len`
/// with `in_pool`, when the step's own rows were written first), as an index tensor, None when there are
/// none. The same for every layer of a group, so a step computes it once per group, not once per layer.
pub fn gather_indices(
    seqs: &[AttnSeq<'_>],
    shape: &AttnShape,
    in_pool: bool,
    device: &candle_core::Device,
) -> Result<Vec<Option<Tensor>>> {
    seqs.iter()
        .map(|s| {
            let lo = shape.lo(s.start);
            let end = if in_pool { s.start + s.len } else { s.start };
            if end <= lo {
                return Ok(None);
            }
            let slots: Vec<u32> = (lo..end)
                .map(|kp| {
                    slot_of(kp, s.table, shape.ring, shape.block_tokens).ok_or_else(|| {
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
        let lo = shape.lo(s.start);
        let fresh_k = k.narrow(0, s.row, s.len)?;
        let fresh_v = v.narrow(0, s.row, s.len)?;
        // Keys and values by kv head, `(nkv, n_keys, hd)` in f32: the pool's slots gathered straight into
        // that order, then the step's own rows where they are not in the pool yet.
        let by_head = |t: &Tensor| t.transpose(0, 1)?.to_dtype(DType::F32)?.contiguous();
        let (kt, vt) = match (gather, in_pool) {
            (Some(idx), true) => (gather_heads(pool_k, idx)?, gather_heads(pool_v, idx)?),
            (Some(idx), false) => (
                Tensor::cat(&[&gather_heads(pool_k, idx)?, &by_head(&fresh_k)?], 1)?,
                Tensor::cat(&[&gather_heads(pool_v, idx)?, &by_head(&fresh_v)?], 1)?,
            ),
            (None, _) => (by_head(&fresh_k)?, by_head(&fresh_v)?),
        };
        let n_keys = kt.dim(1)?;
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
        let mut scores = (qs.matmul(&kt.t()?)? * f64::from(shape.scale))?;
        // A mask is needed for several rows, or when the window cuts keys the first row still sees.
        if s.len > 1 || shape.lo(s.start + s.len - 1) > lo {
            let mut m = Vec::with_capacity(s.len * n_keys);
            for i in 0..s.len {
                let p = s.start + i;
                let lo_p = shape.lo(p);
                m.extend((lo..lo + n_keys).map(|kp| {
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
        }
        let probs = softmax_rows(&scores)?;
        let o = probs.matmul(&vt)?; // (nkv, n_rep·len, hd)
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

/// The pool slots `idx` of `pool` `(slots, nkv, hd)` as f32 `(nkv, idx.len(), hd)`: what
/// `index_select` followed by a transpose gives, in one copy. On the CPU (an f32 pool) it is a custom op
/// that copies each slot's head vectors straight to their place, split over Candle's CPU pool for long
/// contexts; elsewhere it is those Candle ops.
fn gather_heads(pool: &Tensor, idx: &Tensor) -> Result<Tensor> {
    if pool.device().is_cpu() && pool.dtype() == DType::F32 && idx.dtype() == DType::U32 {
        return pool.apply_op2_no_bwd(idx, &GatherHeads);
    }
    pool.index_select(idx, 0)?
        .to_dtype(DType::F32)?
        .transpose(0, 1)?
        .contiguous()
}

/// Softmax over the last dimension: Candle's `softmax_last_dim`, with its CPU arithmetic (the same
/// max, exponentials and sum per row, so the same bits) split over Candle's CPU pool instead of rayon's,
/// whose workers the calling thread would otherwise wake and wait for at every layer.
fn softmax_rows(scores: &Tensor) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == DType::F32 {
        return scores.apply_op1_no_bwd(&SoftmaxRows);
    }
    softmax_last_dim(scores)
}

/// [`softmax_rows`] on the CPU.
struct SoftmaxRows;

impl candle_core::CustomOp1 for SoftmaxRows {
    fn name(&self) -> &'static str {
        "ult-softmax-rows"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::cpu::kernels::VecOps;
        let candle_core::CpuStorage::F32(src) = storage else {
            candle_core::bail!("softmax-rows: f32 is required")
        };
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax-rows: the input must be contiguous")
        };
        let src = &src[o1..o2];
        let width = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let rows = src.len() / width;
        let mut dst = vec![0f32; src.len()];
        let dst_at = dst.as_mut_ptr() as usize;
        let row = |r: usize| {
            let src = &src[r * width..(r + 1) * width];
            // SAFETY: row r alone writes dst[r·width..(r + 1)·width].
            let dst = unsafe {
                std::slice::from_raw_parts_mut((dst_at as *mut f32).add(r * width), width)
            };
            let mut max = f32::NEG_INFINITY;
            unsafe { f32::vec_reduce_max(src.as_ptr(), &mut max, width) };
            for (s, d) in src.iter().zip(dst.iter_mut()) {
                *d = (*s - max).exp();
            }
            let mut sum_exp = 0f32;
            unsafe { f32::vec_reduce_sum(dst.as_ptr(), &mut sum_exp, width) };
            for d in dst.iter_mut() {
                *d /= sum_exp
            }
        };
        if src.len() < GATHER_PARALLEL_MIN {
            (0..rows).for_each(row);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(rows, |r| r.for_each(row));
        }
        Ok((candle_core::CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// [`gather_heads`] on the CPU.
struct GatherHeads;

/// Below this many copied values a gather runs on the calling thread.
const GATHER_PARALLEL_MIN: usize = 1 << 15;

impl candle_core::CustomOp2 for GatherHeads {
    fn name(&self) -> &'static str {
        "ult-gather-heads"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let (CpuStorage::F32(pool), CpuStorage::U32(idx)) = (s1, s2) else {
            candle_core::bail!("gather-heads: an f32 pool and u32 slots are required")
        };
        let (Some((p0, p1)), Some((i0, i1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("gather-heads: the pool and the slots must be contiguous")
        };
        let (slots, nkv, hd) = l1.shape().dims3()?;
        let (pool, idx) = (&pool[p0..p1], &idx[i0..i1]);
        let n = idx.len();
        if let Some(&bad) = idx.iter().find(|&&i| i as usize >= slots) {
            candle_core::bail!("gather-heads: slot {bad} is outside the pool's {slots}")
        }
        let mut out = vec![0f32; nkv * n * hd];
        // One unit: up to CHUNK slots of one kv head, written to their own part of `out`.
        const CHUNK: usize = 64;
        let chunks = n.div_ceil(CHUNK);
        let out_at = out.as_mut_ptr() as usize;
        let unit = |u: usize| {
            let (g, c) = (u / chunks, u % chunks);
            let (lo, hi) = (c * CHUNK, n.min((c + 1) * CHUNK));
            // SAFETY: unit (g, c) alone writes rows lo..hi of head g, inside `out`'s nkv·n·hd values.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    (out_at as *mut f32).add((g * n + lo) * hd),
                    (hi - lo) * hd,
                )
            };
            for (d, &slot) in dst.chunks_exact_mut(hd).zip(&idx[lo..hi]) {
                let at = (slot as usize * nkv + g) * hd;
                d.copy_from_slice(&pool[at..at + hd]);
            }
        };
        let units = nkv * chunks;
        if nkv * n * hd < GATHER_PARALLEL_MIN {
            (0..units).for_each(unit);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(units, |r| r.for_each(unit));
        }
        Ok((CpuStorage::F32(out), (nkv, n, hd).into()))
    }
}

/// Bit 31 of a key source in [`paged_meta`]'s buffer: the key is row `src & !FRESH` of the step's own keys
/// and values, not a pool slot.
pub const FRESH: u32 = 1 << 31;

/// The CUDA kernel's split-K: a row of `count` keys is attended in [`splits_of`]`(count)` runs, one block
/// each, so one decode row of a long context still spreads over many multiprocessors.
pub const SPLIT_KEYS: usize = 256;
/// The most runs a row's keys are cut into.
pub const MAX_SPLITS: usize = 16;

/// How many runs the kernel cuts a row of `count` keys into: it depends on the row alone (so a row's
/// result does not depend on what else is in its step).
pub fn splits_of(count: usize) -> usize {
    count.div_ceil(SPLIT_KEYS).clamp(1, MAX_SPLITS)
}

/// Where the parts of a [`paged_meta`] buffer start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedLayout {
    /// Rows in the step.
    pub rows: usize,
    /// The most runs any row's keys are cut into ([`splits_of`]).
    pub splits: usize,
    /// The first write slot (after `2 · rows` words of per-row key ranges).
    pub slots: usize,
    /// The first key source.
    pub keys: usize,
}

/// The metadata of one layer group's step for the CUDA paged-attention kernels (`kernels/
/// paged_attention.cu`), as one buffer: per row its first key source and key count (positions
/// `lo(p)..=p` in order), then per row the slot its key and value are written to (`u32::MAX`: not kept),
/// then the key sources: a pool slot, or [`FRESH`] with a row of the step. Keys before a sequence's
/// first position in the step come from the pool through its block table, the step's own from its rows
/// (the kernel attends before it writes, as [`host`] does). Every index is checked against `rows` and
/// `pool_slots` here, so the kernels never read or write out of bounds.
pub fn paged_meta(
    seqs: &[AttnSeq<'_>],
    shape: &AttnShape,
    writes: &[Option<u32>],
    pool_slots: usize,
) -> Result<(Vec<u32>, PagedLayout)> {
    let rows: usize = seqs.iter().map(|s| s.len).sum();
    if writes.len() != rows || rows >= FRESH as usize || pool_slots >= FRESH as usize {
        candle_core::bail!(
            "paged attention: {} write slots for {rows} rows",
            writes.len()
        )
    }
    let mut at = PagedLayout {
        rows,
        splits: 1,
        slots: 2 * rows,
        keys: 3 * rows,
    };
    let mut buf = vec![0u32; at.keys];
    for (r, w) in writes.iter().enumerate() {
        buf[at.slots + r] = match *w {
            Some(s) if (s as usize) < pool_slots => s,
            Some(s) => {
                candle_core::bail!("paged attention: slot {s} is outside a pool of {pool_slots}")
            }
            None => u32::MAX,
        };
    }
    for s in seqs {
        if s.row + s.len > rows {
            candle_core::bail!(
                "paged attention: rows {}..{} of {rows}",
                s.row,
                s.row + s.len
            )
        }
        let lo_seq = shape.lo(s.start);
        let base = buf.len() - at.keys;
        for kp in lo_seq..s.start {
            let slot = slot_of(kp, s.table, shape.ring, shape.block_tokens)
                .filter(|&slot| (slot as usize) < pool_slots)
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!("position {kp} is not in the block table"))
                })?;
            buf.push(slot);
        }
        buf.extend((s.row..s.row + s.len).map(|r| FRESH | r as u32));
        for i in 0..s.len {
            let p = s.start + i;
            let lo_p = shape.lo(p);
            buf[2 * (s.row + i)] = (base + lo_p - lo_seq) as u32;
            buf[2 * (s.row + i) + 1] = (p + 1 - lo_p) as u32;
            at.splits = at.splits.max(splits_of(p + 1 - lo_p));
        }
    }
    Ok((buf, at))
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

/// Tests (here and in `cuda_kernels`): a step's sequences, rows in order, from `(start, len, tables)`
/// spans (each one's first group).
#[cfg(test)]
pub(crate) fn seqs_of<'t, T: AsRef<[Vec<BlockId>]> + ?Sized>(
    spans: &[(usize, usize, &'t T)],
) -> Vec<AttnSeq<'t>> {
    let mut row = 0;
    spans
        .iter()
        .map(|&(start, len, t)| {
            let s = AttnSeq {
                row,
                start,
                len,
                table: &t.as_ref()[0],
            };
            row += len;
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvDType, KvLayout, KvPool, SlotMap};
    use candle_core::Device;

    /// What the CUDA kernel computes from [`paged_meta`], on the host: the pool in the device layout
    /// `(slots, n_kv, head_dim)`, keys in the order the metadata lists them.
    fn by_meta(
        pool: (&[f32], &[f32]),
        q: &[f32],
        k: &[f32],
        v: &[f32],
        meta: &[u32],
        at: &PagedLayout,
        shape: &AttnShape,
    ) -> Vec<f32> {
        let (nh, nkv, hd) = (shape.n_head, shape.n_kv, shape.head_dim);
        let mut out = vec![0f32; at.rows * nh * hd];
        for row in 0..at.rows {
            let (first, count) = (meta[2 * row] as usize, meta[2 * row + 1] as usize);
            for h in 0..nh {
                let g = h / (nh / nkv);
                let qv = &q[(row * nh + h) * hd..][..hd];
                let src = |j: usize, fresh: &[f32], pooled: &[f32]| -> Vec<f32> {
                    let s = meta[at.keys + first + j];
                    let (buf, i) = if s & FRESH != 0 {
                        (fresh, (s & !FRESH) as usize)
                    } else {
                        (pooled, s as usize)
                    };
                    buf[(i * nkv + g) * hd..][..hd].to_vec()
                };
                let scores: Vec<f32> = (0..count)
                    .map(|j| dot(qv, &src(j, k, pool.0)) * shape.scale)
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let w: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = w.iter().sum();
                let o = &mut out[(row * nh + h) * hd..][..hd];
                for (j, wj) in w.iter().enumerate() {
                    axpy(wj / sum, &src(j, v, pool.1), o);
                }
            }
        }
        out
    }

    /// The kernels' metadata names the keys the host loops read, for global and sliding-window
    /// (ring) layers, prefill chunks longer than the ring, a sequence joining mid-way and decode rows;
    /// its write slots are the pool's: the pool it fills holds what the host pool holds.
    #[test]
    fn paged_meta_reads_what_the_host_loops_read() {
        let dev = Device::Cpu;
        let (nh, nkv, hd, bt) = (6, 2, 8, 4);
        for window in [None, Some(6)] {
            let layout = KvLayout::from_windows([window], nkv, hd, KvDType::F32, bt);
            let ring = layout.groups[0].ring;
            let a = vec![vec![5, 0, 3, 1, 7]];
            let b = vec![vec![2, 4, 6]];
            let blocks = 8;
            let mut host_pool = KvPool::new(layout.clone(), vec![blocks], &dev, false).unwrap();
            let slots = blocks * bt;
            let (mut pk, mut pv) = (vec![0f32; slots * nkv * hd], vec![0f32; slots * nkv * hd]);
            let shape = AttnShape {
                n_head: nh,
                n_kv: nkv,
                head_dim: hd,
                scale: 0.4,
                window,
                ring,
                block_tokens: bt,
            };
            // A: 14 positions (past the ring's 3 blocks of 4: the ring laps inside the chunk), then 2,
            // then 1; B joins at the second step and decodes.
            type Span<'t> = (usize, usize, &'t Vec<Vec<BlockId>>);
            let steps: Vec<Vec<Span<'_>>> = vec![
                vec![(0, 14, &a)],
                vec![(14, 2, &a), (0, 3, &b)],
                vec![(16, 1, &a), (3, 1, &b)],
            ];
            for spans in steps {
                let rows: usize = spans.iter().map(|s| s.1).sum();
                let q = Tensor::randn(0f32, 2.0, (rows, nh, hd), &dev).unwrap();
                let k = Tensor::randn(0f32, 1.0, (rows, nkv, hd), &dev).unwrap();
                let v = Tensor::randn(0f32, 1.0, (rows, nkv, hd), &dev).unwrap();
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let (qf, kf, vf) = (flat(&q), flat(&k), flat(&v));
                let seqs = seqs_of(&spans);
                let spans_ref: Vec<(usize, usize, &[Vec<BlockId>])> = spans
                    .iter()
                    .map(|&(s, l, t)| (s, l, t.as_slice()))
                    .collect();
                let m = SlotMap::new(&layout, &spans_ref, None).unwrap();
                let (meta, at) = paged_meta(&seqs, &shape, &m.rows[0], slots).unwrap();
                let h = host(
                    &host_pool.host_layer(0).unwrap(),
                    &qf,
                    &kf,
                    &vf,
                    &seqs,
                    &shape,
                );
                let got = by_meta((&pk, &pv), &qf, &kf, &vf, &meta, &at, &shape);
                let worst = h
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-5,
                    "window {window:?}: metadata and host differ by {worst}"
                );
                host_pool.write(0, &k, &v, &m).unwrap();
                let width = nkv * hd;
                for r in 0..rows {
                    let slot = meta[at.slots + r];
                    if slot != u32::MAX {
                        let s = slot as usize;
                        pk[s * width..][..width].copy_from_slice(&kf[r * width..][..width]);
                        pv[s * width..][..width].copy_from_slice(&vf[r * width..][..width]);
                    }
                }
            }
        }
    }

    /// Two heads sharing one KV head of 4 dimensions, global, in blocks of `block_tokens`.
    fn small_global(block_tokens: usize) -> AttnShape {
        AttnShape {
            n_head: 2,
            n_kv: 1,
            head_dim: 4,
            scale: 1.0,
            window: None,
            ring: None,
            block_tokens,
        }
    }

    /// Metadata that would index outside the pool is refused, not handed to a kernel.
    #[test]
    fn paged_meta_refuses_slots_outside_the_pool() {
        let shape = small_global(4);
        let table = vec![3];
        let s = [AttnSeq {
            row: 0,
            start: 2,
            len: 1,
            table: &table,
        }];
        assert!(paged_meta(&s, &shape, &[Some(14)], 16).is_ok());
        assert!(paged_meta(&s, &shape, &[Some(14)], 12).is_err());
        assert!(paged_meta(&s, &shape, &[Some(17)], 16).is_err());
        assert!(paged_meta(&s, &shape, &[], 16).is_err());
    }

    /// Split-K runs: one up to `SPLIT_KEYS` keys, then one per `SPLIT_KEYS`, at most `MAX_SPLITS`; a
    /// step's layout carries its longest row's count.
    #[test]
    fn split_k_runs_follow_the_key_count() {
        let runs: Vec<usize> = [1, 256, 257, 1000, 4096, 4097, 100_000]
            .into_iter()
            .map(splits_of)
            .collect();
        assert_eq!(runs, [1, 1, 2, 4, 16, 16, 16]);
        let shape = small_global(16);
        let long: Vec<BlockId> = (0..40).collect();
        let short = vec![40];
        let s = [
            AttnSeq {
                row: 0,
                start: 600,
                len: 1,
                table: &long,
            },
            AttnSeq {
                row: 1,
                start: 3,
                len: 1,
                table: &short,
            },
        ];
        let (_, at) = paged_meta(&s, &shape, &[None, None], 41 * 16).unwrap();
        assert_eq!(at.splits, 3, "601 keys are three runs");
    }

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
            let seqs = seqs_of(&spans);
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
}
