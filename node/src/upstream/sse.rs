//! Incremental parser for `text/event-stream` bodies (Server-Sent Events, WHATWG HTML §9.2).
//!
//! Feed it the body in whatever chunks the network delivers; it yields complete events.
//! Handles LF, CRLF and lone CR line endings (also split across chunks), multi-line `data:`,
//! comments, a leading byte-order mark, `id:` (which persists across events, as the spec
//! says) and `retry:`.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The event type (`event:` field; `"message"` when the event did not name one).
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The last event id seen on the stream so far (`id:` field), if any.
    pub id: Option<String>,
}

/// Feeds bytes in, yields complete events.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: String,
    event: String,
    has_data: bool,
    last_event_id: Option<String>,
    retry_ms: Option<u64>,
    skip_lf: bool,
    started: bool,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl SseParser {
    /// A fresh parser.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last `id:` seen (what a client sends back as `Last-Event-ID` to resume).
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    /// The last valid `retry:` value in milliseconds, if the server sent one.
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    /// Feed a chunk; returns the events it completed (possibly none).
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        let mut chunk = chunk;
        if self.skip_lf && !chunk.is_empty() {
            // The previous chunk ended with CR; a LF right after it belongs to the same break.
            if chunk[0] == b'\n' {
                chunk = &chunk[1..];
            }
            self.skip_lf = false;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(chunk);
        if !self.started {
            if buf.len() < BOM.len() && BOM.starts_with(&buf) {
                self.buf = buf;
                return out;
            }
            self.started = true;
            if buf.starts_with(BOM) {
                buf.drain(..BOM.len());
            }
        }
        let mut start = 0;
        let mut i = 0;
        while i < buf.len() {
            match buf[i] {
                b'\n' => {
                    self.line(&buf[start..i], &mut out);
                    i += 1;
                    start = i;
                }
                b'\r' => {
                    self.line(&buf[start..i], &mut out);
                    if i + 1 < buf.len() {
                        if buf[i + 1] == b'\n' {
                            i += 1;
                        }
                    } else {
                        self.skip_lf = true;
                    }
                    i += 1;
                    start = i;
                }
                _ => i += 1,
            }
        }
        buf.drain(..start);
        self.buf = buf;
        out
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if self.has_data {
                let event = if self.event.is_empty() {
                    "message".to_owned()
                } else {
                    std::mem::take(&mut self.event)
                };
                out.push(SseEvent {
                    event,
                    data: std::mem::take(&mut self.data),
                    id: self.last_event_id.clone(),
                });
            }
            self.data.clear();
            self.event.clear();
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return; // comment / keep-alive
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&value);
                self.has_data = true;
            }
            b"event" => self.event = value.into_owned(),
            b"id" if !value.contains('\0') => self.last_event_id = Some(value.into_owned()),
            b"retry" => {
                if let Ok(ms) = value.parse::<u64>() {
                    self.retry_ms = Some(ms);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(p: &mut SseParser, chunks: &[&[u8]]) -> Vec<SseEvent> {
        chunks.iter().flat_map(|c| p.feed(c)).collect()
    }

    #[test]
    fn parses_split_chunks_multiline_data_and_comments() {
        let mut p = SseParser::new();
        assert!(p.feed(b": keepalive\n\nevent: mess").is_empty());
        let ev = p.feed(b"age\ndata: {\"a\":\ndata: 1}\nid: 7\r\n\r\ndata: x\n\n");
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].event, "message");
        assert_eq!(ev[0].data, "{\"a\":\n1}");
        assert_eq!(ev[0].id.as_deref(), Some("7"));
        // The id persists to later events, as the spec says.
        assert_eq!(ev[1].data, "x");
        assert_eq!(ev[1].id.as_deref(), Some("7"));
        assert_eq!(p.last_event_id(), Some("7"));
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let body: &[u8] =
            b"\xEF\xBB\xBFretry: 1500\r\nevent: note\r\ndata:no-space\r\ndata:  two spaces\r\r: c\nid: a\ndata\n\n";
        let whole = SseParser::new().feed(body);
        assert_eq!(whole.len(), 2, "{whole:?}");
        assert_eq!(whole[0].event, "note");
        assert_eq!(whole[0].data, "no-space\n two spaces");
        assert_eq!(whole[0].id, None);
        assert_eq!(whole[1].event, "message");
        assert_eq!(whole[1].data, "");
        assert_eq!(whole[1].id.as_deref(), Some("a"));
        for cut in 0..body.len() {
            let mut p = SseParser::new();
            let got = feed_all(&mut p, &[&body[..cut], &body[cut..]]);
            assert_eq!(got, whole, "split at {cut}");
            assert_eq!(p.retry_ms(), Some(1500));
        }
        // One byte at a time.
        let mut p = SseParser::new();
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(feed_all(&mut p, &bytes), whole);
    }

    #[test]
    fn events_without_data_are_not_dispatched_and_fields_reset() {
        let mut p = SseParser::new();
        let ev = p.feed(b"event: lonely\n\ndata: d\n\n");
        assert_eq!(ev.len(), 1);
        assert_eq!(
            ev[0].event, "message",
            "the event type does not leak into the next event"
        );
        assert_eq!(ev[0].data, "d");
    }

    #[test]
    fn a_cr_at_the_end_of_a_chunk_and_lf_at_the_start_of_the_next_is_one_break() {
        let mut p = SseParser::new();
        let got = feed_all(&mut p, &[b"data: a\r", b"\n", b"\r", b"\ndata: b\n\n"]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].data, "a");
        assert_eq!(got[1].data, "b");
    }
}
