//! The users a replica saw make labelled creates that the webhook does not
//! take for Velero, by restore: the webhook records them as it reviews, and
//! the restore companion of the same process, once the Restore has finished,
//! writes one Warning Event on the Restore per user (`kubectl describe
//! restore`), since Velero's later writes from that user skip the webhook.
//! Recorded only for Restores that exist. Bounded: at most [`MAX_RESTORES`]
//! restores (a new one evicts another, so the record never fills for
//! good), [`MAX_USERS`] users each, and user names cut to [`MAX_USER_BYTES`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// Restores remembered at once; further ones are not recorded.
pub const MAX_RESTORES: usize = 256;
/// Users remembered per restore.
pub const MAX_USERS: usize = 4;
/// A longer user name is cut (no ServiceAccount's is this long).
pub const MAX_USER_BYTES: usize = 256;

#[derive(Debug, Default)]
pub struct Unrecognised {
    by_restore: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

impl Unrecognised {
    /// `user` made a labelled create for `restore` and is not Velero.
    pub fn record(&self, restore: &str, user: &str) {
        let mut by_restore = self.by_restore.lock().unwrap_or_else(|e| e.into_inner());
        if !by_restore.contains_key(restore)
            && by_restore.len() >= MAX_RESTORES
            && let Some(evicted) = by_restore.keys().next().cloned()
        {
            by_restore.remove(&evicted);
        }
        let mut end = user.len().min(MAX_USER_BYTES);
        while !user.is_char_boundary(end) {
            end -= 1;
        }
        let users = by_restore.entry(restore.to_string()).or_default();
        if users.len() < MAX_USERS {
            users.insert(user[..end].to_string());
        }
    }

    /// Records `users` for `restore` again (their Event could not be
    /// written; the companion tries the Restore again).
    pub fn restore_users(&self, restore: &str, users: &[String]) {
        for user in users {
            self.record(restore, user);
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
        assert_eq!(
            seen.take("r1"),
            [
                "kubernetes-admin",
                "system:serviceaccount:velero:velero-server"
            ]
        );
        assert!(seen.take("r1").is_empty(), "taken once");
        assert_eq!(seen.take("r2").len(), MAX_USERS);
        seen.record("r1", "kubernetes-admin");
        for i in 0..(MAX_RESTORES * 2) {
            seen.record(&format!("made-up-{i:04}"), "attacker");
        }
        seen.record("r3", &"x".repeat(10_000));
        // Past the bound one entry is evicted: a later restore is still
        // recorded, and its user name cut.
        assert_eq!(seen.take("r3"), ["x".repeat(MAX_USER_BYTES)]);
        let kept = (0..(MAX_RESTORES * 2))
            .filter(|i| !seen.take(&format!("made-up-{i:04}")).is_empty())
            .count();
        assert!(kept < MAX_RESTORES, "{kept}");
        seen.restore_users("r4", &["velero-server".into()]);
        assert_eq!(seen.take("r4"), ["velero-server"]);
    }
}
