//! One group's KV blocks as the scheduler accounts for them: free blocks (no content), blocks referenced by
//! sequences (counted), and cached blocks — full blocks whose content is keyed by the hash of every token
//! up to their end, kept after the last sequence lets go of them and reused by any later sequence with the
//! same prefix. Unreferenced cached blocks are the first to go when a block is needed: least recently used
//! first. Each cached block also keeps its tokens and its parent's key, so that a later sequence whose
//! prompt diverges inside a block can copy the part it shares ([`GroupBlocks::children`]). Pure data, like
//! the rest of the scheduler.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::BlockId;

/// The key of a full block's content: a hash chained over every token before its end.
pub type BlockHash = u128;

/// What a cached block holds.
#[derive(Debug, Clone)]
struct Entry {
    /// Its content key.
    hash: BlockHash,
    /// The content key of the block before it (0 for a first block).
    parent: BlockHash,
    /// Its tokens.
    tokens: Box<[u32]>,
}

/// A group's blocks.
#[derive(Debug, Clone)]
pub(super) struct GroupBlocks {
    /// Blocks in the pool.
    total: usize,
    /// Blocks holding nothing.
    free: BTreeSet<BlockId>,
    /// References per block (sequences whose tables hold it).
    refs: Vec<u32>,
    /// The content of each cached block.
    entry_of: Vec<Option<Entry>>,
    /// Cached blocks by content key.
    by_hash: HashMap<BlockHash, BlockId>,
    /// Cached blocks by their parent's key.
    children: HashMap<BlockHash, BTreeSet<BlockId>>,
    /// Unreferenced cached blocks by last use (oldest first).
    lru: BTreeMap<u64, BlockId>,
    /// When each unreferenced cached block was last let go of (its key in `lru`).
    released_at: Vec<u64>,
    /// The use clock (counts releases).
    clock: u64,
}

impl GroupBlocks {
    /// `total` free blocks.
    pub(super) fn new(total: usize) -> Self {
        Self {
            total,
            free: (0..total as BlockId).collect(),
            refs: vec![0; total],
            entry_of: vec![None; total],
            by_hash: HashMap::new(),
            children: HashMap::new(),
            lru: BTreeMap::new(),
            released_at: vec![0; total],
            clock: 0,
        }
    }

    /// Blocks in the pool.
    pub(super) fn total(&self) -> usize {
        self.total
    }

    /// Blocks a new allocation may take: free ones and unreferenced cached ones.
    pub(super) fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Blocks referenced by sequences.
    pub(super) fn referenced(&self) -> usize {
        self.total - self.available()
    }

    /// Unreferenced cached blocks (the share of the pool the cache holds).
    pub(super) fn cached(&self) -> usize {
        self.lru.len()
    }

    /// Free blocks (no content).
    pub(super) fn free(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.free.iter().copied()
    }

    /// Unreferenced cached blocks.
    pub(super) fn unreferenced_cached(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.lru.values().copied()
    }

    /// References to block `b`.
    pub(super) fn refs(&self, b: BlockId) -> u32 {
        self.refs[b as usize]
    }

    /// True when block `b` holds cached content.
    pub(super) fn is_cached(&self, b: BlockId) -> bool {
        self.entry_of[b as usize].is_some()
    }

    /// Before its holder overwrites cached block `b` in place: moves `b`'s content key to another block
    /// (free, else the least recently used cached one), which joins the cache as the most recently used,
    /// and returns it — the caller copies `b` there before anything writes. None when no block can take
    /// it: the content is forgotten.
    pub(super) fn preserve(&mut self, b: BlockId) -> Option<BlockId> {
        let entry = self.unlink(b)?;
        let to = match self.free.pop_first() {
            Some(t) => t,
            None => {
                let (_, t) = self.lru.pop_first()?;
                self.forget(t);
                t
            }
        };
        self.link(to, entry);
        self.clock += 1;
        self.released_at[to as usize] = self.clock;
        self.lru.insert(self.clock, to);
        Some(to)
    }

    /// The cached block with content `hash`, if any.
    pub(super) fn lookup(&self, hash: BlockHash) -> Option<BlockId> {
        self.by_hash.get(&hash).copied()
    }

    /// The cached blocks that follow the content keyed `parent` (0: first blocks), as their content
    /// keys and tokens.
    pub(super) fn children(
        &self,
        parent: BlockHash,
    ) -> impl Iterator<Item = (BlockHash, &[u32])> + '_ {
        self.children
            .get(&parent)
            .into_iter()
            .flatten()
            .filter_map(|&b| self.entry_of[b as usize].as_ref())
            .map(|e| (e.hash, &e.tokens[..]))
    }

    /// True when taking block `b` would take it from the unreferenced cache (reducing what is available).
    pub(super) fn is_unreferenced(&self, b: BlockId) -> bool {
        self.refs[b as usize] == 0
    }

    /// Takes a block for writing: a free one, else the least recently used cached one (forgetting its
    /// content). None when every block is referenced.
    pub(super) fn alloc(&mut self) -> Option<BlockId> {
        let b = match self.free.pop_first() {
            Some(b) => b,
            None => {
                let (_, b) = self.lru.pop_first()?;
                self.forget(b);
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Adds a reference to cached block `b` (a sequence reuses it).
    pub(super) fn retain(&mut self, b: BlockId) {
        let i = b as usize;
        if self.refs[i] == 0 {
            self.lru.remove(&self.released_at[i]);
        }
        self.refs[i] += 1;
    }

    /// Drops a reference to block `b`. At zero a cached block joins the cache's LRU; any other is free.
    pub(super) fn release(&mut self, b: BlockId) {
        let i = b as usize;
        debug_assert!(self.refs[i] > 0, "releasing unreferenced block {b}");
        self.refs[i] = self.refs[i].saturating_sub(1);
        if self.refs[i] > 0 {
            return;
        }
        if self.entry_of[i].is_some() {
            self.clock += 1;
            self.released_at[i] = self.clock;
            self.lru.insert(self.clock, b);
        } else {
            self.free.insert(b);
        }
    }

    /// Records that referenced block `b` now holds the full content `hash`: `tokens` after the content
    /// keyed `parent`. A content already cached in another block stays there (this block stays private
    /// and is freed with its sequence).
    pub(super) fn register(
        &mut self,
        b: BlockId,
        hash: BlockHash,
        parent: BlockHash,
        tokens: &[u32],
    ) {
        let i = b as usize;
        if self.entry_of[i].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        let tokens = tokens.into();
        self.link(
            b,
            Entry {
                hash,
                parent,
                tokens,
            },
        );
    }

    /// Makes block `b` hold cached content `entry`.
    fn link(&mut self, b: BlockId, entry: Entry) {
        self.by_hash.insert(entry.hash, b);
        self.children.entry(entry.parent).or_default().insert(b);
        self.entry_of[b as usize] = Some(entry);
    }

    /// Takes block `b`'s cached content out of the indexes (None if it has none).
    fn unlink(&mut self, b: BlockId) -> Option<Entry> {
        let entry = self.entry_of[b as usize].take()?;
        self.by_hash.remove(&entry.hash);
        if let Some(set) = self.children.get_mut(&entry.parent) {
            set.remove(&b);
            if set.is_empty() {
                self.children.remove(&entry.parent);
            }
        }
        Some(entry)
    }

    /// Forgets every unreferenced cached block; returns how many were dropped.
    pub(super) fn drop_cache(&mut self) -> usize {
        let blocks: Vec<BlockId> = self.lru.values().copied().collect();
        self.lru.clear();
        for &b in &blocks {
            self.forget(b);
            self.free.insert(b);
        }
        blocks.len()
    }

    /// Forgets block `b`'s cached content.
    fn forget(&mut self, b: BlockId) {
        self.unlink(b);
    }

    /// Changes the pool to `new` blocks after the caller moved every referenced block below `new`
    /// (`moves`: from, to). Cached blocks that do not fit are dropped; the others keep their content.
    pub(super) fn resize(&mut self, new: usize, moves: &[(BlockId, BlockId)]) {
        for &(from, to) in moves {
            let (f, t) = (from as usize, to as usize);
            self.refs[t] = self.refs[f];
            self.refs[f] = 0;
            if let Some(entry) = self.unlink(from) {
                self.link(to, entry);
            }
        }
        self.refs.resize(new, 0);
        self.released_at.resize(new, 0);
        for b in new..self.entry_of.len() {
            self.unlink(b as BlockId);
        }
        self.entry_of.resize(new, None);
        self.lru
            .retain(|_, b| (*b as usize) < new && self.entry_of[*b as usize].is_some());
        self.free = (0..new as BlockId)
            .filter(|&b| self.refs[b as usize] == 0 && self.entry_of[b as usize].is_none())
            .collect();
        self.total = new;
    }

    /// Blocks below `new` that a resize can move referenced blocks into, taking free ones first and then
    /// cached ones (least recently used first), which are forgotten.
    pub(super) fn targets_below(&mut self, new: usize, count: usize) -> Vec<BlockId> {
        let mut out: Vec<BlockId> = self
            .free
            .iter()
            .copied()
            .filter(|&b| (b as usize) < new)
            .take(count)
            .collect();
        if out.len() < count {
            let cached: Vec<(u64, BlockId)> = self
                .lru
                .iter()
                .filter(|(_, b)| (**b as usize) < new)
                .map(|(k, b)| (*k, *b))
                .take(count - out.len())
                .collect();
            for (k, b) in cached {
                self.lru.remove(&k);
                self.forget(b);
                out.push(b);
            }
        }
        for b in &out {
            self.free.remove(b);
        }
        out
    }
}
