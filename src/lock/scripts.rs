//! The painless scripts that make every change to a lock document atomic. They
//! run on the search engine's primary shard, so "is it expired?" is decided by
//! the engine's clock, never by a client's.
//!
//! Fencing tokens: a grant's fencing token is the index's fencing floor plus
//! the `_seq_no` of the write that granted it, plus one (sequence numbers of a
//! shard only ever grow, across deletes and restarts). The grant write drops
//! any stored `fencingToken`, so while the field is absent the document's own
//! `_seq_no` implies the token. Every later write stores it first
//! (`params.fencingToken`, worked out by the client from the `_seq_no` it
//! read and written with `if_seq_no`), so no write ever moves it. Painless
//! update scripts cannot read `_seq_no`, hence that compare-and-swap.
//!
//! Semaphores (`kind: "semaphore"`) keep `fence`, the last fencing token
//! handed out for the key, and give each grant `fence + 1` (stored in its
//! holder entry; `fence` moves up with it). A new semaphore document leaves
//! `fence` out: like a mutex grant's token it is implied by the `_seq_no` of
//! the document's last write (fencing floor + `_seq_no` + 1) and pinned by a
//! client with `params.fence` and `if_seq_no`; no permit is granted while it
//! is absent, so a crash between creating and pinning is harmless (the next
//! acquirer pins it). Why tokens stay monotone across kinds: every grant is a
//! write, and a write's `_seq_no` is at least the previous one's plus one,
//! so `fence <= floor + _seq_no(last write of the document) + 1` holds when
//! it is pinned and after every grant. The first permit (`fence + 1`) is
//! above every earlier token of the key, whose grant writes all came before
//! the pinned `_seq_no`; a mutex granted after the semaphore is deleted
//! gets `floor + _seq_no + 1` with a `_seq_no` above the delete's, so above
//! every permit's token. A mutex document is only turned into a semaphore
//! once its lease ran out, and a semaphore only goes away when no permit is
//! held; the mutex scripts never touch a semaphore's `fence` or holders.

/// Takes the lock if the document is new, expired, or already carries the
/// caller's token; otherwise a noop. A same-token re-acquire of a grant whose
/// fencing token is not stored yet is a noop too unless it brings the token
/// (`params.fencingToken`): the client then pins it with `if_seq_no`.
/// A semaphore document, or one of a kind this version does not know, is
/// never taken (a noop the client reports).
pub const ACQUIRE: &str = r#"
long now = System.currentTimeMillis();
def src = ctx._source;
boolean semaphore = src.kind != null;
boolean mine = src.token != null && src.token == params.token;
boolean free = ctx.op == 'create' || src.expiresAt == null
    || Instant.parse(src.expiresAt.toString()).toEpochMilli() <= now;
if (semaphore || (mine && src.fencingToken == null && params.fencingToken == null)) {
  ctx.op = 'noop';
} else if (mine || free) {
  if (!mine) {
    src.remove('fencingToken');
  } else if (src.fencingToken == null) {
    src.fencingToken = params.fencingToken;
  }
  Instant at = Instant.ofEpochMilli(now);
  src.token = params.token;
  src.createdAt = at.toString();
  src.expiresAt = at.plusMillis(params.ttl).toString();
  src.metadata = params.metadata;
  src.holder = params.holder;
} else {
  ctx.op = 'noop';
}
"#;

/// Deletes the document only if it carries the caller's token; on a
/// semaphore, removes the caller's holder entry (expired or not). A kind this
/// version does not know is left alone.
pub const RELEASE: &str = r#"
def src = ctx._source;
if (src.kind == 'semaphore') {
  List kept = new ArrayList();
  boolean found = false;
  for (def h : src.holders) {
    if (h.token == params.token) {
      found = true;
    } else {
      kept.add(h);
    }
  }
  if (found) {
    src.holders = kept;
  } else {
    ctx.op = 'noop';
  }
} else if (src.kind == null && src.token != null && src.token == params.token) {
  ctx.op = 'delete';
} else {
  ctx.op = 'noop';
}
"#;

/// Moves `expiresAt` to now + ttl only if the document carries the caller's
/// token AND its lease has not run out (an expired lease is over; unlike
/// Kibana it is not revived). The client tells "expired" from "not held" by
/// the token in the noop's `_source` (on a semaphore: in its holders).
/// `params.fencingToken`, when sent, names the grant the caller renews: a
/// stored token that differs (the same token granted again since) is a noop;
/// one not stored yet is pinned only with `params.checked`, which the client
/// sends with `if_seq_no` after checking the token implied by that `_seq_no`
/// (without it, a noop: the client checks, then sends it so). Sent without
/// one (a semaphore holder's renewal, whose key may have turned into a mutex
/// since it was read), a mutex whose token is not stored is not extended.
pub const EXTEND: &str = r#"
long now = System.currentTimeMillis();
def src = ctx._source;
if (src.kind == 'semaphore') {
  def mine = null;
  for (def h : src.holders) {
    if (h.token == params.token) {
      mine = h;
    }
  }
  boolean same = mine != null && (params.fencingToken == null || mine.fencingToken == params.fencingToken);
  if (same && Instant.parse(mine.expiresAt.toString()).toEpochMilli() > now) {
    mine.expiresAt = Instant.ofEpochMilli(now).plusMillis(params.ttl).toString();
  } else {
    ctx.op = 'noop';
  }
} else {
  boolean mine = src.kind == null && src.token != null && src.token == params.token;
  boolean live = src.expiresAt != null
      && Instant.parse(src.expiresAt.toString()).toEpochMilli() > now;
  boolean same = params.fencingToken == null ? src.fencingToken != null
      : (src.fencingToken == null ? params.checked == true : src.fencingToken == params.fencingToken);
  if (mine && live && same) {
    src.expiresAt = Instant.ofEpochMilli(now).plusMillis(params.ttl).toString();
    if (src.fencingToken == null && params.fencingToken != null) {
      src.fencingToken = params.fencingToken;
    }
  } else {
    ctx.op = 'noop';
  }
}
"#;

/// Creates the semaphore (also over a mutex document whose lease ran out)
/// or sets its limit; holders keep their permits. A live mutex is left alone
/// (a noop the client reports), so is a kind this version does not know.
/// `params.fence`, sent only with `if_seq_no`,
/// pins an absent `fence`. Nothing changed: a noop.
pub const SEMAPHORE_SET: &str = r#"
long now = System.currentTimeMillis();
def src = ctx._source;
boolean semaphore = src.kind == 'semaphore';
boolean liveMutex = !semaphore && ctx.op != 'create' && src.expiresAt != null
    && Instant.parse(src.expiresAt.toString()).toEpochMilli() > now;
if (liveMutex || (!semaphore && src.kind != null)) {
  ctx.op = 'noop';
} else {
  boolean changed = false;
  if (!semaphore) {
    src.clear();
    src.kind = 'semaphore';
    src.holders = new ArrayList();
    changed = true;
  }
  long limit = ((Number) params.limit).longValue();
  if (src.limit == null || ((Number) src.limit).longValue() != limit) {
    src.limit = limit;
    changed = true;
  }
  if (src.fence == null && params.fence != null) {
    src.fence = ((Number) params.fence).longValue();
    changed = true;
  }
  if (!changed) {
    ctx.op = 'noop';
  }
}
"#;

/// Deletes a semaphore that has no live holder; otherwise (or on a mutex
/// document) a noop.
pub const SEMAPHORE_DELETE: &str = r#"
long now = System.currentTimeMillis();
def src = ctx._source;
boolean held = false;
if (src.kind == 'semaphore') {
  for (def h : src.holders) {
    if (Instant.parse(h.expiresAt.toString()).toEpochMilli() > now) {
      held = true;
    }
  }
}
if (src.kind == 'semaphore' && !held) {
  ctx.op = 'delete';
} else {
  ctx.op = 'noop';
}
"#;

/// Takes permits: drops holders whose lease ran out; refreshes the caller's
/// live holder entry (its fencing token kept); else grants `permits` (or,
/// `exclusive`, every permit) if they fit, with fencing token `fence + 1`.
/// A noop when they do not fit, when the document is not a semaphore, or
/// while `fence` is unpinned and `params.fence` (sent with `if_seq_no`) does
/// not pin it. A pin is written even when the permits do not fit. Every
/// write drops expired holders, so the caller's token in the written
/// document means a grant.
pub const ACQUIRE_PERMITS: &str = r#"
long now = System.currentTimeMillis();
def src = ctx._source;
if (src.kind != 'semaphore') {
  ctx.op = 'noop';
} else {
  boolean changed = false;
  if (src.fence == null && params.fence != null) {
    src.fence = ((Number) params.fence).longValue();
    changed = true;
  }
  Instant at = Instant.ofEpochMilli(now);
  List live = new ArrayList();
  def mine = null;
  for (def h : src.holders) {
    if (Instant.parse(h.expiresAt.toString()).toEpochMilli() > now) {
      live.add(h);
      if (h.token == params.token) {
        mine = h;
      }
    }
  }
  if (mine != null) {
    mine.expiresAt = at.plusMillis(params.ttl).toString();
    mine.metadata = params.metadata;
    mine.holder = params.holder;
    changed = true;
  } else if (src.fence != null) {
    long limit = ((Number) src.limit).longValue();
    long held = 0;
    boolean exclusiveHeld = false;
    for (def h : live) {
      held += ((Number) h.permits).longValue();
      if (h.exclusive == true) {
        exclusiveHeld = true;
      }
    }
    boolean exclusive = params.exclusive == true;
    long permits = exclusive ? limit : ((Number) params.permits).longValue();
    boolean fits = exclusive ? live.isEmpty() && limit >= 1 : !exclusiveHeld && held + permits <= limit;
    if (fits) {
      long fence = ((Number) src.fence).longValue() + 1;
      src.fence = fence;
      live.add(['token': params.token, 'permits': permits, 'exclusive': exclusive, 'fencingToken': fence,
          'createdAt': at.toString(), 'expiresAt': at.plusMillis(params.ttl).toString(),
          'holder': params.holder, 'metadata': params.metadata]);
      changed = true;
    }
  }
  if (changed) {
    src.holders = live;
  } else {
    ctx.op = 'noop';
  }
}
"#;

#[cfg(test)]
mod tests {
    /// Every script above, by the name testenv/elasticsearch/scripts.sha256 gives it.
    const ALL: &[(&str, &str)] = &[
        ("ACQUIRE", super::ACQUIRE),
        ("RELEASE", super::RELEASE),
        ("EXTEND", super::EXTEND),
        ("SEMAPHORE_SET", super::SEMAPHORE_SET),
        ("SEMAPHORE_DELETE", super::SEMAPHORE_DELETE),
        ("ACQUIRE_PERMITS", super::ACQUIRE_PERMITS),
    ];

    fn sha256(text: &str) -> String {
        ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn every_script_constant_is_listed() {
        let declared: Vec<&str> = include_str!("scripts.rs")
            .lines()
            .filter_map(|line| line.strip_prefix("pub const "))
            .filter_map(|rest| rest.strip_suffix(": &str = r#\""))
            .collect();
        let listed: Vec<&str> = ALL.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            declared, listed,
            "a script was added or removed: list it in ALL (and see the next test)"
        );
    }

    /// The Elasticsearch 8/9 test engines have no painless: a Java stand-in
    /// runs each script by the hash of its exact text. A changed script must
    /// fail here, not run the old semantics there.
    #[test]
    fn the_elasticsearch_8_and_9_stand_in_knows_every_script_as_it_is() {
        let file = include_str!("../../testenv/elasticsearch/scripts.sha256");
        let recorded: Vec<(&str, &str)> = file
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .filter_map(|line| line.split_once(char::is_whitespace))
            .map(|(hash, name)| (name.trim(), hash))
            .collect();
        let expected: Vec<(&str, String)> = ALL.iter().map(|(name, source)| (*name, sha256(source))).collect();
        let lines: String = expected
            .iter()
            .map(|(name, hash)| format!("{hash}  {name}\n"))
            .collect();
        for (name, hash) in &expected {
            let found = recorded.iter().find(|(n, _)| n == name).map(|(_, h)| *h);
            assert_eq!(
                found,
                Some(hash.as_str()),
                "the painless script {name} changed (or is new): the Elasticsearch 8/9 test engine's stand-in \
                 runs only the texts it was written for. Rewrite {name} in \
                 testenv/elasticsearch/src/main/java/dev/lockmanager/testenv/LockScripts.java to match, then \
                 give testenv/elasticsearch/scripts.sha256 these lines:\n{lines}"
            );
        }
        assert_eq!(
            recorded.len(),
            expected.len(),
            "testenv/elasticsearch/scripts.sha256 lists a script that src/lock/scripts.rs no longer has; \
             its lines should be:\n{lines}"
        );
    }
}
