//! Server-Sent Events: split a complete `text/event-stream` body into event data and find the
//! JSON-RPC response among them.

use crate::rpc::{CallError, ErrorKind, Reply, parse_reply, snippet};

/// Call `f` with the data of each event in `body` (the `data:` lines joined with `\n`), in order,
/// until `f` returns `true`. Follows the SSE rules: lines end with `\n`, `\r\n` or `\r`; a blank
/// line dispatches; `:` starts a comment; one space after the colon is dropped; events without
/// data are skipped. A last event without its blank line is still delivered (lenient).
pub fn for_each_event(body: &[u8], mut f: impl FnMut(&[u8]) -> bool) {
    let mut data: Vec<u8> = Vec::new();
    let mut has_data = false;
    let mut rest = body;
    loop {
        let (line, next, at_end) = match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(i) => {
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                (&rest[..i], &rest[i + skip..], false)
            }
            None => (rest, &rest[rest.len()..], true),
        };
        if line.is_empty() {
            if has_data {
                if data.last() == Some(&b'\n') {
                    data.pop();
                }
                if f(&data) {
                    return;
                }
                data.clear();
                has_data = false;
            }
        } else if line[0] != b':' {
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(c) => {
                    let v = &line[c + 1..];
                    (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (line, &line[line.len()..]),
            };
            if field == b"data" {
                data.extend_from_slice(value);
                data.push(b'\n');
                has_data = true;
            }
        }
        if at_end {
            if has_data {
                if data.last() == Some(&b'\n') {
                    data.pop();
                }
                f(&data);
            }
            return;
        }
        rest = next;
    }
}

/// The outcome of the JSON-RPC response with id `want` carried in an SSE body
/// (a response without a numeric id also matches, e.g. an error with `"id": null`).
pub fn find_response(body: &[u8], want: u64) -> Result<(), CallError> {
    let mut found: Option<Result<(), CallError>> = None;
    let mut bad: Option<String> = None;
    for_each_event(body, |data| match parse_reply(data) {
        Ok(Reply::Response { id, outcome }) if id.is_none_or(|id| id == want) => {
            found = Some(outcome);
            true
        }
        Ok(_) => false,
        Err(e) => {
            bad.get_or_insert_with(|| {
                format!("bad JSON in SSE event ({e}): {}", snippet(data, 200))
            });
            false
        }
    });
    match (found, bad) {
        (Some(outcome), _) => outcome,
        (None, Some(bad)) => Err(CallError::new(ErrorKind::Transport, bad)),
        (None, None) => Err(CallError::new(
            ErrorKind::Transport,
            format!(
                "the SSE stream ended without a response to id {want}: {}",
                snippet(body, 200)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(body: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for_each_event(body, |d| {
            out.push(String::from_utf8_lossy(d).into_owned());
            false
        });
        out
    }

    #[test]
    fn splits_events_with_any_line_ending() {
        let body = b"event: message\ndata: {\"a\":1}\n\n: keep-alive\n\nid: 3\r\ndata:x\r\ndata: y\r\n\r\ndata: z\r\rretry: 10\n\n";
        assert_eq!(events(body), vec!["{\"a\":1}", "x\ny", "z"]);
    }

    #[test]
    fn event_without_data_is_skipped_and_last_event_is_lenient() {
        assert_eq!(events(b"event: ping\n\n"), Vec::<String>::new());
        assert_eq!(events(b"data: tail"), vec!["tail"]);
        assert_eq!(events(b"data\n\n"), vec![""]);
        assert_eq!(events(b"data:  two spaces\n\n"), vec![" two spaces"]);
    }

    #[test]
    fn stops_when_asked() {
        let mut n = 0;
        for_each_event(b"data: 1\n\ndata: 2\n\n", |_| {
            n += 1;
            true
        });
        assert_eq!(n, 1);
    }

    #[test]
    fn finds_the_response_after_notifications() {
        let body = concat!(
            "event: message\n",
            "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progress\":1}}\n\n",
            "event: message\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":99,\"result\":{}}\n\n",
            "event: message\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"content\":[],\"isError\":true}}\n\n",
        );
        assert_eq!(find_response(body.as_bytes(), 99), Ok(()));
        let e = find_response(body.as_bytes(), 7).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Tool);
        let e = find_response(body.as_bytes(), 8).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transport);
        assert!(e.detail.contains("without a response to id 8"));
    }

    #[test]
    fn error_with_null_id_matches_and_garbage_is_reported() {
        let body = b"data: {\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-32600,\"message\":\"bad\"}}\n\n";
        assert_eq!(find_response(body, 1).unwrap_err().kind, ErrorKind::Rpc);
        let e = find_response(b"data: {oops\n\n", 1).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transport);
        assert!(e.detail.contains("bad JSON"));
    }
}
