//! `cargo xtask windows-e2e --image WIN.vhd [--template F] [--generation V1|V2] [--dry-run]
//! [--keep]`: a Windows build end to end on a KVM host with a real, generalized Windows image.
//!
//! 1. checks the arguments and the template (a Windows template: PowerShell customizers, no
//!    Shell; a PlatformImage source naming publisher/offer/sku);
//! 2. builds kiln (debug) and makes a temporary `KILN_HOME`;
//! 3. `kiln image import --os-type Windows --provisioning unattend` of the image under the
//!    template's publisher/offer/sku (version `1.0.0` for `latest`);
//! 4. `kiln build TEMPLATE --output json` there, reading its events;
//! 5. prints a report: every step with its result and seconds, the failure messages (a
//!    PowerShell step's exit code is in them), the run's state, and where the logs are.
//!
//! `--dry-run` stops after 2, printing the commands and kiln's own `--dry-run` plan of the build
//! instead. Nothing here can run without a Windows image: the checks, the dry run and the report
//! are tested on any host (`cargo test -p xtask --lib windows_e2e`).

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The documented template, relative to the repository root.
pub const DEFAULT_TEMPLATE: &str = "scripts/windows/e2e-template.json";

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// The Windows disk (VHD, VHDX, qcow2, raw).
    pub image: PathBuf,
    /// The template (default [`DEFAULT_TEMPLATE`]).
    pub template: PathBuf,
    /// V1 (BIOS) or V2 (UEFI).
    pub generation: String,
    /// Check and print the plan only.
    pub dry_run: bool,
    /// Keep the temporary KILN_HOME (the run's logs and the exported VHD).
    pub keep: bool,
}

/// The usage line.
pub const USAGE: &str = "cargo xtask windows-e2e --image WIN.vhd [--template F] [--generation V1|V2] [--dry-run] [--keep]";

/// Parses the task's arguments (`repo` resolves the default template).
pub fn parse(args: &[String], repo: &Path) -> Result<Args> {
    let (mut image, mut template, mut generation) = (None, None, "V1".to_string());
    let (mut dry_run, mut keep) = (false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value\nusage: {USAGE}"))
        };
        match a.as_str() {
            "--image" => image = Some(PathBuf::from(value("--image")?)),
            "--template" => template = Some(PathBuf::from(value("--template")?)),
            "--generation" => generation = value("--generation")?,
            "--dry-run" => dry_run = true,
            "--keep" => keep = true,
            other => bail!("unknown argument `{other}`\nusage: {USAGE}"),
        }
    }
    let image = image.with_context(|| format!("--image is required\nusage: {USAGE}"))?;
    if generation != "V1" && generation != "V2" {
        bail!("--generation must be V1 (BIOS) or V2 (UEFI), not `{generation}`");
    }
    Ok(Args {
        image,
        template: template.unwrap_or_else(|| repo.join(DEFAULT_TEMPLATE)),
        generation,
        dry_run,
        keep,
    })
}

/// The image's catalog entry, read from the template's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Publisher.
    pub publisher: String,
    /// Offer.
    pub offer: String,
    /// SKU.
    pub sku: String,
    /// Version to import as (`latest` → 1.0.0).
    pub version: String,
    /// The customizers, `type "name"`, in order.
    pub steps: Vec<String>,
}

/// Checks the image file and the template; returns what to import the image as.
pub fn check(args: &Args) -> Result<Source> {
    let meta = std::fs::metadata(&args.image)
        .with_context(|| format!("--image {}", args.image.display()))?;
    if !meta.is_file() {
        bail!("--image {}: not a file", args.image.display());
    }
    let ext = args
        .image
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if !["vhd", "vhdx", "qcow2", "raw", "img"].contains(&ext.as_str()) {
        bail!(
            "--image {}: expected a .vhd, .vhdx, .qcow2, .raw or .img disk",
            args.image.display()
        );
    }
    let t = &args.template;
    let text = std::fs::read_to_string(t).with_context(|| format!("reading {}", t.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not plain JSON (this task reads the source from it; `kiln validate` explains)",
            t.display()
        )
    })?;
    // a bare template or a REST body
    let p = v
        .get("properties")
        .or_else(|| v.pointer("/parameters/parameters/properties"))
        .with_context(|| format!("{}: no `properties`", t.display()))?;
    let src = &p["source"];
    if src["type"] != "PlatformImage" {
        bail!(
            "{}: the source must be a PlatformImage (this task imports --image under its publisher/offer/sku); found {}",
            t.display(),
            src["type"]
        );
    }
    let field = |k: &str| {
        src[k]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .with_context(|| format!("{}: properties.source.{k} is missing", t.display()))
    };
    let version = match field("version")?.as_str() {
        "latest" => "1.0.0".to_string(),
        v => v.to_string(),
    };
    let mut steps = Vec::new();
    let mut powershell = false;
    for (i, c) in p["customize"].as_array().into_iter().flatten().enumerate() {
        let ty = c["type"].as_str().unwrap_or("");
        if ty == "Shell" {
            bail!(
                "{}: properties.customize[{i}] is a Shell customizer: not a Windows template",
                t.display()
            );
        }
        powershell |= ty == "PowerShell";
        steps.push(format!("{ty} \"{}\"", c["name"].as_str().unwrap_or("")));
    }
    if !powershell {
        bail!(
            "{}: no PowerShell customizer: not a Windows template",
            t.display()
        );
    }
    Ok(Source {
        publisher: field("publisher")?,
        offer: field("offer")?,
        sku: field("sku")?,
        version,
        steps,
    })
}

/// The two kiln command lines (after `kiln`), as run with `KILN_HOME` set.
pub fn commands(args: &Args, s: &Source) -> Vec<Vec<String>> {
    vec![
        vec![
            "image".into(),
            "import".into(),
            "--publisher".into(),
            s.publisher.clone(),
            "--offer".into(),
            s.offer.clone(),
            "--sku".into(),
            s.sku.clone(),
            "--version".into(),
            s.version.clone(),
            "--os-type".into(),
            "Windows".into(),
            "--hyper-v-generation".into(),
            args.generation.clone(),
            "--provisioning".into(),
            "unattend".into(),
            args.image.display().to_string(),
        ],
        vec![
            "build".into(),
            args.template.display().to_string(),
            "--output".into(),
            "json".into(),
        ],
    ]
}

/// One step of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLine {
    /// The step.
    pub step: String,
    /// Its result.
    pub ok: bool,
    /// Seconds.
    pub seconds: f64,
    /// The error (a PowerShell step's exit code is in it).
    pub error: Option<String>,
}

/// A build's events (JSON lines) summarized.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Steps in order.
    pub steps: Vec<StepLine>,
    /// The run's directory (its logs).
    pub run_dir: Option<String>,
    /// AIB's runState.
    pub run_state: Option<String>,
    /// The final message.
    pub message: String,
    /// Total seconds.
    pub seconds: f64,
    /// Warnings (a WinRM fallback of File delivery shows here).
    pub warnings: Vec<String>,
}

/// Reads `kiln build --output json` events.
pub fn report(events: &str) -> Report {
    let mut r = Report::default();
    for v in events
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
        match v["event"].as_str().unwrap_or("") {
            "runStarted" => r.run_dir = Some(s("runDir")),
            "stepFinished" => r.steps.push(StepLine {
                step: s("step"),
                ok: v["ok"].as_bool().unwrap_or(false),
                seconds: v["seconds"].as_f64().unwrap_or(0.0),
                error: v["error"].as_str().map(str::to_string),
            }),
            "warning" => r.warnings.push(s("message")),
            "runFinished" => {
                r.run_state = Some(s("runState"));
                r.message = s("message");
                r.seconds = v["seconds"].as_f64().unwrap_or(0.0);
            }
            _ => {}
        }
    }
    r
}

/// The report as text.
pub fn render(r: &Report, exit: Option<i32>) -> String {
    use std::fmt::Write as _;
    let mut o = String::from("windows-e2e report\n");
    for s in &r.steps {
        let _ = writeln!(
            o,
            "  {:<6} {:>8.1}s  {}{}",
            if s.ok { "ok" } else { "FAILED" },
            s.seconds,
            s.step,
            s.error
                .as_ref()
                .map(|e| format!(
                    "\n                   {}",
                    e.replace('\n', "\n                   ")
                ))
                .unwrap_or_default()
        );
    }
    for w in &r.warnings {
        let _ = writeln!(o, "  warning: {w}");
    }
    let _ = writeln!(
        o,
        "  run: {} after {:.1}s{}; kiln exit code {}",
        r.run_state.as_deref().unwrap_or("(no runFinished event)"),
        r.seconds,
        if r.message.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.message)
        },
        exit.map(|c| c.to_string())
            .unwrap_or_else(|| "none (killed)".into())
    );
    if let Some(d) = &r.run_dir {
        let _ = writeln!(
            o,
            "  logs: {d}/customization.log, {d}/events.jsonl, {d}/console.log"
        );
    }
    o
}

fn kiln(repo: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(repo)
        .args(["build", "-q", "-p", "kiln-engine", "--bin", "kiln"])
        .status()
        .context("running cargo build")?;
    if !st.success() {
        bail!("cargo build of kiln failed ({st})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target"));
    Ok(target.join("debug").join("kiln"))
}

/// Runs the task.
pub fn run(args: &Args, repo: &Path) -> Result<()> {
    let source = check(args)?;
    let cmds = commands(args, &source);
    let kiln = kiln(repo)?;
    let home = std::env::temp_dir().join(format!("kiln-windows-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&home)?;
    let result = (|| -> Result<()> {
        eprintln!("windows-e2e: KILN_HOME={}", home.display());
        eprintln!(
            "windows-e2e: {} customizer(s): {}",
            source.steps.len(),
            source.steps.join(" → ")
        );
        if args.dry_run {
            for c in &cmds {
                println!("KILN_HOME={} kiln {}", home.display(), c.join(" "));
            }
            let out = Command::new(&kiln)
                .env("KILN_HOME", &home)
                .arg("build")
                .arg(&args.template)
                .arg("--dry-run")
                .output()
                .context("running kiln build --dry-run")?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            if !out.status.success() {
                bail!("kiln build --dry-run failed ({})", out.status);
            }
            return Ok(());
        }
        let st = Command::new(&kiln)
            .env("KILN_HOME", &home)
            .args(&cmds[0])
            .status()
            .context("running kiln image import")?;
        if !st.success() {
            bail!("kiln image import failed ({st})");
        }
        let out = Command::new(&kiln)
            .env("KILN_HOME", &home)
            .args(&cmds[1])
            .stderr(Stdio::inherit())
            .output()
            .context("running kiln build")?;
        let r = report(&String::from_utf8_lossy(&out.stdout));
        print!("{}", render(&r, out.status.code()));
        if !out.status.success() {
            bail!("the build failed ({})", out.status);
        }
        Ok(())
    })();
    if args.keep || (result.is_err() && !args.dry_run) {
        eprintln!("windows-e2e: kept {}", home.display());
    } else {
        let _ = std::fs::remove_dir_all(&home);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf()
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn image(dir: &Path, name: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, b"not really a disk").unwrap();
        p
    }

    #[test]
    fn arguments_are_checked() {
        let r = repo();
        let a = parse(&s(&["--image", "w.vhd", "--dry-run"]), &r).unwrap();
        assert_eq!(a.template, r.join(DEFAULT_TEMPLATE));
        assert!(a.dry_run && !a.keep && a.generation == "V1");
        let e = |v: &[&str]| parse(&s(v), &r).unwrap_err().to_string();
        assert!(e(&[]).contains("--image is required"));
        assert!(e(&["--image"]).contains("--image needs a value"));
        assert!(e(&["--image", "w.vhd", "--bogus"]).contains("unknown argument `--bogus`"));
        assert!(e(&["--image", "w.vhd", "--generation", "V3"]).contains("V1 (BIOS) or V2"));
    }

    #[test]
    fn the_documented_template_is_a_windows_template() {
        let dir = std::env::temp_dir().join(format!("xtask-win-e2e-{}", std::process::id()));
        let img = image(&dir, "win.vhd");
        let a = parse(
            &s(&["--image", img.to_str().unwrap(), "--generation", "V2"]),
            &repo(),
        )
        .unwrap();
        let src = check(&a).unwrap();
        assert_eq!(
            (
                src.publisher.as_str(),
                src.offer.as_str(),
                src.sku.as_str(),
                src.version.as_str()
            ),
            ("kiln-e2e", "windows", "e2e", "1.0.0")
        );
        let kinds: Vec<&str> = src
            .steps
            .iter()
            .map(|x| x.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "PowerShell",
                "PowerShell",
                "PowerShell",
                "File",
                "WindowsRestart",
                "PowerShell"
            ]
        );
        let c = commands(&a, &src);
        assert_eq!(c[0][..2], s(&["image", "import"])[..]);
        for w in ["Windows", "V2", "unattend", "kiln-e2e"] {
            assert!(c[0].iter().any(|x| x == w), "{w} in {:?}", c[0]);
        }
        assert_eq!(c[0].last().unwrap(), img.to_str().unwrap());
        assert_eq!(c[1][0], "build");
        // the File source sits next to the template, and its checksum matches
        let t: Value =
            serde_json::from_str(&std::fs::read_to_string(&a.template).unwrap()).unwrap();
        let f = &t["properties"]["customize"][3];
        let payload = std::fs::read(
            a.template
                .parent()
                .unwrap()
                .join(f["sourceUri"].as_str().unwrap()),
        )
        .unwrap();
        use sha2::Digest as _;
        let h: String = sha2::Sha256::digest(&payload)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(f["sha256Checksum"].as_str().unwrap(), h);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_images_and_templates_are_refused() {
        let dir = std::env::temp_dir().join(format!("xtask-win-e2e-bad-{}", std::process::id()));
        let img = image(&dir, "win.vhd");
        let txt = image(&dir, "win.txt");
        let r = repo();
        let args = |i: &Path, t: Option<&Path>| {
            let mut v = s(&["--image", i.to_str().unwrap()]);
            if let Some(t) = t {
                v.extend(s(&["--template", t.to_str().unwrap()]));
            }
            parse(&v, &r).unwrap()
        };
        let e = |a: Args| check(&a).unwrap_err().to_string();
        assert!(e(args(&dir.join("missing.vhd"), None)).contains("missing.vhd"));
        assert!(e(args(&txt, None)).contains("expected a .vhd"));
        let t = dir.join("t.json");
        let write = |v: &Value| std::fs::write(&t, serde_json::to_string(v).unwrap()).unwrap();
        write(
            &serde_json::json!({"properties": {"source": {"type": "PlatformImage", "publisher": "p", "offer": "o", "sku": "s", "version": "1.0.0"},
            "customize": [{"type": "Shell", "inline": ["true"]}]}}),
        );
        assert!(e(args(&img, Some(&t))).contains("not a Windows template"));
        write(
            &serde_json::json!({"properties": {"source": {"type": "ManagedImage", "imageId": "x"}}}),
        );
        assert!(e(args(&img, Some(&t))).contains("must be a PlatformImage"));
        write(
            &serde_json::json!({"properties": {"source": {"type": "PlatformImage", "publisher": "p", "offer": "o", "sku": "s", "version": "1.0.0"},
            "customize": [{"type": "File", "sourceUri": "a", "destination": "C:\\a"}]}}),
        );
        assert!(e(args(&img, Some(&t))).contains("no PowerShell customizer"));
        std::fs::write(&t, "{ // comment\n}").unwrap();
        assert!(e(args(&img, Some(&t))).contains("not plain JSON"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_report_lists_steps_failures_and_logs() {
        let events = [
            r#"{"event":"runStarted","runId":"r1","template":"kiln-windows-e2e","runDir":"/h/runs/r1"}"#,
            r#"{"event":"stepFinished","index":0,"step":"Start VM","ok":true,"seconds":3.4}"#,
            r#"{"event":"warning","message":"the guest did not reach kiln's file endpoint"}"#,
            r#"{"event":"stepFinished","index":1,"step":"Customize: PowerShell \"elevated\"","ok":false,"seconds":12.0,"error":"the script exited with 5; validExitCodes [0]"}"#,
            "not json",
            r#"{"event":"runFinished","runState":"Failed","message":"customizer failed","seconds":99.5}"#,
        ]
        .join("\n");
        let r = report(&events);
        assert_eq!(r.steps.len(), 2);
        assert_eq!(r.run_dir.as_deref(), Some("/h/runs/r1"));
        let text = render(&r, Some(1));
        assert!(text.contains("ok          3.4s  Start VM"), "{text}");
        assert!(text.contains("FAILED     12.0s  Customize: PowerShell \"elevated\"\n                   the script exited with 5"), "{text}");
        assert!(text.contains("warning: the guest did not reach"), "{text}");
        assert!(
            text.contains("run: Failed after 99.5s (customizer failed); kiln exit code 1"),
            "{text}"
        );
        assert!(
            text.contains("logs: /h/runs/r1/customization.log"),
            "{text}"
        );
    }
}
