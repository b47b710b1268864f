//! Secrets out of text. Backend URLs carry passwords
//! (`scheme://user:password@host`), and an error string, ours or a
//! library's, may quote one: whatever is logged, printed or written to a
//! status goes through [`redact_urls`] where it can hold a URL.

/// `text` with the password of every URL in it replaced by `***`.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends where the path, query or fragment starts, or
        // where the URL does (quotes, spaces).
        let end = tail
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '`' | '<' | '>') || c.is_whitespace()
            })
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..=colon]);
                        out.push_str("***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::redact_urls;

    #[test]
    fn passwords_in_urls_are_masked_and_nothing_else_changes() {
        for (text, masked) in [
            (
                "postgres://parley:s3cret@db:5432/parley",
                "postgres://parley:***@db:5432/parley",
            ),
            (
                "redis://:pw@127.0.0.1:6379/",
                "redis://:***@127.0.0.1:6379/",
            ),
            (
                "amqp://guest:guest@rabbit:5672/%2f and redis://r:6379",
                "amqp://guest:***@rabbit:5672/%2f and redis://r:6379",
            ),
            (
                "redis url \"rediss://u:p@h?x=1\": bad",
                "redis url \"rediss://u:***@h?x=1\": bad",
            ),
            // A password holding an @ is masked whole.
            ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
            ("postgres://user@h/db", "postgres://user@h/db"),
            ("no url here: a:b@c", "no url here: a:b@c"),
            ("http://h:80/path?u=a:b@c", "http://h:80/path?u=a:b@c"),
            ("ends with ://", "ends with ://"),
            ("", ""),
        ] {
            assert_eq!(redact_urls(text), masked, "{text}");
        }
    }
}
