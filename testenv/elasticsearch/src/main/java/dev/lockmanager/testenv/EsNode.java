package dev.lockmanager.testenv;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;

import org.elasticsearch.cluster.service.ClusterService;
import org.elasticsearch.common.logging.LogConfigurator;
import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.env.Environment;
import org.elasticsearch.node.ClasspathNode;
import org.elasticsearch.node.InternalSettingsPreparer;
import org.elasticsearch.node.Node;
import org.elasticsearch.rest.RestController;
import org.elasticsearch.transport.netty4.Netty4Plugin;

/**
 * A single Elasticsearch 8.x/9.x node: the real server code with the Netty4
 * HTTP and transport layers, loaded from the classpath by the test framework's
 * MockPluginsService ({@link ClasspathNode}), with no distribution and no modules. Two
 * things a distribution has are supplied here: `GET /` (the rest-root module
 * is not published) and, instead of lang-painless (not published either),
 * {@link PainlessStandIn}, which runs only the lock scripts listed in the
 * file named by the system property {@code klm.scripts}.
 *
 * Usage: EsNode HOME_DIR HTTP_PORT TRANSPORT_PORT
 */
public final class EsNode {
    private EsNode() {
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: EsNode HOME_DIR HTTP_PORT TRANSPORT_PORT");
            System.exit(2);
        }
        Path home = Path.of(args[0]).toAbsolutePath();
        Files.createDirectories(home.resolve("config"));
        Files.createDirectories(home.resolve("data"));
        Files.createDirectories(home.resolve("logs"));
        // Fail before the node starts when the script list is missing or unreadable.
        PainlessStandIn.knownScripts();
        Settings settings = Settings.builder()
            .put("cluster.name", "kube-lock-manager-test")
            .put("node.name", "testenv")
            .put("path.home", home.toString())
            .put("path.data", home.resolve("data").toString())
            .put("path.logs", home.resolve("logs").toString())
            .put("network.host", "127.0.0.1")
            .put("http.port", args[1])
            .put("transport.port", args[2])
            .put("http.type", "netty4")
            .put("transport.type", "netty4")
            .put("discovery.type", "single-node")
            // A test machine's disk may be fuller than the default watermarks allow.
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            .build();
        // The node's log goes to stdout (testenv's opensearch.log), INFO and up.
        Files.writeString(home.resolve("config/log4j2.properties"), String.join("\n",
            "appender.console.type = Console",
            "appender.console.name = console",
            "appender.console.layout.type = PatternLayout",
            "appender.console.layout.pattern = [%d{ISO8601}][%-5p][%-25c{1.}] [%node_name]%marker %m%n",
            "rootLogger.level = info",
            "rootLogger.appenderRef.console.ref = console",
            ""));
        LogConfigurator.registerErrorListener();
        LogConfigurator.setNodeName("testenv");
        Environment environment = InternalSettingsPreparer.prepareEnvironment(
            settings, Map.of(), home.resolve("config"), () -> "testenv");
        LogConfigurator.configure(environment, true);

        Node node;
        try {
            node = new ClasspathNode(environment, List.of(Netty4Plugin.class, PainlessStandIn.class));
            RestController rest = node.injector().getInstance(RestController.class);
            rest.registerHandler(new RootEndpoint(settings, () -> node.injector().getInstance(ClusterService.class)));
        } catch (RuntimeException e) {
            e.printStackTrace();
            System.exit(1);
            return;
        }
        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
            } catch (Exception e) {
                e.printStackTrace();
            } finally {
                stopped.countDown();
            }
        }, "testenv-shutdown"));
        try {
            node.start();
        } catch (Exception e) {
            // The node's own threads would otherwise keep a half-started JVM alive.
            e.printStackTrace();
            System.exit(1);
        }
        System.out.println("testenv: Elasticsearch " + org.elasticsearch.Build.current().version()
            + " node started, http://127.0.0.1:" + args[1]);
        stopped.await();
    }
}
