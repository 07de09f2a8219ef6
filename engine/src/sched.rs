//! The step scheduler: which sequences of one model advance in the next forward pass, and which KV blocks
//! they write. Pure and deterministic like `ult-policy`: no IO, no clock, no threads; the worker tells it
//! what happened (a sequence arrived, a token was sampled, a client left) and gets decisions back as data.
//!
//! Each step it (1) gives every running sequence that waits for its next token one position, (2) gives
//! running sequences still prefilling a chunk of what is left of the per-step token budget, and
//! (3) admits waiting sequences in arrival order while the budget, `max_running` and free blocks allow.
//! When a running sequence needs a block and none is free, the newest running sequence is preempted: its
//! blocks are freed and it waits again (in its arrival order) to be recomputed from its tokens later. The
//! oldest running sequence can always take blocks from every newer one, so it always progresses unless the
//! whole pool cannot hold it; it is then reported as stalled (its caller ends it: the budget is full).
//!
//! Blocks come in groups (one per kind of layer): a plain group holds every position of a sequence; a ring
//! group (sliding-window layers) holds at most `ring` blocks per sequence, reused round-robin, so a
//! sequence's position `p` lives in block `table[(p / block_tokens) % ring]`.
//!
//! The prefix cache: each full block's content is keyed by a hash chained over every token up to its end.
//! After a step, the blocks it filled are registered under their keys ([`Scheduler::step_done`]); a
//! sequence admitted later looks its prompt up block by block and starts after the longest cached prefix
//! (leaving its last two tokens to compute), holding those blocks by reference. Where its prompt diverges
//! inside a block, the leading tokens it shares with a cached block that follows the same prefix are
//! reused too: the plan copies that block into a fresh one ([`StepPlan::copies`]), which the sequence
//! writes on from the first token it does not share, as llama.cpp reuses its slot's common prefix to the
//! token. Nothing ever writes a block while it is cached. Plain groups share
//! cached blocks (a sequence only writes past its prefix). Ring blocks are never shared, because a ring
//! overwrites its own slots in place: a sequence that reuses a prefix gets fresh ring blocks that the plan
//! fills by copying the cached ones ([`StepPlan::copies`]), and before a ring laps over a block that is
//! cached, the plan copies it to another block that keeps the cache entry. A ring group is reused only
//! where exact: the prefix must have the ring's last `ring` blocks cached, which hold every key its window
//! still reads. Blocks no sequence references keep their content until a new block is needed (least
//! recently used first), the pool shrinks, or the governor drops the cache.

use std::collections::{BTreeMap, VecDeque};

mod blocks;

pub use blocks::BlockHash;
use blocks::GroupBlocks;

/// A sequence's id, chosen by the caller.
pub type SeqId = u64;

/// A block's index within its group's pool.
pub type BlockId = u32;

/// One group of KV blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupConfig {
    /// Blocks in the pool.
    pub blocks: usize,
    /// For sliding-window layers: the most blocks one sequence holds (a ring); None keeps every position.
    pub ring: Option<usize>,
}

/// How a model's sequences are scheduled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// The most sequences running at once (`max_sequences`).
    pub max_running: usize,
    /// The most tokens one step computes (decodes and prefill chunks together).
    pub step_tokens: usize,
    /// Positions per block.
    pub block_tokens: usize,
    /// The most positions one sequence may hold (the model's context).
    pub context: usize,
    /// The block groups.
    pub groups: Vec<GroupConfig>,
    /// Keep full blocks' content for later sequences with the same prefix.
    pub prefix_cache: bool,
}

/// Why a sequence was refused on arrival.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The prompt is empty.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The id is already in use.
    #[error("sequence {0} already exists")]
    DuplicateId(SeqId),
    /// The prompt does not leave room for one generated token in the context or in the whole pool.
    #[error("the prompt has {prompt_tokens} tokens but at most {limit} fit")]
    TooLong {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// The most a prompt may have.
        limit: usize,
    },
}

/// One sequence's part in a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepItem {
    /// The sequence.
    pub seq: SeqId,
    /// The first position computed (the sequence's tokens `start..start + len`).
    pub start: usize,
    /// Positions computed.
    pub len: usize,
    /// Whether the step reaches the sequence's last known token, so its logits are wanted.
    pub sample: bool,
    /// The sequence's block table in each group, after this step's allocations.
    pub tables: Vec<Vec<BlockId>>,
}

/// What one step does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepPlan {
    /// The sequences that advance, oldest first.
    pub items: Vec<StepItem>,
    /// Sequences preempted during planning (their blocks were freed; they wait to be recomputed).
    pub preempted: Vec<SeqId>,
    /// Running sequences that cannot get the block they need even with every other sequence preempted:
    /// the pool cannot hold them. The caller ends them (their KV budget is full).
    pub stalled: Vec<SeqId>,
    /// Block contents to copy, in order, before the step runs (ring blocks of a reused prefix, and cached
    /// ring blocks a lap is about to overwrite).
    pub copies: Vec<BlockMove>,
}

impl StepPlan {
    /// Tokens computed in the step.
    pub fn tokens(&self) -> usize {
        self.items.iter().map(|i| i.len).sum()
    }
}

/// A block's content copied to another block (a pool shrinking, or a plan's copies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMove {
    /// The group.
    pub group: usize,
    /// Where the block's contents are now.
    pub from: BlockId,
    /// Where they must go.
    pub to: BlockId,
}

/// What resizing the pool requires of the caller.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resize {
    /// Sequences preempted to fit (newest first).
    pub preempted: Vec<SeqId>,
    /// Block contents to copy before the storage is truncated, in order.
    pub moves: Vec<BlockMove>,
}

/// Where a sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting to be admitted (or re-admitted after a preemption).
    Waiting,
    /// In the running batch.
    Running,
}

/// A sequence as the scheduler sees it.
#[derive(Debug, Clone)]
struct Seq {
    /// Arrival order: admission and preemption follow it.
    arrival: u64,
    /// Known tokens (prompt and generated).
    tokens: Vec<u32>,
    /// Content keys of the full blocks of `tokens` hashed so far.
    hashes: Vec<BlockHash>,
    /// Per group: the logical blocks below this are registered in the cache (or were reused from it).
    registered: Vec<usize>,
    /// Prompt positions reused from the cache at the first admission.
    cached_tokens: usize,
    /// Admitted at least once.
    admitted: bool,
    /// Positions whose KV is in the pool.
    computed: usize,
    /// Block tables, one per group.
    tables: Vec<Vec<BlockId>>,
    phase: Phase,
    preemptions: u32,
}

/// Usage of one block group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupUsage {
    /// Blocks in the pool.
    pub total: usize,
    /// Blocks held by sequences.
    pub used: usize,
    /// Blocks no sequence holds that keep cached content (reusable, and the first to be taken).
    pub cached: usize,
}

/// The prefix cache's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Admissions that reused at least one cached block.
    pub hits: u64,
    /// Admissions (with the cache on) that found nothing to reuse.
    pub misses: u64,
    /// Prompt positions not computed because they were reused.
    pub tokens_saved: u64,
}

/// The scheduler of one model's sequences and KV blocks.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    seqs: BTreeMap<SeqId, Seq>,
    /// Waiting sequences in arrival order.
    waiting: VecDeque<SeqId>,
    /// Running sequences in arrival order.
    running: Vec<SeqId>,
    pools: Vec<GroupBlocks>,
    /// Blocks held until the step being planned has run (copy sources), per group.
    held: Vec<(usize, BlockId)>,
    /// The copies of the step being planned.
    copies: Vec<BlockMove>,
    next_arrival: u64,
    preemptions: u64,
    cache: CacheStats,
}

impl Scheduler {
    /// A scheduler with every block free.
    pub fn new(config: SchedulerConfig) -> Self {
        let pools = config
            .groups
            .iter()
            .map(|g| GroupBlocks::new(g.blocks))
            .collect();
        Self {
            config,
            seqs: BTreeMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            pools,
            held: Vec::new(),
            copies: Vec::new(),
            next_arrival: 0,
            preemptions: 0,
            cache: CacheStats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The longest prompt that can be admitted (leaving room for one generated token).
    pub fn max_prompt(&self) -> usize {
        let bt = self.config.block_tokens.max(1);
        let pool = self
            .config
            .groups
            .iter()
            .filter(|g| g.ring.is_none())
            .map(|g| g.blocks * bt)
            .min()
            .unwrap_or(usize::MAX);
        if self.config.groups.iter().any(|g| g.blocks == 0) {
            return 0;
        }
        self.config.context.min(pool).saturating_sub(1)
    }

    /// Queues a new sequence whose known tokens are `prompt`.
    pub fn add(&mut self, id: SeqId, prompt: &[u32]) -> Result<(), Refusal> {
        let prompt_tokens = prompt.len();
        if prompt_tokens == 0 {
            return Err(Refusal::EmptyPrompt);
        }
        if self.seqs.contains_key(&id) {
            return Err(Refusal::DuplicateId(id));
        }
        let limit = self.max_prompt();
        if prompt_tokens > limit {
            return Err(Refusal::TooLong {
                prompt_tokens,
                limit,
            });
        }
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.seqs.insert(
            id,
            Seq {
                arrival,
                tokens: prompt.to_vec(),
                hashes: Vec::new(),
                registered: vec![0; self.config.groups.len()],
                cached_tokens: 0,
                admitted: false,
                computed: 0,
                tables: vec![Vec::new(); self.config.groups.len()],
                phase: Phase::Waiting,
                preemptions: 0,
            },
        );
        self.waiting.push_back(id);
        Ok(())
    }

    /// Records `token` sampled for `id` (it becomes known; the next step computes its KV). Returns false
    /// for an unknown sequence.
    pub fn push_token(&mut self, id: SeqId, token: u32) -> bool {
        match self.seqs.get_mut(&id) {
            Some(s) => {
                s.tokens.push(token);
                true
            }
            None => false,
        }
    }

    /// Tells the scheduler the last planned step ran: the blocks it filled hold their content now and
    /// join the prefix cache. (After a failed step, do not call it: the sequences in it are removed.)
    pub fn step_done(&mut self) {
        self.settle();
        if !self.config.prefix_cache {
            return;
        }
        let bt = self.config.block_tokens.max(1);
        for id in &self.running {
            let Some(seq) = self.seqs.get_mut(id) else {
                continue;
            };
            let full = seq.computed / bt;
            extend_hashes(seq, bt, full);
            let last = seq.computed.saturating_sub(1) / bt;
            for (g, group) in self.config.groups.iter().enumerate() {
                for k in seq.registered[g]..full {
                    let b = match group.ring {
                        None => seq.tables[g][k],
                        // Only blocks still in the ring hold their positions.
                        Some(r) if k + r > last => seq.tables[g][k % r],
                        Some(_) => continue,
                    };
                    let parent = k.checked_sub(1).map_or(0, |p| seq.hashes[p]);
                    let tokens = &seq.tokens[k * bt..(k + 1) * bt];
                    self.pools[g].register(b, seq.hashes[k], parent, tokens);
                }
                seq.registered[g] = seq.registered[g].max(full);
            }
        }
    }

    /// Forgets every cached block no sequence holds (the governor takes that memory back first). Returns
    /// the blocks dropped.
    pub fn drop_cache(&mut self) -> usize {
        self.settle();
        self.pools.iter_mut().map(GroupBlocks::drop_cache).sum()
    }

    /// The prefix cache's counters.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache
    }

    /// Prompt positions sequence `id` reused from the cache when it was first admitted.
    pub fn cached_tokens(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.cached_tokens)
    }

    /// Removes a sequence (finished or cancelled) and lets go of its blocks. Returns false if unknown.
    pub fn remove(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        for (g, table) in seq.tables.into_iter().enumerate() {
            for b in table {
                self.pools[g].release(b);
            }
        }
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        true
    }

    /// Lets go of the blocks held for the last planned step (it has run, or failed).
    fn settle(&mut self) {
        for (g, b) in std::mem::take(&mut self.held) {
            self.pools[g].release(b);
        }
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> StepPlan {
        self.settle();
        self.copies.clear();
        let mut plan = StepPlan::default();
        let mut budget = self.config.step_tokens.max(1);
        // Decodes first (one position each), then prefill chunks, both oldest first.
        for decode in [true, false] {
            let mut i = 0;
            while i < self.running.len() {
                let id = self.running[i];
                i += 1;
                if plan.items.iter().any(|it| it.seq == id) || plan.stalled.contains(&id) {
                    continue;
                }
                let Some(seq) = self.seqs.get(&id) else {
                    continue;
                };
                let want = seq.tokens.len() - seq.computed;
                if want == 0 || (want == 1) != decode || budget == 0 {
                    continue;
                }
                let take = want.min(budget);
                match self.grow_running(id, take, &mut plan) {
                    Grow::Took(n) => {
                        budget -= n;
                        plan.items.push(self.item(id, n));
                    }
                    Grow::Stalled => plan.stalled.push(id),
                    Grow::Wait => {}
                }
                // Preemptions may have shortened the running list before `i`.
                i = self
                    .running
                    .iter()
                    .position(|&r| r == id)
                    .map_or(0, |p| p + 1);
            }
        }
        // Refund what preempted items had taken.
        plan.items.retain(|it| self.running.contains(&it.seq));
        let used: usize = plan.items.iter().map(|i| i.len).sum();
        budget = self.config.step_tokens.max(1).saturating_sub(used);
        // Admission, strictly in arrival order.
        while budget > 0 && self.running.len() < self.config.max_running {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let reuse = self.lookup(id);
            let seq = &self.seqs[&id];
            let computed = reuse
                .as_ref()
                .map_or(seq.computed, |r| r.positions(self.config.block_tokens));
            let want = seq.tokens.len() - computed;
            // A reused ring's blocks are copies into fresh blocks: it holds none yet.
            let lens: Vec<usize> = match &reuse {
                Some(r) => r
                    .tables
                    .iter()
                    .zip(&self.config.groups)
                    .map(|(t, g)| if g.ring.is_some() { 0 } else { t.len() })
                    .collect(),
                None => seq.tables.iter().map(Vec::len).collect(),
            };
            let taken = reuse
                .as_ref()
                .map_or_else(|| vec![0; self.pools.len()], |r| self.taken_from_cache(r));
            // One block per running sequence stays free for its growth, so that an admission is not
            // preempted again at the next block boundary of an older sequence.
            let reserve = self.running.len();
            let take = self.fits(computed, &lens, &taken, want.min(budget), reserve);
            if take == 0 {
                break;
            }
            self.waiting.pop_front();
            self.running.push(id);
            self.running.sort_by_key(|r| self.seqs[r].arrival);
            self.start(id, reuse);
            self.allocate(id, take);
            let seq = self.seqs.get_mut(&id).expect("an admitted sequence exists");
            seq.phase = Phase::Running;
            budget -= take;
            plan.items.push(self.item(id, take));
        }
        plan.items.sort_by_key(|it| self.seqs[&it.seq].arrival);
        plan.copies = std::mem::take(&mut self.copies);
        plan
    }

    /// Changes the pool sizes (one per group). Sequences are preempted newest first until what the rest
    /// hold fits; cached blocks go before any sequence does; blocks held at or beyond the new sizes are
    /// moved below them.
    pub fn resize(&mut self, blocks: &[usize]) -> Resize {
        self.settle();
        let mut out = Resize::default();
        let fits = |s: &Self| {
            s.pools
                .iter()
                .enumerate()
                .all(|(g, p)| p.referenced() <= blocks.get(g).copied().unwrap_or(0))
        };
        while !fits(self) {
            let Some(&victim) = self.running.last() else {
                break;
            };
            self.preempt(victim);
            out.preempted.push(victim);
        }
        for g in 0..self.config.groups.len() {
            let new = blocks.get(g).copied().unwrap_or(0);
            // Every distinct held block at or beyond the new size moves to a free (or cached) one below.
            let mut movers: Vec<BlockId> = self
                .seqs
                .values()
                .flat_map(|s| s.tables[g].iter().copied())
                .filter(|&b| b as usize >= new)
                .collect();
            movers.sort_unstable();
            movers.dedup();
            let targets = self.pools[g].targets_below(new, movers.len());
            let map: BTreeMap<BlockId, BlockId> = movers.iter().copied().zip(targets).collect();
            for seq in self.seqs.values_mut() {
                for b in seq.tables[g].iter_mut() {
                    if let Some(&to) = map.get(b) {
                        *b = to;
                    }
                }
            }
            let moves: Vec<(BlockId, BlockId)> = map.into_iter().collect();
            out.moves.extend(
                moves
                    .iter()
                    .map(|&(from, to)| BlockMove { group: g, from, to }),
            );
            self.pools[g].resize(new, &moves);
            self.config.groups[g].blocks = new;
        }
        out
    }

    /// Sequences running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Sequences waiting (new or preempted).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// True when no sequence is known.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Where sequence `id` is, if known.
    pub fn phase(&self, id: SeqId) -> Option<Phase> {
        self.seqs.get(&id).map(|s| s.phase)
    }

    /// Known tokens of sequence `id`.
    pub fn tokens(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.tokens.len())
    }

    /// Times sequence `id` was preempted.
    pub fn preemptions_of(&self, id: SeqId) -> Option<u32> {
        self.seqs.get(&id).map(|s| s.preemptions)
    }

    /// Preemptions since the scheduler was made.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Block usage per group.
    pub fn usage(&self) -> Vec<GroupUsage> {
        self.pools
            .iter()
            .map(|p| GroupUsage {
                total: p.total(),
                used: p.referenced(),
                cached: p.cached(),
            })
            .collect()
    }

    /// Every block table of every sequence (for invariant checks).
    pub fn tables(&self) -> impl Iterator<Item = (SeqId, &[Vec<BlockId>])> {
        self.seqs.iter().map(|(id, s)| (*id, s.tables.as_slice()))
    }

    /// The free blocks (no content) of group `g`.
    pub fn free_blocks(&self, g: usize) -> impl Iterator<Item = BlockId> + '_ {
        self.pools[g].free()
    }

    /// The cached blocks of group `g` that no sequence holds.
    pub fn cached_blocks(&self, g: usize) -> impl Iterator<Item = BlockId> + '_ {
        self.pools[g].unreferenced_cached()
    }

    /// References to block `b` of group `g`.
    pub fn refs(&self, g: usize, b: BlockId) -> u32 {
        self.pools[g].refs(b)
    }

    /// The step item of sequence `id`, which has just been given its last `n` computed positions.
    fn item(&self, id: SeqId, n: usize) -> StepItem {
        let seq = &self.seqs[&id];
        StepItem {
            seq: id,
            start: seq.computed - n,
            len: n,
            sample: seq.computed == seq.tokens.len(),
            tables: seq.tables.clone(),
        }
    }

    /// The longest cached prefix of waiting sequence `id`'s tokens, when the cache is on and it has
    /// computed nothing: whole blocks, then the leading tokens it shares with a cached block that follows
    /// them (copied into a fresh block), leaving at least the last two tokens to compute — the last for
    /// its logits, and two so that the prompt's last step has several rows, as a cold prefill's has
    /// (Candle's CPU Q6_K kernel for one row rounds differently).
    fn lookup(&mut self, id: SeqId) -> Option<Reuse> {
        let bt = self.config.block_tokens.max(1);
        let seq = self.seqs.get_mut(&id)?;
        if !self.config.prefix_cache || seq.computed > 0 {
            return None;
        }
        let most = seq.tokens.len().saturating_sub(2) / bt;
        extend_hashes(seq, bt, most);
        let seq = &self.seqs[&id];
        let hashes = &seq.hashes[..most.min(seq.hashes.len())];
        // Plain groups: the leading blocks cached in every one.
        let mut n = hashes.len();
        for (g, group) in self.config.groups.iter().enumerate() {
            if group.ring.is_none() {
                n = n.min(
                    hashes
                        .iter()
                        .take_while(|h| self.pools[g].lookup(**h).is_some())
                        .count(),
                );
            }
        }
        // Rings: the last `ring` blocks before the reuse point must be cached.
        let ring_ok = |n: usize| {
            self.config.groups.iter().enumerate().all(|(g, group)| {
                group.ring.is_none_or(|r| {
                    (n.saturating_sub(r)..n).all(|k| self.pools[g].lookup(hashes[k]).is_some())
                })
            })
        };
        while n > 0 && !ring_ok(n) {
            n -= 1;
        }
        let partial = self.partial(&seq.tokens, hashes, n);
        if n == 0 && partial.is_none() {
            return None;
        }
        let tables = self
            .config
            .groups
            .iter()
            .enumerate()
            .map(|(g, group)| {
                let block = |k: usize| {
                    self.pools[g]
                        .lookup(hashes[k])
                        .expect("the lookup above found it")
                };
                match group.ring {
                    None => (0..n).map(block).collect(),
                    Some(r) => {
                        let held = n.min(r);
                        let mut table = vec![0; held];
                        for k in n - held..n {
                            table[k % r] = block(k);
                        }
                        table
                    }
                }
            })
            .collect();
        Some(Reuse {
            blocks: n,
            tables,
            partial,
        })
    }

    /// After `n` reused whole blocks of `tokens` (keyed `hashes`), the cached block that shares the most
    /// leading tokens with the next block, cached in every group (at most the tokens before the last
    /// two).
    fn partial(&self, tokens: &[u32], hashes: &[BlockHash], n: usize) -> Option<Partial> {
        let bt = self.config.block_tokens.max(1);
        let start = n * bt;
        let most = tokens.len().saturating_sub(2).saturating_sub(start).min(bt);
        if most == 0 {
            return None;
        }
        let next = &tokens[start..start + most];
        let parent = n.checked_sub(1).map_or(0, |p| hashes[p]);
        // Plain groups register every full block; rings only those still in their ring.
        let index = self
            .config
            .groups
            .iter()
            .position(|g| g.ring.is_none())
            .unwrap_or(0);
        self.pools[index]
            .children(parent)
            .filter_map(|(hash, cached)| {
                let tokens = cached.iter().zip(next).take_while(|(a, b)| a == b).count();
                let sources = self.pools.iter().map(|p| p.lookup(hash)).collect();
                Some((hash, tokens)).filter(|_| tokens > 0).zip(sources)
            })
            .max_by_key(|&((hash, tokens), _)| (tokens, std::cmp::Reverse(hash)))
            .map(|((_, tokens), sources)| Partial { tokens, sources })
    }

    /// Per group, the blocks of `reuse` (its tables and partial block's sources) that reusing them
    /// takes out of the available count.
    fn taken_from_cache(&self, reuse: &Reuse) -> Vec<usize> {
        reuse
            .tables
            .iter()
            .enumerate()
            .map(|(g, t)| {
                let source = reuse.partial.as_ref().map(|p| p.sources[g]);
                t.iter()
                    .chain(source.iter())
                    .filter(|&&b| self.pools[g].is_unreferenced(b))
                    .count()
            })
            .collect()
    }

    /// Puts an admitted sequence at its reuse point (holding the reused blocks) and counts the lookup.
    fn start(&mut self, id: SeqId, reuse: Option<Reuse>) {
        let cache_on = self.config.prefix_cache;
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let first = !seq.admitted;
        seq.admitted = true;
        match reuse {
            Some(r) => {
                for (g, table) in r.tables.iter().enumerate() {
                    for &b in table {
                        self.pools[g].retain(b);
                    }
                }
                // A partial block's sources are held until the step has copied them (taken before any
                // fresh block is, so no allocation below can evict them).
                if let Some(p) = &r.partial {
                    for (g, &b) in p.sources.iter().enumerate() {
                        self.pools[g].retain(b);
                        self.held.push((g, b));
                    }
                }
                let (blocks, positions) = (r.blocks, r.positions(self.config.block_tokens));
                let mut tables = r.tables;
                for (g, group) in self.config.groups.iter().enumerate() {
                    if group.ring.is_none() {
                        continue;
                    }
                    // The cached ring blocks stay held (as copy sources) until the step has run.
                    for b in tables[g].iter_mut() {
                        let fresh = self.pools[g]
                            .alloc()
                            .expect("the admission checked the blocks are available");
                        self.held.push((g, *b));
                        self.copies.push(BlockMove {
                            group: g,
                            from: *b,
                            to: fresh,
                        });
                        *b = fresh;
                    }
                }
                // The partial block: a private copy the sequence writes past the shared tokens (in a
                // ring, in the slot block `blocks` takes, after that slot's own copy).
                if let Some(p) = &r.partial {
                    for (g, group) in self.config.groups.iter().enumerate() {
                        let table = &mut tables[g];
                        let to = match group.ring {
                            Some(ring) if table.len() >= ring => table[blocks % ring],
                            _ => {
                                let fresh = self.pools[g]
                                    .alloc()
                                    .expect("the admission checked the blocks are available");
                                table.push(fresh);
                                fresh
                            }
                        };
                        self.copies.push(BlockMove {
                            group: g,
                            from: p.sources[g],
                            to,
                        });
                    }
                }
                seq.tables = tables;
                seq.computed = positions;
                seq.registered = vec![blocks; seq.registered.len()];
                if first {
                    seq.cached_tokens = positions;
                }
                self.cache.hits += 1;
                self.cache.tokens_saved += positions as u64;
            }
            None if cache_on && seq.computed == 0 => self.cache.misses += 1,
            None => {}
        }
    }

    /// Blocks a sequence must hold in each group to have `positions` computed.
    fn needed(&self, positions: usize) -> impl Iterator<Item = usize> + '_ {
        let bt = self.config.block_tokens.max(1);
        let n = positions.div_ceil(bt);
        self.config
            .groups
            .iter()
            .map(move |g| g.ring.map_or(n, |r| n.min(r)))
    }

    /// The most of `take` positions (all, or whole blocks fewer) that a sequence with `computed`
    /// positions and tables of `lens` blocks can compute with the available blocks (less `taken` per
    /// group), keeping `reserve` blocks available in every plain group (rings stop growing, so they
    /// need none).
    fn fits(
        &self,
        computed: usize,
        lens: &[usize],
        taken: &[usize],
        take: usize,
        reserve: usize,
    ) -> usize {
        let ok = |t: usize| {
            self.needed(computed + t)
                .zip(lens)
                .enumerate()
                .all(|(g, (n, &len))| {
                    let need = n.saturating_sub(len);
                    let keep = if self.config.groups[g].ring.is_some() {
                        0
                    } else {
                        reserve
                    };
                    let available = self.pools[g].available().saturating_sub(taken[g]);
                    need == 0 || need + keep <= available
                })
        };
        if ok(take) {
            return take;
        }
        // Fewer positions: up to the end of the blocks that do fit.
        let bt = self.config.block_tokens.max(1);
        let mut t = take;
        while t > 0 {
            let end = computed + t;
            let aligned = (end - 1) / bt * bt;
            t = aligned.saturating_sub(computed);
            if t > 0 && ok(t) {
                return t;
            }
        }
        0
    }

    /// The most of `take` positions running sequence `id` can compute now.
    fn fits_seq(&self, id: SeqId, take: usize, reserve: usize) -> usize {
        let seq = &self.seqs[&id];
        let lens: Vec<usize> = seq.tables.iter().map(Vec::len).collect();
        self.fits(seq.computed, &lens, &vec![0; lens.len()], take, reserve)
    }

    /// Takes the blocks for `take` more positions of `id` (they must be available) and advances it. A
    /// ring slot about to be overwritten that holds cached content has it copied elsewhere first.
    fn allocate(&mut self, id: SeqId, take: usize) {
        let bt = self.config.block_tokens.max(1);
        let seq = self
            .seqs
            .get_mut(&id)
            .expect("allocating for a known sequence");
        let end = seq.computed + take;
        let first_new = seq.computed.div_ceil(bt);
        let last = (end - 1) / bt;
        for (g, group) in self.config.groups.iter().enumerate() {
            let pool = &mut self.pools[g];
            let table = &mut seq.tables[g];
            let held = group.ring.map_or(last + 1, |r| (last + 1).min(r));
            while table.len() < held {
                table.push(
                    pool.alloc()
                        .expect("the caller checked the blocks are available"),
                );
            }
            if let Some(r) = group.ring {
                for j in first_new.max(r)..=last {
                    let b = table[j % r];
                    if pool.is_cached(b)
                        && let Some(to) = pool.preserve(b)
                    {
                        self.copies.push(BlockMove {
                            group: g,
                            from: b,
                            to,
                        });
                    }
                }
            }
        }
        seq.computed = end;
    }

    /// Gives running sequence `id` up to `take` more positions, preempting newer sequences when a decode
    /// needs a block.
    fn grow_running(&mut self, id: SeqId, take: usize, plan: &mut StepPlan) -> Grow {
        loop {
            let fit = self.fits_seq(id, take, 0);
            // A decode needs its one position; a prefill chunk takes what fits when it can progress.
            if fit == take || (fit > 0 && take > 1) {
                self.allocate(id, fit);
                return Grow::Took(fit);
            }
            let arrival = self.seqs[&id].arrival;
            match self.running.last().copied() {
                Some(victim) if victim != id && self.seqs[&victim].arrival > arrival => {
                    self.preempt(victim);
                    plan.preempted.push(victim);
                }
                _ => {
                    // Nothing newer to take from. Alone, it can never fit: stalled. Otherwise it waits
                    // for older sequences to finish (or to preempt it).
                    return if self.running.first() == Some(&id) {
                        Grow::Stalled
                    } else {
                        Grow::Wait
                    };
                }
            }
        }
    }

    /// Lets go of a running sequence's blocks (cached ones keep their content, so its recomputation may
    /// reuse them) and puts it back among the waiting, in arrival order.
    fn preempt(&mut self, id: SeqId) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        for (g, table) in seq.tables.iter_mut().enumerate() {
            for b in table.drain(..) {
                self.pools[g].release(b);
            }
        }
        seq.computed = 0;
        seq.registered = vec![0; seq.registered.len()];
        seq.phase = Phase::Waiting;
        seq.preemptions += 1;
        let arrival = seq.arrival;
        self.preemptions += 1;
        self.running.retain(|&r| r != id);
        let at = self
            .waiting
            .iter()
            .position(|w| self.seqs[w].arrival > arrival)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, id);
    }
}

/// A cached prefix a waiting sequence can start from.
#[derive(Debug)]
struct Reuse {
    /// Whole blocks reused.
    blocks: usize,
    /// The block tables holding them, per group.
    tables: Vec<Vec<BlockId>>,
    /// The block after them whose leading tokens are shared, if any.
    partial: Option<Partial>,
}

impl Reuse {
    /// Positions reused, with blocks of `block_tokens`: the whole blocks', then the partial block's.
    fn positions(&self, block_tokens: usize) -> usize {
        self.blocks * block_tokens.max(1) + self.partial.as_ref().map_or(0, |p| p.tokens)
    }
}

/// A cached block whose leading tokens a sequence shares: copied into a block of its own.
#[derive(Debug)]
struct Partial {
    /// Leading tokens shared.
    tokens: usize,
    /// The cached block, per group.
    sources: Vec<BlockId>,
}

/// Hashes `seq`'s full blocks up to `blocks` (as far as its known tokens go).
fn extend_hashes(seq: &mut Seq, bt: usize, blocks: usize) {
    while seq.hashes.len() < blocks && (seq.hashes.len() + 1) * bt <= seq.tokens.len() {
        let k = seq.hashes.len();
        let prev = k.checked_sub(1).map_or(0, |p| seq.hashes[p]);
        seq.hashes
            .push(chain(prev, &seq.tokens[k * bt..(k + 1) * bt]));
    }
}

/// The content key of a block of `tokens` after a prefix keyed `prev`: two independent 64-bit SipHash
/// digests, so a collision needs both to collide.
fn chain(prev: BlockHash, tokens: &[u32]) -> BlockHash {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let digest = |salt: u8| {
        let mut h = DefaultHasher::new();
        salt.hash(&mut h);
        prev.hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    };
    (u128::from(digest(0)) << 64) | u128::from(digest(1))
}

enum Grow {
    Took(usize),
    Stalled,
    Wait,
}

#[cfg(test)]
mod tests;
