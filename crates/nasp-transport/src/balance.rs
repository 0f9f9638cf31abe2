//! Picking an endpoint of a cluster for one request or connection.
//!
//! Which endpoints take traffic, as Envoy decides it: each priority level's
//! health is `min(100 %, overprovisioning factor × healthy / total)`; levels
//! take traffic in order up to their health (normalized when the levels
//! together are under 100 %), so a half-healthy level 0 with the default
//! factor 1.4 keeps 70 % and spills 30 % to level 1. A level with fewer
//! than 50 % healthy hosts is in panic and balances over all of them (and
//! with nothing healthy anywhere, level 0 takes everything in panic). With
//! `locality_weighted_lb_config`, a level's traffic is split between its
//! localities by `load_balancing_weight × min(1, factor × healthy / total)`
//! (a locality without a weight takes none, as in Envoy). Within the chosen
//! set the policy picks.
//!
//! How one is picked, by the cluster's `lb_policy`:
//! - `ROUND_ROBIN` (Envoy's default): in turn, weights respected by a
//!   precomputed interleaved schedule;
//! - `LEAST_REQUEST`: the power of two choices, two random endpoints and
//!   the one with fewer requests in flight (scaled by weight), as Envoy's
//!   default `choice_count: 2`;
//! - `RANDOM`: weighted random;
//! - others (`RING_HASH`, `MAGLEV`, …): round robin for now (issue 9).
//!
//! A retry may ask to avoid hosts already tried (Istio sets Envoy's
//! `previous_hosts` predicate): they are skipped while others exist.
//!
//! tower's `balance::p2c` was considered: it has no round robin, no
//! weights and no way to exclude hosts for a retry, and needs a `Buffer`
//! task in front of it; the per-endpoint state here is an atomic counter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use nasp_xds::cluster::{ClusterInfo, HealthStatus, OutlierSettings};

/// The policies this balancer implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Round robin (weighted).
    RoundRobin,
    /// Power of two choices on requests in flight.
    LeastRequest,
    /// Weighted random.
    Random,
    /// Ketama-style consistent hashing on a ring (Envoy's `RING_HASH`).
    RingHash,
    /// Maglev consistent hashing (Envoy's `MAGLEV`).
    Maglev,
}

impl Policy {
    /// The policy for an Envoy `lb_policy` name.
    pub fn from_envoy(name: &str) -> Self {
        match name {
            "LEAST_REQUEST" => Policy::LeastRequest,
            "RANDOM" => Policy::Random,
            "RING_HASH" => Policy::RingHash,
            "MAGLEV" => Policy::Maglev,
            _ => Policy::RoundRobin,
        }
    }
}

/// Envoy's hash function for load balancing (xxHash64, seed 0).
pub fn xx_hash64(data: &[u8]) -> u64 {
    twox_hash::XxHash64::oneshot(0, data)
}

/// A ring of `(hash, member)` sorted by hash, built as Envoy's ring hash:
/// each host gets a share of the ring by weight (at least the minimum ring
/// size over all), each point the xxHash64 of `"<address>_<i>"`.
fn build_ring(members: &[&Member], (min_size, max_size): (u64, u64)) -> Vec<(u64, u32)> {
    let total: f64 = members.iter().map(|m| f64::from(m.weight.max(1))).sum();
    if members.is_empty() || total == 0.0 {
        return Vec::new();
    }
    let min_norm = members
        .iter()
        .map(|m| f64::from(m.weight.max(1)) / total)
        .fold(f64::INFINITY, f64::min);
    let scale = ((min_norm * min_size as f64).ceil() / min_norm).min(max_size.max(min_size) as f64);
    let mut ring = Vec::new();
    let mut target = 0.0;
    let mut placed = 0u64;
    for (i, m) in members.iter().enumerate() {
        // Envoy spreads rounding over hosts: each host's points are the
        // running target's floor minus what is already placed.
        target += scale * f64::from(m.weight.max(1)) / total;
        let n = (target.floor() as u64).saturating_sub(placed);
        let mut key = m.addr.to_string();
        key.push('_');
        let base = key.len();
        for j in 0..n {
            use std::fmt::Write as _;
            key.truncate(base);
            let _ = write!(key, "{j}");
            ring.push((xx_hash64(key.as_bytes()), i as u32));
        }
        placed += n;
    }
    ring.sort_unstable();
    ring
}

/// A Maglev lookup table built as Envoy builds it: each host's preference
/// list from offset `xxHash64(address, 0) % M` and skip
/// `xxHash64(address, 1) % (M − 1) + 1`, filled in turns proportional to
/// weight.
fn build_maglev(members: &[&Member], size: u64) -> Vec<u32> {
    if members.is_empty() {
        return Vec::new();
    }
    struct Entry {
        /// The next slot of its permutation: `(offset + skip × next) mod M`,
        /// kept incrementally (one add and compare per step, no division).
        pos: u64,
        skip: u64,
        weight: f64,
        target: f64,
    }
    let total: f64 = members.iter().map(|m| f64::from(m.weight.max(1))).sum();
    let mut entries: Vec<Entry> = members
        .iter()
        .map(|m| {
            let a = m.addr.to_string();
            Entry {
                pos: twox_hash::XxHash64::oneshot(0, a.as_bytes()) % size,
                skip: twox_hash::XxHash64::oneshot(1, a.as_bytes()) % (size - 1) + 1,
                weight: f64::from(m.weight.max(1)) / total,
                target: 0.0,
            }
        })
        .collect();
    let max_weight = entries.iter().map(|e| e.weight).fold(0.0, f64::max);
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    let mut iteration = 0u64;
    while filled < size {
        for (i, e) in entries.iter_mut().enumerate() {
            if filled >= size {
                break;
            }
            if (iteration as f64) * e.weight < e.target {
                continue;
            }
            e.target += max_weight;
            let step = |p: u64| {
                let n = p + e.skip;
                if n >= size { n - size } else { n }
            };
            while table[e.pos as usize] != u32::MAX {
                e.pos = step(e.pos);
            }
            table[e.pos as usize] = i as u32;
            e.pos = step(e.pos);
            filled += 1;
        }
        iteration += 1;
    }
    table
}

/// One endpoint taking part in balancing: what balancing reads of it, and
/// its index in the cluster's `endpoints` for the rest (TLS, locality).
#[derive(Debug)]
pub(crate) struct Member {
    pub addr: SocketAddr,
    /// Index into `ClusterInfo::endpoints`.
    pub idx: usize,
    pub weight: u32,
    pub priority: u32,
    pub healthy: bool,
    pub degraded: bool,
    pub locality_weight: Option<u32>,
    pub in_flight: Arc<AtomicUsize>,
    pub outlier: Arc<OutlierState>,
}

/// What an attempt to an endpoint ended with, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The endpoint answered with this status.
    Status(u16),
    /// No answer: connect failure, reset or timeout (a local-origin error).
    LocalFailure,
}

/// Outlier-detection state of one endpoint (Envoy's consecutive
/// detectors), kept across cluster updates by address.
#[derive(Debug, Default)]
pub(crate) struct OutlierState {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// Times ejected so far (the ejection time grows with it).
    ejections: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl OutlierState {
    fn is_ejected(&self, now: Instant) -> bool {
        let mut until = self
            .ejected_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match *until {
            Some(t) if t > now => true,
            Some(_) => {
                // Back in: counters start afresh, as Envoy's un-ejection.
                *until = None;
                self.consecutive_5xx.store(0, Ordering::Relaxed);
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                self.consecutive_local.store(0, Ordering::Relaxed);
                false
            }
            None => false,
        }
    }

    fn eject(&self, s: &OutlierSettings, now: Instant) {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let time = s
            .base_ejection_time
            .saturating_mul(n)
            .min(s.max_ejection_time.max(s.base_ejection_time));
        *self
            .ejected_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(now + time);
    }
}

/// Per-cluster request accounting for circuit breakers, kept across
/// cluster updates by name.
#[derive(Debug, Default)]
pub(crate) struct ClusterCounters {
    /// Requests in flight.
    pub requests: AtomicUsize,
    /// Retries in flight.
    pub retries: AtomicUsize,
    /// Upstream connections open.
    pub connections: AtomicUsize,
    /// Requests waiting for a connection.
    pub pending: AtomicUsize,
}

/// Envoy's circuit-breaker defaults when a cluster sets none: 1024
/// connections, pending requests and requests, 3 retries.
pub(crate) const DEFAULT_CIRCUIT_BREAKERS: (u32, u32, u32, u32) = (1024, 1024, 1024, 3);

/// Holds one unit of a counter until dropped.
#[derive(Debug)]
pub(crate) struct Slot(Arc<ClusterCounters>, fn(&ClusterCounters) -> &AtomicUsize);

impl Slot {
    /// Takes a unit if fewer than `max` are taken.
    pub(crate) fn try_take(
        c: &Arc<ClusterCounters>,
        pick: fn(&ClusterCounters) -> &AtomicUsize,
        max: u32,
    ) -> Option<Self> {
        let counter = pick(c);
        let prev = counter.fetch_add(1, Ordering::AcqRel);
        if prev >= max as usize {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(c.clone(), pick))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        (self.1)(&self.0).fetch_sub(1, Ordering::AcqRel);
    }
}

/// The balancing state of one cluster, for one version of it.
#[derive(Debug)]
pub(crate) struct ClusterLb {
    pub info: Arc<ClusterInfo>,
    /// Circuit-breaker accounting of the cluster.
    pub counters: Arc<ClusterCounters>,
    members: Vec<Member>,
    /// The sets balanced over (levels, localities).
    sets: Vec<HostSet>,
    /// Priority levels: cumulative share of traffic (percent) and how the
    /// level's share is spread.
    levels: Vec<(u64, LevelChoice)>,
    policy: Policy,
    /// Ring hash: sorted `(hash, member)`.
    ring: Vec<(u64, u32)>,
    /// Maglev: member per table slot.
    maglev: Vec<u32>,
}

/// One set of endpoints balanced together: a priority level, or one
/// locality of it, with its own round-robin schedule.
#[derive(Debug)]
struct HostSet {
    /// Indices into the cluster's members.
    idx: Vec<usize>,
    /// Round-robin schedule (indices into the members), repeated by weight.
    schedule: Vec<usize>,
    cursor: AtomicUsize,
    total_weight: u64,
    /// Running sums of the weights, for a weighted random pick by binary
    /// search.
    cumulative: Vec<u64>,
}

impl HostSet {
    fn new(members: &[Member], idx: Vec<usize>) -> Self {
        let g = idx
            .iter()
            .map(|i| members[*i].weight.max(1))
            .fold(0, gcd)
            .max(1);
        // Interleave: in each round, every member whose remaining weight is
        // positive gets a slot, so weights 3:1 give a b a a rather than a
        // block. Capped so a huge weight cannot blow memory up.
        let mut left: Vec<u32> = idx
            .iter()
            .map(|i| (members[*i].weight.max(1) / g).min(1000))
            .collect();
        let mut schedule = Vec::new();
        while left.iter().any(|w| *w > 0) {
            for (k, w) in left.iter_mut().enumerate() {
                if *w > 0 {
                    schedule.push(idx[k]);
                    *w -= 1;
                }
            }
        }
        let mut cumulative = Vec::with_capacity(idx.len());
        let mut total_weight = 0u64;
        for i in &idx {
            total_weight += u64::from(members[*i].weight.max(1));
            cumulative.push(total_weight);
        }
        Self {
            idx,
            schedule,
            cursor: AtomicUsize::new(rand::random::<u32>() as usize),
            total_weight,
            cumulative,
        }
    }
}

/// How a priority level's share of traffic is spread.
#[derive(Debug)]
enum LevelChoice {
    /// Over one set.
    Single(usize),
    /// Over its localities by effective weight: `(cumulative weight, set)`.
    Localities(Vec<(u64, usize)>),
}

/// Splits the members into priority levels and localities as Envoy does:
/// each level's health is `min(100, overprovisioning × healthy / total)`,
/// levels take traffic in order up to their health (normalized when the
/// total is under 100), a level in panic balances over all its hosts, and
/// with locality-weighted balancing a level's traffic is split by
/// `locality weight × min(1, overprovisioning × healthy / total)`.
fn plan(info: &ClusterInfo, members: &[Member]) -> (Vec<HostSet>, Vec<(u64, LevelChoice)>) {
    let over = u64::from(info.overprovisioning_factor.max(1));
    let mut priorities: Vec<u32> = members.iter().map(|m| m.priority).collect();
    priorities.sort_unstable();
    priorities.dedup();
    let mut sets = Vec::new();
    let mut levels: Vec<(u64, bool, Vec<usize>, Vec<usize>)> = Vec::new();
    for p in priorities {
        let all: Vec<usize> = (0..members.len())
            .filter(|i| members[*i].priority == p)
            .collect();
        let healthy: Vec<usize> = all
            .iter()
            .copied()
            .filter(|i| members[*i].healthy)
            .collect();
        let total = all.len() as u64;
        let health = (over * healthy.len() as u64 / total.max(1)).min(100);
        let panic = (healthy.len() as f64) * 100.0 < info.healthy_panic_threshold * total as f64;
        levels.push((health, panic, all, healthy));
    }
    let sum: u64 = levels.iter().map(|l| l.0).sum::<u64>().min(100);
    if sum == 0 && info.healthy_panic_threshold <= 0.0 {
        // Nothing healthy and panic mode disabled (Istio with outlier
        // detection): nothing takes traffic, answered 503 `UH`.
        return (Vec::new(), Vec::new());
    }
    let mut plans = Vec::new();
    let mut remaining = 100u64;
    let mut cumulative = 0u64;
    for (i, (health, panic, all, healthy)) in levels.into_iter().enumerate() {
        let load = match (health.min(remaining) * 100).checked_div(sum) {
            Some(l) => {
                remaining = remaining.saturating_sub(health.min(remaining));
                l
            }
            // Nothing healthy anywhere: everything to the first level, in
            // panic.
            None if i == 0 => 100,
            None => 0,
        };
        if load == 0 {
            continue;
        }
        cumulative += load;
        let degraded: Vec<usize> = all
            .iter()
            .copied()
            .filter(|i| members[*i].degraded)
            .collect();
        let chosen = if panic || sum == 0 {
            if healthy.is_empty() && !degraded.is_empty() {
                degraded
            } else {
                all
            }
        } else {
            healthy
        };
        let choice = if info.locality_weighted_lb && !(panic || sum == 0) {
            let mut by_locality: Vec<(String, Vec<usize>)> = Vec::new();
            for i in &chosen {
                let loc = &info.endpoints[members[*i].idx].locality;
                match by_locality.iter_mut().find(|(l, _)| l == loc) {
                    Some((_, v)) => v.push(*i),
                    None => by_locality.push((loc.clone(), vec![*i])),
                }
            }
            let mut cum = 0u64;
            let mut list = Vec::new();
            for (loc, idx) in by_locality {
                let in_locality = members
                    .iter()
                    .filter(|m| m.priority == members[idx[0]].priority)
                    .filter(|m| info.endpoints[m.idx].locality == loc)
                    .count() as u64;
                let weight = u64::from(members[idx[0]].locality_weight.unwrap_or(0));
                let avail = (over * idx.len() as u64 / in_locality.max(1)).min(100);
                let eff = weight * avail;
                if eff == 0 {
                    continue;
                }
                cum += eff;
                sets.push(HostSet::new(members, idx));
                list.push((cum, sets.len() - 1));
            }
            if list.is_empty() {
                // No locality has a weight: Envoy would send nothing; the
                // level's hosts are used rather than failing every request.
                sets.push(HostSet::new(members, chosen));
                LevelChoice::Single(sets.len() - 1)
            } else {
                LevelChoice::Localities(list)
            }
        } else {
            sets.push(HostSet::new(members, chosen));
            LevelChoice::Single(sets.len() - 1)
        };
        plans.push((cumulative, choice));
    }
    (sets, plans)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl ClusterLb {
    /// Balancing over `info`'s endpoints, keeping the in-flight counters of
    /// `previous` for endpoints that remain.
    pub(crate) fn new(info: Arc<ClusterInfo>, previous: Option<&ClusterLb>) -> Self {
        let old: HashMap<SocketAddr, (Arc<AtomicUsize>, Arc<OutlierState>)> = previous
            .map(|p| {
                p.members
                    .iter()
                    .map(|m| (m.addr, (m.in_flight.clone(), m.outlier.clone())))
                    .collect()
            })
            .unwrap_or_default();
        let members: Vec<Member> = info
            .endpoints
            .iter()
            .enumerate()
            .filter_map(|(idx, e)| {
                let addr: SocketAddr = e.address.parse().ok()?;
                let (in_flight, outlier) = old.get(&addr).cloned().unwrap_or_default();
                Some(Member {
                    addr,
                    idx,
                    weight: e.weight,
                    priority: e.priority,
                    healthy: e.healthy,
                    degraded: e.health == HealthStatus::Degraded,
                    locality_weight: e.locality_weight,
                    in_flight,
                    outlier,
                })
            })
            .collect();
        let (sets, levels) = plan(&info, &members);
        let policy = Policy::from_envoy(&info.lb_policy);
        // Hashing is over the endpoints that take traffic.
        let mut hashed: Vec<usize> = sets.iter().flat_map(|s| s.idx.iter().copied()).collect();
        hashed.sort_unstable();
        hashed.dedup();
        let hashed_members: Vec<&Member> = hashed.iter().map(|i| &members[*i]).collect();
        let ring = if policy == Policy::RingHash {
            build_ring(&hashed_members, info.ring_size)
                .into_iter()
                .map(|(h, k)| (h, hashed[k as usize] as u32))
                .collect()
        } else {
            Vec::new()
        };
        let maglev = if policy == Policy::Maglev {
            build_maglev(&hashed_members, info.maglev_table_size)
                .into_iter()
                .map(|k| hashed[k as usize] as u32)
                .collect()
        } else {
            Vec::new()
        };
        Self {
            policy,
            ring,
            maglev,
            counters: previous.map(|p| p.counters.clone()).unwrap_or_default(),
            info,
            members,
            sets,
            levels,
        }
    }

    /// Whether no endpoint takes traffic.
    pub(crate) fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Picks an endpoint, avoiding `exclude` and ejected outliers while
    /// another one exists.
    pub(crate) fn pick(&self, exclude: &[SocketAddr]) -> Option<&Member> {
        self.pick_hashed(exclude, None)
    }

    /// As [`Self::pick`], with the request's hash for ring hash and Maglev
    /// (no hash: a random endpoint, as Envoy).
    pub(crate) fn pick_hashed(&self, exclude: &[SocketAddr], hash: Option<u64>) -> Option<&Member> {
        if self.members.is_empty() {
            return None;
        }
        let ejected: Vec<SocketAddr> = if self.info.outlier_detection.is_some() {
            let now = Instant::now();
            self.members
                .iter()
                .filter(|m| m.outlier.is_ejected(now))
                .map(|m| m.addr)
                .collect()
        } else {
            Vec::new()
        };
        // Every endpoint ejected: all of them (Envoy's panic mode).
        let ejected: &[SocketAddr] = if ejected.len() == self.members.len() {
            &[]
        } else {
            &ejected
        };
        let allowed = |m: &Member| !exclude.contains(&m.addr) && !ejected.contains(&m.addr);
        let any_allowed = exclude.is_empty() || self.members.iter().any(allowed);
        let ok = |m: &Member| !any_allowed || allowed(m);
        match self.policy {
            Policy::RingHash | Policy::Maglev if hash.is_some() => {
                let h = hash.unwrap_or_default();
                if self.policy == Policy::RingHash {
                    if self.ring.is_empty() {
                        return None;
                    }
                    // The first point at or after the hash, wrapping; a
                    // retry walks on to the next host that may be used.
                    let start = self.ring.partition_point(|(p, _)| *p < h);
                    (0..self.ring.len())
                        .map(|k| &self.members[self.ring[(start + k) % self.ring.len()].1 as usize])
                        .find(|m| ok(m))
                } else {
                    if self.maglev.is_empty() {
                        return None;
                    }
                    let size = self.maglev.len() as u64;
                    (0..size.min(64))
                        .map(|k| {
                            &self.members
                                [self.maglev[((h.wrapping_add(k)) % size) as usize] as usize]
                        })
                        .find(|m| ok(m))
                        .or_else(|| self.members.iter().find(|m| ok(m)))
                }
            }
            _ => {
                let set = self.choose_set()?;
                self.pick_in(set, &ok).or_else(|| {
                    // Nothing usable in the chosen set (all tried or
                    // ejected): any set that takes traffic, then anyone.
                    self.sets
                        .iter()
                        .flat_map(|s| s.idx.iter())
                        .map(|i| &self.members[*i])
                        .find(|m| ok(m))
                        .or_else(|| self.members.iter().find(|m| ok(m)))
                })
            }
        }
    }

    /// The set this request goes to: a priority level by its share, then a
    /// locality by its effective weight.
    fn choose_set(&self) -> Option<&HostSet> {
        // One level spread over one set (the usual case): no dice.
        if let [(_, LevelChoice::Single(id))] = self.levels.as_slice() {
            return self.sets.get(*id);
        }
        let r = rand::random_range(0..100u64);
        let (_, choice) = self
            .levels
            .iter()
            .find(|(cum, _)| r < *cum)
            .or_else(|| self.levels.last())?;
        let id = match choice {
            LevelChoice::Single(id) => *id,
            LevelChoice::Localities(list) => {
                let total = list.last().map_or(1, |(c, _)| *c).max(1);
                let r = rand::random_range(0..total);
                list.iter()
                    .find(|(c, _)| r < *c)
                    .map_or(list[0].1, |(_, id)| *id)
            }
        };
        self.sets.get(id)
    }

    fn pick_in(&self, set: &HostSet, ok: &dyn Fn(&Member) -> bool) -> Option<&Member> {
        if set.idx.is_empty() {
            return None;
        }
        match self.policy {
            Policy::RoundRobin => {
                for _ in 0..set.schedule.len() {
                    let n = set.cursor.fetch_add(1, Ordering::Relaxed) % set.schedule.len();
                    let m = &self.members[set.schedule[n]];
                    if ok(m) {
                        return Some(m);
                    }
                }
                None
            }
            Policy::Random | Policy::RingHash | Policy::Maglev => {
                for _ in 0..8 {
                    let m = self.weighted_random(set);
                    if ok(m) {
                        return Some(m);
                    }
                }
                set.idx.iter().map(|i| &self.members[*i]).find(|m| ok(m))
            }
            Policy::LeastRequest => {
                let load = |m: &Member| {
                    // Fewer requests per unit of weight wins.
                    (m.in_flight.load(Ordering::Relaxed) as u64 + 1) * 1_000_000
                        / u64::from(m.weight.max(1))
                };
                // The common case without an allocation: two distinct
                // random members that may both be used.
                if set.idx.len() >= 2 {
                    let n = set.idx.len();
                    let a = rand::random_range(0..n);
                    let mut b = rand::random_range(0..n - 1);
                    if b >= a {
                        b += 1;
                    }
                    let (ma, mb) = (&self.members[set.idx[a]], &self.members[set.idx[b]]);
                    if ok(ma) && ok(mb) {
                        return Some(if load(mb) < load(ma) { mb } else { ma });
                    }
                }
                let candidates: Vec<&Member> = set
                    .idx
                    .iter()
                    .map(|i| &self.members[*i])
                    .filter(|m| ok(m))
                    .collect();
                match candidates.len() {
                    0 => None,
                    1 => Some(candidates[0]),
                    n => {
                        let a = rand::random_range(0..n);
                        let mut b = rand::random_range(0..n - 1);
                        if b >= a {
                            b += 1;
                        }
                        let (ma, mb) = (candidates[a], candidates[b]);
                        Some(if load(mb) < load(ma) { mb } else { ma })
                    }
                }
            }
        }
    }

    /// Records what an attempt to `addr` ended with: Envoy's consecutive
    /// 5xx, gateway-failure and local-origin detectors, ejection for
    /// `base_ejection_time × ejections` (at most `max_ejection_time`), never
    /// more than `max_ejection_percent` of the endpoints at once (but one,
    /// as Envoy ejects at least one).
    pub(crate) fn report(&self, addr: SocketAddr, outcome: Outcome) {
        let Some(s) = &self.info.outlier_detection else {
            return;
        };
        let Some(m) = self.members.iter().find(|m| m.addr == addr) else {
            return;
        };
        let o = &m.outlier;
        let bump = |c: &AtomicU32| c.fetch_add(1, Ordering::Relaxed) + 1;
        let mut eject = false;
        match outcome {
            Outcome::Status(code) if code >= 500 => {
                let n5 = bump(&o.consecutive_5xx);
                eject |= s.ejects_on_5xx() && n5 >= s.consecutive_5xx;
                if matches!(code, 502..=504) {
                    let ng = bump(&o.consecutive_gateway);
                    eject |= s.ejects_on_gateway_failure() && ng >= s.consecutive_gateway_failure;
                } else {
                    o.consecutive_gateway.store(0, Ordering::Relaxed);
                }
            }
            Outcome::Status(_) => {
                o.consecutive_5xx.store(0, Ordering::Relaxed);
                o.consecutive_gateway.store(0, Ordering::Relaxed);
                if !s.split_external_local_origin_errors {
                    o.consecutive_local.store(0, Ordering::Relaxed);
                }
            }
            Outcome::LocalFailure if s.split_external_local_origin_errors => {
                let nl = bump(&o.consecutive_local);
                eject |= s.enforcing_consecutive_local_origin_failure > 0
                    && s.consecutive_local_origin_failure > 0
                    && nl >= s.consecutive_local_origin_failure;
            }
            Outcome::LocalFailure => {
                // Not split: a local-origin failure counts as a gateway
                // failure (Envoy maps it to 503).
                let n5 = bump(&o.consecutive_5xx);
                let ng = bump(&o.consecutive_gateway);
                eject |= (s.ejects_on_5xx() && n5 >= s.consecutive_5xx)
                    || (s.ejects_on_gateway_failure() && ng >= s.consecutive_gateway_failure);
            }
        }
        if !eject {
            return;
        }
        let now = Instant::now();
        if o.is_ejected(now) {
            return;
        }
        let ejected = self
            .members
            .iter()
            .filter(|m| m.outlier.is_ejected(now))
            .count();
        let cap = self.members.len() * s.max_ejection_percent.min(100) as usize / 100;
        if ejected >= cap.max(1) {
            return;
        }
        o.eject(s, now);
        o.consecutive_5xx.store(0, Ordering::Relaxed);
        o.consecutive_gateway.store(0, Ordering::Relaxed);
        o.consecutive_local.store(0, Ordering::Relaxed);
        tracing::info!(%addr, cluster = %self.info.name, "outlier ejected");
    }

    fn weighted_random(&self, set: &HostSet) -> &Member {
        let n = rand::random_range(0..set.total_weight.max(1));
        let k = set.cumulative.partition_point(|c| *c <= n);
        &self.members[set.idx[k.min(set.idx.len() - 1)]]
    }
}

/// A cluster's balancer on its own, for embedders with their own
/// connection handling (and for the benchmarks): the same choice the
/// client makes, endpoint addresses out.
#[derive(Debug)]
pub struct Balancer(ClusterLb);

impl Balancer {
    /// A balancer over `info`'s endpoints (builds the ring or Maglev table
    /// when the policy needs one).
    pub fn new(info: Arc<ClusterInfo>) -> Self {
        Self(ClusterLb::new(info, None))
    }

    /// The same cluster after an update, keeping request counts and outlier
    /// state of endpoints that remain.
    pub fn update(&self, info: Arc<ClusterInfo>) -> Self {
        Self(ClusterLb::new(info, Some(&self.0)))
    }

    /// An endpoint for a request with this hash (ring hash / Maglev; `None`
    /// for the other policies), avoiding `exclude` while others exist.
    pub fn pick(&self, hash: Option<u64>, exclude: &[SocketAddr]) -> Option<SocketAddr> {
        self.0.pick_hashed(exclude, hash).map(|m| m.addr)
    }
}

/// The balancers of every cluster seen, rebuilt when xDS changes a cluster.
#[derive(Debug, Default)]
pub(crate) struct Balancers {
    map: Mutex<HashMap<String, Arc<ClusterLb>>>,
}

impl Balancers {
    /// The balancer for this version of a cluster.
    pub(crate) fn get(&self, info: &Arc<ClusterInfo>) -> Arc<ClusterLb> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(lb) = map.get(&info.name)
            && Arc::ptr_eq(&lb.info, info)
        {
            return lb.clone();
        }
        let lb = Arc::new(ClusterLb::new(
            info.clone(),
            map.get(&info.name).map(|l| &**l),
        ));
        map.insert(info.name.clone(), lb.clone());
        lb
    }
}

/// Counts a request in flight on an endpoint until dropped.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub(crate) fn start(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nasp_xds::cluster::Endpoint;

    fn ep(addr: &str, weight: u32, healthy: bool, priority: u32) -> Endpoint {
        Endpoint {
            address: addr.into(),
            weight,
            locality: String::new(),
            locality_weight: None,
            priority,
            healthy,
            health: if healthy {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unhealthy
            },
            istio_mtls: true,
            tls_mode: None,
        }
    }

    fn cluster(policy: &str, endpoints: Vec<Endpoint>) -> Arc<ClusterInfo> {
        Arc::new(ClusterInfo {
            name: "c".into(),
            sni: None,
            tls: false,
            permissive: false,
            expected_sans: vec![],
            alpn: vec![],
            upstream_tls: None,
            socket_matches: vec![],
            auto_sni: false,
            auto_san_validation: false,
            endpoints,
            lb_policy: policy.into(),
            locality_weighted_lb: false,
            overprovisioning_factor: 140,
            connect_timeout: std::time::Duration::from_secs(1),
            upstream_protocol: Default::default(),
            circuit_breakers: None,
            healthy_panic_threshold: 50.0,
            ring_size: (1024, 8 * 1024 * 1024),
            maglev_table_size: 65537,
            retry_budget: None,
            outlier_detection: None,
        })
    }

    fn counts(lb: &ClusterLb, n: usize, exclude: &[SocketAddr]) -> HashMap<SocketAddr, usize> {
        let mut c = HashMap::new();
        for _ in 0..n {
            let m = lb.pick(exclude).expect("a pick");
            *c.entry(m.addr).or_default() += 1;
        }
        c
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn round_robin_respects_weights_and_skips_unhealthy() {
        let lb = ClusterLb::new(
            cluster(
                "ROUND_ROBIN",
                vec![
                    ep("127.0.0.2:80", 1, true, 0),
                    ep("127.0.0.3:80", 3, true, 0),
                    ep("127.0.0.4:80", 1, false, 0),
                ],
            ),
            None,
        );
        let c = counts(&lb, 400, &[]);
        assert_eq!(c.get(&a("127.0.0.2:80")), Some(&100));
        assert_eq!(c.get(&a("127.0.0.3:80")), Some(&300));
        assert_eq!(c.get(&a("127.0.0.4:80")), None);
    }

    #[test]
    fn lower_priority_only_when_the_higher_has_no_healthy_endpoint() {
        let lb = ClusterLb::new(
            cluster(
                "ROUND_ROBIN",
                vec![
                    ep("127.0.0.2:80", 1, true, 0),
                    ep("127.0.0.3:80", 1, true, 1),
                ],
            ),
            None,
        );
        assert_eq!(counts(&lb, 10, &[]).len(), 1);
        let lb = ClusterLb::new(
            cluster(
                "ROUND_ROBIN",
                vec![
                    ep("127.0.0.2:80", 1, false, 0),
                    ep("127.0.0.3:80", 1, true, 1),
                ],
            ),
            None,
        );
        assert_eq!(counts(&lb, 10, &[]).get(&a("127.0.0.3:80")), Some(&10));
        // None healthy at all: every endpoint (panic mode), not no answer.
        let lb = ClusterLb::new(
            cluster("ROUND_ROBIN", vec![ep("127.0.0.2:80", 1, false, 0)]),
            None,
        );
        assert!(lb.pick(&[]).is_some());
    }

    fn located(
        addr: &str,
        locality: &str,
        weight: Option<u32>,
        healthy: bool,
        priority: u32,
    ) -> Endpoint {
        Endpoint {
            locality: locality.into(),
            locality_weight: weight,
            ..ep(addr, 1, healthy, priority)
        }
    }

    #[test]
    fn a_half_healthy_level_spills_to_the_next_by_the_overprovisioning_factor() {
        // Level 0: 3 of 4 healthy → 100 % (0.75 × 1.4 > 1). Level 0: 1 of 2
        // healthy → 70 % stays, 30 % to level 1.
        let lb = ClusterLb::new(
            cluster(
                "ROUND_ROBIN",
                vec![
                    ep("127.0.0.2:80", 1, true, 0),
                    ep("127.0.0.3:80", 1, false, 0),
                    ep("127.0.0.4:80", 1, true, 1),
                ],
            ),
            None,
        );
        let c = counts(&lb, 10_000, &[]);
        let p1 = c.get(&a("127.0.0.4:80")).copied().unwrap_or(0);
        assert!((2_600..=3_400).contains(&p1), "30 % to level 1: {c:?}");
        assert_eq!(
            c.get(&a("127.0.0.3:80")),
            None,
            "the unhealthy host gets nothing"
        );
    }

    #[test]
    fn a_level_below_the_panic_threshold_uses_all_its_hosts() {
        // 1 of 3 healthy (33 % < 50 %) and no other level: all three.
        let lb = ClusterLb::new(
            cluster(
                "ROUND_ROBIN",
                vec![
                    ep("127.0.0.2:80", 1, true, 0),
                    ep("127.0.0.3:80", 1, false, 0),
                    ep("127.0.0.4:80", 1, false, 0),
                ],
            ),
            None,
        );
        assert_eq!(counts(&lb, 300, &[]).len(), 3);
    }

    #[test]
    fn localities_share_a_level_by_weight_and_health() {
        let mut info = (*cluster(
            "ROUND_ROBIN",
            vec![
                located("127.0.0.2:80", "r/a", Some(3), true, 0),
                located("127.0.0.3:80", "r/a", Some(3), true, 0),
                located("127.0.0.4:80", "r/b", Some(1), true, 0),
                located("127.0.0.5:80", "r/c", None, true, 0),
            ],
        ))
        .clone();
        info.locality_weighted_lb = true;
        let lb = ClusterLb::new(Arc::new(info), None);
        let c = counts(&lb, 8_000, &[]);
        let b = c.get(&a("127.0.0.4:80")).copied().unwrap_or(0);
        assert!((1_600..=2_400).contains(&b), "r/b gets 1/4: {c:?}");
        assert_eq!(
            c.get(&a("127.0.0.5:80")),
            None,
            "a locality without weight gets none"
        );
        let a2 = c.get(&a("127.0.0.2:80")).copied().unwrap_or(0);
        let a3 = c.get(&a("127.0.0.3:80")).copied().unwrap_or(0);
        assert!(a2.abs_diff(a3) <= 20, "round robin inside r/a: {c:?}");
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let lb = ClusterLb::new(
            cluster(
                "LEAST_REQUEST",
                vec![
                    ep("127.0.0.2:80", 1, true, 0),
                    ep("127.0.0.3:80", 1, true, 0),
                ],
            ),
            None,
        );
        let busy = lb
            .members
            .iter()
            .find(|m| m.addr == a("127.0.0.2:80"))
            .expect("member");
        let _held: Vec<InFlight> = (0..5).map(|_| InFlight::start(&busy.in_flight)).collect();
        let c = counts(&lb, 100, &[]);
        assert_eq!(c.get(&a("127.0.0.3:80")), Some(&100), "{c:?}");
    }

    #[test]
    fn retries_avoid_previous_hosts_while_others_exist() {
        for policy in ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"] {
            let lb = ClusterLb::new(
                cluster(
                    policy,
                    vec![
                        ep("127.0.0.2:80", 1, true, 0),
                        ep("127.0.0.3:80", 1, true, 0),
                    ],
                ),
                None,
            );
            let c = counts(&lb, 50, &[a("127.0.0.2:80")]);
            assert_eq!(c.get(&a("127.0.0.3:80")), Some(&50), "{policy}");
            // Every host excluded: one is still picked.
            assert!(lb.pick(&[a("127.0.0.2:80"), a("127.0.0.3:80")]).is_some());
        }
    }

    fn many(policy: &str, n: usize) -> Arc<ClusterInfo> {
        cluster(
            policy,
            (0..n)
                .map(|i| ep(&format!("10.0.{}.{}:80", i / 250, i % 250 + 1), 1, true, 0))
                .collect(),
        )
    }

    #[test]
    fn hashing_policies_keep_a_key_on_one_host_and_move_few_others_on_removal() {
        for policy in ["RING_HASH", "MAGLEV"] {
            let lb = ClusterLb::new(many(policy, 20), None);
            let keys: Vec<u64> = (0..2000)
                .map(|k| xx_hash64(format!("user-{k}").as_bytes()))
                .collect();
            let first: Vec<SocketAddr> = keys
                .iter()
                .map(|h| lb.pick_hashed(&[], Some(*h)).expect("pick").addr)
                .collect();
            for (h, a) in keys.iter().zip(&first).take(100) {
                assert_eq!(
                    lb.pick_hashed(&[], Some(*h)).expect("pick").addr,
                    *a,
                    "{policy}: stable"
                );
            }
            // Spread: every host gets some keys, none more than 3× its share.
            let mut per: HashMap<SocketAddr, usize> = HashMap::new();
            for a in &first {
                *per.entry(*a).or_default() += 1;
            }
            assert_eq!(per.len(), 20, "{policy}");
            assert!(per.values().all(|n| *n < 300), "{policy}: {per:?}");
            // Remove one host: its keys move; of the others' keys only the
            // few that Envoy's algorithms also move do (ring hash re-scales
            // the ring by host count, Maglev refills a few slots).
            let removed = lb.members[7].addr;
            let mut info = (*lb.info).clone();
            info.endpoints.retain(|e| e.address != removed.to_string());
            let lb2 = ClusterLb::new(Arc::new(info), Some(&lb));
            let mut moved_others = 0;
            for (h, before) in keys.iter().zip(&first) {
                let after = lb2.pick_hashed(&[], Some(*h)).expect("pick").addr;
                if *before == removed {
                    assert_ne!(after, removed);
                } else if after != *before {
                    moved_others += 1;
                }
            }
            assert!(
                moved_others * 100 <= keys.len() * 3,
                "{policy}: {moved_others} of {} keys of remaining hosts moved",
                keys.len()
            );
        }
    }

    #[test]
    fn hashing_policies_respect_weights_and_exclusions() {
        for policy in ["RING_HASH", "MAGLEV"] {
            let lb = ClusterLb::new(
                cluster(
                    policy,
                    vec![
                        ep("127.0.0.2:80", 1, true, 0),
                        ep("127.0.0.3:80", 3, true, 0),
                    ],
                ),
                None,
            );
            let mut heavy = 0;
            for k in 0..4000u32 {
                let h = xx_hash64(&k.to_le_bytes());
                if lb.pick_hashed(&[], Some(h)).expect("pick").addr == a("127.0.0.3:80") {
                    heavy += 1;
                }
                // A retry avoiding the key's host gets the other one.
                let first = lb.pick_hashed(&[], Some(h)).expect("pick").addr;
                assert_ne!(lb.pick_hashed(&[first], Some(h)).expect("pick").addr, first);
            }
            assert!(
                (2600..=3400).contains(&heavy),
                "{policy}: weight 3 of 4 got {heavy}/4000"
            );
        }
    }

    #[test]
    fn in_flight_counts_survive_an_endpoint_update() {
        let info = cluster("LEAST_REQUEST", vec![ep("127.0.0.2:80", 1, true, 0)]);
        let lb = ClusterLb::new(info, None);
        let _held = InFlight::start(&lb.members[0].in_flight);
        let lb2 = ClusterLb::new(
            cluster(
                "LEAST_REQUEST",
                vec![
                    ep("127.0.0.2:80", 1, true, 0),
                    ep("127.0.0.3:80", 1, true, 0),
                ],
            ),
            Some(&lb),
        );
        assert_eq!(lb2.members[0].in_flight.load(Ordering::Relaxed), 1);
    }
}
