package org.elasticsearch.node;

import java.util.Collection;

import org.elasticsearch.env.Environment;
import org.elasticsearch.plugins.MockPluginsService;
import org.elasticsearch.plugins.Plugin;
import org.elasticsearch.plugins.PluginsLoader;
import org.elasticsearch.plugins.PluginsService;

/**
 * A node whose plugins are classes on the classpath (the test framework's
 * MockPluginsService) instead of a distribution's modules/ and plugins/
 * directories. In this package because the node's construction API
 * (NodeConstruction, NodeServiceProvider) is package-private.
 */
public final class ClasspathNode extends Node {
    public ClasspathNode(Environment environment, Collection<Class<? extends Plugin>> plugins) {
        super(NodeConstruction.prepareConstruction(environment, null, new NodeServiceProvider() {
            @Override
            PluginsService newPluginService(Environment env, PluginsLoader loader) {
                return new MockPluginsService(env.settings(), env, plugins);
            }
        }, true));
    }
}
