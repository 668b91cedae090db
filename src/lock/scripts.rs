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

/// Takes the lock if the document is new, expired, or already carries the
/// caller's token; otherwise a noop. A same-token re-acquire of a grant whose
/// fencing token is not stored yet is a noop too unless it brings the token
/// (`params.fencingToken`): the client then pins it with `if_seq_no`.
pub const ACQUIRE: &str = r#"
long now = System.currentTimeMillis();
def src = ctx._source;
boolean mine = src.token != null && src.token == params.token;
boolean free = ctx.op == 'create' || src.expiresAt == null
    || Instant.parse(src.expiresAt.toString()).toEpochMilli() <= now;
if (mine && src.fencingToken == null && params.fencingToken == null) {
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

/// Deletes the document only if it carries the caller's token.
pub const RELEASE: &str = r#"
if (ctx._source.token != null && ctx._source.token == params.token) {
  ctx.op = 'delete';
} else {
  ctx.op = 'noop';
}
"#;

/// Moves `expiresAt` to now + ttl only if the document carries the caller's
/// token AND its lease has not run out (an expired lease is over; unlike
/// Kibana it is not revived). The client tells "expired" from "not held" by
/// the token in the noop's `_source`.
pub const EXTEND: &str = r#"
long now = System.currentTimeMillis();
def src = ctx._source;
boolean mine = src.token != null && src.token == params.token;
boolean live = src.expiresAt != null
    && Instant.parse(src.expiresAt.toString()).toEpochMilli() > now;
if (mine && live) {
  src.expiresAt = Instant.ofEpochMilli(now).plusMillis(params.ttl).toString();
  if (src.fencingToken == null && params.fencingToken != null) {
    src.fencingToken = params.fencingToken;
  }
} else {
  ctx.op = 'noop';
}
"#;
