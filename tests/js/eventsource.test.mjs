// The npm `eventsource` package: its own reconnection (retry, Last-Event-ID) resumes an
// AI SDK chat stream after the API process it was reading from is killed.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';

import { EventSource } from 'eventsource';

import { A, AUTH, B, idleThread, userMessage } from './common.mjs';

const KILL_PID = Number(process.env.TR_KILL_PID); // an API process of the stack: the one at A

test('after kill -9 of its API process, EventSource resumes with Last-Event-ID: all text once', async () => {
  const chatId = randomUUID();
  const posted = await fetch(`${B}/v1/ai-sdk/chat`, {
    method: 'POST',
    headers: { ...AUTH, 'content-type': 'application/json' },
    body: JSON.stringify({ id: chatId, messages: [userMessage('go on')], model: 'fake:lorem',
                           max_tokens: 40 }),
  });
  assert.equal(posted.status, 200);
  const threadId = posted.headers.get('x-thread-id');
  await posted.body.cancel(); // the answer goes on without this reader

  // The first connection goes to A; a reconnection to B, as a load balancer would send it.
  const requests = [];
  const source = new EventSource(`${A}/v1/ai-sdk/chat/${encodeURIComponent(chatId)}/stream`, {
    fetch: (url, init) => {
      requests.push({ url: String(url), lastEventId: init.headers['Last-Event-ID'] });
      const target = requests.length === 1 ? A : B;
      return fetch(String(url).replace(A, target), { ...init, headers: { ...init.headers, ...AUTH } });
    },
  });
  const chunks = [];
  let killed = false;
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no [DONE] within 20 s')), 20000);
    source.onmessage = (event) => {
      if (event.data === '[DONE]') {
        clearTimeout(timer);
        source.close();
        resolve();
        return;
      }
      chunks.push(JSON.parse(event.data));
      if (!killed && chunks.filter((c) => c.type === 'text-delta').length === 5) {
        killed = true;
        process.kill(KILL_PID, 'SIGKILL');
      }
    };
  });

  assert.ok(killed);
  assert.equal(requests.length, 2, 'one reconnection');
  assert.equal(requests[0].lastEventId, undefined);
  assert.match(requests[1].lastEventId, /^\d+-\d+$/);
  assert.equal(chunks.filter((c) => c.type === 'start').length, 1, 'no replay from the start');
  assert.equal(chunks.at(-1).type, 'finish');
  const text = chunks.filter((c) => c.type === 'text-delta').map((c) => c.delta).join('');
  const thread = await idleThread(B, threadId);
  assert.equal(text, thread.messages.at(-1).content);
  assert.equal(text.split(' ').length, 40);
});
