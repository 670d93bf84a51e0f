//! A minimal ISO 9660 writer with Joliet names: a flat image of a few small files, as
//! provisioning media need (`ovf-env.xml`, NoCloud's `meta-data`/`user-data`).
//!
//! Layout (2048-byte sectors): 16 empty sectors, the primary volume descriptor, the Joliet
//! supplementary descriptor (UCS-2, level 3), the terminator, four path tables (L and M, for
//! each tree), the two root directories, then the files. Both trees point at the same file
//! data. Level-1-style primary names (`OVF_ENV.XML;1`) are only a fallback: Linux, blkid and
//! isoinfo read the Joliet names (`ovf-env.xml`).

const SECTOR: usize = 2048;

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    /// A name that Joliet cannot hold.
    #[error(
        "ISO 9660: bad file name `{0}` (1-64 characters, no `/`, `\\`, `:`, `;`, `*`, `?`, NUL)"
    )]
    BadName(String),
    /// Two files with the same name.
    #[error("ISO 9660: two files named `{0}`")]
    Duplicate(String),
    /// Writing failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The image.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// One file in the image's root directory.
#[derive(Debug, Clone)]
pub struct IsoFile {
    /// Its (Joliet) name.
    pub name: String,
    /// Its content.
    pub data: Vec<u8>,
}

fn both16(v: u16) -> [u8; 4] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], b[0], b[1]]
}

fn both32(v: u32) -> [u8; 8] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], l[2], l[3], b[0], b[1], b[2], b[3]]
}

/// (year, month, day, hour, minute, second) in UTC from Unix seconds.
fn civil(secs: u64) -> (u32, u32, u32, u32, u32, u32) {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's days_from_civil inverse
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as u32;
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

fn dir_date(secs: u64) -> [u8; 7] {
    let (y, mo, d, h, mi, s) = civil(secs);
    [
        (y.saturating_sub(1900)).min(255) as u8,
        mo as u8,
        d as u8,
        h as u8,
        mi as u8,
        s as u8,
        0,
    ]
}

fn volume_date(secs: u64) -> [u8; 17] {
    let (y, mo, d, h, mi, s) = civil(secs);
    let text = format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}00");
    let mut out = [0u8; 17];
    out[..16].copy_from_slice(text.as_bytes());
    out
}

fn dir_record(id: &[u8], lba: u32, len: u32, is_dir: bool, secs: u64) -> Vec<u8> {
    let mut r = vec![0u8; 33];
    r[2..10].copy_from_slice(&both32(lba));
    r[10..18].copy_from_slice(&both32(len));
    r[18..25].copy_from_slice(&dir_date(secs));
    r[25] = if is_dir { 2 } else { 0 };
    r[28..32].copy_from_slice(&both16(1));
    r[32] = id.len() as u8;
    r.extend_from_slice(id);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r[0] = r.len() as u8;
    r
}

/// Lays `records` out in sectors (a record never crosses a sector boundary).
fn directory(records: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        let used = out.len() % SECTOR;
        if used + r.len() > SECTOR {
            out.resize(out.len() + SECTOR - used, 0);
        }
        out.extend_from_slice(r);
    }
    out.resize(out.len().div_ceil(SECTOR).max(1) * SECTOR, 0);
    out
}

fn primary_name(name: &str) -> String {
    let up: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else if c == '.' {
                '.'
            } else {
                '_'
            }
        })
        .collect();
    let (stem, ext) = match up.rsplit_once('.') {
        Some((s, e)) => (s.replace('.', "_"), e.to_string()),
        None => (up.clone(), String::new()),
    };
    let stem: String = stem.chars().take(8).collect();
    let ext: String = ext.chars().take(3).collect();
    format!("{}.{ext}", if stem.is_empty() { "_" } else { &stem })
}

fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_be_bytes()).collect()
}

fn padded(field: &mut [u8], text: &[u8], pad: &[u8]) {
    for (i, b) in field.iter_mut().enumerate() {
        *b = if i < text.len() {
            text[i]
        } else {
            pad[(i - text.len()) % pad.len()]
        };
    }
}

/// Builds the image: `label` (up to 16 characters; blkid's LABEL), `files` in the root.
pub fn build(label: &str, files: &[IsoFile], secs: u64) -> Result<Vec<u8>, IsoError> {
    let mut seen = std::collections::BTreeSet::new();
    for f in files {
        let n = &f.name;
        if n.is_empty()
            || n.chars().count() > 64
            || n.chars()
                .any(|c| matches!(c, '/' | '\\' | ':' | ';' | '*' | '?' | '\0') || c.is_control())
            || n == "."
            || n == ".."
        {
            return Err(IsoError::BadName(n.clone()));
        }
        if !seen.insert(n.clone()) {
            return Err(IsoError::Duplicate(n.clone()));
        }
    }
    // primary names, made unique
    let mut prim: Vec<String> = Vec::new();
    for f in files {
        let mut p = primary_name(&f.name);
        let mut i = 1;
        while prim.contains(&p) {
            let (s, e) = p.rsplit_once('.').unwrap_or((&p, ""));
            p = format!("{}{i}.{e}", &s[..s.len().min(6)]);
            i += 1;
        }
        prim.push(p);
    }
    // sectors: 16 system, 16 PVD, 17 SVD, 18 terminator, 19-22 path tables, then directories
    let n_files = files.len();
    let dir_records_size = |ids: &[Vec<u8>]| {
        directory(
            &ids.iter()
                .map(|id| dir_record(id, 0, 0, false, 0))
                .collect::<Vec<_>>(),
        )
        .len()
    };
    let prim_ids: Vec<Vec<u8>> = [vec![0u8], vec![1u8]]
        .into_iter()
        .chain(prim.iter().map(|p| format!("{p};1").into_bytes()))
        .collect();
    let jol_ids: Vec<Vec<u8>> = [vec![0u8], vec![1u8]]
        .into_iter()
        .chain(files.iter().map(|f| ucs2(&f.name)))
        .collect();
    let prim_dir_len = dir_records_size(&prim_ids);
    let jol_dir_len = dir_records_size(&jol_ids);
    let prim_dir_lba = 23u32;
    let jol_dir_lba = prim_dir_lba + (prim_dir_len / SECTOR) as u32;
    let mut next = jol_dir_lba + (jol_dir_len / SECTOR) as u32;
    let mut file_lba = Vec::with_capacity(n_files);
    for f in files {
        file_lba.push(next);
        next += f.data.len().div_ceil(SECTOR).max(1) as u32;
    }
    let total = next;

    let make_dir = |lba: u32, len: usize, ids: &[Vec<u8>], joliet: bool| {
        let mut entries: Vec<(Vec<u8>, usize)> = ids[2..].iter().cloned().zip(0..n_files).collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let _ = joliet;
        let mut recs = vec![
            dir_record(&[0], lba, len as u32, true, secs),
            dir_record(&[1], lba, len as u32, true, secs),
        ];
        for (id, i) in entries {
            recs.push(dir_record(
                &id,
                file_lba[i],
                files[i].data.len() as u32,
                false,
                secs,
            ));
        }
        directory(&recs)
    };
    let prim_dir = make_dir(prim_dir_lba, prim_dir_len, &prim_ids, false);
    let jol_dir = make_dir(jol_dir_lba, jol_dir_len, &jol_ids, true);

    let path_table = |lba: u32, big_endian: bool| {
        let mut t = vec![1u8, 0];
        t.extend_from_slice(&if big_endian {
            lba.to_be_bytes()
        } else {
            lba.to_le_bytes()
        });
        t.extend_from_slice(&if big_endian {
            1u16.to_be_bytes()
        } else {
            1u16.to_le_bytes()
        });
        t.extend_from_slice(&[0, 0]);
        t
    };

    let descriptor = |joliet: bool| {
        let mut d = vec![0u8; SECTOR];
        d[0] = if joliet { 2 } else { 1 };
        d[1..6].copy_from_slice(b"CD001");
        d[6] = 1;
        let (space, spaces_ucs): (&[u8], &[u8]) = (b" ", &[0, 0x20]);
        let text = |s: &str| {
            if joliet {
                ucs2(s)
            } else {
                s.as_bytes().to_vec()
            }
        };
        let pad = if joliet { spaces_ucs } else { space };
        padded(&mut d[8..40], &text("LINUX"), pad);
        let label: String = label.chars().take(if joliet { 16 } else { 32 }).collect();
        padded(&mut d[40..72], &text(&label), pad);
        d[80..88].copy_from_slice(&both32(total));
        if joliet {
            d[88..91].copy_from_slice(b"%/E");
        }
        d[120..124].copy_from_slice(&both16(1));
        d[124..128].copy_from_slice(&both16(1));
        d[128..132].copy_from_slice(&both16(SECTOR as u16));
        d[132..140].copy_from_slice(&both32(10));
        let (l, m) = if joliet { (21u32, 22u32) } else { (19, 20) };
        d[140..144].copy_from_slice(&l.to_le_bytes());
        d[148..152].copy_from_slice(&m.to_be_bytes());
        let (root_lba, root_len) = if joliet {
            (jol_dir_lba, jol_dir_len)
        } else {
            (prim_dir_lba, prim_dir_len)
        };
        d[156..190].copy_from_slice(&dir_record(&[0], root_lba, root_len as u32, true, secs));
        for (a, b) in [(190, 318), (318, 446), (446, 574), (574, 702)] {
            padded(&mut d[a..b], &[], pad);
        }
        padded(&mut d[574..702], &text("KILN"), pad);
        for (a, b) in [(702, 739), (739, 776), (776, 813)] {
            padded(&mut d[a..b], &[], pad);
        }
        let date = volume_date(secs);
        d[813..830].copy_from_slice(&date);
        d[830..847].copy_from_slice(&date);
        d[847..863].copy_from_slice(b"0000000000000000");
        d[864..880].copy_from_slice(b"0000000000000000");
        d[881] = 1;
        d
    };

    let mut img = vec![0u8; 16 * SECTOR];
    img.extend(descriptor(false));
    img.extend(descriptor(true));
    let mut term = vec![0u8; SECTOR];
    term[0] = 255;
    term[1..6].copy_from_slice(b"CD001");
    term[6] = 1;
    img.extend(term);
    for (lba, be) in [
        (prim_dir_lba, false),
        (prim_dir_lba, true),
        (jol_dir_lba, false),
        (jol_dir_lba, true),
    ] {
        let mut s = path_table(lba, be);
        s.resize(SECTOR, 0);
        img.extend(s);
    }
    img.extend(prim_dir);
    img.extend(jol_dir);
    for f in files {
        let mut d = f.data.clone();
        d.resize(f.data.len().div_ceil(SECTOR).max(1) * SECTOR, 0);
        img.extend(d);
    }
    debug_assert_eq!(img.len(), total as usize * SECTOR);
    Ok(img)
}

/// Writes the image to `path`.
pub fn write(path: &std::path::Path, label: &str, files: &[IsoFile]) -> Result<(), IsoError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let img = build(label, files, secs)?;
    std::fs::write(path, img).map_err(|source| IsoError::Io {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn files() -> Vec<IsoFile> {
        vec![
            IsoFile {
                name: "ovf-env.xml".into(),
                data: b"<Environment/>\n".to_vec(),
            },
            IsoFile {
                name: "meta-data".into(),
                data: b"instance-id: x\n".to_vec(),
            },
            IsoFile {
                name: "user-data".into(),
                data: vec![b'u'; 5000],
            },
            IsoFile {
                name: "empty".into(),
                data: vec![],
            },
        ]
    }

    #[test]
    fn structure() {
        let img = build("cidata", &files(), 1_700_000_000).unwrap();
        assert_eq!(img.len() % SECTOR, 0);
        assert_eq!(&img[16 * SECTOR + 1..16 * SECTOR + 6], b"CD001");
        assert_eq!(img[17 * SECTOR], 2);
        assert_eq!(&img[17 * SECTOR + 88..17 * SECTOR + 91], b"%/E");
        assert_eq!(img[18 * SECTOR], 255);
        assert_eq!(&img[16 * SECTOR + 40..16 * SECTOR + 46], b"cidata");
        let space = u32::from_le_bytes(img[16 * SECTOR + 80..16 * SECTOR + 84].try_into().unwrap());
        assert_eq!(space as usize * SECTOR, img.len());
        assert_eq!(civil(1_700_000_000), (2023, 11, 14, 22, 13, 20));
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(primary_name("ovf-env.xml"), "OVF_ENV.XML");
        assert_eq!(primary_name("meta-data"), "META_DAT.");
    }

    #[test]
    fn bad_names_are_refused() {
        for n in ["", "a/b", "a;1", ".", "x".repeat(65).as_str()] {
            assert!(
                matches!(
                    build(
                        "x",
                        &[IsoFile {
                            name: n.into(),
                            data: vec![]
                        }],
                        0
                    ),
                    Err(IsoError::BadName(_))
                ),
                "{n:?}"
            );
        }
        let twice = vec![
            IsoFile {
                name: "a".into(),
                data: vec![],
            },
            IsoFile {
                name: "a".into(),
                data: vec![],
            },
        ];
        assert!(matches!(build("x", &twice, 0), Err(IsoError::Duplicate(_))));
    }

    #[test]
    fn many_files_span_directory_sectors() {
        let many: Vec<IsoFile> = (0..120)
            .map(|i| IsoFile {
                name: format!("file-number-{i:03}.txt"),
                data: format!("{i}\n").into_bytes(),
            })
            .collect();
        let img = build("many", &many, 0).unwrap();
        if let Some(dir) = host_tool("isoinfo") {
            let p = std::env::temp_dir().join(format!("kiln-iso-many-{}.iso", std::process::id()));
            std::fs::write(&p, &img).unwrap();
            let out = Command::new(dir)
                .args(["-J", "-f", "-i"])
                .arg(&p)
                .output()
                .unwrap();
            let list = String::from_utf8_lossy(&out.stdout);
            assert_eq!(list.lines().count(), 120, "{list}");
            assert!(list.contains("/file-number-119.txt"));
            let _ = std::fs::remove_file(p);
        }
    }

    fn host_tool(name: &str) -> Option<std::path::PathBuf> {
        ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
            .iter()
            .map(|d| std::path::Path::new(d).join(name))
            .find(|p| p.exists())
    }

    /// Read back by the host's isoinfo and blkid (genisoimage and util-linux, installed by
    /// scripts/setup-host.sh) when they are there.
    #[test]
    fn host_tools_read_it() {
        let p = std::env::temp_dir().join(format!("kiln-iso-{}.iso", std::process::id()));
        write(&p, "cidata", &files()).unwrap();
        if let Some(isoinfo) = host_tool("isoinfo") {
            let out = Command::new(&isoinfo)
                .args(["-J", "-f", "-i"])
                .arg(&p)
                .output()
                .unwrap();
            let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect();
            names.sort();
            assert_eq!(
                names,
                ["/empty", "/meta-data", "/ovf-env.xml", "/user-data"]
            );
            let out = Command::new(&isoinfo)
                .args(["-J", "-x", "/user-data", "-i"])
                .arg(&p)
                .output()
                .unwrap();
            assert_eq!(out.stdout, vec![b'u'; 5000]);
            let out = Command::new(&isoinfo)
                .args(["-J", "-x", "/ovf-env.xml", "-i"])
                .arg(&p)
                .output()
                .unwrap();
            assert_eq!(out.stdout, b"<Environment/>\n");
            let out = Command::new(&isoinfo)
                .args(["-d", "-i"])
                .arg(&p)
                .output()
                .unwrap();
            let d = String::from_utf8_lossy(&out.stdout);
            assert!(
                d.contains("Volume id: cidata") && d.contains("Joliet with UCS level 3 found"),
                "{d}"
            );
            let out = Command::new(&isoinfo)
                .args(["-f", "-i"])
                .arg(&p)
                .output()
                .unwrap();
            assert!(String::from_utf8_lossy(&out.stdout).contains("/OVF_ENV.XML;1"));
        }
        if let Some(blkid) = host_tool("blkid") {
            let out = Command::new(blkid)
                .args(["-p", "-o", "export"])
                .arg(&p)
                .output()
                .unwrap();
            let o = String::from_utf8_lossy(&out.stdout);
            assert!(
                o.contains("TYPE=iso9660") && o.contains("LABEL=cidata"),
                "{o}"
            );
        }
        let _ = std::fs::remove_file(p);
    }
}
