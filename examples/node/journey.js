#!/usr/bin/env node
// A PulseSync app journey in Node.js, built only from the committed .proto files:
// pair, upload over the bidi stream with the ack rules, read and watch the profile,
// receive a nudge and send feedback, rotate the device token, and decode a
// google.rpc.ErrorInfo from a bad call. Every mutating call carries a request_id and is
// retried with it, so a lost response never causes a second effect.
//
//   node journey.js [ADDRESS] [PAIRING_CODE]
//   (or PULSESYNC_ADDRESS / PULSESYNC_PAIRING_CODE; PULSESYNC_NUDGE_WAIT_S, default 60)
//
// Prints one JSON line per step; exits 0 only if every step succeeded.
'use strict';

const path = require('node:path');
const crypto = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILES = ['devices', 'ingest', 'profiles', 'nudges'].map(
  (name) => `pulsesync/v1/${name}.proto`,
);

// google.rpc.Status and google.rpc.ErrorInfo, defined in code (they are not among the
// .proto files proto-loader bundles): enough to read the grpc-status-details-bin trailer.
const rpcRoot = new protobuf.Root();
const Any = new protobuf.Type('Any')
  .add(new protobuf.Field('type_url', 1, 'string'))
  .add(new protobuf.Field('value', 2, 'bytes'));
const Status = new protobuf.Type('Status')
  .add(new protobuf.Field('code', 1, 'int32'))
  .add(new protobuf.Field('message', 2, 'string'))
  .add(new protobuf.Field('details', 3, 'Any', 'repeated'));
const ErrorInfo = new protobuf.Type('ErrorInfo')
  .add(new protobuf.Field('reason', 1, 'string'))
  .add(new protobuf.Field('domain', 2, 'string'))
  .add(new protobuf.MapField('metadata', 3, 'string', 'string'));
rpcRoot.define('google.rpc').add(Status).add(ErrorInfo).add(Any);
rpcRoot.resolveAll();

/** The ErrorInfo of a failed call ({reason, domain, metadata}), or null. */
function errorInfo(err) {
  const raw = err && err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!raw.length) return null;
  const status = Status.decode(raw[0]);
  for (const any of status.details) {
    if (any.type_url === 'type.googleapis.com/google.rpc.ErrorInfo') {
      const info = ErrorInfo.decode(any.value);
      return { reason: info.reason, domain: info.domain, metadata: info.metadata };
    }
  }
  return null;
}

const address = process.argv[2] || process.env.PULSESYNC_ADDRESS;
const pairingCode = process.argv[3] || process.env.PULSESYNC_PAIRING_CODE;
const nudgeWaitMs = Number(process.env.PULSESYNC_NUDGE_WAIT_S || 60) * 1000;
const DEADLINE_MS = 30_000;

let failed = false;
function report(step, ok, fields) {
  if (!ok) failed = true;
  process.stdout.write(JSON.stringify({ step, ok, ...fields }) + '\n');
}

function deadline(ms = DEADLINE_MS) {
  return { deadline: new Date(Date.now() + ms) };
}

function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata || new grpc.Metadata(), deadline(), (err, resp) =>
      err ? reject(err) : resolve(resp),
    );
  });
}

// What a retry may fix: the server or the network was away, or the answer did not come in
// time. Whether the call took effect is unknown then, which the request_id makes harmless.
const RETRYABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED]);

/**
 * A mutating call, safe to retry: one request_id (a fresh UUID) for this intended call,
 * sent unchanged on every attempt. The server carries the call out once and answers a
 * retry with the first answer (for 24 hours). Returns the response and the request sent.
 */
async function mutate(client, method, request, metadata, attempts = 4) {
  const sent = { ...request, request_id: crypto.randomUUID() };
  for (let attempt = 1; ; attempt += 1) {
    try {
      return { response: await unary(client, method, sent, metadata), request: sent };
    } catch (err) {
      if (attempt >= attempts || !RETRYABLE.has(err.code)) throw err;
      await new Promise((r) => setTimeout(r, 200 * 2 ** attempt * (0.5 + Math.random())));
    }
  }
}

function timestamp(ms) {
  return { seconds: String(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1e6 };
}

function describe(err) {
  return { code: err.code, details: err.details, error_info: errorInfo(err) };
}

/** Uploads the outbox over one Upload stream; returns what the acks said. */
function upload(ingest, auth, outbox, batchSize) {
  return new Promise((resolve, reject) => {
    const call = ingest.Upload(auth, deadline());
    const batches = [];
    for (let i = 0; i < outbox.length; i += batchSize) batches.push(outbox.slice(i, i + batchSize));
    const acks = [];
    let next = 0;
    const sendNext = () => {
      if (next >= batches.length) return call.end();
      const events = batches[next];
      next += 1;
      // The device clock at send time: the server compares it with its own for skew.
      call.write({ batch: { batch_id: next, sent_time: timestamp(Date.now()), events } });
    };
    call.on('metadata', (md) => {
      // Wait for the server's stream-open marker before the first write.
      if (md.get('pulsesync-stream').includes('open')) sendNext();
    });
    call.on('data', (resp) => {
      if (resp.error) {
        call.cancel();
        return reject(new Error(`batch ${resp.batch_id} refused: ${resp.error.reason}`));
      }
      const through = BigInt(resp.acked_through_seq);
      // Only what the server acked may leave the outbox.
      for (let i = outbox.length - 1; i >= 0; i -= 1) {
        if (BigInt(outbox[i].seq) <= through) outbox.splice(i, 1);
      }
      acks.push({
        batch_id: Number(resp.batch_id),
        acked_through_seq: Number(through),
        accepted: resp.accepted_count,
        duplicates: resp.duplicate_count,
        rejected: resp.rejected.length,
      });
      sendNext();
    });
    call.on('error', reject);
    call.on('end', () => resolve(acks));
  });
}

/** The first message of a server stream that satisfies `accept`, then cancels the call. */
function firstMessage(call, accept, timeoutMs) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      call.cancel();
      resolve(null);
    }, timeoutMs);
    call.on('data', (msg) => {
      if (!accept(msg)) return;
      clearTimeout(timer);
      call.cancel();
      resolve(msg);
    });
    call.on('error', (err) => {
      clearTimeout(timer);
      if (err.code === grpc.status.CANCELLED) return;
      reject(err);
    });
  });
}

async function main() {
  if (!address || !pairingCode) {
    report('args', false, { error: 'usage: node journey.js ADDRESS PAIRING_CODE' });
    return;
  }
  const definition = protoLoader.loadSync(PROTO_FILES, {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const v1 = grpc.loadPackageDefinition(definition).pulsesync.v1;
  const creds = grpc.credentials.createInsecure();
  const devices = new v1.DeviceService(address, creds);
  const ingest = new v1.IngestService(address, creds);
  const profiles = new v1.ProfileService(address, creds);
  const nudges = new v1.NudgeService(address, creds);

  try {
    // 1. A malformed pairing code: the reason is in the ErrorInfo, not the message text.
    try {
      await unary(devices, 'PairDevice', {
        pairing_code: '!!',
        device_name: 'node-phone',
        kind: 'DEVICE_KIND_PHONE',
      });
      report('bad_call', false, { error: 'a malformed code was accepted' });
    } catch (err) {
      const info = errorInfo(err);
      report('bad_call', info !== null && info.reason === 'PAIRING_CODE_MALFORMED', {
        code: grpc.status[err.code],
        reason: info && info.reason,
        domain: info && info.domain,
      });
    }

    // 2. Pair: trade the code for a device token.
    const pairing = await mutate(devices, 'PairDevice', {
      pairing_code: pairingCode,
      device_name: 'node-phone',
      kind: 'DEVICE_KIND_PHONE',
    });
    const paired = pairing.response;
    const deviceId = paired.device.device_id;
    report('pair', Boolean(paired.token), { device_id: deviceId, user_name: paired.user_name });
    // Had that response been lost, the app would send the same request again: the code is
    // used up by then, but the request_id gets the first answer back, token included.
    const again = await unary(devices, 'PairDevice', pairing.request);
    report('pair_retry', again.token === paired.token && again.device.device_id === deviceId, {
      same_token: again.token === paired.token,
      device_id: again.device.device_id,
    });
    let auth = new grpc.Metadata();
    auth.set('authorization', `Bearer ${paired.token}`);

    // 3. Upload: an in-memory outbox numbered above the server's watermark, in batches.
    const state = await unary(ingest, 'GetUploadState', {}, auth);
    const base = Number(state.acked_through_seq);
    const outbox = [];
    const now = Date.now();
    for (let i = 1; i <= 5; i += 1) {
      outbox.push({
        event_id: crypto.randomUUID(),
        seq: String(base + i),
        device_time: timestamp(now - (6 - i) * 60_000),
        screen_view: { app: 'reader', screen: `page-${i}`, dwell: { seconds: '30', nanos: 0 } },
      });
    }
    const total = outbox.length;
    const acks = await upload(ingest, auth, outbox, 2);
    const last = acks.length ? acks[acks.length - 1].acked_through_seq : 0;
    report('upload', outbox.length === 0 && last === base + total, {
      batches: acks.length,
      acked_through_seq: last,
      accepted: acks.reduce((n, a) => n + a.accepted, 0),
      outbox_left: outbox.length,
      acks,
    });

    // 4. Profile: read it, watch it, and see this device's own edit arrive on the watch.
    const got = await unary(profiles, 'GetProfile', {}, auth);
    const version = BigInt(got.profile.version);
    const watch = profiles.WatchProfile({ after_version: String(version) }, auth);
    const seen = firstMessage(watch, (m) => BigInt(m.profile.version) > version, DEADLINE_MS);
    const { response: updated } = await mutate(
      profiles,
      'UpdateProfile',
      {
        base_version: String(version),
        profile: { preferences: { theme: 'dark' } },
        edits: [
          {
            field_path: 'preferences.theme',
            stamp: { wall_time_ms: String(Date.now()), logical: 0, node_id: deviceId },
          },
        ],
      },
      auth,
    );
    const watched = await seen;
    report('profile', watched !== null && watched.profile.preferences.theme === 'dark', {
      version_read: Number(version),
      version_written: Number(updated.profile.version),
      version_seen: watched && Number(watched.profile.version),
      theme: watched && watched.profile.preferences.theme,
    });

    // 5. Nudges: wait on the stream; if none comes, fetch the pending ones.
    const sub = nudges.SubscribeNudges({}, auth);
    const arriving = firstMessage(sub, () => true, nudgeWaitMs);
    report('subscribe_nudges', true, { device_id: deviceId });
    let nudge = null;
    let via = 'stream';
    const streamed = await arriving;
    if (streamed) {
      nudge = streamed.nudge;
    } else {
      via = 'pending';
      // Fetching marks the nudges delivered: with a request_id a retry gets the same ones.
      const { response: pending } = await mutate(nudges, 'FetchPendingNudges', {}, auth);
      nudge = pending.nudges.length ? pending.nudges[0] : null;
    }
    report('nudge', nudge !== null, {
      via,
      nudge_id: nudge && nudge.nudge_id,
      nudge_type: nudge && nudge.nudge_type,
      title: nudge && nudge.title,
    });
    if (nudge) {
      await mutate(
        nudges,
        'RecordNudgeFeedback',
        { nudge_id: nudge.nudge_id, action: 'NUDGE_ACTION_OPENED', action_time: timestamp(Date.now()) },
        auth,
      );
      report('feedback', true, { nudge_id: nudge.nudge_id, action: 'NUDGE_ACTION_OPENED' });
    }

    // 6. Rotate the device token. The old token stays valid for a grace period, so a retry
    // after a lost response (same request_id, old token) gets the same new token; store it
    // durably, then use it for every call.
    const rotation = await mutate(devices, 'RotateDeviceToken', {}, auth);
    const rotated = rotation.response;
    const retried = await unary(devices, 'RotateDeviceToken', rotation.request, auth);
    auth = new grpc.Metadata();
    auth.set('authorization', `Bearer ${rotated.token}`);
    const me = await unary(devices, 'GetCurrentDevice', {}, auth);
    report('rotate_token', retried.token === rotated.token && me.device.device_id === deviceId, {
      same_token_on_retry: retried.token === rotated.token,
      previous_token_expire_time: rotated.previous_token_expire_time,
      device_id: me.device.device_id,
    });
  } catch (err) {
    report('error', false, describe(err));
  } finally {
    for (const c of [devices, ingest, profiles, nudges]) c.close();
  }
}

main().then(
  () => process.exit(failed ? 1 : 0),
  (err) => {
    report('error', false, { error: String(err) });
    process.exit(1);
  },
);
