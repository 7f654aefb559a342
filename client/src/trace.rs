//! W3C trace-context (`traceparent`) values, for propagating a caller's trace to the server.
//!
//! The client does not depend on OpenTelemetry; a tracing integration plugs in through
//! [`Client::with_traceparent`](crate::Client::with_traceparent) by returning the current span's
//! context as a [`TraceParent`].

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The `traceparent` header of the W3C Trace Context spec (version `00`).
///
/// ```
/// use denoised_client::TraceParent;
/// let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap();
/// assert!(tp.sampled());
/// assert_eq!(tp.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

impl TraceParent {
    /// The metadata key the value is sent under.
    pub const HEADER: &'static str = "traceparent";

    /// A trace context; the spec forbids all-zero ids.
    pub fn new(trace_id: [u8; 16], parent_id: [u8; 8], sampled: bool) -> Result<Self, Error> {
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return Err(Error::invalid("traceparent ids must not be all zero"));
        }
        Ok(TraceParent {
            trace_id,
            parent_id,
            flags: u8::from(sampled),
        })
    }

    /// The 16-byte trace id.
    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The 8-byte id of the caller's span.
    pub fn parent_id(&self) -> [u8; 8] {
        self.parent_id
    }

    /// Whether the caller sampled (records) this trace.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    // The spec allows lowercase hex only.
    if s.len() != 2 * N || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl FromStr for TraceParent {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = || Error::invalid(format!("invalid traceparent {s:?}"));
        let mut parts = s.trim().split('-');
        let (Some(version), Some(trace_id), Some(parent_id), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        let [version] = hex::<1>(version).ok_or_else(invalid)?;
        // Version ff is forbidden; version 00 has exactly four fields, later ones may add more.
        if version == 0xff || (version == 0 && parts.next().is_some()) {
            return Err(invalid());
        }
        let [flags] = hex::<1>(flags).ok_or_else(invalid)?;
        let trace_id = hex::<16>(trace_id).ok_or_else(invalid)?;
        let parent_id = hex::<8>(parent_id).ok_or_else(invalid)?;
        let mut tp = TraceParent::new(trace_id, parent_id, false).map_err(|_| invalid())?;
        // Unknown flag bits are dropped when re-sending, as the spec asks for version 00.
        tp.flags = flags & 1;
        Ok(tp)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        for b in self.trace_id {
            write!(f, "{b:02x}")?;
        }
        f.write_str("-")?;
        for b in self.parent_id {
            write!(f, "{b:02x}")?;
        }
        write!(f, "-{:02x}", self.flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn round_trip() {
        let tp: TraceParent = EXAMPLE.parse().unwrap();
        assert_eq!(tp.trace_id()[0], 0x4b);
        assert_eq!(tp.parent_id()[7], 0xb7);
        assert!(tp.sampled());
        assert_eq!(tp.to_string(), EXAMPLE);

        let unsampled = TraceParent::new([1; 16], [2; 8], false).unwrap();
        assert_eq!(
            unsampled.to_string(),
            "00-01010101010101010101010101010101-0202020202020202-00"
        );
        assert_eq!(
            unsampled.to_string().parse::<TraceParent>().unwrap(),
            unsampled
        );
    }

    #[test]
    fn future_versions_are_read_as_version_00() {
        let tp: TraceParent = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-extra"
            .parse()
            .unwrap();
        assert_eq!(tp.to_string(), EXAMPLE);
    }

    #[test]
    fn invalid_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            let err = bad.parse::<TraceParent>().unwrap_err();
            assert!(err.to_string().contains("invalid traceparent"), "{bad}");
        }
        assert!(TraceParent::new([0; 16], [1; 8], true).is_err());
    }
}
