//! The steps of a Windows build (chosen by [`target_os`]): provisioning media with an
//! `unattend.xml`, the VM with WinRM forwarded, a WinRM connection, PowerShell / File /
//! WindowsRestart / WindowsUpdate customizers, PowerShell validators, Sysprep, shutdown; then the
//! shared export and distribution.
//!
//! The guest-side parts are real files under `scripts/windows/` (compiled in): the answer file
//! template, the elevated runner, the Windows Update round and the sysprep wrapper. They cannot
//! run on this host (no Windows image); docs/windows.md says what is verified where.

use super::context::{BuildCx, Provisioning};
use super::events::{OutStream, SubState};
use super::runner::{FailurePolicy, Outcome, Step};
use super::steps::{LineSplitter, BUILD_USER};
use super::steps_vm::{describe_policy, describe_vm, interrupt_for, recover_after_reboot};
use super::BuildError;
use crate::fabric::files;
use crate::template::model::{Customizer, FileCopy, PowerShellScript, Source, Validator};
use crate::vm;
use async_trait::async_trait;
use kiln_agents::winrm::powershell;
use kiln_agents::winrm::Security;
use kiln_agents::{CommError, ExecOptions, Stream, WinRmCommunicator, WinRmConfig};
use kiln_images::catalog::{Catalog, OsType};
use std::time::{Duration, Instant};

/// The answer file template (placeholders `@@NAME@@`).
pub const UNATTEND_TEMPLATE: &str = include_str!("../../../scripts/windows/unattend.xml");
/// The elevated runner (scheduled task, output streamed, exit code returned).
pub const ELEVATED_RUNNER: &str = include_str!("../../../scripts/windows/kiln-elevated.ps1");
/// One Windows Update round.
pub const WINDOWS_UPDATE: &str = include_str!("../../../scripts/windows/kiln-windows-update.ps1");
/// The sysprep wrapper.
pub const SYSPREP: &str = include_str!("../../../scripts/windows/kiln-sysprep.ps1");

/// Where the guest-side scripts go.
pub const GUEST_TEMP: &str = r"C:\Windows\Temp";
/// The line the first-logon commands print on COM1 once WinRM is configured.
pub const READY_LINE: &str = "KILN-WINRM-READY";
/// WinRM over HTTP in the guest (NTLM with sealed bodies).
pub const WINRM_PORT: u16 = 5985;
/// AIB's (and Packer's) default restart command.
pub const DEFAULT_RESTART_COMMAND: &str = r#"shutdown /r /f /t 0 /c "packer restart""#;
/// Packer's default restart check.
pub const DEFAULT_RESTART_CHECK: &str = r#"powershell -NoProfile -Command "echo ('{0} restarted.' -f [System.Net.Dns]::GetHostName())""#;
/// Exit codes of the restart command that mean "a restart is already under way".
pub const RESTART_IN_PROGRESS: [i64; 2] = [1115, 1190];
/// Windows Update rounds before kiln gives up (each round may reboot).
pub const MAX_UPDATE_ROUNDS: u32 = 10;
/// AIB's Windows deprovisioning override.
pub const DEPROVISION_OVERRIDE: &str = r"c:\DeprovisioningScript.ps1";

/// The guest OS a build targets, and why kiln thinks so.
#[derive(Debug, Clone)]
pub struct TargetOs {
    /// A Windows build.
    pub windows: bool,
    /// Why.
    pub reason: String,
}

/// Decides the OS before anything runs: the catalog entry's osType for a PlatformImage found
/// there; else the publisher (Microsoft's Windows publishers); the store's osType for a
/// ManagedImage or SharedImageVersion source; else the customizers (PowerShell,
/// WindowsRestart, WindowsUpdate or PowerShell validations only make sense on Windows).
pub fn target_os(cx: &BuildCx) -> TargetOs {
    let t = |windows, reason: String| TargetOs { windows, reason };
    if let Source::PlatformImage {
        publisher,
        offer,
        sku,
        version,
        ..
    } = &cx.template.properties.source
    {
        if let Ok(r) =
            Catalog::in_kiln_home(&cx.options.kiln_home).resolve(publisher, offer, sku, version)
        {
            let w = r.entry.meta.os_type == OsType::Windows;
            return t(
                w,
                format!(
                    "the catalog entry {publisher}:{offer}:{sku}:{} has osType {:?}",
                    r.exact_version, r.entry.meta.os_type
                ),
            );
        }
        let p = publisher.to_ascii_lowercase();
        if p.starts_with("microsoftwindows") || offer.to_ascii_lowercase().contains("windows") {
            return t(
                true,
                format!("publisher {publisher}, offer {offer} (not in the local catalog)"),
            );
        }
    }
    if let Some((what, os)) = stored_os_type(cx) {
        return t(
            os.eq_ignore_ascii_case("Windows"),
            format!("{what} in kiln's store has osType {os}"),
        );
    }
    let p = &cx.template.properties;
    if let Some(c) = p.customize.iter().find(|c| {
        matches!(
            c,
            Customizer::PowerShell(_)
                | Customizer::WindowsRestart { .. }
                | Customizer::WindowsUpdate { .. }
        )
    }) {
        return t(true, format!("the template has a {} customizer", c.kind()));
    }
    if p.validate.as_ref().is_some_and(|v| {
        v.in_vm_validations
            .iter()
            .any(|v| matches!(v, Validator::PowerShell(_)))
    }) {
        return t(true, "the template has a PowerShell validation".into());
    }
    t(false, "no Windows source or Windows-only customizer".into())
}

/// The osType kiln's state store records for a ManagedImage or SharedImageVersion source (only
/// when a store exists: planning never creates one).
fn stored_os_type(cx: &BuildCx) -> Option<(String, String)> {
    if !cx.options.kiln_home.join("kiln.db").exists() {
        return None;
    }
    let store = crate::store::Store::open(&cx.options.kiln_home).ok()?;
    match &cx.template.properties.source {
        Source::ManagedImage { image_id } => {
            let img = store.image(image_id).ok()??;
            Some((format!("the managed image {image_id}"), img.os_type))
        }
        Source::SharedImageVersion { image_version_id } => {
            // …/galleries/G/images/D/versions/V → the definition …/galleries/G/images/D.
            let def_id = image_version_id
                .trim()
                .trim_end_matches('/')
                .rsplit_once('/')
                .and_then(|(a, _)| a.rsplit_once('/'))
                .map(|(a, _)| a.to_string())?;
            let def = store.definition(&def_id).ok()??;
            Some((format!("the image definition {def_id}"), def.os_type))
        }
        Source::PlatformImage { .. } => None,
    }
}

/// What the Windows steps share: the per-build credential and the WinRM forward.
pub struct WindowsState {
    /// The build user's (and Administrator's) password: random per build, never logged.
    pub password: Secret,
    /// The computer name.
    pub computer_name: String,
    /// The host port forwarded to the guest's WinRM.
    pub winrm_port: u16,
}

/// A string that never prints.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// The value (to put on the provisioning media and into the WinRM client only).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A random password meeting Windows' complexity rules (upper, lower, digit, symbol; 24 chars),
/// from the OS's CSPRNG.
pub fn random_password() -> Result<Secret, std::io::Error> {
    use std::io::Read;
    const SETS: [&[u8]; 4] = [
        b"ABCDEFGHJKLMNPQRSTUVWXYZ",
        b"abcdefghijkmnopqrstuvwxyz",
        b"23456789",
        b"-_.!+=",
    ];
    let mut bytes = [0u8; 48];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let all: Vec<u8> = SETS.concat();
    let mut pw: Vec<u8> = (0..24)
        .map(|i| all[usize::from(bytes[i]) % all.len()])
        .collect();
    // One of each class at positions chosen by the random bytes too.
    for (k, set) in SETS.iter().enumerate() {
        let pos = (usize::from(bytes[24 + 2 * k]) % 6) + 6 * k;
        pw[pos] = set[usize::from(bytes[25 + 2 * k]) % set.len()];
    }
    Ok(Secret(String::from_utf8_lossy(&pw).into_owned()))
}

/// Escapes text for an XML element or attribute (the fabric's documents use the same).
pub use crate::fabric::xml_escape;

/// unattend's `PlainText=false` form: base64 of the UTF-16LE of the password followed by the
/// element name (`AdministratorPassword` or `Password`).
pub fn unattend_password(password: &str, element: &str) -> String {
    powershell::encode_command(&format!("{password}{element}"))
}

/// The first-logon commands (cmd.exe lines, each well under unattend's 1024-character limit).
pub fn first_logon_commands() -> Vec<(&'static str, String)> {
    vec![
        ("Full admin token for local accounts over the network", r#"reg add "HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion\Policies\System" /v LocalAccountTokenFilterPolicy /t REG_DWORD /d 1 /f"#.into()),
        ("Network profile Private (WinRM refuses Public)", r#"powershell -NoProfile -Command "Get-NetConnectionProfile | Set-NetConnectionProfile -NetworkCategory Private""#.into()),
        ("WinRM service and HTTP listener", "cmd /c winrm quickconfig -quiet".into()),
        ("NTLM only, never unencrypted bodies", r#"cmd /c winrm set winrm/config/service @{AllowUnencrypted="false"} & winrm set winrm/config/service/auth @{Basic="false"}"#.into()),
        ("Firewall rule for WinRM", format!(r#"netsh advfirewall firewall add rule name="kiln WinRM {WINRM_PORT}" dir=in action=allow protocol=TCP localport={WINRM_PORT}"#)),
        ("Remove the auto-logon password", r#"cmd /c reg delete "HKLM\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Winlogon" /v DefaultPassword /f & reg add "HKLM\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Winlogon" /v AutoAdminLogon /t REG_SZ /d 0 /f"#.into()),
        ("Readiness line on the serial console", format!(r#"powershell -NoProfile -Command "$p = New-Object System.IO.Ports.SerialPort COM1,115200; $p.Open(); $p.WriteLine('{READY_LINE}'); $p.Close()""#)),
    ]
}

/// The answer file for this build.
pub fn unattend_xml(computer_name: &str, user: &str, password: &str) -> String {
    let mut cmds = String::new();
    for (i, (what, line)) in first_logon_commands().iter().enumerate() {
        cmds.push_str(&format!(
            "        <SynchronousCommand wcm:action=\"add\">\n          <Order>{}</Order>\n          <Description>{}</Description>\n          <CommandLine>{}</CommandLine>\n        </SynchronousCommand>\n",
            i + 1,
            xml_escape(what),
            xml_escape(line)
        ));
    }
    UNATTEND_TEMPLATE
        .replace("@@COMPUTER_NAME@@", &xml_escape(computer_name))
        .replace("@@BUILD_USER@@", &xml_escape(user))
        .replace(
            "@@ADMIN_PASSWORD@@",
            &unattend_password(password, "AdministratorPassword"),
        )
        .replace(
            "@@USER_PASSWORD@@",
            &unattend_password(password, "Password"),
        )
        .replace("@@READY_LINE@@", READY_LINE)
        .replace("@@FIRST_LOGON_COMMANDS@@\n", &cmds)
}

/// A NetBIOS-safe computer name (≤ 15 characters).
pub fn computer_name(run_id: &str) -> String {
    let clean: String = run_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    format!("kiln-{}", &clean[..clean.len().min(10)])
}

/// Parses a Go duration as AIB's `restartTimeout` takes it: `5m`, `2h`, `1h30m`, `90s`, `500ms`.
/// Empty means 5 minutes.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(Duration::from_secs(300));
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("`{s}`: a number needs a unit (h, m, s, ms)"))?;
        if n == 0 {
            return Err(format!("`{s}` is not a duration like 5m, 2h or 1h30m"));
        }
        let value: f64 = rest[..n]
            .parse()
            .map_err(|_| format!("`{s}`: bad number `{}`", &rest[..n]))?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            other => return Err(format!("`{s}`: unknown unit `{other}` (h, m, s, ms)")),
        };
        total += value * scale;
        rest = &rest[u..];
    }
    Ok(Duration::from_secs_f64(total))
}

/// The exit codes a PowerShell step accepts (`validExitCodes`, default [0]).
pub fn valid_codes(p: &PowerShellScript) -> Vec<i64> {
    if p.valid_exit_codes.is_empty() {
        vec![0]
    } else {
        p.valid_exit_codes.clone()
    }
}

/// Whether `code` (as WinRS reports it: a 32-bit value, possibly negative) is in `valid`.
pub fn exit_code_ok(code: i32, valid: &[i64]) -> bool {
    valid
        .iter()
        .any(|v| *v == i64::from(code) || *v == i64::from(code as u32))
}

/// How a PowerShell script runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elevation {
    /// Directly in the WinRM shell (a network logon of the build user).
    None,
    /// A scheduled task as the build user with highest privileges (`runElevated`).
    BuildUser,
    /// A scheduled task as SYSTEM (`runAsSystem`).
    System,
}

impl Elevation {
    /// From the template's flags.
    pub fn of(p: &PowerShellScript) -> Elevation {
        match (p.run_elevated, p.run_as_system) {
            (_, true) => Elevation::System,
            (true, false) => Elevation::BuildUser,
            _ => Elevation::None,
        }
    }
    fn describe(self) -> &'static str {
        match self {
            Elevation::None => "none: in the WinRM shell as the build user",
            Elevation::BuildUser => "runElevated: a scheduled task as the build user with highest privileges (kiln-elevated.ps1), output streamed back, the task's exit code returned",
            Elevation::System => "runAsSystem: a scheduled task as SYSTEM (kiln-elevated.ps1), output streamed back, the task's exit code returned",
        }
    }
}

/// The script file a PowerShell step uploads: inline lines joined (or the fetched scriptUri),
/// with progress records off and the last native exit code carried out (as Packer's wrapper).
pub fn powershell_file(body: &str) -> String {
    format!("$ProgressPreference = 'SilentlyContinue'\n{}\nif ($LASTEXITCODE) {{ exit $LASTEXITCODE }}\n", body.trim_end_matches('\n'))
}

/// The command that runs an uploaded script file directly.
pub fn direct_command(path: &str) -> String {
    format!(r#"powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -File "{path}""#)
}

/// The PowerShell that calls the elevated runner (sent as -EncodedCommand, so the password is
/// never on a logged command line). Every argument is a single-quoted literal.
pub fn elevated_invocation(
    runner: &str,
    script: &str,
    elevation: Elevation,
    user: &str,
    password: &str,
) -> String {
    let who = match elevation {
        Elevation::System => "-AsSystem".to_string(),
        _ => format!(
            "-User {} -Password {}",
            powershell::quote(user),
            powershell::quote(password)
        ),
    };
    format!(
        "& {} -ScriptPath {} {who}\nexit $LASTEXITCODE",
        powershell::quote(runner),
        powershell::quote(script)
    )
}

/// A filter as the round script takes it: `include:EXPR` or `exclude:EXPR`. A bare expression
/// (AIB's own 2025-10-01 example has `$_.BrowseOnly`) is read as `include:EXPR`; the planner
/// warns about it, since the provisioner AIB runs rejects a filter without an action.
pub fn normalize_filter(f: &str) -> String {
    if filter_has_action(f) {
        f.to_string()
    } else {
        format!("include:{f}")
    }
}

/// Whether `f` starts with `include:` or `exclude:` (case-insensitive, as the script compares).
pub fn filter_has_action(f: &str) -> bool {
    f.split_once(':').is_some_and(|(a, _)| {
        let a = a.trim();
        a.eq_ignore_ascii_case("include") || a.eq_ignore_ascii_case("exclude")
    })
}

/// The script of one Windows Update round (the parameters are single-quoted literals).
pub fn windows_update_script(
    search_criteria: &str,
    filters: &[String],
    update_limit: u32,
) -> String {
    let criteria = if search_criteria.trim().is_empty() {
        "BrowseOnly=0 and IsInstalled=0"
    } else {
        search_criteria
    };
    let filters: Vec<String> = if filters.is_empty() {
        vec!["include:$true".into()]
    } else {
        filters.iter().map(|f| normalize_filter(f)).collect()
    };
    let list = filters
        .iter()
        .map(|f| powershell::quote(f))
        .collect::<Vec<_>>()
        .join(", ");
    let limit = if update_limit == 0 {
        1000
    } else {
        update_limit
    };
    format!(
        "& (Join-Path $env:SystemRoot 'Temp\\kiln-windows-update.ps1') -SearchCriteria {} -Filters @({list}) -UpdateLimit {limit}\nexit $LASTEXITCODE\n",
        powershell::quote(criteria)
    )
}

fn win_state(cx: &BuildCx) -> Result<&WindowsState, BuildError> {
    cx.windows
        .as_ref()
        .ok_or_else(|| BuildError::Vm("no Windows provisioning state".into()))
}

fn step_err(step: &str, e: impl std::fmt::Display) -> BuildError {
    BuildError::Step {
        step: step.into(),
        message: e.to_string(),
    }
}

/// Plans a Windows build (called by [`super::steps::plan`]).
pub fn plan(cx: &BuildCx) -> Result<Vec<Box<dyn Step>>, BuildError> {
    let p = &cx.template.properties;
    let source_only = p
        .validate
        .as_ref()
        .is_some_and(|v| v.source_validation_only);
    if source_only && !p.customize.is_empty() {
        cx.events.warn(format!(
            "validate.sourceValidationOnly is true: the source image is validated as it is; the {} customizer(s) are not run and nothing is distributed",
            p.customize.len()
        ));
    }
    for (i, c) in p.customize.iter().enumerate().filter(|_| !source_only) {
        if let Customizer::Shell(_) = c {
            return Err(BuildError::Template(format!("properties.customize[{i}]: a Shell customizer cannot run on a Windows build VM; use PowerShell")));
        }
        if let Customizer::WindowsUpdate { filters, .. } = c {
            for (j, f) in filters
                .iter()
                .enumerate()
                .filter(|(_, f)| !filter_has_action(f))
            {
                cx.events.warn(format!(
                    "properties.customize[{i}].filters[{j}] `{f}` has no include:/exclude: action (the Windows Update provisioner AIB runs rejects it); kiln reads it as `include:{f}`"
                ));
            }
        }
        if let Customizer::WindowsRestart {
            restart_timeout, ..
        } = c
        {
            parse_go_duration(restart_timeout).map_err(|e| {
                BuildError::Template(format!("properties.customize[{i}].restartTimeout: {e}"))
            })?;
        }
    }
    let validations: &[Validator] = p
        .validate
        .as_ref()
        .map(|v| v.in_vm_validations.as_slice())
        .unwrap_or_default();
    for (i, v) in validations.iter().enumerate() {
        if let Validator::Shell(_) = v {
            return Err(BuildError::Template(format!("properties.validate.inVMValidations[{i}]: a Shell validation cannot run on a Windows build VM; use PowerShell")));
        }
    }
    let continue_on_failure = p
        .validate
        .as_ref()
        .is_some_and(|v| v.continue_distribute_on_failure);
    let abort = |which: fn(&crate::template::model::ErrorHandling) -> &str| {
        p.error_handling
            .as_ref()
            .is_some_and(|e| which(e).eq_ignore_ascii_case("abort"))
    };
    let abort_customizer = abort(|e| &e.on_customizer_error);
    let abort_validation = abort(|e| &e.on_validation_error);
    let mut steps: Vec<Box<dyn Step>> = vec![
        Box::new(super::steps::ResolveSource),
        Box::new(super::steps::PrepareDisk),
        Box::new(super::steps::FetchArtifacts),
        Box::new(WinProvisioningMedia),
        Box::new(WinStartVm),
        Box::new(ConnectWinRm),
    ];
    let validate = |steps: &mut Vec<Box<dyn Step>>| {
        for (i, v) in validations.iter().enumerate() {
            let policy = if continue_on_failure && !source_only {
                FailurePolicy::Continue
            } else if abort_validation {
                FailurePolicy::Abort
            } else {
                FailurePolicy::Stop
            };
            steps.push(Box::new(WinStep {
                index: i,
                action: WinAction::from_validator(v),
                validation: true,
                policy,
            }));
        }
    };
    if source_only {
        validate(&mut steps);
        steps.push(Box::new(WinShutdown {
            phase: SubState::Validating,
        }));
        return Ok(steps);
    }
    let policy = if abort_customizer {
        FailurePolicy::Abort
    } else {
        FailurePolicy::Stop
    };
    for (i, c) in p.customize.iter().enumerate() {
        steps.push(Box::new(WinStep {
            index: i,
            action: WinAction::from_customizer(c),
            validation: false,
            policy,
        }));
    }
    validate(&mut steps);
    let phase = if validations.is_empty() {
        SubState::Customizing
    } else {
        SubState::Validating
    };
    steps.push(Box::new(Sysprep { phase }));
    steps.push(Box::new(WinShutdown { phase }));
    steps.push(Box::new(super::steps_distribute::ExportDisk));
    steps.push(Box::new(super::steps_distribute::Distribute));
    steps.push(Box::new(super::steps::Record));
    Ok(steps)
}

/// The provisioning method of a Windows build: `--provisioning unattend|azure`, else the
/// catalog entry's first Windows method, else `unattend`. NoCloud and none are Linux methods:
/// the build password reaches Windows Setup only through an answer file.
pub fn choose_provisioning(cx: &BuildCx) -> Result<(Provisioning, String), BuildError> {
    use kiln_images::catalog::ProvisioningMethod as M;
    match cx.options.provisioning {
        Some(p @ (Provisioning::Unattend | Provisioning::Azure)) => {
            return Ok((p, "--provisioning".into()))
        }
        Some(p) => {
            return Err(BuildError::Template(format!(
                "--provisioning {} cannot provision a Windows build: Windows Setup takes the build account and its password only from an answer file; use unattend (Unattend.xml on a USB stick) or azure (ovf-env.xml and Unattend.xml on a DVD, with the emulated fabric)",
                p.as_str()
            )))
        }
        None => {}
    }
    let preferred = cx
        .source
        .iter()
        .flat_map(|s| s.provisioning.iter())
        .find_map(|m| match m {
            M::Unattend => Some(Provisioning::Unattend),
            M::Azure => Some(Provisioning::Azure),
            M::NoCloud => None,
        });
    Ok(match preferred {
        Some(p) => (p, "the catalog image's preferred method".into()),
        None => (Provisioning::Unattend, "the default for Windows".into()),
    })
}

/// The per-build password, the computer name and the media holding `Unattend.xml`: a FAT disk
/// (unattend), or Azure's provisioning DVD with `ovf-env.xml` beside it and this build's
/// emulated fabric (azure).
pub struct WinProvisioningMedia;

/// The provisioning disk's file name in the run directory.
const MEDIA_FILE: &str = "unattend.img";
/// The Azure provisioning DVD's file name in the run directory.
const AZURE_MEDIA_FILE: &str = "ovf-env.iso";

#[async_trait]
impl Step for WinProvisioningMedia {
    fn name(&self) -> String {
        "Provisioning media (answer file)".into()
    }
    fn phase(&self) -> SubState {
        SubState::Building
    }
    fn describe(&self, cx: &BuildCx) -> serde_json::Value {
        let cmds: Vec<String> = first_logon_commands()
            .into_iter()
            .map(|(w, c)| format!("{w}: {c}"))
            .collect();
        let (method, why) = match choose_provisioning(cx) {
            Ok((m, why)) => (m, why),
            Err(e) => return serde_json::json!({"error": e.to_string()}),
        };
        let media = match method {
            Provisioning::Azure => "ISO 9660 image (label KILN_OVF) holding ovf-env.xml (Azure's WindowsProvisioningConfigurationSet: ComputerName, AdminUsername, AdminPassword, an HTTP WinRM listener) and Unattend.xml, attached as an ATAPI DVD drive as on Azure; this build's emulated fabric (wireserver, IMDS with osType Windows, DHCP) answers the guest agent, whose Ready health report is recorded; deleted when the build ends",
            _ => "FAT image (label UNATTEND) with Unattend.xml at its root, attached read-only as a removable USB stick (Windows Setup searches removable media); deleted when the build ends",
        };
        serde_json::json!({
            "provisioning": format!("{} ({why})", method.as_str()),
            "media": media,
            "computerName": computer_name(&cx.run_id),
            "user": format!("{BUILD_USER} (local Administrators member) and Administrator"),
            "password": "random per build (24 characters, /dev/urandom); never logged or printed",
            "autoLogon": "once, to run the first-logon commands",
            "firstLogonCommands": cmds,
            "readiness": format!("`{READY_LINE}` on COM1 (console.log)"),
            "template": "scripts/windows/unattend.xml",
        })
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let (method, why) = choose_provisioning(cx)?;
        cx.events
            .info(format!("provisioning: {} ({why})", method.as_str()));
        cx.provisioning = Some(method);
        let password = random_password().map_err(BuildError::io(
            "reading /dev/urandom for the build password",
        ))?;
        let name = computer_name(&cx.run_id);
        let xml = unattend_xml(&name, BUILD_USER, password.expose());
        if method == Provisioning::Azure {
            let path = cx.run_dir.join(AZURE_MEDIA_FILE);
            let env = super::ovf::WindowsOvfEnv {
                computer_name: name.clone(),
                admin_user: BUILD_USER.into(),
                admin_password: password.expose().into(),
            };
            super::ovf::write_windows_media(&path, &env, &xml).map_err(|e| {
                BuildError::Vm(format!(
                    "writing the Azure provisioning media {}: {e}",
                    path.display()
                ))
            })?;
            cx.events.info(format!("Azure provisioning DVD {} (ovf-env.xml and Unattend.xml; computer name {name}, user {BUILD_USER}, password generated for this build)", path.display()));
            cx.cdrom = Some(path);
            super::steps::start_fabric(cx, &name, "", "Windows")?;
        } else {
            let path = cx.run_dir.join(MEDIA_FILE);
            write_fat(&path, "UNATTEND", &[("Unattend.xml", xml.as_bytes())])
                .map_err(BuildError::io(format!("writing {}", path.display())))?;
            cx.events.info(format!("unattend media {} (computer name {name}, user {BUILD_USER}, password generated for this build)", path.display()));
            cx.seed = Some(path);
        }
        cx.windows = Some(WindowsState {
            password,
            computer_name: name,
            winrm_port: 0,
        });
        Ok(())
    }
    async fn cleanup(&mut self, cx: &mut BuildCx, _outcome: Outcome) {
        // The media hold the password: they never outlive the build. The fabric stops after
        // the VM has (this cleanup runs after the VM's).
        if let Some(s) = cx.seed.take() {
            let _ = std::fs::remove_file(s);
        }
        if let Some(c) = cx.cdrom.take() {
            let _ = std::fs::remove_file(c);
        }
        cx.fabric = None;
    }
}

/// Writes a small FAT image with `files` at its root (atomically: temp file, then rename).
pub fn write_fat(
    path: &std::path::Path,
    label: &str,
    files: &[(&str, &[u8])],
) -> std::io::Result<()> {
    use std::io::Write;
    let content: usize = files.iter().map(|(_, d)| d.len()).sum();
    let size = (2 << 20).max((content + content / 4 + (1 << 20)).div_ceil(1 << 20) << 20);
    let mut disk = std::io::Cursor::new(vec![0u8; size]);
    let mut l = [b' '; 11];
    for (i, b) in label.bytes().take(11).enumerate() {
        l[i] = b;
    }
    fatfs::format_volume(&mut disk, fatfs::FormatVolumeOptions::new().volume_label(l))?;
    disk.set_position(0);
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        {
            let root = fs.root_dir();
            for (name, data) in files {
                let mut f = root.create_file(name)?;
                f.truncate()?;
                f.write_all(data)?;
                f.flush()?;
            }
        }
        fs.unmount()?;
    }
    let tmp = path.with_extension("img.tmp");
    std::fs::write(&tmp, disk.into_inner())?;
    std::fs::rename(&tmp, path)
}

/// Boots the VM (as [`super::steps_vm::StartVm`]) with the guest's WinRM port forwarded.
pub struct WinStartVm;

#[async_trait]
impl Step for WinStartVm {
    fn name(&self) -> String {
        "Start VM".into()
    }
    fn phase(&self) -> SubState {
        SubState::Building
    }
    fn describe(&self, cx: &BuildCx) -> serde_json::Value {
        describe_vm(
            cx,
            &format!(
                "127.0.0.1:<free port> → guest {WINRM_PORT} (WinRM HTTP); guest {}:{} → this build's file endpoint (guestfwd to kiln __fabric-connect … files)",
                files::GUEST_ADDR,
                files::GUEST_PORT
            ),
            super::steps_vm::Devices::windows(cx),
        )
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(BuildError::io("choosing a port for WinRM"))?
            .port();
        let mut netdev = vec![format!("hostfwd=tcp:127.0.0.1:{port}-:{WINRM_PORT}")];
        netdev.extend(start_file_endpoint(cx));
        super::steps_vm::start_vm(cx, netdev, super::steps_vm::Devices::windows(cx)).await?;
        if let Some(w) = cx.windows.as_mut() {
            w.winrm_port = port;
        }
        cx.events
            .info(format!("WinRM forwarded on 127.0.0.1:{port}"));
        Ok(())
    }
    async fn cleanup(&mut self, cx: &mut BuildCx, outcome: Outcome) {
        super::steps_vm::StartVm.cleanup(cx, outcome).await;
        cx.files = None;
    }
}

/// Starts this build's file endpoint ([`files`]) and returns the `guestfwd` option that routes
/// the guest's `http://10.0.2.100/` to it; without one (it could not start) File customizers
/// fall back to the WinRM upload, said loudly here and at each File step.
fn start_file_endpoint(cx: &mut BuildCx) -> Option<String> {
    let guest_addr = if cx.fabric.is_some() {
        files::GUEST_ADDR_AZURE_NET
    } else {
        files::GUEST_ADDR
    };
    let (socket, own_dir) = files::socket_path_for(&cx.run_dir, &cx.run_id);
    let events = cx.events.clone();
    let sink: files::FileSink = std::sync::Arc::new(move |e: files::FileEvent| {
        let what = format!(
            "file endpoint: {} {} -> {}{}",
            if e.method.is_empty() { "-" } else { &e.method },
            e.target,
            e.status,
            e.name
                .as_ref()
                .map(|n| format!(" ({n}, {} bytes sent)", e.bytes))
                .unwrap_or_default()
        );
        match &e.error {
            None => events.info(what),
            Some(err) => events.warn(format!("{what}: {err}")),
        }
    });
    let started = std::env::current_exe()
        .map_err(|e| format!("finding kiln's own executable for the relay: {e}"))
        .and_then(|exe| {
            let server = files::FileServer::start(&socket, own_dir.as_deref(), guest_addr, sink)
                .map_err(|e| e.to_string())?;
            let opt = server
                .netdev_option(&exe, guest_addr)
                .ok_or_else(|| "the endpoint has no socket".to_string())?;
            Ok((server, opt))
        });
    match started {
        Ok((server, opt)) => {
            cx.events.info(format!(
                "file endpoint for this build on {} (the guest pulls File sources from http://{guest_addr}:{}/f/<one-time token>)",
                socket.display(),
                files::GUEST_PORT
            ));
            cx.files = Some(server);
            Some(opt)
        }
        Err(e) => {
            cx.events.warn(format!(
                "kiln's file endpoint could not start ({e}): File customizers will go through the WinRM upload instead (base64 chunks, far slower)"
            ));
            None
        }
    }
}

/// Keeps a failed Windows build VM running (`errorHandling: abort`, `--keep-vm-on-error`): the
/// password goes to `winrm-password.kept` (mode 0600) in the run's directory, removed when the
/// kept VM stops, and the user is told how to reach WinRM.
pub(crate) fn keep_vm(cx: &mut BuildCx, v: vm::Vm, reason: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let kept = cx.run_dir.join("winrm-password.kept");
    let (port, password) = cx
        .windows
        .as_ref()
        .map(|w| (w.winrm_port, w.password.clone()))
        .unwrap_or((0, Secret(String::new())));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&kept)
        .and_then(|mut f| f.write_all(password.expose().as_bytes()));
    if let Err(e) = written {
        cx.events.warn(format!("writing {}: {e}", kept.display()));
    }
    cx.events.emit(super::events::Event::VmKept {
        reason: reason.into(),
        pid: v.pid(),
        ssh_port: port,
        user: BUILD_USER.into(),
        key_path: kept.display().to_string(),
        run_dir: cx.run_dir.display().to_string(),
    });
    cx.events.warn(format!(
        "{reason}: the build VM is still running (QEMU pid {}). Reach it over WinRM (HTTP + NTLM) at http://127.0.0.1:{port}/wsman as {BUILD_USER}; the password is in {} (removed when the VM stops)\n  Cancel the run (Ctrl-C here) to stop it. The staging directory stays for inspection; delete it when done:\n    rm -rf {}",
        v.pid(),
        kept.display(),
        cx.run_dir.display()
    ));
    cx.kept_vm = Some(super::context::KeptVm {
        vm: v,
        key_path: kept,
    });
}

/// Waits for WinRM (20 minutes by default, as AIB) and authenticates with NTLM; every body sealed.
pub struct ConnectWinRm;

#[async_trait]
impl Step for ConnectWinRm {
    fn name(&self) -> String {
        "Connect (WinRM)".into()
    }
    fn phase(&self) -> SubState {
        SubState::Customizing
    }
    fn describe(&self, cx: &BuildCx) -> serde_json::Value {
        serde_json::json!({
            "transport": "WinRM",
            "address": format!("http://127.0.0.1:<forwarded port>/wsman → guest port {WINRM_PORT}"),
            "auth": "NTLMv2 with message sealing (no plaintext SOAP body; Basic and AllowUnencrypted stay off in the guest)",
            "user": BUILD_USER,
            "timeoutSeconds": cx.options.ssh_timeout.as_secs(),
            "ends early": "when QEMU exits or the console shows a crash",
        })
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let w = win_state(cx)?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], w.winrm_port));
        let mut config =
            WinRmConfig::new(addr, BUILD_USER, w.password.expose(), Security::HttpNtlm);
        config.timeout = cx.options.ssh_timeout;
        let started = cx
            .vm
            .as_ref()
            .map(|v| v.started_at())
            .unwrap_or_else(Instant::now);
        let base = interrupt_for(cx);
        // With Azure provisioning a ProvisioningFailed health report ends the wait at once.
        let interrupt: kiln_agents::InterruptFuture<'static> = match cx
            .fabric
            .as_ref()
            .map(|f| f.health())
        {
            None => base,
            Some(rx) => Box::pin(async move {
                tokio::select! {
                    i = base => i,
                    why = super::steps_vm::provisioning_failure(rx) => kiln_agents::Interrupt::Aborted(format!("Azure provisioning failed: {why}")),
                }
            }),
        };
        let guest = WinRmCommunicator::connect(config, interrupt)
            .await
            .map_err(|e| {
                let tail = cx
                    .vm
                    .as_ref()
                    .map(|v| v.console_tail(15))
                    .unwrap_or_default();
                BuildError::Connect(format!(
                    "WinRM to the build VM: {e}\n  last console lines:\n{tail}"
                ))
            })?;
        let ready = cx.vm.as_ref().is_some_and(|v| {
            std::fs::read_to_string(v.console_log_path())
                .unwrap_or_default()
                .contains(READY_LINE)
        });
        let connected_s = Instant::now()
            .saturating_duration_since(started)
            .as_secs_f64();
        cx.events.info(format!(
            "WinRM ready {connected_s:.1}s after QEMU started ({}; readiness line {})",
            guest.endpoint(),
            if ready {
                "seen on the console"
            } else {
                "not seen on the console"
            }
        ));
        cx.guest = Some(Box::new(guest));
        let vm_name = format!("{}-{}", cx.template_name, cx.run_id);
        super::steps_vm::await_provisioned(cx, started, connected_s, &vm_name).await
    }
    async fn cleanup(&mut self, cx: &mut BuildCx, _outcome: Outcome) {
        if let Some(g) = cx.guest.take() {
            let _ = g.close().await;
        }
    }
}

/// What one Windows customizer or validator does.
#[derive(Debug, Clone)]
pub enum WinAction {
    /// PowerShell.
    PowerShell(PowerShellScript),
    /// File.
    File(FileCopy),
    /// WindowsRestart.
    Restart {
        /// The restart command.
        command: String,
        /// The check command.
        check: String,
        /// The timeout as written.
        timeout: String,
        /// Display name.
        name: Option<String>,
    },
    /// WindowsUpdate.
    Update {
        /// searchCriteria.
        criteria: String,
        /// filters.
        filters: Vec<String>,
        /// updateLimit.
        limit: u32,
        /// Display name.
        name: Option<String>,
    },
    /// Refused in planning (Shell on Windows).
    Unsupported(&'static str),
}

impl WinAction {
    fn from_customizer(c: &Customizer) -> WinAction {
        match c {
            Customizer::PowerShell(p) => WinAction::PowerShell(p.clone()),
            Customizer::File(f) => WinAction::File(f.clone()),
            Customizer::WindowsRestart {
                name,
                restart_command,
                restart_check_command,
                restart_timeout,
            } => WinAction::Restart {
                command: restart_command.clone(),
                check: restart_check_command.clone(),
                timeout: restart_timeout.clone(),
                name: name.clone(),
            },
            Customizer::WindowsUpdate {
                name,
                search_criteria,
                filters,
                update_limit,
            } => WinAction::Update {
                criteria: search_criteria.clone(),
                filters: filters.clone(),
                limit: *update_limit,
                name: name.clone(),
            },
            Customizer::Shell(_) => WinAction::Unsupported("Shell"),
        }
    }
    fn from_validator(v: &Validator) -> WinAction {
        match v {
            Validator::PowerShell(p) => WinAction::PowerShell(p.clone()),
            Validator::File(f) => WinAction::File(f.clone()),
            Validator::Shell(_) => WinAction::Unsupported("Shell"),
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            WinAction::PowerShell(_) => "PowerShell",
            WinAction::File(_) => "File",
            WinAction::Restart { .. } => "WindowsRestart",
            WinAction::Update { .. } => "WindowsUpdate",
            WinAction::Unsupported(k) => k,
        }
    }
    fn display_name(&self) -> Option<&str> {
        match self {
            WinAction::PowerShell(p) => p.name.as_deref(),
            WinAction::File(f) => f.name.as_deref(),
            WinAction::Restart { name, .. } | WinAction::Update { name, .. } => name.as_deref(),
            WinAction::Unsupported(_) => None,
        }
    }
}

/// One Windows customizer or validator.
pub struct WinStep {
    /// Its index in `customize` or `inVMValidations`.
    pub index: usize,
    /// What it does.
    pub action: WinAction,
    /// An in-VM validation (errors become validation errors).
    pub validation: bool,
    /// What a failure does.
    pub policy: FailurePolicy,
}

fn remote_script_path(cx: &BuildCx, what: &str, index: usize) -> String {
    format!(r"{GUEST_TEMP}\kiln-{}-{what}-{index}.ps1", cx.run_id)
}

#[async_trait]
impl Step for WinStep {
    fn name(&self) -> String {
        let n = self
            .action
            .display_name()
            .filter(|n| !n.is_empty())
            .map(|n| format!(" \"{n}\""))
            .unwrap_or_else(|| format!(" #{}", self.index));
        format!(
            "{}: {}{n}",
            if self.validation {
                "Validate"
            } else {
                "Customize"
            },
            self.action.kind()
        )
    }
    fn phase(&self) -> SubState {
        if self.validation {
            SubState::Validating
        } else {
            SubState::Customizing
        }
    }
    fn failure_policy(&self) -> FailurePolicy {
        self.policy
    }
    fn describe(&self, cx: &BuildCx) -> serde_json::Value {
        let what = if self.validation {
            "validate"
        } else {
            "customize"
        };
        let mut d = match &self.action {
            WinAction::PowerShell(p) => {
                let script = match &p.script_uri {
                    Some(u) => serde_json::json!({
                        "scriptUri": u,
                        "sha256": Some(p.sha256_checksum.clone()).filter(|c| !c.is_empty()).unwrap_or_else(|| "(none given: not verified)".into()),
                        "fetched": "by the host before boot, checksum verified; the file's text is wrapped as below",
                        "wrapper": powershell_file("<the fetched script>"),
                    }),
                    None => serde_json::json!({"inline": powershell_file(&p.inline.join("\n"))}),
                };
                let path = remote_script_path(cx, what, self.index);
                let elevation = Elevation::of(p);
                let command = match elevation {
                    Elevation::None => direct_command(&path),
                    e => format!(
                        "powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand <base64 of:\n{}>",
                        elevated_invocation(&format!(r"{GUEST_TEMP}\kiln-elevated.ps1"), &path, e, BUILD_USER, "<the build password>")
                    ),
                };
                serde_json::json!({
                    "script": script,
                    "uploadedTo": path,
                    "command": command,
                    "elevation": elevation.describe(),
                    "validExitCodes": valid_codes(p),
                })
            }
            WinAction::File(f) => serde_json::json!({
                "sourceUri": f.source_uri,
                "sha256": Some(f.sha256_checksum.clone()).filter(|c| !c.is_empty()).unwrap_or_else(|| "(none given: not verified)".into()),
                "destination": f.destination,
                "rule": "the destination's directory must already exist in the guest (AIB's rule); checked before the upload",
                "delivery": format!("pulled by the guest from kiln's per-build file endpoint (http://{}:{}/f/<one-time token>, WebClient), size and SHA-256 checked in the guest before it is moved into place; if the guest cannot reach the endpoint: the WinRM upload (base64 chunks, SHA-256 checked), with a warning", files::GUEST_ADDR, files::GUEST_PORT),
            }),
            WinAction::Restart {
                command,
                check,
                timeout,
                ..
            } => serde_json::json!({
                "restartCommand": if command.is_empty() { DEFAULT_RESTART_COMMAND } else { command },
                "acceptedExitCodes": [0, 1115, 1190],
                "verification": "a QMP RESET event from the VM (the guest really rebooted), then WinRM reconnects",
                "restartCheckCommand": if check.is_empty() { DEFAULT_RESTART_CHECK } else { check },
                "restartTimeout": format!("{} ({} s)", if timeout.is_empty() { "5m (default)" } else { timeout }, parse_go_duration(timeout).map(|d| d.as_secs().to_string()).unwrap_or_else(|e| e)),
            }),
            WinAction::Update {
                criteria,
                filters,
                limit,
                ..
            } => serde_json::json!({
                "searchCriteria": if criteria.is_empty() { "BrowseOnly=0 and IsInstalled=0" } else { criteria },
                "filters": if filters.is_empty() { vec!["include:$true".to_string()] } else { filters.iter().map(|f| normalize_filter(f)).collect() },
                "updateLimit": if *limit == 0 { 1000 } else { *limit },
                "runAs": "SYSTEM, through kiln-elevated.ps1 (the Windows Update Agent refuses network logons)",
                "round": windows_update_script(criteria, filters, *limit),
                "rounds": format!("repeat (reboot verified by QMP RESET between rounds) until a round exits 0; at most {MAX_UPDATE_ROUNDS} rounds; an update failing in two rounds stops the build; TiWorker wait bounded to 30 min"),
                "script": "scripts/windows/kiln-windows-update.ps1 (WUA COM API)",
            }),
            WinAction::Unsupported(k) => {
                serde_json::json!({"unsupported": format!("{k} cannot run on Windows")})
            }
        };
        d["onFailure"] = serde_json::json!(describe_policy(self.policy));
        d
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let step = self.name();
        let r = match self.action.clone() {
            WinAction::PowerShell(p) => {
                run_powershell(
                    cx,
                    &step,
                    &p,
                    if self.validation {
                        "validate"
                    } else {
                        "customize"
                    },
                    self.index,
                )
                .await
            }
            WinAction::File(f) => run_file(cx, &step, &f).await,
            WinAction::Restart {
                command,
                check,
                timeout,
                ..
            } => {
                let t = parse_go_duration(&timeout).map_err(|e| step_err(&step, e))?;
                restart(cx, &step, &command, &check, t).await
            }
            WinAction::Update {
                criteria,
                filters,
                limit,
                ..
            } => windows_update(cx, &step, &criteria, &filters, limit).await,
            WinAction::Unsupported(k) => Err(step_err(
                &step,
                format!("{k} cannot run on a Windows build VM"),
            )),
        };
        if self.validation {
            r.map_err(|e| match e {
                BuildError::Step { step, message } => BuildError::Validation { step, message },
                other => other,
            })
        } else {
            r
        }
    }
}

/// Why a guest command gave no exit code.
#[derive(Debug)]
enum ExecErr {
    /// The connection dropped (e.g. the guest is rebooting).
    Lost(String),
    /// Anything else.
    Other(String),
}

impl std::fmt::Display for ExecErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExecErr::Lost(m) | ExecErr::Other(m) => f.write_str(m),
        }
    }
}

/// Runs `command` in the guest, streaming its output as the step's lines (and keeping stdout's
/// bytes in `tee` when given); returns the exit code.
async fn exec_streamed(
    cx: &mut BuildCx,
    step: &str,
    command: &str,
    log_command: bool,
    mut tee: Option<&mut Vec<u8>>,
) -> Result<i32, ExecErr> {
    if log_command {
        cx.events.info(format!("running: {command}"));
    }
    let events = cx.events.clone();
    let mut lines = LineSplitter::new(step.to_string());
    let guest = cx
        .guest
        .as_ref()
        .ok_or_else(|| ExecErr::Other("not connected".into()))?;
    let r = {
        let mut sink = |s: Stream, d: &[u8]| {
            if let (Stream::Stdout, Some(t)) = (s, tee.as_deref_mut()) {
                t.extend_from_slice(d);
            }
            lines.feed(
                &events,
                if s == Stream::Stdout {
                    OutStream::Stdout
                } else {
                    OutStream::Stderr
                },
                d,
            )
        };
        guest.exec(command, ExecOptions::default(), &mut sink).await
    };
    lines.finish(&events);
    let o = r.map_err(|e| match e {
        CommError::ConnectionLost { .. } => ExecErr::Lost(e.to_string()),
        e => ExecErr::Other(e.to_string()),
    })?;
    match o.status {
        kiln_agents::ExitStatus::Code(c) => Ok(c),
        other => Err(ExecErr::Other(format!(
            "the command ended without an exit code ({other})"
        ))),
    }
}

/// A script file's bytes as Windows PowerShell 5.1 must get them: UTF-8 **with** a byte-order
/// mark (without one it reads the file in the ANSI code page, mangling non-ASCII text such as
/// the Japanese in the corpus's localization templates).
pub fn ps1_bytes(text: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(text.len() + 3);
    v.extend_from_slice(b"\xEF\xBB\xBF");
    v.extend_from_slice(text.strip_prefix('\u{feff}').unwrap_or(text).as_bytes());
    v
}

/// Uploads a PowerShell script (as [`ps1_bytes`]) to `dest`.
async fn upload_text(
    cx: &mut BuildCx,
    step: &str,
    text: &str,
    dest: &str,
) -> Result<(), BuildError> {
    recover_after_reboot(cx, step, false).await?;
    let guest = cx
        .guest
        .as_ref()
        .ok_or_else(|| BuildError::Connect("not connected".into()))?;
    let bytes = ps1_bytes(text);
    let mut body = bytes.as_slice();
    guest
        .upload(&mut body, bytes.len() as u64, dest, 0o644)
        .await
        .map_err(|e| step_err(step, format!("uploading {dest}: {e}")))?;
    Ok(())
}

/// Runs an uploaded script with `elevation` (keeping its stdout in `tee` when given); returns
/// its exit code.
async fn run_ps_file(
    cx: &mut BuildCx,
    step: &str,
    path: &str,
    elevation: Elevation,
    tee: Option<&mut Vec<u8>>,
) -> Result<i32, BuildError> {
    let command = match elevation {
        Elevation::None => direct_command(path),
        e => {
            let runner = format!(r"{GUEST_TEMP}\kiln-elevated.ps1");
            upload_text(cx, step, ELEVATED_RUNNER, &runner).await?;
            let password = win_state(cx)?.password.expose().to_string();
            powershell::command_line(&elevated_invocation(
                &runner, path, e, BUILD_USER, &password,
            ))
        }
    };
    cx.events.info(match elevation {
        Elevation::None => format!("running {path}"),
        Elevation::BuildUser => {
            format!("running {path} elevated (scheduled task as {BUILD_USER}, highest privileges)")
        }
        Elevation::System => format!("running {path} as SYSTEM (scheduled task)"),
    });
    exec_streamed(cx, step, &command, false, tee)
        .await
        .map_err(|e| step_err(step, e))
}

async fn run_powershell(
    cx: &mut BuildCx,
    step: &str,
    p: &PowerShellScript,
    what: &str,
    index: usize,
) -> Result<(), BuildError> {
    let body = match &p.script_uri {
        Some(uri) => {
            let a = cx
                .artifacts
                .get(uri)
                .cloned()
                .ok_or_else(|| step_err(step, format!("{uri} was not fetched")))?;
            std::fs::read_to_string(&a.path)
                .map_err(BuildError::io(format!("reading {}", a.path.display())))?
        }
        None => p.inline.join("\n"),
    };
    let path = remote_script_path(cx, what, index);
    upload_text(cx, step, &powershell_file(&body), &path).await?;
    let code = run_ps_file(cx, step, &path, Elevation::of(p), None).await?;
    let valid = valid_codes(p);
    if exit_code_ok(code, &valid) {
        Ok(())
    } else {
        Err(step_err(
            step,
            format!("the script exited with {code}; validExitCodes {valid:?}"),
        ))
    }
}

/// The File step's check that `destination`'s directory exists (exit 3 when it does not).
pub fn destination_dir_check(destination: &str) -> String {
    format!("$d = Split-Path -Parent {}; if ($d -and -not (Test-Path -LiteralPath $d -PathType Container)) {{ exit 3 }}; exit 0", powershell::quote(destination))
}

async fn run_file(cx: &mut BuildCx, step: &str, f: &FileCopy) -> Result<(), BuildError> {
    let a = cx
        .artifacts
        .get(&f.source_uri)
        .cloned()
        .ok_or_else(|| step_err(step, format!("{} was not fetched", f.source_uri)))?;
    recover_after_reboot(cx, step, false).await?;
    let check = destination_dir_check(&f.destination);
    let code = exec_streamed(cx, step, &powershell::command_line(&check), false, None)
        .await
        .map_err(|e| step_err(step, e))?;
    if code == 3 {
        return Err(step_err(step, format!("the destination directory of {} does not exist in the guest (AIB requires it to exist; create it in an earlier PowerShell customizer)", f.destination)));
    }
    let guest = cx
        .guest
        .as_ref()
        .ok_or_else(|| BuildError::Connect("not connected".into()))?;
    let events = cx.events.clone();
    let warn = move |m: String| events.warn(m);
    let d = files::deliver_or_upload(
        guest.as_ref(),
        cx.files.as_ref(),
        &a.path,
        &f.destination,
        &warn,
    )
    .await
    .map_err(|e| step_err(step, e))?;
    let secs = d.duration.as_secs_f64();
    cx.events.info(format!(
        "delivered {} bytes to {} {} in {secs:.2}s ({:.1} MB/s; size and SHA-256 {} verified in the guest)",
        d.bytes,
        f.destination,
        match d.via {
            files::Via::Pull => "through kiln's file endpoint",
            files::Via::Upload => "by the WinRM upload",
        },
        d.bytes as f64 / 1e6 / secs.max(1e-6),
        d.sha256
    ));
    Ok(())
}

async fn wait_reset(v: &vm::Vm, before: u64, timeout: Duration) -> bool {
    let mut rx = v.status_watch();
    tokio::time::timeout(timeout, rx.wait_for(|s| s.resets > before))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Restarts the guest and proves it: the restart command (1115/1190 mean one is already under
/// way), a QMP RESET, a new WinRM connection, then the check command until it succeeds — all
/// within `timeout`.
async fn restart(
    cx: &mut BuildCx,
    step: &str,
    command: &str,
    check: &str,
    timeout: Duration,
) -> Result<(), BuildError> {
    let deadline = Instant::now() + timeout;
    recover_after_reboot(cx, step, false).await?;
    let before = cx
        .vm
        .as_ref()
        .ok_or_else(|| BuildError::Vm("no VM".into()))?
        .reboot_count();
    let command = if command.trim().is_empty() {
        DEFAULT_RESTART_COMMAND
    } else {
        command
    };
    // Bounded by restartTimeout too: a command that neither returns nor reboots the guest
    // must not hold the build.
    let ran = match tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        exec_streamed(cx, step, command, true, None),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => {
            return Err(step_err(
                step,
                format!(
                    "the restart command `{command}` did not return within restartTimeout ({}s)",
                    timeout.as_secs()
                ),
            ))
        }
    };
    match ran {
        Ok(0) => {}
        Ok(c) if RESTART_IN_PROGRESS.contains(&i64::from(c)) => cx
            .events
            .info(format!("exit {c}: a restart is already under way")),
        Ok(c) => {
            return Err(step_err(
                step,
                format!("the restart command exited with {c}"),
            ))
        }
        Err(ExecErr::Lost(_)) => cx
            .events
            .info("the connection dropped: the guest is restarting"),
        Err(e) => return Err(step_err(step, e)),
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let v = cx
        .vm
        .as_ref()
        .ok_or_else(|| BuildError::Vm("no VM".into()))?;
    if !wait_reset(v, before, left).await {
        return Err(step_err(
            step,
            format!(
                "the guest did not reboot within restartTimeout ({}s): no QMP RESET",
                timeout.as_secs()
            ),
        ));
    }
    cx.resets_seen = v.reboot_count();
    cx.events
        .info("reboot verified (QMP RESET); waiting for WinRM");
    let interrupt = interrupt_for(cx);
    let guest = cx
        .guest
        .as_ref()
        .ok_or_else(|| BuildError::Connect("not connected".into()))?;
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, guest.reconnect(interrupt)).await {
        Ok(Ok(rep)) => {
            // One reboot of a BIOS guest is two RESETs (SeaBIOS resets again on a warm reset),
            // the second after the first was seen: count them all once WinRM is back, or the
            // next step takes the late one for another reboot.
            if let Some(v) = cx.vm.as_ref() {
                cx.resets_seen = v.reboot_count();
            }
            cx.events.info(format!(
                "reconnected after {:.1}s",
                rep.wait().as_secs_f64()
            ))
        }
        Ok(Err(e)) => {
            return Err(BuildError::Connect(format!(
                "{step}: reconnecting after the restart: {e}"
            )))
        }
        Err(_) => {
            return Err(step_err(
                step,
                format!(
                    "WinRM did not come back within restartTimeout ({}s)",
                    timeout.as_secs()
                ),
            ))
        }
    }
    let check = if check.trim().is_empty() {
        DEFAULT_RESTART_CHECK
    } else {
        check
    };
    loop {
        match exec_streamed(cx, step, check, true, None).await {
            Ok(0) => return Ok(()),
            Ok(c) => cx
                .events
                .info(format!("restart check exited with {c}; retrying in 5 s")),
            Err(e) => cx
                .events
                .info(format!("restart check: {e}; retrying in 5 s")),
        }
        if Instant::now() + Duration::from_secs(5) > deadline {
            return Err(step_err(
                step,
                format!(
                    "restartCheckCommand did not succeed within restartTimeout ({}s)",
                    timeout.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// The updates a Windows Update round names in its `kiln-wu: failed in two rounds, stopping: …`
/// line (exit 102), `; `-separated as the script prints them.
pub fn failed_twice(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("kiln-wu: failed in two rounds, stopping: ")
        })
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Windows Update rounds as SYSTEM until nothing is left, rebooting between rounds.
async fn windows_update(
    cx: &mut BuildCx,
    step: &str,
    criteria: &str,
    filters: &[String],
    limit: u32,
) -> Result<(), BuildError> {
    let script_path = format!(r"{GUEST_TEMP}\kiln-windows-update.ps1");
    let round_path = format!(r"{GUEST_TEMP}\kiln-{}-windows-update-round.ps1", cx.run_id);
    for round in 1..=MAX_UPDATE_ROUNDS {
        upload_text(cx, step, WINDOWS_UPDATE, &script_path).await?;
        upload_text(
            cx,
            step,
            &windows_update_script(criteria, filters, limit),
            &round_path,
        )
        .await?;
        cx.events.info(format!(
            "Windows Update round {round} of at most {MAX_UPDATE_ROUNDS}"
        ));
        let mut out = Vec::new();
        match run_ps_file(cx, step, &round_path, Elevation::System, Some(&mut out)).await? {
            0 => {
                cx.events.info(format!(
                    "Windows Update: nothing left after {round} round(s)"
                ));
                return Ok(());
            }
            101 => {
                restart(
                    cx,
                    step,
                    DEFAULT_RESTART_COMMAND,
                    "",
                    Duration::from_secs(4 * 3600),
                )
                .await?
            }
            102 => {
                return Err(step_err(
                    step,
                    match failed_twice(&String::from_utf8_lossy(&out)) {
                        Some(t) => format!("round {round}: an update failed in two rounds: {t}"),
                        None => format!("round {round}: an update failed in two rounds (see the kiln-wu lines above)"),
                    },
                ))
            }
            c => {
                return Err(step_err(
                    step,
                    format!("the Windows Update round exited with {c}"),
                ))
            }
        }
    }
    Err(step_err(
        step,
        format!("updates still pending after {MAX_UPDATE_ROUNDS} rounds (a reboot loop?)"),
    ))
}

/// Generalizes with Sysprep: `c:\DeprovisioningScript.ps1` when present, else AIB's default
/// with bounded waits (scripts/windows/kiln-sysprep.ps1).
pub struct Sysprep {
    /// The sub-state it reports.
    pub phase: SubState,
}

#[async_trait]
impl Step for Sysprep {
    fn name(&self) -> String {
        "Sysprep".into()
    }
    fn phase(&self) -> SubState {
        self.phase
    }
    fn describe(&self, _cx: &BuildCx) -> serde_json::Value {
        serde_json::json!({
            "override": format!("{DEPROVISION_OVERRIDE} (printed, then run instead of the default when it exists in the guest)"),
            "command": direct_command(&format!(r"{GUEST_TEMP}\kiln-sysprep.ps1")),
            "default": "wait for RdAgent, WindowsAzureTelemetryService, WindowsAzureGuestAgent when installed (5 min each at most; absent ones skipped with a log line), remove cached unattend files, disable the build account, Sysprep.exe /oobe /generalize /quiet /quit, poll ImageState for IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE (30 min deadline, the stuck state reported)",
            "script": SYSPREP,
        })
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let step = self.name();
        let path = format!(r"{GUEST_TEMP}\kiln-sysprep.ps1");
        upload_text(cx, &step, SYSPREP, &path).await?;
        let code = run_ps_file(cx, &step, &path, Elevation::None, None).await?;
        if code == 0 {
            Ok(())
        } else {
            Err(step_err(
                &step,
                format!("sysprep ended with {code} (see the lines above)"),
            ))
        }
    }
}

/// Shuts Windows down with the ladder (`shutdown /s` → ACPI → quit → kill).
pub struct WinShutdown {
    /// The sub-state it reports.
    pub phase: SubState,
}

#[async_trait]
impl Step for WinShutdown {
    fn name(&self) -> String {
        "Shutdown".into()
    }
    fn phase(&self) -> SubState {
        self.phase
    }
    fn describe(&self, _cx: &BuildCx) -> serde_json::Value {
        serde_json::json!({"ladder": "guest command (`shutdown /s /t 0 /f`, 300 s) → ACPI powerdown (120 s) → QMP quit → kill"})
    }
    async fn run(&mut self, cx: &mut BuildCx) -> Result<(), BuildError> {
        let guest = cx.guest.take();
        let Some(v) = cx.vm.take() else {
            return Err(BuildError::Vm("no VM".into()));
        };
        let guest_cmd: Option<vm::GuestShutdown<'static>> = guest.map(|g| {
            let fut: vm::GuestShutdown<'static> = Box::pin(async move {
                let r = g
                    .exec_collect(
                        "shutdown /s /t 0 /f",
                        ExecOptions {
                            timeout: Some(Duration::from_secs(30)),
                            ..Default::default()
                        },
                    )
                    .await;
                let _ = g.close().await;
                match r {
                    Ok((o, out)) if !o.status.success() => Err(format!(
                        "`shutdown /s` in the guest: {} {}",
                        o.status,
                        out.stderr_lossy().trim()
                    )),
                    Ok(_) | Err(CommError::ConnectionLost { .. }) => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            });
            fut
        });
        let timeouts = vm::ShutdownTimeouts {
            guest: Duration::from_secs(300),
            guest_error_grace: Duration::from_secs(2),
            acpi: Duration::from_secs(120),
            ..Default::default()
        };
        let report = v
            .shutdown_ladder(guest_cmd, timeouts)
            .await
            .map_err(|e| BuildError::Vm(e.to_string()))?;
        cx.vm = Some(v);
        cx.events.info(format!("build VM stopped: {}", report.rung));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quick_xml::events::Event as X;

    /// Parses `xml` strictly and returns (element path, text) pairs; panics if not well-formed.
    fn parse(xml: &str) -> Vec<(String, String)> {
        let mut r = quick_xml::Reader::from_str(xml);
        r.config_mut().check_end_names = true;
        let mut path: Vec<String> = Vec::new();
        let mut out = Vec::new();
        let mut cur = String::new();
        loop {
            match r
                .read_event()
                .unwrap_or_else(|e| panic!("not well-formed at {}: {e}", r.buffer_position()))
            {
                X::Start(e) => {
                    cur.clear();
                    path.push(String::from_utf8_lossy(e.local_name().as_ref()).into_owned());
                }
                X::End(_) => {
                    if !cur.trim().is_empty() {
                        out.push((path.join("/"), std::mem::take(&mut cur)));
                    }
                    cur.clear();
                    path.pop();
                }
                X::Text(t) => cur.push_str(&t.xml_content().expect("text decodes")),
                X::GeneralRef(r) => {
                    let name = String::from_utf8_lossy(r.as_ref()).into_owned();
                    let resolved = quick_xml::escape::resolve_predefined_entity(&name)
                        .unwrap_or_else(|| panic!("unknown entity &{name};"));
                    cur.push_str(resolved);
                }
                X::Eof => break,
                _ => {}
            }
        }
        assert!(path.is_empty(), "unclosed elements: {path:?}");
        out
    }

    fn texts<'a>(v: &'a [(String, String)], suffix: &str) -> Vec<&'a str> {
        v.iter()
            .filter(|(p, _)| p.ends_with(suffix))
            .map(|(_, t)| t.as_str())
            .collect()
    }

    fn decode_password(b64: &str, element: &str) -> String {
        let s = powershell::decode_command(b64).expect("base64 of UTF-16LE");
        s.strip_suffix(element).expect("suffix").to_string()
    }

    #[test]
    fn unattend_is_well_formed_and_carries_the_build_values() {
        let pw = random_password().unwrap();
        let xml = unattend_xml("kiln-ab12cd34", "packer", pw.expose());
        let v = parse(&xml);
        assert_eq!(
            texts(&v, "specialize/component/ComputerName").len(),
            0,
            "paths are local names"
        );
        assert_eq!(
            texts(&v, "settings/component/ComputerName"),
            ["kiln-ab12cd34"]
        );
        assert_eq!(texts(&v, "LocalAccount/Name"), ["packer"]);
        assert_eq!(texts(&v, "AutoLogon/Username"), ["packer"]);
        assert_eq!(texts(&v, "AutoLogon/LogonCount"), ["1"]);
        let admin = texts(&v, "AdministratorPassword/Value");
        assert_eq!(admin.len(), 1);
        assert_eq!(
            decode_password(admin[0], "AdministratorPassword"),
            pw.expose()
        );
        let user = texts(&v, "LocalAccount/Password/Value");
        assert_eq!(decode_password(user[0], "Password"), pw.expose());
        assert_eq!(texts(&v, "PlainText"), ["false", "false", "false"]);
        assert!(
            !xml.contains(pw.expose()),
            "the password never appears in clear"
        );
        let orders = texts(&v, "SynchronousCommand/Order");
        let expected: Vec<String> = (1..=first_logon_commands().len())
            .map(|i| i.to_string())
            .collect();
        assert_eq!(
            orders,
            expected.iter().map(String::as_str).collect::<Vec<_>>()
        );
        let cmds = texts(&v, "SynchronousCommand/CommandLine");
        assert!(
            cmds.iter().any(|c| c.contains("localport=5985")),
            "firewall rule: {cmds:?}"
        );
        assert!(cmds.iter().any(|c| c.contains("winrm quickconfig")));
        assert!(cmds
            .iter()
            .any(|c| c.contains(READY_LINE) && c.contains("COM1")));
        assert!(
            cmds.iter().any(|c| c.contains("DefaultPassword")),
            "auto-logon password removed"
        );
        // Unattend's limit for a CommandLine.
        assert!(cmds.iter().all(|c| c.len() <= 1024));
        assert!(!xml.contains("@@"), "every placeholder filled");
    }

    #[test]
    fn unattend_escapes_hostile_values() {
        let xml = unattend_xml("a<b&c\"d'e>", "us</Name><x>", "p<&>'\"w");
        let v = parse(&xml);
        assert_eq!(
            texts(&v, "settings/component/ComputerName"),
            ["a<b&c\"d'e>"]
        );
        assert_eq!(texts(&v, "LocalAccount/Name"), ["us</Name><x>"]);
        assert_eq!(
            decode_password(
                texts(&v, "AdministratorPassword/Value")[0],
                "AdministratorPassword"
            ),
            "p<&>'\"w"
        );
    }

    #[test]
    fn passwords_are_random_and_complex() {
        let a = random_password().unwrap();
        let b = random_password().unwrap();
        assert_ne!(a.expose(), b.expose());
        for p in [a.expose(), b.expose()] {
            assert_eq!(p.len(), 24);
            assert!(p.chars().any(|c| c.is_ascii_uppercase()), "{p}");
            assert!(p.chars().any(|c| c.is_ascii_lowercase()), "{p}");
            assert!(p.chars().any(|c| c.is_ascii_digit()), "{p}");
            assert!(p.chars().any(|c| "-_.!+=".contains(c)), "{p}");
        }
        assert_eq!(format!("{a:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn computer_names_fit_netbios() {
        assert_eq!(computer_name("3f9a0c1d"), "kiln-3f9a0c1d");
        assert!(computer_name("0123456789abcdef0123").len() <= 15);
        assert_eq!(computer_name("dry-run!"), "kiln-dryrun");
    }

    /// Splits a PowerShell line into bare words and single-quoted literals (doubled quotes
    /// inside), the way PowerShell's tokenizer reads them. Panics on an unterminated literal.
    fn ps_tokens(line: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if c.is_whitespace() {
                continue;
            }
            if c == '\'' {
                let mut lit = String::from("'");
                loop {
                    match chars.next().expect("unterminated literal") {
                        '\'' if chars.peek() == Some(&'\'') => {
                            chars.next();
                            lit.push('\'');
                        }
                        '\'' => break,
                        ch => lit.push(ch),
                    }
                }
                out.push(lit);
            } else {
                let mut w = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_whitespace() || n == '\'' {
                        break;
                    }
                    w.push(n);
                    chars.next();
                }
                out.push(w);
            }
        }
        out
    }

    #[test]
    fn elevated_invocation_quotes_every_argument() {
        let evil = "x'; Remove-Item C:\\ -Recurse; '";
        let s = elevated_invocation(
            r"C:\Windows\Temp\kiln-elevated.ps1",
            r"C:\Windows\Temp\a b'c.ps1",
            Elevation::BuildUser,
            "pack'er",
            evil,
        );
        let first = s.lines().next().unwrap();
        let t = ps_tokens(first);
        assert_eq!(
            t,
            [
                "&",
                r"'C:\Windows\Temp\kiln-elevated.ps1",
                "-ScriptPath",
                r"'C:\Windows\Temp\a b'c.ps1",
                "-User",
                "'pack'er",
                "-Password",
                &format!("'{evil}"),
            ]
        );
        assert_eq!(s.lines().nth(1), Some("exit $LASTEXITCODE"));
        let sys = elevated_invocation("r.ps1", "s.ps1", Elevation::System, "packer", "secret");
        assert!(
            sys.contains("-AsSystem") && !sys.contains("secret"),
            "{sys}"
        );
    }

    #[test]
    fn a_round_exiting_102_names_the_updates_its_script_printed() {
        let out = "kiln-wu: installing 1 update(s)\r\nkiln-wu: result 4 (HRESULT 0x80070643): Broken (KB9)\r\nkiln-wu: failed in two rounds, stopping: Broken (KB9); Other (KB8)\r\n";
        assert_eq!(
            failed_twice(out).as_deref(),
            Some("Broken (KB9); Other (KB8)")
        );
        assert_eq!(failed_twice("kiln-wu: a reboot is required\n"), None);
        assert!(
            WINDOWS_UPDATE.contains("'kiln-wu: failed in two rounds, stopping: '"),
            "the prefix failed_twice reads is the script's"
        );
    }

    #[test]
    fn windows_update_round_quotes_criteria_and_filters() {
        let s = windows_update_script(
            "IsInstalled=0 and Type='Software'",
            &[
                "exclude:$_.Title -like '*Preview*'".into(),
                "$_.BrowseOnly".into(),
            ],
            0,
        );
        let t = ps_tokens(s.lines().next().unwrap());
        assert!(
            t.contains(&"'IsInstalled=0 and Type='Software'".to_string()),
            "{t:?}"
        );
        assert!(
            t.iter()
                .any(|x| x.contains("'exclude:$_.Title -like '*Preview*'")),
            "{t:?}"
        );
        assert!(
            s.contains("'include:$_.BrowseOnly'"),
            "bare filters become include: {s}"
        );
        assert!(s.contains("-UpdateLimit 1000"), "0 means 1000: {s}");
        let d = windows_update_script("", &[], 5);
        assert!(
            d.contains("'BrowseOnly=0 and IsInstalled=0'")
                && d.contains("@('include:$true')")
                && d.contains("-UpdateLimit 5"),
            "{d}"
        );
        assert!(
            filter_has_action("Include: $true")
                && filter_has_action("exclude:$_.X")
                && !filter_has_action("$_.BrowseOnly")
                && !filter_has_action("$x -eq 'a:b'")
        );
    }

    #[test]
    fn restart_timeouts_parse_like_go_durations() {
        let d = |s: &str| parse_go_duration(s).map(|d| d.as_secs_f64());
        assert_eq!(d("5m"), Ok(300.0));
        assert_eq!(d("2h"), Ok(7200.0));
        assert_eq!(d("1h30m"), Ok(5400.0));
        assert_eq!(d("90s"), Ok(90.0));
        assert_eq!(d("1.5h"), Ok(5400.0));
        assert_eq!(d("500ms"), Ok(0.5));
        assert_eq!(d(""), Ok(300.0), "AIB's default");
        assert!(d("5").unwrap_err().contains("unit"));
        assert!(d("5x").unwrap_err().contains("unknown unit"));
        assert!(d("m").is_err());
        assert!(d("ten minutes").is_err());
    }

    #[test]
    fn valid_exit_codes() {
        let mut p = PowerShellScript {
            name: None,
            script_uri: None,
            sha256_checksum: String::new(),
            inline: vec![],
            run_elevated: false,
            run_as_system: false,
            valid_exit_codes: vec![],
        };
        assert_eq!(valid_codes(&p), [0]);
        assert!(exit_code_ok(0, &valid_codes(&p)));
        assert!(!exit_code_ok(1, &valid_codes(&p)));
        p.valid_exit_codes = vec![0, 3010, 2147942501];
        assert!(exit_code_ok(3010, &valid_codes(&p)));
        // WinRS reports 0x80070065 as a negative i32; the template writes it unsigned.
        assert!(exit_code_ok(2147942501u32 as i32, &valid_codes(&p)));
        assert!(!exit_code_ok(1, &valid_codes(&p)));
        p.valid_exit_codes = vec![-1];
        assert!(exit_code_ok(-1, &valid_codes(&p)));
    }

    #[test]
    fn elevation_and_script_wrapping() {
        let mut p = PowerShellScript {
            name: None,
            script_uri: None,
            sha256_checksum: String::new(),
            inline: vec![],
            run_elevated: false,
            run_as_system: false,
            valid_exit_codes: vec![],
        };
        assert_eq!(Elevation::of(&p), Elevation::None);
        p.run_elevated = true;
        assert_eq!(Elevation::of(&p), Elevation::BuildUser);
        p.run_as_system = true;
        assert_eq!(Elevation::of(&p), Elevation::System);
        let f = powershell_file("Write-Output 'a'\nexit 3\n");
        assert_eq!(f, "$ProgressPreference = 'SilentlyContinue'\nWrite-Output 'a'\nexit 3\nif ($LASTEXITCODE) { exit $LASTEXITCODE }\n");
        assert_eq!(
            direct_command(r"C:\Windows\Temp\k.ps1"),
            r#"powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -File "C:\Windows\Temp\k.ps1""#
        );
    }

    #[test]
    fn scripts_are_uploaded_as_utf8_with_a_bom() {
        assert_eq!(
            ps1_bytes("Write-Output 'ja: 日本語'"),
            [&b"\xEF\xBB\xBF"[..], "Write-Output 'ja: 日本語'".as_bytes()].concat()
        );
        // A script that already starts with a BOM does not get a second one.
        assert_eq!(ps1_bytes("\u{feff}x"), b"\xEF\xBB\xBFx");
    }

    #[test]
    fn fat_media_holds_the_answer_file() {
        use std::io::Read;
        let dir = std::env::temp_dir().join(format!("kiln-unattend-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("unattend.img");
        let xml = unattend_xml("kiln-x", "packer", "Pw-1aA");
        write_fat(&path, "UNATTEND", &[("Unattend.xml", xml.as_bytes())]).unwrap();
        let img = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(img, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim(), "UNATTEND");
        let mut back = String::new();
        fs.root_dir()
            .open_file("Unattend.xml")
            .unwrap()
            .read_to_string(&mut back)
            .unwrap();
        assert_eq!(back, xml);
        drop(fs);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn guest_scripts_keep_their_contracts() {
        // The engine relies on these parameters and exit codes; the scripts are real files.
        for p in [
            "$ScriptPath",
            "$User",
            "$Password",
            "[switch]$AsSystem",
            "LastTaskResult",
            "267009",
            "RunLevel = 1",
        ] {
            assert!(ELEVATED_RUNNER.contains(p), "kiln-elevated.ps1 lacks {p}");
        }
        for p in [
            "$SearchCriteria",
            "$Filters",
            "$UpdateLimit",
            "exit 101",
            "exit 102",
            "Microsoft.Update.Session",
            "TiWorker",
        ] {
            assert!(
                WINDOWS_UPDATE.contains(p),
                "kiln-windows-update.ps1 lacks {p}"
            );
        }
        for p in [
            DEPROVISION_OVERRIDE,
            "RdAgent",
            "WindowsAzureGuestAgent",
            "is not installed",
            "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE",
            "$ImageStateMinutes",
            "/generalize",
        ] {
            assert!(SYSPREP.contains(p), "kiln-sysprep.ps1 lacks {p}");
        }
    }
}
