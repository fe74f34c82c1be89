//! Reading newline-delimited input with a bound on the memory one line may take: the stdio
//! front door (`gateway/stdio.rs`) and the stdio upstream client (`upstream/stdio.rs`) read
//! peers they do not control, so a line without an end must not grow a buffer without end.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Read one line (through `\n`, or to EOF when the input ends without one) from `r` and
/// append it to `buf`, keeping at most `cap` bytes in `buf`: the rest of a longer line is
/// consumed and dropped, so the next call starts at the next line.
///
/// Returns the full length of the line as read, terminator included, which is larger than
/// what was kept when the line was cut; 0 only at EOF. The terminator (`\n`, and a `\r`
/// before it) stays in `buf` when it fits; callers trim. To tell a line longer than `max`
/// bytes from one that fits, pass `cap = max + 1` and check `buf.len() > max`.
pub async fn read_line_capped<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(total);
        }
        let (used, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = cap.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..used.min(room)]);
        r.consume(used);
        total += used;
        if done {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::BufReader;

    use super::read_line_capped;

    /// Reads every line of `data` through a reader with a `capacity`-byte buffer (small
    /// capacities make a line span several `fill_buf` chunks); returns (length, kept) pairs.
    async fn read_all(data: &[u8], capacity: usize, cap: usize) -> Vec<(usize, Vec<u8>)> {
        let mut r = BufReader::with_capacity(capacity, data);
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            let n = read_line_capped(&mut r, &mut buf, cap).await.unwrap();
            if n == 0 {
                assert!(buf.is_empty(), "nothing is kept at EOF");
                return out;
            }
            out.push((n, buf));
        }
    }

    #[tokio::test]
    async fn a_line_longer_than_the_cap_is_cut_and_the_next_line_is_whole() {
        let data = format!("{}\nshort\n", "y".repeat(100));
        for capacity in [4, 16, 1024] {
            let lines = read_all(data.as_bytes(), capacity, 10).await;
            assert_eq!(
                lines,
                vec![(101, b"yyyyyyyyyy".to_vec()), (6, b"short\n".to_vec())],
                "reader capacity {capacity}"
            );
        }
    }

    #[tokio::test]
    async fn the_cap_plus_one_convention_tells_too_long_from_just_fitting() {
        let max = 8;
        // 7 bytes + '\n' fit in 8; 8 bytes + '\n' are one too many; longer lines are cut.
        let lines = read_all(b"1234567\n12345678\n123456789012\n", 3, max + 1).await;
        assert_eq!(
            lines,
            vec![
                (8, b"1234567\n".to_vec()),
                (9, b"12345678\n".to_vec()),
                (13, b"123456789".to_vec())
            ]
        );
        let too_long: Vec<bool> = lines.iter().map(|(_, kept)| kept.len() > max).collect();
        assert_eq!(too_long, [false, true, true]);
    }

    #[tokio::test]
    async fn eof_without_newline_returns_the_last_line_then_zero() {
        assert_eq!(
            read_all(b"first\nlast", 4, 100).await,
            vec![(6, b"first\n".to_vec()), (4, b"last".to_vec())]
        );
        assert_eq!(
            read_all(b"abcdefghij", 4, 3).await,
            vec![(10, b"abc".to_vec())]
        );
        assert!(read_all(b"", 4, 100).await.is_empty());
    }

    #[tokio::test]
    async fn crlf_is_kept_for_the_caller_to_trim_and_counts_against_the_cap() {
        assert_eq!(
            read_all(b"a\r\nb\r\n\r\n", 2, 100).await,
            vec![
                (3, b"a\r\n".to_vec()),
                (3, b"b\r\n".to_vec()),
                (2, b"\r\n".to_vec())
            ]
        );
        // A lone '\r' is not a line end.
        assert_eq!(
            read_all(b"a\rb\n", 2, 100).await,
            vec![(4, b"a\rb\n".to_vec())]
        );
        assert_eq!(read_all(b"ab\r\n", 2, 3).await, vec![(4, b"ab\r".to_vec())]);
    }

    #[tokio::test]
    async fn the_cap_counts_what_the_buffer_already_holds() {
        let mut r = BufReader::new(&b"abcdef\n"[..]);
        let mut buf = b"xy".to_vec();
        assert_eq!(read_line_capped(&mut r, &mut buf, 5).await.unwrap(), 7);
        assert_eq!(buf, b"xyabc");
    }

    /// A reader that yields `data` and then fails.
    struct FailsAfter(&'static [u8]);

    impl tokio::io::AsyncRead for FailsAfter {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            out: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.0.is_empty() {
                return std::task::Poll::Ready(Err(std::io::Error::other("broken pipe")));
            }
            let n = self.0.len().min(out.remaining());
            out.put_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_read_error_inside_a_line_is_returned() {
        let mut r = BufReader::with_capacity(4, FailsAfter(b"ok\npartial"));
        let mut buf = Vec::new();
        assert_eq!(read_line_capped(&mut r, &mut buf, 100).await.unwrap(), 3);
        buf.clear();
        let err = read_line_capped(&mut r, &mut buf, 100).await.unwrap_err();
        assert_eq!(err.to_string(), "broken pipe");
    }
}
