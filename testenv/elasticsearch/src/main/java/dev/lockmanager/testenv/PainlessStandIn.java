package dev.lockmanager.testenv;

import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.Collection;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.plugins.Plugin;
import org.elasticsearch.plugins.ScriptPlugin;
import org.elasticsearch.script.ScriptContext;
import org.elasticsearch.script.ScriptEngine;
import org.elasticsearch.script.ScriptException;
import org.elasticsearch.script.UpdateScript;

/**
 * The scripting language {@code painless} on a node that has no lang-painless
 * (it is not published to Maven Central for Elasticsearch 8/9): an engine that
 * knows only the lock scripts, each by the SHA-256 of its exact source text,
 * and runs a Java rewrite of it ({@link LockScripts}). Any other script,
 * including a lock script whose text changed, is refused at compile time, so a
 * changed script can never run against the old semantics.
 *
 * The hashes come from the file named by the system property
 * {@code klm.scripts} (testenv/elasticsearch/scripts.sha256): lines
 * {@code <sha256>  <NAME>}; the Rust unit tests check the same file against the
 * script constants in src/lock/scripts.rs.
 */
public final class PainlessStandIn extends Plugin implements ScriptPlugin {
    static final String LANG = "painless";
    static final String SCRIPTS_PROPERTY = "klm.scripts";

    @Override
    public ScriptEngine getScriptEngine(Settings settings, Collection<ScriptContext<?>> contexts) {
        return new Engine(knownScripts());
    }

    /**
     * sha256 → script name, read from the file named by {@code klm.scripts};
     * fails unless every name in it has a Java rewrite and every rewrite a line.
     */
    static Map<String, String> knownScripts() {
        String file = System.getProperty(SCRIPTS_PROPERTY);
        if (file == null) {
            throw new IllegalStateException("the painless stand-in needs -D" + SCRIPTS_PROPERTY
                + "=testenv/elasticsearch/scripts.sha256");
        }
        Map<String, String> byHash = new LinkedHashMap<>();
        List<String> lines;
        try {
            lines = Files.readAllLines(Path.of(file), StandardCharsets.UTF_8);
        } catch (IOException e) {
            throw new UncheckedIOException("cannot read the lock scripts' hashes from " + file, e);
        }
        for (String line : lines) {
            String text = line.strip();
            if (text.isEmpty() || text.startsWith("#")) {
                continue;
            }
            String[] parts = text.split("\\s+");
            if (parts.length != 2 || !parts[0].matches("[0-9a-f]{64}")) {
                throw new IllegalStateException(file + ": expected '<sha256>  <NAME>', got: " + line);
            }
            if (!LockScripts.ALL.containsKey(parts[1])) {
                throw new IllegalStateException(file + " names the script " + parts[1]
                    + ", which the painless stand-in (LockScripts.java) does not implement");
            }
            byHash.put(parts[0], parts[1]);
        }
        for (String name : LockScripts.ALL.keySet()) {
            if (!byHash.containsValue(name)) {
                throw new IllegalStateException(file + " has no hash for the script " + name);
            }
        }
        return byHash;
    }

    static String sha256(String source) {
        try {
            MessageDigest digest = MessageDigest.getInstance("SHA-256");
            return HexFormat.of().formatHex(digest.digest(source.getBytes(StandardCharsets.UTF_8)));
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    private record Engine(Map<String, String> byHash) implements ScriptEngine {
        @Override
        public String getType() {
            return LANG;
        }

        @Override
        public <T> T compile(String name, String source, ScriptContext<T> context, Map<String, String> options) {
            String hash = sha256(source);
            String script = byHash.get(hash);
            if (script == null) {
                throw refused(source, "script not known to the test engine's painless stand-in (sha256 " + hash
                    + "): only the lock scripts of src/lock/scripts.rs run here; if they changed, update "
                    + "testenv/elasticsearch/src/main/java/dev/lockmanager/testenv/LockScripts.java and "
                    + "testenv/elasticsearch/scripts.sha256");
            }
            if (!context.equals(UpdateScript.CONTEXT)) {
                throw refused(source, "the painless stand-in runs " + script + " as an update script only, not in the "
                    + context.name + " context");
            }
            LockScripts.Body body = LockScripts.ALL.get(script);
            UpdateScript.Factory factory = (params, ctx) -> new UpdateScript(params, ctx) {
                @Override
                public void execute() {
                    try {
                        body.run(getCtx(), getParams(), System.currentTimeMillis());
                    } catch (RuntimeException e) {
                        // as painless reports a runtime failure: script_exception, the cause underneath
                        throw new ScriptException("runtime error", e, List.of(script + " (painless stand-in)"),
                            source, LANG);
                    }
                }
            };
            return context.factoryClazz.cast(factory);
        }

        private static ScriptException refused(String source, String why) {
            return new ScriptException(why, new IllegalArgumentException(why), List.of(), source, LANG);
        }

        @Override
        public Set<ScriptContext<?>> getSupportedContexts() {
            return Set.of(UpdateScript.CONTEXT);
        }
    }
}
