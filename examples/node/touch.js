// The app's side in Node.js with ioredis: mark activity atomically through the
// Redis Functions library of trio-counter-worker (Redis 7.0+).
//
//   node touch.js <key> <ttl_ms> [payload]     # FCALL tcw_touch 1 <key> <ttl_ms> [payload]
//   node touch.js --done <key>                 # FCALL tcw_done 1 <key>
//
// Load the library once per Redis first:
//   trio-counter-worker install-functions --counter-key 'counter:*'
// Redis connection: REDIS_URL (redis://user:pass@host:port/db), else 127.0.0.1:6379.
"use strict";

const Redis = require("ioredis");

// On every bit of activity: set the key (value: the payload, or "1") with its TTL and
// record its deadline for the worker, in one atomic step. Resolves to
// [deadline_ms, deployments matched, earlier episodes claimed].
async function touch(redis, key, ttlMs, payload) {
  const args = payload === undefined ? [ttlMs] : [ttlMs, payload];
  return redis.fcall("tcw_touch", 1, key, ...args);
}

// The app ends the episode itself (logout, checkout...): the key is deleted, no reset.
async function done(redis, key) {
  return redis.fcall("tcw_done", 1, key);
}

async function main(argv) {
  const isDone = argv[0] === "--done";
  const [key, ttlMs, payload] = isDone ? argv.slice(1) : argv;
  if (!key || (!isDone && !ttlMs)) {
    console.error("usage: node touch.js <key> <ttl_ms> [payload] | node touch.js --done <key>");
    return 2;
  }
  const redis = new Redis(process.env.REDIS_URL || "redis://127.0.0.1:6379/0");
  try {
    const answer = isDone ? await done(redis, key) : await touch(redis, key, ttlMs, payload);
    console.log(JSON.stringify(answer));
    return 0;
  } catch (err) {
    if (/Function not found/.test(err.message)) {
      console.error("the tcw library is not loaded: run trio-counter-worker install-functions");
    } else {
      console.error(err.message);
    }
    return 1;
  } finally {
    redis.disconnect();
  }
}

module.exports = { touch, done };

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => { process.exitCode = code; });
}
