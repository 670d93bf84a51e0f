//! AIB API versions.

use std::fmt;

/// A generally-available AIB API version. Ordered oldest first, so `v >= ApiVersion::V2022_07_01`
/// reads "from 2022-07-01 on".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ApiVersion {
    /// 2020-02-14: the first GA version.
    V2020_02_14,
    /// 2021-10-01: build-VM identities, proxyVmSize.
    V2021_10_01,
    /// 2022-02-14: validate, stagingResourceGroup. kiln's default for REST bodies.
    V2022_02_14,
    /// 2022-07-01: File validator, targetRegions, versioning, VHD uri, `versions/latest`.
    V2022_07_01,
    /// 2023-07-01: errorHandling.
    V2023_07_01,
    /// 2024-02-01: autoRun, managedResourceTags, containerInstanceSubnetId, optimize.vmBoot;
    /// case-sensitive names and values, unknown fields rejected.
    V2024_02_01,
    /// 2025-10-01: optimize.workload, additionalDataDisks, Premium_LRS, replicationMode.
    V2025_10_01,
}

/// Preview API versions that AIB still lists as deprecated-but-supported. kiln reports them and
/// validates the template as the first GA version.
pub const PREVIEW_VERSIONS: &[&str] = &[
    "2018-02-01-preview",
    "2019-02-01-preview",
    "2019-05-01-preview",
];

impl ApiVersion {
    /// Every GA version, oldest first.
    pub const ALL: [ApiVersion; 7] = [
        ApiVersion::V2020_02_14,
        ApiVersion::V2021_10_01,
        ApiVersion::V2022_02_14,
        ApiVersion::V2022_07_01,
        ApiVersion::V2023_07_01,
        ApiVersion::V2024_02_01,
        ApiVersion::V2025_10_01,
    ];

    /// The default for REST bodies without an apiVersion (`--api-version`).
    pub const DEFAULT: ApiVersion = ApiVersion::V2022_02_14;

    /// The version as Azure writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::V2020_02_14 => "2020-02-14",
            ApiVersion::V2021_10_01 => "2021-10-01",
            ApiVersion::V2022_02_14 => "2022-02-14",
            ApiVersion::V2022_07_01 => "2022-07-01",
            ApiVersion::V2023_07_01 => "2023-07-01",
            ApiVersion::V2024_02_01 => "2024-02-01",
            ApiVersion::V2025_10_01 => "2025-10-01",
        }
    }

    /// Parses an exact GA version string.
    pub fn parse(s: &str) -> Option<ApiVersion> {
        ApiVersion::ALL.into_iter().find(|v| v.as_str() == s.trim())
    }

    /// The newest GA version not later than the date in `s` (for unknown versions), if any.
    pub fn at_or_before(s: &str) -> Option<ApiVersion> {
        let date = s.get(..10)?;
        ApiVersion::ALL
            .into_iter()
            .rev()
            .find(|v| v.as_str() <= date)
    }

    /// From 2024-02-01 field names and enum values are case-sensitive and unknown fields are
    /// errors; before, Azure accepted and ignored them.
    pub fn strict(self) -> bool {
        self >= ApiVersion::V2024_02_01
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_order() {
        for v in ApiVersion::ALL {
            assert_eq!(ApiVersion::parse(v.as_str()), Some(v));
        }
        assert!(ApiVersion::V2022_07_01 > ApiVersion::V2022_02_14);
        assert_eq!(ApiVersion::parse("2019-05-01-preview"), None);
        assert_eq!(
            ApiVersion::at_or_before("2023-01-01"),
            Some(ApiVersion::V2022_07_01)
        );
        assert_eq!(ApiVersion::at_or_before("2019-01-01"), None);
        assert!(ApiVersion::V2024_02_01.strict() && !ApiVersion::V2023_07_01.strict());
    }
}
