//! The media endpoint's HTTP header parsers on arbitrary text: `Range`
//! (what a resumed download asks for) and `Content-Range` (what a resumed
//! upload carries). Never a panic; whatever parses is a range that makes
//! sense (a bounded range not empty, a suffix not empty, a content range
//! inside its total), and written back the standard way it parses to the
//! same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use parley_core::media::{ByteRange, parse_content_range, parse_range};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(range) = parse_range(&text) {
        let written = match range {
            ByteRange::Bounded { start, end } => {
                assert!(start < end, "{text:?} gave an empty range");
                format!("bytes={start}-{}", end - 1)
            }
            ByteRange::From(start) => format!("bytes={start}-"),
            ByteRange::Suffix(n) => {
                assert!(n > 0, "{text:?} gave an empty suffix");
                format!("bytes=-{n}")
            }
        };
        assert_eq!(parse_range(&written), Some(range), "{text:?}");
    }
    if let Some((start, end, total)) = parse_content_range(&text) {
        assert!(start <= end && end < total, "{text:?}");
        let written = format!("bytes {start}-{end}/{total}");
        assert_eq!(
            parse_content_range(&written),
            Some((start, end, total)),
            "{text:?}"
        );
    }
});
