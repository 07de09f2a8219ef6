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
    }
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
        s.push_token(it.seq);
    }
}

/// Every block is either free or held by exactly one sequence, in every group.
fn check_ownership(s: &Scheduler) {
    for (g, usage) in s.usage().iter().enumerate() {
        let mut seen = BTreeSet::new();
        for b in s.free_blocks(g) {
            assert!(seen.insert(b), "free block {b} listed twice");
            assert!((b as usize) < usage.total);
        }
        for (id, tables) in s.tables() {
            for &b in &tables[g] {
                assert!(seen.insert(b), "block {b} of sequence {id} is owned twice");
                assert!((b as usize) < usage.total);
            }
        }
        assert_eq!(seen.len(), usage.total, "group {g} lost blocks");
    }
}

#[test]
fn prefill_is_chunked_under_the_step_budget() {
    let mut s = Scheduler::new(config(4, 8, 16));
    s.add(1, 20).unwrap();
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
    s.add(1, 3).unwrap();
    let p = s.schedule();
    sample_all(&mut s, &p);
    s.add(2, 30).unwrap();
    let p = s.schedule();
    // One decode for 1, seven prefill positions for 2.
    assert_eq!(items(&p), vec![(1, 3, 1, true), (2, 0, 7, false)]);
    assert_eq!(p.tokens(), 8);
}

#[test]
fn admission_is_fifo_and_capped_by_max_running() {
    let mut s = Scheduler::new(config(2, 64, 64));
    for id in 1..=4 {
        s.add(id, 2).unwrap();
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
    s.add(1, 8).unwrap();
    s.add(2, 8).unwrap();
    let p = s.schedule();
    assert_eq!(items(&p), vec![(1, 0, 8, true), (2, 0, 4, false)]);
}

#[test]
fn a_decode_without_a_block_preempts_the_newest() {
    // 5 blocks of 4 positions: 1 and 2 hold 2 blocks each after their prompts.
    let mut s = Scheduler::new(config(4, 64, 5));
    s.add(1, 8).unwrap();
    s.add(2, 8).unwrap();
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
    s.add(1, 7).unwrap();
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
        s.add(1, 8),
        Err(Refusal::TooLong {
            prompt_tokens: 8,
            limit: 7
        })
    );
    assert_eq!(s.add(1, 0), Err(Refusal::EmptyPrompt));
    s.add(1, 3).unwrap();
    assert_eq!(s.add(1, 3), Err(Refusal::DuplicateId(1)));
}

#[test]
fn ring_groups_hold_at_most_their_ring() {
    let mut c = config(2, 64, 64);
    c.groups.push(GroupConfig {
        blocks: 6,
        ring: Some(3),
    });
    let mut s = Scheduler::new(c);
    s.add(1, 30).unwrap();
    let p = s.schedule();
    assert_eq!(p.items[0].tables[0].len(), 8);
    assert_eq!(p.items[0].tables[1].len(), 3);
    s.add(2, 30).unwrap();
    let p = s.schedule();
    assert_eq!(items(&p), vec![(2, 0, 30, true)]);
    assert_eq!(s.usage()[1].used, 6);
    check_ownership(&s);
}

#[test]
fn cancellation_frees_blocks_before_the_next_step() {
    let mut s = Scheduler::new(config(4, 64, 4));
    s.add(1, 15).unwrap();
    s.add(2, 4).unwrap();
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
    s.add(1, 8).unwrap();
    s.add(2, 8).unwrap();
    s.add(3, 4).unwrap();
    s.schedule();
    assert_eq!(s.usage()[0].used, 5);
    // Down to 3 blocks: 3 (1 block) and 2 (2 blocks) go; 1 keeps blocks 0 and 1.
    let r = s.resize(&[3]);
    assert_eq!(r.preempted, vec![3, 2]);
    assert!(r.moves.is_empty());
    check_ownership(&s);
    assert_eq!(s.usage()[0], GroupUsage { total: 3, used: 2 });
}

#[test]
fn shrinking_moves_blocks_held_beyond_the_new_size() {
    let mut s = Scheduler::new(config(4, 64, 8));
    s.add(1, 8).unwrap();
    s.add(2, 8).unwrap();
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
    assert_eq!(s.usage()[0], GroupUsage { total: 8, used: 2 });
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
        s.push_token(it.seq);
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
                    if s.add(next, n).is_ok() {
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
                let _ = s.add(i as u64, n);
                let p = s.schedule();
                sample_all(&mut s, &p);
                plans.push(p);
            }
            plans
        };
        prop_assert_eq!(run(), run());
    }
}
