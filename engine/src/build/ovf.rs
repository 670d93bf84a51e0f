//! `ovf-env.xml`, Azure's provisioning document, on the provisioning CD: the
//! `LinuxProvisioningConfigurationSet` the Azure Linux agent and cloud-init's Azure datasource
//! read, and the `WindowsProvisioningConfigurationSet` Azure's Windows provisioning reads
//! (with an `Unattend.xml` beside it for Windows Setup; docs/windows.md).

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

/// The provisioning CD's volume label (Linux and Windows media alike).
const MEDIA_LABEL: &str = "KILN_OVF";

/// The whole document around one provisioning configuration set (already indented).
fn environment(config_set: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1" xmlns:oe="http://schemas.dmtf.org/ovf/environment/1" xmlns:wa="http://schemas.microsoft.com/windowsazure" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <wa:ProvisioningSection>
    <wa:Version>1.0</wa:Version>
{config_set}  </wa:ProvisioningSection>
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
"#
    )
}

/// Renders the document.
pub fn render(o: &OvfEnv) -> String {
    let user = xml_escape(&o.user);
    let custom = o
        .custom_data_base64
        .as_ref()
        .map(|c| format!("\n      <CustomData>{}</CustomData>", xml_escape(c)))
        .unwrap_or_default();
    environment(&format!(
        r#"    <LinuxProvisioningConfigurationSet xmlns="http://schemas.microsoft.com/windowsazure" xmlns:i="http://www.w3.org/2001/XMLSchema-instance">
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
"#,
        host = xml_escape(&o.hostname),
        fp = fingerprint(&o.ssh_public_key),
        key = xml_escape(o.ssh_public_key.trim()),
    ))
}

/// What a Windows document says (Azure's `WindowsProvisioningConfigurationSet`).
#[derive(Clone, PartialEq, Eq)]
pub struct WindowsOvfEnv {
    /// `ComputerName`.
    pub computer_name: String,
    /// `AdminUsername`.
    pub admin_user: String,
    /// `AdminPassword` (as on Azure, in clear on the media: the media never outlive the build).
    pub admin_password: String,
}

impl std::fmt::Debug for WindowsOvfEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowsOvfEnv")
            .field("computer_name", &self.computer_name)
            .field("admin_user", &self.admin_user)
            .field("admin_password", &"<redacted>")
            .finish()
    }
}

/// Renders the Windows document: the computer name, the administrator account, automatic
/// updates off (a build controls its own updates), UTC, and an HTTP WinRM listener (kiln
/// speaks NTLM with sealing over it).
pub fn render_windows(o: &WindowsOvfEnv) -> String {
    environment(&format!(
        r#"    <WindowsProvisioningConfigurationSet xmlns="http://schemas.microsoft.com/windowsazure" xmlns:i="http://www.w3.org/2001/XMLSchema-instance">
      <ConfigurationSetType>WindowsProvisioningConfiguration</ConfigurationSetType>
      <ComputerName>{name}</ComputerName>
      <AdminPassword>{password}</AdminPassword>
      <EnableAutomaticUpdates>false</EnableAutomaticUpdates>
      <TimeZone>UTC</TimeZone>
      <WinRM>
        <Listeners>
          <Listener>
            <Protocol>Http</Protocol>
          </Listener>
        </Listeners>
      </WinRM>
      <AdminUsername>{user}</AdminUsername>
    </WindowsProvisioningConfigurationSet>
"#,
        name = xml_escape(&o.computer_name),
        password = xml_escape(&o.admin_password),
        user = xml_escape(&o.admin_user),
    ))
}

/// Writes a Windows build's Azure provisioning CD at `path`: `ovf-env.xml` and, for Windows
/// Setup (which searches the root of read-only removable media), `Unattend.xml`.
pub fn write_windows_media(
    path: &std::path::Path,
    o: &WindowsOvfEnv,
    unattend: &str,
) -> Result<(), super::iso::IsoError> {
    super::iso::write(
        path,
        MEDIA_LABEL,
        &[
            super::iso::IsoFile {
                name: "ovf-env.xml".into(),
                data: render_windows(o).into_bytes(),
            },
            super::iso::IsoFile {
                name: "Unattend.xml".into(),
                data: unattend.as_bytes().to_vec(),
            },
        ],
    )
}

/// Writes `ovf-env.xml` on an ISO 9660 (Joliet) image at `path`.
pub fn write_media(path: &std::path::Path, o: &OvfEnv) -> Result<(), super::iso::IsoError> {
    super::iso::write(
        path,
        MEDIA_LABEL,
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
    fn windows_document_carries_the_account_escaped() {
        let o = WindowsOvfEnv {
            computer_name: "kiln-abc".into(),
            admin_user: "packer".into(),
            admin_password: "p<&>'\"w".into(),
        };
        let x = render_windows(&o);
        assert!(x.contains("<ConfigurationSetType>WindowsProvisioningConfiguration</ConfigurationSetType>\n      <ComputerName>kiln-abc</ComputerName>\n      <AdminPassword>p&lt;&amp;&gt;&apos;&quot;w</AdminPassword>"), "{x}");
        assert!(x.contains("<AdminUsername>packer</AdminUsername>"));
        assert!(x.contains("<Protocol>Http</Protocol>"));
        assert!(!x.contains("LinuxProvisioningConfigurationSet"));
        assert!(
            !format!("{o:?}").contains("p<&>"),
            "the password never prints"
        );
        // well formed: every element closes in order
        let mut stack: Vec<String> = Vec::new();
        for tag in x.split('<').skip(2).map(|t| t.split('>').next().unwrap()) {
            if let Some(end) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(end), "{x}");
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap().to_string());
            }
        }
        assert!(stack.is_empty(), "{stack:?}");
    }

    #[test]
    fn windows_media_hold_both_documents() {
        let p = std::env::temp_dir().join(format!("kiln-ovf-win-{}.iso", std::process::id()));
        let o = WindowsOvfEnv {
            computer_name: "c".into(),
            admin_user: "u".into(),
            admin_password: "pw".into(),
        };
        write_windows_media(&p, &o, "<unattend/>").unwrap();
        let img = std::fs::read(&p).unwrap();
        let doc = render_windows(&o);
        assert!(img.windows(doc.len()).any(|w| w == doc.as_bytes()));
        assert!(img.windows(11).any(|w| w == b"<unattend/>"));
        let _ = std::fs::remove_file(p);
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
