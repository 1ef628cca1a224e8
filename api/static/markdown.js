// Safe Markdown for model answers: a small subset (fenced code, inline code, emphasis, tables,
// strike-through, headings, lists, quotes, rules, links) rendered by building DOM nodes.
// Text only ever becomes Text nodes and no markup in the source is interpreted, so HTML in
// an answer shows as the characters it is. Links keep only http:, https: and mailto: URLs.
//
// It runs again on every update of a streaming answer, so it accepts any prefix of a
// document: an unclosed fence is a code block up to the end, an unclosed `*` is a `*`.

const SAFE_SCHEMES = new Set(["http:", "https:", "mailto:"]);
const ESCAPABLE = "\\`*_{}[]()#+-.!~<>|";
const MAX_DEPTH = 8; // emphasis and quotes nest at most this deep

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^ {0,3}([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEP = /^ {0,3}\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

/** The URL if it is absolute with a safe scheme, else null (javascript:, data:, relative…). */
export function safeHref(raw) {
  let url;
  try {
    url = new URL(raw.trim());
  } catch {
    return null;
  }
  return SAFE_SCHEMES.has(url.protocol) ? url.href : null;
}

/** `text` rendered as a DocumentFragment of safe elements. */
export function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  blocks(text.replace(/\r\n?/g, "\n").split("\n"), out, 0);
  return out;
}

function blocks(lines, out, depth) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      i += 1;
    } else if ((m = FENCE.exec(line))) {
      i = codeBlock(lines, i, m, out);
    } else if ((m = HEADING.exec(line))) {
      const h = el(`h${Math.min(m[1].length + 2, 6)}`); // # is a section of an answer, not a page title
      inline(m[2], h, depth);
      out.append(h);
      i += 1;
    } else if (RULE.test(line)) {
      out.append(el("hr"));
      i += 1;
    } else if (QUOTE.test(line) && depth < MAX_DEPTH) {
      const inner = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
        inner.push(m[1]);
        i += 1;
      }
      const quote = el("blockquote");
      blocks(inner, quote, depth + 1);
      out.append(quote);
    } else if (ITEM.test(line)) {
      i = list(lines, i, out, depth);
    } else if (isTable(lines, i)) {
      i = table(lines, i, out, depth);
    } else {
      i = paragraph(lines, i, out, depth);
    }
  }
}

function codeBlock(lines, start, open, out) {
  const fence = open[1];
  const body = [];
  let i = start + 1;
  const close = new RegExp(`^ {0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}\\s*$`);
  while (i < lines.length && !close.test(lines[i])) {
    body.push(lines[i]);
    i += 1;
  }
  const pre = el("pre");
  const code = el("code");
  if (open[2]) code.dataset.lang = open[2];
  code.textContent = body.join("\n");
  pre.append(code);
  out.append(pre);
  return i + 1; // past the closing fence (or the end: an answer still being written)
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
    ITEM.test(line);
}

function paragraph(lines, start, out, depth) {
  const p = el("p");
  let i = start;
  while (i < lines.length && lines[i].trim() && (i === start || !startsBlock(lines[i]))) {
    if (i > start) p.append(el("br")); // a chat answer's line breaks are meant
    inline(lines[i].trim(), p, depth);
    i += 1;
  }
  out.append(p);
  return i;
}

function list(lines, start, out, depth) {
  const ordered = /\d/.test(ITEM.exec(lines[start])[1]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered) {
    const first = parseInt(ITEM.exec(lines[start])[1], 10);
    if (first !== 1) node.start = first;
  }
  let i = start;
  let m;
  while (i < lines.length && (m = ITEM.exec(lines[i])) && /\d/.test(m[1]) === ordered) {
    const li = el("li");
    inline(m[2], li, depth);
    i += 1;
    // Indented lines continue the item.
    while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !ITEM.test(lines[i])) {
      li.append(el("br"));
      inline(lines[i].trim(), li, depth);
      i += 1;
    }
    node.append(li);
  }
  out.append(node);
  return i;
}

// A GFM table: a header row, a delimiter row (`| --- | :-: |`), rows up to a blank line.
function isTable(lines, i) {
  const sep = lines[i + 1];
  return lines[i].includes("|") && sep !== undefined && sep.includes("|") && TABLE_SEP.test(sep);
}

function cells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim());
}

function table(lines, start, out, depth) {
  const align = cells(lines[start + 1]).map((d) =>
    d.startsWith(":") && d.endsWith(":") ? "center" : d.endsWith(":") ? "right" : "");
  const row = (line, tag) => {
    const tr = el("tr");
    cells(line).slice(0, align.length).forEach((text, n) => {
      const cell = el(tag, align[n] ? `align-${align[n]}` : "");
      inline(text, cell, depth);
      tr.append(cell);
    });
    return tr;
  };
  const [head, body, t, wrap] = [el("thead"), el("tbody"), el("table"), el("div", "table")];
  head.append(row(lines[start], "th"));
  let i = start + 2;
  for (; i < lines.length && lines[i].trim() && lines[i].includes("|"); i += 1) {
    body.append(row(lines[i], "td"));
  }
  t.append(head, body);
  wrap.append(t); // the wrapper scrolls sideways on its own when the table is wide
  out.append(wrap);
  return i;
}

// ---- inline -------------------------------------------------------------------------

const EMPHASIS = [
  ["**", "strong"], ["__", "strong"], ["~~", "del"], ["*", "em"], ["_", "em"],
];

function inline(src, out, depth) {
  let buf = "";
  const flush = () => {
    if (buf) out.append(document.createTextNode(buf));
    buf = "";
  };
  let i = 0;
  while (i < src.length) {
    const c = src[i];
    const found =
      c === "\\" ? escaped(src, i) :
      c === "`" ? codeSpan(src, i) :
      c === "[" || (c === "!" && src[i + 1] === "[") ? link(src, i, depth) :
      c === "<" ? autolink(src, i) :
      c === "h" ? bareUrl(src, i) :
      "*_~".includes(c) ? emphasis(src, i, depth) : null;
    if (found) {
      if (typeof found.node === "string") {
        buf += found.node;
      } else {
        flush();
        out.append(found.node);
      }
      i = found.end;
    } else {
      buf += c;
      i += 1;
    }
  }
  flush();
}

function escaped(src, i) {
  const next = src[i + 1];
  return next && ESCAPABLE.includes(next) ? { node: next, end: i + 2 } : null;
}

function codeSpan(src, i) {
  let n = 0;
  while (src[i + n] === "`") n += 1;
  const ticks = "`".repeat(n);
  let close = src.indexOf(ticks, i + n);
  while (close !== -1 && src[close + n] === "`") close = src.indexOf(ticks, close + n + 1);
  if (close === -1) return { node: ticks, end: i + n };
  const code = el("code");
  let body = src.slice(i + n, close);
  if (/^ .*[^ ].* $/.test(body)) body = body.slice(1, -1);
  code.textContent = body;
  return { node: code, end: close + n };
}

function emphasis(src, i, depth) {
  if (depth >= MAX_DEPTH) return null;
  for (const [mark, tag] of EMPHASIS) {
    if (!src.startsWith(mark, i)) continue;
    const open = i + mark.length;
    // `_` inside a word (snake_case) and a mark followed by a space are not emphasis.
    if (mark[0] === "_" && i > 0 && /\w/.test(src[i - 1])) return null;
    if (!src[open] || /\s/.test(src[open])) return null;
    let close = src.indexOf(mark, open + 1);
    const single = mark.length === 1; // `*` that is half of `**` does not close `*`
    while (close !== -1 && (/\s/.test(src[close - 1]) ||
      (single && (src[close - 1] === mark || src[close + 1] === mark)) ||
      (mark[0] === "_" && /\w/.test(src[close + mark.length] || "")))) {
      close = src.indexOf(mark, close + 1);
    }
    if (close === -1) return null;
    const node = el(tag);
    inline(src.slice(open, close), node, depth + 1);
    return { node, end: close + mark.length };
  }
  return null;
}

function anchor(href, label) {
  const a = el("a");
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  if (typeof label === "string") a.textContent = label;
  else a.append(label);
  return a;
}

// [label](url "title") and ![alt](url): an image is shown as a link (no remote loads).
function link(src, i, depth) {
  const image = src[i] === "!";
  const open = image ? i + 1 : i;
  const m = /^\[((?:[^\[\]\\]|\\.){0,500})\]\(\s*<?([^\s()<>]*)>?(?:\s+"[^"]*")?\s*\)/
    .exec(src.slice(open));
  if (!m) return image ? { node: "!", end: i + 1 } : null;
  const end = open + m[0].length;
  const href = safeHref(m[2]);
  const label = document.createDocumentFragment();
  inline(m[1] || m[2], label, depth + 1);
  if (href === null) {
    const span = el("span", "unsafe-link");
    span.title = "link not followed (only http, https and mailto links are)";
    span.append(label);
    return { node: span, end };
  }
  return { node: anchor(href, label), end };
}

function autolink(src, i) {
  const m = /^<((?:https?|mailto):[^\s<>]+)>/.exec(src.slice(i));
  const href = m && safeHref(m[1]);
  return href ? { node: anchor(href, m[1]), end: i + m[0].length } : null;
}

function bareUrl(src, i) {
  if (i > 0 && /[\w/]/.test(src[i - 1])) return null;
  const m = /^https?:\/\/[^\s<>]*[^\s<>.,;:!?'")\]*_]/.exec(src.slice(i));
  const href = m && safeHref(m[0]);
  return href ? { node: anchor(href, m[0]), end: i + m[0].length } : null;
}
