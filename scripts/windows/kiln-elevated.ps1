# kiln's elevated runner: runs a PowerShell script file as a scheduled task, either as the build
# user with highest privileges (runElevated) or as SYSTEM (runAsSystem), streams the task's
# output back line by line while it runs, and exits with the task's exit code.
#
# Why a task: a WinRM logon is a network logon; some operations (Windows Update, some
# installers) refuse it. Packer's elevated runner does the same but loses output and can return
# 259 (STILL_ACTIVE) when it reads the result too early: this one waits until the task has
# really finished (state Ready and a LastTaskResult that is not "running") and reads the whole
# output file after the end, so nothing is lost or truncated.
#
# kiln uploads this file to C:\Windows\Temp and calls it with -EncodedCommand, so the password
# never appears on a command line kiln logs.
param(
    [Parameter(Mandatory = $true)][string]$ScriptPath,
    [string]$User = '',
    [string]$Password = '',
    [switch]$AsSystem,
    [int]$TimeoutMinutes = 0
)
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'

$name = 'kiln-' + [guid]::NewGuid().ToString('N')
$out = Join-Path $env:SystemRoot ('Temp\' + $name + '.out')
$cmd = 'powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -File "' + $ScriptPath + '" > "' + $out + '" 2>&1'

$svc = New-Object -ComObject 'Schedule.Service'
$svc.Connect()
$folder = $svc.GetFolder('\')
$def = $svc.NewTask(0)
$def.Settings.ExecutionTimeLimit = 'PT0S'      # no limit: kiln bounds the step itself
$def.Settings.DisallowStartIfOnBatteries = $false
$def.Settings.StopIfGoingOnBatteries = $false
$def.Settings.Enabled = $true
$def.Principal.RunLevel = 1                    # TASK_RUNLEVEL_HIGHEST
$action = $def.Actions.Create(0)               # TASK_ACTION_EXEC
$action.Path = 'cmd.exe'
$action.Arguments = '/c ' + $cmd
$action.WorkingDirectory = Join-Path $env:SystemRoot 'Temp'
if ($AsSystem) {
    # TASK_LOGON_SERVICE_ACCOUNT
    $task = $folder.RegisterTaskDefinition($name, $def, 6, 'SYSTEM', $null, 5)
} else {
    # TASK_LOGON_PASSWORD
    $task = $folder.RegisterTaskDefinition($name, $def, 6, $User, $Password, 1)
}
$Password = $null

$started = Get-Date
$pos = 0
function Read-New {
    if (-not (Test-Path -LiteralPath $out)) { return }
    try {
        $fs = [IO.File]::Open($out, 'Open', 'Read', 'ReadWrite')
        try {
            if ($fs.Length -gt $script:pos) {
                $fs.Position = $script:pos
                $buf = New-Object byte[] ($fs.Length - $script:pos)
                $n = $fs.Read($buf, 0, $buf.Length)
                $script:pos += $n
                [Console]::Out.Write([Text.Encoding]::Default.GetString($buf, 0, $n))
                [Console]::Out.Flush()
            }
        } finally { $fs.Close() }
    } catch { }
}

$null = $task.Run($null)
$code = $null
try {
    while ($true) {
        Start-Sleep -Milliseconds 250
        Read-New
        $t = $folder.GetTask($name)
        # 3 = Ready (finished); 267009 = SCHED_S_TASK_RUNNING, 267011 = SCHED_S_TASK_HAS_NOT_RUN
        if ($t.State -eq 3 -and $t.LastTaskResult -ne 267009 -and $t.LastTaskResult -ne 267011) {
            $code = $t.LastTaskResult
            break
        }
        if ($TimeoutMinutes -gt 0 -and ((Get-Date) - $started).TotalMinutes -gt $TimeoutMinutes) {
            $null = $t.Stop(0)
            [Console]::Error.WriteLine("kiln-elevated: the task ran longer than $TimeoutMinutes minutes; stopped")
            $code = 1460   # ERROR_TIMEOUT
            break
        }
    }
    Start-Sleep -Milliseconds 500
    Read-New
} finally {
    try { $folder.DeleteTask($name, 0) } catch { }
    Remove-Item -LiteralPath $out -Force -ErrorAction SilentlyContinue
}
exit $code
