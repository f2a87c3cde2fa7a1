//! The users a replica saw make labelled creates that the webhook does not
//! take for Velero, by restore: the webhook records them as it reviews, and
//! the restore companion of the same process, once the Restore has finished,
//! writes one Warning Event on the Restore per user (`kubectl describe
//! restore`), since Velero's later writes from that user skip the webhook.
//! Bounded: a user of one namespace labelling objects with made-up restore
//! names fills at most [`MAX_RESTORES`] entries, never memory.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// Restores remembered at once; further ones are not recorded.
pub const MAX_RESTORES: usize = 256;
/// Users remembered per restore.
pub const MAX_USERS: usize = 4;

#[derive(Debug, Default)]
pub struct Unrecognised {
    by_restore: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

impl Unrecognised {
    /// `user` made a labelled create for `restore` and is not Velero.
    pub fn record(&self, restore: &str, user: &str) {
        let mut by_restore = self.by_restore.lock().unwrap_or_else(|e| e.into_inner());
        if !by_restore.contains_key(restore) && by_restore.len() >= MAX_RESTORES {
            return;
        }
        let users = by_restore.entry(restore.to_string()).or_default();
        if users.len() < MAX_USERS {
            users.insert(user.to_string());
        }
    }

    /// The users recorded for `restore`, forgotten now (the companion
    /// handles a Restore once).
    pub fn take(&self, restore: &str) -> Vec<String> {
        self.by_restore
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(restore)
            .map(|users| users.into_iter().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_kept_per_restore_within_bounds_and_taken_once() {
        let seen = Unrecognised::default();
        seen.record("r1", "kubernetes-admin");
        seen.record("r1", "kubernetes-admin");
        seen.record("r1", "system:serviceaccount:velero:velero-server");
        for i in 0..10 {
            seen.record("r2", &format!("user-{i}"));
        }
        for i in 0..(MAX_RESTORES * 2) {
            seen.record(&format!("made-up-{i}"), "attacker");
        }
        assert_eq!(
            seen.take("r1"),
            [
                "kubernetes-admin",
                "system:serviceaccount:velero:velero-server"
            ]
        );
        assert!(seen.take("r1").is_empty(), "taken once");
        assert_eq!(seen.take("r2").len(), MAX_USERS);
        let kept = (0..(MAX_RESTORES * 2))
            .filter(|i| !seen.take(&format!("made-up-{i}")).is_empty())
            .count();
        assert_eq!(kept, MAX_RESTORES - 2);
    }
}
