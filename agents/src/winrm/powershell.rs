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
    fn quoting() {
        assert_eq!(quote("C:\\a b\\it's"), "'C:\\a b\\it''s'");
        assert_eq!(quote("\u{2019}"), "'\u{2019}\u{2019}'");
    }
}
