//! The documented AIB rules that a schema cannot express: exactly one of scriptUri/inline,
//! runAsSystem only with runElevated, the build timeout range, name patterns, resource-ID shapes,
//! checksums, restart timeouts, File destinations, SharedImage replication per API version…
//! They run over the normalized template, so names and enum values are canonical here.

use super::check::{find_placeholder, Walked};
use super::version::ApiVersion;
use crate::diag::{Diagnostic, JsonPath};
use crate::json::Span;
use serde_json::Value as J;

/// Runs every rule, appending to `w.diagnostics`.
pub fn check(w: &mut Walked, api: ApiVersion) {
    let t = w.normalized.clone();
    let mut r = Rules {
        w,
        api,
        out: Vec::new(),
    };
    r.root(&t);
    let out = std::mem::take(&mut r.out);
    w.diagnostics.extend(out);
}

struct Rules<'a> {
    w: &'a Walked,
    api: ApiVersion,
    out: Vec<Diagnostic>,
}

/// A valid template or runOutput name.
pub fn is_valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// True for 64 hexadecimal characters (either case).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses a Go-style duration as Packer's `restartTimeout` takes it (`5m`, `1h30m`, `90s`,
/// `1.5h`), into seconds.
pub fn parse_duration(s: &str) -> Option<f64> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * mult;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// Matches an ARM resource ID against a pattern of segments; `*` matches any non-empty segment;
/// fixed segments compare ignoring ASCII case, as ARM does.
pub fn id_matches(id: &str, pattern: &[&str]) -> bool {
    let Some(rest) = id.strip_prefix('/') else {
        return false;
    };
    let segs: Vec<&str> = rest.split('/').collect();
    segs.len() == pattern.len()
        && segs
            .iter()
            .zip(pattern)
            .all(|(s, p)| !s.is_empty() && (*p == "*" || s.eq_ignore_ascii_case(p)))
}

const RG: [&str; 4] = ["subscriptions", "*", "resourceGroups", "*"];

fn rg_id(tail: &[&'static str]) -> Vec<&'static str> {
    RG.iter().chain(tail).copied().collect()
}

/// A managed image ID.
pub fn is_managed_image_id(s: &str) -> bool {
    id_matches(
        s,
        &rg_id(&["providers", "Microsoft.Compute", "images", "*"]),
    )
}

/// A gallery image definition ID (`…/galleries/G/images/D`).
pub fn is_gallery_image_id(s: &str) -> bool {
    id_matches(
        s,
        &rg_id(&[
            "providers",
            "Microsoft.Compute",
            "galleries",
            "*",
            "images",
            "*",
        ]),
    )
}

/// A gallery image version ID (`…/galleries/G/images/D/versions/V`).
pub fn is_gallery_image_version_id(s: &str) -> bool {
    id_matches(
        s,
        &rg_id(&[
            "providers",
            "Microsoft.Compute",
            "galleries",
            "*",
            "images",
            "*",
            "versions",
            "*",
        ]),
    )
}

/// A direct shared gallery or community gallery image version ID (2022-07-01+).
pub fn is_shared_or_community_version_id(s: &str) -> bool {
    id_matches(
        s,
        &[
            "subscriptions",
            "*",
            "providers",
            "Microsoft.Compute",
            "locations",
            "*",
            "sharedGalleries",
            "*",
            "images",
            "*",
            "versions",
            "*",
        ],
    ) || id_matches(
        s,
        &[
            "subscriptions",
            "*",
            "providers",
            "Microsoft.Compute",
            "locations",
            "*",
            "communityGalleries",
            "*",
            "images",
            "*",
            "versions",
            "*",
        ],
    ) || id_matches(
        s,
        &["CommunityGalleries", "*", "Images", "*", "Versions", "*"],
    ) || id_matches(s, &["SharedGalleries", "*", "Images", "*", "Versions", "*"])
}

/// A subnet ID.
pub fn is_subnet_id(s: &str) -> bool {
    id_matches(
        s,
        &rg_id(&[
            "providers",
            "Microsoft.Network",
            "virtualNetworks",
            "*",
            "subnets",
            "*",
        ]),
    )
}

/// A user-assigned identity ID.
pub fn is_identity_id(s: &str) -> bool {
    id_matches(
        s,
        &rg_id(&[
            "providers",
            "Microsoft.ManagedIdentity",
            "userAssignedIdentities",
            "*",
        ]),
    )
}

/// A resource group ID.
pub fn is_resource_group_id(s: &str) -> bool {
    id_matches(s, &RG)
}

/// A version `Major.Minor.Patch` of integers, as galleries and platform images use.
pub fn is_image_version(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 10 && p.bytes().all(|b| b.is_ascii_digit()))
}

fn s<'v>(v: &'v J, k: &str) -> Option<&'v str> {
    v.get(k).and_then(J::as_str)
}

impl Rules<'_> {
    fn span(&self, p: &JsonPath) -> Option<Span> {
        self.w.spans.get(p.as_str()).copied()
    }

    fn skip(&self, p: &JsonPath) -> bool {
        self.w.unresolved_paths.contains(p.as_str())
    }

    fn err(&mut self, code: &'static str, p: &JsonPath, msg: String, fix: impl Into<String>) {
        let span = self.span(p);
        self.out
            .push(Diagnostic::error(code, p.as_str(), span, msg).with_fix(fix));
    }

    /// A string at `obj[key]` that is present, resolved, and free of placeholders (already
    /// reported by the walk): the ones worth checking further.
    fn checkable<'v>(&self, obj: &'v J, base: &JsonPath, key: &str) -> Option<(&'v str, JsonPath)> {
        let p = base.key(key);
        let v = s(obj, key)?;
        if self.skip(&p) || find_placeholder(v).is_some() {
            return None;
        }
        Some((v, p))
    }

    fn root(&mut self, t: &J) {
        let root = JsonPath::root();
        if let Some((name, p)) = self.checkable(t, &root, "name") {
            if !is_valid_name(name) {
                self.err(
                    "BadName",
                    &p,
                    format!("template name `{name}` must match ^[A-Za-z0-9-_.]{{1,64}}$"),
                    "use 1-64 letters, digits, `-`, `_` or `.`",
                );
            }
        }
        if let Some(id) = t.get("identity") {
            self.identity(id, &root.key("identity"));
        }
        match t.get("properties") {
            Some(p) if p.is_object() => self.properties(p, &root.key("properties")),
            Some(_) => {}
            None => {
                let span = self.span(&root).map(|s| Span::new(s.start, s.start + 1));
                self.out.push(
                    Diagnostic::error(
                        "MissingRequiredField",
                        "properties",
                        span,
                        "the image template has no `properties` (source, customize, distribute…)",
                    )
                    .with_fix("add \"properties\": { \"source\": …, \"distribute\": […] }"),
                );
            }
        }
    }

    fn identity(&mut self, id: &J, p: &JsonPath) {
        if self.skip(p) {
            return;
        }
        let ty = s(id, "type");
        let ids: Vec<&String> = id
            .get("userAssignedIdentities")
            .and_then(J::as_object)
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        match ty {
            None if !self.skip(&p.key("type")) => self.err(
                "BadIdentity",
                p,
                "identity has no `type`".into(),
                "write \"identity\": { \"type\": \"UserAssigned\", \"userAssignedIdentities\": { \"<identity ID>\": {} } }",
            ),
            Some("UserAssigned") if ids.len() != 1 && !self.skip(&p.key("userAssignedIdentities")) => self.err(
                "BadIdentity",
                &p.key("userAssignedIdentities"),
                format!("a UserAssigned identity needs exactly one user-assigned identity (AIB supports one), found {}", ids.len()),
                "list exactly one identity resource ID",
            ),
            Some("None") if !ids.is_empty() => self.err(
                "BadIdentity",
                &p.key("userAssignedIdentities"),
                "identity type None cannot list user-assigned identities".into(),
                "remove userAssignedIdentities or set type to UserAssigned",
            ),
            _ => {}
        }
        for i in ids {
            let ip = p.key("userAssignedIdentities").key(i);
            if !self.skip(&ip) && find_placeholder(i).is_none() && !is_identity_id(i) {
                self.err(
                    "BadResourceId",
                    &ip,
                    format!("`{i}` is not a user-assigned identity ID"),
                    "use /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>",
                );
            }
        }
    }

    fn properties(&mut self, props: &J, p: &JsonPath) {
        if let Some(t) = props.get("buildTimeoutInMinutes").and_then(J::as_i64) {
            let tp = p.key("buildTimeoutInMinutes");
            if (1..=5).contains(&t) || !(0..=960).contains(&t) {
                self.err(
                    "BadBuildTimeout",
                    &tp,
                    format!("buildTimeoutInMinutes is {t}: it must be 0 (the default, 240 minutes) or 6 to 960"),
                    if t > 960 { "960 minutes (16 hours) is AIB's maximum" } else { "use 0 for the default of 240 minutes, or at least 6" },
                );
            }
        }
        if let Some(src) = props.get("source") {
            self.source(src, &p.key("source"));
        }
        let empty = Vec::new();
        let customize = props
            .get("customize")
            .and_then(J::as_array)
            .unwrap_or(&empty);
        for (i, c) in customize.iter().enumerate() {
            self.step(c, &p.key("customize").index(i), false);
        }
        if let Some(v) = props.get("validate") {
            if let Some(list) = v.get("inVMValidations").and_then(J::as_array) {
                for (i, c) in list.iter().enumerate() {
                    self.step(c, &p.key("validate").key("inVMValidations").index(i), true);
                }
            }
        }
        if let Some(d) = props.get("distribute").and_then(J::as_array) {
            self.distribute(d, &p.key("distribute"));
        }
        if let Some(vm) = props.get("vmProfile") {
            self.vm_profile(vm, &p.key("vmProfile"));
        }
        if let Some((rg, rp)) = self.checkable(props, p, "stagingResourceGroup") {
            if !rg.is_empty() && !is_resource_group_id(rg) {
                self.err(
                    "BadStagingResourceGroup",
                    &rp,
                    format!("stagingResourceGroup `{rg}` is not a resource group ID"),
                    "use /subscriptions/<sub>/resourceGroups/<name>, or leave it empty for an IT_… staging group",
                );
            }
        }
        if let Some(w) = props.get("optimize").and_then(|o| o.get("workload")) {
            let wp = p.key("optimize").key("workload");
            self.checksum(w, &wp);
            self.uri(w, &wp, "scriptUri");
        }
        if let Some(disks) = props.get("additionalDataDisks").and_then(J::as_array) {
            for (i, d) in disks.iter().enumerate() {
                if d.get("sizeGB").and_then(J::as_i64).is_some_and(|s| s < 0) {
                    self.err(
                        "InvalidValue",
                        &p.key("additionalDataDisks").index(i).key("sizeGB"),
                        "sizeGB must be 0 or more".into(),
                        "give the data disk size in GB",
                    );
                }
            }
        }
    }

    fn source(&mut self, src: &J, p: &JsonPath) {
        if self.skip(p) {
            return;
        }
        match s(src, "type") {
            Some("PlatformImage") => {
                for k in ["publisher", "offer", "sku", "version"] {
                    let kp = p.key(k);
                    if self.skip(&kp) {
                        continue;
                    }
                    match s(src, k) {
                        Some(v) if !v.trim().is_empty() => {}
                        _ => {
                            let span = self
                                .span(&kp)
                                .or_else(|| self.span(p).map(|s| Span::new(s.start, s.start + 1)));
                            self.out.push(
                                Diagnostic::error(
                                    "BadPIRSource",
                                    kp.as_str(),
                                    span,
                                    format!("a PlatformImage source needs `{k}`"),
                                )
                                .with_fix(
                                    "give publisher, offer, sku and version (\"latest\" or x.y.z)",
                                ),
                            );
                        }
                    }
                }
                if let Some((v, vp)) = self.checkable(src, p, "version") {
                    if !v.eq_ignore_ascii_case("latest")
                        && !v.trim().is_empty()
                        && !is_image_version(v)
                    {
                        self.err("BadPIRSource", &vp, format!("platform image version `{v}` is neither `latest` nor Major.Minor.Patch"), "use \"latest\" or an exact version such as 1.0.20261128");
                    }
                }
            }
            Some("ManagedImage") => {
                if let Some((id, ip)) = self.checkable(src, p, "imageId") {
                    if !is_managed_image_id(id) {
                        self.err(
                            "BadManagedImageSource",
                            &ip,
                            format!("`{id}` is not a managed image ID"),
                            "use /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/images/<name>",
                        );
                    }
                }
            }
            Some("SharedImageVersion") => {
                if let Some((id, ip)) = self.checkable(src, p, "imageVersionId") {
                    let latest = id
                        .rsplit('/')
                        .next()
                        .is_some_and(|v| v.eq_ignore_ascii_case("latest"));
                    let shape = is_gallery_image_version_id(id)
                        || (self.api >= ApiVersion::V2022_07_01
                            && is_shared_or_community_version_id(id));
                    if !shape {
                        self.err(
                            "BadSharedImageVersionSource",
                            &ip,
                            format!("`{id}` is not a gallery image version ID"),
                            "use /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/galleries/<gallery>/images/<definition>/versions/<x.y.z>",
                        );
                    } else if latest && self.api < ApiVersion::V2022_07_01 {
                        self.err(
                            "BadSharedImageVersionSource",
                            &ip,
                            format!("`versions/latest` needs API version 2022-07-01 or later; this template uses {}", self.api),
                            "set apiVersion to 2022-07-01 or later, or name an exact version",
                        );
                    } else if !latest && !id.rsplit('/').next().is_some_and(is_image_version) {
                        self.err(
                            "BadSharedImageVersionSource",
                            &ip,
                            format!("the version in `{id}` is not Major.Minor.Patch"),
                            "name an exact version such as 1.0.0, or `latest`",
                        );
                    }
                }
            }
            _ => {}
        }
    }

    fn checksum(&mut self, step: &J, p: &JsonPath) {
        if let Some((c, cp)) = self.checkable(step, p, "sha256Checksum") {
            if !c.is_empty() && !is_sha256_hex(c) {
                self.err(
                    "BadSha256Checksum",
                    &cp,
                    format!("sha256Checksum `{c}` is not a SHA-256 digest ({} characters; 64 hexadecimal digits expected)", c.chars().count()),
                    "compute it with `sha256sum FILE` (Linux) or `Get-FileHash FILE` (PowerShell)",
                );
            }
        }
    }

    fn uri(&mut self, step: &J, p: &JsonPath, key: &str) {
        if let Some((u, up)) = self.checkable(step, p, key) {
            if let Some((scheme, _)) = u.split_once("://") {
                let ok = ["http", "https", "file"]
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(scheme));
                if !ok {
                    self.err(
                        "UnsupportedUriScheme",
                        &up,
                        format!("`{key}` uses the scheme `{scheme}`: kiln fetches https, http and file URIs and paths relative to the template"),
                        "serve the file over http(s), or give a local path",
                    );
                }
            } else if u.trim().is_empty() {
                self.err(
                    "InvalidValue",
                    &up,
                    format!("`{key}` is empty"),
                    "give the script's URL",
                );
            }
        }
    }

    fn step(&mut self, c: &J, p: &JsonPath, validator: bool) {
        if self.skip(p) {
            return;
        }
        let no_script = if validator {
            "NoValidatorScript"
        } else {
            "NoCustomizerScript"
        };
        let ty = s(c, "type").unwrap_or("");
        match ty {
            "Shell" | "PowerShell" => {
                let has_uri = c.get("scriptUri").is_some();
                let has_inline = c
                    .get("inline")
                    .and_then(J::as_array)
                    .is_some_and(|a| !a.is_empty());
                if has_uri == has_inline {
                    let what = if validator { "validator" } else { "customizer" };
                    let msg = if has_uri {
                        format!("a {ty} {what} has both `scriptUri` and `inline`: exactly one is allowed")
                    } else {
                        format!("a {ty} {what} has neither `scriptUri` nor `inline` (or an empty inline): exactly one is required")
                    };
                    let span = self.span(p).map(|s| Span::new(s.start, s.start + 1));
                    self.out.push(
                        Diagnostic::error(no_script, p.as_str(), span, msg).with_fix(
                            "keep either scriptUri (a URL) or inline (an array of commands)",
                        ),
                    );
                }
                self.checksum(c, p);
                self.uri(c, p, "scriptUri");
                if ty == "PowerShell" {
                    let elevated = c.get("runElevated").and_then(J::as_bool).unwrap_or(false);
                    if c.get("runAsSystem").and_then(J::as_bool) == Some(true)
                        && !elevated
                        && !self.skip(&p.key("runElevated"))
                    {
                        self.err(
                            "RunAsSystemWithoutElevated",
                            &p.key("runAsSystem"),
                            "runAsSystem is only valid with runElevated: true".into(),
                            "add \"runElevated\": true",
                        );
                    }
                }
            }
            "File" => {
                for k in ["sourceUri", "destination"] {
                    if c.get(k)
                        .and_then(J::as_str)
                        .is_none_or(|v| v.trim().is_empty())
                        && !self.skip(&p.key(k))
                    {
                        let span = self
                            .span(&p.key(k))
                            .or_else(|| self.span(p).map(|s| Span::new(s.start, s.start + 1)));
                        self.out.push(
                            Diagnostic::error(no_script, p.key(k).as_str(), span, format!("a File step needs `{k}`"))
                                .with_fix("give sourceUri (where to fetch the file) and destination (an absolute path in the VM)"),
                        );
                    }
                }
                self.checksum(c, p);
                self.uri(c, p, "sourceUri");
                if let Some((d, dp)) = self.checkable(c, p, "destination") {
                    let windows = d.len() >= 3
                        && d.as_bytes()[1] == b':'
                        && matches!(d.as_bytes()[2], b'\\' | b'/')
                        || d.starts_with("\\\\");
                    if d.starts_with('/') {
                        if !(d.starts_with("/tmp/") && d.len() > 5) {
                            self.err(
                                "BadFileDestination",
                                &dp,
                                format!("File destination `{d}` is outside /tmp: on Linux, AIB's File customizer can only write to /tmp"),
                                "upload to /tmp/… and move the file with a Shell step (`sudo mv /tmp/x /dest`)",
                            );
                        }
                    } else if !windows && !d.trim().is_empty() {
                        self.err(
                            "BadFileDestination",
                            &dp,
                            format!("File destination `{d}` is not an absolute path"),
                            "give an absolute path: /tmp/… on Linux, C:\\… on Windows",
                        );
                    }
                }
            }
            "WindowsRestart" => {
                if let Some((t, tp)) = self.checkable(c, p, "restartTimeout") {
                    if !t.is_empty() && parse_duration(t).is_none() {
                        self.err(
                            "BadRestartTimeout",
                            &tp,
                            format!("restartTimeout `{t}` is not a duration"),
                            "write a magnitude and a unit: 5m, 90s, 2h, 1h30m",
                        );
                    }
                }
            }
            "WindowsUpdate"
                if c.get("updateLimit")
                    .and_then(J::as_i64)
                    .is_some_and(|l| l < 0) =>
            {
                self.err(
                    "InvalidValue",
                    &p.key("updateLimit"),
                    "updateLimit must be 0 (meaning 1000) or more".into(),
                    "use 0 for the default",
                );
            }
            _ => {}
        }
    }

    fn distribute(&mut self, list: &[J], p: &JsonPath) {
        if list.is_empty() && !self.skip(p) {
            self.err(
                "BadDistributeType",
                p,
                "distribute is empty: a template needs at least one distributor".into(),
                "add a VHD, ManagedImage or SharedImage distributor",
            );
        }
        let mut seen: Vec<(String, usize)> = Vec::new();
        for (i, d) in list.iter().enumerate() {
            let dp = p.index(i);
            if self.skip(&dp) {
                continue;
            }
            if let Some((name, np)) = self.checkable(d, &dp, "runOutputName") {
                if !is_valid_name(name) {
                    self.err(
                        "BadName",
                        &np,
                        format!("runOutputName `{name}` must match ^[A-Za-z0-9-_.]{{1,64}}$"),
                        "use 1-64 letters, digits, `-`, `_` or `.`",
                    );
                }
                if let Some((_, first)) = seen.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
                    let first = *first;
                    self.err(
                        "DuplicateRunOutputName",
                        &np,
                        format!("runOutputName `{name}` is already used by distribute[{first}]: each distributor needs its own"),
                        "give each distributor a unique runOutputName",
                    );
                } else {
                    seen.push((name.to_string(), i));
                }
            }
            match s(d, "type") {
                Some("ManagedImage") => {
                    if let Some((id, ip)) = self.checkable(d, &dp, "imageId") {
                        if !is_managed_image_id(id) {
                            self.err("BadResourceId", &ip, format!("`{id}` is not a managed image ID"), "use /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/images/<name>");
                        }
                    }
                }
                Some("SharedImage") => self.shared_image(d, &dp),
                Some("VHD") => {
                    if let Some((u, up)) = self.checkable(d, &dp, "uri") {
                        if let Some((scheme, _)) = u.split_once("://") {
                            if !["https", "http", "file"]
                                .iter()
                                .any(|x| x.eq_ignore_ascii_case(scheme))
                            {
                                self.err(
                                    "UnsupportedUriScheme",
                                    &up,
                                    format!("VHD uri scheme `{scheme}` is not supported"),
                                    "give a blob https URI, a file:// URI or a local path",
                                );
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn shared_image(&mut self, d: &J, dp: &JsonPath) {
        let gp = dp.key("galleryImageId");
        match s(d, "galleryImageId") {
            None if !self.skip(&gp) => {
                let span = self.span(dp).map(|s| Span::new(s.start, s.start + 1));
                self.out.push(
                    Diagnostic::error(
                        "BadSharedImageDistribute",
                        gp.as_str(),
                        span,
                        "a SharedImage distributor needs `galleryImageId`",
                    )
                    .with_fix(
                        "give the image definition ID …/galleries/<gallery>/images/<definition>",
                    ),
                );
            }
            _ => {}
        }
        if let Some((id, ip)) = self.checkable(d, dp, "galleryImageId") {
            let explicit = is_gallery_image_version_id(id);
            if !is_gallery_image_id(id) && !explicit {
                self.err(
                    "BadSharedImageDistribute",
                    &ip,
                    format!("`{id}` is not a gallery image definition ID"),
                    "use /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/galleries/<gallery>/images/<definition>[/versions/<x.y.z>]",
                );
            } else if explicit && !id.rsplit('/').next().is_some_and(is_image_version) {
                self.err(
                    "BadSharedImageDistribute",
                    &ip,
                    format!("the explicit version in `{id}` is not Major.Minor.Patch"),
                    "use a version such as 1.0.0, or drop /versions/… for automatic versions",
                );
            }
        }
        let has_repl = d.get("replicationRegions").is_some();
        let has_target = d.get("targetRegions").is_some();
        if self.api <= ApiVersion::V2022_02_14 && !has_repl && !self.skip(dp) {
            let span = self.span(dp).map(|s| Span::new(s.start, s.start + 1));
            self.out.push(
                Diagnostic::error(
                    "BadSharedImageDistribute",
                    dp.key("replicationRegions").as_str(),
                    span,
                    format!("a SharedImage distributor needs `replicationRegions` in API version {} (optional from 2022-07-01)", self.api),
                )
                .with_fix("add \"replicationRegions\": [\"<the gallery's region>\"]"),
            );
        }
        if has_repl && has_target {
            self.err(
                "BadSharedImageDistribute",
                &dp.key("targetRegions"),
                "replicationRegions and targetRegions cannot both be given (targetRegions replaces the deprecated replicationRegions)".into(),
                "keep only targetRegions",
            );
        }
        if has_target && d.get("storageAccountType").is_some() {
            self.err(
                "BadSharedImageDistribute",
                &dp.key("storageAccountType"),
                "a distributor-level storageAccountType is only allowed with replicationRegions; with targetRegions set it per region".into(),
                "move storageAccountType into each targetRegions entry",
            );
        }
        if self.api < ApiVersion::V2022_07_01 {
            let mut premium = vec![];
            if s(d, "storageAccountType") == Some("Premium_LRS") {
                premium.push(dp.key("storageAccountType"));
            }
            for (i, r) in d
                .get("targetRegions")
                .and_then(J::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .enumerate()
            {
                if s(r, "storageAccountType") == Some("Premium_LRS") {
                    premium.push(dp.key("targetRegions").index(i).key("storageAccountType"));
                }
            }
            for pp in premium {
                self.err(
                    "FeatureNotInApiVersion",
                    &pp,
                    format!(
                        "Premium_LRS needs API version 2022-07-01 or later; this template uses {}",
                        self.api
                    ),
                    "use Standard_LRS or Standard_ZRS, or set apiVersion to 2022-07-01 or later",
                );
            }
        }
        for (i, r) in d
            .get("targetRegions")
            .and_then(J::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .enumerate()
        {
            if r.get("replicaCount")
                .and_then(J::as_i64)
                .is_some_and(|c| c < 1)
            {
                self.err(
                    "InvalidValue",
                    &dp.key("targetRegions").index(i).key("replicaCount"),
                    "replicaCount must be 1 or more".into(),
                    "use 1 or more",
                );
            }
        }
        if let Some(m) = d
            .get("versioning")
            .and_then(|v| v.get("major"))
            .and_then(J::as_i64)
        {
            if m < -1 {
                self.err(
                    "InvalidValue",
                    &dp.key("versioning").key("major"),
                    format!("versioning.major is {m}: it must be -1 (unset) or more"),
                    "use -1 or a major version",
                );
            }
        }
    }

    fn vm_profile(&mut self, vm: &J, p: &JsonPath) {
        if vm
            .get("osDiskSizeGB")
            .and_then(J::as_i64)
            .is_some_and(|s| s < 0)
        {
            self.err(
                "InvalidValue",
                &p.key("osDiskSizeGB"),
                "osDiskSizeGB must be 0 (the source's size) or more".into(),
                "use 0 or a size in GB",
            );
        }
        if let Some(ids) = vm.get("userAssignedIdentities").and_then(J::as_array) {
            for (i, id) in ids.iter().enumerate() {
                let ip = p.key("userAssignedIdentities").index(i);
                if let Some(id) = id.as_str() {
                    if !self.skip(&ip) && find_placeholder(id).is_none() && !is_identity_id(id) {
                        self.err("BadResourceId", &ip, format!("`{id}` is not a user-assigned identity ID"), "use …/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>");
                    }
                }
            }
        }
        if let Some(vn) = vm.get("vnetConfig") {
            let vp = p.key("vnetConfig");
            for k in ["subnetId", "containerInstanceSubnetId"] {
                if let Some((id, ip)) = self.checkable(vn, &vp, k) {
                    if !id.is_empty() && !is_subnet_id(id) {
                        self.err("BadResourceId", &ip, format!("`{id}` is not a subnet ID"), "use …/providers/Microsoft.Network/virtualNetworks/<vnet>/subnets/<subnet>");
                    }
                }
            }
            let has = |k: &str| s(vn, k).is_some_and(|v| !v.is_empty());
            if has("containerInstanceSubnetId") && !has("subnetId") {
                self.err(
                    "InvalidValue",
                    &vp.key("containerInstanceSubnetId"),
                    "containerInstanceSubnetId is only valid together with subnetId".into(),
                    "add the build VM's subnetId",
                );
            }
            if has("containerInstanceSubnetId") && has("proxyVmSize") {
                self.err("InvalidValue", &vp.key("proxyVmSize"), "proxyVmSize cannot be used with containerInstanceSubnetId (no proxy VM is created)".into(), "remove proxyVmSize");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m"), Some(300.0));
        assert_eq!(parse_duration("1h30m"), Some(5400.0));
        assert_eq!(parse_duration("1.5h"), Some(5400.0));
        for bad in ["", "5", "m", "5 minutes", "5M", "-5m", "10d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn ids() {
        assert!(is_managed_image_id(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/images/i"
        ));
        assert!(is_managed_image_id(
            "/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/images/i"
        ));
        assert!(!is_managed_image_id(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/images/"
        ));
        assert!(!is_managed_image_id(
            "subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/images/i"
        ));
        assert!(is_gallery_image_version_id("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/d/versions/1.0.0"));
        assert!(!is_gallery_image_id("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/d/versions/1.0.0"));
        assert!(is_subnet_id("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v/subnets/n"));
        assert!(is_identity_id("/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x"));
        assert!(is_resource_group_id("/subscriptions/s/resourceGroups/rg"));
        assert!(
            is_image_version("1.0.10") && !is_image_version("1.0") && !is_image_version("1.a.0")
        );
    }

    #[test]
    fn names_and_checksums() {
        assert!(is_valid_name("a-b_c.d9"));
        assert!(!is_valid_name("a b") && !is_valid_name("") && !is_valid_name(&"a".repeat(65)));
        assert!(is_sha256_hex(&"aB".repeat(32)));
        assert!(!is_sha256_hex(&"g".repeat(64)) && !is_sha256_hex("abc"));
    }
}
