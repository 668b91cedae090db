//! The painless scripts that make every change to a lock document atomic. They
//! run on the search engine's primary shard, so "is it expired?" is decided by
//! the engine's clock, never by a client's.
//!
//! Fencing tokens: a grant's fencing token is the `_seq_no` of the write that
//! granted it (sequence numbers of a shard only ever grow, across deletes and
//! restarts). The grant write drops any stored `fencingToken`, so while the
//! field is absent the document's own `_seq_no` is the token; the first
//! extension stores it (`params.fencingToken`) so later writes don't move it.

/// Takes the lock if the document is new, expired, or already carries the
/// caller's token; otherwise a noop.
pub const ACQUIRE: &str = r#"
long now = System.currentTimeMillis();
def src = ctx._source;
boolean mine = src.token != null && src.token == params.token;
boolean free = ctx.op == 'create' || src.expiresAt == null
    || Instant.parse(src.expiresAt.toString()).toEpochMilli() <= now;
if (mine || free) {
  if (!mine) {
    src.remove('fencingToken');
  } else if (src.fencingToken == null && params.fencingToken != null) {
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

/// Deletes the document only if it carries the caller's token.
pub const RELEASE: &str = r#"
if (ctx._source.token != null && ctx._source.token == params.token) {
  ctx.op = 'delete';
} else {
  ctx.op = 'noop';
}
"#;

/// Moves `expiresAt` to now + ttl only if the document carries the caller's token.
pub const EXTEND: &str = r#"
if (ctx._source.token != null && ctx._source.token == params.token) {
  long now = System.currentTimeMillis();
  ctx._source.expiresAt = Instant.ofEpochMilli(now).plusMillis(params.ttl).toString();
  if (ctx._source.fencingToken == null && params.fencingToken != null) {
    ctx._source.fencingToken = params.fencingToken;
  }
} else {
  ctx.op = 'noop';
}
"#;
