//! The step scheduler's table tests and properties.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;

fn config(max_running: usize, step_tokens: usize, blocks: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_running,
        step_tokens,
        block_tokens: 4,
        context: 64,
        groups: vec![GroupConfig { blocks, ring: None }],
        prefix_cache: false,
    }
}

/// `n` prompt tokens.
fn toks(n: usize) -> Vec<u32> {
    (0..n as u32).collect()
}

/// `(seq, start, len, sample)` of each item.
fn items(plan: &StepPlan) -> Vec<(SeqId, usize, usize, bool)> {
    plan.items
        .iter()
        .map(|i| (i.seq, i.start, i.len, i.sample))
        .collect()
}

/// Samples a token for every item that wants one.
fn sample_all(s: &mut Scheduler, plan: &StepPlan) {
    for it in plan.items.iter().filter(|i| i.sample) {
        s.push_token(it.seq, 7);
    }
}

/// Every block is free, cached or referenced, and its reference count is the number of tables holding it.
fn check_ownership(s: &Scheduler) {
    for (g, usage) in s.usage().iter().enumerate() {
        let mut held = BTreeMap::<BlockId, u32>::new();
        for (_, tables) in s.tables() {
            for &b in &tables[g] {
                assert!((b as usize) < usage.total, "block {b} beyond the pool");
                *held.entry(b).or_default() += 1;
            }
        }
        // Copy sources held until the planned step has run.
        for &(hg, b) in &s.held {
            if hg == g {
                *held.entry(b).or_default() += 1;
            }
        }
        let mut seen = BTreeSet::new();
        for b in s.free_blocks(g).chain(s.cached_blocks(g)) {
            assert!(seen.insert(b), "block {b} listed twice");
            assert!((b as usize) < usage.total);
            assert!(!held.contains_key(&b), "block {b} is free but held");
            assert_eq!(s.refs(g, b), 0);
        }
        for (&b, &n) in &held {
            assert_eq!(s.refs(g, b), n, "block {b}'s references");
            assert!(seen.insert(b));
        }
        assert_eq!(seen.len(), usage.total, "group {g} lost blocks");
        assert_eq!(usage.used, held.len());
    }
}

#[test]
fn prefill_is_chunked_under_the_step_budget() {
    let mut s = Scheduler::new(config(4, 8, 16));
    s.add(1, &toks(20)).unwrap();
    let p = s.schedule();
    assert_eq!(items(&p), vec![(1, 0, 8, false)]);
    assert_eq!(p.items[0].tables[0].len(), 2);
    assert_eq!(items(&s.schedule()), vec![(1, 8, 8, false)]);
    let p = s.schedule();
    assert_eq!(items(&p), vec![(1, 16, 4, true)]);
    sample_all(&mut s, &p);
    assert_eq!(items(&s.schedule()), vec![(1, 20, 1, true)]);
}

#[test]
fn decodes_go_first_and_prefill_fills_the_rest() {
    let mut s = Scheduler::new(config(4, 8, 32));
    s.add(1, &toks(3)).unwrap();
    let p = s.schedule();
    sample_all(&mut s, &p);
    s.add(2, &toks(30)).unwrap();
    let p = s.schedule();
    // One decode for 1, seven prefill positions for 2.
    assert_eq!(items(&p), vec![(1, 3, 1, true), (2, 0, 7, false)]);
    assert_eq!(p.tokens(), 8);
}

#[test]
fn admission_is_fifo_and_capped_by_max_running() {
    let mut s = Scheduler::new(config(2, 64, 64));
    for id in 1..=4 {
        s.add(id, &toks(2)).unwrap();
    }
    let p = s.schedule();
    assert_eq!(items(&p), vec![(1, 0, 2, true), (2, 0, 2, true)]);
    assert_eq!((s.running(), s.waiting()), (2, 2));
    s.remove(1);
    sample_all(&mut s, &p);
    let p = s.schedule();
    assert_eq!(items(&p), vec![(2, 2, 1, true), (3, 0, 2, true)]);
}

#[test]
fn admission_keeps_a_block_free_per_running_sequence() {
    // 4 blocks: 1 holds 2; admitting all of 2 (2 blocks) would leave none for 1's growth.
    let mut s = Scheduler::new(config(4, 64, 4));
    s.add(1, &toks(8)).unwrap();
    s.add(2, &toks(8)).unwrap();
    let p = s.schedule();
    assert_eq!(items(&p), vec![(1, 0, 8, true), (2, 0, 4, false)]);
}

#[test]
fn a_decode_without_a_block_preempts_the_newest() {
    // 5 blocks of 4 positions: 1 and 2 hold 2 blocks each after their prompts.
    let mut s = Scheduler::new(config(4, 64, 5));
    s.add(1, &toks(8)).unwrap();
    s.add(2, &toks(8)).unwrap();
    let p = s.schedule();
    assert_eq!(items(&p), vec![(1, 0, 8, true), (2, 0, 8, true)]);
    sample_all(&mut s, &p);
    // 1 takes the last block for position 8; 2 (the newest) waits for one.
    let p = s.schedule();
    assert_eq!(items(&p), vec![(1, 8, 1, true)]);
    assert!(p.preempted.is_empty());
    sample_all(&mut s, &p);
    for pos in 9..12 {
        let p = s.schedule();
        assert_eq!(items(&p), vec![(1, pos, 1, true)]);
        sample_all(&mut s, &p);
    }
    // Position 12 needs a fourth block: 2 is preempted and its blocks go to 1.
    let p = s.schedule();
    assert_eq!(p.preempted, vec![2]);
    assert_eq!(items(&p), vec![(1, 12, 1, true)]);
    assert_eq!(s.phase(2), Some(Phase::Waiting));
    assert_eq!(s.preemptions_of(2), Some(1));
    check_ownership(&s);
    s.remove(1);
    // 2 recomputes its prompt and its sampled token (9 positions).
    let p = s.schedule();
    assert_eq!(items(&p), vec![(2, 0, 9, true)]);
}

#[test]
fn a_sequence_the_pool_cannot_hold_alone_stalls() {
    let mut s = Scheduler::new(config(4, 64, 2));
    s.add(1, &toks(7)).unwrap();
    let p = s.schedule();
    sample_all(&mut s, &p);
    let p = s.schedule();
    assert_eq!(items(&p), vec![(1, 7, 1, true)]);
    sample_all(&mut s, &p);
    let p = s.schedule();
    assert_eq!(p.stalled, vec![1]);
    assert!(p.items.is_empty());
}

#[test]
fn prompts_that_can_never_fit_are_refused() {
    let mut s = Scheduler::new(config(4, 64, 2));
    assert_eq!(
        s.add(1, &toks(8)),
        Err(Refusal::TooLong {
            prompt_tokens: 8,
            limit: 7
        })
    );
    assert_eq!(s.add(1, &toks(0)), Err(Refusal::EmptyPrompt));
    s.add(1, &toks(3)).unwrap();
    assert_eq!(s.add(1, &toks(3)), Err(Refusal::DuplicateId(1)));
}

#[test]
fn ring_groups_hold_at_most_their_ring() {
    let mut c = config(2, 64, 64);
    c.groups.push(GroupConfig {
        blocks: 6,
        ring: Some(3),
    });
    let mut s = Scheduler::new(c);
    s.add(1, &toks(30)).unwrap();
    let p = s.schedule();
    assert_eq!(p.items[0].tables[0].len(), 8);
    assert_eq!(p.items[0].tables[1].len(), 3);
    s.add(2, &toks(30)).unwrap();
    let p = s.schedule();
    assert_eq!(items(&p), vec![(2, 0, 30, true)]);
    assert_eq!(s.usage()[1].used, 6);
    check_ownership(&s);
}

#[test]
fn cancellation_frees_blocks_before_the_next_step() {
    let mut s = Scheduler::new(config(4, 64, 4));
    s.add(1, &toks(15)).unwrap();
    s.add(2, &toks(4)).unwrap();
    let p = s.schedule();
    assert_eq!(items(&p), vec![(1, 0, 15, true)]);
    assert!(s.remove(1));
    assert_eq!(s.usage()[0].used, 0);
    assert_eq!(items(&s.schedule()), vec![(2, 0, 4, true)]);
    assert!(!s.remove(1));
}

#[test]
fn shrinking_preempts_the_newest_and_compacts() {
    let mut s = Scheduler::new(config(4, 64, 8));
    s.add(1, &toks(8)).unwrap();
    s.add(2, &toks(8)).unwrap();
    s.add(3, &toks(4)).unwrap();
    s.schedule();
    assert_eq!(s.usage()[0].used, 5);
    // Down to 3 blocks: 3 (1 block) and 2 (2 blocks) go; 1 keeps blocks 0 and 1.
    let r = s.resize(&[3]);
    assert_eq!(r.preempted, vec![3, 2]);
    assert!(r.moves.is_empty());
    check_ownership(&s);
    assert_eq!(
        s.usage()[0],
        GroupUsage {
            total: 3,
            used: 2,
            cached: 0
        }
    );
}

#[test]
fn shrinking_moves_blocks_held_beyond_the_new_size() {
    let mut s = Scheduler::new(config(4, 64, 8));
    s.add(1, &toks(8)).unwrap();
    s.add(2, &toks(8)).unwrap();
    s.schedule();
    s.remove(1);
    // 2 holds blocks 2 and 3; shrinking to 2 moves them to 0 and 1.
    let r = s.resize(&[2]);
    assert!(r.preempted.is_empty());
    assert_eq!(
        r.moves,
        vec![
            BlockMove {
                group: 0,
                from: 2,
                to: 0
            },
            BlockMove {
                group: 0,
                from: 3,
                to: 1
            }
        ]
    );
    check_ownership(&s);
    // Growing again frees the new blocks.
    s.resize(&[8]);
    assert_eq!(
        s.usage()[0],
        GroupUsage {
            total: 8,
            used: 2,
            cached: 0
        }
    );
    check_ownership(&s);
}

/// A scheduler with the prefix cache on: one plain group of `blocks` (blocks of 4 positions).
fn cached(max_running: usize, step_tokens: usize, blocks: usize) -> Scheduler {
    let mut c = config(max_running, step_tokens, blocks);
    c.prefix_cache = true;
    Scheduler::new(c)
}

/// Runs sequence `id` to the end of its known tokens (its logits wanted), one step at a time.
fn prefill(s: &mut Scheduler, id: SeqId) -> Vec<(SeqId, usize, usize, bool)> {
    let mut all = Vec::new();
    loop {
        let p = s.schedule();
        s.step_done();
        let mine: Vec<_> = items(&p).into_iter().filter(|i| i.0 == id).collect();
        let done = mine.iter().any(|i| i.3);
        all.extend(mine);
        if done || p.items.is_empty() {
            return all;
        }
    }
}

#[test]
fn a_shared_prefix_is_computed_once() {
    let mut s = cached(4, 64, 16);
    let system: Vec<u32> = (100..118).collect(); // 18 tokens: 4 full blocks and 2 more
    let a = [system.clone(), vec![1, 2, 3]].concat();
    let b = [system.clone(), vec![7, 8]].concat();
    s.add(1, &a).unwrap();
    assert_eq!(prefill(&mut s, 1), vec![(1, 0, 21, true)]);
    s.remove(1);
    // Its 5 full blocks stay cached; none is held.
    assert_eq!(
        s.usage()[0],
        GroupUsage {
            total: 16,
            used: 0,
            cached: 5
        }
    );
    s.add(2, &b).unwrap();
    // The 4 blocks both share are reused whole, and the fifth's 2 shared tokens are copied into a block
    // of its own: only 2's own 2 tokens are computed.
    let plan = s.schedule();
    assert_eq!(
        plan.items
            .iter()
            .map(|i| (i.start, i.len))
            .collect::<Vec<_>>(),
        vec![(18, 2)]
    );
    let fifth = plan.items[0].tables[0][4];
    assert_eq!(plan.copies.len(), 1);
    assert_eq!(plan.copies[0].to, fifth);
    assert_ne!(plan.copies[0].from, fifth);
    s.step_done();
    assert_eq!(s.cached_tokens(2), Some(18));
    assert_eq!(
        s.cache_stats(),
        CacheStats {
            hits: 1,
            misses: 1,
            tokens_saved: 18
        }
    );
    check_ownership(&s);
}

#[test]
fn the_last_prompt_token_is_always_computed() {
    let mut s = cached(2, 64, 8);
    let p: Vec<u32> = (0..9).collect(); // 2 blocks and one token
    s.add(1, &p).unwrap();
    prefill(&mut s, 1);
    s.remove(1);
    s.add(2, &p).unwrap();
    // The first block is reused whole and 3 tokens of the second: the last two tokens are always
    // computed (the last for its logits).
    assert_eq!(prefill(&mut s, 2), vec![(2, 7, 2, true)]);
}

#[test]
fn generated_tokens_are_cached_for_the_next_turn() {
    let mut s = cached(2, 64, 16);
    let turn1: Vec<u32> = (0..6).collect();
    s.add(1, &turn1).unwrap();
    prefill(&mut s, 1);
    let mut history = turn1.clone();
    for t in 50..56 {
        s.push_token(1, t);
        history.push(t);
        prefill(&mut s, 1);
    }
    s.remove(1);
    // The next turn resends everything and adds its own: 12 known positions = 3 full blocks.
    let turn2 = [history, vec![9, 9, 9]].concat();
    s.add(2, &turn2).unwrap();
    assert_eq!(prefill(&mut s, 2)[0].1, 12);
}

#[test]
fn sequences_share_blocks_and_only_the_last_one_out_caches_them() {
    let mut s = cached(4, 64, 16);
    let base: Vec<u32> = (0..9).collect();
    s.add(1, &base).unwrap();
    prefill(&mut s, 1);
    // Two more with the same 8-token prefix while the first still runs: they hold its blocks too.
    s.add(2, &[&base[..8], &[40, 41]].concat()).unwrap();
    s.add(3, &[&base[..8], &[50]].concat()).unwrap();
    s.schedule();
    s.step_done();
    let shared = s.tables().find(|t| t.0 == 1).unwrap().1[0][0];
    assert_eq!(s.refs(0, shared), 3);
    check_ownership(&s);
    s.remove(1);
    s.remove(2);
    assert_eq!(s.refs(0, shared), 1);
    assert!(
        s.cached_blocks(0).all(|b| b != shared),
        "a held block is not evictable"
    );
    s.remove(3);
    assert!(s.cached_blocks(0).any(|b| b == shared));
    check_ownership(&s);
}

#[test]
fn new_blocks_take_the_least_recently_used_cache_first_and_drop_cache_empties_it() {
    let mut s = cached(1, 64, 4);
    s.add(1, &[1, 1, 1, 1, 0, 0]).unwrap();
    prefill(&mut s, 1);
    s.remove(1);
    s.add(2, &[2, 2, 2, 2, 0, 0]).unwrap();
    prefill(&mut s, 2);
    s.remove(2);
    assert_eq!(s.usage()[0].cached, 2);
    // 3 blocks needed, 2 free: the first sequence's (older) cached block goes.
    s.add(3, &[3; 12]).unwrap();
    prefill(&mut s, 3);
    s.remove(3);
    s.add(4, &[2, 2, 2, 2, 9, 9]).unwrap();
    assert_eq!(
        prefill(&mut s, 4),
        vec![(4, 4, 2, true)],
        "the newer one survived"
    );
    s.remove(4);
    s.add(5, &[1, 1, 1, 1, 9, 9]).unwrap();
    assert_eq!(
        prefill(&mut s, 5),
        vec![(5, 0, 6, true)],
        "the older one was taken"
    );
    s.remove(5);
    let before = s.usage()[0].cached;
    assert!(before > 0);
    assert_eq!(s.drop_cache(), before);
    assert_eq!(s.usage()[0].cached, 0);
    check_ownership(&s);
}

#[test]
fn shrinking_drops_cached_blocks_before_any_sequence() {
    let mut s = cached(2, 64, 8);
    s.add(1, &toks(16)).unwrap();
    prefill(&mut s, 1);
    s.remove(1);
    s.add(2, &[9; 6]).unwrap();
    prefill(&mut s, 2);
    assert_eq!(s.usage()[0].cached, 4);
    let r = s.resize(&[2]);
    assert!(r.preempted.is_empty());
    assert_eq!(
        s.usage()[0],
        GroupUsage {
            total: 2,
            used: 2,
            cached: 0
        }
    );
    check_ownership(&s);
}

#[test]
fn a_preempted_sequence_recomputes_from_its_own_cached_blocks() {
    let mut s = cached(2, 64, 6);
    s.add(1, &toks(8)).unwrap();
    s.add(2, &[5; 9]).unwrap();
    prefill(&mut s, 1);
    prefill(&mut s, 2);
    // 1 holds 2 blocks, 2 holds 3 (2 full) and one is free; 1 grows by two blocks, taking 2's.
    let mut preempted = false;
    for t in 0..8 {
        s.push_token(1, t);
        let p = s.schedule();
        s.step_done();
        if !p.preempted.is_empty() {
            assert_eq!(p.preempted, vec![2]);
            preempted = true;
            break;
        }
    }
    assert!(preempted);
    s.remove(1);
    // 2 comes back and finds its full blocks (its partial one went to 1); it reuses the first whole and
    // 3 tokens of the second, since the last two tokens are always computed.
    let again = prefill(&mut s, 2);
    assert_eq!(again, vec![(2, 7, 2, true)]);
    check_ownership(&s);
}

#[test]
fn ring_groups_reuse_only_a_whole_window() {
    let mut c = config(2, 64, 32);
    c.prefix_cache = true;
    c.groups.push(GroupConfig {
        blocks: 6,
        ring: Some(3),
    });
    let mut s = Scheduler::new(c);
    let long: Vec<u32> = (0..30).collect(); // 7 full blocks
    s.add(1, &long).unwrap();
    prefill(&mut s, 1);
    s.remove(1);
    // The ring kept the last 3 blocks (logical 5, 6 and 7, the last one partial): blocks 5 and 6 are
    // cached, not 4, so a prefix of 7 blocks cannot be served (its window needs logical 4..7).
    s.add(2, &[&long[..28], &[99, 98]].concat()).unwrap();
    let got = prefill(&mut s, 2);
    assert_eq!(got[0].1, 0, "{got:?}");
    check_ownership(&s);
}

/// A plain group and a ring of 3 blocks in which a 30-token prompt (`0..30`) was prefilled a block per
/// step and removed; with the copies its laps made of cached ring blocks.
fn a_lapped_ring() -> (Scheduler, Vec<u32>, usize) {
    // Steps of one block: each lap over a cached ring block copies it to a spare block first.
    let mut c = config(1, 4, 32);
    c.prefix_cache = true;
    c.groups.push(GroupConfig {
        blocks: 9,
        ring: Some(3),
    });
    let mut s = Scheduler::new(c);
    let long: Vec<u32> = (0..30).collect();
    s.add(1, &long).unwrap();
    let mut laps = 0;
    loop {
        let p = s.schedule();
        laps += p.copies.len();
        s.step_done();
        if p.items.iter().any(|i| i.sample) {
            break;
        }
    }
    s.remove(1);
    (s, long, laps)
}

#[test]
fn a_ring_keeps_what_it_laps_and_a_reuse_copies_its_window() {
    let (mut s, long, laps) = a_lapped_ring();
    assert!(
        laps > 0,
        "the ring lapped cached blocks without keeping them"
    );
    // The window of a 28-position prefix (logical blocks 4, 5 and 6) is cached: 7 blocks are reused, and
    // the plan copies the three ring blocks into the new sequence's own.
    s.add(2, &[&long[..28], &[99, 98]].concat()).unwrap();
    let p = s.schedule();
    assert_eq!(items(&p), vec![(2, 28, 2, true)]);
    assert_eq!(p.copies.len(), 3);
    assert!(p.copies.iter().all(|m| m.group == 1));
    let table = &p.items[0].tables[1];
    for k in 4..7 {
        assert!(
            p.copies.iter().any(|m| m.to == table[k % 3]),
            "slot of block {k} not filled"
        );
    }
    check_ownership(&s);
}

#[test]
fn a_partial_block_is_copied_into_a_ring_slot_after_that_slots_own_copy() {
    // As above, but the new prompt diverges inside logical block 6: 6 whole blocks are reused, then the
    // 2 tokens it shares of block 6. Block 6 takes ring slot 0, which block 3's copy fills first, so the
    // partial copy must come after it; the plain group copies block 6 into a block of the sequence's own.
    let (mut s, long, _) = a_lapped_ring();
    s.add(2, &[&long[..26], &[99, 98, 97]].concat()).unwrap();
    let p = s.schedule();
    assert_eq!(items(&p), vec![(2, 26, 3, true)]);
    let tables = &p.items[0].tables;
    let ring: Vec<&BlockMove> = p.copies.iter().filter(|m| m.group == 1).collect();
    assert_eq!(ring.len(), 4, "{:?}", p.copies);
    let slot = tables[1][6 % 3];
    let into_slot: Vec<usize> = (0..ring.len()).filter(|&i| ring[i].to == slot).collect();
    assert_eq!(into_slot.len(), 2, "{ring:?}");
    let plain: Vec<&BlockMove> = p.copies.iter().filter(|m| m.group == 0).collect();
    assert_eq!(plain.len(), 1);
    assert_eq!(plain[0].to, tables[0][6]);
    assert_eq!(tables[0].len(), 8);
    // The partial copy's source is block 6's cached ring block, not block 3's.
    let (first, last) = (ring[into_slot[0]], ring[into_slot[1]]);
    assert_ne!(first.from, last.from);
    s.step_done();
    assert_eq!(s.cached_tokens(2), Some(26));
    check_ownership(&s);
}

/// An operation of the property tests.
#[derive(Debug, Clone)]
enum Op {
    Add(usize),
    Step,
    Cancel(usize),
    Resize(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1usize..40).prop_map(Op::Add),
        6 => Just(Op::Step),
        1 => (0usize..8).prop_map(Op::Cancel),
        1 => (2usize..24).prop_map(Op::Resize),
    ]
}

/// Runs one step as a worker would: samples for every item that wants it, finishing sequences that reach
/// their length and ending stalled ones.
fn step(s: &mut Scheduler, lengths: &BTreeMap<SeqId, usize>, done: &mut BTreeSet<SeqId>) {
    let plan = s.schedule();
    assert!(
        plan.tokens() <= s.config().step_tokens,
        "token budget exceeded"
    );
    assert!(s.running() <= s.config().max_running);
    let mut seen = BTreeSet::new();
    for it in &plan.items {
        assert!(seen.insert(it.seq), "a sequence appears twice in one step");
        assert_eq!(s.phase(it.seq), Some(Phase::Running));
    }
    for id in plan.stalled {
        s.remove(id);
        done.insert(id);
    }
    for it in plan.items.iter().filter(|i| i.sample) {
        s.push_token(it.seq, 7);
        if s.tokens(it.seq) >= Some(lengths[&it.seq]) {
            s.remove(it.seq);
            done.insert(it.seq);
        }
    }
    check_ownership(s);
}

proptest! {
    #[test]
    fn blocks_are_never_owned_twice_and_every_sequence_ends(ops in proptest::collection::vec(op(), 1..80)) {
        let mut c = config(3, 10, 12);
        c.groups.push(GroupConfig { blocks: 9, ring: Some(3) });
        let mut s = Scheduler::new(c);
        let mut next = 0u64;
        let mut lengths = BTreeMap::new();
        let mut done = BTreeSet::new();
        let mut cancelled = BTreeSet::new();
        for op in ops {
            match op {
                Op::Add(n) => {
                    next += 1;
                    // Each sequence generates up to 6 tokens after its prompt.
                    if s.add(next, &toks(n)).is_ok() {
                        lengths.insert(next, (n + 1 + (next as usize % 6)).min(64));
                    }
                }
                Op::Step => step(&mut s, &lengths, &mut done),
                Op::Cancel(k) => {
                    let id = lengths.keys().nth(k).copied();
                    if let Some(id) = id && s.remove(id) {
                        cancelled.insert(id);
                    }
                }
                Op::Resize(n) => {
                    s.resize(&[n, 9]);
                    check_ownership(&s);
                }
            }
        }
        s.resize(&[12, 9]);
        // Liveness: with no more arrivals, every sequence finishes within a bounded number of steps.
        let mut steps = 0;
        while !s.is_idle() {
            step(&mut s, &lengths, &mut done);
            steps += 1;
            prop_assert!(steps < 2000, "no progress: {} running, {} waiting", s.running(), s.waiting());
        }
        for id in lengths.keys() {
            prop_assert!(done.contains(id) || cancelled.contains(id), "sequence {id} never ended");
        }
        prop_assert_eq!(s.usage()[0].used, 0);
        prop_assert_eq!(s.usage()[1].used, 0);
    }

    #[test]
    fn the_same_events_give_the_same_plans(lens in proptest::collection::vec(1usize..30, 1..10)) {
        let run = || {
            let mut s = Scheduler::new(config(2, 8, 10));
            let mut plans = Vec::new();
            for (i, &n) in lens.iter().enumerate() {
                let _ = s.add(i as u64, &toks(n));
                let p = s.schedule();
                sample_all(&mut s, &p);
                plans.push(p);
            }
            plans
        };
        prop_assert_eq!(run(), run());
    }
}

/// A stand-in for the KV pool's content: what each slot holds, as the identity of the token prefix whose
/// last position wrote it. Reading a slot that holds anything but the reader's own prefix is a wrong key.
#[derive(Default)]
struct Contents {
    slots: BTreeMap<(usize, u64), u64>,
}

/// The identity of each prefix `tokens[..=p]`.
fn prefix_ids(tokens: &[u32]) -> Vec<u64> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut out = Vec::with_capacity(tokens.len());
    let mut prev = 0u64;
    for t in tokens {
        let mut h = DefaultHasher::new();
        (prev, *t).hash(&mut h);
        prev = h.finish();
        out.push(prev);
    }
    out
}

/// The slot of position `p` in `table` (a ring of `ring` blocks, or every position).
fn slot(table: &[BlockId], p: usize, bt: usize, ring: Option<usize>) -> u64 {
    let k = p / bt;
    let b = match ring {
        Some(r) => table[k % r],
        None => table[k],
    };
    u64::from(b) * bt as u64 + (p % bt) as u64
}

impl Contents {
    /// Checks what each item reads (every earlier position in plain groups, the window in rings), then
    /// writes its positions (a ring skips those its own step has lapped), as the forward pass does.
    #[allow(clippy::needless_range_loop)] // positions index both the table and the prefix ids
    fn run(
        &mut self,
        s: &Scheduler,
        plan: &StepPlan,
        tokens: &BTreeMap<SeqId, Vec<u32>>,
        window: usize,
    ) {
        let bt = s.config().block_tokens;
        for it in &plan.items {
            let ids = prefix_ids(&tokens[&it.seq]);
            for (g, group) in s.config().groups.iter().enumerate() {
                let table = &it.tables[g];
                let from = group
                    .ring
                    .map_or(0, |_| it.start.saturating_sub(window - 1));
                for q in from..it.start {
                    let got = self.slots.get(&(g, slot(table, q, bt, group.ring)));
                    assert_eq!(
                        got,
                        Some(&ids[q]),
                        "sequence {} reads a wrong key at {q} (group {g})",
                        it.seq
                    );
                }
            }
        }
        for it in &plan.items {
            let ids = prefix_ids(&tokens[&it.seq]);
            for (g, group) in s.config().groups.iter().enumerate() {
                let last = (it.start + it.len - 1) / bt;
                for p in it.start..it.start + it.len {
                    if group.ring.is_some_and(|r| p / bt + r <= last) {
                        continue;
                    }
                    self.slots
                        .insert((g, slot(&it.tables[g], p, bt, group.ring)), ids[p]);
                }
            }
        }
    }

    /// Follows block copies (a plan's, or a resize's moves).
    fn moved(&mut self, s: &Scheduler, moves: &[BlockMove]) {
        let bt = s.config().block_tokens as u64;
        for m in moves {
            for off in 0..bt {
                if let Some(v) = self
                    .slots
                    .get(&(m.group, u64::from(m.from) * bt + off))
                    .copied()
                {
                    self.slots.insert((m.group, u64::from(m.to) * bt + off), v);
                }
            }
        }
    }
}

/// An operation of the prefix-cache property test.
#[derive(Debug, Clone)]
enum CacheOp {
    /// A prompt: one of three shared prefixes cut to a length, then its own tokens.
    Add {
        family: u32,
        shared: usize,
        own: usize,
    },
    Step,
    Cancel(usize),
    Resize(usize),
    DropCache,
}

fn cache_op() -> impl Strategy<Value = CacheOp> {
    prop_oneof![
        3 => (0u32..3, 0usize..30, 1usize..8).prop_map(|(family, shared, own)| CacheOp::Add { family, shared, own }),
        8 => Just(CacheOp::Step),
        1 => (0usize..8).prop_map(CacheOp::Cancel),
        1 => (6usize..30).prop_map(CacheOp::Resize),
        1 => Just(CacheOp::DropCache),
    ]
}

/// Runs `ops` against the content model (the body of the property test).
fn cache_run(ops: Vec<CacheOp>) -> Result<(), TestCaseError> {
    {
        // A plain group and a ring of 3 blocks (a window of up to 8 positions), blocks of 4 positions.
        let mut c = config(3, 10, 24);
        c.prefix_cache = true;
        c.groups.push(GroupConfig {
            blocks: 9,
            ring: Some(3),
        });
        let window = 8;
        let mut s = Scheduler::new(c);
        let mut contents = Contents::default();
        let mut tokens: BTreeMap<SeqId, Vec<u32>> = BTreeMap::new();
        let mut lengths: BTreeMap<SeqId, usize> = BTreeMap::new();
        let mut next = 0u64;
        let run_step = |s: &mut Scheduler,
                        contents: &mut Contents,
                        tokens: &mut BTreeMap<SeqId, Vec<u32>>,
                        lengths: &BTreeMap<SeqId, usize>| {
            let plan = s.schedule();
            contents.moved(s, &plan.copies);
            contents.run(s, &plan, tokens, window);
            s.step_done();
            for id in &plan.stalled {
                s.remove(*id);
            }
            for it in plan.items.iter().filter(|i| i.sample) {
                // Generated tokens repeat across sequences of a family, so they are shared too.
                let t = tokens[&it.seq].len() as u32 % 5;
                tokens.get_mut(&it.seq).unwrap().push(t);
                if tokens[&it.seq].len() >= lengths[&it.seq] {
                    s.remove(it.seq);
                } else {
                    s.push_token(it.seq, t);
                }
            }
            check_ownership(s);
        };
        for op in ops {
            match op {
                CacheOp::Add {
                    family,
                    shared,
                    own,
                } => {
                    next += 1;
                    let mut p: Vec<u32> = (0..shared as u32).map(|i| 1000 * family + i).collect();
                    p.extend((0..own as u32).map(|i| 100_000 + next as u32 * 10 + i));
                    if s.add(next, &p).is_ok() {
                        lengths.insert(next, (p.len() + 1 + next as usize % 5).min(64));
                        tokens.insert(next, p);
                    }
                }
                CacheOp::Step => run_step(&mut s, &mut contents, &mut tokens, &lengths),
                CacheOp::Cancel(k) => {
                    if let Some(id) = lengths.keys().nth(k).copied() {
                        s.remove(id);
                    }
                    check_ownership(&s);
                }
                CacheOp::Resize(n) => {
                    let r = s.resize(&[n, 9]);
                    contents.moved(&s, &r.moves);
                    check_ownership(&s);
                }
                CacheOp::DropCache => {
                    s.drop_cache();
                    prop_assert_eq!(s.usage().iter().map(|u| u.cached).sum::<usize>(), 0);
                    check_ownership(&s);
                }
            }
        }
        let r = s.resize(&[24, 9]);
        contents.moved(&s, &r.moves);
        let mut steps = 0;
        while !s.is_idle() {
            run_step(&mut s, &mut contents, &mut tokens, &lengths);
            steps += 1;
            prop_assert!(steps < 2000, "no progress");
        }
        prop_assert!(s.usage().iter().all(|u| u.used == 0));
    }
    Ok(())
}

proptest! {
    #[test]
    fn reused_blocks_always_hold_the_readers_keys(ops in proptest::collection::vec(cache_op(), 1..120)) {
        cache_run(ops)?;
    }
}
