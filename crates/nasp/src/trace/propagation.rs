//! Reading and writing trace context headers: W3C trace context
//! (`traceparent`, `tracestate`) and B3, single (`b3`) and multiple
//! (`x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid`, `x-b3-sampled`,
//! `x-b3-flags`), as Envoy's tracers read and write them.
//!
//! Headers come from the network: anything that does not parse is
//! ignored (the request starts a new trace), never an error or a panic.
//! When several are present, a valid `traceparent` wins, then `b3`, then
//! the `x-b3-*` headers.

use http::HeaderMap;
use http::header::HeaderValue;
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

use super::Propagator;

/// `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// `tracestate`.
pub const TRACESTATE: &str = "tracestate";
/// B3's single header.
pub const B3: &str = "b3";
/// B3's trace id.
pub const X_B3_TRACEID: &str = "x-b3-traceid";
/// B3's span id.
pub const X_B3_SPANID: &str = "x-b3-spanid";
/// B3's parent span id.
pub const X_B3_PARENTSPANID: &str = "x-b3-parentspanid";
/// B3's sampling decision.
pub const X_B3_SAMPLED: &str = "x-b3-sampled";
/// B3's debug flag (`1`: sampled).
pub const X_B3_FLAGS: &str = "x-b3-flags";

/// The headers a trace is carried in, `tracestate` aside (it is kept when
/// the context is replaced, W3C's rule).
const CONTEXT_HEADERS: [&str; 7] = [
    TRACEPARENT,
    B3,
    X_B3_TRACEID,
    X_B3_SPANID,
    X_B3_PARENTSPANID,
    X_B3_SAMPLED,
    X_B3_FLAGS,
];

/// What a request's headers say about its trace.
#[derive(Clone, Debug, PartialEq)]
pub enum Incoming {
    /// No trace headers, or none that parse: a new trace.
    None,
    /// A sampling decision without ids (B3's `b3: 0`, `x-b3-sampled: 1`
    /// alone): a new trace, sampled or not as asked.
    Decision(bool),
    /// The caller's span, marked remote. `sampled` is its decision; `None`
    /// when B3 carried ids but left the decision to us (the context's
    /// flags are then unsampled).
    Parent {
        /// The caller's span.
        context: SpanContext,
        /// Its sampling decision, if it made one.
        sampled: Option<bool>,
    },
}

/// Reads the trace context of a request.
pub fn extract(headers: &HeaderMap) -> Incoming {
    if let Some((trace, span, flags)) = single(headers, TRACEPARENT).and_then(parse_traceparent) {
        // A tracestate that does not parse is dropped; the parent stays.
        let state = single(headers, TRACESTATE)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<TraceState>().ok())
            .unwrap_or_default();
        let sampled = flags.is_sampled();
        return Incoming::Parent {
            context: SpanContext::new(trace, span, flags, true, state),
            sampled: Some(sampled),
        };
    }
    if let Some(b3) = single(headers, B3)
        && let Some(incoming) = parse_b3_single(b3)
    {
        return incoming;
    }
    parse_b3_multi(headers)
}

/// Removes every trace context header but `tracestate`.
pub fn strip(headers: &mut HeaderMap) {
    for h in CONTEXT_HEADERS {
        headers.remove(h);
    }
}

/// Whether a request carries any trace context header.
pub fn has_context(headers: &HeaderMap) -> bool {
    CONTEXT_HEADERS.iter().any(|h| headers.contains_key(*h))
}

/// Replaces the request's trace headers with `context`'s in each format
/// of `propagators`; `parent` is the span it continues, for B3's parent
/// id. `tracestate` is written with W3C when the context has one.
pub fn inject(
    headers: &mut HeaderMap,
    context: &SpanContext,
    parent: Option<SpanId>,
    propagators: &[Propagator],
) {
    strip(headers);
    if !context.is_valid() {
        return;
    }
    let sampled = context.is_sampled();
    let trace = format!("{:032x}", context.trace_id());
    let span = format!("{:016x}", context.span_id());
    let parent = parent
        .filter(|p| *p != SpanId::INVALID)
        .map(|p| format!("{p:016x}"));
    let put = |headers: &mut HeaderMap, name: &'static str, value: String| {
        // Only hex digits and dashes, or the tracestate that parsed:
        // always a valid header value.
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    for p in propagators {
        match p {
            Propagator::TraceContext => {
                let flags = if sampled { "01" } else { "00" };
                put(headers, TRACEPARENT, format!("00-{trace}-{span}-{flags}"));
                let state = context.trace_state().header();
                if state.is_empty() {
                    headers.remove(TRACESTATE);
                } else {
                    put(headers, TRACESTATE, state);
                }
            }
            Propagator::B3Multi => {
                put(headers, X_B3_TRACEID, trace.clone());
                put(headers, X_B3_SPANID, span.clone());
                if let Some(parent) = &parent {
                    put(headers, X_B3_PARENTSPANID, parent.clone());
                }
                put(
                    headers,
                    X_B3_SAMPLED,
                    if sampled { "1" } else { "0" }.to_string(),
                );
            }
            Propagator::B3Single => {
                let mut v = format!("{trace}-{span}-{}", if sampled { '1' } else { '0' });
                if let Some(parent) = &parent {
                    v.push('-');
                    v.push_str(parent);
                }
                put(headers, B3, v);
            }
        }
    }
}

/// The header's value when it appears exactly once (W3C: several
/// `traceparent`s are invalid).
fn single<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?;
    if all.next().is_some() {
        return None;
    }
    Some(first.as_bytes())
}

fn is_lower_hex(s: &[u8]) -> bool {
    s.iter()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// A hex id of `len` digits (B3 also takes upper case), not zero.
fn hex_id(s: &[u8], len: usize, lower_only: bool) -> Option<u128> {
    if s.len() != len {
        return None;
    }
    let ok = if lower_only {
        is_lower_hex(s)
    } else {
        s.iter().all(u8::is_ascii_hexdigit)
    };
    if !ok {
        return None;
    }
    let v = u128::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()?;
    (v != 0).then_some(v)
}

/// `version-traceid-parentid-flags`, W3C trace context level 1: version
/// `00` has exactly these four fields; a later version may add fields
/// after a dash; `ff` is invalid; ids are lower-case hex and not zero.
fn parse_traceparent(v: &[u8]) -> Option<(TraceId, SpanId, TraceFlags)> {
    let v = trim(v);
    if v.len() < 55 {
        return None;
    }
    let (version, trace, span, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    if !is_lower_hex(version) || version == b"ff" || !is_lower_hex(flags) {
        return None;
    }
    if version == b"00" && v.len() != 55 {
        return None;
    }
    if v.len() > 55 && v[55] != b'-' {
        return None;
    }
    let trace = hex_id(trace, 32, true)?;
    let span = hex_id(span, 16, true)?;
    let flags = u8::from_str_radix(std::str::from_utf8(flags).ok()?, 16).ok()?;
    Some((
        TraceId::from(trace),
        SpanId::from(u64::try_from(span).ok()?),
        TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
    ))
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

/// A B3 trace id: 16 or 32 hex digits (a 64-bit id is the low half).
fn b3_trace_id(s: &[u8]) -> Option<TraceId> {
    hex_id(s, 32, false)
        .or_else(|| hex_id(s, 16, false))
        .map(TraceId::from)
}

fn b3_span_id(s: &[u8]) -> Option<SpanId> {
    hex_id(s, 16, false)
        .and_then(|v| u64::try_from(v).ok())
        .map(SpanId::from)
}

/// B3's sampling state: `1` / `d` sampled (`d` is debug), `0` not;
/// `true` / `false` as old Zipkin clients wrote it.
fn b3_sampled(s: &[u8]) -> Option<bool> {
    match s {
        b"1" | b"d" | b"true" => Some(true),
        b"0" | b"false" => Some(false),
        _ => None,
    }
}

fn remote(trace: TraceId, span: SpanId, sampled: Option<bool>) -> Incoming {
    let flags = if sampled == Some(true) {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Incoming::Parent {
        context: SpanContext::new(trace, span, flags, true, TraceState::default()),
        sampled,
    }
}

/// `b3: {trace}-{span}[-{sampled}[-{parent}]]`, or the decision alone.
fn parse_b3_single(v: &[u8]) -> Option<Incoming> {
    let v = trim(v);
    let parts: Vec<&[u8]> = v.split(|c| *c == b'-').collect();
    match parts.as_slice() {
        [decision] => b3_sampled(decision).map(Incoming::Decision),
        [trace, span, rest @ ..] if rest.len() <= 2 => {
            let trace = b3_trace_id(trace)?;
            let span = b3_span_id(span)?;
            let sampled = match rest.first() {
                Some(s) => Some(b3_sampled(s)?),
                None => None,
            };
            if let Some(parent) = rest.get(1) {
                b3_span_id(parent)?;
            }
            Some(remote(trace, span, sampled))
        }
        _ => None,
    }
}

/// The `x-b3-*` headers: trace and span ids, else a decision alone.
fn parse_b3_multi(headers: &HeaderMap) -> Incoming {
    let get = |n: &str| single(headers, n).map(trim);
    let debug = get(X_B3_FLAGS) == Some(b"1");
    let sampled = if debug {
        Some(true)
    } else {
        get(X_B3_SAMPLED).and_then(b3_sampled)
    };
    match (
        get(X_B3_TRACEID).and_then(b3_trace_id),
        get(X_B3_SPANID).and_then(b3_span_id),
    ) {
        (Some(trace), Some(span)) => remote(trace, span, sampled),
        _ => match sampled {
            // Ids given but broken are no decision of the caller's worth
            // following either way: a new trace.
            Some(s) if !headers.contains_key(X_B3_TRACEID) => Incoming::Decision(s),
            _ => Incoming::None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    fn parent(h: &HeaderMap) -> (String, String, Option<bool>) {
        match extract(h) {
            Incoming::Parent { context, sampled } => (
                format!("{:032x}", context.trace_id()),
                format!("{:016x}", context.span_id()),
                sampled,
            ),
            other => panic!("no parent: {other:?}"),
        }
    }

    #[test]
    fn traceparent_is_read_with_its_state() {
        let h = headers(&[
            (TRACEPARENT, &format!("00-{TRACE}-{SPAN}-01")),
            (TRACESTATE, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        ]);
        assert_eq!(parent(&h), (TRACE.into(), SPAN.into(), Some(true)));
        let Incoming::Parent { context, .. } = extract(&h) else {
            panic!("parent")
        };
        assert!(context.is_remote());
        assert_eq!(context.trace_state().get("congo"), Some("t61rcWkgMzE"));
        let h = headers(&[(TRACEPARENT, &format!("00-{TRACE}-{SPAN}-00"))]);
        assert_eq!(parent(&h).2, Some(false));
        // A later version with an extra field; unknown flag bits dropped.
        let h = headers(&[(TRACEPARENT, &format!("cc-{TRACE}-{SPAN}-09-what-ever"))]);
        assert_eq!(parent(&h).2, Some(true));
        // A broken tracestate is dropped, the parent kept.
        let h = headers(&[
            (TRACEPARENT, &format!("00-{TRACE}-{SPAN}-01")),
            (TRACESTATE, "=,=,no key"),
        ]);
        assert_eq!(parent(&h).0, TRACE);
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        let zero_trace = format!("00-{}-{SPAN}-01", "0".repeat(32));
        let zero_span = format!("00-{TRACE}-{}-01", "0".repeat(16));
        let upper = format!("00-{}-{SPAN}-01", TRACE.to_uppercase());
        let ff = format!("ff-{TRACE}-{SPAN}-01");
        let long00 = format!("00-{TRACE}-{SPAN}-01-extra");
        let no_dash = format!("cc-{TRACE}-{SPAN}-01x");
        let short = format!("00-{TRACE}-{SPAN}-1");
        let bad_flags = format!("00-{TRACE}-{SPAN}-0g");
        let dashes = format!("00_{TRACE}_{SPAN}_01");
        let cases = [
            "",
            "00",
            "garbage",
            zero_trace.as_str(),
            zero_span.as_str(),
            upper.as_str(),
            ff.as_str(),
            long00.as_str(),
            no_dash.as_str(),
            short.as_str(),
            bad_flags.as_str(),
            dashes.as_str(),
            "00-ééééééééééééééééééééééééééééééé-00f067aa0ba902b7-01",
        ];
        for v in cases {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(v.as_bytes()) {
                h.insert(TRACEPARENT, v);
            }
            assert_eq!(extract(&h), Incoming::None, "{v:?}");
        }
        // Two traceparents are invalid.
        let v = format!("00-{TRACE}-{SPAN}-01");
        let h = headers(&[(TRACEPARENT, &v), (TRACEPARENT, &v)]);
        assert_eq!(extract(&h), Incoming::None);
        // Bytes that are not UTF-8 in any header.
        let mut h = HeaderMap::new();
        for n in [TRACEPARENT, TRACESTATE, B3, X_B3_TRACEID, X_B3_SPANID] {
            h.insert(
                n,
                HeaderValue::from_bytes(b"\xff\xfe-\x80").expect("opaque"),
            );
        }
        assert_eq!(extract(&h), Incoming::None);
    }

    #[test]
    fn b3_single_and_multi_are_read() {
        let h = headers(&[(B3, &format!("{TRACE}-{SPAN}-1-05e3ac9a4f6e3b90"))]);
        assert_eq!(parent(&h), (TRACE.into(), SPAN.into(), Some(true)));
        let h = headers(&[(B3, &format!("{TRACE}-{SPAN}-d"))]);
        assert_eq!(parent(&h).2, Some(true));
        let h = headers(&[(B3, &format!("{TRACE}-{SPAN}"))]);
        assert_eq!(parent(&h).2, None, "deferred");
        // A 64-bit trace id is the low half of a 128-bit one.
        let h = headers(&[(B3, &format!("a3ce929d0e0e4736-{SPAN}-0"))]);
        assert_eq!(
            parent(&h),
            (
                "0000000000000000a3ce929d0e0e4736".into(),
                SPAN.into(),
                Some(false)
            )
        );
        assert_eq!(extract(&headers(&[(B3, "0")])), Incoming::Decision(false));
        assert_eq!(extract(&headers(&[(B3, "d")])), Incoming::Decision(true));

        let h = headers(&[
            (X_B3_TRACEID, TRACE),
            (X_B3_SPANID, SPAN),
            (X_B3_PARENTSPANID, "05e3ac9a4f6e3b90"),
            (X_B3_SAMPLED, "1"),
        ]);
        assert_eq!(parent(&h), (TRACE.into(), SPAN.into(), Some(true)));
        let h = headers(&[
            (X_B3_TRACEID, &TRACE.to_uppercase()),
            (X_B3_SPANID, SPAN),
            (X_B3_SAMPLED, "0"),
            (X_B3_FLAGS, "1"),
        ]);
        assert_eq!(parent(&h).2, Some(true), "debug wins");
        let h = headers(&[(X_B3_TRACEID, TRACE), (X_B3_SPANID, SPAN)]);
        assert_eq!(parent(&h).2, None);
        assert_eq!(
            extract(&headers(&[(X_B3_SAMPLED, "0")])),
            Incoming::Decision(false)
        );
        // traceparent wins over B3.
        let h = headers(&[
            (TRACEPARENT, &format!("00-{TRACE}-{SPAN}-01")),
            (B3, "0"),
            (X_B3_SAMPLED, "0"),
        ]);
        assert_eq!(parent(&h).2, Some(true));
    }

    #[test]
    fn malformed_b3_is_ignored() {
        for v in [
            "",
            "-",
            "--",
            "x",
            "2",
            TRACE,
            &format!("{TRACE}-"),
            &format!("{TRACE}-{SPAN}-2"),
            &format!("{TRACE}-{SPAN}-1-zz"),
            &format!("{TRACE}-{SPAN}-1-{SPAN}-extra"),
            &format!("{TRACE}0-{SPAN}-1"),
            &format!("{TRACE}-{SPAN}0-1"),
            &format!("{}-{SPAN}-1", "0".repeat(32)),
            &format!("{TRACE}-{}-1", "0".repeat(16)),
        ] {
            assert_eq!(extract(&headers(&[(B3, v)])), Incoming::None, "{v:?}");
        }
        for (t, s) in [
            (TRACE, "short"),
            ("nothex", SPAN),
            (&"0".repeat(32) as &str, SPAN),
            ("", ""),
        ] {
            let h = headers(&[(X_B3_TRACEID, t), (X_B3_SPANID, s), (X_B3_SAMPLED, "1")]);
            assert_eq!(extract(&h), Incoming::None, "{t:?} {s:?}");
        }
        // A broken b3 falls back to the x-b3 headers.
        let h = headers(&[(B3, "junk"), (X_B3_TRACEID, TRACE), (X_B3_SPANID, SPAN)]);
        assert_eq!(parent(&h).0, TRACE);
    }

    #[test]
    fn inject_writes_each_format_and_replaces_old_headers() {
        let context = SpanContext::new(
            TraceId::from_hex(TRACE).expect("trace"),
            SpanId::from_hex(SPAN).expect("span"),
            TraceFlags::SAMPLED,
            false,
            "congo=t61rcWkgMzE".parse().expect("state"),
        );
        let parent_id = SpanId::from_hex("05e3ac9a4f6e3b90").expect("parent");
        let mut h = headers(&[(B3, "stale"), (X_B3_FLAGS, "1"), ("x-request-id", "r-1")]);
        inject(
            &mut h,
            &context,
            Some(parent_id),
            &[
                Propagator::TraceContext,
                Propagator::B3Multi,
                Propagator::B3Single,
            ],
        );
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        assert_eq!(
            get(TRACEPARENT).as_deref(),
            Some(format!("00-{TRACE}-{SPAN}-01").as_str())
        );
        assert_eq!(get(TRACESTATE).as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(get(X_B3_TRACEID).as_deref(), Some(TRACE));
        assert_eq!(get(X_B3_SPANID).as_deref(), Some(SPAN));
        assert_eq!(get(X_B3_PARENTSPANID).as_deref(), Some("05e3ac9a4f6e3b90"));
        assert_eq!(get(X_B3_SAMPLED).as_deref(), Some("1"));
        assert_eq!(get(X_B3_FLAGS), None);
        assert_eq!(
            get(B3).as_deref(),
            Some(format!("{TRACE}-{SPAN}-1-05e3ac9a4f6e3b90").as_str())
        );
        assert_eq!(get("x-request-id").as_deref(), Some("r-1"));
        // What is written reads back as the same context.
        assert_eq!(parent(&h), (TRACE.into(), SPAN.into(), Some(true)));

        // W3C only, unsampled: no B3 left.
        inject(
            &mut h,
            &SpanContext::new(
                context.trace_id(),
                context.span_id(),
                TraceFlags::default(),
                false,
                TraceState::default(),
            ),
            None,
            &[Propagator::TraceContext],
        );
        assert!(!h.contains_key(B3) && !h.contains_key(X_B3_TRACEID));
        assert_eq!(
            get2(&h, TRACEPARENT).as_deref(),
            Some(format!("00-{TRACE}-{SPAN}-00").as_str())
        );
    }

    fn get2(h: &HeaderMap, n: &str) -> Option<String> {
        h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string)
    }

    #[test]
    fn has_context_sees_any_format() {
        assert!(!has_context(&headers(&[(TRACESTATE, "a=b")])));
        assert!(has_context(&headers(&[(X_B3_SAMPLED, "0")])));
        assert!(has_context(&headers(&[(TRACEPARENT, "junk")])));
    }
}
