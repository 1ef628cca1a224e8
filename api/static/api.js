// The HTTP API as the page uses it. The API key (only if the server requires one) is kept
// in this tab's sessionStorage; a read-only viewer has a stream token instead.

const KEY_STORE = "tokenrelay.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  sessionStorage.setItem(KEY_STORE, key.trim());
}

/** A refused request: `status` and the API's `{"error": {"code", "message"}}`. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(code ? `${code}: ${message}` : message);
    this.status = status;
    this.code = code;
  }
}

async function refusal(res) {
  try {
    const body = await res.json();
    if (body && body.error) return new ApiError(res.status, body.error.code, body.error.message);
  } catch {
    // not JSON: fall through
  }
  return new ApiError(res.status, "", `HTTP ${res.status}`);
}

/**
 * One request: resolves to the JSON body (null for 204), rejects with an ApiError when
 * refused, or with a TypeError when the server cannot be reached. `token`: read with a
 * stream token instead of the key.
 */
export async function call(method, path, { body, token } = {}) {
  const headers = {};
  const key = apiKey();
  if (key && !token) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let url = path;
  if (token) url += `${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
  const res = await fetch(url, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!res.ok) throw await refusal(res);
  return res.status === 204 ? null : res.json();
}

export const threadPath = (id) => `/v1/threads/${encodeURIComponent(id)}`;
export const generationPath = (id) => `/v1/generations/${encodeURIComponent(id)}`;

/** Whether an error means the thing is gone for good (unknown, expired token, retention over). */
export function isGone(err) {
  return err instanceof ApiError && [401, 404, 410].includes(err.status);
}
