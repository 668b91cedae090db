package dev.lockmanager.testenv;

import static org.codelibs.elasticsearch.runner.ElasticsearchClusterRunner.newConfigs;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.concurrent.CountDownLatch;

import org.codelibs.elasticsearch.runner.ElasticsearchClusterRunner;

/**
 * A single Elasticsearch 7.10.2 node started in-process by the codelibs cluster
 * runner, with the Netty4 transport and the painless scripting language loaded
 * from the classpath.
 *
 * Usage: Es7Node HOME_DIR HTTP_PORT TRANSPORT_PORT
 */
public final class Es7Node {
    private Es7Node() {
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: Es7Node HOME_DIR HTTP_PORT TRANSPORT_PORT");
            System.exit(2);
        }
        Path home = Path.of(args[0]).toAbsolutePath();
        String httpPort = String.valueOf(Integer.parseInt(args[1]));
        String transportPort = String.valueOf(Integer.parseInt(args[2]));
        Path data = home.resolve("data");
        Files.createDirectories(data);

        ElasticsearchClusterRunner runner = new ElasticsearchClusterRunner();
        runner.onBuild((index, settings) -> {
            settings.put("http.port", httpPort);
            settings.put("transport.port", transportPort);
            settings.put("network.host", "127.0.0.1");
            settings.put("path.data", data.toString());
            settings.put("discovery.type", "single-node");
            // A test machine's disk may be fuller than the default watermarks allow.
            settings.put("cluster.routing.allocation.disk.threshold_enabled", "false");
        });

        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                runner.close();
            } catch (Exception e) {
                e.printStackTrace();
            } finally {
                stopped.countDown();
            }
        }, "testenv-shutdown"));

        try {
            runner.build(newConfigs()
                .basePath(home.toString())
                .numOfNode(1)
                .clusterName("kube-lock-manager-test"));
        } catch (RuntimeException e) {
            // The node's own threads would otherwise keep a half-started JVM alive.
            e.printStackTrace();
            System.exit(1);
        }
        System.out.println("testenv: Elasticsearch node started, http://127.0.0.1:" + httpPort);
        stopped.await();
    }
}
