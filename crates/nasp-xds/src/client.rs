//! The ADS client (filled in below).

/// SotW or Delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Protocol {
    /// State of the World.
    #[default]
    Sotw,
    /// Incremental.
    Delta,
}

/// Client settings.
#[derive(Clone, Debug, Default)]
pub struct AdsConfig;

/// The client.
#[derive(Debug)]
pub struct AdsClient;
