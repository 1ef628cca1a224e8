// The npm `ai` package's DefaultChatTransport (what useChat runs) against two API processes.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';

import { DefaultChatTransport, readUIMessageStream } from 'ai';

import { A, AUTH, B, idleThread, userMessage } from './common.mjs';

/** A transport to one API process; `responses` records what its fetch got. */
function transport(base, body = {}, responses = []) {
  return new DefaultChatTransport({
    api: `${base}/v1/ai-sdk/chat`,
    headers: AUTH,
    body,
    fetch: async (url, init) => {
      const response = await fetch(url, init);
      responses.push(response);
      return response;
    },
  });
}

async function chunksOf(stream, limit = Infinity) {
  const chunks = [];
  const reader = stream.getReader();
  while (chunks.length < limit) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
  }
  return { chunks, reader };
}

/** The UIMessage the AI SDK builds from `chunks` (as useChat does). */
async function messageOf(chunks) {
  const stream = new ReadableStream({
    start(controller) {
      chunks.forEach((chunk) => controller.enqueue(chunk));
      controller.close();
    },
  });
  let message;
  for await (const snapshot of readUIMessageStream({ stream })) message = snapshot;
  return message;
}

const textOf = (message) => message.parts.filter((p) => p.type === 'text').map((p) => p.text).join('');

const send = (t, chatId, messages, abortSignal) =>
  t.sendMessages({ chatId, messages, trigger: 'submit-message', messageId: undefined, abortSignal });

test('sendMessages streams a chat whose text equals the thread answer, turn after turn', async () => {
  const chatId = randomUUID();
  const responses = [];
  const chat = transport(A, { model: 'fake:echo' }, responses);
  const first = userMessage('the first question');
  const { chunks } = await chunksOf(await send(chat, chatId, [first]));
  assert.equal(responses[0].headers.get('x-vercel-ai-ui-message-stream'), 'v1');
  assert.deepEqual([chunks[0].type, chunks.at(-1).type], ['start', 'finish']);
  const answer = await messageOf(chunks);
  assert.equal(textOf(answer), 'the first question');

  const threadId = responses[0].headers.get('x-thread-id');
  let thread = await idleThread(A, threadId);
  assert.equal(thread.messages.at(-1).content, textOf(answer));
  assert.equal(thread.messages.at(-1).id, answer.id);

  // The next turn, on the other process: the same chat id is the same thread.
  const second = userMessage('and a second one');
  const next = await messageOf((await chunksOf(await send(
    transport(B, { model: 'fake:echo' }), chatId, [first, answer, second]))).chunks);
  thread = await idleThread(B, threadId);
  assert.deepEqual(thread.messages.map((m) => m.content),
    ['the first question', 'the first question', 'and a second one', 'and a second one']);
  assert.equal(thread.messages.at(-1).id, next.id);
});

test('a stream aborted after k chunks is resumed whole, once, on the other process; then 204', async () => {
  const chatId = randomUUID();
  const responses = [];
  const controller = new AbortController();
  const stream = await send(transport(A, { model: 'fake:lorem', max_tokens: 60 }, responses),
    chatId, [userMessage('write at length')], controller.signal);
  const { chunks: before, reader } = await chunksOf(stream, 5);
  controller.abort();
  await reader.cancel().catch(() => {});
  assert.ok(before.some((c) => c.type === 'text-delta'), 'the answer had begun');

  const resumed = await transport(B).reconnectToStream({ chatId });
  assert.ok(resumed, 'an answer is being written: not 204');
  const { chunks } = await chunksOf(resumed);
  assert.equal(chunks[0].type, 'start');
  assert.equal(chunks.at(-1).type, 'finish');
  assert.equal(chunks.filter((c) => c.type === 'text-start').length, 1);
  const message = await messageOf(chunks);
  assert.equal(message.parts.filter((p) => p.type === 'text').length, 1, 'no duplicated text part');
  assert.equal(message.id, before[0].messageId, 'the same message as the first stream');

  const thread = await idleThread(B, responses[0].headers.get('x-thread-id'));
  assert.equal(textOf(message), thread.messages.at(-1).content);
  assert.equal(textOf(message).split(' ').length, 60);

  assert.equal(await transport(A).reconnectToStream({ chatId }), null, 'ended: 204');
  assert.equal(await transport(B).reconnectToStream({ chatId: randomUUID() }), null, 'unknown: 204');
});

test('reasoning and parallel tool calls arrive as reasoning and tool parts the SDK accepts', async () => {
  // "tools-interleaved": the fake upstream's reasoning, then two calls' fragments interleaved.
  const { chunks } = await chunksOf(await send(transport(A, { model: 'tools-interleaved' }),
    randomUUID(), [userMessage('what is the weather?')]));
  assert.equal(chunks.at(-1).finishReason, 'tool-calls');
  const message = await messageOf(chunks);
  assert.deepEqual(message.parts.map((p) => p.type), ['reasoning', 'dynamic-tool', 'dynamic-tool']);
  assert.equal(message.parts[0].text, 'Let me think about this.');
  assert.deepEqual(message.parts.slice(1).map((p) => [p.toolCallId, p.toolName, p.state, p.input]), [
    ['call_a1', 'get_weather', 'input-available', { city: 'Paris', unit: 'c' }],
    ['call_b2', 'get_time', 'input-available', { tz: 'Europe/Paris' }],
  ]);
});

test('an answer cancelled through the thread ends with abort, and the stream ends', async () => {
  const responses = [];
  const stream = await send(transport(A, { model: 'fake:lorem', max_tokens: 200 }, responses),
    randomUUID(), [userMessage('a long one')]);
  const reader = stream.getReader();
  const chunks = [(await reader.read()).value];
  const threadId = responses[0].headers.get('x-thread-id');
  const thread = await (await fetch(`${B}/v1/threads/${threadId}`, { headers: AUTH })).json();
  const cancel = await fetch(`${B}/v1/generations/${thread.active_generation_id}/cancel`,
    { method: 'POST', headers: AUTH });
  assert.equal(cancel.status, 202);
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
  }
  assert.equal(chunks.at(-1).type, 'abort');
  assert.ok(chunks.filter((c) => c.type === 'text-delta').length < 200);
});
