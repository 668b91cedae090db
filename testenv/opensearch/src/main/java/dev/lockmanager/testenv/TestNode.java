package dev.lockmanager.testenv;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.CountDownLatch;

import org.opensearch.common.logging.LogConfigurator;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;

/**
 * A single OpenSearch node with the Netty4 transport and the painless scripting
 * language loaded from the classpath: the same code as a distribution, started
 * without the distribution's launcher. How the plugins are handed to the node
 * differs between the 2.x and 3.x lines: see PluginNode under src/opensearch2
 * and src/opensearch3 (the Maven profile opensearch3 picks the latter).
 *
 * Usage: TestNode HOME_DIR HTTP_PORT TRANSPORT_PORT [NODE_NAME SEED_HOSTS MANAGER_NODES [PUBLISH_PORT]]
 *
 * With the last three, the node is one of a cluster (NODE_NAME unique, SEED_HOSTS
 * the comma-separated transport addresses of every node, MANAGER_NODES the
 * comma-separated names that bootstrap the first election); without them it is
 * a single-node cluster. PUBLISH_PORT is the transport port the other nodes are
 * told to reach this one at (a proxy in front of TRANSPORT_PORT, through which
 * a test can cut the node off).
 *
 * The node logs to stdout (testenv sends it to $KLM_RUN_DIR/NODE_NAME.log) at
 * INFO, with the cluster coordination, shard state and replication loggers at
 * DEBUG, so a fault test can be explained afterwards: cluster-manager
 * elections, nodes leaving and joining, shard failures, primary promotions
 * and stale-primary rejections are all there, with millisecond timestamps.
 */
public final class TestNode {
    private TestNode() {}

    /** log4j2 configuration: stdout, with millisecond timestamps and the node's name. */
    private static final String LOG_CONFIG = String.join("\n",
        "status = error",
        "appender.console.type = Console",
        "appender.console.name = console",
        "appender.console.layout.type = PatternLayout",
        "appender.console.layout.pattern = [%d{ISO8601}][%-5p][%-25c{1.}] [%node_name]%marker %m%n",
        "rootLogger.level = info",
        "rootLogger.appenderRef.console.ref = console",
        // elections, joins, leaves, publication failures
        "logger.coordination.name = org.opensearch.cluster.coordination",
        "logger.coordination.level = debug",
        // shard-failed / shard-started requests to the cluster manager (stale primary answers)
        "logger.shardstate.name = org.opensearch.cluster.action.shard",
        "logger.shardstate.level = debug",
        // primary-replica replication failures, failed replicas, demoted primaries
        "logger.replication.name = org.opensearch.action.support.replication",
        "logger.replication.level = debug",
        // primary promotion and resync
        "logger.resync.name = org.opensearch.index.shard.PrimaryReplicaSyncer",
        "logger.resync.level = debug",
        "logger.routing.name = org.opensearch.cluster.routing.allocation.AllocationService",
        "logger.routing.level = debug",
        // a WARN with the whole script for every scripted-upsert noop: noise
        "logger.updatehelper.name = org.opensearch.action.update.UpdateHelper",
        "logger.updatehelper.level = error",
        "");

    public static void main(String[] args) throws Exception {
        if (args.length != 3 && args.length != 6 && args.length != 7) {
            System.err.println("usage: TestNode HOME_DIR HTTP_PORT TRANSPORT_PORT [NODE_NAME SEED_HOSTS MANAGER_NODES [PUBLISH_PORT]]");
            System.exit(2);
        }
        Path home = Path.of(args[0]).toAbsolutePath();
        Files.createDirectories(home.resolve("config"));
        Files.createDirectories(home.resolve("data"));
        Files.createDirectories(home.resolve("logs"));
        boolean cluster = args.length >= 6;
        Settings.Builder builder = Settings.builder()
            .put("cluster.name", "kube-lock-manager-test")
            .put("node.name", cluster ? args[3] : "testenv")
            .put("path.home", home.toString())
            .put("path.data", home.resolve("data").toString())
            .put("path.logs", home.resolve("logs").toString())
            .put("network.host", "127.0.0.1")
            .put("http.port", args[1])
            .put("transport.port", args[2])
            .put("http.type", "netty4")
            .put("transport.type", "netty4")
            // A test machine's disk may be fuller than the default watermarks allow.
            .put("cluster.routing.allocation.disk.threshold_enabled", false);
        if (cluster) {
            builder.putList("discovery.seed_hosts", List.of(args[4].split(",")))
                .putList("cluster.initial_cluster_manager_nodes", List.of(args[5].split(",")));
            if (args.length == 7) {
                builder.put("transport.publish_port", args[6]);
            }
        } else {
            builder.put("discovery.type", "single-node");
        }
        Settings settings = builder.build();
        Files.writeString(home.resolve("config").resolve("log4j2.properties"), LOG_CONFIG);
        LogConfigurator.registerErrorListener();
        Environment environment = InternalSettingsPreparer.prepareEnvironment(
            settings, Collections.emptyMap(), home.resolve("config"), () -> "testenv");
        LogConfigurator.setNodeName(settings.get("node.name"));
        LogConfigurator.configure(environment);
        Node node = new PluginNode(environment);
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
        node.start();
        System.out.println("testenv: OpenSearch node " + settings.get("node.name") + " started, http://127.0.0.1:" + args[1]);
        stopped.await();
    }
}
