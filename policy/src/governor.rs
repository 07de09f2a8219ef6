//! The governor: the ledger of every model's memory and the state machine that turns events into plans.
//!
//! Invariant: after every call, the bytes charged to models that hold memory (loading, resident,
//! unloading) do not exceed the ceiling. A model is charged `max(predicted, measured)` static bytes plus
//! its current KV budget. Pinned models, models with requests in flight and leased models are never
//! chosen for eviction.

use std::collections::{BTreeMap, VecDeque};

use crate::footprint::Footprint;
use crate::plan::{Action, Event, EvictReason, HoldReason, Holder, Plan, Rejection};
use crate::pressure::{
    MemorySnapshot, PressureLevel, PressureThresholds, PressureTracker, Verdict,
};
use crate::score::{Gdsf, cheapest_cover};
use crate::size::KeepAlive;

/// The daemon's id for a request, echoed in `Admit` and `Reject` actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// A lease's id, returned by [`Governor::lease`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseId(pub u64);

/// What a request wants from a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Run on it (generate, embed): counted in flight from admission until `RequestDone`.
    Use,
    /// Only have it resident (an explicit load, a pin, a preload).
    Load,
}

/// A model as the policy sees it: its footprint and the operator's wishes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The configured name.
    pub name: String,
    /// The predicted footprint.
    pub footprint: Footprint,
    /// Pinned at boot.
    pub pinned: bool,
    /// Multiplies the eviction score (default 1; higher stays longer).
    pub priority: f64,
    /// Idle time before unloading.
    pub keep_alive: KeepAlive,
    /// The smallest KV budget (tokens per sequence) shedding may shrink this model to.
    pub min_kv_tokens: u32,
}

impl ModelSpec {
    /// A model that is its weights alone (no KV to speak of), unpinned, of priority 1, never unloaded for
    /// idleness: what simulations and routing need.
    pub fn weights_only(name: impl Into<String>, weights_bytes: u64) -> Self {
        Self {
            name: name.into(),
            footprint: Footprint {
                weights_bytes,
                context_tokens: 1,
                max_sequences: 1,
                ..Default::default()
            },
            pinned: false,
            priority: 1.0,
            keep_alive: KeepAlive::Forever,
            min_kv_tokens: 1,
        }
    }
}

/// Retry delays after a failed load: `initial_ms · 2^(attempt-1)`, capped at `max_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial_ms: u64,
    /// The longest delay.
    pub max_ms: u64,
}

impl Backoff {
    /// The delay after `attempts` consecutive failures.
    pub fn delay_ms(&self, attempts: u32) -> u64 {
        let shift = attempts.saturating_sub(1).min(32);
        self.initial_ms
            .saturating_mul(1u64 << shift)
            .min(self.max_ms)
    }
}

/// Governor settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GovernorConfig {
    /// The most bytes resident models may be charged.
    pub ceiling_bytes: u64,
    /// Bytes the OS must keep available; loads that would eat into it wait or evict.
    pub headroom_bytes: u64,
    /// The most models resident or loading at once.
    pub max_resident: Option<u32>,
    /// Pressure thresholds.
    pub thresholds: PressureThresholds,
    /// Minimum time between two shedding rounds, so the OS can show the effect of the last one.
    pub shed_cooldown_ms: u64,
    /// How long samples must stay calm before the pressure level steps down (up is immediate); see
    /// [`PressureTracker`].
    pub pressure_dwell_ms: u64,
    /// Assumed load bandwidth (bytes/s) for a model never loaded yet; measured per model afterwards.
    pub default_load_bandwidth: f64,
    /// Retry delays after failed loads.
    pub backoff: Backoff,
    /// Half-life of the use frequency in the eviction score.
    pub frequency_half_life_ms: u64,
}

impl GovernorConfig {
    /// A configuration with the given ceiling and headroom and defaults elsewhere.
    pub fn new(ceiling_bytes: u64, headroom_bytes: u64) -> Self {
        Self {
            ceiling_bytes,
            headroom_bytes,
            max_resident: None,
            thresholds: PressureThresholds::default(),
            shed_cooldown_ms: 2_000,
            pressure_dwell_ms: 5_000,
            default_load_bandwidth: 2e9,
            backoff: Backoff {
                initial_ms: 1_000,
                max_ms: 300_000,
            },
            frequency_half_life_ms: 6 * 60 * 60 * 1000,
        }
    }
}

/// Where a model is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// Not in memory.
    Unloaded,
    /// Being loaded.
    Loading,
    /// In memory and serving.
    Resident,
    /// Being unloaded; still charged until `UnloadFinished`.
    Unloading,
    /// The last load failed (see [`ModelView::failure`]).
    Failed,
}

impl Residency {
    fn holds_memory(self) -> bool {
        matches!(self, Self::Loading | Self::Resident | Self::Unloading)
    }
}

/// A read-only view of one model's ledger entry, for status displays.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelView {
    /// The configured name.
    pub name: String,
    /// Its residency.
    pub residency: Residency,
    /// Pinned now.
    pub pinned: bool,
    /// The predicted footprint at the full context.
    pub predicted_bytes: u64,
    /// Measured bytes after the last load: steady state (weights, overhead, KV at its budget then).
    pub measured_bytes: Option<u64>,
    /// What the ledger charges now: `max(predicted, measured)` static bytes plus the KV budget.
    pub charged_bytes: u64,
    /// The KV budget in tokens per sequence.
    pub kv_tokens: u32,
    /// True when its idle KV caches were dropped under pressure.
    pub kv_dropped: bool,
    /// The share of its KV budget its prefix cache holds (as last reported).
    pub cache_bytes: u64,
    /// Requests running.
    pub in_flight: u32,
    /// Requests waiting for it to load or for memory.
    pub queued: u32,
    /// Leases held on it now.
    pub leases: u32,
    /// The GDSF eviction score.
    pub score: f64,
    /// When it was last used (the caller's clock), if ever.
    pub last_used_ms: Option<u64>,
    /// How long it has been idle, if resident and idle.
    pub idle_ms: Option<u64>,
    /// The last failure, if its residency is `Failed`.
    pub failure: Option<String>,
    /// Duration of the last load.
    pub load_ms: Option<u64>,
    /// Completed loads.
    pub loads: u64,
    /// Admitted requests.
    pub requests: u64,
    /// Its keep-alive.
    pub keep_alive: KeepAlive,
    /// Its priority.
    pub priority: f64,
    /// The model's footprint (prediction).
    pub footprint: Footprint,
}

/// A model that a load would evict, with its score.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedVictim {
    /// The model.
    pub model: String,
    /// Bytes it frees.
    pub bytes: u64,
    /// Its score when chosen.
    pub score: f64,
    /// Why it is chosen.
    pub reason: EvictReason,
}

/// What loading a model would do now, without doing it (`ultctl plan-load`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadPreview {
    /// The model.
    pub model: String,
    /// Already resident or loading: nothing to do.
    pub already_resident: bool,
    /// The load would start now.
    pub fits: bool,
    /// The load would wait for busy models to finish.
    pub would_wait: bool,
    /// Bytes the load needs.
    pub need_bytes: u64,
    /// Bytes free now (under the ceiling and, with a snapshot, under available less headroom).
    pub free_bytes: u64,
    /// Models whose KV budget would shrink, with the new budget.
    pub shrinks: Vec<(String, u32)>,
    /// Models that would be evicted, in order.
    pub victims: Vec<PlannedVictim>,
    /// Why the load would be refused, if it would.
    pub refusal: Option<Rejection>,
}

#[derive(Debug, Clone)]
struct Failure {
    reason: String,
    attempts: u32,
    retry_at_ms: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    spec: ModelSpec,
    residency: Residency,
    pinned: bool,
    measured_static: Option<u64>,
    measured_total: Option<u64>,
    kv_tokens: u32,
    kv_dropped: bool,
    cache_bytes: u64,
    in_flight: u32,
    leases: BTreeMap<LeaseId, u64>,
    last_used_ms: Option<u64>,
    idle_since_ms: u64,
    frequency: f64,
    frequency_at_ms: u64,
    load_ms: Option<u64>,
    loads: u64,
    requests: u64,
    waiters: Vec<(RequestId, RequestKind)>,
    failure: Option<Failure>,
    load_started_by_request: bool,
    /// The last finished request's own keep-alive, which replaces the configured one while resident.
    keep_alive_after: Option<KeepAlive>,
    /// A reconfiguration waiting for the model to be idle (never mid-request): a new spec to load with,
    /// or its removal.
    replacement: Option<Replacement>,
}

/// What a reconfiguration does to a resident model once it is idle.
#[derive(Debug, Clone)]
enum Replacement {
    /// Unload it, then serve the next request with this spec.
    Spec(ModelSpec),
    /// Unload it and forget it.
    Remove,
}

/// One model of a new configuration (see [`Governor::reconfigure`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ModelChange {
    /// The same files and shape: its settings (pin, priority, keep-alive, smallest KV budget) change in
    /// place; a different footprint still reloads it.
    Keep(ModelSpec),
    /// Its files or its serving configuration changed: once idle it unloads, and its next request loads
    /// it with this spec.
    Reload(ModelSpec),
}

impl Entry {
    fn new(spec: ModelSpec) -> Self {
        Self {
            pinned: spec.pinned,
            kv_tokens: spec.footprint.context_tokens,
            spec,
            residency: Residency::Unloaded,
            measured_static: None,
            measured_total: None,
            kv_dropped: false,
            cache_bytes: 0,
            in_flight: 0,
            leases: BTreeMap::new(),
            last_used_ms: None,
            idle_since_ms: 0,
            frequency: 0.0,
            frequency_at_ms: 0,
            load_ms: None,
            loads: 0,
            requests: 0,
            waiters: Vec::new(),
            failure: None,
            load_started_by_request: false,
            keep_alive_after: None,
            replacement: None,
        }
    }

    /// Takes a reconfigured spec: a changed `pinned` setting wins; otherwise a pin set at run time stays.
    fn adopt(&mut self, spec: ModelSpec) {
        if spec.pinned != self.spec.pinned {
            self.pinned = spec.pinned;
        }
        self.spec = spec;
    }

    /// Steady bytes (the larger of predicted and measured) plus the predicted scratch.
    fn static_bytes(&self) -> u64 {
        let f = &self.spec.footprint;
        f.steady_bytes()
            .max(self.measured_static.unwrap_or(0))
            .saturating_add(f.scratch_bytes)
    }

    /// Bytes charged with a KV budget of `kv_tokens`.
    fn charge_with(&self, kv_tokens: u32) -> u64 {
        self.static_bytes()
            .saturating_add(self.spec.footprint.kv_bytes(kv_tokens))
    }

    fn charged(&self) -> u64 {
        self.charge_with(self.kv_tokens)
    }

    /// Bytes a load charges: the full context budget.
    fn load_need(&self) -> u64 {
        self.charge_with(self.spec.footprint.context_tokens)
    }

    fn active_leases(&self, now: u64) -> usize {
        self.leases.values().filter(|&&until| until > now).count()
    }

    fn is_idle(&self) -> bool {
        self.residency == Residency::Resident && self.in_flight == 0 && self.waiters.is_empty()
    }

    /// Why this model cannot be evicted now, or None when it can.
    fn hold_reason(&self, now: u64) -> Option<HoldReason> {
        match self.residency {
            Residency::Loading => Some(HoldReason::Loading),
            Residency::Unloading => Some(HoldReason::Unloading),
            _ if self.pinned => Some(HoldReason::Pinned),
            _ if self.in_flight > 0 || !self.waiters.is_empty() => Some(HoldReason::Busy),
            _ if self.active_leases(now) > 0 => Some(HoldReason::Leased),
            _ => None,
        }
    }

    fn reload_cost_ms(&self, default_bandwidth: f64) -> f64 {
        match self.load_ms {
            Some(ms) => ms.max(1) as f64,
            None => self.load_need() as f64 / default_bandwidth.max(1.0) * 1000.0,
        }
    }
}

/// The decision core. See the crate documentation.
#[derive(Debug, Clone)]
pub struct Governor {
    config: GovernorConfig,
    models: BTreeMap<String, Entry>,
    pending: VecDeque<(RequestId, String, RequestKind)>,
    gdsf: Gdsf,
    snapshot: Option<MemorySnapshot>,
    pressure: PressureTracker,
    last_shed_ms: Option<u64>,
    next_lease: u64,
}

/// The outcome of planning a load, before it is applied.
#[derive(Debug, Clone)]
enum Admission {
    Fits {
        shrinks: Vec<(String, u32)>,
        victims: Vec<PlannedVictim>,
    },
    Wait,
    Refuse(Rejection),
}

impl Governor {
    /// A governor for `specs` (names must be unique; a later duplicate replaces an earlier one).
    pub fn new(config: GovernorConfig, specs: impl IntoIterator<Item = ModelSpec>) -> Self {
        let gdsf = Gdsf {
            half_life_ms: config.frequency_half_life_ms,
        };
        Self {
            config,
            models: specs
                .into_iter()
                .map(|s| (s.name.clone(), Entry::new(s)))
                .collect(),
            pending: VecDeque::new(),
            gdsf,
            snapshot: None,
            pressure: PressureTracker::new(),
            last_shed_ms: None,
            next_lease: 1,
        }
    }

    /// Handles one event at time `now` (milliseconds on the caller's monotonic clock).
    pub fn handle(&mut self, event: Event, now: u64) -> Plan {
        let mut plan = Plan::default();
        match event {
            Event::Request { id, model, kind } => self.on_request(id, &model, kind, now, &mut plan),
            Event::RequestDone { model } => self.on_request_done(&model, now, &mut plan),
            Event::KeepAliveAfter { model, keep_alive } => {
                if let Some(e) = self.models.get_mut(&model) {
                    e.keep_alive_after = keep_alive;
                }
            }
            Event::Cancel { id } => self.on_cancel(id, now, &mut plan),
            Event::LoadFinished {
                model,
                measured_bytes,
                kv_tokens,
                load_ms,
            } => self.on_load_finished(&model, measured_bytes, kv_tokens, load_ms, now, &mut plan),
            Event::LoadFailed { model, reason } => {
                self.on_load_failed(&model, reason, now, &mut plan)
            }
            Event::UnloadFinished { model } => self.on_unload_finished(&model, now, &mut plan),
            Event::Lost { model, reason } => self.on_lost(&model, reason, now, &mut plan),
            Event::KvCache {
                model,
                cached_bytes,
            } => {
                if let Some(e) = self.models.get_mut(&model)
                    && e.residency == Residency::Resident
                {
                    e.cache_bytes = cached_bytes;
                }
            }
            Event::Snapshot(snapshot) => self.on_snapshot(snapshot, now, &mut plan),
            Event::Tick => self.on_tick(now, &mut plan),
        }
        self.settle_replacements(now, &mut plan);
        plan
    }

    /// Applies a new configuration: `models` is every model it names. New names are added; a name it no
    /// longer holds is removed, and a [`ModelChange::Reload`] replaces its model's spec — at once when
    /// the model is not resident, otherwise once no request runs on it (it then unloads; requests that
    /// arrive meanwhile wait and are served by the new spec). A removed model's waiting requests are
    /// rejected as unknown.
    pub fn reconfigure(&mut self, models: Vec<ModelChange>, now: u64) -> Plan {
        let mut plan = Plan::default();
        let named: std::collections::BTreeSet<String> = models
            .iter()
            .map(|c| match c {
                ModelChange::Keep(s) | ModelChange::Reload(s) => s.name.clone(),
            })
            .collect();
        for (name, e) in &mut self.models {
            if !named.contains(name) {
                e.replacement = Some(Replacement::Remove);
            }
        }
        for change in models {
            let (spec, reload) = match change {
                ModelChange::Keep(s) => (s, false),
                ModelChange::Reload(s) => (s, true),
            };
            match self.models.get_mut(&spec.name) {
                None => {
                    self.models.insert(spec.name.clone(), Entry::new(spec));
                }
                Some(e) if !reload && e.spec.footprint == spec.footprint => {
                    e.replacement = None;
                    e.adopt(spec);
                }
                Some(e) => e.replacement = Some(Replacement::Spec(spec)),
            }
        }
        // A reload that a newer configuration took back: the requests that waited for it run now.
        let released: Vec<(String, Vec<(RequestId, RequestKind)>)> = self
            .models
            .values_mut()
            .filter(|e| e.residency == Residency::Resident && e.replacement.is_none())
            .filter(|e| !e.waiters.is_empty())
            .map(|e| (e.spec.name.clone(), std::mem::take(&mut e.waiters)))
            .collect();
        for (model, waiters) in released {
            for (id, kind) in waiters {
                self.admit(id, &model, kind, false, now, &mut plan);
            }
        }
        self.settle_replacements(now, &mut plan);
        self.drain_pending(now, &mut plan);
        plan
    }

    /// Pins `model`; loads it if it is not resident (request `id` is answered like a `Load`).
    pub fn pin(&mut self, id: RequestId, model: &str, now: u64) -> Result<Plan, Rejection> {
        let entry = self.entry_mut(model)?;
        entry.pinned = true;
        let mut plan = Plan::default();
        self.on_request(id, model, RequestKind::Load, now, &mut plan);
        Ok(plan)
    }

    /// Removes a pin; the model becomes evictable and subject to keep-alive.
    pub fn unpin(&mut self, model: &str, now: u64) -> Result<Plan, Rejection> {
        self.entry_mut(model)?.pinned = false;
        let mut plan = Plan::default();
        self.drain_pending(now, &mut plan);
        Ok(plan)
    }

    /// Explicitly unloads an idle, unpinned, unleased model. `Ok` with an empty plan when it is not
    /// resident.
    pub fn unload(&mut self, model: &str, now: u64) -> Result<Plan, Rejection> {
        let entry = self.entry(model)?;
        let mut plan = Plan::default();
        if entry.residency != Residency::Resident {
            return match entry.residency {
                Residency::Loading => Err(Rejection::CannotUnload {
                    model: model.to_string(),
                    reason: HoldReason::Loading,
                }),
                _ => Ok(plan),
            };
        }
        if let Some(reason) = entry.hold_reason(now) {
            return Err(Rejection::CannotUnload {
                model: model.to_string(),
                reason,
            });
        }
        self.evict(model, EvictReason::Explicit, &mut plan);
        Ok(plan)
    }

    /// Holds `model` against eviction for `ttl_ms`, loading it if needed (answered as request `id`).
    pub fn lease(
        &mut self,
        id: RequestId,
        model: &str,
        ttl_ms: u64,
        now: u64,
    ) -> Result<(LeaseId, u64, Plan), Rejection> {
        let lease = LeaseId(self.next_lease);
        let until = now.saturating_add(ttl_ms);
        self.entry_mut(model)?.leases.insert(lease, until);
        self.next_lease += 1;
        let mut plan = Plan::default();
        self.on_request(id, model, RequestKind::Load, now, &mut plan);
        Ok((lease, until, plan))
    }

    /// Releases a lease before it expires.
    pub fn release(&mut self, lease: LeaseId, now: u64) -> Result<Plan, Rejection> {
        let owner = self
            .models
            .values_mut()
            .find(|e| e.leases.get(&lease).is_some_and(|&until| until > now))
            .ok_or(Rejection::UnknownLease { lease })?;
        owner.leases.remove(&lease);
        let mut plan = Plan::default();
        self.on_tick(now, &mut plan);
        Ok(plan)
    }

    /// What loading `model` would do now, without changing anything.
    pub fn preview_load(&self, model: &str, now: u64) -> Result<LoadPreview, Rejection> {
        let entry = self.entry(model)?;
        let need = entry.load_need();
        let already = matches!(entry.residency, Residency::Resident | Residency::Loading);
        let mut preview = LoadPreview {
            model: model.to_string(),
            already_resident: already,
            fits: already,
            would_wait: false,
            need_bytes: need,
            free_bytes: self.free_bytes(),
            shrinks: Vec::new(),
            victims: Vec::new(),
            refusal: None,
        };
        if already {
            return Ok(preview);
        }
        match self.plan_admission(model, now) {
            Admission::Fits {
                shrinks, victims, ..
            } => {
                preview.fits = true;
                preview.shrinks = shrinks;
                preview.victims = victims;
            }
            Admission::Wait => preview.would_wait = true,
            Admission::Refuse(r) => preview.refusal = Some(r),
        }
        Ok(preview)
    }

    /// The configuration.
    pub fn config(&self) -> &GovernorConfig {
        &self.config
    }

    /// Bytes charged to models that hold memory.
    pub fn used_bytes(&self) -> u64 {
        self.models
            .values()
            .filter(|e| e.residency.holds_memory())
            .map(Entry::charged)
            .fold(0u64, u64::saturating_add)
    }

    /// Bytes a load can use now without evicting: the effective ceiling less what is charged.
    pub fn free_bytes(&self) -> u64 {
        self.effective_ceiling().saturating_sub(self.used_bytes())
    }

    /// The pressure verdict: the level with hysteresis, why, and the latest sample's deficit.
    pub fn verdict(&self) -> &Verdict {
        self.pressure.verdict()
    }

    /// The latest memory snapshot, if any.
    pub fn snapshot(&self) -> Option<&MemorySnapshot> {
        self.snapshot.as_ref()
    }

    /// Models loading now.
    pub fn loads_in_flight(&self) -> usize {
        self.models
            .values()
            .filter(|e| e.residency == Residency::Loading)
            .count()
    }

    /// A view of one model.
    pub fn model(&self, name: &str, now: u64) -> Option<ModelView> {
        self.models.get(name).map(|e| self.view(e, now))
    }

    /// Views of every model, by name.
    pub fn models(&self, now: u64) -> Vec<ModelView> {
        self.models.values().map(|e| self.view(e, now)).collect()
    }

    /// The residency of `name`, if configured.
    pub fn residency(&self, name: &str) -> Option<Residency> {
        self.models.get(name).map(|e| e.residency)
    }

    /// Milliseconds until a failed model may be retried, or None when it is not backing off.
    pub fn retry_in_ms(&self, name: &str, now: u64) -> Option<u64> {
        let e = self.models.get(name)?;
        if e.residency != Residency::Failed {
            return None;
        }
        let retry_at = e.failure.as_ref()?.retry_at_ms;
        (retry_at > now).then(|| retry_at - now)
    }

    /// Whether `name` is pinned.
    pub fn is_pinned(&self, name: &str) -> bool {
        self.models.get(name).is_some_and(|e| e.pinned)
    }

    // ----- events -----

    fn on_request(
        &mut self,
        id: RequestId,
        model: &str,
        kind: RequestKind,
        now: u64,
        plan: &mut Plan,
    ) {
        let unknown = !self.models.contains_key(model);
        if unknown {
            let reason = self.unknown(model);
            plan.actions.push(Action::Reject { id, reason });
            return;
        }
        let Some(entry) = self.models.get_mut(model) else {
            return;
        };
        if matches!(entry.replacement, Some(Replacement::Remove)) {
            let reason = self.unknown(model);
            plan.actions.push(Action::Reject { id, reason });
            return;
        }
        match entry.residency {
            // Reconfigured: the request waits for the unload and the load with the new spec.
            Residency::Resident if entry.replacement.is_some() => entry.waiters.push((id, kind)),
            Residency::Resident => {
                self.admit(id, model, kind, false, now, plan);
            }
            Residency::Loading | Residency::Unloading => {
                entry.waiters.push((id, kind));
            }
            Residency::Failed => {
                let retry_at = entry.failure.as_ref().map_or(0, |f| f.retry_at_ms);
                if now < retry_at {
                    let reason = entry
                        .failure
                        .as_ref()
                        .map_or_else(String::new, |f| f.reason.clone());
                    plan.actions.push(Action::Reject {
                        id,
                        reason: Rejection::LoadFailed {
                            model: model.to_string(),
                            reason,
                            retry_in_ms: retry_at - now,
                        },
                    });
                } else {
                    self.try_load(id, model, kind, now, plan);
                }
            }
            Residency::Unloaded => self.try_load(id, model, kind, now, plan),
        }
    }

    fn try_load(
        &mut self,
        id: RequestId,
        model: &str,
        kind: RequestKind,
        now: u64,
        plan: &mut Plan,
    ) {
        if self.pending.iter().any(|(_, m, _)| m == model) {
            // Single flight: the model already waits for memory; queue behind that request.
            self.pending.push_back((id, model.to_string(), kind));
            return;
        }
        match self.plan_admission(model, now) {
            Admission::Fits { shrinks, victims } => {
                let evicting = !victims.is_empty();
                self.apply_admission(model, shrinks, victims, plan);
                if evicting {
                    // The load starts once its victims' memory is back (UnloadFinished), so the ledger never
                    // charges both at once. It goes first in line: memory was freed for it.
                    self.pending.push_front((id, model.to_string(), kind));
                } else if let Some(e) = self.models.get_mut(model) {
                    e.waiters.push((id, kind));
                    e.load_started_by_request = true;
                }
            }
            Admission::Wait => self.pending.push_back((id, model.to_string(), kind)),
            Admission::Refuse(reason) => plan.actions.push(Action::Reject { id, reason }),
        }
    }

    fn on_request_done(&mut self, model: &str, now: u64, plan: &mut Plan) {
        let Some(entry) = self.models.get_mut(model) else {
            return;
        };
        entry.in_flight = entry.in_flight.saturating_sub(1);
        if entry.in_flight == 0 {
            entry.idle_since_ms = now;
            if entry.keep_alive_expired(now) && entry.hold_reason(now).is_none() {
                self.evict(model, EvictReason::KeepAlive, plan);
            }
        }
        self.drain_pending(now, plan);
    }

    fn on_cancel(&mut self, id: RequestId, now: u64, plan: &mut Plan) {
        self.pending.retain(|(pid, _, _)| *pid != id);
        for entry in self.models.values_mut() {
            entry.waiters.retain(|(wid, _)| *wid != id);
        }
        self.drain_pending(now, plan);
    }

    fn on_load_finished(
        &mut self,
        model: &str,
        measured_bytes: u64,
        kv_tokens: u32,
        load_ms: u64,
        now: u64,
        plan: &mut Plan,
    ) {
        let Some(entry) = self.models.get_mut(model) else {
            return;
        };
        if entry.residency != Residency::Loading {
            return;
        }
        entry.residency = Residency::Resident;
        entry.kv_tokens = kv_tokens.min(entry.spec.footprint.context_tokens);
        entry.kv_dropped = false;
        entry.measured_total = Some(measured_bytes);
        entry.measured_static =
            Some(measured_bytes.saturating_sub(entry.spec.footprint.kv_bytes(entry.kv_tokens)));
        entry.load_ms = Some(load_ms);
        entry.loads += 1;
        entry.failure = None;
        entry.idle_since_ms = now;
        let caused_load = entry.load_started_by_request;
        entry.load_started_by_request = false;
        if entry.replacement.is_some() {
            // Reconfigured while it loaded: its requests wait for the new spec; `settle_replacements`
            // (after every event) unloads this load at once.
            return;
        }
        let waiters = std::mem::take(&mut entry.waiters);
        // A measurement above the prediction can push the ledger over the ceiling: restore it by evicting
        // idle models, or, failing that, this one.
        if self.used_bytes() > self.config.ceiling_bytes {
            let excess = self.used_bytes() - self.config.ceiling_bytes;
            if let Some(victims) =
                self.choose_victims(excess, 0, Some(model), now, EvictReason::MakeRoom)
            {
                for v in victims {
                    self.evict(&v.model, v.reason, plan);
                }
            } else {
                let need = self.models.get(model).map_or(0, Entry::charged);
                let holders = self.holders(now, Some(model));
                self.evict(model, EvictReason::MakeRoom, plan);
                let free = self.free_bytes();
                for (id, _) in waiters {
                    plan.actions.push(Action::Reject {
                        id,
                        reason: Rejection::Exhausted {
                            model: model.to_string(),
                            need,
                            free,
                            holders: holders.clone(),
                        },
                    });
                }
                return;
            }
        }
        for (id, kind) in waiters {
            self.admit(id, model, kind, caused_load, now, plan);
        }
        self.drain_pending(now, plan);
    }

    fn on_load_failed(&mut self, model: &str, reason: String, now: u64, plan: &mut Plan) {
        let backoff = self.config.backoff;
        let Some(entry) = self.models.get_mut(model) else {
            return;
        };
        if entry.residency != Residency::Loading {
            return;
        }
        let attempts = entry.failure.as_ref().map_or(0, |f| f.attempts) + 1;
        let delay = backoff.delay_ms(attempts);
        entry.residency = Residency::Failed;
        entry.load_started_by_request = false;
        entry.failure = Some(Failure {
            reason: reason.clone(),
            attempts,
            retry_at_ms: now.saturating_add(delay),
        });
        for (id, _) in std::mem::take(&mut entry.waiters) {
            plan.actions.push(Action::Reject {
                id,
                reason: Rejection::LoadFailed {
                    model: model.to_string(),
                    reason: reason.clone(),
                    retry_in_ms: delay,
                },
            });
        }
        // Requests queued for memory on this model fail the same way.
        let mut kept = VecDeque::new();
        for (id, m, kind) in std::mem::take(&mut self.pending) {
            if m == model {
                plan.actions.push(Action::Reject {
                    id,
                    reason: Rejection::LoadFailed {
                        model: model.to_string(),
                        reason: reason.clone(),
                        retry_in_ms: delay,
                    },
                });
            } else {
                kept.push_back((id, m, kind));
            }
        }
        self.pending = kept;
        self.drain_pending(now, plan);
    }

    fn on_unload_finished(&mut self, model: &str, now: u64, plan: &mut Plan) {
        let Some(entry) = self.models.get_mut(model) else {
            return;
        };
        if entry.residency != Residency::Unloading {
            return;
        }
        entry.residency = Residency::Unloaded;
        entry.kv_tokens = entry.spec.footprint.context_tokens;
        entry.kv_dropped = false;
        if entry.replacement.is_some() {
            self.apply_replacement(model, plan);
        }
        let Some(entry) = self.models.get_mut(model) else {
            self.drain_pending(now, plan);
            return;
        };
        // Requests that arrived while it was unloading want it back.
        let waiters = std::mem::take(&mut entry.waiters);
        for (id, kind) in waiters {
            self.on_request(id, model, kind, now, plan);
        }
        self.drain_pending(now, plan);
    }

    fn on_lost(&mut self, model: &str, reason: String, now: u64, plan: &mut Plan) {
        let backoff = self.config.backoff;
        let Some(entry) = self.models.get_mut(model) else {
            return;
        };
        if !matches!(entry.residency, Residency::Resident | Residency::Unloading) {
            return;
        }
        let attempts = entry.failure.as_ref().map_or(0, |f| f.attempts) + 1;
        entry.residency = Residency::Failed;
        entry.kv_dropped = false;
        entry.cache_bytes = 0;
        entry.failure = Some(Failure {
            reason: reason.clone(),
            attempts,
            retry_at_ms: now.saturating_add(backoff.delay_ms(attempts)),
        });
        let delay = backoff.delay_ms(attempts);
        for (id, _) in std::mem::take(&mut entry.waiters) {
            plan.actions.push(Action::Reject {
                id,
                reason: Rejection::LoadFailed {
                    model: model.to_string(),
                    reason: reason.clone(),
                    retry_in_ms: delay,
                },
            });
        }
        self.drain_pending(now, plan);
    }

    fn on_snapshot(&mut self, snapshot: MemorySnapshot, now: u64, plan: &mut Plan) {
        let change = self.pressure.observe(
            &self.config.thresholds,
            &snapshot,
            self.config.headroom_bytes,
            self.config.pressure_dwell_ms,
            now,
        );
        self.snapshot = Some(snapshot);
        if let Some(change) = change {
            plan.actions.push(Action::PressureChanged {
                level: change.to,
                reason: self.pressure.verdict().reason.clone(),
            });
        }
        if self.pressure.level() == PressureLevel::Normal {
            self.restore_kv_budgets(plan);
            self.drain_pending(now, plan);
            return;
        }
        if self.pressure.sample().level == PressureLevel::Normal {
            // The level is held (hysteresis) but this sample shows no pressure: nothing more to shed.
            return;
        }
        let cooled = self
            .last_shed_ms
            .is_none_or(|t| now.saturating_sub(t) >= self.config.shed_cooldown_ms);
        if cooled {
            self.shed(now, plan);
        }
    }

    fn on_tick(&mut self, now: u64, plan: &mut Plan) {
        for entry in self.models.values_mut() {
            entry.leases.retain(|_, until| *until > now);
        }
        let expired: Vec<String> = self
            .models
            .values()
            .filter(|e| e.is_idle() && e.keep_alive_expired(now) && e.hold_reason(now).is_none())
            .map(|e| e.spec.name.clone())
            .collect();
        for model in expired {
            self.evict(&model, EvictReason::KeepAlive, plan);
        }
        self.drain_pending(now, plan);
    }

    // ----- mechanisms -----

    /// Reconfigured models: replaced at once when not resident, unloaded once no request runs on them.
    fn settle_replacements(&mut self, now: u64, plan: &mut Plan) {
        let due: Vec<(String, Residency, u32)> = self
            .models
            .values()
            .filter(|e| e.replacement.is_some())
            .map(|e| (e.spec.name.clone(), e.residency, e.in_flight))
            .collect();
        let mut changed = false;
        for (model, residency, in_flight) in due {
            match residency {
                Residency::Unloaded | Residency::Failed => {
                    self.apply_replacement(&model, plan);
                    changed = true;
                }
                Residency::Resident if in_flight == 0 => {
                    self.evict(&model, EvictReason::Reconfigured, plan);
                }
                _ => {}
            }
        }
        if changed {
            self.drain_pending(now, plan);
        }
    }

    /// Replaces or removes an unloaded model as its reconfiguration says; a removed model's waiting and
    /// pending requests are rejected as unknown.
    fn apply_replacement(&mut self, model: &str, plan: &mut Plan) {
        let Some(entry) = self.models.get_mut(model) else {
            return;
        };
        match entry.replacement.take() {
            Some(Replacement::Spec(spec)) => {
                // What was measured of the old files says nothing of the new ones.
                entry.kv_tokens = spec.footprint.context_tokens;
                entry.measured_static = None;
                entry.measured_total = None;
                entry.failure = None;
                entry.load_ms = None;
                if entry.residency == Residency::Failed {
                    entry.residency = Residency::Unloaded;
                }
                entry.adopt(spec);
            }
            Some(Replacement::Remove) => {
                let waiters = self
                    .models
                    .remove(model)
                    .map(|e| e.waiters)
                    .unwrap_or_default();
                let (gone, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.pending)
                    .into_iter()
                    .partition(|(_, m, _)| m == model);
                self.pending = kept;
                for id in waiters
                    .into_iter()
                    .map(|(id, _)| id)
                    .chain(gone.into_iter().map(|(id, _, _)| id))
                {
                    let reason = self.unknown(model);
                    plan.actions.push(Action::Reject { id, reason });
                }
            }
            None => {}
        }
    }

    fn admit(
        &mut self,
        id: RequestId,
        model: &str,
        kind: RequestKind,
        caused_load: bool,
        now: u64,
        plan: &mut Plan,
    ) {
        let gdsf = self.gdsf.clone();
        let Some(entry) = self.models.get_mut(model) else {
            return;
        };
        if kind == RequestKind::Use {
            entry.in_flight += 1;
            entry.requests += 1;
            entry.kv_dropped = false;
        }
        entry.frequency = gdsf.decayed(entry.frequency, entry.frequency_at_ms, now) + 1.0;
        entry.frequency_at_ms = now;
        entry.last_used_ms = Some(now);
        entry.idle_since_ms = now;
        plan.actions.push(Action::Admit {
            id,
            model: model.to_string(),
            caused_load,
        });
    }

    fn evict(&mut self, model: &str, reason: EvictReason, plan: &mut Plan) {
        let Some(entry) = self.models.get_mut(model) else {
            return;
        };
        let bytes = entry.charged();
        entry.residency = Residency::Unloading;
        entry.cache_bytes = 0;
        entry.keep_alive_after = None;
        plan.actions.push(Action::Unload {
            model: model.to_string(),
            reason,
            bytes,
        });
    }

    /// The ceiling the OS allows: what it has available plus what ult already holds, less the headroom.
    /// Because ult's own share is read from the same snapshot, a stale snapshot cannot double-count a load
    /// or an unload that happened since: the ledger tracks those in real time.
    fn os_ceiling(&self) -> u64 {
        match &self.snapshot {
            None => u64::MAX,
            Some(s) => s
                .available_bytes
                .saturating_add(s.process_bytes)
                .saturating_sub(self.config.headroom_bytes),
        }
    }

    /// The lower of the configured ceiling and the OS's.
    pub fn effective_ceiling(&self) -> u64 {
        self.config.ceiling_bytes.min(self.os_ceiling())
    }

    /// Plans a load of `model`: which idle KV budgets to shrink and which models to evict, in that order,
    /// until the load fits under the effective ceiling.
    fn plan_admission(&self, model: &str, now: u64) -> Admission {
        let Some(entry) = self.models.get(model) else {
            return Admission::Refuse(self.unknown(model));
        };
        let need = entry.load_need();
        let ceiling = self.config.ceiling_bytes;
        if need > ceiling {
            return Admission::Refuse(Rejection::LargerThanCeiling {
                model: model.to_string(),
                need,
                ceiling,
            });
        }
        if self.pressure.level() == PressureLevel::Critical {
            return Admission::Refuse(Rejection::Pressure {
                model: model.to_string(),
                reason: self.pressure.verdict().reason.clone(),
            });
        }
        let limit = self.effective_ceiling();
        let mut deficit = need.saturating_add(self.used_bytes()).saturating_sub(limit);
        let resident_after = self
            .models
            .values()
            .filter(|e| matches!(e.residency, Residency::Resident | Residency::Loading))
            .count()
            + 1;
        let mut excess_count = self
            .config
            .max_resident
            .map_or(0, |max| resident_after.saturating_sub(max as usize));

        let mut shrinks = Vec::new();
        let mut victims = Vec::new();
        // Step 1 (shedding only): idle KV caches hold real memory but no ledger bytes, so dropping them
        // does not change this sum. Step 2: shrink idle models' KV budgets toward their minimum, cheapest
        // (lowest score) first.
        if deficit > 0 {
            for (name, _) in self.idle_by_score(now) {
                let Some(e) = self.models.get(&name) else {
                    continue;
                };
                let min = e.spec.min_kv_tokens.min(e.spec.footprint.context_tokens);
                let saved = e
                    .spec
                    .footprint
                    .kv_bytes(e.kv_tokens)
                    .saturating_sub(e.spec.footprint.kv_bytes(min));
                if saved == 0 {
                    continue;
                }
                shrinks.push((name, min));
                deficit = deficit.saturating_sub(saved);
                if deficit == 0 {
                    break;
                }
            }
        }
        // Step 3: evict idle, unpinned, unleased models: the cheapest set that frees enough.
        if deficit > 0 || excess_count > 0 {
            // Shrinking alone did not do it: evict instead (a shrink beside evictions is not needed).
            deficit = need.saturating_add(self.used_bytes()).saturating_sub(limit);
            shrinks.clear();
            let reason = if deficit == 0 {
                EvictReason::MaxResident
            } else {
                EvictReason::MakeRoom
            };
            if let Some(chosen) =
                self.choose_victims(deficit, excess_count, Some(model), now, reason)
            {
                deficit = 0;
                excess_count = 0;
                victims = chosen;
            }
        }
        if deficit == 0 && excess_count == 0 {
            return Admission::Fits { shrinks, victims };
        }
        // Not enough: wait when busy, loading or unloading models will free enough; refuse otherwise.
        let holders = self.holders(now, Some(model));
        let transient: Vec<&Holder> = holders
            .iter()
            .filter(|h| {
                matches!(
                    h.reason,
                    HoldReason::Busy | HoldReason::Loading | HoldReason::Unloading
                )
            })
            .collect();
        let transient_bytes: u64 = transient.iter().map(|h| h.bytes).sum();
        let transient_count = transient
            .iter()
            .filter(|h| h.reason != HoldReason::Unloading)
            .count();
        if !transient.is_empty() && transient_bytes >= deficit && transient_count >= excess_count {
            return Admission::Wait;
        }
        Admission::Refuse(Rejection::Exhausted {
            model: model.to_string(),
            need,
            free: self.free_bytes(),
            holders,
        })
    }

    /// Carries out an admission: shrinks, then evictions; the load itself only when nothing is evicted
    /// (otherwise it starts when the evictions finish).
    fn apply_admission(
        &mut self,
        model: &str,
        shrinks: Vec<(String, u32)>,
        victims: Vec<PlannedVictim>,
        plan: &mut Plan,
    ) {
        for (name, tokens) in shrinks {
            if let Some(e) = self.models.get_mut(&name) {
                e.kv_tokens = tokens;
                plan.actions.push(Action::SetKvBudget {
                    model: name,
                    tokens,
                });
            }
        }
        if !victims.is_empty() {
            for v in victims {
                self.evict(&v.model, v.reason, plan);
            }
            return;
        }
        if let Some(e) = self.models.get_mut(model) {
            e.residency = Residency::Loading;
            e.kv_tokens = e.spec.footprint.context_tokens;
            plan.actions.push(Action::Load {
                model: model.to_string(),
                kv_tokens: e.kv_tokens,
            });
        }
    }

    /// The score of `e` now (see `score.rs`): priority · decayed frequency · reload cost ÷ bytes.
    fn score_of(&self, e: &Entry, now: u64) -> f64 {
        let f = self.gdsf.decayed(e.frequency, e.frequency_at_ms, now);
        self.gdsf.score(
            e.spec.priority,
            f,
            e.reload_cost_ms(self.config.default_load_bandwidth),
            e.charged(),
        )
    }

    /// What evicting `e` risks now: priority · decayed frequency · reload cost.
    fn eviction_cost_of(&self, e: &Entry, now: u64) -> f64 {
        let f = self.gdsf.decayed(e.frequency, e.frequency_at_ms, now);
        self.gdsf.eviction_cost(
            e.spec.priority,
            f,
            e.reload_cost_ms(self.config.default_load_bandwidth),
        )
    }

    /// Idle, unpinned, unleased resident models (except `except`), lowest score first; ties go to the
    /// least recently used, then to the name.
    fn evictable(&self, now: u64, except: Option<&str>) -> Vec<&Entry> {
        let mut out: Vec<(&Entry, f64)> = self
            .models
            .values()
            .filter(|e| Some(e.spec.name.as_str()) != except)
            .filter(|e| e.residency == Residency::Resident && e.hold_reason(now).is_none())
            .map(|e| (e, self.score_of(e, now)))
            .collect();
        out.sort_by(|(a, sa), (b, sb)| {
            sa.total_cmp(sb)
                .then(a.last_used_ms.cmp(&b.last_used_ms))
                .then(a.spec.name.cmp(&b.spec.name))
        });
        out.into_iter().map(|(e, _)| e).collect()
    }

    /// The evictable models whose eviction frees at least `bytes` (and counts at least `count` models)
    /// for the least expected reload cost; None when all of them are not enough.
    fn choose_victims(
        &self,
        bytes: u64,
        count: usize,
        except: Option<&str>,
        now: u64,
        reason: EvictReason,
    ) -> Option<Vec<PlannedVictim>> {
        let candidates = self.evictable(now, except);
        let items: Vec<(u64, f64)> = candidates
            .iter()
            .map(|e| (e.charged(), self.eviction_cost_of(e, now)))
            .collect();
        let chosen = cheapest_cover(&items, bytes, count)?;
        Some(
            chosen
                .into_iter()
                .map(|i| {
                    let e = candidates[i];
                    PlannedVictim {
                        model: e.spec.name.clone(),
                        bytes: e.charged(),
                        score: self.score_of(e, now),
                        reason,
                    }
                })
                .collect(),
        )
    }

    /// Models holding memory that cannot be evicted now, and why.
    fn holders(&self, now: u64, except: Option<&str>) -> Vec<Holder> {
        self.models
            .values()
            .filter(|e| e.residency.holds_memory() && Some(e.spec.name.as_str()) != except)
            .filter_map(|e| {
                e.hold_reason(now).map(|reason| Holder {
                    model: e.spec.name.clone(),
                    bytes: e.charged(),
                    reason,
                })
            })
            .collect()
    }

    /// Sheds in steps under pressure: prefix caches (every resident model's, busy or not), then idle KV
    /// caches, then KV budgets, then (Critical, or inside the headroom) idle models by score. It acts on
    /// the latest sample's own level and deficit: a level held by hysteresis sheds no more than the
    /// sample shows.
    fn shed(&mut self, now: u64, plan: &mut Plan) {
        let (level, deficit) = (
            self.pressure.sample().level,
            self.pressure.sample().deficit_bytes,
        );
        let quantum = match level {
            PressureLevel::Normal => return,
            PressureLevel::Warning => self.config.ceiling_bytes / 20,
            PressureLevel::Critical => self.config.ceiling_bytes / 10,
        };
        let target = deficit.max(quantum);
        let may_evict = level == PressureLevel::Critical || deficit > 0;
        let mut freed = 0u64;
        let mut acted = false;
        // Step 1: prefix caches. They are blocks no sequence holds, so dropping them costs no request
        // anything but a recomputation later. (The memory comes back with the pool: for idle models in
        // the next step, for busy ones when their budget shrinks, which then preempts no one for them.)
        for e in self.models.values_mut() {
            if e.residency == Residency::Resident && e.cache_bytes > 0 {
                plan.actions.push(Action::DropCache {
                    model: e.spec.name.clone(),
                    bytes: e.cache_bytes,
                });
                e.cache_bytes = 0;
                acted = true;
            }
        }
        let idle: Vec<String> = self
            .models
            .values()
            .filter(|e| e.is_idle())
            .map(|e| e.spec.name.clone())
            .collect();
        for name in &idle {
            if let Some(e) = self.models.get_mut(name)
                && !e.kv_dropped
            {
                e.kv_dropped = true;
                freed = freed.saturating_add(e.spec.footprint.kv_bytes(e.kv_tokens));
                plan.actions.push(Action::DropIdleKv {
                    model: name.clone(),
                });
                acted = true;
            }
        }
        if freed < target {
            for name in &idle {
                let Some(e) = self.models.get_mut(name) else {
                    continue;
                };
                let min = e.spec.min_kv_tokens.min(e.spec.footprint.context_tokens);
                if e.kv_tokens > min {
                    e.kv_tokens = min;
                    plan.actions.push(Action::SetKvBudget {
                        model: name.clone(),
                        tokens: min,
                    });
                    acted = true;
                }
            }
        }
        if may_evict && freed < target.max(deficit) {
            // The cheapest set that frees the target; if no set does, every idle model (best effort).
            let victims = self
                .choose_victims(
                    target.saturating_sub(freed),
                    1,
                    None,
                    now,
                    EvictReason::Pressure,
                )
                .unwrap_or_else(|| {
                    self.evictable(now, None)
                        .iter()
                        .map(|e| e.spec.name.clone())
                        .map(|model| PlannedVictim {
                            model,
                            bytes: 0,
                            score: 0.0,
                            reason: EvictReason::Pressure,
                        })
                        .collect()
                });
            for v in victims {
                self.evict(&v.model, EvictReason::Pressure, plan);
                acted = true;
            }
        }
        if acted {
            self.last_shed_ms = Some(now);
        }
    }

    /// With pressure back to normal, gives idle models their full KV budget back where it fits.
    fn restore_kv_budgets(&mut self, plan: &mut Plan) {
        let names: Vec<String> = self
            .models
            .values()
            .filter(|e| e.is_idle() && e.kv_tokens < e.spec.footprint.context_tokens)
            .map(|e| e.spec.name.clone())
            .collect();
        for name in names {
            let free = self.free_bytes();
            let Some(e) = self.models.get_mut(&name) else {
                continue;
            };
            let full = e.spec.footprint.context_tokens;
            let extra = e.spec.footprint.kv_bytes(full) - e.spec.footprint.kv_bytes(e.kv_tokens);
            if extra <= free {
                e.kv_tokens = full;
                plan.actions.push(Action::SetKvBudget {
                    model: name,
                    tokens: full,
                });
            }
        }
    }

    /// Retries requests waiting for memory, first come first served: the head blocks the rest.
    fn drain_pending(&mut self, now: u64, plan: &mut Plan) {
        while let Some((id, model, kind)) = self.pending.front().cloned() {
            let residency = self.models.get(&model).map(|e| e.residency);
            match residency {
                Some(Residency::Resident) => {
                    self.pending.pop_front();
                    self.admit(id, &model, kind, false, now, plan);
                    continue;
                }
                Some(Residency::Loading | Residency::Unloading) => {
                    self.pending.pop_front();
                    if let Some(e) = self.models.get_mut(&model) {
                        e.waiters.push((id, kind));
                    }
                    continue;
                }
                _ => {}
            }
            match self.plan_admission(&model, now) {
                Admission::Fits { shrinks, victims } => {
                    let evicting = !victims.is_empty();
                    self.apply_admission(&model, shrinks, victims, plan);
                    if evicting {
                        // Wait for the evictions; the head keeps its place.
                        break;
                    }
                    // Every request queued for this model rides on this one load.
                    let mut kept = VecDeque::new();
                    for (pid, m, k) in std::mem::take(&mut self.pending) {
                        if m == model {
                            if let Some(e) = self.models.get_mut(&m) {
                                e.waiters.push((pid, k));
                                e.load_started_by_request = true;
                            }
                        } else {
                            kept.push_back((pid, m, k));
                        }
                    }
                    self.pending = kept;
                }
                Admission::Wait => break,
                Admission::Refuse(reason) => {
                    self.pending.pop_front();
                    plan.actions.push(Action::Reject { id, reason });
                }
            }
        }
    }

    fn unknown(&self, model: &str) -> Rejection {
        Rejection::UnknownModel {
            name: model.to_string(),
            known: self.models.keys().cloned().collect(),
        }
    }

    fn entry(&self, model: &str) -> Result<&Entry, Rejection> {
        self.models.get(model).ok_or_else(|| self.unknown(model))
    }

    fn entry_mut(&mut self, model: &str) -> Result<&mut Entry, Rejection> {
        let unknown = self.unknown(model);
        self.models.get_mut(model).ok_or(unknown)
    }

    /// Idle resident models (pinned or not), lowest score first.
    fn idle_by_score(&self, now: u64) -> Vec<(String, f64)> {
        let mut out: Vec<(&Entry, f64)> = self
            .models
            .values()
            .filter(|e| e.is_idle())
            .map(|e| (e, self.score_of(e, now)))
            .collect();
        out.sort_by(|(a, sa), (b, sb)| {
            sa.total_cmp(sb)
                .then(a.last_used_ms.cmp(&b.last_used_ms))
                .then(a.spec.name.cmp(&b.spec.name))
        });
        out.into_iter()
            .map(|(e, score)| (e.spec.name.clone(), score))
            .collect()
    }

    fn view(&self, e: &Entry, now: u64) -> ModelView {
        let queued = e.waiters.len()
            + self
                .pending
                .iter()
                .filter(|(_, m, _)| *m == e.spec.name)
                .count();
        ModelView {
            name: e.spec.name.clone(),
            residency: e.residency,
            pinned: e.pinned,
            predicted_bytes: e.spec.footprint.total(),
            measured_bytes: e.measured_total,
            charged_bytes: if e.residency.holds_memory() {
                e.charged()
            } else {
                0
            },
            kv_tokens: e.kv_tokens,
            kv_dropped: e.kv_dropped,
            cache_bytes: e.cache_bytes,
            in_flight: e.in_flight,
            queued: u32::try_from(queued).unwrap_or(u32::MAX),
            leases: u32::try_from(e.active_leases(now)).unwrap_or(u32::MAX),
            score: self.score_of(e, now),
            last_used_ms: e.last_used_ms,
            idle_ms: (e.is_idle()).then(|| now.saturating_sub(e.idle_since_ms)),
            failure: e.failure.as_ref().map(|f| f.reason.clone()),
            load_ms: e.load_ms,
            loads: e.loads,
            requests: e.requests,
            keep_alive: e.keep_alive_after.unwrap_or(e.spec.keep_alive),
            priority: e.spec.priority,
            footprint: e.spec.footprint,
        }
    }
}

impl Entry {
    fn keep_alive_expired(&self, now: u64) -> bool {
        match self.keep_alive_after.unwrap_or(self.spec.keep_alive) {
            KeepAlive::Forever => false,
            KeepAlive::Millis(ms) => now.saturating_sub(self.idle_since_ms) >= ms,
        }
    }
}

#[cfg(test)]
mod pressure_tests {
    //! The governor's pressure level follows [`PressureTracker`]: one change for a signal hovering at
    //! the headroom, up at once, down after the dwell, and no shedding while a calm sample only holds it.
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn sample(governor: &mut Governor, available_mib: u64, now: u64) -> Vec<Action> {
        let s = MemorySnapshot {
            total_bytes: 64 * GIB,
            available_bytes: available_mib * MIB,
            ..Default::default()
        };
        governor.handle(Event::Snapshot(s), now).actions
    }

    fn changes(actions: &[Action]) -> Vec<PressureLevel> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::PressureChanged { level, .. } => Some(*level),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn level_changes_follow_the_hysteresis() {
        let mut g = Governor::new(
            GovernorConfig::new(40 * GIB, 4 * GIB),
            [ModelSpec::weights_only("a", GIB)],
        );
        // Around the 4 GiB headroom every 500 ms for 10 s.
        let trace = [
            4300, 4010, 4150, 3980, 4120, 4230, 3950, 4060, 4180, 3990, 4210, 4080, 3970, 4140,
            4260, 4020, 4190, 3940, 4110, 4240,
        ];
        let mut seen = Vec::new();
        for (i, mib) in trace.into_iter().enumerate() {
            seen.extend(changes(&sample(&mut g, mib, i as u64 * 500)));
        }
        assert_eq!(seen, vec![PressureLevel::Warning]);
        // A fall under half the headroom is critical on that sample.
        assert_eq!(
            changes(&sample(&mut g, 1500, 10_000)),
            vec![PressureLevel::Critical]
        );
        // Memory comes back: the level holds for the 5 s dwell, loads stay refused, and the calm samples
        // shed nothing more.
        for t in (10_500..15_000).step_by(500) {
            let actions = sample(&mut g, 30_000, t);
            assert!(actions.is_empty(), "at {t}: {actions:?}");
        }
        assert_eq!(g.verdict().level, PressureLevel::Critical);
        assert!(
            g.verdict().reason.contains("recovering"),
            "{:?}",
            g.verdict()
        );
        assert_eq!(g.verdict().deficit_bytes, 0);
        let load = g.handle(
            Event::Request {
                id: RequestId(1),
                model: "a".into(),
                kind: RequestKind::Load,
            },
            14_900,
        );
        assert!(
            load.actions
                .iter()
                .any(|a| matches!(a, Action::Reject { .. })),
            "{load:?}"
        );
        assert_eq!(
            changes(&sample(&mut g, 30_000, 15_000)),
            vec![PressureLevel::Normal]
        );
        // With a dwell of 0 the fall is immediate (still past the 10% band).
        let mut config = GovernorConfig::new(40 * GIB, 4 * GIB);
        config.pressure_dwell_ms = 0;
        let mut g = Governor::new(config, Vec::new());
        assert_eq!(
            changes(&sample(&mut g, 3000, 0)),
            vec![PressureLevel::Warning]
        );
        assert!(
            changes(&sample(&mut g, 4400, 1)).is_empty(),
            "inside the band"
        );
        assert_eq!(
            changes(&sample(&mut g, 4600, 2)),
            vec![PressureLevel::Normal]
        );
    }
}
