//! Sessions: a client's handle on a model plus its cache strategy, kept in a `DashMap`.
//!
//! Only `Send + Sync` metadata lives here. Cached tensors belong to the running generation on the
//! engine thread; the session carries the requests (switch, reset, cancel) that the engine applies
//! at the next step boundary, and the byte count the engine reports back.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;

use crate::cache::CacheConfig;
use crate::config::Limits;
use crate::error::{echo, ServiceError, ServiceResult};

/// Requests for a running generation, applied at its next step boundary.
#[derive(Debug, Default)]
pub struct PendingControl {
    /// A new strategy to start with fresh state.
    pub switch_to: Option<CacheConfig>,
    /// Drop the cached tensors of the current strategy.
    pub reset: bool,
}

#[derive(Debug)]
pub struct Session {
    pub id: String,
    pub model: String,
    pub labels: HashMap<String, String>,
    pub created_at: SystemTime,
    pub idle_timeout: Duration,
    /// Closed automatically when its one generation ends (the inline form of Generate).
    pub ephemeral: bool,
    cache: Mutex<CacheConfig>,
    pending: Mutex<PendingControl>,
    generating: AtomicBool,
    cancel: AtomicBool,
    cache_bytes: AtomicU64,
    generations_run: AtomicU64,
    last_activity: Mutex<(Instant, SystemTime)>,
}

impl Session {
    pub fn cache(&self) -> CacheConfig {
        self.cache.lock().expect("cache lock").clone()
    }

    pub fn is_generating(&self) -> bool {
        self.generating.load(Ordering::Acquire)
    }

    pub fn cache_bytes(&self) -> u64 {
        self.cache_bytes.load(Ordering::Relaxed)
    }

    pub fn set_cache_bytes(&self, bytes: u64) {
        self.cache_bytes.store(bytes, Ordering::Relaxed);
    }

    pub fn generations_run(&self) -> u64 {
        self.generations_run.load(Ordering::Relaxed)
    }

    pub fn last_activity(&self) -> SystemTime {
        self.last_activity.lock().expect("activity lock").1
    }

    pub fn touch(&self) {
        *self.last_activity.lock().expect("activity lock") = (Instant::now(), SystemTime::now());
    }

    fn idle_for(&self) -> Duration {
        self.last_activity
            .lock()
            .expect("activity lock")
            .0
            .elapsed()
    }

    /// Replaces the strategy: future generations use it, and a running one switches at its next
    /// step boundary (a switch supersedes a pending reset: the new strategy starts empty anyway).
    pub fn set_cache(&self, config: CacheConfig) {
        *self.cache.lock().expect("cache lock") = config.clone();
        if self.is_generating() {
            let mut pending = self.pending.lock().expect("pending lock");
            pending.switch_to = Some(config);
            pending.reset = false;
        }
        self.touch();
    }

    /// Asks a running generation to drop its cached tensors at the next step boundary. Between
    /// generations there is nothing cached (state is freed when a generation ends).
    pub fn reset_cache(&self) {
        if self.is_generating() {
            self.pending.lock().expect("pending lock").reset = true;
        }
        self.touch();
    }

    /// Takes the requests made since the last step boundary.
    pub fn take_pending(&self) -> PendingControl {
        std::mem::take(&mut *self.pending.lock().expect("pending lock"))
    }

    /// Asks the running generation to stop; returns whether one was running.
    pub fn cancel(&self) -> bool {
        let running = self.is_generating();
        if running {
            self.cancel.store(true, Ordering::Release);
        }
        self.touch();
        running
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }
}

/// Marks its session as generating; releasing it (explicitly before the client is told how the
/// generation ended, or by dropping it) frees the session for the next one and closes an
/// ephemeral session.
#[derive(Debug)]
pub struct GenerationGuard {
    session: Arc<Session>,
    store: Arc<SessionStore>,
    /// The engine admitted the generation (it counts in `generations_run`).
    started: bool,
    released: bool,
}

impl GenerationGuard {
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// The engine admitted the generation and prepared it.
    pub fn mark_started(&mut self) {
        self.started = true;
    }

    /// Frees the session now (idempotent). The engine calls it before it sends a generation's
    /// last event, so that a client that saw the end can start the next generation at once.
    pub fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let s = &self.session;
        if self.started {
            s.generations_run.fetch_add(1, Ordering::Relaxed);
        }
        s.set_cache_bytes(0);
        *s.pending.lock().expect("pending lock") = PendingControl::default();
        s.cancel.store(false, Ordering::Release);
        s.touch();
        s.generating.store(false, Ordering::Release);
        if s.ephemeral {
            self.store.remove(&s.id);
        }
    }
}

impl Drop for GenerationGuard {
    fn drop(&mut self) {
        self.release();
    }
}

/// Session ids are UUIDs (36 bytes): anything much longer is not one, and is not looked up.
const MAX_SESSION_ID_BYTES: usize = 64;

/// Refuses ids that cannot be a session's without looking them up.
fn plausible_id(id: &str) -> ServiceResult<()> {
    if id.len() > MAX_SESSION_ID_BYTES {
        return Err(ServiceError::SessionNotFound(echo(id)));
    }
    Ok(())
}

/// All open sessions.
#[derive(Debug)]
pub struct SessionStore {
    sessions: DashMap<String, Arc<Session>>,
    /// Counts persistent sessions against `limits.max_sessions` (reserved before insertion, so
    /// concurrent creates cannot overshoot).
    persistent: AtomicUsize,
    limits: Limits,
}

pub struct NewSession {
    pub model: String,
    pub cache: CacheConfig,
    /// `None`: the server default.
    pub idle_timeout: Option<Duration>,
    pub labels: HashMap<String, String>,
    pub ephemeral: bool,
}

impl SessionStore {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            sessions: DashMap::new(),
            persistent: AtomicUsize::new(0),
            limits,
        })
    }

    pub fn create(&self, new: NewSession) -> ServiceResult<Arc<Session>> {
        let idle_timeout = new
            .idle_timeout
            .unwrap_or(self.limits.default_idle_timeout());
        if idle_timeout > Duration::from_secs(self.limits.max_idle_timeout_secs) {
            return Err(ServiceError::invalid(
                "idle_timeout_seconds",
                format!("at most {} seconds", self.limits.max_idle_timeout_secs),
            ));
        }
        self.check_labels(&new.labels)?;
        if !new.ephemeral
            && self.persistent.fetch_add(1, Ordering::AcqRel) >= self.limits.max_sessions
        {
            self.persistent.fetch_sub(1, Ordering::AcqRel);
            return Err(ServiceError::ResourceExhausted(format!(
                "the server already holds its maximum of {} sessions",
                self.limits.max_sessions
            )));
        }
        let session = Arc::new(Session {
            id: uuid::Uuid::new_v4().to_string(),
            model: new.model,
            labels: new.labels,
            created_at: SystemTime::now(),
            idle_timeout,
            ephemeral: new.ephemeral,
            cache: Mutex::new(new.cache),
            pending: Mutex::default(),
            generating: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            cache_bytes: AtomicU64::new(0),
            generations_run: AtomicU64::new(0),
            last_activity: Mutex::new((Instant::now(), SystemTime::now())),
        });
        self.sessions.insert(session.id.clone(), session.clone());
        Ok(session)
    }

    /// Labels within the count and byte limits (a huge label would make every `ListSessions`
    /// answer too large to send).
    fn check_labels(&self, labels: &HashMap<String, String>) -> ServiceResult<()> {
        let l = &self.limits;
        if labels.len() > l.max_labels {
            return Err(ServiceError::invalid(
                "labels",
                format!("at most {} labels", l.max_labels),
            ));
        }
        let mut total = 0;
        for (key, value) in labels {
            if key.is_empty() || key.len() > l.max_label_key_bytes {
                return Err(ServiceError::invalid(
                    "labels",
                    format!(
                        "key `{}` must be 1 to {} bytes",
                        echo(key),
                        l.max_label_key_bytes
                    ),
                ));
            }
            if value.len() > l.max_label_value_bytes {
                return Err(ServiceError::invalid(
                    format!("labels[{}]", echo(key)),
                    format!(
                        "value of {} bytes exceeds {} bytes",
                        value.len(),
                        l.max_label_value_bytes
                    ),
                ));
            }
            total += key.len() + value.len();
        }
        if total > l.max_labels_bytes {
            return Err(ServiceError::invalid(
                "labels",
                format!(
                    "{total} bytes of keys and values exceed {} bytes",
                    l.max_labels_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Looks a session up and counts the lookup as activity.
    pub fn get(&self, id: &str) -> ServiceResult<Arc<Session>> {
        plausible_id(id)?;
        // Clone the Arc out: a DashMap guard must never be held across an await or another call.
        let session = self
            .sessions
            .get(id)
            .map(|s| s.value().clone())
            .ok_or_else(|| ServiceError::SessionNotFound(echo(id)))?;
        session.touch();
        Ok(session)
    }

    pub fn list(&self) -> Vec<Arc<Session>> {
        let mut all: Vec<_> = self.sessions.iter().map(|s| s.value().clone()).collect();
        all.sort_by_key(|s| s.created_at);
        all
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Marks the session as generating, or refuses if it already is.
    pub fn begin_generation(
        self: &Arc<Self>,
        session: &Arc<Session>,
    ) -> ServiceResult<GenerationGuard> {
        if session
            .generating
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(ServiceError::FailedPrecondition(format!(
                "session `{}` is already generating; cancel it or wait for it to finish",
                session.id
            )));
        }
        session.cancel.store(false, Ordering::Release);
        session.touch();
        Ok(GenerationGuard {
            session: session.clone(),
            store: self.clone(),
            started: false,
            released: false,
        })
    }

    /// Removes the session; a running generation is cancelled at its next step boundary and its
    /// cached tensors are dropped with it. Returns the cache bytes it held.
    pub fn close(&self, id: &str) -> ServiceResult<u64> {
        plausible_id(id)?;
        let session = self
            .remove(id)
            .ok_or_else(|| ServiceError::SessionNotFound(echo(id)))?;
        session.cancel();
        Ok(session.cache_bytes())
    }

    fn remove(&self, id: &str) -> Option<Arc<Session>> {
        let (_, session) = self.sessions.remove(id)?;
        if !session.ephemeral {
            self.persistent.fetch_sub(1, Ordering::AcqRel);
        }
        Some(session)
    }

    /// Closes sessions idle past their timeout (never one that is generating). Returns their ids.
    pub fn evict_idle(&self) -> Vec<String> {
        let expired: Vec<String> = self
            .sessions
            .iter()
            .filter(|s| !s.is_generating() && s.idle_for() >= s.idle_timeout)
            .map(|s| s.id.clone())
            .collect();
        expired
            .into_iter()
            .filter(|id| self.remove(id).is_some())
            .collect()
    }

    /// Runs `evict_idle` periodically until the store is dropped.
    pub fn spawn_evictor(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let store = Arc::downgrade(self);
        let period = Duration::from_millis(self.limits.eviction_interval_ms.max(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(store) = store.upgrade() else { break };
                for id in store.evict_idle() {
                    tracing::info!(session_id = %id, "evicted idle session");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max_sessions: usize) -> Arc<SessionStore> {
        SessionStore::new(Limits {
            max_sessions,
            ..Limits::default()
        })
    }

    fn new_session(idle: Option<Duration>) -> NewSession {
        NewSession {
            model: "m".into(),
            cache: CacheConfig::None,
            idle_timeout: idle,
            labels: HashMap::new(),
            ephemeral: false,
        }
    }

    #[test]
    fn lifecycle_and_limits() {
        let store = store(2);
        let a = store.create(new_session(None)).unwrap();
        store.create(new_session(None)).unwrap();
        let err = store.create(new_session(None)).unwrap_err();
        assert!(matches!(err, ServiceError::ResourceExhausted(_)));
        assert_eq!(store.close(&a.id).unwrap(), 0);
        assert!(matches!(
            store.get(&a.id),
            Err(ServiceError::SessionNotFound(_))
        ));
        store.create(new_session(None)).unwrap();
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn one_generation_at_a_time_and_guard_frees() {
        let store = store(4);
        let s = store.create(new_session(None)).unwrap();
        let mut guard = store.begin_generation(&s).unwrap();
        guard.mark_started();
        assert!(matches!(
            store.begin_generation(&s),
            Err(ServiceError::FailedPrecondition(_))
        ));
        s.set_cache(CacheConfig::FirstBlockCache(
            crate::cache::config::FirstBlockCacheConfig { threshold: 0.1 },
        ));
        s.reset_cache();
        let pending = s.take_pending();
        assert!(pending.switch_to.is_some() && pending.reset);
        assert!(s.cancel());
        drop(guard);
        assert!(!s.is_generating() && !s.is_cancelled());
        assert_eq!(s.generations_run(), 1);
        assert!(!s.cancel(), "nothing to cancel after the generation ended");
        // A generation the engine never admitted does not count.
        drop(store.begin_generation(&s).unwrap());
        assert_eq!(s.generations_run(), 1);
        // Released early, the guard frees the session once.
        let mut guard = store.begin_generation(&s).unwrap();
        guard.mark_started();
        guard.release();
        assert!(!s.is_generating());
        drop(guard);
        assert_eq!(s.generations_run(), 2);
    }

    #[test]
    fn labels_are_bounded_in_count_and_bytes() {
        let store = store(4);
        let with = |labels: Vec<(String, String)>| NewSession {
            labels: labels.into_iter().collect(),
            ..new_session(None)
        };
        let field = |r: ServiceResult<Arc<Session>>| match r {
            Err(ServiceError::InvalidArgument { field, .. }) => field,
            other => panic!("expected invalid labels, got {other:?}"),
        };
        assert_eq!(
            field(store.create(with(vec![("k".into(), "v".repeat(5 << 20))]))),
            "labels[k]"
        );
        assert_eq!(
            field(store.create(with(vec![("k".repeat(129), "v".into())]))),
            "labels"
        );
        assert_eq!(
            field(store.create(with(vec![(String::new(), "v".into())]))),
            "labels"
        );
        let big: Vec<_> = (0..20)
            .map(|i| (format!("k{i}"), "v".repeat(1000)))
            .collect();
        assert_eq!(field(store.create(with(big))), "labels");
        let fine: Vec<_> = (0..8)
            .map(|i| (format!("k{i}"), "v".repeat(1000)))
            .collect();
        assert!(store.create(with(fine)).is_ok());
    }

    #[test]
    fn huge_ids_are_not_found_and_not_echoed_whole() {
        let store = store(4);
        let id = "x".repeat(100_000);
        for result in [store.get(&id).map(|_| ()), store.close(&id).map(|_| ())] {
            match result {
                Err(e @ ServiceError::SessionNotFound(_)) => assert!(e.to_string().len() < 200),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn evicts_only_idle_sessions() {
        let store = store(4);
        let idle = store
            .create(new_session(Some(Duration::from_millis(0))))
            .unwrap();
        let busy = store
            .create(new_session(Some(Duration::from_millis(0))))
            .unwrap();
        let _guard = store.begin_generation(&busy).unwrap();
        let kept = store
            .create(new_session(Some(Duration::from_secs(60))))
            .unwrap();
        assert_eq!(store.evict_idle(), vec![idle.id.clone()]);
        assert!(store.get(&busy.id).is_ok() && store.get(&kept.id).is_ok());
    }

    #[test]
    fn ephemeral_sessions_close_with_their_generation() {
        let store = store(1);
        let s = store
            .create(NewSession {
                ephemeral: true,
                ..new_session(None)
            })
            .unwrap();
        // Ephemeral sessions do not count against the session limit.
        store.create(new_session(None)).unwrap();
        drop(store.begin_generation(&s).unwrap());
        assert!(store.get(&s.id).is_err());
    }
}
