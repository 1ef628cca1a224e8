// What both test files share: the stack under test (from tests/test_js_clients_e2e.py)
// and reading tokenrelay's own API.
import { randomUUID } from 'node:crypto';

export const [A, B] = process.env.TR_API_URLS.split(',');
export const AUTH = { Authorization: `Bearer ${process.env.TR_API_KEY}` };

export const userMessage = (text) => ({
  id: `u-${randomUUID()}`, role: 'user', parts: [{ type: 'text', text }],
});

export async function getJson(url) {
  const response = await fetch(url, { headers: AUTH });
  if (response.status !== 200) throw new Error(`GET ${url}: ${response.status} ${await response.text()}`);
  return response.json();
}

/** The thread once no answer is being written (polled, with a deadline). */
export async function idleThread(base, threadId, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const thread = await getJson(`${base}/v1/threads/${threadId}`);
    if (thread.active_generation_id === null) return thread;
    if (Date.now() > deadline) throw new Error(`thread ${threadId} still busy after ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}
