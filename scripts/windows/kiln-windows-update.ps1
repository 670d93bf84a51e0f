# kiln's Windows Update round, run as SYSTEM through kiln-elevated.ps1 (the Windows Update Agent
# refuses to download or install from a WinRM network logon).
#
# One round: search (SearchCriteria), keep the updates the filters select (first matching
# `include:`/`exclude:` PowerShell expression over the IUpdate object `$_` wins; no match: not
# installed), at most UpdateLimit, accept EULAs, download, install, log each update and its result
# code. Exit codes kiln reads:
#   0   nothing (more) to install
#   101 a reboot is required (or more updates remain beyond UpdateLimit): kiln reboots and runs
#       another round
#   102 the same update failed in two rounds: kiln stops instead of looping
#   1   anything else failed
param(
    [string]$SearchCriteria = 'BrowseOnly=0 and IsInstalled=0',
    [string[]]$Filters = @('include:$true'),
    [int]$UpdateLimit = 1000,
    [int]$TiWorkerWaitMinutes = 30
)
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$state = Join-Path $env:SystemRoot 'Temp\kiln-windows-update-failed.txt'

function Wait-TiWorker {
    # Wait (bounded) until TiWorker.exe has been gone for 15 s: installing continues after the API returns.
    $deadline = (Get-Date).AddMinutes($TiWorkerWaitMinutes)
    $quiet = 0
    while ($quiet -lt 3) {
        if ((Get-Date) -gt $deadline) { Write-Output "kiln-wu: TiWorker.exe still running after $TiWorkerWaitMinutes minutes; going on"; return }
        if (Get-Process -Name TiWorker -ErrorAction SilentlyContinue) { $quiet = 0 } else { $quiet++ }
        Start-Sleep -Seconds 5
    }
}

function Test-RebootPending {
    $keys = @(
        'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Component Based Servicing\RebootPending',
        'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Component Based Servicing\PackagesPending',
        'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\WindowsUpdate\Auto Update\RebootRequired'
    )
    foreach ($k in $keys) { if (Test-Path $k) { return $true } }
    return $false
}

function Test-Selected($update) {
    foreach ($f in $Filters) {
        $parts = $f -split ':', 2
        if ($parts.Count -ne 2) { throw "kiln-wu: filter '$f' is not ACTION:EXPRESSION" }
        $action = $parts[0].Trim().ToLowerInvariant()
        $expr = [ScriptBlock]::Create($parts[1])
        $hit = $update | Where-Object $expr
        if ($hit) {
            switch ($action) {
                'include' { return $true }
                'exclude' { return $false }
                default { throw "kiln-wu: filter '$f': the action must be include or exclude" }
            }
        }
    }
    return $false
}

if ($UpdateLimit -le 0) { $UpdateLimit = 1000 }
$session = New-Object -ComObject 'Microsoft.Update.Session'
$session.ClientApplicationID = 'kiln'
$searcher = $session.CreateUpdateSearcher()
Write-Output "kiln-wu: searching: $SearchCriteria"
$result = $null
for ($try = 1; $try -le 10; $try++) {
    try { $result = $searcher.Search($SearchCriteria); break }
    catch { Write-Output "kiln-wu: search failed ($($_.Exception.Message)); retry $try of 10 in 10 s"; Start-Sleep -Seconds 10 }
}
if ($null -eq $result) { Write-Output 'kiln-wu: the search failed 10 times'; exit 1 }

$todo = New-Object -ComObject 'Microsoft.Update.UpdateColl'
$more = $false
foreach ($u in $result.Updates) {
    if (-not (Test-Selected $u)) { Write-Output "kiln-wu: skipped (filters): $($u.Title)"; continue }
    if ($todo.Count -ge $UpdateLimit) { $more = $true; continue }
    if (-not $u.EulaAccepted) { $u.AcceptEula() }
    if ($u.InstallationBehavior.CanRequestUserInput) { Write-Output "kiln-wu: warning: may ask for input: $($u.Title)" }
    Write-Output "kiln-wu: selected: $($u.Title)"
    $null = $todo.Add($u)
}
if ($todo.Count -eq 0) {
    if (Test-RebootPending) { Write-Output 'kiln-wu: no updates to install, but a reboot is pending'; exit 101 }
    Write-Output 'kiln-wu: no Windows updates to install'
    exit 0
}

$downloader = $session.CreateUpdateDownloader()
$downloader.Updates = $todo
$downloader.Priority = 4   # ExtraHigh
Write-Output "kiln-wu: downloading $($todo.Count) update(s)"
$null = $downloader.Download()

$installer = $session.CreateUpdateInstaller()
$installer.Updates = $todo
Write-Output "kiln-wu: installing $($todo.Count) update(s)"
$ir = $installer.Install()
$failedBefore = @()
if (Test-Path $state) { $failedBefore = Get-Content $state }
$failedNow = @()
$twice = @()
for ($i = 0; $i -lt $todo.Count; $i++) {
    $u = $todo.Item($i)
    $r = $ir.GetUpdateResult($i)
    # OperationResultCode: 2 Succeeded, 3 SucceededWithErrors, 4 Failed, 5 Aborted
    Write-Output ("kiln-wu: result {0} (HRESULT 0x{1:X8}): {2}" -f $r.ResultCode, $r.HResult, $u.Title)
    if ($r.ResultCode -ge 4) {
        $id = $u.Identity.UpdateID
        $failedNow += $id
        if ($failedBefore -contains $id) { $twice += $u.Title }
    }
}
Set-Content -Path $state -Value $failedNow
if ($twice.Count -gt 0) {
    Write-Output ('kiln-wu: failed in two rounds, stopping: ' + ($twice -join '; '))
    exit 102
}
Wait-TiWorker
if ($ir.RebootRequired -or (Test-RebootPending)) { Write-Output 'kiln-wu: a reboot is required'; exit 101 }
if ($more) { Write-Output "kiln-wu: more updates remain beyond the limit of $UpdateLimit"; exit 101 }
if ($failedNow.Count -gt 0) { Write-Output 'kiln-wu: some updates failed; another round retries them once'; exit 101 }
exit 0
