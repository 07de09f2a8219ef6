//! Table tests and properties of the governor: admission, eviction order, pins, busy models, leases,
//! keep-alive, pressure shedding, failures and backoff, and the ceiling invariant over random events.
#![allow(clippy::unwrap_used)] // tests and examples may unwrap

use proptest::prelude::*;
use ult_policy::{
    Action, Event, EvictReason, Footprint, Governor, GovernorConfig, HoldReason, KeepAlive,
    MemorySnapshot, ModelChange, ModelSpec, PressureLevel, Rejection, RequestId, RequestKind,
    Residency,
};

const GIB: u64 = 1 << 30;

fn spec(name: &str, gib: u64) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        footprint: Footprint {
            weights_bytes: gib * GIB,
            overhead_bytes: 0,
            scratch_bytes: 0,
            kv_bytes_per_token: 0,
            kv_fixed_bytes_per_sequence: 0,
            kv_block_tokens: 0,
            context_tokens: 1024,
            max_sequences: 1,
        },
        pinned: false,
        priority: 1.0,
        keep_alive: KeepAlive::Forever,
        min_kv_tokens: 256,
    }
}

fn spec_kv(name: &str, gib: u64, kv_gib_at_full: u64) -> ModelSpec {
    let mut s = spec(name, gib);
    // 1024 tokens → kv_gib_at_full GiB.
    s.footprint.kv_bytes_per_token = kv_gib_at_full * GIB / 1024;
    s
}

/// Drives a governor like the daemon would: loads and unloads complete when `settle` is called.
struct Harness {
    gov: Governor,
    /// False where a test makes the daemon report a measurement above the prediction on purpose.
    strict: bool,
    now: u64,
    next_id: u64,
    in_progress: Vec<Action>,
    log: Vec<Action>,
}

impl Harness {
    fn new(ceiling_gib: u64, specs: Vec<ModelSpec>) -> Self {
        Self::with_config(GovernorConfig::new(ceiling_gib * GIB, 0), specs)
    }

    fn with_config(config: GovernorConfig, specs: Vec<ModelSpec>) -> Self {
        Self {
            gov: Governor::new(config, specs),
            strict: true,
            now: 0,
            next_id: 1,
            in_progress: vec![],
            log: vec![],
        }
    }

    fn record(&mut self, plan: ult_policy::Plan) -> Vec<Action> {
        for a in &plan.actions {
            if matches!(a, Action::Load { .. } | Action::Unload { .. }) {
                self.in_progress.push(a.clone());
            }
        }
        self.log.extend(plan.actions.iter().cloned());
        self.check_invariant();
        plan.actions
    }

    fn check_invariant(&self) {
        if !self.strict {
            return;
        }
        assert!(
            self.gov.used_bytes() <= self.gov.config().ceiling_bytes,
            "ledger {} over ceiling {}",
            self.gov.used_bytes(),
            self.gov.config().ceiling_bytes
        );
    }

    fn event(&mut self, e: Event) -> Vec<Action> {
        let plan = self.gov.handle(e, self.now);
        self.record(plan)
    }

    /// Submits a request and returns its id with the immediate actions.
    fn request(&mut self, model: &str, kind: RequestKind) -> (RequestId, Vec<Action>) {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let actions = self.event(Event::Request {
            id,
            model: model.into(),
            kind,
        });
        (id, actions)
    }

    /// Completes every load and unload in progress (measured = predicted), returning what followed.
    fn settle(&mut self) -> Vec<Action> {
        let mut out = vec![];
        while let Some(a) = (!self.in_progress.is_empty()).then(|| self.in_progress.remove(0)) {
            let followup = match a {
                Action::Load { model, kv_tokens } => {
                    let predicted = self
                        .gov
                        .model(&model, self.now)
                        .unwrap()
                        .footprint
                        .total_with_kv(kv_tokens);
                    Event::LoadFinished {
                        model,
                        measured_bytes: predicted,
                        kv_tokens,
                        load_ms: 100,
                    }
                }
                Action::Unload { model, .. } => Event::UnloadFinished { model },
                _ => unreachable!(),
            };
            out.extend(self.event(followup));
        }
        out
    }

    fn use_and_finish(&mut self, model: &str) {
        let (id, _) = self.request(model, RequestKind::Use);
        let mut admitted = self
            .log
            .iter()
            .any(|a| matches!(a, Action::Admit { id: i, .. } if *i == id));
        if !admitted {
            self.settle();
            admitted = self
                .log
                .iter()
                .any(|a| matches!(a, Action::Admit { id: i, .. } if *i == id));
        }
        assert!(admitted, "request for {model} not admitted: {:?}", self.log);
        self.event(Event::RequestDone {
            model: model.into(),
        });
        self.settle();
    }

    fn residency(&self, m: &str) -> Residency {
        self.gov.residency(m).unwrap()
    }

    fn evictions(&self) -> Vec<(String, EvictReason)> {
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::Unload { model, reason, .. } => Some((model.clone(), *reason)),
                _ => None,
            })
            .collect()
    }
}

fn rejection_of(actions: &[Action], id: RequestId) -> Option<Rejection> {
    actions.iter().find_map(|a| match a {
        Action::Reject { id: i, reason } if *i == id => Some(reason.clone()),
        _ => None,
    })
}

#[test]
fn cold_request_loads_once_for_concurrent_requests() {
    let mut h = Harness::new(10, vec![spec("a", 4)]);
    let (_, first) = h.request("a", RequestKind::Use);
    let (_, second) = h.request("a", RequestKind::Use);
    assert_eq!(
        first
            .iter()
            .filter(|a| matches!(a, Action::Load { .. }))
            .count(),
        1
    );
    assert!(
        second.is_empty(),
        "the second request waits on the same load: {second:?}"
    );
    let after = h.settle();
    let admits: Vec<bool> = after
        .iter()
        .filter_map(|a| match a {
            Action::Admit { caused_load, .. } => Some(*caused_load),
            _ => None,
        })
        .collect();
    assert_eq!(admits, vec![true, true]);
    assert_eq!(h.gov.model("a", 0).unwrap().in_flight, 2);
}

#[test]
fn unknown_model_lists_known_names() {
    let mut h = Harness::new(10, vec![spec("a", 1), spec("b", 1)]);
    let (id, actions) = h.request("zzz", RequestKind::Use);
    match rejection_of(&actions, id) {
        Some(Rejection::UnknownModel { name, known }) => {
            assert_eq!(name, "zzz");
            assert_eq!(known, vec!["a", "b"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn model_larger_than_ceiling_is_refused_with_both_numbers() {
    let mut h = Harness::new(4, vec![spec("big", 5)]);
    let (id, actions) = h.request("big", RequestKind::Use);
    let r = rejection_of(&actions, id).unwrap();
    assert_eq!(
        r,
        Rejection::LargerThanCeiling {
            model: "big".into(),
            need: 5 * GIB,
            ceiling: 4 * GIB
        }
    );
    assert!(
        r.to_string().contains("5.00 GiB") && r.to_string().contains("4.00 GiB"),
        "{r}"
    );
}

#[test]
fn eviction_is_by_score_not_age() {
    // a is used often, b once; b was used more recently. LRU would evict a; GDSF evicts b.
    let mut h = Harness::new(10, vec![spec("a", 4), spec("b", 4), spec("c", 4)]);
    for _ in 0..5 {
        h.use_and_finish("a");
        h.now += 10;
    }
    h.use_and_finish("b");
    h.now += 10;
    h.use_and_finish("c");
    assert_eq!(
        h.evictions(),
        vec![("b".to_string(), EvictReason::MakeRoom)]
    );
    assert_eq!(h.residency("a"), Residency::Resident);
}

#[test]
fn pinned_and_busy_models_are_never_evicted() {
    let mut pinned = spec("p", 4);
    pinned.pinned = true;
    let mut h = Harness::new(10, vec![pinned, spec("busy", 4), spec("new", 4)]);
    h.use_and_finish("p");
    let (_, _) = h.request("busy", RequestKind::Use);
    h.settle();
    // busy is in flight, p pinned: the new model cannot load now, and waits for busy.
    let (id, actions) = h.request("new", RequestKind::Use);
    assert!(rejection_of(&actions, id).is_none(), "{actions:?}");
    assert!(actions.is_empty(), "waits: {actions:?}");
    assert_eq!(h.gov.model("new", 0).unwrap().queued, 1);
    // When busy finishes, it is evicted for new, and the waiting request is admitted after the load.
    h.event(Event::RequestDone {
        model: "busy".into(),
    });
    h.settle();
    assert_eq!(h.residency("p"), Residency::Resident);
    assert_eq!(h.residency("busy"), Residency::Unloaded);
    assert!(
        h.log
            .iter()
            .any(|a| matches!(a, Action::Admit { id: i, .. } if *i == id))
    );
}

#[test]
fn refusal_names_each_holder_and_why() {
    let mut p = spec("p", 4);
    p.pinned = true;
    let mut h = Harness::new(10, vec![p, spec("leased", 4), spec("new", 4)]);
    h.use_and_finish("p");
    let (_, _, plan) = h
        .gov
        .lease(RequestId(900), "leased", 60_000, h.now)
        .unwrap();
    h.record(plan);
    h.settle();
    let (id, actions) = h.request("new", RequestKind::Use);
    match rejection_of(&actions, id) {
        Some(Rejection::Exhausted { need, holders, .. }) => {
            assert_eq!(need, 4 * GIB);
            let reasons: Vec<_> = holders
                .iter()
                .map(|h| (h.model.as_str(), h.reason))
                .collect();
            assert_eq!(
                reasons,
                vec![("leased", HoldReason::Leased), ("p", HoldReason::Pinned)]
            );
        }
        other => panic!("{other:?}"),
    }
    // After the lease expires, the same request succeeds by evicting the formerly leased model.
    h.now += 60_001;
    h.event(Event::Tick);
    let (id2, actions) = h.request("new", RequestKind::Use);
    assert!(rejection_of(&actions, id2).is_none());
    assert_eq!(
        h.evictions(),
        vec![("leased".to_string(), EvictReason::MakeRoom)]
    );
}

/// A reload (`reconfigure`): a new model appears; a removed one finishes its running request, then
/// unloads and is unknown; a changed one keeps serving the request that runs on it, makes later requests
/// wait, unloads once idle and serves them with its new spec; a settings-only change reloads nothing.
#[test]
fn reconfiguration_waits_for_running_requests() {
    let mut h = Harness::new(10, vec![spec("a", 1), spec("b", 1), spec("c", 1)]);
    h.use_and_finish("c");
    let (_, _) = h.request("a", RequestKind::Use);
    let (_, _) = h.request("b", RequestKind::Use);
    h.settle();
    assert_eq!(h.residency("a"), Residency::Resident);
    let mut a2 = spec("a", 2);
    a2.footprint.context_tokens = 2048;
    let mut c2 = spec("c", 1);
    c2.priority = 3.0;
    let plan = h.gov.reconfigure(
        vec![
            ModelChange::Reload(a2.clone()),
            ModelChange::Keep(c2),
            ModelChange::Keep(spec("d", 1)),
        ],
        h.now,
    );
    let actions = h.record(plan);
    // Nothing unloads under a running request; the settings-only change unloads nothing.
    assert!(
        !actions.iter().any(|x| matches!(x, Action::Unload { .. })),
        "{actions:?}"
    );
    assert_eq!(h.residency("d"), Residency::Unloaded);
    assert_eq!(h.residency("c"), Residency::Resident);
    assert_eq!(h.gov.model("c", h.now).unwrap().priority, 3.0);
    // A new request for the changed model waits instead of joining the old instance.
    let (waiting, actions) = h.request("a", RequestKind::Use);
    assert!(
        !actions
            .iter()
            .any(|x| matches!(x, Action::Admit { id, .. } if *id == waiting))
    );
    // A request for the removed one is refused by name.
    let (refused, actions) = h.request("b", RequestKind::Use);
    assert!(matches!(
        rejection_of(&actions, refused),
        Some(Rejection::UnknownModel { .. })
    ));
    // The running requests end: both unload (reconfigured), then the waiter loads the new spec.
    h.event(Event::RequestDone { model: "a".into() });
    h.event(Event::RequestDone { model: "b".into() });
    h.settle();
    assert!(
        h.evictions()
            .contains(&("a".to_string(), EvictReason::Reconfigured))
    );
    assert!(
        h.evictions()
            .contains(&("b".to_string(), EvictReason::Reconfigured))
    );
    assert!(h.gov.residency("b").is_none(), "b is forgotten");
    assert!(
        h.log
            .iter()
            .any(|x| matches!(x, Action::Admit { id, .. } if *id == waiting))
    );
    assert_eq!(h.residency("a"), Residency::Resident);
    assert_eq!(h.gov.model("a", h.now).unwrap().footprint, a2.footprint);
    assert!(!h.evictions().iter().any(|(m, _)| m == "c"));
}

/// A model reconfigured while it loads: the requests waiting for that load are not served by the old
/// spec; the load is undone and they are served by the new one.
#[test]
fn reconfiguration_during_a_load_serves_the_new_spec() {
    let mut h = Harness::new(10, vec![spec("a", 1)]);
    let (id, actions) = h.request("a", RequestKind::Use);
    assert!(actions.iter().any(|x| matches!(x, Action::Load { .. })));
    let mut a2 = spec("a", 2);
    a2.footprint.context_tokens = 2048;
    let plan = h
        .gov
        .reconfigure(vec![ModelChange::Reload(a2.clone())], h.now);
    h.record(plan);
    let after = h.settle();
    let admitted_at = h
        .log
        .iter()
        .position(|x| matches!(x, Action::Admit { id: i, .. } if *i == id))
        .expect("admitted");
    let unloaded_at = h
        .log
        .iter()
        .position(|x| {
            matches!(
                x,
                Action::Unload {
                    reason: EvictReason::Reconfigured,
                    ..
                }
            )
        })
        .expect("the old load is undone");
    assert!(unloaded_at < admitted_at, "{after:?}");
    assert_eq!(h.gov.model("a", h.now).unwrap().footprint, a2.footprint);
    assert_eq!(h.gov.model("a", h.now).unwrap().in_flight, 1);
}

#[test]
fn keep_alive_expiry_unloads_idle_models_only() {
    let mut a = spec("a", 1);
    a.keep_alive = KeepAlive::Millis(1000);
    let mut zero = spec("zero", 1);
    zero.keep_alive = KeepAlive::Millis(0);
    let mut h = Harness::new(10, vec![a, zero, spec("forever", 1)]);
    h.use_and_finish("a");
    h.use_and_finish("forever");
    h.use_and_finish("zero");
    // keep_alive 0 unloads as soon as its request ends.
    assert_eq!(h.residency("zero"), Residency::Unloaded);
    h.now += 999;
    h.event(Event::Tick);
    assert_eq!(h.residency("a"), Residency::Resident);
    // A request in flight at expiry keeps it.
    let (_, _) = h.request("a", RequestKind::Use);
    h.now += 5000;
    h.event(Event::Tick);
    assert_eq!(h.residency("a"), Residency::Resident);
    h.event(Event::RequestDone { model: "a".into() });
    h.now += 1000;
    h.event(Event::Tick);
    h.settle();
    assert_eq!(h.residency("a"), Residency::Unloaded);
    assert_eq!(h.residency("forever"), Residency::Resident);
    assert!(
        h.evictions()
            .contains(&("a".to_string(), EvictReason::KeepAlive))
    );
}

#[test]
fn a_request_keep_alive_replaces_the_configured_one_until_unload() {
    // Ollama's per-request keep_alive: 0 unloads once idle, a duration replaces the model's own,
    // and an unload restores the configured one.
    let mut h = Harness::new(10, vec![spec("m", 1)]);
    let (_, _) = h.request("m", RequestKind::Use);
    h.settle();
    h.event(Event::KeepAliveAfter {
        model: "m".into(),
        keep_alive: Some(KeepAlive::Millis(2000)),
    });
    h.event(Event::RequestDone { model: "m".into() });
    assert_eq!(
        h.gov.model("m", h.now).unwrap().keep_alive,
        KeepAlive::Millis(2000)
    );
    h.now += 1999;
    h.event(Event::Tick);
    assert_eq!(h.residency("m"), Residency::Resident);
    h.now += 1;
    h.event(Event::Tick);
    h.settle();
    assert_eq!(
        h.residency("m"),
        Residency::Unloaded,
        "the request's 2 s, not forever"
    );
    assert_eq!(
        h.gov.model("m", h.now).unwrap().keep_alive,
        KeepAlive::Forever
    );
    // 0: unloaded as soon as the request ends, even though the model's own keep-alive is forever.
    let (_, _) = h.request("m", RequestKind::Use);
    h.settle();
    h.event(Event::KeepAliveAfter {
        model: "m".into(),
        keep_alive: Some(KeepAlive::Millis(0)),
    });
    h.event(Event::RequestDone { model: "m".into() });
    h.settle();
    assert_eq!(h.residency("m"), Residency::Unloaded);
    assert_eq!(
        h.evictions()
            .iter()
            .filter(|(m, r)| m == "m" && *r == EvictReason::KeepAlive)
            .count(),
        2
    );
}

#[test]
fn failed_load_backs_off_then_retries() {
    let mut h = Harness::new(10, vec![spec("bad", 1)]);
    let (id, _) = h.request("bad", RequestKind::Use);
    h.in_progress.clear();
    let actions = h.event(Event::LoadFailed {
        model: "bad".into(),
        reason: "truncated".into(),
    });
    assert!(matches!(
        rejection_of(&actions, id),
        Some(Rejection::LoadFailed {
            retry_in_ms: 1000,
            ..
        })
    ));
    assert_eq!(h.residency("bad"), Residency::Failed);
    // Within the backoff: refused at once, no load attempted (no hot loop).
    h.now += 500;
    let (id, actions) = h.request("bad", RequestKind::Use);
    assert!(matches!(
        rejection_of(&actions, id),
        Some(Rejection::LoadFailed {
            retry_in_ms: 500,
            ..
        })
    ));
    assert!(!actions.iter().any(|a| matches!(a, Action::Load { .. })));
    // After it: one new attempt; a second failure doubles the delay.
    h.now += 500;
    let (_, actions) = h.request("bad", RequestKind::Use);
    assert!(actions.iter().any(|a| matches!(a, Action::Load { .. })));
    h.in_progress.clear();
    let (id3, _) = h.request("bad", RequestKind::Use);
    let actions = h.event(Event::LoadFailed {
        model: "bad".into(),
        reason: "truncated".into(),
    });
    assert!(matches!(
        rejection_of(&actions, id3),
        Some(Rejection::LoadFailed {
            retry_in_ms: 2000,
            ..
        })
    ));
}

#[test]
fn explicit_unload_refuses_busy_pinned_and_leased() {
    let mut h = Harness::new(10, vec![spec("a", 1)]);
    h.use_and_finish("a");
    let (_, _) = h.request("a", RequestKind::Use);
    assert_eq!(
        h.gov.unload("a", h.now),
        Err(Rejection::CannotUnload {
            model: "a".into(),
            reason: HoldReason::Busy
        })
    );
    h.event(Event::RequestDone { model: "a".into() });
    h.gov.pin(RequestId(99), "a", h.now).unwrap();
    assert!(matches!(
        h.gov.unload("a", h.now),
        Err(Rejection::CannotUnload {
            reason: HoldReason::Pinned,
            ..
        })
    ));
    h.gov.unpin("a", h.now).unwrap();
    let plan = h.gov.unload("a", h.now).unwrap();
    assert_eq!(
        plan.unloads().collect::<Vec<_>>(),
        vec![("a", EvictReason::Explicit)]
    );
}

#[test]
fn max_resident_evicts_by_count() {
    let mut config = GovernorConfig::new(100 * GIB, 0);
    config.max_resident = Some(2);
    let mut h = Harness::with_config(config, vec![spec("a", 1), spec("b", 1), spec("c", 1)]);
    h.use_and_finish("a");
    h.use_and_finish("a");
    h.use_and_finish("b");
    h.use_and_finish("c");
    assert_eq!(
        h.evictions(),
        vec![("b".to_string(), EvictReason::MaxResident)]
    );
}

#[test]
fn kv_budgets_shrink_before_anything_is_evicted() {
    // Two models of 2 GiB weights + 4 GiB KV at full context; the ceiling is 11 GiB. Loading b needs 6;
    // shrinking a's KV budget to 256 tokens (1 GiB) frees 3 GiB, enough without evicting a.
    let mut h = Harness::new(11, vec![spec_kv("a", 2, 4), spec_kv("b", 2, 4)]);
    h.use_and_finish("a");
    let (_, actions) = h.request("b", RequestKind::Use);
    assert!(
        actions.contains(&Action::SetKvBudget {
            model: "a".into(),
            tokens: 256
        }),
        "{actions:?}"
    );
    assert!(h.evictions().is_empty());
    h.settle();
    assert_eq!(h.residency("a"), Residency::Resident);
    assert_eq!(h.gov.model("a", 0).unwrap().kv_tokens, 256);
}

fn snapshot(available_gib: u64, process_gib: u64) -> MemorySnapshot {
    MemorySnapshot {
        total_bytes: 64 * GIB,
        available_bytes: available_gib * GIB,
        process_bytes: process_gib * GIB,
        ..Default::default()
    }
}

#[test]
fn pressure_sheds_in_documented_order() {
    let mut config = GovernorConfig::new(40 * GIB, 8 * GIB);
    config.shed_cooldown_ms = 1000;
    let mut h = Harness::with_config(
        config,
        vec![spec_kv("a", 2, 4), spec_kv("b", 2, 4), spec_kv("c", 2, 4)],
    );
    h.event(Event::Snapshot(snapshot(40, 1)));
    for m in ["a", "b", "c"] {
        h.use_and_finish(m);
    }
    h.use_and_finish("c");
    h.use_and_finish("c");
    // Warning from PSI (no byte deficit): drop idle KV caches, shrink budgets; no eviction.
    h.now += 10;
    let warn = MemorySnapshot {
        psi_some_avg10: Some(50.0),
        ..snapshot(30, 18)
    };
    let actions = h.event(Event::Snapshot(warn));
    assert!(matches!(
        actions[0],
        Action::PressureChanged {
            level: PressureLevel::Warning,
            ..
        }
    ));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::DropIdleKv { .. }))
    );
    assert!(h.evictions().is_empty());
    // Within the cooldown, nothing more happens.
    h.now += 10;
    let actions = h.event(Event::Snapshot(snapshot(3, 18)));
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Unload { .. })),
        "{actions:?}"
    );
    // After it, critical (available < headroom/2): evict idle models by score, lowest first (a, b before c).
    h.now += 1000;
    let actions = h.event(Event::Snapshot(snapshot(3, 18)));
    let evicted: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Unload {
                model,
                reason: EvictReason::Pressure,
                ..
            } => Some(model.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(evicted.first(), Some(&"a"), "{actions:?}");
    assert!(!evicted.contains(&"c"));
    // New loads are refused while critical.
    h.settle();
    let (id, actions) = h.request("a", RequestKind::Use);
    assert!(matches!(
        rejection_of(&actions, id),
        Some(Rejection::Pressure { .. })
    ));
    // Back to normal once calm for the dwell: loads are admitted again and shrunk budgets grow back.
    h.now += GovernorConfig::new(0, 0).pressure_dwell_ms;
    h.event(Event::Snapshot(snapshot(40, 10)));
    let (id, actions) = h.request("a", RequestKind::Use);
    assert!(rejection_of(&actions, id).is_none());
}

#[test]
fn prefix_caches_are_shed_first_even_on_busy_models() {
    let mut config = GovernorConfig::new(40 * GIB, 8 * GIB);
    config.shed_cooldown_ms = 1000;
    let mut h = Harness::with_config(config, vec![spec_kv("a", 2, 4), spec_kv("b", 2, 4)]);
    h.event(Event::Snapshot(snapshot(40, 1)));
    h.use_and_finish("a");
    h.use_and_finish("b");
    // b is busy now; both report a cache.
    let (_, _) = h.request("b", RequestKind::Use);
    for m in ["a", "b"] {
        h.event(Event::KvCache {
            model: m.into(),
            cached_bytes: GIB,
        });
    }
    assert_eq!(h.gov.model("b", h.now).unwrap().cache_bytes, GIB);
    h.now += 10;
    let warn = MemorySnapshot {
        psi_some_avg10: Some(50.0),
        ..snapshot(30, 18)
    };
    let actions = h.event(Event::Snapshot(warn));
    let first_other = actions
        .iter()
        .position(|a| {
            matches!(
                a,
                Action::DropIdleKv { .. } | Action::SetKvBudget { .. } | Action::Unload { .. }
            )
        })
        .expect("the other steps follow");
    let dropped: Vec<(usize, &str)> = actions
        .iter()
        .enumerate()
        .filter_map(|(i, a)| match a {
            Action::DropCache { model, bytes } => {
                assert_eq!(*bytes, GIB);
                Some((i, model.as_str()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        dropped.iter().map(|d| d.1).collect::<Vec<_>>(),
        vec!["a", "b"],
        "{actions:?}"
    );
    assert!(dropped.iter().all(|d| d.0 < first_other), "{actions:?}");
    assert_eq!(h.gov.model("a", h.now).unwrap().cache_bytes, 0);
    // An empty cache is not dropped again.
    h.now += 2000;
    let actions = h.event(Event::Snapshot(warn));
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::DropCache { .. })),
        "{actions:?}"
    );
}

#[test]
fn os_ceiling_limits_loads_when_other_apps_use_memory() {
    // The configured ceiling is generous but the OS has only 6 GiB available beyond the 8 GiB headroom.
    let mut h = Harness::with_config(
        GovernorConfig::new(100 * GIB, 8 * GIB),
        vec![spec("a", 4), spec("b", 4)],
    );
    h.event(Event::Snapshot(snapshot(14, 0)));
    h.use_and_finish("a");
    // A fresh snapshot shows a's 4 GiB in our process; the effective ceiling stays 6 GiB.
    h.event(Event::Snapshot(snapshot(10, 4)));
    assert_eq!(h.gov.effective_ceiling(), 6 * GIB);
    h.use_and_finish("b");
    assert_eq!(
        h.evictions(),
        vec![("a".to_string(), EvictReason::MakeRoom)]
    );
}

#[test]
fn measurement_above_prediction_restores_the_ceiling() {
    let mut h = Harness::new(10, vec![spec("a", 4), spec("b", 4)]);
    h.strict = false;
    h.use_and_finish("a");
    let (id, _) = h.request("b", RequestKind::Use);
    h.in_progress.clear();
    // b turns out to take 7 GiB: a (idle) is evicted to keep the ledger under the ceiling.
    let actions = h.event(Event::LoadFinished {
        model: "b".into(),
        measured_bytes: 7 * GIB,
        kv_tokens: 1024,
        load_ms: 5,
    });
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Unload { model, .. } if model == "a"))
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Admit { id: i, .. } if *i == id))
    );
    assert_eq!(h.gov.model("b", 0).unwrap().charged_bytes, 7 * GIB);
}

#[test]
fn cancelled_waiters_are_forgotten() {
    let mut h = Harness::new(10, vec![spec("a", 4)]);
    let (id, _) = h.request("a", RequestKind::Use);
    h.event(Event::Cancel { id });
    let after = h.settle();
    assert!(!after.iter().any(|a| matches!(a, Action::Admit { .. })));
    assert_eq!(h.gov.model("a", 0).unwrap().in_flight, 0);
}

#[test]
fn preview_does_not_change_anything() {
    let mut h = Harness::new(10, vec![spec("a", 4), spec("b", 4), spec("c", 4)]);
    h.use_and_finish("a");
    h.use_and_finish("b");
    let preview = h.gov.preview_load("c", h.now).unwrap();
    assert!(preview.fits);
    assert_eq!(preview.victims.len(), 1);
    assert_eq!(h.residency("a"), Residency::Resident);
    assert_eq!(h.residency("b"), Residency::Resident);
}

// ----- properties -----

#[derive(Debug, Clone)]
enum Op {
    Use(usize),
    Done(usize),
    Load(usize),
    Unload(usize),
    Pin(usize),
    Unpin(usize),
    Lease(usize, u64),
    Settle,
    Fail,
    Advance(u64),
    Snapshot(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..6usize).prop_map(Op::Use),
        3 => (0..6usize).prop_map(Op::Done),
        1 => (0..6usize).prop_map(Op::Load),
        1 => (0..6usize).prop_map(Op::Unload),
        1 => (0..6usize).prop_map(Op::Pin),
        1 => (0..6usize).prop_map(Op::Unpin),
        1 => ((0..6usize), (0..5000u64)).prop_map(|(m, t)| Op::Lease(m, t)),
        4 => Just(Op::Settle),
        1 => Just(Op::Fail),
        2 => (0..100_000u64).prop_map(Op::Advance),
        1 => (0..64u64).prop_map(Op::Snapshot),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Over random events: the ledger never exceeds the ceiling; pinned, busy and leased models are never
    /// unloaded; every request is answered at most once; in-flight counts never underflow into nonsense.
    #[test]
    fn ceiling_holds_and_protected_models_survive(
        sizes in proptest::collection::vec(1u64..12, 6),
        ceiling in 12u64..40,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let names: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
        let specs: Vec<ModelSpec> = names.iter().zip(&sizes).map(|(n, &s)| {
            let mut sp = spec_kv(n, s, 1);
            sp.keep_alive = if s % 3 == 0 { KeepAlive::Millis(20_000) } else { KeepAlive::Forever };
            sp
        }).collect();
        let mut config = GovernorConfig::new(ceiling * GIB, 2 * GIB);
        config.max_resident = Some(4);
        let mut h = Harness::with_config(config, specs);
        let mut answered = std::collections::BTreeSet::new();
        for op in ops {
            let actions = match op {
                Op::Use(i) => h.request(&names[i], RequestKind::Use).1,
                Op::Load(i) => h.request(&names[i], RequestKind::Load).1,
                Op::Done(i) => {
                    if h.gov.model(&names[i], h.now).unwrap().in_flight > 0 {
                        h.event(Event::RequestDone { model: names[i].clone() })
                    } else { vec![] }
                }
                Op::Unload(i) => match h.gov.unload(&names[i], h.now) { Ok(p) => h.record(p), Err(_) => vec![] },
                Op::Pin(i) => { let id = RequestId(1_000_000 + h.next_id); h.next_id += 1; match h.gov.pin(id, &names[i], h.now) { Ok(p) => h.record(p), Err(_) => vec![] } }
                Op::Unpin(i) => match h.gov.unpin(&names[i], h.now) { Ok(p) => h.record(p), Err(_) => vec![] },
                Op::Lease(i, ttl) => { let id = RequestId(2_000_000 + h.next_id); h.next_id += 1; match h.gov.lease(id, &names[i], ttl, h.now) { Ok((_, _, p)) => h.record(p), Err(_) => vec![] } }
                Op::Settle => h.settle(),
                Op::Fail => {
                    let load = h.in_progress.iter().position(|a| matches!(a, Action::Load { .. }));
                    match load {
                        Some(pos) => {
                            let Action::Load { model, .. } = h.in_progress.remove(pos) else { unreachable!() };
                            h.event(Event::LoadFailed { model, reason: "boom".into() })
                        }
                        None => vec![],
                    }
                }
                Op::Advance(ms) => { h.now += ms; h.event(Event::Tick) }
                Op::Snapshot(avail) => h.event(Event::Snapshot(snapshot(avail, 4))),
            };
            for a in &actions {
                match a {
                    Action::Admit { id, .. } | Action::Reject { id, .. } => { prop_assert!(answered.insert(*id), "request {id:?} answered twice"); }
                    Action::Unload { model, .. } => {
                        let after = h.gov.model(model, h.now).unwrap();
                        prop_assert!(!after.pinned, "pinned {model} unloaded");
                        prop_assert_eq!(after.in_flight, 0, "busy {} unloaded", model);
                        prop_assert_eq!(after.leases, 0, "leased {} unloaded", model);
                    }
                    _ => {}
                }
            }
            prop_assert!(h.gov.used_bytes() <= ceiling * GIB);
        }
    }

    /// Reloads interleaved with requests: the ledger stays under the ceiling, no request is answered
    /// twice, no model unloads with a request running on it, and every request is answered once the
    /// remaining work is done (a removed model's waiters are refused, not forgotten).
    #[test]
    fn reconfiguration_keeps_requests_safe(
        ops in proptest::collection::vec((0..5usize, 0..4usize, 1u64..6), 1..80),
    ) {
        let names = ["a", "b", "c", "d"];
        let mut h = Harness::new(12, names.iter().map(|n| spec(n, 2)).collect());
        let mut answered = std::collections::BTreeSet::new();
        let mut asked = Vec::new();
        let mut running: std::collections::BTreeMap<String, u32> = Default::default();
        for (kind, i, size) in ops {
            let m = names[i].to_string();
            let actions = match kind {
                0 | 1 => { let (id, a) = h.request(&m, RequestKind::Use); asked.push(id); a }
                2 => {
                    let n = running.get(&m).copied().unwrap_or(0);
                    if n > 0 { running.insert(m.clone(), n - 1); h.event(Event::RequestDone { model: m }) } else { vec![] }
                }
                3 => h.settle(),
                _ => {
                    // A new configuration: model i dropped, the one after it resized (a reload), the rest kept.
                    let changes = names.iter().enumerate().filter(|(j, _)| *j != i).map(|(j, n)| {
                        if j == (i + 1) % 4 { ModelChange::Reload(spec(n, size)) } else { ModelChange::Keep(spec(n, 2)) }
                    }).collect();
                    let plan = h.gov.reconfigure(changes, h.now);
                    h.record(plan)
                }
            };
            for a in &actions {
                match a {
                    Action::Admit { id, model, .. } => {
                        prop_assert!(answered.insert(*id), "request {id:?} answered twice");
                        *running.entry(model.clone()).or_default() += 1;
                    }
                    Action::Reject { id, .. } => prop_assert!(answered.insert(*id), "request {id:?} answered twice"),
                    Action::Unload { model, .. } => prop_assert_eq!(running.get(model).copied().unwrap_or(0), 0, "{} unloaded mid-request", model),
                    _ => {}
                }
            }
            prop_assert!(h.gov.used_bytes() <= 12 * GIB);
        }
        // Finish everything: every request that was asked is answered.
        for _ in 0..8 {
            let models: Vec<(String, u32)> = running.iter().map(|(m, n)| (m.clone(), *n)).collect();
            for (m, n) in models {
                for _ in 0..n {
                    let actions = h.event(Event::RequestDone { model: m.clone() });
                    for a in &actions {
                        match a {
                            Action::Admit { id, model, .. } => { prop_assert!(answered.insert(*id)); *running.entry(model.clone()).or_default() += 1; }
                            Action::Reject { id, .. } => prop_assert!(answered.insert(*id)),
                            _ => {}
                        }
                    }
                }
                *running.entry(m).or_default() -= n;
            }
            let actions = h.settle();
            for a in &actions {
                match a {
                    Action::Admit { id, model, .. } => { prop_assert!(answered.insert(*id)); *running.entry(model.clone()).or_default() += 1; }
                    Action::Reject { id, .. } => prop_assert!(answered.insert(*id)),
                    _ => {}
                }
            }
        }
        for id in asked {
            prop_assert!(answered.contains(&id), "request {id:?} never answered");
        }
    }

    /// The governor is deterministic: the same events give the same plans.
    #[test]
    fn deterministic(ops in proptest::collection::vec((0..4usize, any::<bool>()), 1..60)) {
        let run = || {
            let specs = vec![spec("a", 3), spec("b", 4), spec("c", 5), spec("d", 2)];
            let mut h = Harness::new(9, specs);
            for (i, done) in &ops {
                let m = ["a", "b", "c", "d"][*i];
                h.request(m, RequestKind::Use);
                h.settle();
                if *done { h.event(Event::RequestDone { model: m.into() }); }
                h.now += 7;
            }
            h.log
        };
        prop_assert_eq!(run(), run());
    }
}
