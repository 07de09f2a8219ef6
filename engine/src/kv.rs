//! The paged KV cache: one [`KvLayout`] that both the footprint prediction and the allocation read (so
//! they cannot disagree), and the [`KvPool`] of fixed-size blocks that a model's sequences share.
//!
//! Layers fall into at most two groups: global layers keep every position of a sequence; sliding-window
//! layers (Gemma 3's local layers) keep a ring of `ceil(window / block) + 1` blocks per sequence, enough
//! for the `window − 1` positions a query looks back at, because a step attends over the cache *before*
//! writing its own positions into it (its own keys come straight from the step's activations).
//!
//! Storage: on the CPU the pool is plain host memory (f32, `[block][kv head][offset][dim]`), read by the
//! hand-written block loops in `attention.rs`; on GPUs it is one Candle tensor per layer (f16,
//! `[slot][kv head][dim]` with slot = block · block_tokens + offset), written with `scatter_set` and read
//! by gathering slots (or by a kernel). f32 on the CPU because converting every key on every step costs
//! more there than the memory it saves on the small models CPUs serve; f16 on GPUs, as llama.cpp and vLLM.
//!
//! Multi-head latent attention (DeepSeek) caches one vector per position and layer, the latent plus the
//! rope key, and reads its values from the same vector ([`KvLayout::values_in_keys`]): the pool then holds
//! keys only, and hands them out as the values too.

use candle_core::{DType, Device, Result, Tensor};

use crate::gguf::HParams;
use crate::sched::{BlockId, BlockMove, GroupConfig};

/// Positions per block.
pub const BLOCK_TOKENS: usize = 16;

/// How keys and values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
}

impl KvDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }

    /// The dtype a device's pool uses.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            Self::F32
        } else {
            Self::F16
        }
    }

    fn candle(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
        }
    }
}

/// One group of layers that share block tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerGroup {
    /// The layers, in order.
    pub layers: Vec<usize>,
    /// The sliding window of these layers (None: global).
    pub window: Option<usize>,
    /// Blocks per sequence for a ring (None: every position).
    pub ring: Option<usize>,
}

/// The shape of a model's KV cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    /// Element type.
    pub dtype: KvDType,
    /// Positions per block.
    pub block_tokens: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// The layer groups (global first).
    pub groups: Vec<LayerGroup>,
    /// The values are the keys themselves (MLA: the value is the latent, the key's first part), so only
    /// keys are stored.
    pub values_in_keys: bool,
    /// For each layer, its group and its index within the group.
    place: Vec<(usize, usize)>,
}

impl KvLayout {
    /// The layout of a decoder with `hp` at a context of `context` positions. A sliding window that covers
    /// the context is no window at all.
    pub fn new(hp: &HParams, context: usize, dtype: KvDType, block_tokens: usize) -> Self {
        let window_of = |il: usize| {
            hp.sliding_window
                .filter(|&w| hp.is_local(il) && w < context)
        };
        let mut layout = Self::from_windows(
            (0..hp.n_layer).map(window_of),
            hp.n_head_kv,
            hp.head_dim,
            dtype,
            block_tokens,
        );
        layout.values_in_keys = hp.mla.is_some();
        layout
    }

    /// A layout from each layer's window.
    pub fn from_windows(
        windows: impl IntoIterator<Item = Option<usize>>,
        kv_heads: usize,
        head_dim: usize,
        dtype: KvDType,
        block_tokens: usize,
    ) -> Self {
        let block_tokens = block_tokens.max(1);
        let mut groups: Vec<LayerGroup> = Vec::new();
        let mut place = Vec::new();
        let windows: Vec<Option<usize>> = windows.into_iter().collect();
        // Global layers first, then one group per distinct window.
        let mut keys: Vec<Option<usize>> = windows.clone();
        keys.sort();
        keys.dedup();
        for key in keys {
            groups.push(LayerGroup {
                layers: Vec::new(),
                window: key,
                ring: key.map(|w| w.div_ceil(block_tokens) + 1),
            });
        }
        for (il, w) in windows.iter().enumerate() {
            let g = groups
                .iter()
                .position(|g| g.window == *w)
                .expect("every window has a group");
            place.push((g, groups[g].layers.len()));
            groups[g].layers.push(il);
        }
        Self {
            dtype,
            block_tokens,
            kv_heads,
            head_dim,
            groups,
            values_in_keys: false,
            place,
        }
    }

    /// Layer `il`'s group and index within it.
    pub fn place(&self, il: usize) -> (usize, usize) {
        self.place[il]
    }

    /// Bytes of keys and values for one position of one layer.
    pub fn token_layer_bytes(&self) -> usize {
        let arrays = if self.values_in_keys { 1 } else { 2 };
        arrays * self.kv_heads * self.head_dim * self.dtype.size()
    }

    /// Bytes of one block of group `g`.
    pub fn block_bytes(&self, g: usize) -> usize {
        self.groups[g].layers.len() * self.block_tokens * self.token_layer_bytes()
    }

    /// KV bytes per position of one sequence in the global layers (the part that grows with length).
    pub fn bytes_per_token(&self) -> u64 {
        self.groups
            .iter()
            .filter(|g| g.ring.is_none())
            .map(|g| (g.layers.len() * self.token_layer_bytes()) as u64)
            .sum()
    }

    /// KV bytes every sequence holds in its rings whatever its length.
    pub fn ring_bytes_per_sequence(&self) -> u64 {
        self.groups
            .iter()
            .enumerate()
            .filter_map(|(g, grp)| grp.ring.map(|r| (r * self.block_bytes(g)) as u64))
            .sum()
    }

    /// Blocks in each group's pool for a budget of `kv_tokens` per sequence and `max_sequences`.
    pub fn pool_blocks(&self, kv_tokens: usize, max_sequences: usize) -> Vec<usize> {
        let n = max_sequences.max(1);
        self.groups
            .iter()
            .map(|g| {
                g.ring
                    .map_or(kv_tokens.div_ceil(self.block_tokens), |r| r)
                    .saturating_mul(n)
            })
            .collect()
    }

    /// Bytes of a pool of `blocks` (one count per group).
    pub fn pool_bytes(&self, blocks: &[usize]) -> u64 {
        blocks
            .iter()
            .enumerate()
            .map(|(g, &b)| (b * self.block_bytes(g)) as u64)
            .sum()
    }

    /// The scheduler's view of a pool of `blocks`.
    pub fn group_configs(&self, blocks: &[usize]) -> Vec<GroupConfig> {
        self.groups
            .iter()
            .zip(blocks)
            .map(|(g, &b)| GroupConfig {
                blocks: b,
                ring: g.ring,
            })
            .collect()
    }
}

/// Where a pool's keys and values live.
#[derive(Debug)]
enum Storage {
    /// Freed (the model is idle); allocated again by [`KvPool::ensure`].
    Released,
    /// Host memory, one buffer per layer for keys and one for values: `[block][kv head][offset][dim]`
    /// (no value buffers when the values are the keys).
    Host { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    /// Device tensors `(slots, kv_heads, head_dim)`, one per layer (no value tensors when the values are
    /// the keys).
    Device { k: Vec<Tensor>, v: Vec<Tensor> },
}

/// A model's block pool.
#[derive(Debug)]
pub struct KvPool {
    layout: KvLayout,
    blocks: Vec<usize>,
    device: Device,
    storage: Storage,
    /// Use device tensors even on the CPU (the portable path, as Metal runs it).
    portable: bool,
}

/// The host buffers of one layer (for the CPU attention loops).
pub struct HostLayer<'a> {
    /// Keys, `[block][kv head][offset][dim]`.
    pub k: &'a [f32],
    /// Values, same layout.
    pub v: &'a [f32],
}

impl KvPool {
    /// Allocates a pool of `blocks` (one count per group of `layout`) on `device`. `portable` keeps
    /// device tensors on the CPU too, so the path Metal and CUDA fall back to can be tested here.
    pub fn new(
        layout: KvLayout,
        blocks: Vec<usize>,
        device: &Device,
        portable: bool,
    ) -> Result<Self> {
        let mut pool = Self {
            layout,
            blocks,
            device: device.clone(),
            storage: Storage::Released,
            portable,
        };
        pool.ensure()?;
        Ok(pool)
    }

    /// The layout.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Blocks per group.
    pub fn blocks(&self) -> &[usize] {
        &self.blocks
    }

    /// Bytes allocated now (zero while released).
    pub fn bytes(&self) -> u64 {
        match self.storage {
            Storage::Released => 0,
            _ => self.layout.pool_bytes(&self.blocks),
        }
    }

    /// True while the storage is allocated.
    pub fn is_allocated(&self) -> bool {
        !matches!(self.storage, Storage::Released)
    }

    /// Frees the storage (between requests, when the policy drops idle KV).
    pub fn release(&mut self) {
        self.storage = Storage::Released;
    }

    /// Allocates the storage if it was released.
    pub fn ensure(&mut self) -> Result<()> {
        if self.is_allocated() {
            return Ok(());
        }
        let l = &self.layout;
        let per_layer = |il: usize| self.blocks[l.place(il).0] * l.block_tokens;
        let n_layers = l.place.len();
        let v_layers = if l.values_in_keys { 0 } else { n_layers };
        self.storage = if self.device.is_cpu() && !self.portable {
            let buf = |il: usize| vec![0f32; per_layer(il) * l.kv_heads * l.head_dim];
            Storage::Host {
                k: (0..n_layers).map(buf).collect(),
                v: (0..v_layers).map(buf).collect(),
            }
        } else {
            let t = |il: usize| {
                Tensor::zeros(
                    (per_layer(il), l.kv_heads, l.head_dim),
                    l.dtype.candle(),
                    &self.device,
                )
            };
            Storage::Device {
                k: (0..n_layers).map(t).collect::<Result<_>>()?,
                v: (0..v_layers).map(t).collect::<Result<_>>()?,
            }
        };
        Ok(())
    }

    /// Host buffers of layer `il`, when the pool lives in host memory (the keys twice when the values
    /// are the keys).
    pub fn host_layer(&self, il: usize) -> Option<HostLayer<'_>> {
        match &self.storage {
            Storage::Host { k, v } => Some(HostLayer {
                k: &k[il],
                v: v.get(il).unwrap_or(&k[il]),
            }),
            _ => None,
        }
    }

    /// Device tensors `(slots, kv_heads, head_dim)` of layer `il`, when the pool is device tensors (the
    /// keys twice when the values are the keys).
    pub fn device_layer(&self, il: usize) -> Option<(&Tensor, &Tensor)> {
        match &self.storage {
            Storage::Device { k, v } => Some((&k[il], v.get(il).unwrap_or(&k[il]))),
            _ => None,
        }
    }

    /// Writes keys and values `(n, kv_heads, head_dim)` of layer `il` for positions whose slots are
    /// `slots` (one per row; `None` for a position a ring has already passed, which is skipped). When the
    /// values are the keys, `v` is not read.
    pub fn write(&mut self, il: usize, k: &Tensor, v: &Tensor, slots: &SlotMap) -> Result<()> {
        let l = &self.layout;
        let (kvh, hd, bt) = (l.kv_heads, l.head_dim, l.block_tokens);
        let g = l.place(il).0;
        match &mut self.storage {
            Storage::Released => candle_core::bail!("writing to a released KV pool"),
            Storage::Host { k: kb, v: vb } => {
                let kh = k.flatten_all()?.to_vec1::<f32>()?;
                let vh = match vb.get(il) {
                    Some(_) => v.flatten_all()?.to_vec1::<f32>()?,
                    None => Vec::new(),
                };
                let row = kvh * hd;
                for (r, slot) in slots.rows[g].iter().enumerate() {
                    let Some(slot) = *slot else { continue };
                    let (block, off) = (slot as usize / bt, slot as usize % bt);
                    for h in 0..kvh {
                        let dst = ((block * kvh + h) * bt + off) * hd;
                        let src = r * row + h * hd;
                        kb[il][dst..dst + hd].copy_from_slice(&kh[src..src + hd]);
                        if let Some(vl) = vb.get_mut(il) {
                            vl[dst..dst + hd].copy_from_slice(&vh[src..src + hd]);
                        }
                    }
                }
                Ok(())
            }
            Storage::Device { k: kt, v: vt } => {
                let Some((index, rows)) = slots.device[g].as_ref() else {
                    return Ok(());
                };
                let dt = l.dtype.candle();
                let pick = |t: &Tensor| -> Result<Tensor> {
                    let t = t.to_dtype(dt)?.reshape((t.dim(0)?, kvh * hd))?;
                    match rows {
                        Some(r) => t.index_select(r, 0),
                        None => Ok(t),
                    }
                };
                let flat = |t: &Tensor| t.reshape((t.dim(0)?, kvh * hd));
                flat(&kt[il])?.scatter_set(index, &pick(k)?, 0)?;
                if let Some(vl) = vt.get(il) {
                    flat(vl)?.scatter_set(index, &pick(v)?, 0)?;
                }
                Ok(())
            }
        }
    }

    /// Copies block contents, in order, in every layer of each move's group (a plan's copies before its
    /// step runs, or a shrink's moves). Nothing to do while released.
    pub fn copy_blocks(&mut self, moves: &[BlockMove]) -> Result<()> {
        if moves.is_empty() {
            return Ok(());
        }
        let l = &self.layout;
        let bt = l.block_tokens;
        let block_elems = l.kv_heads * bt * l.head_dim;
        match &mut self.storage {
            Storage::Released => {}
            Storage::Host { k, v } => {
                for (il, kl) in k.iter_mut().enumerate() {
                    let g = l.place(il).0;
                    for buf in std::iter::once(kl).chain(v.get_mut(il)) {
                        for m in moves.iter().filter(|m| m.group == g) {
                            let (from, to) = (m.from as usize, m.to as usize);
                            buf.copy_within(
                                from * block_elems..(from + 1) * block_elems,
                                to * block_elems,
                            );
                        }
                    }
                }
            }
            Storage::Device { k, v } => {
                for (il, kl) in k.iter_mut().enumerate() {
                    let g = l.place(il).0;
                    for t in std::iter::once(kl).chain(v.get_mut(il)) {
                        for m in moves.iter().filter(|m| m.group == g) {
                            // A copy: `slice_set` refuses a source that shares the pool's storage.
                            let src = t.narrow(0, m.from as usize * bt, bt)?.copy()?;
                            t.slice_set(&src, 0, m.to as usize * bt)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Changes the pool to `blocks` per group after the scheduler's resize: copies the moved blocks, then
    /// truncates or grows the storage.
    pub fn resize(&mut self, blocks: Vec<usize>, moves: &[BlockMove]) -> Result<()> {
        self.copy_blocks(moves)?;
        let l = self.layout.clone();
        let (kvh, hd, bt) = (l.kv_heads, l.head_dim, l.block_tokens);
        let block_elems = kvh * bt * hd;
        match &mut self.storage {
            Storage::Released => {}
            Storage::Host { k, v } => {
                for (il, kl) in k.iter_mut().enumerate() {
                    let g = l.place(il).0;
                    for buf in std::iter::once(kl).chain(v.get_mut(il)) {
                        buf.resize(blocks[g] * block_elems, 0.0);
                        buf.shrink_to_fit();
                    }
                }
            }
            Storage::Device { k, v } => {
                for (il, kl) in k.iter_mut().enumerate() {
                    let g = l.place(il).0;
                    for t in std::iter::once(kl).chain(v.get_mut(il)) {
                        let new = blocks[g] * bt;
                        let old = t.dim(0)?;
                        *t = if new <= old {
                            t.narrow(0, 0, new)?.contiguous()?
                        } else {
                            let pad = Tensor::zeros((new - old, kvh, hd), t.dtype(), t.device())?;
                            Tensor::cat(&[&*t, &pad], 0)?
                        };
                    }
                }
            }
        }
        self.blocks = blocks;
        Ok(())
    }
}

/// The slot of every position of a step, per group: where each row's key and value go.
#[derive(Debug)]
pub struct SlotMap {
    /// Per group, per row of the step: the slot, or None when a ring will not keep that position.
    pub rows: Vec<Vec<Option<u32>>>,
    /// Per group, for device pools: the scatter index `(kept rows, kv_heads·head_dim)` and, when some rows
    /// are skipped, the rows kept.
    device: Vec<Option<(Tensor, Option<Tensor>)>>,
}

impl SlotMap {
    /// The slots of `seqs`' positions, in step order: each entry is a sequence's first position, its
    /// number of positions and its block tables.
    pub fn new(
        layout: &KvLayout,
        seqs: &[(usize, usize, &[Vec<BlockId>])],
        device: Option<&Device>,
    ) -> Result<Self> {
        let bt = layout.block_tokens;
        let mut rows = vec![Vec::new(); layout.groups.len()];
        for (g, group) in layout.groups.iter().enumerate() {
            for &(start, len, tables) in seqs {
                let table = &tables[g];
                let ring = group.ring;
                // A ring keeps only the last `ring` blocks' worth: earlier rows of a long chunk are skipped.
                let keep_from = ring.map_or(0, |r| {
                    (start + len).saturating_sub(r * bt - (bt - 1)).max(start)
                });
                for p in start..start + len {
                    let b = p / bt;
                    let idx = ring.map_or(b, |r| b % r);
                    let slot = if p < keep_from {
                        None
                    } else {
                        table.get(idx).map(|&blk| blk * bt as u32 + (p % bt) as u32)
                    };
                    rows[g].push(slot);
                }
            }
        }
        let device = match device {
            None => vec![None; layout.groups.len()],
            Some(d) => {
                let width = layout.kv_heads * layout.head_dim;
                rows.iter()
                    .map(|r| {
                        let kept: Vec<u32> = r.iter().flatten().copied().collect();
                        if kept.is_empty() {
                            return Ok(None);
                        }
                        let n = kept.len();
                        let index: Vec<u32> = kept
                            .iter()
                            .flat_map(|&s| std::iter::repeat_n(s, width))
                            .collect();
                        let index = Tensor::from_vec(index, (n, width), d)?;
                        let picked = if n == r.len() {
                            None
                        } else {
                            let idx: Vec<u32> = r
                                .iter()
                                .enumerate()
                                .filter(|(_, s)| s.is_some())
                                .map(|(i, _)| i as u32)
                                .collect();
                            Some(Tensor::from_vec(idx, n, d)?)
                        };
                        Ok(Some((index, picked)))
                    })
                    .collect::<Result<_>>()?
            }
        };
        Ok(Self { rows, device })
    }
}

/// The slot of position `p` in a block table (ring-aware), if the table covers it.
pub fn slot_of(
    p: usize,
    table: &[BlockId],
    ring: Option<usize>,
    block_tokens: usize,
) -> Option<u32> {
    let b = p / block_tokens;
    let idx = ring.map_or(b, |r| b % r);
    table
        .get(idx)
        .map(|&blk| blk * block_tokens as u32 + (p % block_tokens) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gemma_like() -> KvLayout {
        // 6 layers, every 6th global; window 8 on blocks of 4: a ring of 3 blocks.
        let windows = (0..6).map(|il| if (il + 1) % 6 == 0 { None } else { Some(8) });
        KvLayout::from_windows(windows, 1, 2, KvDType::F32, 4)
    }

    #[test]
    fn groups_split_global_and_window_layers() {
        let l = gemma_like();
        assert_eq!(l.groups.len(), 2);
        assert_eq!(l.groups[0].layers, vec![5]);
        assert_eq!(l.groups[1].layers, vec![0, 1, 2, 3, 4]);
        assert_eq!(l.groups[1].ring, Some(3));
        assert_eq!(l.place(5), (0, 0));
        assert_eq!(l.place(3), (1, 3));
    }

    #[test]
    fn pool_bytes_match_the_per_token_figures() {
        let l = gemma_like();
        let blocks = l.pool_blocks(10, 2);
        assert_eq!(blocks, vec![6, 6]);
        // Global: ceil(10/4)*4 positions per sequence; rings: 3 blocks of 4 per sequence.
        let per_seq = 12 * l.bytes_per_token() + l.ring_bytes_per_sequence();
        assert_eq!(l.pool_bytes(&blocks), 2 * per_seq);
        let pool = KvPool::new(l.clone(), blocks.clone(), &Device::Cpu, false).unwrap();
        assert_eq!(pool.bytes(), l.pool_bytes(&blocks));
    }

    #[test]
    fn ring_slots_skip_positions_the_ring_will_not_keep() {
        let l = gemma_like();
        let tables = vec![vec![0, 1, 2, 3, 4], vec![7, 8, 9]];
        // 20 positions at once: the ring (3 blocks of 4) keeps positions from 20 - 12 + 3 = 11 on.
        let m = SlotMap::new(&l, &[(0, 20, &tables)], None).unwrap();
        assert_eq!(m.rows[0][19], Some(4 * 4 + 3));
        assert_eq!(m.rows[1][10], None);
        assert_eq!(m.rows[1][11], slot_of(11, &tables[1], Some(3), 4));
        // Position 19 is in block 4: ring entry 4 % 3 = 1, block 8.
        assert_eq!(m.rows[1][19], Some(8 * 4 + 3));
    }

    #[test]
    fn host_and_device_pools_store_the_same() {
        let l = KvLayout::from_windows([None], 2, 3, KvDType::F32, 4);
        let tables = vec![vec![1, 0]];
        let k = Tensor::arange(0f32, 30.0, &Device::Cpu)
            .unwrap()
            .reshape((5, 2, 3))
            .unwrap();
        let v = (&k + 100.0).unwrap();
        let mut host = KvPool::new(l.clone(), vec![2], &Device::Cpu, false).unwrap();
        let mut dev = KvPool::new(l.clone(), vec![2], &Device::Cpu, true).unwrap();
        let m = SlotMap::new(&l, &[(0, 5, &tables)], None).unwrap();
        host.write(0, &k, &v, &m).unwrap();
        let m = SlotMap::new(&l, &[(0, 5, &tables)], Some(&Device::Cpu)).unwrap();
        dev.write(0, &k, &v, &m).unwrap();
        let (dk, _) = dev.device_layer(0).unwrap();
        let dk: Vec<Vec<Vec<f32>>> = dk.to_vec3().unwrap();
        let hk = host.host_layer(0).unwrap().k;
        for p in 0..5 {
            let slot = slot_of(p, &tables[0], None, 4).unwrap() as usize;
            for (h, row) in dk[slot].iter().enumerate() {
                let at = ((slot / 4 * 2 + h) * 4 + slot % 4) * 3;
                assert_eq!(&hk[at..at + 3], row.as_slice(), "position {p} head {h}");
                assert_eq!(row[0], (p * 6 + h * 3) as f32);
            }
        }
    }
}
