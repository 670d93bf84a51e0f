//! Azure VM sizes → vCPUs and memory for the local build VM.
//!
//! AIB's default build VM is `Standard_D1_v2` for Gen1 sources and `Standard_D2ds_v4` for Gen2;
//! templates name any size. kiln knows the common general-purpose sizes; `--vm-size-map FILE`
//! (a JSON object `{"Standard_X": {"vcpus": 2, "memoryMiB": 4096}}`) adds or overrides sizes.

use std::collections::BTreeMap;

/// A VM shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmShape {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u32,
}

/// The built-in table: (name, vCPUs, memory MiB), from Azure's published size tables.
pub const SIZES: &[(&str, u32, u32)] = &[
    ("Standard_A1_v2", 1, 2048),
    ("Standard_A2_v2", 2, 4096),
    ("Standard_B1s", 1, 1024),
    ("Standard_B1ms", 1, 2048),
    ("Standard_B2s", 2, 4096),
    ("Standard_B2ms", 2, 8192),
    ("Standard_B4ms", 4, 16384),
    ("Standard_D1_v2", 1, 3584),
    ("Standard_D2_v2", 2, 7168),
    ("Standard_D3_v2", 4, 14336),
    ("Standard_DS1_v2", 1, 3584),
    ("Standard_DS2_v2", 2, 7168),
    ("Standard_DS3_v2", 4, 14336),
    ("Standard_D2_v3", 2, 8192),
    ("Standard_D4_v3", 4, 16384),
    ("Standard_D2s_v3", 2, 8192),
    ("Standard_D4s_v3", 4, 16384),
    ("Standard_D8s_v3", 8, 32768),
    ("Standard_D2ds_v4", 2, 8192),
    ("Standard_D4ds_v4", 4, 16384),
    ("Standard_D2s_v4", 2, 8192),
    ("Standard_D2as_v4", 2, 8192),
    ("Standard_D2ds_v5", 2, 8192),
    ("Standard_D4ds_v5", 4, 16384),
    ("Standard_D2s_v5", 2, 8192),
    ("Standard_D4s_v5", 4, 16384),
    ("Standard_D2as_v5", 2, 8192),
    ("Standard_D2ads_v5", 2, 8192),
    ("Standard_E2s_v3", 2, 16384),
    ("Standard_F2s_v2", 2, 4096),
    ("Standard_F4s_v2", 4, 8192),
    ("Standard_NV6", 6, 57344),
];

/// Resolves `name` (ignoring ASCII case, as Azure does) against `extra` then the built-in table.
pub fn lookup(name: &str, extra: &BTreeMap<String, VmShape>) -> Result<VmShape, String> {
    if let Some((_, s)) = extra.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)) {
        return Ok(*s);
    }
    if let Some((_, c, m)) = SIZES.iter().find(|(n, _, _)| n.eq_ignore_ascii_case(name)) {
        return Ok(VmShape {
            vcpus: *c,
            memory_mib: *m,
        });
    }
    let known: Vec<&str> = SIZES.iter().map(|(n, _, _)| *n).collect();
    Err(format!(
        "unknown vmSize `{name}`; kiln knows {}. Add it with --vm-size-map FILE ({{\"{name}\": {{\"vcpus\": 2, \"memoryMiB\": 4096}}}})",
        known.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_case() {
        let none = BTreeMap::new();
        assert_eq!(
            lookup("Standard_D1_v2", &none),
            Ok(VmShape {
                vcpus: 1,
                memory_mib: 3584
            })
        );
        assert_eq!(
            lookup("standard_d2ds_v4", &none),
            Ok(VmShape {
                vcpus: 2,
                memory_mib: 8192
            })
        );
        let e = lookup("Standard_Q1", &none).unwrap_err();
        assert!(e.contains("Standard_D2s_v3") && e.contains("--vm-size-map"));
        let mut extra = BTreeMap::new();
        extra.insert(
            "Standard_Q1".to_string(),
            VmShape {
                vcpus: 3,
                memory_mib: 1000,
            },
        );
        assert_eq!(
            lookup("Standard_Q1", &extra),
            Ok(VmShape {
                vcpus: 3,
                memory_mib: 1000
            })
        );
    }
}
