'use strict';
// The BullMQ side of bench/peer.py: BullMQ's debounce pattern (a delayed job per counter,
// deduplicated by the counter's name with extend + replace), driven the way the bench
// drives this worker. Run by the bench with NODE_PATH set to its scratch install:
//
//   node driver.cjs worker   '{"port": 6379, "url": "http://…/reset", "secret": "…",
//                              "concurrency": 32, "id": "w1"}'
//   node driver.cjs producer '{"port": 6379}'
//
// Both print "ready" once connected. The worker POSTs each job as this worker POSTs a
// reset (same headers, same body fields; reset_id is the job id, expired_at the due time
// the bench planned). The producer reads JSON lines {"jobs": [[key, due_ms], …], "ack":
// bool} on stdin and adds one job per pair, delay = due - now; with "ack" it prints
// {"n": count} once Redis has taken them all.
const http = require('node:http');
const readline = require('node:readline');
const { Queue, Worker } = require('bullmq');

const QUEUE = 'resets';
const [role, raw] = process.argv.slice(2);
const cfg = JSON.parse(raw || '{}');
const connection = { host: '127.0.0.1', port: cfg.port, maxRetriesPerRequest: null };

function fail(err) {
  process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
}

async function runWorker() {
  const url = new URL(cfg.url);
  // Keep-alive, one socket per concurrent job: what the worker's own HTTP pool does.
  const agent = new http.Agent({ keepAlive: true, maxSockets: cfg.concurrency });
  const post = (body, id) =>
    new Promise((resolve, reject) => {
      const req = http.request(
        {
          agent,
          host: url.hostname,
          port: url.port,
          path: url.pathname,
          method: 'POST',
          headers: {
            'x-secret': cfg.secret,
            'content-type': 'application/json',
            'idempotency-key': id,
            'x-fencing-token': '0',
            'content-length': Buffer.byteLength(body),
          },
        },
        (res) => {
          res.resume();
          res.on('end', () =>
            res.statusCode < 300 ? resolve() : reject(new Error(`status ${res.statusCode}`)),
          );
        },
      );
      req.on('error', reject);
      req.end(body);
    });
  const worker = new Worker(
    QUEUE,
    async (job) => {
      const body = JSON.stringify({
        key: job.data.key,
        reset_id: job.id,
        expired_at: job.data.due / 1000,
        fencing_token: 0,
        replica_id: cfg.id,
      });
      await post(body, String(job.id));
    },
    { connection, concurrency: cfg.concurrency },
  );
  worker.on('error', (err) => process.stderr.write(`worker error: ${err}\n`));
  await worker.waitUntilReady();
  console.log('ready');
}

async function runProducer() {
  const queue = new Queue(QUEUE, { connection });
  await queue.waitUntilReady();
  console.log('ready');
  const add = ([key, due], now) => {
    const delay = Math.max(0, due - now);
    return queue.add(
      'reset',
      { key, due },
      {
        delay,
        deduplication: { id: key, ttl: Math.max(1, delay), extend: true, replace: true },
        removeOnComplete: true,
      },
    );
  };
  for await (const line of readline.createInterface({ input: process.stdin })) {
    const { jobs, ack } = JSON.parse(line);
    const now = Date.now();
    const added = Promise.all(jobs.map((job) => add(job, now)));
    if (ack) {
      await added;
      console.log(JSON.stringify({ n: jobs.length }));
    } else {
      added.catch(fail);
    }
  }
  await queue.close();
}

({ worker: runWorker, producer: runProducer })[role]?.().catch(fail) ??
  fail(`unknown role ${role}: expected worker or producer`);
