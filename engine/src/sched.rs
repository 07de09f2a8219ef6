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

use std::collections::{BTreeMap, BTreeSet, VecDeque};

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
}

impl StepPlan {
    /// Tokens computed in the step.
    pub fn tokens(&self) -> usize {
        self.items.iter().map(|i| i.len).sum()
    }
}

/// A block moving to a lower index when a pool shrinks.
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
    tokens: usize,
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
    free: Vec<BTreeSet<BlockId>>,
    next_arrival: u64,
    preemptions: u64,
}

impl Scheduler {
    /// A scheduler with every block free.
    pub fn new(config: SchedulerConfig) -> Self {
        let free = config
            .groups
            .iter()
            .map(|g| (0..g.blocks as BlockId).collect())
            .collect();
        Self {
            config,
            seqs: BTreeMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            free,
            next_arrival: 0,
            preemptions: 0,
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

    /// Queues a new sequence with `prompt_tokens` known tokens.
    pub fn add(&mut self, id: SeqId, prompt_tokens: usize) -> Result<(), Refusal> {
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
                tokens: prompt_tokens,
                computed: 0,
                tables: vec![Vec::new(); self.config.groups.len()],
                phase: Phase::Waiting,
                preemptions: 0,
            },
        );
        self.waiting.push_back(id);
        Ok(())
    }

    /// Records a token sampled for `id` (it becomes known; the next step computes its KV). Returns false
    /// for an unknown sequence.
    pub fn push_token(&mut self, id: SeqId) -> bool {
        match self.seqs.get_mut(&id) {
            Some(s) => {
                s.tokens += 1;
                true
            }
            None => false,
        }
    }

    /// Removes a sequence (finished or cancelled) and frees its blocks. Returns false if unknown.
    pub fn remove(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        for (g, table) in seq.tables.into_iter().enumerate() {
            self.free[g].extend(table);
        }
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        true
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> StepPlan {
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
                let want = seq.tokens - seq.computed;
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
            let seq = &self.seqs[&id];
            let want = seq.tokens - seq.computed;
            // One block per running sequence stays free for its growth, so that an admission is not
            // preempted again at the next block boundary of an older sequence.
            let reserve = self.running.len();
            let take = self.fits(seq, want.min(budget), reserve);
            if take == 0 {
                break;
            }
            self.waiting.pop_front();
            self.running.push(id);
            self.running.sort_by_key(|r| self.seqs[r].arrival);
            self.allocate(id, take);
            let seq = self.seqs.get_mut(&id).expect("an admitted sequence exists");
            seq.phase = Phase::Running;
            budget -= take;
            plan.items.push(self.item(id, take));
        }
        plan.items.sort_by_key(|it| self.seqs[&it.seq].arrival);
        plan
    }

    /// Changes the pool sizes (one per group). Sequences are preempted newest first until what the rest
    /// hold fits; blocks at or beyond the new sizes are moved below them.
    pub fn resize(&mut self, blocks: &[usize]) -> Resize {
        let mut out = Resize::default();
        let fits = |s: &Self| {
            s.config.groups.iter().enumerate().all(|(g, _)| {
                let used: usize = s.seqs.values().map(|q| q.tables[g].len()).sum();
                used <= blocks.get(g).copied().unwrap_or(0)
            })
        };
        while !fits(self) {
            let Some(&victim) = self.running.last() else {
                break;
            };
            self.preempt(victim);
            out.preempted.push(victim);
        }
        for (g, group) in self.config.groups.iter_mut().enumerate() {
            let new = blocks.get(g).copied().unwrap_or(0);
            let mut targets: BTreeSet<BlockId> = (0..new.min(group.blocks) as BlockId)
                .filter(|b| self.free[g].contains(b))
                .collect();
            for seq in self.seqs.values_mut() {
                for b in seq.tables[g].iter_mut() {
                    if (*b as usize) >= new {
                        let to = targets
                            .pop_first()
                            .expect("the preemptions above made room below the new size");
                        out.moves.push(BlockMove {
                            group: g,
                            from: *b,
                            to,
                        });
                        *b = to;
                    }
                }
            }
            let held: BTreeSet<BlockId> = self
                .seqs
                .values()
                .flat_map(|s| s.tables[g].iter().copied())
                .collect();
            self.free[g] = (0..new as BlockId).filter(|b| !held.contains(b)).collect();
            group.blocks = new;
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
        self.seqs.get(&id).map(|s| s.tokens)
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
        self.config
            .groups
            .iter()
            .enumerate()
            .map(|(g, c)| GroupUsage {
                total: c.blocks,
                used: c.blocks - self.free[g].len(),
            })
            .collect()
    }

    /// Every block table of every sequence (for invariant checks).
    pub fn tables(&self) -> impl Iterator<Item = (SeqId, &[Vec<BlockId>])> {
        self.seqs.iter().map(|(id, s)| (*id, s.tables.as_slice()))
    }

    /// The free blocks of group `g`.
    pub fn free_blocks(&self, g: usize) -> impl Iterator<Item = BlockId> + '_ {
        self.free[g].iter().copied()
    }

    /// The step item of sequence `id`, which has just been given its last `n` computed positions.
    fn item(&self, id: SeqId, n: usize) -> StepItem {
        let seq = &self.seqs[&id];
        StepItem {
            seq: id,
            start: seq.computed - n,
            len: n,
            sample: seq.computed == seq.tokens,
            tables: seq.tables.clone(),
        }
    }

    /// Blocks sequence `seq` must hold in each group to have `positions` computed.
    fn needed(&self, positions: usize) -> impl Iterator<Item = usize> + '_ {
        let bt = self.config.block_tokens.max(1);
        let n = positions.div_ceil(bt);
        self.config
            .groups
            .iter()
            .map(move |g| g.ring.map_or(n, |r| n.min(r)))
    }

    /// Extra blocks per group for `seq` to compute `take` more positions.
    fn extra(&self, seq: &Seq, take: usize) -> Vec<usize> {
        self.needed(seq.computed + take)
            .zip(&seq.tables)
            .map(|(n, t)| n.saturating_sub(t.len()))
            .collect()
    }

    /// The most of `take` positions (all, or whole blocks fewer) that `seq` can compute with the free
    /// blocks, keeping `reserve` blocks free in every plain group (rings stop growing, so they need none).
    fn fits(&self, seq: &Seq, take: usize, reserve: usize) -> usize {
        let ok = |t: usize| {
            self.extra(seq, t).iter().enumerate().all(|(g, &need)| {
                let keep = if self.config.groups[g].ring.is_some() {
                    0
                } else {
                    reserve
                };
                need == 0 || need + keep <= self.free[g].len()
            })
        };
        if ok(take) {
            return take;
        }
        // Fewer positions: up to the end of the blocks that do fit.
        let bt = self.config.block_tokens.max(1);
        let mut t = take;
        while t > 0 {
            let end = seq.computed + t;
            let aligned = (end - 1) / bt * bt;
            t = aligned.saturating_sub(seq.computed);
            if t > 0 && ok(t) {
                return t;
            }
        }
        0
    }

    /// Takes the blocks for `take` more positions of `id` (they must be free) and advances it.
    fn allocate(&mut self, id: SeqId, take: usize) {
        let extra = self.extra(&self.seqs[&id], take);
        let seq = self
            .seqs
            .get_mut(&id)
            .expect("allocating for a known sequence");
        for (g, n) in extra.into_iter().enumerate() {
            for _ in 0..n {
                let b = self.free[g]
                    .pop_first()
                    .expect("the caller checked the blocks are free");
                seq.tables[g].push(b);
            }
        }
        seq.computed += take;
    }

    /// Gives running sequence `id` up to `take` more positions, preempting newer sequences when a decode
    /// needs a block.
    fn grow_running(&mut self, id: SeqId, take: usize, plan: &mut StepPlan) -> Grow {
        loop {
            let seq = &self.seqs[&id];
            let fit = self.fits(seq, take, 0);
            // A decode needs its one position; a prefill chunk takes what fits when it can progress.
            if fit == take || (fit > 0 && take > 1) {
                self.allocate(id, fit);
                return Grow::Took(fit);
            }
            let arrival = seq.arrival;
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

    /// Frees a running sequence's blocks and puts it back among the waiting, in arrival order.
    fn preempt(&mut self, id: SeqId) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        for (g, table) in seq.tables.iter_mut().enumerate() {
            self.free[g].extend(table.drain(..));
        }
        seq.computed = 0;
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

enum Grow {
    Took(usize),
    Stalled,
    Wait,
}

#[cfg(test)]
mod tests;
