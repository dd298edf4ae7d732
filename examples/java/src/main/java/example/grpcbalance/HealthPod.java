// UNTESTED HERE: never built (no Maven repository reachable); see examples/java/README.md.
package example.grpcbalance;

import io.grpc.Server;
import io.grpc.ServerBuilder;
import io.grpc.health.v1.HealthCheckResponse.ServingStatus;
import io.grpc.protobuf.services.HealthStatusManager;
import java.util.concurrent.TimeUnit;

/**
 * A grpc-java server that follows grpc_balance_mw's identity contract (docs/identity.md): the
 * {@link PodIdentityInterceptor} on every service, grpc.health.v1 served through it, and a
 * drain on SIGTERM (NOT_SERVING, keep serving DRAIN_SECONDS, then a graceful shutdown).
 *
 * <p>Usage: {@code POD_NAME=charge-points-0 java -jar healthpod.jar [port]}; prints "READY
 * <port>" once it listens (port 0 picks a free one).
 */
public final class HealthPod {
  private HealthPod() {}

  private static long millis(String name, double fallbackSeconds) {
    String value = System.getenv(name);
    double seconds = value == null ? fallbackSeconds : Double.parseDouble(value);
    if (seconds < 0) {
      throw new IllegalArgumentException(name + " must be seconds >= 0");
    }
    return (long) (seconds * 1000);
  }

  public static void main(String[] args) throws Exception {
    PodIdentityInterceptor identity;
    try {
      identity = PodIdentityInterceptor.fromEnv(System::getenv);
    } catch (IllegalArgumentException e) {
      System.err.println("healthpod: " + e.getMessage());
      System.exit(2);
      return;
    }
    int port = args.length > 0 ? Integer.parseInt(args[0]) : 50051;
    long drainMs = millis("DRAIN_SECONDS", 10);
    long graceMs = millis("SHUTDOWN_GRACE_SECONDS", 5);

    HealthStatusManager health = new HealthStatusManager(); // "" is SERVING from the start
    Server server =
        ServerBuilder.forPort(port)
            .addService(health.getHealthService())
            // .addService(new ChargePointsService())  -- your services here, and:
            // health.setStatus("chargepoints.v1.ChargePoints", ServingStatus.SERVING);
            .intercept(identity) // every service, the health service included
            .build()
            .start();
    health.setStatus("", ServingStatus.SERVING);
    System.out.println("READY " + server.getPort());
    System.out.flush();

    // The JVM runs shutdown hooks on SIGTERM; the pod's terminationGracePeriodSeconds must
    // cover the drain and the graceful shutdown.
    Runtime.getRuntime()
        .addShutdownHook(
            new Thread(
                () -> {
                  System.err.println("SIGTERM: NOT_SERVING, draining for " + drainMs + " ms");
                  health.enterTerminalState(); // NOT_SERVING for every service, for good
                  try {
                    Thread.sleep(drainMs);
                    server.shutdown();
                    if (!server.awaitTermination(graceMs, TimeUnit.MILLISECONDS)) {
                      server.shutdownNow();
                    }
                  } catch (InterruptedException e) {
                    server.shutdownNow();
                    Thread.currentThread().interrupt();
                  }
                  System.err.println("stopped");
                }));
    server.awaitTermination();
  }
}
