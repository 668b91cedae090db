package dev.lockmanager.testenv;

import java.util.List;
import java.util.stream.Stream;

import org.opensearch.Version;
import org.opensearch.env.Environment;
import org.opensearch.node.Node;
import org.opensearch.painless.PainlessModulePlugin;
import org.opensearch.plugins.Plugin;
import org.opensearch.plugins.PluginInfo;
import org.opensearch.transport.Netty4ModulePlugin;

/**
 * OpenSearch 3.x: a node takes its classpath plugins as descriptors (what a
 * plugin's properties file would say), and the plugin classes were renamed.
 */
final class PluginNode extends Node {
    PluginNode(Environment environment) {
        super(environment,
            Stream.of(Netty4ModulePlugin.class, PainlessModulePlugin.class).map(PluginNode::describe).toList(),
            true);
    }

    private static PluginInfo describe(Class<? extends Plugin> plugin) {
        return new PluginInfo(plugin.getName(), "loaded from the classpath", "NA", Version.CURRENT,
            "21", plugin.getName(), List.of(), false);
    }
}
