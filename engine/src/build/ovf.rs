//! `ovf-env.xml`, Azure's provisioning document (LinuxProvisioningConfigurationSet), as the
//! Azure Linux agent and cloud-init's Azure datasource read it from the provisioning CD.

use crate::fabric::xml_escape;

/// What the document says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfEnv {
    /// `HostName`.
    pub hostname: String,
    /// `UserName`.
    pub user: String,
    /// The user's SSH public key line.
    pub ssh_public_key: String,
    /// `CustomData`, already base64 (cloud-init user-data), if any.
    pub custom_data_base64: Option<String>,
}

/// The SHA-1 style fingerprint field: 40 upper-case hex characters derived from the key (agents
/// only use it to look up certificates when `Value` is empty, which it never is here).
fn fingerprint(key: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes())
        .iter()
        .take(20)
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// Renders the document.
pub fn render(o: &OvfEnv) -> String {
    let user = xml_escape(&o.user);
    let custom = o
        .custom_data_base64
        .as_ref()
        .map(|c| format!("\n      <CustomData>{}</CustomData>", xml_escape(c)))
        .unwrap_or_default();
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1" xmlns:oe="http://schemas.dmtf.org/ovf/environment/1" xmlns:wa="http://schemas.microsoft.com/windowsazure" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <wa:ProvisioningSection>
    <wa:Version>1.0</wa:Version>
    <LinuxProvisioningConfigurationSet xmlns="http://schemas.microsoft.com/windowsazure" xmlns:i="http://www.w3.org/2001/XMLSchema-instance">
      <ConfigurationSetType>LinuxProvisioningConfiguration</ConfigurationSetType>
      <HostName>{host}</HostName>
      <UserName>{user}</UserName>
      <DisableSshPasswordAuthentication>true</DisableSshPasswordAuthentication>
      <SSH>
        <PublicKeys>
          <PublicKey>
            <Fingerprint>{fp}</Fingerprint>
            <Path>/home/{user}/.ssh/authorized_keys</Path>
            <Value>{key}</Value>
          </PublicKey>
        </PublicKeys>
      </SSH>{custom}
    </LinuxProvisioningConfigurationSet>
  </wa:ProvisioningSection>
  <wa:PlatformSettingsSection>
    <wa:Version>1.0</wa:Version>
    <wa:PlatformSettings>
      <wa:KmsServerHostname>kms.core.windows.net</wa:KmsServerHostname>
      <wa:ProvisionGuestAgent>true</wa:ProvisionGuestAgent>
      <wa:GuestAgentPackageName xsi:nil="true" />
      <wa:PreprovisionedVm>false</wa:PreprovisionedVm>
    </wa:PlatformSettings>
  </wa:PlatformSettingsSection>
</Environment>
"#,
        host = xml_escape(&o.hostname),
        fp = fingerprint(&o.ssh_public_key),
        key = xml_escape(o.ssh_public_key.trim()),
    )
}

/// Writes `ovf-env.xml` on an ISO 9660 (Joliet) image at `path`.
pub fn write_media(path: &std::path::Path, o: &OvfEnv) -> Result<(), super::iso::IsoError> {
    super::iso::write(
        path,
        "KILN_OVF",
        &[super::iso::IsoFile {
            name: "ovf-env.xml".into(),
            data: render(o).into_bytes(),
        }],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_azure_shape_with_escaped_values() {
        let o = OvfEnv {
            hostname: "aibvm".into(),
            user: "packer".into(),
            ssh_public_key: "ssh-ed25519 AAAA kiln<&>\n".into(),
            custom_data_base64: None,
        };
        let x = render(&o);
        assert!(x.contains("<HostName>aibvm</HostName>\n      <UserName>packer</UserName>"));
        assert!(x.contains("<Path>/home/packer/.ssh/authorized_keys</Path>\n            <Value>ssh-ed25519 AAAA kiln&lt;&amp;&gt;</Value>"));
        assert!(x.contains("<wa:ProvisionGuestAgent>true</wa:ProvisionGuestAgent>"));
        assert!(!x.contains("CustomData"));
        let fp = x
            .split("<Fingerprint>")
            .nth(1)
            .unwrap()
            .split('<')
            .next()
            .unwrap();
        assert!(
            fp.len() == 40
                && fp
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
        );
        let x = render(&OvfEnv {
            custom_data_base64: Some("I2Nsb3VkLWNvbmZpZw==".into()),
            ..o
        });
        assert!(x.contains("<CustomData>I2Nsb3VkLWNvbmZpZw==</CustomData>"));
    }

    #[test]
    fn media_carry_the_document() {
        let p = std::env::temp_dir().join(format!("kiln-ovf-{}.iso", std::process::id()));
        let o = OvfEnv {
            hostname: "h".into(),
            user: "u".into(),
            ssh_public_key: "k".into(),
            custom_data_base64: None,
        };
        write_media(&p, &o).unwrap();
        let img = std::fs::read(&p).unwrap();
        let doc = render(&o);
        assert!(img.windows(doc.len()).any(|w| w == doc.as_bytes()));
        let _ = std::fs::remove_file(p);
    }
}
