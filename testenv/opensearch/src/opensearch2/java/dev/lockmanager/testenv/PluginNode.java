package dev.lockmanager.testenv;

import java.util.List;

import org.opensearch.env.Environment;
import org.opensearch.node.Node;
import org.opensearch.painless.PainlessPlugin;
import org.opensearch.transport.Netty4Plugin;

/** OpenSearch 2.x: a node takes its classpath plugins as classes. */
final class PluginNode extends Node {
    PluginNode(Environment environment) {
        super(environment, List.of(Netty4Plugin.class, PainlessPlugin.class), true);
    }
}
