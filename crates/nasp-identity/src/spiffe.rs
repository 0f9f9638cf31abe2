//! SPIFFE ids in Istio's shape: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

use std::fmt;
use std::str::FromStr;

/// Why a string is not an Istio SPIFFE id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE id {input:?}: {reason}")]
pub struct SpiffeIdError {
    input: String,
    reason: &'static str,
}

/// A workload identity: trust domain, namespace and service account.
///
/// Parsing is strict: lower-case `spiffe` scheme, a trust domain of lower-case
/// letters, digits, `.`, `-` and `_`, then exactly `/ns/<ns>/sa/<sa>` with
/// non-empty segments of unreserved characters; no port, user info, query,
/// fragment, percent-encoding, empty or dot segments.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl SpiffeId {
    /// Builds an id from its parts, checking each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        let input = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        let err = |reason| SpiffeIdError {
            input: input.clone(),
            reason,
        };
        if !valid_trust_domain(trust_domain) {
            return Err(err(
                "the trust domain must be lower-case letters, digits, '.', '-' or '_'",
            ));
        }
        if !valid_segment(namespace) {
            return Err(err("bad namespace"));
        }
        if !valid_segment(service_account) {
            return Err(err("bad service account"));
        }
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// The trust domain (`cluster.local`).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| SpiffeIdError {
            input: s.to_string(),
            reason,
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("must start with spiffe://"))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| err("missing the /ns/<ns>/sa/<sa> path"))?;
        if !valid_trust_domain(td) {
            return Err(err(
                "the trust domain must be lower-case letters, digits, '.', '-' or '_'",
            ));
        }
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa).map_err(|e| SpiffeIdError {
                input: s.to_string(),
                reason: e.reason,
            }),
            _ => Err(err(
                "the path must be exactly /ns/<namespace>/sa/<service-account>",
            )),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_istio_ids() {
        let id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/default"
            .parse()
            .expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "demo");
        assert_eq!(id.service_account(), "default");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/default");
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "spiffe://",
            "SPIFFE://cluster.local/ns/a/sa/b",
            "https://cluster.local/ns/a/sa/b",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local:8080/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local/ns/a/sa/b#f",
            "spiffe://cluster.local/ns/%61/sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a b/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn error_names_the_input_and_reason() {
        let e = "spiffe://cluster.local/ns/a"
            .parse::<SpiffeId>()
            .unwrap_err();
        assert!(e.to_string().contains("spiffe://cluster.local/ns/a"), "{e}");
        assert!(
            e.to_string()
                .contains("/ns/<namespace>/sa/<service-account>"),
            "{e}"
        );
    }
}
