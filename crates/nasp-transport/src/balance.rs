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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use nasp_xds::cluster::{ClusterInfo, HealthStatus, OutlierSettings, SlowStart};

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
/// size over all), each point the xxHash64 of `"<address>_<i>"`. The points
/// of a host are kept with it across updates, so an EDS update hashes only
/// what is new.
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
    let mut ring = Vec::with_capacity(scale as usize + members.len());
    let mut target = 0.0;
    let mut placed = 0u64;
    for (i, m) in members.iter().enumerate() {
        // Envoy spreads rounding over hosts: each host's points are the
        // running target's floor minus what is already placed.
        target += scale * f64::from(m.weight.max(1)) / total;
        let n = (target.floor() as u64).saturating_sub(placed);
        let mut points = m.hashes.ring.lock().unwrap_or_else(PoisonError::into_inner);
        if (points.len() as u64) < n {
            let mut key = m.addr.to_string();
            key.push('_');
            let base = key.len();
            for j in points.len() as u64..n {
                use std::fmt::Write as _;
                key.truncate(base);
                let _ = write!(key, "{j}");
                points.push(xx_hash64(key.as_bytes()));
            }
        }
        ring.extend(points[..n as usize].iter().map(|h| (*h, i as u32)));
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
            let (h0, h1) = *m.hashes.maglev.get_or_init(|| {
                let a = m.addr.to_string();
                (
                    twox_hash::XxHash64::oneshot(0, a.as_bytes()),
                    twox_hash::XxHash64::oneshot(1, a.as_bytes()),
                )
            });
            Entry {
                pos: h0 % size,
                skip: h1 % (size - 1) + 1,
                weight: f64::from(m.weight.max(1)) / total,
                target: 0.0,
            }
        })
        .collect();
    let max_weight = entries.iter().map(|e| e.weight).fold(0.0, f64::max);
    let mut table = vec![u32::MAX; size as usize];
    // Which slots are taken, as bits: the probes stay in the first-level
    // cache (the table itself is 4 bytes a slot).
    let mut taken = vec![0u64; (size as usize).div_ceil(64)];
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
            while taken[(e.pos / 64) as usize] & (1 << (e.pos % 64)) != 0 {
                e.pos = step(e.pos);
            }
            taken[(e.pos / 64) as usize] |= 1 << (e.pos % 64);
            table[e.pos as usize] = i as u32;
            e.pos = step(e.pos);
            filled += 1;
        }
        iteration += 1;
    }
    table
}

/// What the hashing policies compute from an endpoint's address, kept with
/// it across updates: its Maglev seeds and its ring points so far.
#[derive(Debug, Default)]
pub(crate) struct HostHashes {
    maglev: OnceLock<(u64, u64)>,
    ring: Mutex<Vec<u64>>,
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
    pub hashes: Arc<HostHashes>,
    /// When the endpoint joined the cluster (for slow start), kept across
    /// updates by address.
    pub added: Instant,
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
/// detectors, the ejection multiplier and the interval's success counts),
/// kept across cluster updates by address.
#[derive(Debug, Default)]
pub(crate) struct OutlierState {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// Envoy's ejection-time multiplier: up by one per ejection (while
    /// `base × multiplier` is under the longest ejection), down by one per
    /// interval the host stays in.
    multiplier: AtomicU32,
    /// Whether the host is ejected now (read on every pick).
    ejected: AtomicBool,
    /// When it was last ejected and last brought back.
    times: Mutex<(Option<Instant>, Option<Instant>)>,
    /// This interval's outcomes, for the success-rate and
    /// failure-percentage detectors: externally originated (all of them
    /// unless errors are split) and locally originated.
    external_ok: AtomicU32,
    external_failed: AtomicU32,
    local_ok: AtomicU32,
    local_failed: AtomicU32,
}

impl OutlierState {
    fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    fn reset_consecutive(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        self.consecutive_local.store(0, Ordering::Relaxed);
    }

    /// How long the current ejection lasts: `base × multiplier`, at most
    /// the longest ejection (or the base when that is shorter).
    fn ejection_time(&self, s: &OutlierSettings) -> Duration {
        let n = self.multiplier.load(Ordering::Relaxed).max(1);
        s.base_ejection_time
            .saturating_mul(n)
            .min(s.max_ejection_time.max(s.base_ejection_time))
    }

    /// Marks the host ejected; false when it already was.
    fn eject(&self, s: &OutlierSettings, now: Instant) -> bool {
        if self.ejected.swap(true, Ordering::AcqRel) {
            return false;
        }
        let n = self.multiplier.load(Ordering::Relaxed);
        if s.base_ejection_time.saturating_mul(n) < s.max_ejection_time.max(s.base_ejection_time) {
            self.multiplier.store(n + 1, Ordering::Relaxed);
        }
        self.times.lock().unwrap_or_else(PoisonError::into_inner).0 = Some(now);
        self.reset_consecutive();
        true
    }

    /// Takes this interval's counts: `(external ok, failed, local ok,
    /// failed)`.
    fn take_counts(&self) -> [u32; 4] {
        [
            self.external_ok.swap(0, Ordering::Relaxed),
            self.external_failed.swap(0, Ordering::Relaxed),
            self.local_ok.swap(0, Ordering::Relaxed),
            self.local_failed.swap(0, Ordering::Relaxed),
        ]
    }
}

/// Whether an enforcement percentage fires this time (Envoy's
/// `enforcing_*`: the chance an outlier is really ejected).
fn enforced(percent: u32) -> bool {
    percent >= 100 || (percent > 0 && rand::random_range(0..100) < percent)
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
    /// Endpoints ejected by outlier detection (never below the true count
    /// of the current members: a fast "nobody is ejected" on each pick).
    pub ejected: AtomicUsize,
    /// When outlier detection's next interval sweep is due, in nanoseconds
    /// since `epoch` (0: not scheduled yet).
    next_sweep: AtomicU64,
    epoch: OnceLock<Instant>,
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
    /// When its oldest and newest members joined (slow start: the oldest
    /// sets the full share, and after the newest's window nobody ramps).
    oldest: Instant,
    newest: Instant,
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
        let added = idx.iter().map(|i| members[*i].added);
        let (oldest, newest) = (
            added.clone().min().unwrap_or_else(Instant::now),
            added.max().unwrap_or_else(Instant::now),
        );
        Self {
            idx,
            schedule,
            cursor: AtomicUsize::new(rand::random::<u32>() as usize),
            total_weight,
            cumulative,
            oldest,
            newest,
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
        Self::new_at(info, previous, Instant::now())
    }

    /// As [`Self::new`], endpoints new to the cluster joining at `now`.
    fn new_at(info: Arc<ClusterInfo>, previous: Option<&ClusterLb>, now: Instant) -> Self {
        // Endpoints usually come back in the same order: match by position
        // first, by address only where that fails.
        let old_members = previous.map_or(&[][..], |p| &p.members[..]);
        let mut by_addr: Option<HashMap<SocketAddr, usize>> = None;
        // Old position = new position + shift (an endpoint removed or added
        // earlier in the list shifts the rest); a few misses are looked up
        // by scanning, more by a map.
        let mut shift = 0isize;
        let mut misses = 0;
        let mut members = Vec::with_capacity(info.endpoints.len());
        for (idx, e) in info.endpoints.iter().enumerate() {
            let Ok(addr) = e.address.parse::<SocketAddr>() else {
                continue;
            };
            let k = members.len() as isize;
            let at = |i: isize| usize::try_from(i).ok().and_then(|i| old_members.get(i));
            let old = match at(k + shift) {
                Some(m) if m.addr == addr => Some(m),
                _ if old_members.is_empty() => None,
                _ => {
                    misses += 1;
                    let found = if misses <= 8 {
                        old_members.iter().position(|m| m.addr == addr)
                    } else {
                        by_addr
                            .get_or_insert_with(|| {
                                old_members
                                    .iter()
                                    .enumerate()
                                    .map(|(i, m)| (m.addr, i))
                                    .collect()
                            })
                            .get(&addr)
                            .copied()
                    };
                    if let Some(i) = found {
                        shift = i as isize - k;
                    }
                    found.map(|i| &old_members[i])
                }
            };
            let (in_flight, outlier, hashes, added) = match old {
                Some(m) => (
                    m.in_flight.clone(),
                    m.outlier.clone(),
                    m.hashes.clone(),
                    m.added,
                ),
                None => (Arc::default(), Arc::default(), Arc::default(), now),
            };
            members.push(Member {
                addr,
                idx,
                weight: e.weight,
                priority: e.priority,
                healthy: e.healthy,
                degraded: e.health == HealthStatus::Degraded,
                locality_weight: e.locality_weight,
                in_flight,
                outlier,
                hashes,
                added,
            });
        }
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
        let counters: Arc<ClusterCounters> =
            previous.map(|p| p.counters.clone()).unwrap_or_default();
        // Ejected hosts that left the cluster no longer count.
        if info.outlier_detection.is_some() {
            counters.ejected.store(
                members.iter().filter(|m| m.outlier.is_ejected()).count(),
                Ordering::Relaxed,
            );
        }
        Self {
            policy,
            ring,
            maglev,
            counters,
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
        self.pick_at(exclude, None, Instant::now())
    }

    /// As [`Self::pick`], with the request's hash for ring hash and Maglev
    /// (no hash: a random endpoint, as Envoy).
    pub(crate) fn pick_hashed(&self, exclude: &[SocketAddr], hash: Option<u64>) -> Option<&Member> {
        self.pick_at(exclude, hash, Instant::now())
    }

    /// The pick at a given time (outlier intervals and slow start read the
    /// clock; tests move it).
    fn pick_at(&self, exclude: &[SocketAddr], hash: Option<u64>, now: Instant) -> Option<&Member> {
        if self.members.is_empty() {
            return None;
        }
        let mut any_ejected = false;
        if let Some(s) = &self.info.outlier_detection {
            self.maybe_sweep(s, now);
            any_ejected = self.counters.ejected.load(Ordering::Relaxed) > 0;
        }
        // Every endpoint ejected: all of them (Envoy's panic mode).
        if any_ejected
            && self.counters.ejected.load(Ordering::Relaxed) >= self.members.len()
            && self.members.iter().all(|m| m.outlier.is_ejected())
        {
            any_ejected = false;
        }
        let allowed =
            |m: &Member| !(exclude.contains(&m.addr) || (any_ejected && m.outlier.is_ejected()));
        let any_allowed = (exclude.is_empty() && !any_ejected) || self.members.iter().any(allowed);
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
                self.pick_in(set, &ok, now).or_else(|| {
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

    /// Slow start for a pick in `set`: the chance a member chosen by the
    /// policy is taken, `factor(its age) / factor(the set's oldest)` — so
    /// each member's share is its weight × its slow-start factor, as in
    /// Envoy's scheduler, and a set that all joined together is unaffected.
    /// `None` when nobody in the set is ramping.
    fn slow_start(&self, set: &HostSet, now: Instant) -> Option<(SlowStart, f64)> {
        let ss = self.info.slow_start?;
        if !matches!(self.policy, Policy::RoundRobin | Policy::LeastRequest)
            || now.saturating_duration_since(set.newest) >= ss.window
        {
            return None;
        }
        Some((ss, ss.factor(now.saturating_duration_since(set.oldest))))
    }

    fn pick_in(
        &self,
        set: &HostSet,
        ok: &dyn Fn(&Member) -> bool,
        now: Instant,
    ) -> Option<&Member> {
        if set.idx.is_empty() {
            return None;
        }
        let ramp = self.slow_start(set, now);
        // Whether a chosen member is taken now (always, outside slow start).
        let take = |m: &Member| match ramp {
            Some((ss, full)) => {
                let f = ss.factor(now.saturating_duration_since(m.added)) / full.max(1e-9);
                f >= 1.0 || rand::random::<f64>() < f
            }
            None => true,
        };
        match self.policy {
            Policy::RoundRobin => {
                let mut fallback = None;
                let tries = if ramp.is_some() {
                    set.schedule.len().max(64)
                } else {
                    set.schedule.len()
                };
                for _ in 0..tries {
                    let n = set.cursor.fetch_add(1, Ordering::Relaxed) % set.schedule.len();
                    let m = &self.members[set.schedule[n]];
                    if ok(m) {
                        if take(m) {
                            return Some(m);
                        }
                        fallback.get_or_insert(m);
                    }
                }
                fallback
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
                // Envoy's effective weight is `weight / (active + 1)^bias`:
                // the lowest `(active + 1)^bias / weight` wins.
                let (choices, bias) = self.info.least_request;
                let load = |m: &Member| {
                    let active = m.in_flight.load(Ordering::Relaxed) as f64 + 1.0;
                    let active = if bias == 1.0 {
                        active
                    } else {
                        active.powf(bias)
                    };
                    active / f64::from(m.weight.max(1))
                };
                let mut fallback = None;
                for _ in 0..if ramp.is_some() { 16 } else { 1 } {
                    let chosen = self.choices(set, choices as usize, ok, &load);
                    match chosen {
                        Some(m) if take(m) => return Some(m),
                        Some(m) => {
                            fallback.get_or_insert(m);
                        }
                        None => return None,
                    }
                }
                fallback
            }
        }
    }

    /// The least loaded of `n` random usable members of `set` (Envoy's
    /// `choice_count`, 2 by default: the power of two choices).
    fn choices(
        &self,
        set: &HostSet,
        n: usize,
        ok: &dyn Fn(&Member) -> bool,
        load: &dyn Fn(&Member) -> f64,
    ) -> Option<&Member> {
        let better = |a: &'_ Member, b: &'_ Member| load(b) < load(a);
        // The common case without an allocation: two distinct random
        // members that may both be used.
        if n == 2 && set.idx.len() >= 2 {
            let len = set.idx.len();
            let a = rand::random_range(0..len);
            let mut b = rand::random_range(0..len - 1);
            if b >= a {
                b += 1;
            }
            let (ma, mb) = (&self.members[set.idx[a]], &self.members[set.idx[b]]);
            if ok(ma) && ok(mb) {
                return Some(if better(ma, mb) { mb } else { ma });
            }
        }
        let candidates: Vec<&Member> = set
            .idx
            .iter()
            .map(|i| &self.members[*i])
            .filter(|m| ok(m))
            .collect();
        if candidates.len() <= 1 {
            return candidates.first().copied();
        }
        let mut best = candidates[rand::random_range(0..candidates.len())];
        for _ in 1..n.max(2) {
            let m = candidates[rand::random_range(0..candidates.len())];
            if better(best, m) {
                best = m;
            }
        }
        Some(best)
    }

    /// Records what an attempt to `addr` ended with: Envoy's consecutive
    /// 5xx, gateway-failure and local-origin detectors (each ejecting at
    /// once, with its enforcement chance), and the interval's counts for
    /// the success-rate and failure-percentage detectors.
    pub(crate) fn report(&self, addr: SocketAddr, outcome: Outcome) {
        self.report_at(addr, outcome, Instant::now());
    }

    fn report_at(&self, addr: SocketAddr, outcome: Outcome, now: Instant) {
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
            Outcome::Status(code) => {
                if s.split_external_local_origin_errors {
                    // The connection worked: a local-origin success.
                    bump(&o.local_ok);
                    o.consecutive_local.store(0, Ordering::Relaxed);
                }
                if code >= 500 {
                    bump(&o.external_failed);
                    let n5 = bump(&o.consecutive_5xx);
                    eject |= s.consecutive_5xx > 0
                        && n5 >= s.consecutive_5xx
                        && enforced(s.enforcing_consecutive_5xx);
                    if matches!(code, 502..=504) {
                        let ng = bump(&o.consecutive_gateway);
                        eject |= s.consecutive_gateway_failure > 0
                            && ng >= s.consecutive_gateway_failure
                            && enforced(s.enforcing_consecutive_gateway_failure);
                    } else {
                        o.consecutive_gateway.store(0, Ordering::Relaxed);
                    }
                } else {
                    bump(&o.external_ok);
                    o.consecutive_5xx.store(0, Ordering::Relaxed);
                    o.consecutive_gateway.store(0, Ordering::Relaxed);
                    if !s.split_external_local_origin_errors {
                        o.consecutive_local.store(0, Ordering::Relaxed);
                    }
                }
            }
            Outcome::LocalFailure if s.split_external_local_origin_errors => {
                bump(&o.local_failed);
                let nl = bump(&o.consecutive_local);
                eject |= s.consecutive_local_origin_failure > 0
                    && nl >= s.consecutive_local_origin_failure
                    && enforced(s.enforcing_consecutive_local_origin_failure);
            }
            Outcome::LocalFailure => {
                // Not split: a local-origin failure counts as a gateway
                // failure (Envoy maps it to 503).
                bump(&o.external_failed);
                let n5 = bump(&o.consecutive_5xx);
                let ng = bump(&o.consecutive_gateway);
                eject |= (s.consecutive_5xx > 0
                    && n5 >= s.consecutive_5xx
                    && enforced(s.enforcing_consecutive_5xx))
                    || (s.consecutive_gateway_failure > 0
                        && ng >= s.consecutive_gateway_failure
                        && enforced(s.enforcing_consecutive_gateway_failure));
            }
        }
        if eject {
            self.try_eject(m, s, now, "consecutive errors");
        }
    }

    /// Ejects `m` unless that would pass `max_ejection_percent` of the
    /// cluster (Envoy ejects the first one whatever the percentage).
    fn try_eject(&self, m: &Member, s: &OutlierSettings, now: Instant, why: &str) {
        if m.outlier.is_ejected() {
            return;
        }
        let ejected = self
            .counters
            .ejected
            .load(Ordering::Relaxed)
            .min(self.members.len());
        let cap = self.members.len() * s.max_ejection_percent.min(100) as usize / 100;
        if ejected >= cap.max(1) {
            return;
        }
        if m.outlier.eject(s, now) {
            self.counters.ejected.fetch_add(1, Ordering::Relaxed);
            tracing::info!(addr = %m.addr, cluster = %self.info.name, why, "outlier ejected");
        }
    }

    /// Runs the interval sweep when it is due (the first caller past the
    /// deadline runs it; the others go on).
    fn maybe_sweep(&self, s: &OutlierSettings, now: Instant) {
        let c = &self.counters;
        let epoch = *c.epoch.get_or_init(|| now);
        let at = now.saturating_duration_since(epoch).as_nanos() as u64 + 1;
        let interval = s.interval.max(Duration::from_millis(1)).as_nanos() as u64;
        let due = c.next_sweep.load(Ordering::Acquire);
        if due == 0 {
            let _ = c.next_sweep.compare_exchange(
                0,
                at + interval,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
            return;
        }
        if at < due
            || c.next_sweep
                .compare_exchange(due, at + interval, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // Intervals that passed with nobody asking count as well (the
        // multiplier decays once per interval).
        let ticks = 1 + (at - due) / interval;
        self.sweep(s, now, u32::try_from(ticks).unwrap_or(u32::MAX));
    }

    /// Envoy's interval: hosts whose ejection time is up come back; hosts
    /// in service for an interval see their multiplier go down; then the
    /// success-rate and failure-percentage detectors run on the interval's
    /// counts.
    fn sweep(&self, s: &OutlierSettings, now: Instant, ticks: u32) {
        for m in &self.members {
            let o = &m.outlier;
            let mut times = o.times.lock().unwrap_or_else(PoisonError::into_inner);
            if o.is_ejected() {
                let since = times
                    .0
                    .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
                if since >= o.ejection_time(s) {
                    o.ejected.store(false, Ordering::Release);
                    times.1 = Some(now);
                    o.reset_consecutive();
                    let _ = self.counters.ejected.fetch_update(
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                        |n| n.checked_sub(1),
                    );
                    tracing::info!(addr = %m.addr, cluster = %self.info.name, "outlier back");
                }
            } else if times
                .1
                .is_some_and(|t| now.saturating_duration_since(t) >= s.interval)
            {
                let _ = o
                    .multiplier
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        (n > 0).then(|| n.saturating_sub(ticks))
                    });
            }
        }
        let counts: Vec<[u32; 4]> = self
            .members
            .iter()
            .map(|m| m.outlier.take_counts())
            .collect();
        // External counts are `[0..2]`, local-origin ones `[2..4]`.
        let mut detectors = vec![(0, s.enforcing_success_rate, s.enforcing_failure_percentage)];
        if s.split_external_local_origin_errors {
            detectors.push((
                2,
                s.enforcing_local_origin_success_rate,
                s.enforcing_failure_percentage_local_origin,
            ));
        }
        for (k, success_rate, failure_percentage) in detectors {
            let of: Vec<(u32, u32)> = counts.iter().map(|c| (c[k], c[k + 1])).collect();
            self.success_rate_sweep(s, now, &of, success_rate);
            self.failure_percentage_sweep(s, now, &of, failure_percentage);
        }
    }

    /// Envoy's success-rate detector: over the hosts with at least
    /// `success_rate_request_volume` requests this interval (and only when
    /// there are `success_rate_minimum_hosts` of them), a host below
    /// `mean − stdev × stdev_factor / 1000` is ejected.
    fn success_rate_sweep(
        &self,
        s: &OutlierSettings,
        now: Instant,
        counts: &[(u32, u32)],
        enforcing: u32,
    ) {
        if enforcing == 0 {
            return;
        }
        let rates: Vec<(usize, f64)> = counts
            .iter()
            .enumerate()
            .filter_map(|(i, &(ok, failed))| {
                let total = ok + failed;
                (total >= s.success_rate_request_volume.max(1))
                    .then(|| (i, 100.0 * f64::from(ok) / f64::from(total)))
            })
            .collect();
        if rates.is_empty() || rates.len() < s.success_rate_minimum_hosts as usize {
            return;
        }
        let n = rates.len() as f64;
        let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / n;
        let variance = rates.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
        let threshold = mean - variance.sqrt() * f64::from(s.success_rate_stdev_factor) / 1000.0;
        for (i, rate) in rates {
            if rate < threshold && enforced(enforcing) {
                self.try_eject(&self.members[i], s, now, "success rate");
            }
        }
    }

    /// Envoy's failure-percentage detector: a host with at least
    /// `failure_percentage_request_volume` requests this interval whose
    /// failures reach `failure_percentage_threshold` percent is ejected
    /// (with `failure_percentage_minimum_hosts` such hosts at least).
    fn failure_percentage_sweep(
        &self,
        s: &OutlierSettings,
        now: Instant,
        counts: &[(u32, u32)],
        enforcing: u32,
    ) {
        if enforcing == 0 {
            return;
        }
        let volume: Vec<(usize, u32, u32)> = counts
            .iter()
            .enumerate()
            .filter_map(|(i, &(ok, failed))| {
                (ok + failed >= s.failure_percentage_request_volume.max(1))
                    .then_some((i, ok, failed))
            })
            .collect();
        if volume.len() < s.failure_percentage_minimum_hosts as usize {
            return;
        }
        for (i, ok, failed) in volume {
            let percent = 100.0 * f64::from(failed) / f64::from(ok + failed);
            if percent >= f64::from(s.failure_percentage_threshold) && enforced(enforcing) {
                self.try_eject(&self.members[i], s, now, "failure percentage");
            }
        }
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
            slow_start: None,
            least_request: (2, 1.0),
            services: Arc::from([]),
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

    fn outlier(extra: impl FnOnce(&mut OutlierSettings)) -> OutlierSettings {
        let mut s = OutlierSettings {
            consecutive_5xx: 3,
            enforcing_consecutive_5xx: 100,
            consecutive_gateway_failure: 5,
            enforcing_consecutive_gateway_failure: 0,
            enforcing_success_rate: 0,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1900,
            enforcing_local_origin_success_rate: 100,
            failure_percentage_threshold: 85,
            enforcing_failure_percentage: 0,
            enforcing_failure_percentage_local_origin: 0,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
            split_external_local_origin_errors: false,
            consecutive_local_origin_failure: 5,
            enforcing_consecutive_local_origin_failure: 100,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 100,
        };
        extra(&mut s);
        s
    }

    fn with_outlier(n: usize, s: OutlierSettings) -> Arc<ClusterInfo> {
        let eps = (0..n)
            .map(|i| ep(&format!("127.0.0.{}:80", i + 2), 1, true, 0))
            .collect();
        let mut info = Arc::unwrap_or_clone(cluster("ROUND_ROBIN", eps));
        info.outlier_detection = Some(s);
        Arc::new(info)
    }

    /// Whether `addr` is picked at all in 200 picks at `now`.
    fn picked(lb: &ClusterLb, addr: SocketAddr, now: Instant) -> bool {
        (0..200).any(|_| lb.pick_at(&[], None, now).map(|m| m.addr) == Some(addr))
    }

    #[test]
    fn ejections_last_longer_each_time_and_the_multiplier_decays_while_in_service() {
        let lb = ClusterLb::new(with_outlier(4, outlier(|_| ())), None);
        let bad = a("127.0.0.2:80");
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        assert!(picked(&lb, bad, t0));
        let fail = |at| {
            for _ in 0..3 {
                lb.report_at(bad, Outcome::Status(500), at);
            }
        };
        // First ejection: 30 s (base × 1), ended by the first sweep after.
        fail(s(1));
        assert!(!picked(&lb, bad, s(25)));
        assert!(!picked(&lb, bad, s(30)), "no sweep between 25 s and 35 s");
        assert!(picked(&lb, bad, s(40)), "back at the sweep after 31 s");
        // Again at once: 60 s this time.
        fail(s(41));
        assert!(!picked(&lb, bad, s(91)));
        assert!(picked(&lb, bad, s(111)), "back after 60 s");
        assert_eq!(lb.members[0].outlier.multiplier.load(Ordering::Relaxed), 2);
        // In service for two more intervals: the multiplier is down to 0,
        // so the next ejection is the base time again.
        assert!(picked(&lb, bad, s(121)));
        assert!(picked(&lb, bad, s(131)));
        assert_eq!(lb.members[0].outlier.multiplier.load(Ordering::Relaxed), 0);
        fail(s(132));
        assert!(!picked(&lb, bad, s(151)));
        assert!(picked(&lb, bad, s(171)), "30 s, not 90 s");
    }

    #[test]
    fn at_most_max_ejection_percent_of_hosts_are_ejected_but_always_one() {
        let lb = ClusterLb::new(
            with_outlier(4, outlier(|s| s.max_ejection_percent = 10)),
            None,
        );
        let now = Instant::now();
        for h in ["127.0.0.2:80", "127.0.0.3:80"] {
            for _ in 0..3 {
                lb.report_at(a(h), Outcome::Status(503), now);
            }
        }
        assert!(!picked(&lb, a("127.0.0.2:80"), now), "the first is ejected");
        assert!(picked(&lb, a("127.0.0.3:80"), now), "10 % of 4: no second");
    }

    /// Reports `ok` successes and `failed` 500s for each host at `now`.
    fn traffic(lb: &ClusterLb, per_host: &[(u32, u32)], now: Instant) {
        for (i, (ok, failed)) in per_host.iter().enumerate() {
            let addr = lb.members[i].addr;
            // Interleaved, so no host sees 3 consecutive 5xx.
            for k in 0..(ok + failed) {
                let status = if k % 2 == 1 && k / 2 < *failed {
                    500
                } else {
                    200
                };
                lb.report_at(addr, Outcome::Status(status), now);
            }
        }
    }

    #[test]
    fn success_rate_ejects_a_host_far_below_the_mean_when_enforced() {
        // 4 hosts at 100 %, one at 50 %: mean 90, stdev 20, threshold
        // 90 − 20 × 1.9 = 52, so the fifth host is ejected.
        let per_host = [(100, 0), (100, 0), (100, 0), (100, 0), (50, 50)];
        for (enforcing, ejected) in [(100, true), (0, false)] {
            let lb = ClusterLb::new(
                with_outlier(
                    5,
                    outlier(|s| {
                        s.enforcing_success_rate = enforcing;
                        s.consecutive_5xx = 0;
                    }),
                ),
                None,
            );
            let t0 = Instant::now();
            assert!(lb.pick_at(&[], None, t0).is_some(), "schedules the sweep");
            traffic(&lb, &per_host, t0);
            let odd = lb.members[4].addr;
            assert_eq!(!picked(&lb, odd, t0 + Duration::from_secs(10)), ejected);
            for m in &lb.members[..4] {
                assert!(!m.outlier.is_ejected());
            }
        }
        // Too few requests or too few hosts with enough: no detection.
        let lb = ClusterLb::new(
            with_outlier(5, outlier(|s| s.enforcing_success_rate = 100)),
            None,
        );
        let t0 = Instant::now();
        lb.pick_at(&[], None, t0);
        traffic(&lb, &[(100, 0), (100, 0), (100, 0), (50, 50), (10, 0)], t0);
        assert!(picked(
            &lb,
            lb.members[3].addr,
            t0 + Duration::from_secs(10)
        ));
    }

    #[test]
    fn failure_percentage_ejects_hosts_at_the_threshold() {
        let lb = ClusterLb::new(
            with_outlier(
                5,
                outlier(|s| {
                    s.enforcing_failure_percentage = 100;
                    s.consecutive_5xx = 0;
                    s.failure_percentage_minimum_hosts = 2;
                }),
            ),
            None,
        );
        let t0 = Instant::now();
        lb.pick_at(&[], None, t0);
        // 90 % failures is past 85 %; 80 % is not.
        for (i, failed) in [(0usize, 45u32), (1, 40)] {
            let addr = lb.members[i].addr;
            for k in 0..50 {
                let status = if k < failed { 500 } else { 200 };
                lb.report_at(addr, Outcome::Status(status), t0);
            }
        }
        let later = t0 + Duration::from_secs(10);
        assert!(!picked(&lb, lb.members[0].addr, later));
        assert!(picked(&lb, lb.members[1].addr, later));
    }

    #[test]
    fn slow_start_ramps_a_new_endpoint_up_over_the_window() {
        for policy in ["ROUND_ROBIN", "LEAST_REQUEST"] {
            let ss = SlowStart {
                window: Duration::from_secs(10),
                aggression: 1.0,
                min_weight_percent: 10.0,
            };
            let with = |eps: Vec<Endpoint>| {
                let mut info = Arc::unwrap_or_clone(cluster(policy, eps));
                info.slow_start = Some(ss);
                Arc::new(info)
            };
            let t0 = Instant::now();
            let old = ep("127.0.0.2:80", 1, true, 0);
            let lb = ClusterLb::new_at(with(vec![old.clone()]), None, t0);
            // The second endpoint joins at 20 s, when the first is past its
            // window.
            let joined = t0 + Duration::from_secs(20);
            let lb = ClusterLb::new_at(
                with(vec![old.clone(), ep("127.0.0.3:80", 1, true, 0)]),
                Some(&lb),
                joined,
            );
            let share = |after: u64| {
                let now = joined + Duration::from_secs(after);
                let n = 20_000;
                let new = (0..n)
                    .filter(|_| {
                        lb.pick_at(&[], None, now).map(|m| m.addr) == Some(a("127.0.0.3:80"))
                    })
                    .count();
                new as f64 / n as f64
            };
            // Its weight × factor against the old one's full weight:
            // 0.1 (the minimum) / 1.1, 0.5 / 1.5, then half.
            let (early, mid, done) = (share(0), share(5), share(11));
            assert!((early - 0.1 / 1.1).abs() < 0.03, "{policy}: {early}");
            assert!((mid - 0.5 / 1.5).abs() < 0.03, "{policy}: {mid}");
            assert!((done - 0.5).abs() < 0.03, "{policy}: {done}");
            // Aggression 2: the ramp is √t (0.71 at half the window).
            assert!((ss.factor(Duration::from_secs(5)) - 0.5).abs() < 1e-9);
            let steep = SlowStart {
                aggression: 2.0,
                ..ss
            };
            assert!((steep.factor(Duration::from_secs(5)) - 0.5f64.sqrt()).abs() < 1e-9);
        }
    }

    #[test]
    fn least_request_honours_choice_count_and_active_request_bias() {
        let eps = (0..4)
            .map(|i| ep(&format!("127.0.0.{}:80", i + 2), 1, true, 0))
            .collect::<Vec<_>>();
        let share_of_idle = |choices: u32, bias: f64| {
            let mut info = Arc::unwrap_or_clone(cluster("LEAST_REQUEST", eps.clone()));
            info.least_request = (choices, bias);
            let lb = ClusterLb::new(Arc::new(info), None);
            // Every host but the first is busy with 10 requests.
            let _busy: Vec<InFlight> = lb.members[1..]
                .iter()
                .flat_map(|m| (0..10).map(|_| InFlight::start(&m.in_flight)))
                .collect();
            let n = 20_000;
            let idle = (0..n)
                .filter(|_| lb.pick(&[]).map(|m| m.addr) == Some(a("127.0.0.2:80")))
                .count();
            idle as f64 / n as f64
        };
        // Two distinct choices: the idle host wins whenever it is one of
        // them (1/2); eight: 1 − (3/4)^8 ≈ 0.90; bias 0 ignores the load.
        assert!((share_of_idle(2, 1.0) - 0.5).abs() < 0.03);
        assert!((share_of_idle(8, 1.0) - 0.9).abs() < 0.03);
        assert!((share_of_idle(2, 0.0) - 0.25).abs() < 0.03);
    }
}
