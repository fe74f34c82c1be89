//! Small parsers for the command line: durations, command lines, concurrency lists.

use std::time::Duration;

/// A command-line value that could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgError {
    /// A duration without a known unit or with a bad number.
    #[error("bad duration '{0}': write a number with a unit, e.g. 500ms, 10s, 2m")]
    Duration(String),
    /// An unterminated quote in a command line.
    #[error("bad command line '{0}': a quote is not closed")]
    Quote(String),
    /// An empty command line.
    #[error(
        "the command line is empty: give the server's argv, e.g. --cmd \"node dist/index.js stdio\""
    )]
    EmptyCommand,
    /// A bad concurrency list.
    #[error("bad concurrency '{0}': give positive integers separated by commas, e.g. 1,8")]
    Concurrency(String),
}

/// Parse `500ms`, `10s`, `1.5s`, `2m`, `250us` (a bare number means seconds).
pub fn parse_duration(s: &str) -> Result<Duration, ArgError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| ArgError::Duration(s.to_owned()))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" | "min" => n * 60.0,
        _ => return Err(ArgError::Duration(s.to_owned())),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(ArgError::Duration(s.to_owned()));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Split a command line into argv: whitespace separates words, single and double quotes group
/// (no escapes inside single quotes; `\"` and `\\` inside double quotes; `\x` outside quotes).
pub fn split_command(s: &str) -> Result<Vec<String>, ArgError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(x) => cur.push(x),
                        None => return Err(ArgError::Quote(s.to_owned())),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(x @ ('"' | '\\')) => cur.push(x),
                            Some(x) => {
                                cur.push('\\');
                                cur.push(x);
                            }
                            None => return Err(ArgError::Quote(s.to_owned())),
                        },
                        Some(x) => cur.push(x),
                        None => return Err(ArgError::Quote(s.to_owned())),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(x) = chars.next() {
                    cur.push(x);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    if out.is_empty() {
        return Err(ArgError::EmptyCommand);
    }
    Ok(out)
}

/// Parse `1,8` into `[1, 8]` (each ≥ 1 and < 65536).
pub fn parse_concurrency(s: &str) -> Result<Vec<usize>, ArgError> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let n: usize = part
            .trim()
            .parse()
            .map_err(|_| ArgError::Concurrency(s.to_owned()))?;
        if n == 0 || n >= 1 << 16 {
            return Err(ArgError::Concurrency(s.to_owned()));
        }
        out.push(n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn command_lines() {
        assert_eq!(
            split_command("node /x/index.js stdio").unwrap(),
            vec!["node", "/x/index.js", "stdio"]
        );
        assert_eq!(
            split_command(r#"  sh -c 'echo "a b"'  "c \"d\"" e\ f"#).unwrap(),
            vec!["sh", "-c", r#"echo "a b""#, r#"c "d""#, "e f"]
        );
        assert_eq!(split_command("a ''").unwrap(), vec!["a", ""]);
        assert_eq!(split_command("   "), Err(ArgError::EmptyCommand));
        assert!(matches!(split_command("a 'b"), Err(ArgError::Quote(_))));
    }

    #[test]
    fn concurrency_lists() {
        assert_eq!(parse_concurrency("1,8").unwrap(), vec![1, 8]);
        assert_eq!(parse_concurrency(" 4 ").unwrap(), vec![4]);
        assert!(parse_concurrency("0").is_err());
        assert!(parse_concurrency("1,,2").is_err());
        assert!(parse_concurrency("70000").is_err());
    }
}
