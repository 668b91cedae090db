//! Lock ids: one rule for the CRD, the CLI and the library. A lock key becomes
//! a document id, sent as one percent-encoded path segment; `.` and `..` are
//! refused because URL parsers treat them (also encoded as `%2e`) as dot
//! segments and would change the request path.

use super::error::LockError;

/// Longest lock key (a document id).
pub const MAX_LOCK_KEY_LEN: usize = 512;
/// Longest bare lock id (`spec.lockId` of a DistributedLock).
pub const MAX_LOCK_ID_SEGMENT_LEN: usize = 200;

fn is_dot_segment(s: &str) -> bool {
    s == "." || s == ".."
}

/// A lock key: 1..512 characters of `[A-Za-z0-9._:/-]`, with no
/// `/`-separated segment equal to `.` or `..` (so neither `..` nor `ns/..`).
pub fn is_valid_lock_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_LOCK_KEY_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'))
        && !key.split('/').any(is_dot_segment)
}

/// A bare lock id (a DistributedLock's `spec.lockId`): 1..200 characters of
/// `[A-Za-z0-9._:-]`, not `.` or `..`.
pub fn is_valid_lock_id_segment(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LOCK_ID_SEGMENT_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        && !is_dot_segment(id)
}

/// Checks a lock key (what the library and `lockctl` take).
pub fn validate_lock_id(lock_id: &str) -> Result<(), LockError> {
    if is_valid_lock_key(lock_id) {
        Ok(())
    } else {
        Err(LockError::InvalidLockId(lock_id.to_string()))
    }
}

/// Checks a bare lock id (the CRD's `spec.lockId`).
pub fn validate_lock_id_segment(lock_id: &str) -> Result<(), LockError> {
    if is_valid_lock_id_segment(lock_id) {
        Ok(())
    } else {
        Err(LockError::InvalidLockId(lock_id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys() {
        for ok in [
            "reindex",
            "batch/reindex",
            "a.b_c:d-e",
            "...",
            "a..b",
            "ns/.x",
            &"x".repeat(512),
        ] {
            assert!(validate_lock_id(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(513);
        for bad in [
            "", "a b", "ä", "a?b", "a#b", "a%2eb", ".", "..", "ns/..", "./x", "a/./b", &long,
        ] {
            assert!(validate_lock_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bare_lock_ids_follow_the_crd_rule() {
        for ok in ["reindex", "a.b_c:d-e", "..x", &"x".repeat(200)] {
            assert!(validate_lock_id_segment(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(201);
        for bad in ["", ".", "..", "a/b", "a b", &long] {
            assert!(validate_lock_id_segment(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_bare_id_makes_a_valid_namespaced_key() {
        for id in ["reindex", "..x", "a:b"] {
            assert!(is_valid_lock_key(&format!("batch/{id}")));
        }
    }
}
