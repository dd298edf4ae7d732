'use strict';
/**
 * A charge-points pod in Node.js (@grpc/grpc-js) that follows grpc_balance_mw's identity
 * contract (docs/identity.md), so the Python client's observe() and balanced_channel() work
 * with it as with a Python pod. Tested in CI: tests/test_grpc_js_server.py.
 *
 * What it shows, each in one place below:
 *   - identityFromEnv():     the pod identity from the downward API (POD_NAME, POD_IP,
 *                            POD_NAMESPACE), validated as the client validates it, and the
 *                            opaque form when GRPC_BALANCE_POD_KEY is set;
 *   - identityInterceptor(): a grpc-js server interceptor that stamps the identity into the
 *                            initial metadata AND the trailers of every call of every service,
 *                            errors included (copy this function into your own server);
 *   - HealthService:         grpc.health.v1 Check and Watch, answered through the same
 *                            interceptor, so a health check names the pod too;
 *   - drain():               on SIGTERM, NOT_SERVING first, keep serving DRAIN_SECONDS, then
 *                            tryShutdown (forceShutdown after SHUTDOWN_GRACE_SECONDS more).
 *
 * Usage:  POD_NAME=charge-points-0 node server.js [--host 0.0.0.0] [--port 50051]
 * Environment: PORT, HOST (argv wins), DRAIN_SECONDS (default 10), SHUTDOWN_GRACE_SECONDS
 * (default 5), GRPC_BALANCE_POD_KEY (opaque mode, at least 16 bytes). Prints "READY <port>" on
 * stdout once it listens (port 0 picks a free one).
 */

const crypto = require('node:crypto');
const net = require('node:net');
const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// ---------------------------------------------------------------------------------------------
// The identity contract (docs/identity.md). Header names are those of grpc_balance_mw/identity.py.
const POD_HEADER = 'x-balance-pod';
const POD_IP_HEADER = 'x-balance-pod-ip';
const POD_NAMESPACE_HEADER = 'x-balance-pod-namespace';
const IDENTITY_HEADERS = [POD_HEADER, POD_IP_HEADER, POD_NAMESPACE_HEADER];
const MAX_VALUE_LENGTH = 253;
const OPAQUE_KEY_ENV = 'GRPC_BALANCE_POD_KEY';
const MIN_OPAQUE_KEY_BYTES = 16;

/** Throw unless `value` is what the client accepts: 1-253 printable ASCII, no blank ends. */
function checkValue(header, value) {
  if (typeof value !== 'string' || value.length === 0) {
    throw new Error(`${header}: empty`);
  }
  if (value.length > MAX_VALUE_LENGTH) {
    throw new Error(`${header}: longer than ${MAX_VALUE_LENGTH} characters`);
  }
  if (value !== value.trim()) {
    throw new Error(`${header}: leading or trailing whitespace`);
  }
  if (!/^[\x20-\x7e]+$/.test(value)) {
    throw new Error(`${header}: not printable ASCII`);
  }
  return value;
}

/** The opaque id: "pod-" + the first 16 hex digits of HMAC-SHA256(key, "namespace/name"). */
function opaqueName(key, namespace, name) {
  const raw = Buffer.from(key, 'utf8');
  if (raw.toString('utf8').trim().length === 0) {
    throw new Error(`${OPAQUE_KEY_ENV}: empty or blank`);
  }
  if (key !== key.trim()) {
    throw new Error(`${OPAQUE_KEY_ENV}: leading or trailing whitespace`);
  }
  if (raw.length < MIN_OPAQUE_KEY_BYTES) {
    throw new Error(
      `${OPAQUE_KEY_ENV}: ${raw.length} bytes, needs ${MIN_OPAQUE_KEY_BYTES} or more ` +
        '(e.g. openssl rand -hex 16)'
    );
  }
  const digest = crypto.createHmac('sha256', raw).update(`${namespace || ''}/${name}`, 'utf8');
  return 'pod-' + digest.digest('hex').slice(0, 16);
}

/** The [header, value] pairs to stamp, from the environment the downward API fills. */
function identityFromEnv(env) {
  const name = env.POD_NAME || env.HOSTNAME;
  if (!name) {
    throw new Error('no pod identity: set POD_NAME from the downward API (metadata.name)');
  }
  const ip = env.POD_IP || undefined;
  const namespace = env.POD_NAMESPACE || undefined;
  checkValue(POD_HEADER, name);
  if (ip !== undefined && net.isIP(checkValue(POD_IP_HEADER, ip)) === 0) {
    throw new Error(`${POD_IP_HEADER}: ${JSON.stringify(ip)} is not an IP address`);
  }
  if (namespace !== undefined) {
    checkValue(POD_NAMESPACE_HEADER, namespace);
  }
  // Opaque mode when the variable is set at all: a set but unusable key is an error, never a
  // silent fall-back to the real name.
  if (env[OPAQUE_KEY_ENV] !== undefined) {
    return [[POD_HEADER, opaqueName(env[OPAQUE_KEY_ENV], namespace, name)]];
  }
  const pairs = [[POD_HEADER, name]];
  if (ip !== undefined) pairs.push([POD_IP_HEADER, ip]);
  if (namespace !== undefined) pairs.push([POD_NAMESPACE_HEADER, namespace]);
  return pairs;
}

/** `metadata` (or none) with the identity set, replacing any identity a handler put there. */
function withIdentity(metadata, stamp) {
  const out = metadata ? metadata.clone() : new grpc.Metadata();
  for (const header of IDENTITY_HEADERS) out.remove(header);
  for (const [header, value] of stamp) out.set(header, value);
  return out;
}

/**
 * A server interceptor stamping the identity on every call: initial metadata when the handler
 * sends its own (or its first message), and trailers on every status. A call that ends before
 * any header went out (an error, an empty response stream) gets the identity as headers first:
 * grpc-js would otherwise answer "trailers-only", with nothing in the initial metadata.
 */
function identityInterceptor(stamp) {
  return (methodDescriptor, call) => {
    let headersSent = false;
    return new grpc.ServerInterceptingCall(call, {
      sendMetadata(metadata, next) {
        headersSent = true;
        next(withIdentity(metadata, stamp));
      },
      sendStatus(status, next) {
        if (!headersSent) {
          headersSent = true;
          call.sendMetadata(withIdentity(null, stamp));
        }
        next({ ...status, metadata: withIdentity(status.metadata, stamp) });
      },
    });
  };
}

// ---------------------------------------------------------------------------------------------
// grpc.health.v1, served through the same interceptor.
const SERVING = 'SERVING';
const NOT_SERVING = 'NOT_SERVING';
const SERVICE_UNKNOWN = 'SERVICE_UNKNOWN';

class HealthService {
  constructor(services) {
    this.statuses = new Map(['', ...services].map(service => [service, SERVING]));
    this.watchers = new Set();
    this.shuttingDown = false;
  }

  set(status) {
    for (const service of this.statuses.keys()) this.statuses.set(service, status);
    for (const watcher of this.watchers) watcher();
  }

  /** NOT_SERVING for good: clients and readiness probes stop sending new work. */
  enterGracefulShutdown() {
    this.shuttingDown = true;
    this.set(NOT_SERVING);
  }

  handlers() {
    return {
      Check: (call, callback) => {
        const status = this.statuses.get(call.request.service);
        if (status === undefined) {
          callback({ code: grpc.status.NOT_FOUND, details: 'unknown service' });
        } else {
          callback(null, { status });
        }
      },
      Watch: call => {
        let last;
        const send = () => {
          const status = this.statuses.get(call.request.service) ?? SERVICE_UNKNOWN;
          if (status !== last) {
            last = status;
            call.write({ status });
          }
        };
        this.watchers.add(send);
        call.on('cancelled', () => this.watchers.delete(send));
        send();
      },
    };
  }
}

// ---------------------------------------------------------------------------------------------
// The charge-points service: all four call kinds; `fail_with_code` > 0 fails the call with that
// status code, < 0 stands for a handler error (UNKNOWN), as in the Python servicer.
const SERVICE_NAME = 'chargepoints.v1.ChargePoints';
const STATUSES = ['STATUS_AVAILABLE', 'STATUS_CHARGING', 'STATUS_FAULTED'];

function askedFailure(code) {
  if (code < 0) return { code: grpc.status.UNKNOWN, details: 'handler raised on request' };
  if (code > 0) return { code, details: `failed on request with code ${code}` };
  return null;
}

function statusFor(id) {
  let sum = 0;
  for (const byte of Buffer.from(id, 'utf8')) sum += byte;
  return STATUSES[sum % STATUSES.length];
}

function chargePoints(podName) {
  return {
    GetChargePoint: (call, callback) => {
      const failure = askedFailure(call.request.fail_with_code);
      if (failure) return callback(failure);
      callback(null, {
        id: call.request.id,
        status: statusFor(call.request.id),
        max_power_kw: 150.0,
        served_by: podName,
      });
    },
    WatchStatus: call => {
      const { id, updates, interval_ms: intervalMs, fail_with_code: fail } = call.request;
      const total = Math.max(updates, 1);
      let sequence = 0;
      const next = () => {
        if (call.cancelled) return;
        if (sequence < total) {
          call.write({ id, status: STATUSES[sequence % 3], sequence, served_by: podName });
          sequence += 1;
          setTimeout(next, sequence < total ? intervalMs : 0);
          return;
        }
        const failure = askedFailure(fail);
        if (failure) call.emit('error', failure);
        else call.end();
      };
      next();
    },
    UploadMeterValues: (call, callback) => {
      let count = 0;
      let total = 0;
      let done = false;
      call.on('data', value => {
        if (done) return;
        const failure = askedFailure(value.fail_with_code);
        if (failure) {
          done = true;
          return callback(failure);
        }
        count += 1;
        total += value.energy_wh;
      });
      call.on('end', () => {
        if (done) return;
        done = true;
        callback(null, { count, total_energy_wh: total, served_by: podName });
      });
    },
    Session: call => {
      let sequence = 0;
      let done = false;
      call.on('data', message => {
        if (done) return;
        const failure = askedFailure(message.fail_with_code);
        if (failure) {
          done = true;
          return call.emit('error', failure);
        }
        call.write({
          charge_point_id: message.charge_point_id,
          ack: `ack:${message.command}`,
          sequence: sequence++,
          served_by: podName,
        });
      });
      call.on('end', () => {
        if (!done) call.end();
      });
    },
  };
}

// ---------------------------------------------------------------------------------------------
const REPO_PROTOS = path.join(__dirname, '..', '..', 'protos');
const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true };

function loadServices() {
  const chargePointsProto = process.env.CHARGE_POINTS_PROTO || path.join(
    REPO_PROTOS, 'grpc_balance_mw', 'testing', 'charge_points', 'v1', 'charge_points.proto'
  );
  const cp = grpc.loadPackageDefinition(protoLoader.loadSync(chargePointsProto, LOADER_OPTIONS));
  const health = grpc.loadPackageDefinition(
    protoLoader.loadSync(path.join(__dirname, 'health.proto'), LOADER_OPTIONS)
  );
  return { chargePoints: cp.chargepoints.v1.ChargePoints, health: health.grpc.health.v1.Health };
}

function argument(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at >= 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

function seconds(name, fallback) {
  const value = Number(process.env[name] ?? fallback);
  if (!Number.isFinite(value) || value < 0) throw new Error(`${name} must be seconds >= 0`);
  return value * 1000;
}

function main() {
  const stamp = identityFromEnv(process.env);
  const podName = stamp[0][1];
  const host = argument('host', process.env.HOST || '0.0.0.0');
  const port = Number(argument('port', process.env.PORT ?? '50051'));
  const drainMs = seconds('DRAIN_SECONDS', 10);
  const graceMs = seconds('SHUTDOWN_GRACE_SECONDS', 5);

  const services = loadServices();
  const server = new grpc.Server({ interceptors: [identityInterceptor(stamp)] });
  const health = new HealthService([SERVICE_NAME]);
  server.addService(services.chargePoints.service, chargePoints(podName));
  server.addService(services.health.service, health.handlers());

  server.bindAsync(`${host}:${port}`, grpc.ServerCredentials.createInsecure(), (err, bound) => {
    if (err) {
      console.error(`cannot listen on ${host}:${port}: ${err.message}`);
      process.exit(1);
    }
    console.log(`READY ${bound}`);
  });

  let draining = false;
  const drain = signal => {
    if (draining) return;
    draining = true;
    console.error(`${signal}: NOT_SERVING, draining for ${drainMs} ms`);
    health.enterGracefulShutdown();
    setTimeout(() => {
      const force = setTimeout(() => server.forceShutdown(), graceMs);
      force.unref();
      server.tryShutdown(() => {
        clearTimeout(force);
        console.error('stopped');
      });
    }, drainMs);
  };
  process.on('SIGTERM', () => drain('SIGTERM'));
  process.on('SIGINT', () => drain('SIGINT'));
}

if (require.main === module) {
  try {
    main();
  } catch (err) {
    console.error(`charge-points: ${err.message}`);
    process.exit(2);
  }
}

module.exports = { identityFromEnv, identityInterceptor, opaqueName, HealthService };
