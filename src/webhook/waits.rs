//! Bounded, shared waits for VirtualMachineGroups.
//!
//! - Concurrent VMs naming the same group share one wait (one future woken
//!   by the group source), each still bounded by its own request's deadline.
//! - Waits are capped in total and per namespace: a flood of VMs naming a
//!   missing group (a wrong restore order, or a caller crafting reviews)
//!   cannot hold every review slot, so other reviews are still answered.
//! - A group whose wait just ran out without it appearing is remembered for a
//!   short time, and later VMs naming it are answered at once instead of each
//!   waiting the full bound again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::time::Instant;

use crate::facts::GroupFacts;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitLimits {
    /// Waits in progress at once, over all namespaces.
    pub max_total: usize,
    /// Waits in progress at once in one namespace.
    pub max_per_namespace: usize,
    /// How long a group that just timed out is answered at once.
    pub miss_memory: Duration,
}

impl Default for WaitLimits {
    fn default() -> Self {
        WaitLimits {
            max_total: 16,
            max_per_namespace: 2,
            miss_memory: Duration::from_secs(30),
        }
    }
}

/// Why a VM did not wait for its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoWait {
    /// A wait for this group ran out this long ago.
    RecentMiss { ago: Duration },
    /// `limit` waits are already in progress in this namespace.
    NamespaceFull { limit: usize },
    /// `limit` waits are already in progress.
    AllFull { limit: usize },
}

impl NoWait {
    /// For denial messages.
    pub fn describe(&self) -> String {
        match self {
            NoWait::RecentMiss { ago } => format!(
                "a wait for this group ran out {:.0}s ago, so this VM did not wait again",
                ago.as_secs_f64()
            ),
            NoWait::NamespaceFull { limit } => format!(
                "{limit} VMs in this namespace were already waiting for groups, so this VM did not wait"
            ),
            NoWait::AllFull { limit } => {
                format!("{limit} VMs were already waiting for groups, so this VM did not wait")
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    Appeared { waited: Duration },
    TimedOut { waited: Duration },
    NotWaited(NoWait),
}

type Key = (String, String);

struct SharedWait {
    appeared: Shared<BoxFuture<'static, ()>>,
    waiters: usize,
}

#[derive(Default)]
struct State {
    shared: HashMap<Key, SharedWait>,
    per_namespace: HashMap<String, usize>,
    total: usize,
    recent_misses: HashMap<Key, Instant>,
}

pub struct GroupWaits {
    limits: WaitLimits,
    state: Mutex<State>,
}

/// Leaves the wait's counts when dropped (also when the request is cancelled).
struct Ticket<'a> {
    waits: &'a GroupWaits,
    key: Key,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let Ok(mut state) = self.waits.state.lock() else {
            return;
        };
        state.total = state.total.saturating_sub(1);
        if let Some(count) = state.per_namespace.get_mut(&self.key.0) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.per_namespace.remove(&self.key.0);
            }
        }
        if let Some(shared) = state.shared.get_mut(&self.key) {
            shared.waiters = shared.waiters.saturating_sub(1);
            if shared.waiters == 0 {
                state.shared.remove(&self.key);
            }
        }
    }
}

fn key(namespace: &str, name: &str) -> Key {
    (namespace.to_string(), name.to_string())
}

impl GroupWaits {
    pub fn new(limits: WaitLimits) -> GroupWaits {
        GroupWaits {
            limits,
            state: Mutex::new(State::default()),
        }
    }

    /// Waits in progress now.
    pub fn in_progress(&self) -> usize {
        self.state.lock().map(|state| state.total).unwrap_or(0)
    }

    /// How long ago a wait for this group ran out, if that is remembered.
    pub fn recent_miss(&self, namespace: &str, name: &str) -> Option<Duration> {
        let mut state = self.state.lock().ok()?;
        let memory = self.limits.miss_memory;
        state.recent_misses.retain(|_, at| at.elapsed() < memory);
        state
            .recent_misses
            .get(&key(namespace, name))
            .map(|at| at.elapsed())
    }

    /// Remembers that a wait for this group ran out and a live check found
    /// it missing.
    pub fn remember_miss(&self, namespace: &str, name: &str) {
        if self.limits.miss_memory.is_zero() {
            return;
        }
        if let Ok(mut state) = self.state.lock() {
            state
                .recent_misses
                .insert(key(namespace, name), Instant::now());
        }
    }

    pub fn forget_miss(&self, namespace: &str, name: &str) {
        if let Ok(mut state) = self.state.lock() {
            state.recent_misses.remove(&key(namespace, name));
        }
    }

    fn enter<'a>(
        &'a self,
        groups: &dyn GroupFacts,
        namespace: &str,
        name: &str,
    ) -> Result<(Ticket<'a>, Shared<BoxFuture<'static, ()>>), NoWait> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| NoWait::AllFull { limit: 0 })?;
        if state.total >= self.limits.max_total {
            return Err(NoWait::AllFull {
                limit: self.limits.max_total,
            });
        }
        let in_namespace = state.per_namespace.get(namespace).copied().unwrap_or(0);
        if in_namespace >= self.limits.max_per_namespace {
            return Err(NoWait::NamespaceFull {
                limit: self.limits.max_per_namespace,
            });
        }
        let key = key(namespace, name);
        let shared = state
            .shared
            .entry(key.clone())
            .or_insert_with(|| SharedWait {
                appeared: groups.appeared(namespace, name).shared(),
                waiters: 0,
            });
        shared.waiters += 1;
        let appeared = shared.appeared.clone();
        state.total += 1;
        *state
            .per_namespace
            .entry(namespace.to_string())
            .or_insert(0) += 1;
        Ok((Ticket { waits: self, key }, appeared))
    }

    /// Waits until the group appears in `groups` or `until` passes.
    pub async fn wait(
        &self,
        groups: &dyn GroupFacts,
        namespace: &str,
        name: &str,
        until: Instant,
    ) -> WaitOutcome {
        let start = Instant::now();
        let (_ticket, appeared) = match self.enter(groups, namespace, name) {
            Ok(entered) => entered,
            Err(no_wait) => return WaitOutcome::NotWaited(no_wait),
        };
        tokio::select! {
            _ = appeared => WaitOutcome::Appeared { waited: start.elapsed() },
            _ = tokio::time::sleep_until(until) => {
                if groups.contains(namespace, name) {
                    WaitOutcome::Appeared { waited: start.elapsed() }
                } else {
                    WaitOutcome::TimedOut { waited: start.elapsed() }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::given::StaticGroups;
    use std::sync::Arc;

    fn limits(total: usize, per_namespace: usize) -> WaitLimits {
        WaitLimits {
            max_total: total,
            max_per_namespace: per_namespace,
            miss_memory: Duration::from_secs(30),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_waits_share_one_future_and_all_wake() {
        let groups = StaticGroups::new([]);
        let waits = Arc::new(GroupWaits::new(limits(10, 10)));
        let until = Instant::now() + Duration::from_secs(20);
        let mut handles = Vec::new();
        for _ in 0..3 {
            let (groups, waits) = (groups.clone(), waits.clone());
            handles.push(tokio::spawn(async move {
                waits.wait(groups.as_ref(), "ns", "g", until).await
            }));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(waits.in_progress(), 3);
        assert_eq!(
            waits.state.lock().unwrap().shared.len(),
            1,
            "one shared wait"
        );
        groups.insert("ns", "g");
        for handle in handles {
            let outcome = handle.await.unwrap();
            assert!(
                matches!(outcome, WaitOutcome::Appeared { waited } if waited < Duration::from_secs(3)),
                "{outcome:?}"
            );
        }
        assert_eq!(waits.in_progress(), 0);
        assert!(waits.state.lock().unwrap().shared.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn caps_refuse_extra_waits_per_namespace_and_in_total() {
        let groups = StaticGroups::new([]);
        let waits = Arc::new(GroupWaits::new(limits(3, 2)));
        let until = Instant::now() + Duration::from_secs(20);
        let mut held = Vec::new();
        for ns in ["a", "a", "b"] {
            let (groups, waits) = (groups.clone(), waits.clone());
            held.push(tokio::spawn(async move {
                waits.wait(groups.as_ref(), ns, "g", until).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(waits.in_progress(), 3);
        let full = waits.wait(groups.as_ref(), "c", "g", until).await;
        assert_eq!(full, WaitOutcome::NotWaited(NoWait::AllFull { limit: 3 }));
        held.pop().unwrap().abort();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(waits.in_progress(), 2, "a cancelled wait leaves its counts");
        let namespace_full = waits.wait(groups.as_ref(), "a", "other", until).await;
        assert_eq!(
            namespace_full,
            WaitOutcome::NotWaited(NoWait::NamespaceFull { limit: 2 })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn misses_are_remembered_for_a_while() {
        let groups = StaticGroups::new([]);
        let waits = GroupWaits::new(limits(10, 10));
        let outcome = waits
            .wait(
                groups.as_ref(),
                "ns",
                "g",
                Instant::now() + Duration::from_secs(5),
            )
            .await;
        assert!(
            matches!(outcome, WaitOutcome::TimedOut { waited } if waited >= Duration::from_secs(5))
        );
        waits.remember_miss("ns", "g");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(waits.recent_miss("ns", "g").is_some());
        tokio::time::sleep(Duration::from_secs(21)).await;
        assert!(waits.recent_miss("ns", "g").is_none());
        waits.remember_miss("ns", "g");
        waits.forget_miss("ns", "g");
        assert!(waits.recent_miss("ns", "g").is_none());
    }
}
