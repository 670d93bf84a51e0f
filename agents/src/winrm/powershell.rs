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

/// Upload, step 1: create (or truncate) the temporary file the chunks are appended to.
pub fn upload_begin(tmp: &str) -> String {
    format!(
        "$ErrorActionPreference = 'Stop'\n[IO.File]::WriteAllBytes({}, [byte[]]@())",
        quote(tmp)
    )
}

/// Upload, step 2 (repeated): append one base64 chunk to the temporary file.
pub fn upload_chunk(tmp: &str, b64: &str) -> String {
    format!(
        "$ErrorActionPreference = 'Stop'\n$b = [Convert]::FromBase64String('{b64}')\n$f = [IO.File]::Open({}, 'Append', 'Write')\ntry {{ $f.Write($b, 0, $b.Length) }} finally {{ $f.Close() }}",
        quote(tmp)
    )
}

/// Upload, step 3: move the temporary file into place and print its size and SHA-256
/// (`<bytes> <hex>`), which the client compares with what it sent.
pub fn upload_finish(tmp: &str, dest: &str) -> String {
    format!(
        "$ErrorActionPreference = 'Stop'\nMove-Item -Force -LiteralPath {} -Destination {}\n$i = Get-Item -LiteralPath {}\n$h = (Get-FileHash -Algorithm SHA256 -LiteralPath {}).Hash\nWrite-Output (\"{{0}} {{1}}\" -f $i.Length, $h)",
        quote(tmp),
        quote(dest),
        quote(dest),
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
