// Server-Sent Events framing, parsed by hand: EventSource cannot send an Authorization header, so
// the console reads the stream with fetch() and splits it here (the WHATWG "event stream" rules).

/**
 * A parser fed with decoded text chunks; calls onEvent({id, event, data}) for every complete event.
 * Call end() when the stream ends. Comment lines (": ping") and "retry:" are ignored; an event
 * without data is dropped, as the spec says.
 */
export function createParser(onEvent) {
  let buffer = "";
  let data = [];
  let event = "";
  let id = null;

  function line(text) {
    if (text === "") {
      if (data.length) onEvent({ id, event: event || "message", data: data.join("\n") });
      data = [];
      event = "";
      return;
    }
    if (text.startsWith(":")) return;
    const colon = text.indexOf(":");
    const field = colon === -1 ? text : text.slice(0, colon);
    let value = colon === -1 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") data.push(value);
    else if (field === "event") event = value;
    else if (field === "id" && !value.includes("\0")) id = value;
  }

  return {
    feed(chunk) {
      buffer += chunk;
      // A line ends at \r\n, \n or \r; a trailing \r may be half of a \r\n still in flight.
      let match;
      while ((match = /\r\n|\n|\r(?!$)/.exec(buffer))) {
        line(buffer.slice(0, match.index));
        buffer = buffer.slice(match.index + match[0].length);
      }
    },
    /** The stream ended: a last line ended by a lone \r still counts (a half-sent event does not). */
    end() {
      if (buffer.endsWith("\r")) line(buffer.slice(0, -1));
      buffer = "";
    },
  };
}

/** The events of a text/event-stream body (a ReadableStream of bytes), as an async iterator. */
export async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const queue = [];
  const parser = createParser((event) => queue.push(event));
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        parser.end();
        while (queue.length) yield queue.shift();
        return;
      }
      parser.feed(value);
      while (queue.length) yield queue.shift();
    }
  } finally {
    // Ends the HTTP response too when the caller stops early (a break, an abort).
    reader.cancel().catch(() => {});
  }
}
