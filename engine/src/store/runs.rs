//! Runs and their runOutputs in the store; crash recovery of runs whose kiln process died.

use super::{ids, RunOutputRow, RunRow, Store, StoreError};
use rusqlite::{params, OptionalExtension};
use std::path::{Path, PathBuf};

const RUN_COLS: &str = "id, template_key, run_state, run_sub_state, message, start_time, end_time, pid, pid_start, run_dir, exact_version";

fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        id: r.get(0)?,
        template_key: r.get(1)?,
        run_state: r.get(2)?,
        run_sub_state: r.get(3)?,
        message: r.get(4)?,
        start_time: r.get(5)?,
        end_time: r.get(6)?,
        pid: r.get(7)?,
        pid_start: r.get(8)?,
        run_dir: PathBuf::from(r.get::<_, String>(9)?),
        exact_version: r.get(10)?,
    })
}

/// The start time of a process (field 22 of /proc/PID/stat, clock ticks since boot), to tell a
/// live owner from a reused PID.
pub fn process_start(pid: i64) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process that owns a run is still alive (same PID, same start time).
pub fn owner_alive(pid: Option<i64>, pid_start: Option<i64>) -> bool {
    match pid {
        None => false,
        Some(p) => match process_start(p) {
            None => false,
            Some(s) => pid_start.is_none_or(|want| want == s),
        },
    }
}

impl Store {
    /// Starts a run: fails with AIB's conflict when another run of the template is in progress
    /// (checked and inserted in one transaction).
    pub fn insert_run(
        &self,
        template_id: &str,
        run_id: &str,
        run_dir: &Path,
        pid: i64,
    ) -> Result<RunRow, StoreError> {
        let key = ids::key(template_id);
        let conn = self.conn();
        let db = |source| StoreError::Db {
            path: self.home().join("kiln.db"),
            source,
        };
        conn.execute_batch("BEGIN IMMEDIATE").map_err(db)?;
        let busy: Option<String> = match conn
            .query_row("SELECT id FROM runs WHERE template_key=?1 AND run_state IN ('Running','Canceling')", params![key], |r| r.get(0))
            .optional()
        {
            Ok(b) => b,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(db(e));
            }
        };
        if let Some(other) = busy {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(StoreError::Conflict {
                code: "Conflict",
                message: format!(
                    "Run is already in progress for image template {template_id} (run {other}). Wait for it to finish, or cancel it with `kiln template cancel`."
                ),
            });
        }
        let r = conn.execute(
            &format!("INSERT INTO runs({RUN_COLS}) VALUES (?1,?2,'Running','Queued','',?3,NULL,?4,?5,?6,NULL)"),
            params![run_id, key, crate::build::time::now_rfc3339(), pid, process_start(pid), run_dir.display().to_string()],
        );
        if let Err(e) = r {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(db(e));
        }
        conn.execute_batch("COMMIT").map_err(db)?;
        self.run(run_id)?.ok_or_else(|| StoreError::NotFound {
            code: "ResourceNotFound",
            message: format!("run {run_id}"),
        })
    }

    /// A run by id.
    pub fn run(&self, run_id: &str) -> Result<Option<RunRow>, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {RUN_COLS} FROM runs WHERE id=?1"),
                params![run_id],
                run_from_row,
            )
            .optional()
            .map_err(|source| StoreError::Db {
                path: self.home().join("kiln.db"),
                source,
            })
    }

    /// The runs of a template, newest first.
    pub fn runs_of(&self, template_id: &str) -> Result<Vec<RunRow>, StoreError> {
        let db = |source| StoreError::Db {
            path: self.home().join("kiln.db"),
            source,
        };
        let mut st = self.conn().prepare(&format!("SELECT {RUN_COLS} FROM runs WHERE template_key=?1 ORDER BY start_time DESC, rowid DESC")).map_err(db)?;
        let rows = st
            .query_map(params![ids::key(template_id)], run_from_row)
            .map_err(db)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db)
    }

    /// Every run still marked in progress.
    pub fn active_runs(&self) -> Result<Vec<RunRow>, StoreError> {
        let db = |source| StoreError::Db {
            path: self.home().join("kiln.db"),
            source,
        };
        let mut st = self
            .conn()
            .prepare(&format!(
                "SELECT {RUN_COLS} FROM runs WHERE run_state IN ('Running','Canceling')"
            ))
            .map_err(db)?;
        let rows = st.query_map([], run_from_row).map_err(db)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db)
    }

    /// Sets the owning process (the detached worker, once it runs).
    pub fn set_run_owner(&self, run_id: &str, pid: i64) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE runs SET pid=?2, pid_start=?3 WHERE id=?1",
                params![run_id, pid, process_start(pid)],
            )
            .map(|_| ())
            .map_err(|source| StoreError::Db {
                path: self.home().join("kiln.db"),
                source,
            })
    }

    /// Updates runSubState (and the message) of a run in progress.
    pub fn set_run_sub_state(&self, run_id: &str, sub_state: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("UPDATE runs SET run_sub_state=?2 WHERE id=?1 AND run_state IN ('Running','Canceling')", params![run_id, sub_state])
            .map(|_| ())
            .map_err(|source| StoreError::Db { path: self.home().join("kiln.db"), source })
    }

    /// Records the source's exactVersion.
    pub fn set_run_exact_version(&self, run_id: &str, exact: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE runs SET exact_version=?2 WHERE id=?1",
                params![run_id, exact],
            )
            .map(|_| ())
            .map_err(|source| StoreError::Db {
                path: self.home().join("kiln.db"),
                source,
            })
    }

    /// Marks a run Canceling (only while Running). Returns whether it was.
    pub fn set_run_canceling(&self, run_id: &str) -> Result<bool, StoreError> {
        self.conn()
            .execute(
                "UPDATE runs SET run_state='Canceling' WHERE id=?1 AND run_state='Running'",
                params![run_id],
            )
            .map(|n| n == 1)
            .map_err(|source| StoreError::Db {
                path: self.home().join("kiln.db"),
                source,
            })
    }

    /// Ends a run (only once: a finished run is never rewritten).
    pub fn finish_run(
        &self,
        run_id: &str,
        run_state: &str,
        message: &str,
    ) -> Result<bool, StoreError> {
        self.conn()
            .execute(
                "UPDATE runs SET run_state=?2, message=?3, end_time=?4 WHERE id=?1 AND run_state IN ('Running','Canceling')",
                params![run_id, run_state, message, crate::build::time::now_rfc3339()],
            )
            .map(|n| n == 1)
            .map_err(|source| StoreError::Db { path: self.home().join("kiln.db"), source })
    }

    /// Records a runOutput.
    pub fn put_run_output(&self, run_id: &str, o: &RunOutputRow) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO run_outputs(run_id, name, artifact_id, artifact_uri, provisioning_state) VALUES (?1,?2,?3,?4,?5)",
                params![run_id, o.name, o.artifact_id, o.artifact_uri, o.provisioning_state],
            )
            .map(|_| ())
            .map_err(|source| StoreError::Db { path: self.home().join("kiln.db"), source })
    }

    /// The runOutputs of a run, in the order recorded.
    pub fn run_outputs(&self, run_id: &str) -> Result<Vec<RunOutputRow>, StoreError> {
        let db = |source| StoreError::Db {
            path: self.home().join("kiln.db"),
            source,
        };
        let mut st = self.conn().prepare("SELECT name, artifact_id, artifact_uri, provisioning_state FROM run_outputs WHERE run_id=?1 ORDER BY rowid").map_err(db)?;
        let rows = st
            .query_map(params![run_id], |r| {
                Ok(RunOutputRow {
                    name: r.get(0)?,
                    artifact_id: r.get(1)?,
                    artifact_uri: r.get(2)?,
                    provisioning_state: r.get(3)?,
                })
            })
            .map_err(db)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db)
    }

    /// Crash recovery: every run marked in progress whose owning process is gone is marked
    /// Failed, the QEMU processes that name its directory are killed, and its disks and partial
    /// artifacts are removed (logs stay). Returns what was recovered, for a notice on stderr.
    pub fn recover(&self) -> Result<Vec<Recovered>, StoreError> {
        let mut out = Vec::new();
        for run in self.active_runs()? {
            if owner_alive(run.pid, run.pid_start) {
                continue;
            }
            // A run being canceled whose owner died is Canceled (the user asked for it); any
            // other is Failed.
            let state = if run.run_state == "Canceling" {
                "Canceled"
            } else {
                "Failed"
            };
            let msg = format!(
                "the kiln process (pid {}) that owned this run ended without finishing it; marked {state} by kiln (pid {})",
                run.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                std::process::id()
            );
            if !self.finish_run(&run.id, state, &msg)? {
                continue; // someone else finished it meanwhile
            }
            let killed = kill_processes_naming(&run.run_dir);
            let removed = clean_run_files(&run.run_dir, &self.artifacts_dir(), &run.id);
            out.push(Recovered {
                run_id: run.id.clone(),
                template_key: run.template_key.clone(),
                killed,
                removed,
            });
        }
        Ok(out)
    }
}

/// What [`Store::recover`] did for one run.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// The run.
    pub run_id: String,
    /// Its template.
    pub template_key: String,
    /// PIDs of leftover processes killed.
    pub killed: Vec<i64>,
    /// Files removed.
    pub removed: Vec<PathBuf>,
}

/// Kills (SIGKILL) every process whose command line mentions `dir` (the run's QEMU: its disk,
/// seed and sockets live there). Returns their PIDs.
pub fn kill_processes_naming(dir: &Path) -> Vec<i64> {
    let needle = dir.display().to_string();
    let me = i64::from(std::process::id());
    let mut killed = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return killed;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i64>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if text.contains(&needle)
            && text.contains("qemu")
            && nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
        {
            killed.push(pid);
        }
    }
    killed
}

/// Removes a dead run's disks, keys and partial artifacts; keeps its logs.
pub fn clean_run_files(run_dir: &Path, artifacts: &Path, run_id: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    if let Ok(rd) = std::fs::read_dir(run_dir) {
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let keep = name.ends_with(".log")
                || name.ends_with(".jsonl")
                || name.ends_with(".stderr")
                || name == "runOutputs.json";
            if keep {
                continue;
            }
            let ok = if p.is_dir() {
                std::fs::remove_dir_all(&p).is_ok()
            } else {
                std::fs::remove_file(&p).is_ok()
            };
            if ok {
                removed.push(p);
            }
        }
    }
    // Partial publications carry the run id in their temporary names.
    let marker = format!(".partial-{run_id}");
    let mut stack = vec![artifacts.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p);
            } else if e.file_name().to_string_lossy().contains(&marker)
                && std::fs::remove_file(&p).is_ok()
            {
                removed.push(p);
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_run_at_a_time_and_recovery() {
        let d = std::env::temp_dir().join(format!("kiln-store-runs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let s = Store::open(&d).unwrap();
        let run_dir = d.join("staging/IT_rg_t_1/r1");
        std::fs::create_dir_all(&run_dir).unwrap();
        std::fs::write(run_dir.join("os.qcow2"), b"x").unwrap();
        std::fs::write(run_dir.join("customization.log"), b"log").unwrap();
        let me = i64::from(std::process::id());
        s.insert_run("/subscriptions/s/resourceGroups/rg/providers/Microsoft.VirtualMachineImages/imageTemplates/t", "r1", &run_dir, me).unwrap();
        let e = s.insert_run("/subscriptions/s/resourceGroups/RG/providers/Microsoft.VirtualMachineImages/imageTemplates/T", "r2", &run_dir, me).unwrap_err();
        assert_eq!(e.code(), "Conflict");
        // Owner alive: nothing to recover.
        assert!(s.recover().unwrap().is_empty());
        // A dead owner: a PID with another start time.
        s.conn()
            .execute("UPDATE runs SET pid_start=1 WHERE id='r1'", [])
            .unwrap();
        let rec = s.recover().unwrap();
        assert_eq!(rec.len(), 1);
        let r = s.run("r1").unwrap().unwrap();
        assert_eq!(r.run_state, "Failed");
        assert!(
            r.message.contains("ended without finishing"),
            "{}",
            r.message
        );
        assert!(!run_dir.join("os.qcow2").exists());
        assert!(run_dir.join("customization.log").exists());
        // Finished runs are never rewritten.
        assert!(!s.finish_run("r1", "Succeeded", "").unwrap());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn several_processes_worth_of_writers() {
        // Separate connections (as separate kiln processes have): one run wins per template, and
        // concurrent writers never see "database is locked".
        let d = std::env::temp_dir().join(format!("kiln-store-concurrent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Store::open(&d).unwrap();
        let me = i64::from(std::process::id());
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let d = d.clone();
                std::thread::spawn(move || {
                    let s = Store::open(&d).unwrap();
                    s.create_group(
                        "sub",
                        &format!("rg{i}"),
                        "westus",
                        &serde_json::json!({}),
                        None,
                    )
                    .unwrap();
                    let t = super::super::ids::template_id("sub", "rg", "same");
                    s.insert_run(&t, &format!("run{i}"), &d.join(format!("r{i}")), me)
                        .is_ok()
                })
            })
            .collect();
        let wins = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|w| *w)
            .count();
        assert_eq!(wins, 1, "exactly one run per template at a time");
        assert_eq!(Store::open(&d).unwrap().groups("sub").unwrap().len(), 8);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_dead_canceling_run_ends_canceled() {
        let d = std::env::temp_dir().join(format!("kiln-store-canceling-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let s = Store::open(&d).unwrap();
        s.insert_run("/subscriptions/s/resourceGroups/rg/providers/Microsoft.VirtualMachineImages/imageTemplates/t", "c1", &d.join("c1"), i64::from(std::process::id())).unwrap();
        assert!(s.set_run_canceling("c1").unwrap());
        s.conn()
            .execute("UPDATE runs SET pid_start=1 WHERE id='c1'", [])
            .unwrap();
        s.recover().unwrap();
        assert_eq!(s.run("c1").unwrap().unwrap().run_state, "Canceled");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn process_start_reads_self() {
        assert!(process_start(i64::from(std::process::id())).is_some());
        assert!(owner_alive(Some(i64::from(std::process::id())), None));
        assert!(!owner_alive(None, None));
    }
}
