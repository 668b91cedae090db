package dev.lockmanager.testenv;

import java.time.Instant;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * Java rewrites of the painless lock scripts in src/lock/scripts.rs, one method
 * per script, statement for statement, for the painless stand-in of the
 * Elasticsearch 8/9 test engine. Each runs only for the exact source text
 * whose SHA-256 testenv/elasticsearch/scripts.sha256 lists under its name:
 * when a script changes, rewrite its method here to match, then update its
 * line there (the Rust unit test `scripts::tests` prints the new hash).
 *
 * Painless semantics kept: {@code ==} on def values (equals, numbers by
 * value, null-safe), implicit def-to-long only from integral numbers, field
 * access on a map is get/put (a missing field reads null), iterating null or
 * parsing a malformed date fails the script, and the clock is the engine's.
 */
final class LockScripts {
    private LockScripts() {
    }

    /** One script: ctx (op, _source), params, the engine's clock in epoch millis. */
    @FunctionalInterface
    interface Body {
        void run(Map<String, Object> ctx, Map<String, Object> params, long now);
    }

    static final Map<String, Body> ALL = Map.of(
        "ACQUIRE", LockScripts::acquire,
        "RELEASE", LockScripts::release,
        "EXTEND", LockScripts::extend,
        "SEMAPHORE_SET", LockScripts::semaphoreSet,
        "SEMAPHORE_DELETE", LockScripts::semaphoreDelete,
        "ACQUIRE_PERMITS", LockScripts::acquirePermits);

    static void acquire(Map<String, Object> ctx, Map<String, Object> params, long now) {
        Map<String, Object> src = source(ctx);
        boolean semaphore = src.get("kind") != null;
        boolean mine = src.get("token") != null && eq(src.get("token"), params.get("token"));
        boolean free = eq(ctx.get("op"), "create") || src.get("expiresAt") == null
            || millis(src.get("expiresAt")) <= now;
        if (semaphore || (mine && src.get("fencingToken") == null && params.get("fencingToken") == null)) {
            ctx.put("op", "noop");
        } else if (mine || free) {
            if (!mine) {
                src.remove("fencingToken");
            } else if (src.get("fencingToken") == null) {
                src.put("fencingToken", params.get("fencingToken"));
            }
            Instant at = Instant.ofEpochMilli(now);
            src.put("token", params.get("token"));
            src.put("createdAt", at.toString());
            src.put("expiresAt", at.plusMillis(defToLong(params.get("ttl"))).toString());
            src.put("metadata", params.get("metadata"));
            src.put("holder", params.get("holder"));
        } else {
            ctx.put("op", "noop");
        }
    }

    static void release(Map<String, Object> ctx, Map<String, Object> params, long now) {
        Map<String, Object> src = source(ctx);
        if (eq(src.get("kind"), "semaphore")) {
            List<Object> kept = new ArrayList<>();
            boolean found = false;
            for (Object h : iterable(src.get("holders"))) {
                if (eq(map(h).get("token"), params.get("token"))) {
                    found = true;
                } else {
                    kept.add(h);
                }
            }
            if (found) {
                src.put("holders", kept);
            } else {
                ctx.put("op", "noop");
            }
        } else if (src.get("kind") == null && src.get("token") != null && eq(src.get("token"), params.get("token"))) {
            ctx.put("op", "delete");
        } else {
            ctx.put("op", "noop");
        }
    }

    static void extend(Map<String, Object> ctx, Map<String, Object> params, long now) {
        Map<String, Object> src = source(ctx);
        if (eq(src.get("kind"), "semaphore")) {
            Map<String, Object> mine = null;
            for (Object h : iterable(src.get("holders"))) {
                if (eq(map(h).get("token"), params.get("token"))) {
                    mine = map(h);
                }
            }
            boolean same = mine != null
                && (params.get("fencingToken") == null || eq(mine.get("fencingToken"), params.get("fencingToken")));
            if (same && millis(mine.get("expiresAt")) > now) {
                mine.put("expiresAt", Instant.ofEpochMilli(now).plusMillis(defToLong(params.get("ttl"))).toString());
            } else {
                ctx.put("op", "noop");
            }
        } else {
            boolean mine = src.get("kind") == null && src.get("token") != null
                && eq(src.get("token"), params.get("token"));
            boolean live = src.get("expiresAt") != null && millis(src.get("expiresAt")) > now;
            boolean same = params.get("fencingToken") == null
                ? src.get("fencingToken") != null
                : (src.get("fencingToken") == null
                    ? eq(params.get("checked"), true)
                    : eq(src.get("fencingToken"), params.get("fencingToken")));
            if (mine && live && same) {
                src.put("expiresAt", Instant.ofEpochMilli(now).plusMillis(defToLong(params.get("ttl"))).toString());
                if (src.get("fencingToken") == null && params.get("fencingToken") != null) {
                    src.put("fencingToken", params.get("fencingToken"));
                }
            } else {
                ctx.put("op", "noop");
            }
        }
    }

    static void semaphoreSet(Map<String, Object> ctx, Map<String, Object> params, long now) {
        Map<String, Object> src = source(ctx);
        boolean semaphore = eq(src.get("kind"), "semaphore");
        boolean liveMutex = !semaphore && !eq(ctx.get("op"), "create") && src.get("expiresAt") != null
            && millis(src.get("expiresAt")) > now;
        if (liveMutex || (!semaphore && src.get("kind") != null)) {
            ctx.put("op", "noop");
        } else {
            boolean changed = false;
            if (!semaphore) {
                src.clear();
                src.put("kind", "semaphore");
                src.put("holders", new ArrayList<>());
                changed = true;
            }
            long limit = number(params.get("limit"));
            if (src.get("limit") == null || number(src.get("limit")) != limit) {
                src.put("limit", limit);
                changed = true;
            }
            if (src.get("fence") == null && params.get("fence") != null) {
                src.put("fence", number(params.get("fence")));
                changed = true;
            }
            if (!changed) {
                ctx.put("op", "noop");
            }
        }
    }

    static void semaphoreDelete(Map<String, Object> ctx, Map<String, Object> params, long now) {
        Map<String, Object> src = source(ctx);
        boolean held = false;
        if (eq(src.get("kind"), "semaphore")) {
            for (Object h : iterable(src.get("holders"))) {
                if (millis(map(h).get("expiresAt")) > now) {
                    held = true;
                }
            }
        }
        if (eq(src.get("kind"), "semaphore") && !held) {
            ctx.put("op", "delete");
        } else {
            ctx.put("op", "noop");
        }
    }

    static void acquirePermits(Map<String, Object> ctx, Map<String, Object> params, long now) {
        Map<String, Object> src = source(ctx);
        if (!eq(src.get("kind"), "semaphore")) {
            ctx.put("op", "noop");
            return;
        }
        boolean changed = false;
        if (src.get("fence") == null && params.get("fence") != null) {
            src.put("fence", number(params.get("fence")));
            changed = true;
        }
        Instant at = Instant.ofEpochMilli(now);
        List<Object> live = new ArrayList<>();
        Map<String, Object> mine = null;
        for (Object h : iterable(src.get("holders"))) {
            if (millis(map(h).get("expiresAt")) > now) {
                live.add(h);
                if (eq(map(h).get("token"), params.get("token"))) {
                    mine = map(h);
                }
            }
        }
        if (mine != null) {
            mine.put("expiresAt", at.plusMillis(defToLong(params.get("ttl"))).toString());
            mine.put("metadata", params.get("metadata"));
            mine.put("holder", params.get("holder"));
            changed = true;
        } else if (src.get("fence") != null) {
            long limit = number(src.get("limit"));
            long held = 0;
            boolean exclusiveHeld = false;
            for (Object h : live) {
                held += number(map(h).get("permits"));
                if (eq(map(h).get("exclusive"), true)) {
                    exclusiveHeld = true;
                }
            }
            boolean exclusive = eq(params.get("exclusive"), true);
            long permits = exclusive ? limit : number(params.get("permits"));
            boolean fits = exclusive ? live.isEmpty() && limit >= 1 : !exclusiveHeld && held + permits <= limit;
            if (fits) {
                long fence = number(src.get("fence")) + 1;
                src.put("fence", fence);
                Map<String, Object> grant = new HashMap<>();
                grant.put("token", params.get("token"));
                grant.put("permits", permits);
                grant.put("exclusive", exclusive);
                grant.put("fencingToken", fence);
                grant.put("createdAt", at.toString());
                grant.put("expiresAt", at.plusMillis(defToLong(params.get("ttl"))).toString());
                grant.put("holder", params.get("holder"));
                grant.put("metadata", params.get("metadata"));
                live.add(grant);
                changed = true;
            }
        }
        if (changed) {
            src.put("holders", live);
        } else {
            ctx.put("op", "noop");
        }
    }

    // ---- painless's def semantics, as far as the scripts use them ----

    @SuppressWarnings("unchecked")
    private static Map<String, Object> source(Map<String, Object> ctx) {
        return (Map<String, Object>) ctx.get("_source");
    }

    /** Field access on a def that must be a map ({@code h.token}). */
    @SuppressWarnings("unchecked")
    private static Map<String, Object> map(Object value) {
        if (value == null) {
            throw new NullPointerException("cannot access a field of null");
        }
        return (Map<String, Object>) value;
    }

    /** {@code for (def h : value)}: null or a non-iterable fails the script. */
    private static Iterable<?> iterable(Object value) {
        if (value == null) {
            throw new NullPointerException("cannot iterate over null");
        }
        return (Iterable<?>) value;
    }

    /** {@code Instant.parse(value.toString()).toEpochMilli()}. */
    private static long millis(Object value) {
        if (value == null) {
            throw new NullPointerException("cannot call toString() on null");
        }
        return Instant.parse(value.toString()).toEpochMilli();
    }

    /** {@code ((Number) value).longValue()}. */
    private static long number(Object value) {
        if (value == null) {
            throw new NullPointerException("cannot call longValue() on null");
        }
        return ((Number) value).longValue();
    }

    /** The implicit def-to-long cast of a method argument: integral numbers only. */
    private static long defToLong(Object value) {
        if (value instanceof Long || value instanceof Integer || value instanceof Short || value instanceof Byte) {
            return ((Number) value).longValue();
        }
        throw new ClassCastException("cannot cast " + (value == null ? "null" : value.getClass().getSimpleName())
            + " to long");
    }

    /** Painless {@code ==} on def values: null-safe; numbers by value; otherwise equals. */
    static boolean eq(Object left, Object right) {
        if (left == right) {
            return true;
        }
        if (left == null || right == null) {
            return false;
        }
        if (left instanceof Number a && right instanceof Number b) {
            if (isFloating(a) || isFloating(b)) {
                return a.doubleValue() == b.doubleValue();
            }
            return a.longValue() == b.longValue();
        }
        return left.equals(right);
    }

    private static boolean isFloating(Number n) {
        return n instanceof Double || n instanceof Float;
    }
}
