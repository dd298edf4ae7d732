// UNTESTED HERE: never built (no Maven repository reachable); see examples/java/README.md.
package example.grpcbalance;

import com.google.common.net.InetAddresses;
import io.grpc.ForwardingServerCall;
import io.grpc.Metadata;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.Status;
import java.nio.charset.StandardCharsets;
import java.security.InvalidKeyException;
import java.security.NoSuchAlgorithmException;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.function.Function;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

/**
 * Stamps grpc_balance_mw's pod identity contract (docs/identity.md) on every response of a
 * grpc-java server: initial metadata and trailers, every call kind, errors and exceptions
 * included (grpc-java closes a call whose handler threw with UNKNOWN through {@link
 * ServerCall#close}, which is stamped here).
 *
 * <pre>{@code
 * Server server = ServerBuilder.forPort(50051)
 *     .addService(yourService)
 *     .addService(health.getHealthService())
 *     .intercept(PodIdentityInterceptor.fromEnv(System::getenv))  // every service, health too
 *     .build();
 * }</pre>
 */
public final class PodIdentityInterceptor implements ServerInterceptor {
  public static final String POD_HEADER = "x-balance-pod";
  public static final String POD_IP_HEADER = "x-balance-pod-ip";
  public static final String POD_NAMESPACE_HEADER = "x-balance-pod-namespace";
  public static final String OPAQUE_KEY_ENV = "GRPC_BALANCE_POD_KEY";
  private static final int MAX_VALUE_LENGTH = 253;
  private static final int MIN_OPAQUE_KEY_BYTES = 16;

  private final Map<Metadata.Key<String>, String> stamp;

  private PodIdentityInterceptor(Map<String, String> pairs) {
    Map<Metadata.Key<String>, String> keys = new LinkedHashMap<>();
    pairs.forEach((k, v) -> keys.put(Metadata.Key.of(k, Metadata.ASCII_STRING_MARSHALLER), v));
    this.stamp = keys;
  }

  /** The name x-balance-pod carries: the pod name, or its opaque id. */
  public String name() {
    return stamp.values().iterator().next();
  }

  /**
   * Reads POD_NAME (HOSTNAME as a fallback), POD_IP and POD_NAMESPACE, as the downward API sets
   * them; opaque when GRPC_BALANCE_POD_KEY is set at all. Throws IllegalArgumentException for an
   * identity the client would reject: fail at start-up, not on each call.
   */
  public static PodIdentityInterceptor fromEnv(Function<String, String> env) {
    String name = env.apply("POD_NAME");
    if (name == null || name.isEmpty()) {
      name = env.apply("HOSTNAME");
    }
    if (name == null || name.isEmpty()) {
      throw new IllegalArgumentException(
          "no pod identity: set POD_NAME from the downward API (metadata.name)");
    }
    String ip = emptyToNull(env.apply("POD_IP"));
    String namespace = emptyToNull(env.apply("POD_NAMESPACE"));
    checkValue(POD_HEADER, name);
    if (ip != null) {
      checkValue(POD_IP_HEADER, ip);
      checkIp(ip);
    }
    if (namespace != null) {
      checkValue(POD_NAMESPACE_HEADER, namespace);
    }
    Map<String, String> pairs = new LinkedHashMap<>();
    String key = env.apply(OPAQUE_KEY_ENV);
    if (key != null) { // set at all: opaque, never a fall-back to the real name
      pairs.put(POD_HEADER, opaqueName(key, namespace, name));
      return new PodIdentityInterceptor(pairs);
    }
    pairs.put(POD_HEADER, name);
    if (ip != null) {
      pairs.put(POD_IP_HEADER, ip);
    }
    if (namespace != null) {
      pairs.put(POD_NAMESPACE_HEADER, namespace);
    }
    return new PodIdentityInterceptor(pairs);
  }

  /** 1-253 printable ASCII characters, no whitespace at either end. */
  static void checkValue(String header, String value) {
    if (value.isEmpty()) {
      throw new IllegalArgumentException(header + ": empty");
    }
    if (value.length() > MAX_VALUE_LENGTH) {
      throw new IllegalArgumentException(header + ": longer than " + MAX_VALUE_LENGTH);
    }
    if (!value.equals(value.strip())) {
      throw new IllegalArgumentException(header + ": leading or trailing whitespace");
    }
    for (char c : value.toCharArray()) {
      if (c < 0x20 || c > 0x7e) {
        throw new IllegalArgumentException(header + ": not printable ASCII");
      }
    }
  }

  private static void checkIp(String ip) {
    // An IP literal only (InetAddress.getByName would resolve a host name); Guava comes with
    // grpc-java.
    if (!InetAddresses.isInetAddress(ip)) {
      throw new IllegalArgumentException(POD_IP_HEADER + ": not an IP address: " + ip);
    }
  }

  /** "pod-" + the first 16 hex digits of HMAC-SHA256(key, namespace + "/" + name). */
  static String opaqueName(String key, String namespace, String name) {
    byte[] raw = key.getBytes(StandardCharsets.UTF_8);
    if (key.isBlank()) {
      throw new IllegalArgumentException(OPAQUE_KEY_ENV + ": empty or blank");
    }
    if (!key.equals(key.strip())) {
      throw new IllegalArgumentException(OPAQUE_KEY_ENV + ": leading or trailing whitespace");
    }
    if (raw.length < MIN_OPAQUE_KEY_BYTES) {
      throw new IllegalArgumentException(
          OPAQUE_KEY_ENV + ": " + raw.length + " bytes, needs " + MIN_OPAQUE_KEY_BYTES);
    }
    try {
      Mac mac = Mac.getInstance("HmacSHA256");
      mac.init(new SecretKeySpec(raw, "HmacSHA256"));
      byte[] digest =
          mac.doFinal(((namespace == null ? "" : namespace) + "/" + name)
              .getBytes(StandardCharsets.UTF_8));
      StringBuilder hex = new StringBuilder("pod-");
      for (int i = 0; i < 8; i++) {
        hex.append(String.format("%02x", digest[i]));
      }
      return hex.toString();
    } catch (NoSuchAlgorithmException | InvalidKeyException e) {
      throw new IllegalStateException(e);
    }
  }

  private static String emptyToNull(String value) {
    return value == null || value.isEmpty() ? null : value;
  }

  /** The identity replaces whatever x-balance-pod* keys a handler set. */
  private void stampOnto(Metadata metadata) {
    stamp.forEach(
        (key, value) -> {
          metadata.removeAll(key);
          metadata.put(key, value);
        });
  }

  @Override
  public <ReqT, RespT> ServerCall.Listener<ReqT> interceptCall(
      ServerCall<ReqT, RespT> call, Metadata headers, ServerCallHandler<ReqT, RespT> next) {
    ServerCall<ReqT, RespT> stamped =
        new ForwardingServerCall.SimpleForwardingServerCall<ReqT, RespT>(call) {
          private boolean headersSent;

          @Override
          public void sendHeaders(Metadata responseHeaders) {
            headersSent = true;
            stampOnto(responseHeaders);
            super.sendHeaders(responseHeaders);
          }

          @Override
          public void close(Status status, Metadata trailers) {
            if (!headersSent) {
              // Headers of their own, so a failure is not "trailers-only" with nothing in the
              // client's initial metadata.
              headersSent = true;
              Metadata responseHeaders = new Metadata();
              stampOnto(responseHeaders);
              super.sendHeaders(responseHeaders);
            }
            stampOnto(trailers);
            super.close(status, trailers);
          }
        };
    return next.startCall(stamped, headers);
  }
}
