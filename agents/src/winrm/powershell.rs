//! PowerShell command lines for WinRS: `-EncodedCommand` (base64 of the UTF-16LE script), so no
//! quoting of the script itself is ever needed, and the scripts kiln's WinRM upload runs.

use base64::Engine as _;

/// base64 of the script's UTF-16LE bytes, what `powershell -EncodedCommand` takes.
pub fn encode_command(script: &str) -> String {
    let bytes: Vec<u8> = script.encode_utf16().flat_map(u16::to_le_bytes).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decode an `-EncodedCommand` argument back into the script (used by the test server).
pub fn decode_command(b64: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    if bytes.len() % 2 != 0 {
        return None;
    }
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).ok()
}

/// The WinRS command line that runs `script` in Windows PowerShell:
/// `powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand …`.
///
/// `$ProgressPreference = 'SilentlyContinue'` is prepended: progress records would otherwise
/// arrive on stderr as CLIXML.
pub fn command_line(script: &str) -> String {
    let full = format!("$ProgressPreference = 'SilentlyContinue'\n{script}");
    format!(
        "powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand {}",
        encode_command(&full)
    )
}

/// Quote `s` as a PowerShell single-quoted string literal (`'` doubled).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        // PowerShell also treats the typographic single quotes as quote characters.
        if matches!(c, '\'' | '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}') {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Characters that make a path unusable inside a double-quoted cmd.exe argument (`%` expands
/// variables even there; `"` ends the quote; a line break ends the command).
pub fn cmd_unsafe(path: &str) -> Option<char> {
    path.chars().find(|c| matches!(c, '"' | '%' | '\r' | '\n'))
}

/// Upload, step 1 (repeated): a cmd.exe line that writes (`first`) or appends one base64 line
/// to the temporary file, as Packer's winrmcp does: no PowerShell start per chunk, and base64
/// expands the data only 4/3 on the command line. The caller checks [`cmd_unsafe`] first.
pub fn upload_chunk_cmd(tmp: &str, b64: &str, first: bool) -> String {
    // The space before the redirection keeps a trailing digit of the base64 from being read
    // as a handle number (`…2>>file`); the decoder trims it.
    format!("echo {b64} {} \"{tmp}\"", if first { ">" } else { ">>" })
}

/// The body of [`upload_decode`] after its two assignments (also what the test server's shim
/// recognises).
pub const UPLOAD_DECODE_BODY: &str = "$o = [IO.File]::Create($d)
try { if (Test-Path -LiteralPath $t) { foreach ($l in [IO.File]::ReadLines($t)) { $l = $l.Trim(); if ($l) { $b = [Convert]::FromBase64String($l); $o.Write($b, 0, $b.Length) } } } } finally { $o.Close() }
if (Test-Path -LiteralPath $t) { Remove-Item -Force -LiteralPath $t }
$h = (Get-FileHash -Algorithm SHA256 -LiteralPath $d).Hash
Write-Output (\"{0} {1}\" -f (Get-Item -LiteralPath $d).Length, $h)";

/// Upload, step 2: decode the temporary file's base64 lines into `dest` (replacing it), delete
/// the temporary file, and print `<size> <SHA-256>`, which the client compares with what it sent.
pub fn upload_decode(tmp: &str, dest: &str) -> String {
    format!(
        "$ErrorActionPreference = 'Stop'\n$t = {}\n$d = {}\n{UPLOAD_DECODE_BODY}",
        quote(tmp),
        quote(dest)
    )
}

/// The body of [`pull_file`] after its five assignments (also what the test server's shim
/// recognises): WebClient (no proxy: the endpoint is on the VM's own user network) downloads
/// `$u` to `$t` (removed again if the download breaks off); size and SHA-256 are compared with the host's (`$s`, `$x`) before the file is
/// moved onto `$d`; a mismatch deletes `$t`, says so on stderr and exits 4. Prints
/// `<size> <SHA-256>` either way.
pub const PULL_BODY: &str = "$w = New-Object System.Net.WebClient
$w.Proxy = $null
try { $w.DownloadFile($u, $t) } catch { if (Test-Path -LiteralPath $t) { Remove-Item -Force -LiteralPath $t }; throw } finally { $w.Dispose() }
$n = (Get-Item -LiteralPath $t).Length
$h = (Get-FileHash -Algorithm SHA256 -LiteralPath $t).Hash
if ($n -ne $s -or $h -ne $x) { Remove-Item -Force -LiteralPath $t; [Console]::Error.WriteLine(('kiln: {0}: received {1} bytes with SHA-256 {2}; the host sent {3} bytes with SHA-256 {4}' -f $d, $n, $h, $s, $x)); Write-Output (\"{0} {1}\" -f $n, $h); exit 4 }
if (Test-Path -LiteralPath $d) { Remove-Item -Force -LiteralPath $d }
[IO.File]::Move($t, $d)
Write-Output (\"{0} {1}\" -f $n, $h)";

/// File delivery without base64: the guest pulls `url` (kiln's per-build file endpoint) into
/// `tmp`, verifies `size` bytes with SHA-256 `sha256` (hex) and moves it onto `dest`; prints
/// `<size> <SHA-256>`. Paths are single-quoted literals; `sha256` is reduced to hex digits.
pub fn pull_file(url: &str, tmp: &str, dest: &str, size: u64, sha256: &str) -> String {
    let hex: String = sha256
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    format!(
        "$ErrorActionPreference = 'Stop'\n$u = {}\n$t = {}\n$d = {}\n$s = {size}\n$x = '{hex}'\n{PULL_BODY}",
        quote(url),
        quote(tmp),
        quote(dest)
    )
}

/// Download: print the file as base64 (one line).
pub fn download(src: &str) -> String {
    format!(
        "$ErrorActionPreference = 'Stop'\n[Convert]::ToBase64String([IO.File]::ReadAllBytes({}))",
        quote(src)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_command_matches_pywinrm() {
        // pywinrm's run_ps_request: `Write-Error "Error"`.
        assert_eq!(
            encode_command(r#"Write-Error "Error""#),
            "VwByAGkAdABlAC0ARQByAHIAbwByACAAIgBFAHIAcgBvAHIAIgA="
        );
        assert_eq!(
            decode_command("VwByAGkAdABlAC0ARQByAHIAbwByACAAIgBFAHIAcgBvAHIAIgA=").as_deref(),
            Some(r#"Write-Error "Error""#)
        );
        let s = "é ünïcode \u{1F600}";
        assert_eq!(decode_command(&encode_command(s)).as_deref(), Some(s));
    }

    #[test]
    fn pull_script_quotes_every_value() {
        let s = pull_file(
            "http://10.0.2.100/f/ab'cd",
            "C:\\My Files\\it's \"x\" $(boom).kiln-pull",
            "C:\\My Files\\it's \"x\" $(boom)",
            1234,
            "ab12'; rm -rf /",
        );
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "$ErrorActionPreference = 'Stop'");
        assert_eq!(lines[1], "$u = 'http://10.0.2.100/f/ab''cd'");
        // single quotes doubled; `"`, `$(…)` and spaces stay literal inside '…'
        assert_eq!(
            lines[2],
            "$t = 'C:\\My Files\\it''s \"x\" $(boom).kiln-pull'"
        );
        assert_eq!(lines[3], "$d = 'C:\\My Files\\it''s \"x\" $(boom)'");
        assert_eq!(lines[4], "$s = 1234");
        // only hex digits survive in the checksum
        assert_eq!(lines[5], "$x = 'AB12F'");
        assert_eq!(lines[6..].join("\n"), PULL_BODY);
        // the body refers to the variables only, never to interpolated text
        for v in ["$u", "$t", "$d", "$s", "$x"] {
            assert!(PULL_BODY.contains(v), "{v}");
        }
        // the whole script survives -EncodedCommand
        assert_eq!(
            decode_command(&encode_command(&s)).as_deref(),
            Some(s.as_str())
        );
        // typographic quotes are PowerShell quotes too
        assert!(pull_file("u", "t", "C:\\a\u{2019}b", 0, "").contains("'C:\\a\u{2019}\u{2019}b'"));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("C:\\a b\\it's"), "'C:\\a b\\it''s'");
        assert_eq!(quote("\u{2019}"), "'\u{2019}\u{2019}'");
    }
}
