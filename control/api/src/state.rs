//! [`ControlState`]: the typed library API that the gRPC service (and the daemon's start-up,
//! reload and probe code) goes through.
//!
//! Every change follows one path: copy the committed configuration, apply the change to the
//! copy, validate, compile a `RuleSet` with the next generation, hand it to the [`Publisher`]
//! (the daemon sends it to every worker and waits for every ack), and only then commit. A
//! change that fails at any step leaves the committed configuration as it was.
//!
//! Concurrency: changes are serialized by one mutex (compile and publish included); reads take
//! an `Arc` of the committed snapshot under a lock that is only ever held for a pointer swap,
//! so a read never waits for a publish.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;
use xlb_engine::config::{BackendPool, Config, Member};
use xlb_engine::{compile, compile_releasing, MemberHealth, RuleSet, ValidationErrors};

use crate::config_diff::{self, ConfigDiff};
pub use crate::members::{process_clock, MemberChange, MemberDrain, MemberStatus};
pub use crate::object::{Kind, Object};
use crate::telemetry::{ControlEvent, EventRecord};

/// Hands a new rule set to the workers. The daemon implements it by sending the `Arc` to every
/// worker over its bounded channel and waiting until every worker acknowledges the generation.
pub trait Publisher: Send + Sync + 'static {
    /// Returns once every worker runs `rules` (or fails after `deadline`). Blocking is fine:
    /// [`ControlState`] calls it from a blocking context, one call at a time.
    fn publish(&self, rules: Arc<RuleSet>, deadline: Duration) -> Result<(), PublishError>;

    /// Retired rules of `rules` (deleted, kept for their flows) of which no worker holds a
    /// flow any more: the next compile releases them, and their ids may go to new rules. The
    /// default releases none (retired rules then keep their ids for good).
    fn drained(&self, rules: &RuleSet) -> std::collections::HashSet<xlb_engine::RuleId> {
        let _ = rules;
        std::collections::HashSet::new()
    }
}

/// Why a rule set did not reach every worker.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// These workers did not acknowledge in time (they may still apply it later).
    #[error(
        "worker(s) {} did not acknowledge generation {generation} within {deadline:?}",
        list(missing)
    )]
    Timeout {
        generation: u64,
        missing: Vec<u16>,
        deadline: Duration,
    },
    /// The rule set could not be delivered (a worker exited, the daemon is stopping, …).
    #[error("{0}")]
    Unavailable(String),
}

fn list(ids: &[u16]) -> String {
    ids.iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a request was refused. Each variant maps to one gRPC status code.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ControlError {
    /// `INVALID_ARGUMENT`: every violation, each with field path, value and allowed range.
    #[error(transparent)]
    InvalidArgument(#[from] ValidationErrors),
    /// `NOT_FOUND`.
    #[error("{kind} {name:?} does not exist")]
    NotFound { kind: Kind, name: String },
    /// `ALREADY_EXISTS`.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: Kind, name: String },
    /// `FAILED_PRECONDITION`: e.g. deleting an object that rules reference.
    #[error("{kind} {name:?} is referenced by {}; change or delete {} first", used_by.join(", "), if used_by.len() == 1 { "it" } else { "them" })]
    InUse {
        kind: Kind,
        name: String,
        /// The referencing objects as configuration paths, e.g. `load_balancing_rules[web]`.
        used_by: Vec<String>,
    },
    /// `DEADLINE_EXCEEDED`: workers did not acknowledge the new rule set in time.
    #[error("{0}; the change was not applied")]
    DeadlineExceeded(String),
    /// `UNAVAILABLE`: the rule set could not be delivered.
    #[error("cannot apply the change now: {0}; it was not applied")]
    Unavailable(String),
}

/// What a successful change produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied<T> {
    pub value: T,
    /// The generation now running.
    pub generation: u64,
}

/// What [`ControlState::apply_config`] found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigApplied {
    /// Every change from the running configuration to the one given.
    pub diff: ConfigDiff,
    /// The generation now running (the new one when `applied`).
    pub generation: u64,
    /// Whether a new generation was published (false: dry run, or nothing to apply).
    pub applied: bool,
}

/// The committed state: what reads see.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    pub rules: Arc<RuleSet>,
    pub generation: u64,
    /// The probe verdicts `rules` was compiled with.
    pub health: MemberHealth,
}

/// Options of [`ControlState`].
#[derive(Clone, Debug)]
pub struct StateOptions {
    /// How long the publisher may wait for every worker's ack.
    pub publish_deadline: Duration,
    /// Capacity of the event channel of configuration events (generation applied, …).
    pub event_capacity: usize,
    /// "Now" on the workers' time line, in nanoseconds: drains are stamped with it, and
    /// their deadlines fall on it. The daemon gives its workers' clock (CLOCK_MONOTONIC);
    /// the default counts from the first call in this process.
    pub clock: fn() -> u64,
}

impl Default for StateOptions {
    fn default() -> StateOptions {
        StateOptions {
            publish_deadline: Duration::from_secs(2),
            event_capacity: 1024,
            clock: process_clock,
        }
    }
}

/// State only the (serialized) writer touches.
#[derive(Debug)]
struct Writer {
    health: MemberHealth,
    /// Last generation handed to the publisher. Never reused, even when a publish failed:
    /// a worker may have applied that generation late.
    last_generation: u64,
}

/// The configuration owner. Share it as `Arc<ControlState>`.
pub struct ControlState {
    writer: Mutex<Writer>,
    committed: RwLock<Arc<Snapshot>>,
    publisher: Arc<dyn Publisher>,
    options: StateOptions,
    events: broadcast::Sender<EventRecord>,
    /// Why the workers may not all run the committed generation (a failed roll-back), if so.
    degraded: RwLock<Option<String>>,
}

impl fmt::Debug for ControlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlState")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl ControlState {
    /// Validates and compiles `config` as generation 1, publishes it, and returns the state.
    pub fn start(
        config: Config,
        health: MemberHealth,
        publisher: Arc<dyn Publisher>,
        options: StateOptions,
    ) -> Result<ControlState, ControlError> {
        let mut health = health;
        health.follow_drains(&config, (options.clock)());
        let rules = Arc::new(compile(&config, None, &health, 1)?);
        publisher
            .publish(Arc::clone(&rules), options.publish_deadline)
            .map_err(publish_error)?;
        Ok(ControlState::new(config, rules, health, publisher, options))
    }

    /// Wraps a configuration whose rule set the workers already run (the daemon compiled it
    /// at start and created its workers with it). `rules.generation()` is the current one.
    pub fn new(
        config: Config,
        rules: Arc<RuleSet>,
        health: MemberHealth,
        publisher: Arc<dyn Publisher>,
        options: StateOptions,
    ) -> ControlState {
        let generation = rules.generation();
        let (events, _) = broadcast::channel(options.event_capacity.max(1));
        ControlState {
            writer: Mutex::new(Writer {
                health: health.clone(),
                last_generation: generation,
            }),
            committed: RwLock::new(Arc::new(Snapshot {
                config,
                rules,
                generation,
                health,
            })),
            publisher,
            options,
            events,
            degraded: RwLock::new(None),
        }
    }

    /// The committed configuration, rule set and generation. Never waits for a publish.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(
            &self
                .committed
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    pub fn generation(&self) -> u64 {
        self.snapshot().generation
    }

    /// Now, on the workers' time line (see [`StateOptions::clock`]).
    pub fn now(&self) -> u64 {
        (self.options.clock)()
    }

    /// Configuration events (generation applied). The gRPC `WatchEvents` merges these with
    /// the daemon's [`crate::Telemetry`] events.
    pub fn subscribe(&self) -> broadcast::Receiver<EventRecord> {
        self.events.subscribe()
    }

    /// Set when a failed publish could not be rolled back everywhere: some worker may run a
    /// generation other than the committed one until the next successful change.
    pub fn degraded(&self) -> Option<String> {
        self.degraded
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    // -----------------------------------------------------------------------------------
    // Generic CRUD over every object kind.

    /// Every object of kind `T`, in configuration order.
    pub fn list<T: Object>(&self) -> (Vec<T>, u64) {
        let s = self.snapshot();
        (T::all(&s.config).to_vec(), s.generation)
    }

    pub fn get<T: Object>(&self, name: &str) -> Result<(T, u64), ControlError> {
        let s = self.snapshot();
        T::all(&s.config)
            .iter()
            .find(|o| o.name() == name)
            .map(|o| (o.clone(), s.generation))
            .ok_or_else(|| not_found(T::KIND, name))
    }

    pub fn create<T: Object>(&self, obj: T) -> Result<Applied<T>, ControlError> {
        let name = obj.name().to_string();
        let generation = self.change(|c| {
            if T::all(c).iter().any(|o| o.name() == name) {
                return Err(ControlError::AlreadyExists {
                    kind: T::KIND,
                    name: name.clone(),
                });
            }
            T::all_mut(c).push(obj.clone());
            Ok(())
        })?;
        Ok(Applied {
            value: obj,
            generation,
        })
    }

    /// Replaces the object of the same name (its position, and so a rule's id and counters,
    /// are kept).
    pub fn update<T: Object>(&self, obj: T) -> Result<Applied<T>, ControlError> {
        let name = obj.name().to_string();
        let generation = self.change(|c| {
            let slot = T::all_mut(c)
                .iter_mut()
                .find(|o| o.name() == name)
                .ok_or_else(|| not_found(T::KIND, &name))?;
            *slot = obj.clone();
            Ok(())
        })?;
        Ok(Applied {
            value: obj,
            generation,
        })
    }

    /// Deletes an object; refused with [`ControlError::InUse`] while others reference it.
    pub fn delete<T: Object>(&self, name: &str) -> Result<Applied<()>, ControlError> {
        let generation = self.change(|c| {
            let pos = T::all(c)
                .iter()
                .position(|o| o.name() == name)
                .ok_or_else(|| not_found(T::KIND, name))?;
            let used_by = T::used_by(c, name);
            if !used_by.is_empty() {
                return Err(ControlError::InUse {
                    kind: T::KIND,
                    name: name.to_string(),
                    used_by,
                });
            }
            T::all_mut(c).remove(pos);
            Ok(())
        })?;
        Ok(Applied {
            value: (),
            generation,
        })
    }

    // -----------------------------------------------------------------------------------
    // Pool members.

    pub fn add_member(
        &self,
        pool: &str,
        member: Member,
    ) -> Result<Applied<BackendPool>, ControlError> {
        self.change_pool(pool, |p| {
            if p.members.iter().any(|m| m.address == member.address) {
                return Err(ControlError::AlreadyExists {
                    kind: Kind::Member,
                    name: format!("{}/{}", p.name, member.address),
                });
            }
            p.members.push(member.clone());
            Ok(())
        })
    }

    pub fn remove_member(
        &self,
        pool: &str,
        address: IpAddr,
    ) -> Result<Applied<BackendPool>, ControlError> {
        self.change_pool(pool, |p| {
            let pos = member_pos(p, address)?;
            p.members.remove(pos);
            Ok(())
        })
    }

    pub(crate) fn change_pool(
        &self,
        pool: &str,
        f: impl Fn(&mut BackendPool) -> Result<(), ControlError>,
    ) -> Result<Applied<BackendPool>, ControlError> {
        let mut out = None;
        let generation = self.change(|c| {
            let p = c
                .backend_pools
                .iter_mut()
                .find(|p| p.name == pool)
                .ok_or_else(|| not_found(Kind::BackendPool, pool))?;
            f(p)?;
            out = Some(p.clone());
            Ok(())
        })?;
        Ok(Applied {
            value: out.unwrap_or_else(|| BackendPool {
                name: pool.to_string(),
                members: Vec::new(),
            }),
            generation,
        })
    }

    // -----------------------------------------------------------------------------------
    // Whole configuration and health (daemon side).

    /// Replaces the whole configuration (a reload of the start-up file).
    pub fn replace_config(&self, config: Config) -> Result<u64, ControlError> {
        self.change(|c| {
            *c = config.clone();
            Ok(())
        })
    }

    /// Applies a whole configuration as one generation, all or nothing (a reload of the
    /// start-up file, `xlbctl config apply`). Restart-only settings keep their running value
    /// (the difference reports them); an empty difference applies nothing and keeps the
    /// generation; `dry_run` validates and compiles but applies nothing.
    pub fn apply_config(
        &self,
        config: Config,
        dry_run: bool,
    ) -> Result<ConfigApplied, ControlError> {
        let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.snapshot();
        let diff = config_diff::diff(&current.config, &config);
        let candidate = config_diff::keep_restart_only(&current.config, config);
        candidate.validate()?;
        if dry_run || !diff.applies_anything() {
            // Compiled too, so that a dry run finds what only compiling finds.
            let drained = self.publisher.drained(&current.rules);
            compile_releasing(
                &candidate,
                Some(&current.rules),
                &w.health,
                w.last_generation + 1,
                &drained,
            )?;
            return Ok(ConfigApplied {
                diff,
                generation: current.generation,
                applied: false,
            });
        }
        let health = w.health.clone();
        let generation = self.publish_locked(&mut w, &current, candidate, health)?;
        Ok(ConfigApplied {
            diff,
            generation,
            applied: true,
        })
    }

    /// Records probe verdicts and publishes the resulting rule set (same configuration, next
    /// generation). The daemon's probe loop calls this when a member's health flips.
    pub fn update_health(&self, f: impl FnOnce(&mut MemberHealth)) -> Result<u64, ControlError> {
        let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut health = w.health.clone();
        f(&mut health);
        let current = self.snapshot();
        self.publish_locked(&mut w, &current, current.config.clone(), health)
    }

    /// The one path of every configuration change.
    fn change(
        &self,
        f: impl FnOnce(&mut Config) -> Result<(), ControlError>,
    ) -> Result<u64, ControlError> {
        let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.snapshot();
        let mut candidate = current.config.clone();
        f(&mut candidate)?;
        candidate.validate()?;
        let health = w.health.clone();
        self.publish_locked(&mut w, &current, candidate, health)
    }

    /// Compiles `candidate` as the next generation, publishes it and commits (the health it
    /// was compiled with too: drains that `candidate` starts are stamped now). On a publish
    /// failure, the committed configuration is compiled again under a newer generation and
    /// published after it, so that a worker that did take the failed generation (late, or
    /// before another one timed out) returns to the committed configuration: the channels to
    /// the workers are FIFO, so every worker ends on the committed content.
    fn publish_locked(
        &self,
        w: &mut Writer,
        current: &Snapshot,
        candidate: Config,
        mut health: MemberHealth,
    ) -> Result<u64, ControlError> {
        let generation = w.last_generation + 1;
        let drained = self.publisher.drained(&current.rules);
        health.follow_drains(&candidate, (self.options.clock)());
        let rules = Arc::new(compile_releasing(
            &candidate,
            Some(&current.rules),
            &health,
            generation,
            &drained,
        )?);
        w.last_generation = generation;
        let deadline = self.options.publish_deadline;
        if let Err(e) = self.publisher.publish(Arc::clone(&rules), deadline) {
            self.roll_back(w, current, &rules, &e);
            return Err(publish_error(e));
        }
        *self
            .degraded
            .write()
            .unwrap_or_else(PoisonError::into_inner) = None;
        *self
            .committed
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(Snapshot {
            config: candidate,
            rules,
            generation,
            health: health.clone(),
        });
        w.health = health;
        let _ = self.events.send(EventRecord {
            at: SystemTime::now(),
            event: ControlEvent::GenerationApplied { generation },
        });
        Ok(generation)
    }

    fn roll_back(
        &self,
        w: &mut Writer,
        current: &Snapshot,
        failed: &Arc<RuleSet>,
        why: &PublishError,
    ) {
        let generation = w.last_generation + 1;
        // Compiled against the failed set so that ids of rules it introduced are not handed
        // to other rules while their flows may exist on a worker that took it.
        let rules = match compile(&current.config, Some(failed), &w.health, generation) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                // The committed configuration compiled before; this cannot fail, but say so
                // rather than panic if it ever does.
                self.set_degraded(format!("roll-back after \"{why}\" did not compile: {e}"));
                return;
            }
        };
        w.last_generation = generation;
        match self
            .publisher
            .publish(Arc::clone(&rules), self.options.publish_deadline)
        {
            Ok(()) => {
                *self.degraded.write().unwrap_or_else(PoisonError::into_inner) = None;
                *self.committed.write().unwrap_or_else(PoisonError::into_inner) =
                    Arc::new(Snapshot {
                        config: current.config.clone(),
                        rules,
                        generation,
                        health: w.health.clone(),
                    });
            }
            Err(e) => self.set_degraded(format!(
                "generation {} failed ({why}) and its roll-back, generation {generation}, too ({e}); workers may differ until the next successful change",
                failed.generation()
            )),
        }
    }

    fn set_degraded(&self, why: String) {
        *self
            .degraded
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(why);
    }
}

fn publish_error(e: PublishError) -> ControlError {
    match e {
        PublishError::Timeout { .. } => ControlError::DeadlineExceeded(e.to_string()),
        PublishError::Unavailable(_) => ControlError::Unavailable(e.to_string()),
    }
}

fn not_found(kind: Kind, name: &str) -> ControlError {
    ControlError::NotFound {
        kind,
        name: name.to_string(),
    }
}

pub(crate) fn member_pos(p: &BackendPool, address: IpAddr) -> Result<usize, ControlError> {
    let want = xlb_engine::Addr::from(address);
    p.members
        .iter()
        .position(|m| xlb_engine::Addr::from(m.address) == want)
        .ok_or_else(|| not_found(Kind::Member, &format!("{}/{address}", p.name)))
}
