//! ARM-shaped resource IDs: `/subscriptions/<sub>/resourceGroups/<rg>/providers/<ns>/<type>/<name>[/<type>/<name>]…`.
//! Azure compares IDs case-insensitively; so does kiln (the store keys are lower-cased), while
//! output keeps the casing the resource was created with.

/// A parsed resource ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceId {
    /// The subscription, as written.
    pub subscription: String,
    /// The resource group, as written.
    pub resource_group: String,
    /// `Microsoft.Compute`, …
    pub namespace: String,
    /// (type, name) pairs, outermost first: `[("galleries","g"),("images","d"),("versions","1.0.0")]`.
    pub segments: Vec<(String, String)>,
}

impl ResourceId {
    /// Parses an ID. Returns `None` when it is not of the resource shape above.
    pub fn parse(id: &str) -> Option<ResourceId> {
        let parts: Vec<&str> = id.trim().trim_matches('/').split('/').collect();
        if parts.len() < 6 || !parts.len().is_multiple_of(2) {
            return None;
        }
        if !parts[0].eq_ignore_ascii_case("subscriptions")
            || !parts[2].eq_ignore_ascii_case("resourceGroups")
            || !parts[4].eq_ignore_ascii_case("providers")
        {
            return None;
        }
        if parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        let namespace = parts[5].to_string();
        let rest = &parts[6..];
        if rest.is_empty() || !rest.len().is_multiple_of(2) {
            return None;
        }
        let segments = rest
            .chunks(2)
            .map(|c| (c[0].to_string(), c[1].to_string()))
            .collect();
        Some(ResourceId {
            subscription: parts[1].to_string(),
            resource_group: parts[3].to_string(),
            namespace,
            segments,
        })
    }

    /// The resource type path, lower-case: `microsoft.compute/galleries/images/versions`.
    pub fn kind(&self) -> String {
        let mut s = self.namespace.to_ascii_lowercase();
        for (t, _) in &self.segments {
            s.push('/');
            s.push_str(&t.to_ascii_lowercase());
        }
        s
    }

    /// The last segment's name.
    pub fn name(&self) -> &str {
        self.segments.last().map(|(_, n)| n.as_str()).unwrap_or("")
    }
}

/// `/subscriptions/<sub>/resourceGroups/<rg>`.
pub fn group_id(sub: &str, rg: &str) -> String {
    format!("/subscriptions/{sub}/resourceGroups/{rg}")
}

/// An image template's ID.
pub fn template_id(sub: &str, rg: &str, name: &str) -> String {
    format!(
        "{}/providers/Microsoft.VirtualMachineImages/imageTemplates/{name}",
        group_id(sub, rg)
    )
}

/// A managed image's ID.
pub fn image_id(sub: &str, rg: &str, name: &str) -> String {
    format!(
        "{}/providers/Microsoft.Compute/images/{name}",
        group_id(sub, rg)
    )
}

/// A gallery's ID.
pub fn gallery_id(sub: &str, rg: &str, gallery: &str) -> String {
    format!(
        "{}/providers/Microsoft.Compute/galleries/{gallery}",
        group_id(sub, rg)
    )
}

/// An image definition's ID.
pub fn definition_id(sub: &str, rg: &str, gallery: &str, def: &str) -> String {
    format!("{}/images/{def}", gallery_id(sub, rg, gallery))
}

/// An image version's ID.
pub fn version_id(sub: &str, rg: &str, gallery: &str, def: &str, version: &str) -> String {
    format!(
        "{}/versions/{version}",
        definition_id(sub, rg, gallery, def)
    )
}

/// The key the store indexes an ID by (case-insensitive, no trailing slash).
pub fn key(id: &str) -> String {
    id.trim().trim_end_matches('/').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gallery_versions() {
        let id = ResourceId::parse("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/d/versions/latest").unwrap();
        assert_eq!(id.kind(), "microsoft.compute/galleries/images/versions");
        assert_eq!(id.name(), "latest");
        assert_eq!(id.resource_group, "rg");
        assert!(ResourceId::parse("/subscriptions/s/resourceGroups/rg").is_none());
        assert!(ResourceId::parse(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/images"
        )
        .is_none());
        assert_eq!(
            ResourceId::parse(&image_id("s", "r", "i")).unwrap().kind(),
            "microsoft.compute/images"
        );
    }
}
